"""Shared pieces of the benchmark suite: the machine line, the summary table, the 1.1B trio.

Run:  pytest benches/ --benchmark-json=benches/results/latest.json
Each test records GB/s (or wall/CPU/RSS) in `benchmark.extra_info`; the summary printed at the
end puts every result beside the floor measured in the same run.
"""

import os
import platform
import subprocess
from pathlib import Path

import pytest

from mergealign_fast.tools.demo import default_cache_dir
from mergealign_fast.tools.synthetic import LLAMA_1B, ensure_synthetic_trio

SUMMARY: dict = {}


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import mergealign_fast
    from mergealign_fast.kernels import cpu as cpu_backend

    isa = cpu_backend.native().cpu_isa()
    return (f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, {mem:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"mergealign-fast {mergealign_fast.__version__} ({isa})")


def record(section: str, row: str, **values) -> None:
    SUMMARY.setdefault(section, {})[row] = values


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    tr = terminalreporter
    tr.section("mergealign-fast benchmark summary")
    tr.write_line(machine_line())
    for section, rows in SUMMARY.items():
        tr.write_line("")
        tr.write_line(section)
        for row, values in rows.items():
            cells = "  ".join(f"{k}={v}" for k, v in values.items())
            tr.write_line(f"  {row:<34s} {cells}")


@pytest.fixture(scope="session")
def trio_1b():
    """Three 1.1B-parameter Llama-shaped bf16 models (3 x 2.2 GB), generated once, streaming."""
    cache = Path(os.environ.get("MERGEALIGN_BENCH_CACHE", default_cache_dir()))
    root = cache / "bench-llama-1.1b-v1"
    return ensure_synthetic_trio(root, LLAMA_1B)


def settle_memory() -> bool:
    """Write back and drop the page cache, then compact free memory (root only).

    Both suites call this so a run does not depend on what ran before it: after the end-to-end
    merges fill RAM with page cache, fresh arrays measured half the bandwidth (bf16 fused, 1
    thread: 17 GB/s against 35 GB/s right after compaction).  Returns False when not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        Path("/proc/sys/vm/compact_memory").write_text("1")
    except OSError:
        return False
    return True


def drop_file(path: Path) -> None:
    subprocess.run(["rm", "-rf", str(path)], check=True)
