"""The stateful torture test (tests/torture.py) at bench size: thousands of random sequences.

    python benches/torture.py [--sequences 2000] [--steps 10] [--out benches/results/torture.txt]

Every sequence starts from a fresh workspace; a violated invariant stops the run with the
shrunk sequence that shows it.  As root, the workspaces live on a 256 MiB tmpfs, so the full-disk
rule runs too.  Prints (and writes) the counts: sequences, commands, kills, refusals.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

import torture  # noqa: E402


def mount_small_fs():
    """A 256 MiB tmpfs (root only), or None."""
    mount = Path(tempfile.mkdtemp(prefix="torture-fs-"))
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        return None
    return mount


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    small_fs = mount_small_fs()
    torture.MergeTorture.small_fs = small_fs
    started = time.perf_counter()
    try:
        run_state_machine_as_test(torture.MergeTorture, settings=settings(
            max_examples=args.sequences, stateful_step_count=args.steps, deadline=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        if small_fs is not None:
            subprocess.run(["umount", "-l", str(small_fs)], check=False)
    seconds = time.perf_counter() - started
    line = (f"{torture.STATS['sequences']} sequences (up to {args.steps} steps each), "
            f"{torture.STATS['steps']} commands, {torture.STATS['kills']} killed mid-way, "
            f"{torture.STATS['refusals']} refusals, 0 violations, {seconds:.0f} s"
            + ("" if small_fs else " (not root: no full-disk rule)"))
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
