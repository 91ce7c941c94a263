"""`mergealign-fast demo --trained`: the miniature MergeAlign experiment's result.

The first run trains the trio and runs the whole experiment (examples/miniature/experiment.py)
into the cache, about 10 minutes on 2 cores; later runs print the kept result: the table, where
the plots are, and a few answers of the expert, the aligned model and the paper's equal mix side
by side.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mergealign_fast import MergeError

# The cache of the trained trio and its results; a new name whenever the experiment changes (v4:
# the general-text control added, v3: per-tensor merges, v2's trio was trained on an earlier
# world), so a cache never shows an older experiment's table.
TRAINED_FOLDER = "miniature-v4"
SHOWN = {"harmful": 2, "benign": 2}  # answers shown per prompt set


def _require_showcase() -> None:
    """Find the modules without importing them: torch must load after the experiment pins its
    CPU code path (train.pin_cpu_arithmetic)."""
    for module in ("torch", "transformers", "lm_eval", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            raise MergeError(f"demo --trained needs the showcase extra ({module} is missing): "
                             "pip install -e '.[showcase]'")


def _answers(path: Path) -> dict:
    return {(r["set"], r["prompt"]): r["answer"] for r in
            map(json.loads, path.read_text().splitlines()) if "prompt" in r}


def run(cache_dir: Path, quiet: bool = False) -> bool:
    _require_showcase()
    from .experiment import run_experiment

    root = cache_dir / TRAINED_FOLDER
    results = root / "results"
    if not (results / "miniature.md").exists():
        print(f"training the miniature trio and running the experiment in {root} (about 10 "
              "minutes, once) ...", flush=True)
        run_experiment(results, root / "trio", log=(lambda *_: None) if quiet else print)
    print((results / "miniature.md").read_text())
    answers = {name: _answers(results / "work" / "tune" / "answers" / f"{cell}.jsonl")
               for name, cell in
               (("expert", "domain"), ("aligned", "aligned"), ("λ=0.5", "lambda-0.5"))}
    for kind, count in SHOWN.items():
        for prompt in [p for (k, p) in answers["aligned"] if k == kind][:count]:
            print(f"{kind}: {prompt}")
            for name, table in answers.items():
                print(f"    {name:8s} {table[(kind, prompt)]}")
    print(f"\nplot: {results / 'miniature.png'}; the λ sweep as `tune` reports it: "
          f"{results / 'miniature-tune.md'} (and .png)")
    return True
