"""What Ray costs on one machine: the 1.1B trio merged in this process and split by shard on a
local Ray instance, and a sweep of 3 λ both ways, warm, alternating rounds in one run.

    python benches/ray_overhead.py [--rounds 3] [--shard-size 500MB] [--json OUT.json]

Rows: the plain merge (all CPUs, one pass) and `merge --ray` (shard groups as tasks of one
thread each, as many at once as the instance has CPUs); the one-pass sweep and `sweep --ray`
(each λ a task that reads the inputs itself).  Outputs are written with --no-fsync (the disk is
not what is compared) and deleted, and dirty pages written back, before each row.  The Ray instance is started once, before the
rounds; its start-up is reported on its own row.  Needs the ray extra.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import machine_line  # noqa: E402

from mergealign_fast.engine.cluster import connect, merge_on_ray, sweep_on_ray  # noqa: E402
from mergealign_fast.tools.demo import default_cache_dir  # noqa: E402
from mergealign_fast.engine.loop import execute, execute_many  # noqa: E402
from mergealign_fast.plan import MergeOptions, plan_merge
from mergealign_fast.units import parse_size  # noqa: E402
from mergealign_fast.plan.sweep import plan_sweep  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio  # noqa: E402

LAMBDAS = (0.25, 0.5, 0.75)


def clean(out: Path) -> None:
    """The last output removed and every dirty page written back, untimed: without it a row
    pays for the writeback of the row before (up to 6.6 GB), which made the first order of rows
    look 2x apart."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def rows_for(trio: dict, work: Path, options: MergeOptions):
    """(name, run) of each measured row; run() returns after the output is complete."""
    roles = (trio["base"], trio["domain"], trio["aligned"])

    def merge(on_ray: bool):
        out = work / "merged"
        clean(out)
        plan = plan_merge(*roles, out, options)
        started = time.perf_counter()
        merge_on_ray(plan, "") if on_ray else execute(plan)
        return time.perf_counter() - started

    def sweep(on_ray: bool):
        out = work / "sweep"
        clean(out)
        plans = plan_sweep(*roles, out, LAMBDAS, options)
        started = time.perf_counter()
        sweep_on_ray(plans, "") if on_ray else execute_many(plans)
        return time.perf_counter() - started

    return [("merge, this process", lambda: merge(False)),
            ("merge --ray (by shard)", lambda: merge(True)),
            (f"sweep of {len(LAMBDAS)} λ, one pass", lambda: sweep(False)),
            (f"sweep of {len(LAMBDAS)} λ --ray (a task per λ)", lambda: sweep(True))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    trio = ensure_synthetic_trio(default_cache_dir() / "bench-llama-1.1b-v1", LLAMA_1B)
    options = replace(MergeOptions(), max_shard_size=parse_size(args.shard_size), fsync=False)
    print(machine_line())
    started = time.perf_counter()
    ray = connect("")
    print(f"Ray {ray.__version__}: local instance started in "
          f"{time.perf_counter() - started:.1f} s, {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
    times = {}
    with tempfile.TemporaryDirectory(dir=default_cache_dir()) as scratch:
        rows = rows_for(trio, Path(scratch), options)
        for name, run in rows:  # warm-up: page cache, Ray's workers and imports
            run()
        for round_index in range(args.rounds):
            for name, run in rows:
                times.setdefault(name, []).append(run())
                print(f"round {round_index + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    print(f"\n| 1.1B trio, warm, --max-shard-size {args.shard_size}, --no-fsync | best s | "
          f"worst s | vs this process |")
    print("|---|---|---|---|")
    for index, (name, _) in enumerate(rows):
        plain = min(times[rows[index - index % 2][0]])
        print(f"| {name} | {min(times[name]):.2f} | {max(times[name]):.2f} | "
              f"{min(times[name]) / plain:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "seconds": times},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
