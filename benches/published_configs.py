"""How close our outputs are to mergekit 0.1.5's on configs in the shapes model cards publish
(tests/published_configs.py): per config and dtype, the share of elements bitwise equal, one
step apart and beyond, and the largest difference in steps of the tensor's largest value, in
our default arithmetic; and the share bitwise equal with --compute-dtype mergekit.

    python benches/published_configs.py   # ~1 min; the table docs/mergekit.md quotes
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import published_configs as published  # noqa: E402
from mergealign_fast.dtypes import DType  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="published-configs-") as scratch:
        root = Path(scratch)
        print("| config | dtype | bitwise | one step | beyond | largest (steps of max) | "
              "bitwise, --compute-dtype mergekit |")
        print("|---|---|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            models = ensure_synthetic_trio(root / dtype, LLAMA_TINY, seed=3, roles=published.SET,
                                           dtype=DType.F32 if dtype == "float32" else DType.BF16)
            for name in published.CONFIGS:
                work = root / "work"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                config = published.write_config(work, models, name, dtype)
                done = published.run_ours(config, work / "ours")
                if done.returncode:
                    print(f"| {name} | {dtype} | ours refused: {done.stderr.strip()} |||||")
                    continue
                published.run_mergekit(config, work / "theirs")
                a = published.agreement(work / "ours", work / "theirs")
                written = f" (mergekit writes {a.dtypes[1]})" if a.dtypes else ""
                print(f"| {name} | {dtype}{written} | {a.bitwise / a.elements:.2%} | "
                      f"{a.one_step / a.elements:.2%} | {a.beyond:.2%} | {a.most_steps:.1f} | "
                      f"{_in_mergekit_arithmetic(config, work)} |", flush=True)


def _in_mergekit_arithmetic(config: Path, work: Path) -> str:
    """The share of elements bitwise equal to mergekit's with --compute-dtype mergekit."""
    done = published.run_ours(config, work / "mk", "--compute-dtype", "mergekit")
    if done.returncode:
        return f"refused: {done.stderr.strip()}"
    a = published.agreement(work / "mk", work / "theirs")
    same = not published.tensors_differing_in_bytes(work / "mk", work / "theirs")
    return f"{a.bitwise / a.elements:.2%}" + (" (every byte)" if same else "")


if __name__ == "__main__":
    main()
