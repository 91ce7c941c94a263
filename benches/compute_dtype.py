"""What --compute-dtype mergekit costs: the same bf16 config through `run` (this engine's fp32
arithmetic, streamed), `run --compute-dtype mergekit` (mergekit's arithmetic, tensor by tensor
in torch) and mergekit-yaml 0.1.5 itself, on a ~40M-parameter Llama-shaped set of a base and
two fine-tunes, rows alternating, each a fresh process; wall time and peak RSS of each, and
whether the mergekit-arithmetic output is mergekit's byte for byte.

    python benches/compute_dtype.py --rounds 3
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_end_to_end import run_measured  # noqa: E402  (benches/conftest.py first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import published_configs as published  # noqa: E402
from mergealign_fast.dtypes import DType  # noqa: E402
from mergealign_fast.tools.synthetic import LlamaShape, ensure_synthetic_trio  # noqa: E402

SHAPE = LlamaShape(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vocab=16000)
CONFIGS = {
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {aligned}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: bfloat16
""",
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {aligned}
parameters: {{t: [0.2, 0.8]}}
dtype: bfloat16
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.6}}
  - model: {aligned}
    parameters: {{weight: 0.4}}
dtype: bfloat16
""",
}


def _contenders(config: Path, out: Path):
    ours = [sys.executable, "-m", "mergealign_fast", "run", str(config), str(out), "--quiet",
            "--no-fsync"]
    mergekit = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    return {"ours (fp32)": ours, "ours --compute-dtype mergekit": ours + ["--compute-dtype",
                                                                        "mergekit"],
            "mergekit-yaml": [mergekit, str(config), str(out), "--no-copy-tokenizer"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compute-dtype-") as scratch:
        root = Path(scratch)
        models = ensure_synthetic_trio(root / "models", SHAPE, seed=7, dtype=DType.BF16)
        print("| config | contender | median wall | peak RSS | rounds |")
        print("|---|---|---|---|---|")
        for name, text in CONFIGS.items():
            config = root / f"{name}.yml"
            config.write_text(text.format(**models))
            measured = {}
            for round_ in range(args.rounds):
                for contender, cmd in _contenders(config, root / "out").items():
                    shutil.rmtree(root / "out", ignore_errors=True)
                    wall, _, rss = run_measured(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                    measured.setdefault(contender, []).append((wall, rss))
                    if contender == "mergekit-yaml":
                        shutil.copytree(root / "out", root / "theirs", dirs_exist_ok=True)
                    elif "mergekit" in contender:
                        shutil.copytree(root / "out", root / "mk", dirs_exist_ok=True)
            for contender, runs in measured.items():
                print(f"| {name} | {contender} | {statistics.median(w for w, _ in runs):.2f} s "
                      f"| {max(r for _, r in runs) / 1e6:.0f} MB | {len(runs)} |")
            same = not published.tensors_differing_in_bytes(root / "mk", root / "theirs")
            print(f"| {name} | --compute-dtype mergekit = mergekit byte for byte: {same} ||||")
            shutil.rmtree(root / "mk")
            shutil.rmtree(root / "theirs")


if __name__ == "__main__":
    main()
