"""What a config's tokenizer handling costs: `run` of the same tiny trio with and without
`tokenizer_source: union` (a merge by token, the union tokenizer built and saved), rows
alternating, each a fresh process as a user runs it.  The difference is the tokenizer overhead
(the tokenizers library in this process; before, transformers imported in a child: 6-8 s).

    python benches/tokenizer_overhead.py --rounds 5
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CONFIG = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {domain}
    parameters: {{weight: 0.7}}
  - model: {aligned}
    parameters: {{weight: 0.5}}
{tokenizer}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from test_vocabularies import WORDS, _save_model  # the tests' tiny models with tokenizers

    with tempfile.TemporaryDirectory(prefix="tokenizer-overhead-") as scratch:
        root = Path(scratch)
        # The union's models differ in vocabulary; the plain merge's have the same one and
        # the same shapes (one row more or less is nothing beside a process start).
        differing = {"base": _save_model(root / "base", WORDS + ["<b>"], seed=0),
                     "domain": _save_model(root / "domain", WORDS + ["<med1>"], seed=1),
                     "aligned": _save_model(root / "aligned", WORDS, special=["<|im_start|>"],
                                            seed=2)}
        alike = {role: _save_model(root / f"alike-{role}", WORDS + ["<b>"], seed=seed)
                 for seed, role in enumerate(differing)}
        configs = {"plain": root / "plain.yml", "union": root / "union.yml"}
        configs["plain"].write_text(CONFIG.format(tokenizer="", **alike))
        configs["union"].write_text(CONFIG.format(tokenizer="tokenizer_source: union",
                                                  **differing))
        times = {kind: [] for kind in configs}
        for round_ in range(args.rounds):
            for kind, config in configs.items():
                out = root / f"out-{kind}-{round_}"
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "mergealign_fast", "run", str(config),
                                str(out), "--quiet"], check=True)
                times[kind].append(time.perf_counter() - started)
        for kind, seconds in times.items():
            print(f"{kind:6s} median {statistics.median(seconds):.2f} s  "
                  f"(min {min(seconds):.2f}, max {max(seconds):.2f}, {args.rounds} runs)")
        overhead = statistics.median(times["union"]) - statistics.median(times["plain"])
        print(f"tokenizer overhead (median union - median plain): {overhead:.2f} s")


if __name__ == "__main__":
    main()
