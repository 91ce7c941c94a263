"""The device check: one script that, on a GPU machine, checks and times everything GPU.

    bash benches/run_gpu_check.sh      (builds offline, then runs this; ~6 minutes on an H200)

Rows are printed as they are measured, so a run cut short still leaves its results; a table of
checks against their targets comes last.  Without a usable CUDA backend the run FAILS (it does
not skip).  `--smoke` runs the same code on the CPU with tiny sizes (Triton's interpreter, the
GPU writer with the cpu kernel standing in) so CI tests the script itself; it claims no numbers.

1. correctness, bit for bit against the native CPU kernel (NaN included: canonical everywhere)
   - all 65,536 bf16 and fp16 bit patterns against ±0, ±inf, NaN, subnormals and the largest
     finite value, in each role, with several weight pairs (negative and large too);
   - the dtype x size x alignment grid: mixed input dtypes, misaligned inputs and output, in
     place over the base; every method's recipe kernel; first failures printed in hex;
   - a tensor of 2^31 + 4100 elements, aligned and offset by one element;
2. kernel GB/s (3 inputs read + 1 output written) beside a device-to-device copy of the same
   bytes: bf16/fp16/fp32, aligned and not, the recipe kernel; per-call overhead at 4M elements;
3. streaming merges of a generated 1.1B trio: pinned host<->device bandwidth alone and both ways
   at once, DMA from a registered input mapping against the staged pread fill, the host
   pipeline alone (the CPU standing in: fill + merge + CRC + write), the GPU
   writer at 16/32/64 MiB stages, warm and cold, per-stage seconds, device memory reserved and
   pinned memory measured, bitwise against the CPU merge; every method through the GPU writer;
4. race stress on the GPU: tiny budgets (tensors split into many chunks), random
   torch.cuda._sleep before every stage and random host delays, bitwise and `verify`.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the recipe grid of the kernel tests

from mergealign_fast import Method, merge_checkpoints, merge_tensors  # noqa: E402
from mergealign_fast.dtypes import DType, to_torch  # noqa: E402
from mergealign_fast.engine.loop import execute  # noqa: E402
from mergealign_fast.kernels import cpu as cpu_backend  # noqa: E402
from mergealign_fast.kernels import cuda as cuda_backend  # noqa: E402
from mergealign_fast.kernels import describe_backends  # noqa: E402
from mergealign_fast.kernels.buffer import Buffer  # noqa: E402
from mergealign_fast.output.manifest import verify_output  # noqa: E402
from mergealign_fast.plan import MergeOptions, plan_merge  # noqa: E402
from mergealign_fast.tools.synthetic import LLAMA_1B, LLAMA_TINY, ensure_synthetic_trio  # noqa: E402
from mergealign_fast.engine.writers.gpu import DEVICE_ROUNDING, SLOTS, GpuWriter  # noqa: E402

DTYPES = [DType.BF16, DType.F16, DType.F32]
TABLE = []  # (check, result, target, verdict)
FAILURES_SHOWN = 5


def log(text=""):
    print(text, flush=True)


def on_gpu() -> bool:
    return torch.cuda.is_available() and not SMOKE


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def synchronize():
    if on_gpu():
        torch.cuda.synchronize()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def measured(ok: bool) -> str:
    return "n/a (CPU)" if SMOKE else verdict(ok)


def backends():
    """GPU backends to check: cuda and triton (on the CPU: Triton's interpreter)."""
    if not on_gpu():
        return ["triton"]
    report = describe_backends()
    return [n for n in ("cuda", "triton") if report[n].startswith("available")]


def random_tensor(n: int, dtype: DType, generator) -> torch.Tensor:
    values = torch.randn(n, generator=generator, device=device(), dtype=torch.float32)
    return (values * 0.02).to(to_torch(dtype))


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def hex_of(x: torch.Tensor, i: int) -> str:
    width = 8 if x.dtype == torch.float32 else 4
    return f"{int(bits(x)[i].item()) & (1 << 4 * width) - 1:0{width}x}"


class Mismatches:
    """Counts cases and bit differences; prints the first few failing elements in hex."""

    def __init__(self, label: str):
        self.label, self.cases, self.failed, self.shown = label, 0, 0, 0

    def compare(self, case: str, inputs, got: torch.Tensor, want: torch.Tensor) -> None:
        self.cases += 1
        got, want = got.cpu().reshape(-1), want.cpu().reshape(-1)
        differ = (bits(got) != bits(want)).nonzero().flatten()
        if differ.numel() == 0:
            return
        self.failed += 1
        for i in differ[:max(0, FAILURES_SHOWN - self.shown)].tolist():
            shown = " ".join(hex_of(x.cpu().reshape(-1), i) for x in inputs)
            log(f"  MISMATCH {self.label} {case} element {i}: inputs {shown}: got "
                f"{hex_of(got, i)}, CPU {hex_of(want, i)}")
            self.shown += 1

    def row(self, check: str) -> None:
        log(f"{self.label}: {self.cases - self.failed}/{self.cases} cases bitwise = CPU kernel")
        TABLE.append((check, f"{self.cases - self.failed}/{self.cases} bitwise = CPU", "all",
                      verdict(self.failed == 0)))


# ---- 1. correctness ---------------------------------------------------------------------------

def specials(dtype: DType) -> list:
    """±0, ±inf, NaN, the smallest subnormal (both signs), the largest finite (both), 1."""
    info = torch.finfo(to_torch(dtype))
    tiny = info.smallest_normal * info.eps
    return [0.0, -0.0, float("inf"), float("-inf"), float("nan"), tiny, -tiny, info.max,
            -info.max, 1.0]


WEIGHT_PAIRS = [(0.3, 0.9), (-1.5, 2.0), (1e4, -1e4), (1.0, 0.0)]


def check_bit_patterns(names):
    """Every 16-bit pattern as one input, a special value as the others, in each role."""
    for dtype in (DType.BF16, DType.F16):
        every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
        if SMOKE:
            every = every[::64].contiguous()  # the interpreter is slow: a sample
        patterns = every.view(to_torch(dtype)).to(device())
        for backend in names:
            check = Mismatches(f"bit patterns {dtype.short_name} {backend}")
            for value in specials(dtype)[:4 if SMOKE else None]:
                special = torch.full_like(patterns, value)
                arrangements = {"x s s": (patterns, special, special),
                                "s x s": (special, patterns, special),
                                "s s x": (special, special, patterns),
                                "x flip(x) s": (patterns, patterns.flip(0), special)}
                for (wd, wa) in WEIGHT_PAIRS[:2 if SMOKE else None]:
                    for label, trio in arrangements.items():
                        for out_dtype in (dtype, DType.F32):
                            got = merge_tensors(*trio, domain_weight=wd, align_weight=wa,
                                                out_dtype=out_dtype, backend=backend)
                            want = merge_tensors(*(x.cpu() for x in trio), domain_weight=wd,
                                                 align_weight=wa, out_dtype=out_dtype,
                                                 backend="cpu")
                            check.compare(f"{label} s={value} w=({wd},{wa}) -> "
                                          f"{out_dtype.short_name}", trio, got, want)
            check.row(f"all {dtype.short_name} patterns x specials ({backend})")


def _shifted(n: int, dtype: DType, shift: int, gen) -> torch.Tensor:
    return random_tensor(n + shift, dtype, gen)[shift:]


DTYPE_SETS = [(d, d, d) for d in DTYPES] + [(DType.BF16, DType.F16, DType.F32),
                                            (DType.F32, DType.BF16, DType.F16)]


def check_grid(names):
    sizes = [0, 1, 7, 4097, 123 * 431] + ([] if SMOKE else [(1 << 20) | 3])
    gen = torch.Generator(device=device()).manual_seed(0)
    for backend in names:
        check = Mismatches(f"grid {backend}")
        for in_dtypes in DTYPE_SETS:
            for out_dtype in DTYPES:
                for n in sizes:
                    for shift in (0, 1):  # 1: inputs and output off any 16-byte boundary
                        inputs = [_shifted(n, dt, shift, gen) for dt in in_dtypes]
                        out = torch.empty(n + shift, dtype=to_torch(out_dtype),
                                          device=device())[shift:]
                        merge_tensors(*inputs, domain_weight=0.3, align_weight=0.9, out=out,
                                      backend=backend)
                        want = merge_tensors(*(x.cpu() for x in inputs), domain_weight=0.3,
                                             align_weight=0.9, out_dtype=out_dtype,
                                             backend="cpu")
                        case = (f"{'/'.join(d.short_name for d in in_dtypes)} -> "
                                f"{out_dtype.short_name} n={n} shift={shift}")
                        check.compare(case, inputs, out, want)
            # In place over the base (same dtype only: the output takes the base's memory).
            if len(set(in_dtypes)) == 1:
                for n in sizes:
                    inputs = [_shifted(n, in_dtypes[0], 1, gen) for _ in range(3)]
                    want = merge_tensors(*(x.cpu() for x in inputs), domain_weight=-0.7,
                                         align_weight=1.2, backend="cpu")
                    merge_tensors(*inputs, domain_weight=-0.7, align_weight=1.2, out=inputs[0],
                                  backend=backend)
                    check.compare(f"in place {in_dtypes[0].short_name} n={n}", inputs,
                                  inputs[0], want)
        check.row(f"dtype x size x alignment grid, in place ({backend})")


def recipe_kernel():
    """The GPU's merge_recipe (in --smoke, the CPU's: the script's code path is what is run)."""
    return cuda_backend.merge_recipe if on_gpu() else cpu_backend.merge_recipe


def buffer_of(x: torch.Tensor) -> Buffer:
    from mergealign_fast.dtypes import from_torch

    return Buffer(x.data_ptr(), from_torch(x.dtype), x.numel(), owner=x)


def check_recipes():
    """Every branch of every method's per-element pass (the kernel tests' recipe grid), on
    the GPU against the CPU's bulk kernel, mixed dtypes and odd alignments, masks keyed past
    2^32."""
    from test_kernel import recipes_reaching_every_branch

    gen = torch.Generator(device=device()).manual_seed(5)
    check = Mismatches("recipes")
    launch = recipe_kernel()
    for name, recipe in recipes_reaching_every_branch():
        for in_dtypes in DTYPE_SETS:
            for n, shift, first in ((4099, 0, 0), (123 * 431, 1, 2**32 - 100)):
                inputs = [_shifted(n, dt, shift, gen) for dt in in_dtypes]
                inputs[0][:3] = torch.tensor([float("nan"), float("inf"), 0.0])
                out = torch.empty(n + shift, dtype=to_torch(in_dtypes[0]),
                                  device=device())[shift:]
                launch(*(buffer_of(x) for x in inputs), buffer_of(out), recipe, first, 1)
                host = [x.cpu() for x in inputs]
                want = torch.empty_like(out, device="cpu")
                cpu_backend.merge_recipe(*(buffer_of(x) for x in host), buffer_of(want), recipe,
                                         first, 2)
                check.compare(f"{name} {'/'.join(d.short_name for d in in_dtypes)} n={n} "
                              f"shift={shift} first={first}", inputs, out, want)
    check.row("every method's recipe kernel, mixed dtypes, unaligned")


def check_huge(names):
    """One tensor past 2^31 elements, aligned and offset by one element: int64 indexing end to
    end, bitwise against the CPU kernel."""
    n = (1 << 31) + 4100 if not SMOKE else 4100
    gen = torch.Generator(device=device()).manual_seed(1)
    storage = [random_tensor(n + 1, DType.BF16, gen) for _ in range(3)]
    host = [x.cpu() for x in storage]
    for offset in (0, 1):
        inputs = [x[offset:offset + n] for x in storage]
        want = merge_tensors(*(x[offset:offset + n] for x in host), domain_weight=0.5,
                             align_weight=0.5, backend="cpu")
        for backend in names:
            check = Mismatches(f"huge {backend} offset {offset}")
            got = merge_tensors(*inputs, domain_weight=0.5, align_weight=0.5, backend=backend)
            synchronize()
            check.compare(f"n={n}", inputs, got, want)
            del got
            check.row(f"{n:,}-element bf16 tensor, offset {offset} ({backend})")
    del storage, host


# ---- 2. kernel bandwidth ----------------------------------------------------------------------

def time_ms(fn, repeats=20, batch=10) -> float:
    """Median milliseconds of one fn() over `repeats` samples, timed with CUDA events.

    Each sample enqueues `batch` calls back to back, so the ~50 us of Python and launch overhead
    per call overlaps the previous call's GPU work instead of being counted (a 2 GB merge takes
    ~0.5 ms at 4 TB/s, so per-call timing would understate the kernel by ~10%)."""
    if not on_gpu():
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    fn()  # warm-up: Triton compiles on first call
    samples = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / batch)
    return float(np.median(samples))


def bandwidth_row(label: str, nbytes: int, ms: float, copy: float, target: bool) -> None:
    rate = nbytes / ms / 1e6
    log(f"{label}: {rate:8.1f} GB/s, device copy of the same bytes {copy:8.1f} GB/s "
        f"({rate / copy:.0%})")
    TABLE.append((label, f"{rate:.0f} GB/s = {rate / copy:.0%} of copy ({copy:.0f})",
                  ">= 85%" if target else "-",
                  measured(rate >= 0.85 * copy) if target else "-"))


def kernel_bandwidth(names):
    n = 1 << 28 if not SMOKE else 1 << 12  # 512 MiB per bf16 tensor: far beyond the 60 MB L2
    gen = torch.Generator(device=device()).manual_seed(2)
    for dtype in DTYPES:
        storage = [random_tensor(n + 1, dtype, gen) for _ in range(4)]
        nbytes = 4 * n * dtype.itemsize
        src = torch.empty(2 * n * dtype.itemsize, dtype=torch.uint8, device=device())
        dst = torch.empty_like(src)
        copy = nbytes / time_ms(lambda: dst.copy_(src)) / 1e6
        for shift in (0, 1):
            inputs = [x[shift:shift + n] for x in storage[:3]]
            out = storage[3][shift:shift + n]
            for backend in names:
                ms = time_ms(lambda: merge_tensors(*inputs, domain_weight=0.5, align_weight=0.5,
                                                   out=out, backend=backend))
                bandwidth_row(f"kernel {backend} {dtype.short_name}"
                              f"{' unaligned' if shift else ''}", nbytes, ms, copy, shift == 0)
            if "cuda" in names or SMOKE:
                recipe = _ties_recipe()
                launch = recipe_kernel()
                buffers = [buffer_of(x) for x in (*inputs, out)]
                ms = time_ms(lambda: launch(*buffers, recipe, 0, 1))
                bandwidth_row(f"recipe kernel (ties) {dtype.short_name}"
                              f"{' unaligned' if shift else ''}", nbytes, ms, copy, False)
        del storage
    per_call_overhead(names)


def _ties_recipe():
    from test_kernel import recipes_reaching_every_branch

    return dict(recipes_reaching_every_branch())["vectors (1, 2) e1 n1"]


def per_call_overhead(names):
    """merge_tensors on 4M bf16 elements: wall time per call (Python, checks, launch) against
    the kernel's own time."""
    n = 1 << 22
    gen = torch.Generator(device=device()).manual_seed(3)
    inputs = [random_tensor(n, DType.BF16, gen) for _ in range(4)]
    for backend in names:
        def call():
            merge_tensors(*inputs[:3], domain_weight=0.5, align_weight=0.5, out=inputs[3],
                          backend=backend)
        kernel_ms = time_ms(call)
        calls = 200 if not SMOKE else 2
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
            synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
        log(f"per call ({backend}, 4M bf16): {wall_ms * 1e3:.0f} us wall, kernel "
            f"{kernel_ms * 1e3:.0f} us: {max(0.0, wall_ms - kernel_ms) * 1e3:.0f} us overhead")
        TABLE.append((f"per-call overhead {backend}, 4M elements",
                      f"{max(0.0, wall_ms - kernel_ms) * 1e3:.0f} us", "-", "-"))


# ---- 3. streaming merges ----------------------------------------------------------------------

def pinned_bandwidth():
    """GB/s of host->device, device->host, and both at once, through memory pinned as the GPU
    writer pins it (page-aligned, registered), 1 GiB each way."""
    n = 1 << 30 if not SMOKE else 1 << 16
    native = cpu_backend.native()
    hosts = [native.HostBuffer(n) for _ in range(2)]
    if on_gpu():
        for h in hosts:
            cuda_backend.host_register(h.address, h.size)
    devs = [torch.empty(n, dtype=torch.uint8, device=device()) for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in range(2)] if on_gpu() else [None, None]
    up = [None]

    def copy(direction, k):
        dst, src = ((devs[k].data_ptr(), hosts[k].address) if direction == "h2d"
                    else (hosts[k].address, devs[k].data_ptr()))
        if on_gpu():
            cuda_backend.copy_async(dst, src, n, streams[k].cuda_stream, -1)
        else:
            native.copy_threads(dst, src, n, 2)
        up[0] = direction

    def both():
        copy("h2d", 0)
        copy("d2h", 1)
        if on_gpu():
            for s in streams:
                s.synchronize()

    def one(direction):
        copy(direction, 0)
        if on_gpu():
            streams[0].synchronize()

    rates = {}
    for label, fn, nbytes in (("h2d", lambda: one("h2d"), n), ("d2h", lambda: one("d2h"), n),
                              ("both", both, 2 * n)):
        fn()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        rates[label] = nbytes * 5 / (time.perf_counter() - start) / 1e9
    if on_gpu():
        for h in hosts:
            cuda_backend.host_unregister(h.address)
    log(f"pinned copies: host->device {rates['h2d']:.1f} GB/s, device->host {rates['d2h']:.1f} "
        f"GB/s, both at once {rates['both']:.1f} GB/s (bytes of both directions)")
    return rates


def mapped_vs_staged(trio) -> None:
    """The two ways to feed the uploads, on 1 GiB of an input file (warm page cache): register
    the file's mapping with the driver (read-only) and DMA from it, or fill pinned staging with
    pread (what the GPU writer does) and DMA from that.  The GPU writer stages; this row says
    whether registering would be faster."""
    from mergealign_fast.io.checkpoint import open_checkpoint

    native = cpu_backend.native()
    path = max(open_checkpoint(trio["base"]).files, key=lambda f: f.stat().st_size)
    mapped = native.MappedFile(str(path))
    n = min(1 << 30, mapped.size) // 4096 * 4096
    staging = native.HostBuffer(n)
    dev = torch.empty(n, dtype=torch.uint8, device=device())
    stream = torch.cuda.Stream() if on_gpu() else None
    timings = {}
    try:
        if on_gpu():
            start = time.perf_counter()
            cuda_backend.host_register(mapped.address, n, read_only=True)
            timings["register mapping"] = time.perf_counter() - start
            start = time.perf_counter()
            cuda_backend.copy_async(dev.data_ptr(), mapped.address, n, stream.cuda_stream, -1)
            stream.synchronize()
            timings["DMA from mapping"] = time.perf_counter() - start
            cuda_backend.host_unregister(mapped.address)
            cuda_backend.host_register(staging.address, staging.size)
        start = time.perf_counter()
        native.fill_staging([(0, staging.address, n, mapped.fd, 0)], cpu_backend.default_threads())
        timings["pread fill"] = time.perf_counter() - start
        if on_gpu():
            start = time.perf_counter()
            cuda_backend.copy_async(dev.data_ptr(), staging.address, n, stream.cuda_stream, -1)
            stream.synchronize()
            timings["DMA from staging"] = time.perf_counter() - start
            cuda_backend.host_unregister(staging.address)
    finally:
        mapped.close()
        staging.release()
    log(f"feeding uploads, {n / 2**30:.2f} GiB: " + ", ".join(
        f"{k} {v * 1e3:.0f} ms ({n / v / 1e9:.1f} GB/s)" for k, v in timings.items()))
    TABLE.append(("registered mapping vs staged fill (1 GiB)", "; ".join(
        f"{k} {v * 1e3:.0f} ms" for k, v in timings.items()), "-", "-"))


def drop_page_cache() -> bool:
    from mergealign_fast.tools.bench import can_drop_caches, drop_caches

    if not can_drop_caches():
        return False
    try:
        drop_caches()
        return True
    except OSError:
        return False


def vm_pinned_kib() -> str:
    """VmPin and VmLck of this process (what the kernel counts as pinned/locked)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return "n/a"
    return ", ".join(line.replace("\t", " ").replace("  ", "") for line in lines
                     if line.startswith(("VmPin", "VmLck")))


def streamed_merge(trio, out: Path, budget: int, backend: str, gpu: bool, **writer_options):
    """(seconds, result, writer) of one merge through the GPU writer."""
    shutil.rmtree(out, ignore_errors=True)
    options = MergeOptions(force=True, fsync=False, max_shard_size=5 << 30,
                           **({"device": "cuda", "gpu_memory": budget, "backend": backend}
                              if gpu else {}))
    plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], out, options)
    writer = GpuWriter(plan, budget, backend=backend, device="cuda" if gpu else "cpu",
                       **writer_options)
    start = time.perf_counter()
    result = execute(plan, writer=writer)
    return time.perf_counter() - start, result, writer


def streaming_merge(names, root: Path):
    shape = LLAMA_1B if not SMOKE else LLAMA_TINY
    started = time.perf_counter()
    trio = ensure_synthetic_trio(root / "trio", shape)
    log(f"trio: {shape.parameters / 1e9:.2f}B parameters x 3 ready in "
        f"{time.perf_counter() - started:.0f} s")
    budget = 2 << 30 if not SMOKE else SLOTS * 8 * 4096
    rates = pinned_bandwidth()
    mapped_vs_staged(trio)
    cpu_start = time.perf_counter()
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], root / "out-cpu",
                      force=True, fsync=False, max_shard_size=5 << 30)
    cpu_seconds = time.perf_counter() - cpu_start
    log(f"CPU merge (plain, warm): {cpu_seconds:.2f} s")
    host_seconds, _, host_writer = streamed_merge(trio, root / "out-host", budget, "cpu", False)
    log(f"host pipeline alone (CPU kernel standing in, no GPU): {host_seconds:.2f} s = "
        f"{host_seconds / cpu_seconds:.2f}x the CPU merge; stages "
        f"{_stages(host_writer, host_seconds)}")
    TABLE.append(("host pipeline (CPU standing in) vs CPU merge",
                  f"{host_seconds / cpu_seconds:.2f}x", "<= 1.3x",
                  measured(host_seconds <= 1.3 * cpu_seconds)))
    gpu_names = names if on_gpu() else ["cpu"]
    stages = (16, 32, 64) if not SMOKE else (1,)
    for backend in gpu_names:
        for stage_mib in stages:
            last = stage_mib == stages[-1] and not SMOKE  # cold: the page cache dropped
            for cold in ((False, True) if last else (False,)):
                streaming_row(trio, root, backend, budget, stage_mib, cold, rates)
    shutil.rmtree(root / "out-host", ignore_errors=True)


def _stages(writer, wall: float) -> str:
    seconds = writer.stage_seconds
    busy = sum(v for k, v in seconds.items() if k != "wait")
    return (", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()) +
            f"; overlap {busy / wall:.2f} (stage seconds / wall)")


def streaming_row(trio, root: Path, backend: str, budget: int, stage_mib: int, cold: bool,
                  rates):
    label = f"streaming {backend} {stage_mib} MiB stages{' cold' if cold else ''}"
    if cold and not drop_page_cache():
        log(f"{label}: skipped, cannot drop the page cache (not root)")
        return
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free_before = torch.cuda.mem_get_info()[0]
    out = root / f"out-{backend}"
    seconds, result, writer = streamed_merge(trio, out, budget, backend, on_gpu(),
                                             stage_bytes=stage_mib << 20,
                                             device_copies=not on_gpu())
    reserved = torch.cuda.max_memory_reserved() if on_gpu() else writer.device_bytes
    free_drop = (free_before - torch.cuda.mem_get_info()[0]) if on_gpu() else 0
    same = _same_tensors(root / "out-cpu", out)
    moved = result.input_bytes + result.output_bytes
    rate = moved / seconds / 1e9
    log(f"{label}: {seconds:.2f} s, {rate:.1f} GB/s in+out = {rate / rates['both']:.0%} of "
        f"pinned both-ways {rates['both']:.1f}; device reserved {reserved / 2**20:.0f} MiB "
        f"(free memory fell {free_drop / 2**20:.0f} MiB) of {budget >> 20} MiB; pinned "
        f"{writer.pinned_bytes / 2**20:.0f} MiB ({vm_pinned_kib()}); stages "
        f"{_stages(writer, seconds)}; output {'bitwise equal to' if same else 'DIFFERENT from'} "
        "the CPU merge")
    TABLE.append((label, f"{seconds:.2f} s = {rate / rates['both']:.0%} of pinned copy speed",
                  ">= 70%", measured(rate >= 0.7 * rates["both"])))
    TABLE.append((f"{label}: device memory", f"{reserved / 2**20:.0f} MiB reserved",
                  f"<= {budget >> 20} MiB", verdict(reserved <= budget)))
    TABLE.append((f"{label}: output = CPU output", "equal" if same else "differs", "equal",
                  verdict(same)))
    shutil.rmtree(out, ignore_errors=True)


GPU_METHODS = [Method("ties", domain_density=0.3, align_density=0.3),
               Method("dare_ties", domain_density=0.5, align_density=0.5, seed=1),
               Method("dare_linear", domain_density=0.4, seed=2), Method("breadcrumbs_ties"),
               Method("slerp", t=0.3), Method("chipalign", t=0.6), Method("linear"),
               Method("nearswap", t=0.01), Method("task_arithmetic", lambda_=0.8)]


def methods_and_race_stress(root: Path):
    """Every method through the GPU writer on the tiny trio, then race stress: budgets so small
    that tensors split into many chunks, random delays before every stage (torch.cuda._sleep on
    the streams, host sleeps, the writer thread's), bitwise the CPU merge and verified."""
    trio = ensure_synthetic_trio(root / "tiny", LLAMA_TINY)
    tiny_budget = SLOTS * 8 * 4096 + (DEVICE_ROUNDING if on_gpu() else 0)
    runs = [(m, None) for m in GPU_METHODS] + [(m, seed) for seed in range(4)
                                               for m in (None, GPU_METHODS[1])]
    for method, seed in runs:
        name = method.name if method else "mergealign"
        extra = {"method": method} if method else {}
        cpu_out, gpu_out = root / f"{name}-cpu", root / f"{name}-gpu"
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], cpu_out, force=True,
                          fsync=False, max_shard_size=100_000, **extra)
        options = MergeOptions(force=True, fsync=False, max_shard_size=100_000, **extra,
                               **({"device": "cuda", "backend": "cuda"} if on_gpu() else {}))
        plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], gpu_out, options)
        writer = GpuWriter(plan, tiny_budget, backend="cuda" if on_gpu() else "cpu",
                           device="cuda" if on_gpu() else "cpu", stress=seed,
                           device_copies=not on_gpu())
        execute(plan, writer=writer)
        same = _same_tensors(cpu_out, gpu_out) and verify_output(gpu_out) == []
        label = f"{name} through the GPU writer" + (f", race stress seed {seed}"
                                                     if seed is not None else "")
        log(f"{label}: chunks of {writer.chunk} elements, output "
            f"{'bitwise equal to the CPU merge and verified' if same else 'DIFFERENT'}")
        TABLE.append((label, "equal, verified" if same else "differs", "equal", verdict(same)))
        shutil.rmtree(cpu_out)
        shutil.rmtree(gpu_out)


def _same_tensors(a: Path, b: Path) -> bool:
    from mergealign_fast.io.checkpoint import open_checkpoint, read_elements

    left, right = open_checkpoint(a), open_checkpoint(b)
    return set(left.tensors) == set(right.tensors) and all(
        read_elements(left.tensors[n]).tobytes() == read_elements(right.tensors[n]).tobytes()
        for n in left.tensors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU-only dry run, tiny sizes")
    parser.add_argument("--workdir", default=None, help="where the 1.1B trio is generated")
    args = parser.parse_args()
    names = backends()
    log(f"device: {torch.cuda.get_device_name() if on_gpu() else 'CPU (smoke)'}; "
        f"torch {torch.__version__}; _cuda: {cuda_backend.build_info()}; backends {names}; "
        f"cuda: {describe_backends()['cuda']}")
    if not SMOKE and "cuda" not in names:
        TABLE.append(("CUDA backend runs", describe_backends()["cuda"], "available", "FAIL"))
    started = time.perf_counter()
    for step in (lambda: check_bit_patterns(names), lambda: check_grid(names), check_recipes,
                 lambda: check_huge(names), lambda: kernel_bandwidth(names)):
        step()
        log(f"  ({time.perf_counter() - started:.0f} s)")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        methods_and_race_stress(Path(tmp))
        streaming_merge(names, Path(tmp))
    log(f"  ({time.perf_counter() - started:.0f} s)")
    log("\n| check | result | target | verdict |\n|---|---|---|---|")
    for row in TABLE:
        log("| " + " | ".join(row) + " |")
    return 0 if all(r[3] != "FAIL" for r in TABLE) else 1


if __name__ == "__main__":
    sys.exit(main())
