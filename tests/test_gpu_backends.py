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
from mergealign_fast.dtypes import DType  # noqa: E402
from mergealign_fast.engine import execute  # noqa: E402
from mergealign_fast.methods import Method  # noqa: E402
from mergealign_fast.plan import MergeOptions, plan_merge  # noqa: E402
from mergealign_fast.reference import merge_error_bound, merge_ref  # noqa: E402

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
    code = ("import sys, mergealign_fast, mergealign_fast.kernels, mergealign_fast.engine; "
            "print([m for m in ('torch', 'triton', 'mergealign_fast._cuda') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---- the streaming GPU writer, run on the CPU --------------------------------------------------

def gpu_writer_merge(trio, out, budget, backend):
    from mergealign_fast.writers.gpu import GpuWriter

    plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], out,
                      MergeOptions(domain_weight=0.3, align_weight=0.9, max_shard_size=100_000))
    writer = GpuWriter(plan, budget, backend=backend, device="cpu")
    execute(plan, writer=writer)
    return writer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_streaming_writer_splits_tensors_and_matches_the_cpu_merge(tiny_trio, tmp_path, backend):
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "cpu", domain_weight=0.3, align_weight=0.9,
                      max_shard_size=100_000)
    # bf16 in and out: 8 bytes per element, 2 slots: chunks of 4096 elements, so the
    # 24576-element embedding takes 6 of them and the 64-element norms share nothing.
    budget = 2 * 8 * 4096 + 2048
    writer = gpu_writer_merge(tiny_trio, tmp_path / "gpu", budget, backend)
    assert writer.chunk == 4096 and writer.device_bytes <= budget
    assert all_tensors_bytes(tmp_path / "gpu") == all_tensors_bytes(tmp_path / "cpu")


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
    from mergealign_fast.writers.gpu import GpuWriter

    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "cpu", domain_weight=0.7, align_weight=0.6, method=method,
                      max_shard_size=100_000)
    plan = plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "gpu", MergeOptions(domain_weight=0.7, align_weight=0.6,
                                                     max_shard_size=100_000, method=method))
    execute(plan, writer=GpuWriter(plan, 2 * 8 * 4096 + 2048, backend="cpu", device="cpu"))
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
