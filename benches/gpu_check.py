"""The device check: one script that, on a GPU machine, checks and times everything GPU.

    python setup.py build_ext --inplace && PYTHONUNBUFFERED=1 python benches/gpu_check.py

1. environment: GPU, torch, triton, what _cuda was built for
2. correctness: CUDA and Triton kernels against the native CPU kernel (bit for bit) and the float64
   oracle bound, over dtypes x odd sizes x unaligned starts; one tensor of 2^31 + 4099 elements
3. kernel GB/s (3 inputs read + 1 output written) beside a device-to-device copy of the same bytes
4. streaming merge of a generated 1.1B-parameter bf16 trio under a 2 GiB device budget, beside
   pinned host<->device copy bandwidth; peak device memory
5. a short table, last

Without a GPU, `--smoke` runs the same code on the CPU (Triton interpreter, tiny sizes, the GPU
writer with synchronous stand-ins) so the script itself is tested in CI; no numbers are claimed.
Budget: well under 8 minutes on an H200 (the trio's generation, ~40 s, dominates).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergealign_fast import Method, merge_checkpoints, merge_tensors  # noqa: E402
from mergealign_fast.dtypes import DType, to_torch  # noqa: E402
from mergealign_fast.engine import execute  # noqa: E402
from mergealign_fast.kernels import cuda as cuda_backend  # noqa: E402
from mergealign_fast.kernels import describe_backends  # noqa: E402
from mergealign_fast.plan import MergeOptions, plan_merge  # noqa: E402
from mergealign_fast.reference import merge_error_bound, merge_ref  # noqa: E402
from mergealign_fast.synthetic import LLAMA_1B, LLAMA_TINY, ensure_synthetic_trio  # noqa: E402

DTYPES = [DType.BF16, DType.F16, DType.F32]
TABLE = []  # (check, result, target, verdict)


def log(text=""):
    print(text, flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends():
    """GPU backends that can run here (on the CPU: Triton's interpreter)."""
    names = ["cuda", "triton"] if device().type == "cuda" else ["triton"]
    report = describe_backends()
    return [n for n in names if report[n].startswith("available") or
            (n == "triton" and device().type == "cpu")]


def synchronize():
    if device().type == "cuda":
        torch.cuda.synchronize()


def random_tensor(n: int, dtype: DType, generator) -> torch.Tensor:
    values = torch.randn(n, generator=generator, device=device(), dtype=torch.float32)
    return (values * 0.02).to(to_torch(dtype))


# ---- 2. correctness ---------------------------------------------------------------------------

def check_grid(names):
    sizes = [0, 1, 7, 4097, 123 * 431] + ([1 << 20 | 3] if not SMOKE else [])
    gen = torch.Generator(device=device()).manual_seed(0)
    cases = mismatches = 0
    for backend in names:
        for in_dtype in DTYPES:
            for out_dtype in DTYPES:
                for n in sizes:
                    for shift in (0, 1):  # shift 1: inputs start off any 16-byte boundary
                        inputs = [random_tensor(n + shift, in_dtype, gen)[shift:]
                                  for _ in range(3)]
                        got = merge_tensors(*inputs, domain_weight=0.3, align_weight=0.9,
                                            out_dtype=out_dtype, backend=backend)
                        host = [x.cpu() for x in inputs]
                        want = merge_tensors(*host, domain_weight=0.3, align_weight=0.9,
                                             out_dtype=out_dtype, backend="cpu")
                        same = torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
                        b, d, a = (x.double().numpy() for x in host)
                        bound = merge_error_bound(b, d, a, 0.3, 0.9, out_dtype)
                        err = np.abs(got.cpu().double().numpy() - merge_ref(b, d, a, 0.3, 0.9))
                        cases += 1
                        mismatches += int(not same or not np.all(err <= bound))
    log(f"grid: {cases} cases over {names}, {mismatches} differ from the CPU kernel or exceed "
        "the oracle bound")
    TABLE.append(("dtype x size x alignment grid", f"{cases - mismatches}/{cases} bitwise = CPU",
                  "all", "PASS" if mismatches == 0 else "FAIL"))


def check_huge(names):
    """One tensor past 2^31 elements: int64 indexing end to end."""
    n = (1 << 31) + 4099 if not SMOKE else 4099
    gen = torch.Generator(device=device()).manual_seed(1)
    inputs = [random_tensor(n, DType.BF16, gen) for _ in range(3)]
    outputs = {}
    for backend in names:
        outputs[backend] = merge_tensors(*inputs, domain_weight=0.5, align_weight=0.5,
                                         backend=backend)
        synchronize()
    # Oracle on samples spread over the whole range, the last elements included.
    idx = torch.cat([torch.randint(0, n, (1 << 16,), generator=gen, device=device()),
                     torch.arange(n - 4099, n, device=device())])
    host = [x[idx].cpu() for x in inputs]
    b, d, a = (x.double().numpy() for x in host)
    bound = merge_error_bound(b, d, a, 0.5, 0.5, DType.BF16)
    exact = merge_ref(b, d, a, 0.5, 0.5)
    ok = all(np.all(np.abs(out[idx].cpu().double().numpy() - exact) <= bound)
             for out in outputs.values())
    first = next(iter(outputs.values()))
    agree = all(torch.equal(first.view(torch.int16), o.view(torch.int16))
                for o in outputs.values())
    log(f"huge tensor: {n:,} bf16 elements, backends {list(outputs)}: oracle samples "
        f"{'ok' if ok else 'WRONG'}, backends {'bitwise equal' if agree else 'DIFFER'}")
    label = f"{n:,}-element bf16 tensor" + (" (> 2^31)" if n > 1 << 31 else "")
    TABLE.append((label, "oracle ok, backends equal" if ok and agree
                  else "mismatch", "all", "PASS" if ok and agree else "FAIL"))


# ---- 3. kernel bandwidth ----------------------------------------------------------------------

def time_ms(fn, repeats=20, batch=10) -> float:
    """Median milliseconds of one fn() over `repeats` samples, timed with CUDA events.

    Each sample enqueues `batch` calls back to back, so the ~50 us of Python and launch overhead
    per call overlaps the previous call's GPU work instead of being counted (a 2 GB merge takes
    ~0.5 ms at 4 TB/s, so per-call timing would understate the kernel by ~10%)."""
    if device().type != "cuda":
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


def kernel_bandwidth(names):
    n = 1 << 28 if not SMOKE else 1 << 12  # 512 MiB per bf16 tensor: far beyond the 60 MB L2
    gen = torch.Generator(device=device()).manual_seed(2)
    for dtype in DTYPES:
        inputs = [random_tensor(n, dtype, gen) for _ in range(3)]
        out = torch.empty_like(inputs[0])
        nbytes = 4 * n * dtype.itemsize
        src = torch.empty(2 * n * dtype.itemsize, dtype=torch.uint8, device=device())
        dst = torch.empty_like(src)
        copy = nbytes / time_ms(lambda: dst.copy_(src)) / 1e6
        for backend in names:
            ms = time_ms(lambda: merge_tensors(*inputs, domain_weight=0.5, align_weight=0.5,
                                               out=out, backend=backend))
            rate = nbytes / ms / 1e6
            log(f"kernel {backend:6s} {dtype.short_name}: {rate:8.1f} GB/s, device copy of the "
                f"same bytes {copy:8.1f} GB/s ({rate / copy:.0%})")
            TABLE.append((f"kernel {backend} {dtype.short_name}", f"{rate:.0f} GB/s = "
                          f"{rate / copy:.0%} of copy ({copy:.0f})", ">= 85%",
                          "n/a (CPU)" if SMOKE else ("PASS" if rate >= 0.85 * copy else "FAIL")))


# ---- 4. streaming merge -----------------------------------------------------------------------

def pinned_bandwidth():
    """GB/s of pinned host->device and device->host copies of 1 GiB."""
    n = 1 << 30 if not SMOKE else 1 << 16
    host = torch.empty(n, dtype=torch.uint8, pin_memory=device().type == "cuda")
    dev = torch.empty(n, dtype=torch.uint8, device=device())
    h2d = n / time_ms(lambda: dev.copy_(host, non_blocking=True), repeats=5, batch=3) / 1e6
    d2h = n / time_ms(lambda: host.copy_(dev, non_blocking=True), repeats=5, batch=3) / 1e6
    return h2d, d2h


def streaming_merge(names, root: Path):
    shape = LLAMA_1B if not SMOKE else LLAMA_TINY
    started = time.perf_counter()
    trio = ensure_synthetic_trio(root / "trio", shape)
    log(f"trio: {shape.parameters / 1e9:.2f}B parameters x 3 ready in "
        f"{time.perf_counter() - started:.0f} s")
    budget = 2 << 30 if not SMOKE else 2 * 8 * 4096 + 2048
    h2d, d2h = pinned_bandwidth()
    log(f"pinned copies: host->device {h2d:.1f} GB/s, device->host {d2h:.1f} GB/s")
    cpu_start = time.perf_counter()
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], root / "out-cpu",
                      force=True, fsync=False)
    cpu_seconds = time.perf_counter() - cpu_start
    for backend in names:
        if device().type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        writer = None
        if SMOKE:  # merges on the CPU plan for the CPU writer: hand it the GPU writer instead
            from mergealign_fast.writers.gpu import GpuWriter

            options = MergeOptions(force=True, fsync=False)
        else:
            options = MergeOptions(force=True, fsync=False, device="cuda", gpu_memory=budget,
                                   backend=backend)
        plan = plan_merge(trio["base"], trio["domain"], trio["aligned"],
                          root / f"out-{backend}", options)
        if SMOKE:
            writer = GpuWriter(plan, budget, backend=backend, device="cpu")
        start = time.perf_counter()
        result = execute(plan, writer=writer)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device().type == "cuda" else \
            (writer.device_bytes if writer else 0)
        same = _same_tensors(root / "out-cpu", root / f"out-{backend}")
        moved = result.input_bytes + result.output_bytes
        # Input bytes cross host->device and output bytes device->host; both directions run at
        # once, so the floor is the slower of the two transfers at the measured rates.
        floor = max(result.input_bytes / (h2d * 1e9), result.output_bytes / (d2h * 1e9))
        log(f"streaming merge ({backend}): {seconds:.2f} s, {moved / seconds / 1e9:.1f} GB/s "
            f"moved, pinned-copy floor {floor:.2f} s ({floor / seconds:.0%}), peak device memory "
            f"{peak / 2**20:.0f} MiB of {budget / 2**20:.0f} MiB, output "
            f"{'bitwise equal to' if same else 'DIFFERENT from'} the CPU merge "
            f"({cpu_seconds:.2f} s)")
        TABLE.append((f"streaming merge {backend}, {budget >> 20} MiB budget",
                      f"{seconds:.2f} s = {floor / seconds:.0%} of pinned-copy speed", ">= 70%",
                      "n/a (CPU)" if SMOKE else ("PASS" if floor / seconds >= 0.7 else "FAIL")))
        TABLE.append((f"peak device memory ({backend})", f"{peak / 2**20:.0f} MiB",
                      f"<= {budget >> 20} MiB", "PASS" if peak <= budget else "FAIL"))
        TABLE.append((f"streamed output = CPU output ({backend})", "equal" if same else "differs",
                      "equal", "PASS" if same else "FAIL"))


GPU_METHODS = [Method("ties", domain_density=0.3, align_density=0.3),
               Method("dare_ties", domain_density=0.5, align_density=0.5, seed=1),
               Method("slerp", t=0.3), Method("chipalign", t=0.6), Method("linear"),
               Method("task_arithmetic", lambda_=0.8)]


def methods_on_gpu(root: Path):
    """Every method through the GPU writer (CPU passes, CUDA merge_recipe) on the tiny trio:
    bitwise the CPU merge.  In --smoke the cpu backend stands in for cuda."""
    from mergealign_fast.writers.gpu import GpuWriter

    trio = ensure_synthetic_trio(root / "tiny", LLAMA_TINY)
    for method in GPU_METHODS:
        cpu_out, gpu_out = root / f"{method.name}-cpu", root / f"{method.name}-gpu"
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], cpu_out, force=True,
                          fsync=False, method=method)
        options = MergeOptions(force=True, fsync=False, method=method, max_shard_size=100_000,
                               **({} if SMOKE else {"device": "cuda", "backend": "cuda"}))
        plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], gpu_out, options)
        writer = GpuWriter(plan, 2 * 8 * 4096 + 2048, backend="cpu", device="cpu") \
            if SMOKE else None
        execute(plan, writer=writer)
        same = _same_tensors(cpu_out, gpu_out)
        log(f"method {method.name} on the GPU path: output "
            f"{'bitwise equal to' if same else 'DIFFERENT from'} the CPU merge")
        TABLE.append((f"method {method.name}: GPU output = CPU output",
                      "equal" if same else "differs", "equal", "PASS" if same else "FAIL"))


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
    log(f"device: {torch.cuda.get_device_name() if device().type == 'cuda' else 'CPU (smoke)'}; "
        f"torch {torch.__version__}; _cuda: {cuda_backend.build_info()}; backends {names}")
    check_grid(names)
    check_huge(names)
    kernel_bandwidth(names)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        methods_on_gpu(Path(tmp))
        streaming_merge(names, Path(tmp))
    log("\n| check | result | target | verdict |\n|---|---|---|---|")
    for row in TABLE:
        log("| " + " | ".join(row) + " |")
    return 0 if all(r[3] != "FAIL" for r in TABLE) else 1


if __name__ == "__main__":
    sys.exit(main())
