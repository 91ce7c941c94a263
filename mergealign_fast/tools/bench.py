"""`mergealign-fast bench`: this machine's floors and our speed beside them, in one command.

Floors, measured in the same run: a memcpy of the same bytes with the same threads (what the
memory system allows the kernel), reading the inputs (what the disk and page cache allow the
merge) and writing the output's size with and without fsync.  Ours: the fused kernel per dtype
and thread count, and the end-to-end merge of a generated Llama-shaped trio, warm and (as root,
who may drop the page cache) cold.  Each of ours is printed beside its floor as a ratio.
mergekit is measured beside us with --vs-mergekit when it is installed; --device cuda adds the
GPU rows.  The machine line names what two people comparing results need: CPU, the kernel's code
path (x86-64-v4/v3/baseline, F16C), cores, memory and the file system of the work folder.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .._version import __version__
from ..dtypes import DType
from ..errors import MergeError
from ..kernels import cpu
from ..kernels.cpu import default_threads

# Elements per kernel array: 32 Mi (64-128 MiB a tensor) is far beyond any cache, so memory
# bandwidth is what is measured; --quick uses 1 Mi (seconds, for CI; caches then flatter us).
KERNEL_ELEMENTS = 32 << 20
QUICK_KERNEL_ELEMENTS = 1 << 20
# The default trio: the demo's Llama shape (3 x 311 MB in bf16) fits any page cache and keeps the
# whole run under a minute on 2 cores; --quick uses the test suite's tiny trio.
DEFAULT_ROUNDS, QUICK_ROUNDS = 5, 1


@dataclass
class Row:
    """One measured thing: its best-of-rounds time, bytes moved and, for ours, its floor."""

    group: str   # "floor", "ours", "mergekit" or "gpu"
    name: str
    nbytes: int  # bytes moved per round (read + written)
    seconds: List[float]
    floor: Optional[str] = None  # name of the floor row this one is compared with
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.nbytes / min(self.seconds) / 1e9


def timed(fn: Callable[[], None], rounds: int, setup: Callable[[], None] = lambda: None,
          warmup: int = 1) -> List[float]:
    for _ in range(warmup):
        setup()
        fn()
    times = []
    for _ in range(rounds):
        setup()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def timed_alternately(fns: List[Callable[[], None]], rounds: int) -> List[List[float]]:
    """Each function's round times, the functions taking turns within every round: a ratio of
    two rows measured this way compares the same moments of a machine whose speed drifts (a
    shared VM's memory bandwidth moved by ±25% between blocks of rounds here)."""
    for fn in fns:
        fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, spent in zip(fns, times):
            started = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - started)
    return times


# ---- the machine --------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _file_system(folder: Path) -> str:
    """The type of the file system holding `folder` (/proc/mounts: longest matching mount)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs_type = line.split()[:3]
            if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs_type
    except (OSError, ValueError):
        pass
    return kind


def machine(work: Path) -> Dict[str, object]:
    native = cpu.native()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": _cpu_name(), "code_path": native.cpu_isa(), "f16c": native.cpu_uses_f16c(),
            "direct_path": native.cpu_uses_direct_path(),
            "cpus": default_threads(), "memory_gib": round(memory / 2**30, 1),
            "file_system": _file_system(work), "kernel": platform.release(),
            "python": platform.python_version(), "mergealign_fast": __version__}


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Write back and drop the page cache (root only): the next read comes from the disk."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1")


# ---- floors and ours ----------------------------------------------------------------------------

def kernel_rows(elements: int, threads_list: List[int], rounds: int) -> List[Row]:
    """Per dtype and thread count: memcpy of the same traffic (2N·size read + 2N·size written)
    and the fused merge (3N·size read + N·size written)."""
    import numpy as np

    from ..engine.in_memory import merge_tensors

    native, rows = cpu.native(), []
    rng = np.random.default_rng(0)
    for dtype in (DType.BF16, DType.F16, DType.F32):
        # Weight-like values written before use (never-written pages all map to one zero page,
        # which a copy would read from cache), no subnormals (slow on x86).
        x = rng.standard_normal(3 * elements, dtype=np.float32) * np.float32(0.02)
        stored = ((x.view(np.uint32) >> 16).astype(np.uint16) if dtype is DType.BF16
                  else x.astype(np.float16 if dtype is DType.F16 else np.float32))
        inputs = np.split(stored, 3)
        out = np.empty_like(inputs[0])
        src = np.ones(2 * out.nbytes, dtype=np.uint8)
        dst = np.ones_like(src)
        for threads in threads_list:
            tag = f"{dtype.short_name} {threads}t"
            copy, fused = timed_alternately([
                lambda: native.copy_threads(dst.ctypes.data, src.ctypes.data, src.nbytes,
                                            threads),
                lambda: merge_tensors(*inputs, out=out, threads=threads)], rounds)
            rows.append(Row("floor", f"memcpy {tag}", 2 * src.nbytes, copy))
            rows.append(Row("ours", f"kernel {tag}", 4 * out.nbytes, fused, f"memcpy {tag}"))
    return rows


def trio_for(size: int, root: Path, quick: bool) -> Dict[str, Path]:
    """A generated bf16 Llama-shaped trio of about `size` bytes per model, built once in root."""
    from .synthetic import LLAMA_DEMO, LLAMA_TINY, LlamaShape, ensure_synthetic_trio

    if quick:
        shape = LLAMA_TINY
    else:
        per_layer = (LLAMA_DEMO.parameters - 2 * LLAMA_DEMO.vocab * LLAMA_DEMO.hidden) \
            // LLAMA_DEMO.layers
        layers = max(1, round((size / 2 - 2 * LLAMA_DEMO.vocab * LLAMA_DEMO.hidden) / per_layer))
        shape = LlamaShape(LLAMA_DEMO.hidden, LLAMA_DEMO.intermediate, layers, LLAMA_DEMO.heads,
                           LLAMA_DEMO.kv_heads, LLAMA_DEMO.vocab)
    return ensure_synthetic_trio(root / f"bench-trio-{shape.layers}l-{shape.vocab}v", shape)


def _input_files(trio: Dict[str, Path]) -> List[Path]:
    return [f for folder in trio.values() for f in sorted(folder.glob("*.safetensors"))]


def _read_all(files: List[Path]) -> None:
    buffer = bytearray(1 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _write_file(path: Path, nbytes: int, fsync: bool) -> None:
    block = b"\x5a" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        for offset in range(0, nbytes, len(block)):
            f.write(block[: min(len(block), nbytes - offset)])
        if fsync:
            os.fsync(f.fileno())


def io_rows(trio: Dict[str, Path], work: Path, rounds: int, cold: bool) -> List[Row]:
    files = _input_files(trio)
    read = sum(f.stat().st_size for f in files)
    out_size = read // 3
    scratch = work / "write-floor"
    rows = [Row("floor", "read inputs (warm)", read, timed(lambda: _read_all(files), rounds))]
    if cold:
        rows.append(Row("floor", "read inputs (cold)", read,
                        timed(lambda: _read_all(files), rounds, setup=drop_caches, warmup=0)))
    for fsync in (False, True):
        name = f"write output size{' + fsync' if fsync else ''}"
        rows.append(Row("floor", name, out_size, timed(
            lambda: _write_file(scratch, out_size, fsync), rounds,
            setup=lambda: scratch.unlink(missing_ok=True))))
    scratch.unlink(missing_ok=True)
    return rows


def merge_rows(trio: Dict[str, Path], work: Path, rounds: int, cold: bool,
               threads: int) -> List[Row]:
    from ..api import merge_checkpoints

    out = work / "merged"
    files = _input_files(trio)
    moved = sum(f.stat().st_size for f in files) * 4 // 3  # 3 inputs read + 1 output written
    rows = []
    modes = [("warm", lambda: None)] + ([("cold", drop_caches)] if cold else [])
    for temperature, before in modes:
        for fsync in (False, True):
            def setup():
                shutil.rmtree(out, ignore_errors=True)
                before()

            def merge():
                merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out,
                                  fsync=fsync, threads=threads)

            floor = f"read inputs ({temperature})"
            rows.append(Row("ours", f"merge ({temperature}{', fsync' if fsync else ''})", moved,
                            timed(merge, rounds, setup=setup, warmup=0), floor))
    shutil.rmtree(out, ignore_errors=True)
    return rows


def mergekit_rows(trio: Dict[str, Path], work: Path) -> List[Row]:
    """mergekit 0.1.5's task_arithmetic of the same trio, one run (it takes far longer)."""
    mergekit = shutil.which("mergekit-yaml")
    if mergekit is None:
        raise MergeError("--vs-mergekit: mergekit-yaml is not installed (pip install "
                         "'mergealign-fast[mergekit]')")
    config = work / "mergekit.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {trio['base']}\nmodels:\n"
                      f"  - model: {trio['domain']}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {trio['aligned']}\n    parameters: {{weight: 0.5}}\n"
                      "dtype: bfloat16\n")
    out = work / "mergekit-out"
    moved = sum(f.stat().st_size for f in _input_files(trio)) * 4 // 3

    def run():
        subprocess.run([mergekit, str(config), str(out)], check=True, capture_output=True)

    seconds = timed(run, 1, setup=lambda: shutil.rmtree(out, ignore_errors=True), warmup=0)
    shutil.rmtree(out, ignore_errors=True)
    return [Row("mergekit", "mergekit task_arithmetic (warm)", moved, seconds,
                "read inputs (warm)")]


def gpu_rows(elements: int, rounds: int) -> List[Row]:
    """Device copy, pinned host<->device copies and the CUDA and Triton kernels (torch)."""
    try:
        import torch
    except ImportError:
        raise MergeError("--device cuda needs torch with CUDA") from None
    if not torch.cuda.is_available():
        raise MergeError("--device cuda: torch sees no CUDA device here")
    from ..engine.in_memory import merge_tensors

    def synced(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run

    rows = []
    nbytes = 4 * elements * 2  # the bf16 kernel's traffic (3 inputs + 1 output): a copy of half
    src = torch.ones(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    rows.append(Row("gpu", "device copy", nbytes, timed(synced(lambda: dst.copy_(src)), rounds)))
    pinned = torch.ones(nbytes // 2, dtype=torch.uint8, pin_memory=True)
    rows.append(Row("gpu", "pinned host -> device", pinned.numel(),
                    timed(synced(lambda: src.copy_(pinned, non_blocking=True)), rounds)))
    rows.append(Row("gpu", "device -> pinned host", pinned.numel(),
                    timed(synced(lambda: pinned.copy_(src, non_blocking=True)), rounds)))
    inputs = [torch.randn(elements, device="cuda").to(torch.bfloat16) for _ in range(3)]
    out = torch.empty_like(inputs[0])
    for backend in ("cuda", "triton"):
        try:
            seconds = timed(synced(lambda: merge_tensors(*inputs, out=out, backend=backend)),
                            rounds)
        except MergeError as exc:
            print(f"mergealign-fast: note: {backend} kernel not measured: {exc}", file=sys.stderr)
            continue
        rows.append(Row("gpu", f"kernel {backend} bf16", 4 * out.numel() * 2, seconds,
                        "device copy"))
    return rows


# ---- report -------------------------------------------------------------------------------------

def beside_floor(row: Row, rows: List[Row]) -> Dict[str, Optional[float]]:
    """How a row compares with its floor: the throughput ratio when both move the same bytes
    (the kernel and its memcpy), else how many times the floor's time it takes (a merge, which
    reads what the read floor reads and also writes the output)."""
    floor = next((r for r in rows if r.name == row.floor), None)
    if floor is None:
        return {"ratio_to_floor": None, "times_floor_time": None}
    if floor.nbytes == row.nbytes:
        return {"ratio_to_floor": row.gbps / floor.gbps, "times_floor_time": None}
    return {"ratio_to_floor": None, "times_floor_time": min(row.seconds) / min(floor.seconds)}


def table(rows: List[Row], info: Dict[str, object]) -> List[str]:
    lines = [", ".join(f"{k} {v}" for k, v in info.items()),
             f"{'':40s} {'best s':>9s} {'GB/s':>8s}   beside its floor"]
    for row in rows:
        cmp = beside_floor(row, rows)
        beside = ""
        if cmp["ratio_to_floor"] is not None:
            beside = f"{cmp['ratio_to_floor']:6.0%} of {row.floor}"
        elif cmp["times_floor_time"] is not None:
            beside = f"{cmp['times_floor_time']:6.2f}x the time of {row.floor}"
        lines.append(f"{row.group:9s} {row.name:30s} {min(row.seconds):9.4f} {row.gbps:8.2f}"
                     f"   {beside}")
    return lines


def to_json(rows: List[Row], info: Dict[str, object]) -> dict:
    """pytest-benchmark's JSON layout, so its compare tools read it."""
    benchmarks = []
    for row in rows:
        s = sorted(row.seconds)
        cmp = {k: None if v is None else round(v, 4) for k, v in beside_floor(row, rows).items()}
        benchmarks.append({
            "group": row.group, "name": row.name, "fullname": f"mergealign-fast bench::{row.name}",
            "params": None,
            "stats": {"min": s[0], "max": s[-1], "mean": statistics.fmean(s),
                      "stddev": statistics.stdev(s) if len(s) > 1 else 0.0,
                      "median": statistics.median(s), "rounds": len(s), "iterations": 1,
                      "total": sum(s), "ops": 1 / statistics.fmean(s)},
            "extra_info": {"GB/s": round(row.gbps, 3), "bytes": row.nbytes, "floor": row.floor,
                           **cmp, **row.extra},
        })
    return {"machine_info": {"node": platform.node(), "machine": platform.machine(),
                             "python_version": platform.python_version(), **info},
            "commit_info": {}, "benchmarks": benchmarks,
            "datetime": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": "4.0.0"}


def run_bench(size: int, quick: bool, threads: Optional[int], work: Optional[Path],
              json_path: Optional[Path], vs_mergekit: bool, device: str) -> List[str]:
    """Measure, print the table as rows come, return it; write the JSON if asked."""
    threads = threads or default_threads()
    cache = Path(work) if work else Path(tempfile.gettempdir()) / "mergealign-fast-bench"
    cache.mkdir(parents=True, exist_ok=True)
    info = machine(cache)
    rounds = QUICK_ROUNDS if quick else DEFAULT_ROUNDS
    cold = can_drop_caches() and not quick
    rows = kernel_rows(QUICK_KERNEL_ELEMENTS if quick else KERNEL_ELEMENTS,
                       sorted({1, threads}), rounds)
    trio = trio_for(size, cache, quick)
    # What the rows write (a merged model, the write floor's file, mergekit's config and
    # output) goes into a folder made for this run alone and removed with it: a `merged` the
    # user keeps in the work folder is never touched.
    scratch = Path(tempfile.mkdtemp(prefix=".mergealign-bench-run-", dir=cache))
    try:
        rows += io_rows(trio, scratch, rounds, cold)
        rows += merge_rows(trio, scratch, max(1, rounds - 2), cold, threads)
        if vs_mergekit:
            rows += mergekit_rows(trio, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if device.split(":")[0] == "cuda":
        rows += gpu_rows(QUICK_KERNEL_ELEMENTS if quick else KERNEL_ELEMENTS, rounds)
    if json_path:
        json_path.write_text(json.dumps(to_json(rows, info), indent=1) + "\n")
    return table(rows, info) + ([] if cold or quick else [
        "(warm only: dropping the page cache for cold rows needs root)"])
