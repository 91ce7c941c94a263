"""One merge through the GPU writer's host pipeline with the CPU standing in for the GPU
(native fill threads, the cpu kernel, the writer thread's CRC and pwrite), or through the plain
CPU writer, no fsync, as a child process of bench_end_to_end.py.  Both import torch first, so
the seconds printed (the merge alone) compare the writers, not the imports.

    python benches/host_pipeline_run.py BASE DOMAIN ALIGNED OUT [--writer cpu|pipeline]
        [--stage-mib 64] [--copies]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergealign_fast.engine.loop import execute  # noqa: E402
from mergealign_fast.plan import MergeOptions, plan_merge  # noqa: E402
from mergealign_fast.engine.writers.gpu import STAGE_BYTES, GpuWriter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs=3, type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage-mib", type=int, default=STAGE_BYTES >> 20)
    parser.add_argument("--copies", action="store_true",
                        help="device buffers apart from the staging, copied as on a GPU")
    parser.add_argument("--writer", choices=("cpu", "pipeline"), default="pipeline")
    args = parser.parse_args()
    import torch  # noqa: F401  (the GPU writer needs it: imported before the clock starts)

    plan = plan_merge(*args.models, args.out, MergeOptions(fsync=False, force=True))
    writer = None if args.writer == "cpu" else GpuWriter(
        plan, 2 << 30, backend="cpu", device="cpu", device_copies=args.copies,
        stage_bytes=args.stage_mib << 20)
    started = time.perf_counter()
    execute(plan, writer=writer)
    seconds = time.perf_counter() - started
    stages = writer.stage_seconds.items() if writer else ()
    print(f"{seconds:.3f} s" + "".join(f"; {k} {v:.2f} s" for k, v in stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
