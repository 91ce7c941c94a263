"""GPU backends as far as a machine without a GPU can check them.

- The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 and must equal the native CPU
  kernel bit for bit (same fp32 operations, no FMA, round-to-nearest-even), over dtypes, odd
  sizes and unaligned starts.
- The CUDA extension must have been compiled (when the toolkit is present) and must report the
  missing GPU as a reason, not crash.
- The GPU streaming writer runs with device="cpu": same chunking, slot reuse and file offsets,
  synchronous stand-ins for streams and events.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mergealign_fast import MergeError, merge_checkpoints, merge_tensors  # noqa: E402
from mergealign_fast.dtypes import DType, to_torch  # noqa: E402
from mergealign_fast.engine.loop import execute  # noqa: E402
from mergealign_fast.methods.core.parameters import Method  # noqa: E402
from mergealign_fast.plan import MergeOptions, plan_merge  # noqa: E402
from mergealign_fast.methods.core.oracle import merge_error_bound, merge_ref  # noqa: E402

from conftest import random_values  # noqa: E402
from test_engine import all_tensors_bytes  # noqa: E402

pytest.importorskip("triton")

DTYPES = [DType.BF16, DType.F16, DType.F32]
SHAPES = [(0,), (1,), (7,), (4097,), (6, 42)]


def torch_values(rng, count, dtype: DType) -> torch.Tensor:
    raw = random_values(rng, count, dtype)
    tensor = torch.from_numpy(raw)
    return tensor.view(torch.bfloat16) if dtype is DType.BF16 else tensor


@pytest.mark.parametrize("in_dtype", DTYPES, ids=lambda d: d.short_name)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: d.short_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_equals_cpu_kernel_bit_for_bit(in_dtype, out_dtype, shape):
    rng = np.random.default_rng(len(shape) * 100 + int(np.prod(shape)))
    inputs = [torch_values(rng, int(np.prod(shape)), in_dtype).reshape(shape) for _ in range(3)]
    ours = merge_tensors(*inputs, domain_weight=0.3, align_weight=0.9,
                         out_dtype=out_dtype, backend="triton")
    native = merge_tensors(*inputs, domain_weight=0.3, align_weight=0.9,
                           out_dtype=out_dtype, backend="cpu")
    assert torch.equal(ours.view(torch.uint8), native.view(torch.uint8))
    b, d, a = (x.float().double().numpy() for x in inputs)
    bound = merge_error_bound(b, d, a, 0.3, 0.9, out_dtype)
    assert np.all(np.abs(ours.double().numpy() - merge_ref(b, d, a, 0.3, 0.9)) <= bound)


def test_triton_mixed_dtypes_and_unaligned_starts():
    rng = np.random.default_rng(9)
    raws = [torch_values(rng, 5000, dt) for dt in DTYPES]
    inputs = [raws[0][1:4098], raws[1][3:4100], raws[2][2:4099]]  # not 16-byte aligned
    ours = merge_tensors(*inputs, domain_weight=-0.25, align_weight=1.75, backend="triton")
    native = merge_tensors(*inputs, domain_weight=-0.25, align_weight=1.75, backend="cpu")
    assert torch.equal(ours.view(torch.uint8), native.view(torch.uint8))


def test_cuda_backend_refuses_host_memory():
    x = torch.zeros(8)
    with pytest.raises(MergeError, match="backend 'cuda' cannot run here: it does not compute "
                                         "on cpu memory"):
        merge_tensors(x, x, x, backend="cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter():
    code = ("import torch, mergealign_fast as m; x = torch.zeros(4)\n"
            "try:\n    m.merge_tensors(x, x, x, backend='triton')\n"
            "except m.MergeError as e:\n    print(e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "only under TRITON_INTERPRET=1" in out


def cuda_toolkit_present() -> bool:
    import shutil

    return shutil.which("nvcc") is not None and os.environ.get("MERGEALIGN_SKIP_CUDA") != "1"


@pytest.mark.skipif(not cuda_toolkit_present(), reason="no CUDA toolkit: _cuda is not built")
def test_cuda_extension_is_built_for_hopper_and_reports_a_missing_gpu():
    from mergealign_fast import _cuda
    from mergealign_fast.kernels import describe_backends

    assert "sm_90" in _cuda.architectures().split()
    assert _cuda.runtime_version() >= 11000
    error, count = _cuda.device_count()
    if error == 0 and count > 0:
        pytest.skip("a GPU is present: the device script checks it")
    assert describe_backends()["cuda"].startswith("unavailable: no")


def test_importing_the_package_loads_no_gpu_code():
    code = ("import sys, mergealign_fast, mergealign_fast.kernels, mergealign_fast.engine.loop; "
            "print([m for m in ('torch', 'triton', 'mergealign_fast._cuda') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---- the streaming GPU writer, run on the CPU --------------------------------------------------

# bf16 in and out: 8 bytes per element, 4 slots of 4096 elements (the least a chunk holds), so
# the 24576-element embedding takes 6 chunks and the 64-element norms share nothing.
SMALL_BUDGET = 4 * 8 * 4096 + 2048


def gpu_writer_merge(trio, out, budget, backend, method=None, **writer_options):
    from mergealign_fast.engine.writers.gpu import GpuWriter

    plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], out,
                      MergeOptions(domain_weight=0.3, align_weight=0.9, max_shard_size=100_000,
                                   **({"method": method} if method else {})))
    writer = GpuWriter(plan, budget, backend=backend, device="cpu", **writer_options)
    execute(plan, writer=writer)
    return writer


def cpu_merge(trio, out, method=None):
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], out, domain_weight=0.3,
                      align_weight=0.9, max_shard_size=100_000,
                      **({"method": method} if method else {}))


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("device_copies", [False, True], ids=["shared", "copies"])
def test_streaming_writer_splits_tensors_and_matches_the_cpu_merge(tiny_trio, tmp_path, backend,
                                                                   device_copies):
    cpu_merge(tiny_trio, tmp_path / "cpu")
    writer = gpu_writer_merge(tiny_trio, tmp_path / "gpu", SMALL_BUDGET, backend,
                              device_copies=device_copies)
    assert writer.chunk == 4096
    assert writer.device_bytes == (4 * 8 * 4096 if device_copies else 0)
    assert writer.device_bytes <= SMALL_BUDGET
    assert all_tensors_bytes(tmp_path / "gpu") == all_tensors_bytes(tmp_path / "cpu")


def test_chunks_are_capped_at_the_largest_tensor(tiny_trio, tmp_path):
    """A large budget does not buy staging no tensor can use: the tiny trio's largest tensor
    (24576 elements) bounds the chunk, whatever --gpu-memory says."""
    writer = gpu_writer_merge(tiny_trio, tmp_path / "gpu", 2 << 30, "cpu", device_copies=True)
    assert writer.chunk == 24576 and writer.device_bytes == 4 * 8 * 24576


def test_budget_too_small_is_a_clear_error(tiny_trio, tmp_path):
    with pytest.raises(MergeError, match="budget of 1,000 bytes is too small"):
        gpu_writer_merge(tiny_trio, tmp_path / "gpu", 1000, "torch")


def test_cli_without_a_gpu_fails_before_reading(tiny_trio, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "mergealign_fast", "merge", tiny_trio["base"],
                           tiny_trio["domain"], tiny_trio["aligned"], "-o", tmp_path / "out",
                           "--device", "cuda", "--gpu-memory", "1GiB"],
                          capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no merge backend can run on cuda here" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_device_check_script_runs_on_the_cpu():
    """benches/gpu_check.py is what a lent GPU machine runs; its --smoke mode runs the same code
    on the CPU with tiny sizes, so a broken script is found here, not on the GPU's clock."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benches" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| check | result | target | verdict |" in proc.stdout and "FAIL" not in proc.stdout


@pytest.mark.parametrize("method", [Method("ties", domain_density=0.3, align_density=0.6),
                                    Method("dare_ties", domain_density=0.5, seed=4),
                                    Method("chipalign", t=0.3)], ids=lambda m: m.name)
def test_streaming_writer_runs_methods_like_the_cpu_merge(tiny_trio, tmp_path, method):
    """Methods through the GPU writer (recipes from the CPU passes, chunked merge_recipe):
    run here with the cpu backend standing in for cuda, chunks splitting tensors."""
    cpu_merge(tiny_trio, tmp_path / "cpu", method)
    gpu_writer_merge(tiny_trio, tmp_path / "gpu", SMALL_BUDGET, "cpu", method,
                     device_copies=True)
    assert all_tensors_bytes(tmp_path / "gpu") == all_tensors_bytes(tmp_path / "cpu")


def test_methods_need_a_backend_with_the_recipe_kernel():
    from mergealign_fast.kernels import get_recipe_kernel

    with pytest.raises(MergeError, match="runs task_arithmetic only"):
        get_recipe_kernel("torch", "cpu")
    assert get_recipe_kernel("auto", "cpu").__module__.endswith("kernels.cpu")


@pytest.mark.skipif(not cuda_toolkit_present(), reason="no CUDA toolkit: _cuda is not built")
def test_cuda_bindings_take_the_native_operand_and_recipe_types():
    """_cuda's bindings receive _native.Operands and _native.Recipe objects (pybind11 shares the
    types); an empty launch returns cudaSuccess without touching a GPU."""
    from mergealign_fast import _cuda
    from mergealign_fast.kernels import cpu

    native = cpu.native()
    bf16 = int(DType.BF16)
    empty = native.Operands(0, bf16, 0, bf16, 0, bf16, 0, bf16)
    assert _cuda.merge_recipe(empty, 0, native.Recipe(), 0) == 0
    assert _cuda.merge(empty, 0, 0.5, 0.5, 0) == 0
    with pytest.raises(TypeError):
        _cuda.merge(0, bf16, 0, bf16, 0, bf16, 0, bf16, 0, 0.5, 0.5, 0)  # no spelled-out args


def test_a_method_on_the_gpu_with_a_task_arithmetic_only_backend_is_refused(tiny_trio,
                                                                            tmp_path):
    from mergealign_fast import PlanError

    options = MergeOptions(device="cuda", backend="torch", method=Method("ties"))
    with pytest.raises(PlanError, match="needs --backend cuda"):
        plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                   tmp_path / "out", options)


# ---- every bit pattern, NaN canonical everywhere -----------------------------------------------

def _special_values(dtype: DType) -> list:
    info = torch.finfo(to_torch(dtype))
    tiny = info.smallest_normal * info.eps  # the smallest subnormal
    return [0.0, -0.0, float("inf"), float("-inf"), float("nan"), tiny, -tiny, info.max,
            -info.max]


def _bit_pattern_trios(dtype: DType, step: int = 1):
    """(label, base, domain, aligned): every 16-bit pattern (or every step-th) in each role,
    special values in the others."""
    every = torch.arange(0, 1 << 16, step, dtype=torch.int32).to(torch.int16).view(to_torch(dtype))
    for value in _special_values(dtype):
        s = torch.full_like(every, value)
        yield from ((f"x s s {value}", every, s, s), (f"s x s {value}", s, every, s),
                    (f"s s x {value}", s, s, every), (f"x flip s {value}", every, every.flip(0), s))


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def _unsigned(x) -> set:
    """The distinct bit patterns of x's values, as unsigned integers."""
    return {v & ((1 << 8 * x.element_size()) - 1) for v in _bits(x).tolist()}


@pytest.mark.parametrize("dtype", [DType.BF16, DType.F16], ids=lambda d: d.short_name)
def test_every_bit_pattern_gives_one_result_on_every_backend_nan_canonical(dtype):
    """All 65,536 patterns of a 16-bit dtype against ±0, ±inf, NaN, subnormals and the largest
    finite values, weights negative and large: the native kernel, PyTorch's fp32 arithmetic and
    (on a sample) the Triton kernel store the same bits, and every NaN is the dtype's one
    canonical NaN (x86 alone would give 0xffc0 for inf - inf, a GPU 0x7fff)."""
    from mergealign_fast.dtypes import CANONICAL_NAN_BITS

    for label, *trio in _bit_pattern_trios(dtype):
        for wd, wa in ((0.3, 0.9), (-1.5, 2.0), (1e4, -1e4)):
            for out_dtype in (dtype, DType.F32):
                ours = merge_tensors(*trio, domain_weight=wd, align_weight=wa,
                                     out_dtype=out_dtype, backend="cpu")
                reference = merge_tensors(*trio, domain_weight=wd, align_weight=wa,
                                          out_dtype=out_dtype, backend="torch")
                assert torch.equal(_bits(ours), _bits(reference)), (label, wd, wa, out_dtype)
                assert _unsigned(ours[torch.isnan(ours)]) <= {CANONICAL_NAN_BITS[out_dtype]}
    for label, *trio in list(_bit_pattern_trios(dtype, step=61))[::5]:
        ours = merge_tensors(*trio, domain_weight=-1.5, align_weight=2.0, backend="cpu")
        with np.errstate(all="ignore"):  # the interpreter computes in numpy
            triton = merge_tensors(*trio, domain_weight=-1.5, align_weight=2.0,
                                   backend="triton")
        assert torch.equal(_bits(ours), _bits(triton)), label


def test_inf_minus_inf_is_the_canonical_nan_on_every_path():
    """The case the issue names: inf - inf is 0xffc0 in bf16 on x86 unless canonicalised, on the
    direct path, the tiles, the per-element path and for each output dtype."""
    from mergealign_fast.dtypes import CANONICAL_NAN_BITS

    for dtype in DTYPES:
        inf = torch.full((37,), float("inf"), dtype=to_torch(dtype))
        for out_dtype in DTYPES:
            out = merge_tensors(inf, -inf, inf, domain_weight=1.0, align_weight=0.0,
                                out_dtype=out_dtype)  # inf + (-inf - inf): NaN
            assert _unsigned(out) == {CANONICAL_NAN_BITS[out_dtype]}


# ---- budgets and devices, as far as the CPU can check them ---------------------------------------

@pytest.fixture(scope="module")
def wide_trio(tmp_path_factory):
    """One layer and a 4M-element embedding: a tensor larger than a small budget's chunk."""
    from mergealign_fast.tools.synthetic import LlamaShape, ensure_synthetic_trio

    shape = LlamaShape(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=1,
                       vocab=32768)
    return ensure_synthetic_trio(tmp_path_factory.mktemp("wide"), shape, seed=2)


@pytest.mark.parametrize("budget", [300_000, 3 << 20, 24 << 20, 2 << 30, 80 << 30])
def test_device_and_pinned_memory_stay_within_the_budget_with_the_allocator_rounding(
        wide_trio, tmp_path, budget):
    """On a GPU the staging is SLOTS slots of the chunk on the device (torch rounds the one
    allocation up to 2 MiB) and as much pinned (page-rounded): both within --gpu-memory."""
    from mergealign_fast.engine.writers.gpu import (DEVICE_ROUNDING, SLOTS, STAGE_BYTES,
                                                    chunk_elements_for)

    plan = plan_merge(wide_trio["base"], wide_trio["domain"], wide_trio["aligned"],
                      tmp_path / "out", MergeOptions())
    try:
        chunk = chunk_elements_for(plan, budget, "cuda", STAGE_BYTES)
    except MergeError as exc:
        assert budget < SLOTS * 8 * 4096 + DEVICE_ROUNDING and "too small" in str(exc)
        return
    staging = SLOTS * chunk * 8  # bf16 trio: 6 input + 2 output bytes per element
    rounded = -(-staging // DEVICE_ROUNDING) * DEVICE_ROUNDING
    assert rounded <= budget and staging <= SLOTS * STAGE_BYTES
    largest = max(t.sources[0].entry.count for s in plan.shards for t in s.tensors)
    assert chunk <= largest + 255


def test_the_cuda_backend_launches_on_the_device_its_tensors_live_on(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: the launcher passes device 1 and that
    device's current stream (the native side makes it current for the launch)."""
    from types import SimpleNamespace

    from mergealign_fast.kernels import cuda
    from mergealign_fast.kernels.buffer import Buffer

    launches = []
    fake = SimpleNamespace(merge=lambda *args: launches.append(("merge", args[-2:])) or 0,
                           merge_recipe=lambda *args: launches.append(("recipe", args[-2:])) or 0)
    monkeypatch.setattr(cuda, "_load", lambda: (fake, None))
    monkeypatch.setattr(cuda, "current_stream", lambda device=-1: 1000 + device)
    owner = SimpleNamespace(device=torch.device("cuda", 1))
    buffers = [Buffer(0, DType.BF16, 0, owner=owner) for _ in range(4)]
    cuda.merge(*buffers, 0.5, 0.5, 1)
    cuda.merge_recipe(*buffers, cpu_recipe(), 0, 1)
    assert launches == [("merge", (1001, 1)), ("recipe", (1001, 1))]


def cpu_recipe():
    from mergealign_fast.kernels import cpu

    return cpu.native().Recipe()
