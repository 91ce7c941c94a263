"""The fused kernel against the float64 oracle, over dtype x shape x weights x alignment grids.

Tolerance: reference.merge_error_bound, derived from the arithmetic (fp32 evaluation of 6
operations plus 2 weight roundings, 8u|terms|, then one rounding to the output: half its spacing).
A kernel that truncated instead of rounding to nearest, skipped a term, or computed in the input
precision breaks it (see test_bound_is_tight_enough_to_catch_one_ulp).
"""


import numpy as np
import pytest
import torch

from mergealign_fast import merge_tensors
from mergealign_fast.dtypes import DType, f32_to_bf16_bits, storage_numpy_dtype
from mergealign_fast.methods.core.oracle import merge_error_bound, merge_ref, spacing

from conftest import as_f64, random_values

DTYPES = [DType.BF16, DType.F16, DType.F32]
SHAPES = [(0,), (1,), (7,), (4097,), (6, 42), (123, 431)]
WEIGHTS = [(0.5, 0.5), (0.3, 0.9), (-0.25, 1.75)]
# Input dtype triples: all equal, plus mixes where every input has a different dtype.
INPUT_DTYPES = [(d, d, d) for d in DTYPES] + [(DType.BF16, DType.F16, DType.F32),
                                              (DType.F32, DType.BF16, DType.F16)]


def unaligned_copy(raw: np.ndarray, offset: int) -> np.ndarray:
    """The same values in memory that starts `offset` bytes past an aligned address."""
    backing = np.zeros(raw.nbytes + 16, dtype=np.uint8)
    start = (-backing.ctypes.data % 16) + offset
    view = np.frombuffer(backing, dtype=raw.dtype, count=raw.size, offset=start)
    view[...] = raw.ravel()
    return view.reshape(raw.shape)


def torch_view(raw: np.ndarray, dtype: DType) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(raw))
    return tensor.view(torch.bfloat16) if dtype is DType.BF16 else tensor


def run_kernel(raws, in_dtypes, out_dtype, weights, backend="cpu", threads=2):
    inputs = [torch_view(r, d) for r, d in zip(raws, in_dtypes)]
    out = merge_tensors(*inputs, domain_weight=weights[0], align_weight=weights[1],
                        out_dtype=out_dtype, backend=backend, threads=threads)
    raw_out = out.view(torch.int16).numpy().view(np.uint16) if out.dtype == torch.bfloat16 \
        else out.numpy()
    return raw_out


@pytest.mark.parametrize("in_dtypes", INPUT_DTYPES, ids=lambda t: "-".join(d.short_name for d in t))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: d.short_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weights", WEIGHTS, ids=str)
def test_matches_oracle_within_derived_bound(in_dtypes, out_dtype, shape, weights):
    rng = np.random.default_rng(abs(hash((in_dtypes, out_dtype, shape, weights))) % 2**32)
    count = int(np.prod(shape))
    raws = [random_values(rng, count, d).reshape(shape) for d in in_dtypes]
    got = as_f64(run_kernel(raws, in_dtypes, out_dtype, weights), out_dtype)
    b, d, a = (as_f64(r, dt) for r, dt in zip(raws, in_dtypes))
    bound = merge_error_bound(b, d, a, *weights, out_dtype)
    err = np.abs(got - merge_ref(b, d, a, *weights))
    assert got.shape == shape
    assert np.all(err <= bound), f"worst error {np.max(err / bound):.3f} x bound"


@pytest.mark.parametrize("offsets", [(1, 3, 5), (2, 0, 6), (7, 7, 7)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.short_name)
def test_unaligned_inputs_and_output(offsets, dtype):
    """Memory-mapped safetensors data is rarely 16-byte aligned: any byte offset must work."""
    rng = np.random.default_rng(7)
    count = 4097
    aligned_raws = [random_values(rng, count, dtype) for _ in range(3)]
    raws = [unaligned_copy(r, off) for r, off in zip(aligned_raws, offsets)]
    out = unaligned_copy(np.zeros(count, dtype=storage_numpy_dtype(dtype)), offsets[0])
    merge_tensors(*raws, domain_weight=0.3, align_weight=0.9, out=out, out_dtype=dtype)
    expected = run_kernel(aligned_raws, (dtype,) * 3, dtype, (0.3, 0.9))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("in_dtypes", INPUT_DTYPES, ids=lambda t: "-".join(d.short_name for d in t))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: d.short_name)
def test_bitwise_equal_to_torch_reference(in_dtypes, out_dtype):
    """Same fp32 operations in the same order, no FMA, one RNE rounding: identical bits."""
    rng = np.random.default_rng(11)
    raws = [random_values(rng, 10_001, d) for d in in_dtypes]
    ours = run_kernel(raws, in_dtypes, out_dtype, (0.3, 0.9), backend="cpu")
    theirs = run_kernel(raws, in_dtypes, out_dtype, (0.3, 0.9), backend="torch")
    np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(np.uint8))


def test_bitwise_deterministic_across_thread_counts():
    rng = np.random.default_rng(5)
    raws = [random_values(rng, 3_000_017, DType.BF16) for _ in range(3)]
    results = [run_kernel(raws, (DType.BF16,) * 3, DType.BF16, (0.3, 0.9), threads=t)
               for t in (1, 2, 3, 7)]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_bound_is_tight_enough_to_catch_one_ulp():
    """The bound stays below one output ulp, so a result one ulp off the correctly rounded value
    (truncation instead of rounding, say) fails it.  Results that cancel a hundredfold or more
    are left out: there the fp32 error term rightly dominates."""
    rng = np.random.default_rng(2)
    for dtype in (DType.BF16, DType.F16):
        b, d, a = (as_f64(random_values(rng, 10_000, dtype), dtype) for _ in range(3))
        exact = merge_ref(b, d, a, 0.3, 0.9)
        terms = np.abs(b) + np.abs(0.3 * (d - b)) + np.abs(0.9 * (a - b))
        usual = terms < 100 * np.abs(exact)
        assert usual.mean() > 0.9
        bound = merge_error_bound(b, d, a, 0.3, 0.9, dtype)
        assert np.all(bound[usual] < spacing(exact[usual], dtype))


# ---- conversions: out = 0 + 1*(x - 0) + 0*(0 - 0) = x, so these test load and store alone ----

def convert(values_raw: np.ndarray, in_dtype: DType, out_dtype: DType) -> np.ndarray:
    zeros = np.zeros(values_raw.size, dtype=storage_numpy_dtype(in_dtype))
    return run_kernel([zeros, values_raw, zeros], (in_dtype,) * 3, out_dtype, (1.0, 0.0))


def assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Equal values, NaN where NaN (zero's sign is not kept by 0 + x and is not compared)."""
    with np.errstate(invalid="ignore"):  # numpy warns when widening fp16 NaN payloads
        got, want = got.astype(np.float64), want.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    keep = ~np.isnan(want)
    np.testing.assert_array_equal(got[keep], want[keep])


def test_every_fp16_and_bf16_value_widens_exactly():
    every = np.arange(1 << 16, dtype=np.uint16)
    assert_same_floats(convert(every.view(np.float16), DType.F16, DType.F32),
                       every.view(np.float16).astype(np.float32))
    assert_same_floats(convert(every, DType.BF16, DType.F32),
                       (every.astype(np.uint32) << 16).view(np.float32))


def edge_f32_values() -> np.ndarray:
    """Random bit patterns over the whole fp32 range plus the rounding edges of fp16 and bf16."""
    rng = np.random.default_rng(13)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    edges = [65504, 65519.996, 65520, 65536, 2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
             2.0**-26, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
             3.3895314e38, 3.4028235e38, np.inf, np.nan, 1e-40, 0.0]
    edge = np.array(edges + [-e for e in edges], dtype=np.float32)
    # Every tie between neighbouring fp16 values in [1, 2): the round-half-even cases.
    ties = (1 + (np.arange(1024, dtype=np.float32) + 0.5) * 2.0**-10).astype(np.float32)
    return np.concatenate([bits.view(np.float32), edge, ties])


def test_fp32_to_fp16_rounds_like_numpy():
    values = edge_f32_values()
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(np.float16)
    assert_same_floats(convert(values, DType.F32, DType.F16), want)


def test_fp32_to_bf16_rounds_like_torch():
    values = edge_f32_values()
    want = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    got = convert(values, DType.F32, DType.BF16)
    assert_same_floats((got.astype(np.uint32) << 16).view(np.float32), want)


def test_nan_and_inf_propagate():
    specials = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    for out_dtype in DTYPES:
        got = as_f64(convert(specials, DType.F32, out_dtype), out_dtype)
        assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.0


def test_overflow_rounds_to_inf_in_the_output_dtype():
    big = np.full(3, 60000.0, dtype=np.float32)
    # 60000 + 1*(120000 - 60000) + 0*(...) = 120000, past fp16's largest finite 65504.
    got = run_kernel([big, big * 2, big], (DType.F32,) * 3, DType.F16, (1.0, 0.0))
    assert np.all(np.isinf(got.astype(np.float64)))


def test_f32_to_bf16_bits_helper_matches_torch():
    """The numpy helper used by tests and the synthetic generator must itself be right."""
    values = edge_f32_values()
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = f32_to_bf16_bits(values)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all(np.isnan((got[nan].astype(np.uint32) << 16).view(np.float32)))


@pytest.mark.parametrize("bad, error, message", [
    ("shape", ValueError, r"shapes differ: .*\(4, 7\)"),
    ("dtype", TypeError, r"torch tensors must be float32, float16 or bfloat16 \(got torch.int32\)"),
    ("noncontig", ValueError, r"base must be contiguous"),
    ("overlap", ValueError, r"out partially overlaps base"),
])
def test_merge_tensors_rejects_bad_arguments(bad, error, message):
    x = torch.zeros(4, 6)
    args = [x, x.clone(), x.clone()]
    kwargs = {}
    if bad == "shape":
        args[1] = torch.zeros(4, 7)
    elif bad == "dtype":
        args[2] = torch.zeros(4, 6, dtype=torch.int32)
    elif bad == "noncontig":
        args[0] = torch.zeros(6, 4).t()
    else:
        storage = torch.zeros(30)
        args[0], kwargs["out"] = storage[:24].view(4, 6), storage[1:25].view(4, 6)
    with pytest.raises(error, match=message):
        merge_tensors(*args, **kwargs)


def test_numpy_inputs_and_default_weights():
    rng = np.random.default_rng(0)
    b, d, a = (rng.standard_normal(100).astype(np.float32) for _ in range(3))
    out = merge_tensors(b, d, a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    bound = merge_error_bound(b, d, a, 0.5, 0.5, DType.F32)
    assert np.all(np.abs(out - merge_ref(b, d, a, 0.5, 0.5)) <= bound)


def test_in_place_output_over_base():
    rng = np.random.default_rng(1)
    b, d, a = (rng.standard_normal(1000).astype(np.float32) for _ in range(3))
    expected = merge_tensors(b, d, a, domain_weight=0.3, align_weight=0.9)
    merge_tensors(b, d, a, domain_weight=0.3, align_weight=0.9, out=b)
    np.testing.assert_array_equal(b, expected)


@pytest.mark.parametrize("backend", ["nonesuch"])
def test_unknown_backend_is_a_clear_error(backend):
    from mergealign_fast import MergeError

    x = np.zeros(3, dtype=np.float32)
    with pytest.raises(MergeError, match="unknown backend 'nonesuch'"):
        merge_tensors(x, x, x, backend=backend)


HALF_DIGEST = """
import hashlib, numpy as np
from mergealign_fast import merge_tensors
every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
zeros = np.zeros_like(every)
rng = np.random.default_rng(3)
wide = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
digest = hashlib.sha256()
for out in ("fp16", "fp32"):
    digest.update(merge_tensors(zeros, every, zeros, domain_weight=1.0, align_weight=0.0,
                                out_dtype=out).tobytes())
    digest.update(merge_tensors(every, every[::-1].copy(), zeros, domain_weight=0.3,
                                align_weight=0.9, out_dtype=out).tobytes())
digest.update(merge_tensors(np.zeros_like(wide), wide, np.zeros_like(wide), domain_weight=1.0,
                            align_weight=0.0, out_dtype="fp16").tobytes())
print(digest.hexdigest())
"""


def test_f16c_and_portable_half_paths_give_identical_bits():
    """The F16C fast path and merge_math.h's portable conversions (the ones a GPU runs) must
    agree on every half value, NaNs included, and on rounding from any float."""
    import os
    import subprocess
    import sys

    def digest(env_extra):
        return subprocess.run([sys.executable, "-c", HALF_DIGEST], capture_output=True, text=True,
                              check=True, env={**os.environ, **env_extra}).stdout.strip()

    with np.errstate(all="ignore"):
        assert digest({}) == digest({"MERGEALIGN_NO_F16C": "1"})


@pytest.mark.parametrize("args, message", [
    ((0, 3, 0, 0, 0, 0, 4), "unknown dtype code 3"),
    ((0, 0, 0, 0, 0, 0, 4, -1), "unknown dtype code -1"),
    ((0, 0, 0, 0, 0, 0, -4), "negative element count"),
    ((0, 0, 0, 0, 0, 0, 4, 0, -1), "negative first index"),
])
def test_native_operands_are_checked_where_python_builds_them(args, message):
    """Every native pass takes one Operands object; its values are checked once, there."""
    from mergealign_fast.kernels import cpu

    with pytest.raises(ValueError, match=message):
        cpu.native().Operands(*args)


def test_native_operands_keep_what_they_were_given():
    from mergealign_fast.kernels import cpu

    ops = cpu.native().Operands(16, int(DType.BF16), 32, int(DType.F16), 48, int(DType.F32), 7,
                                int(DType.F16), 2**40)
    assert (ops.count, ops.out_dtype, ops.first_index) == (7, int(DType.F16), 2**40)


# Merges that reach every branch of the direct path (csrc/direct_path.cpp): every dtype; lengths
# around its 16-element step; inputs and outputs at every alignment (odd byte addresses too, where
# no element can be aligned); values of every bit pattern (NaN payloads and signs, ±inf,
# subnormals, rounding ties) and weights that overflow; outputs of 8 MiB and more (streaming
# stores); a sweep of three recipes written to files with their CRCs and NaN/inf counts.
DIRECT_DIGEST = """
import hashlib, os, tempfile, numpy as np
from mergealign_fast import merge_tensors
from mergealign_fast.dtypes import as_dtype
from mergealign_fast.kernels import cpu
native = cpu.native()
rng = np.random.default_rng(11)
digest = hashlib.sha256()
STORED = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}

def trio_at(dtype, count, byte_offsets):
    size = np.dtype(STORED[dtype]).itemsize
    views = []
    for offset in byte_offsets:
        raw = rng.integers(0, 256, count * size + 64, dtype=np.uint8)
        if dtype == "fp32":  # weight-like values too, so that results are not all NaN
            raw[: count * size // 2 // 4 * 4].view(np.float32)[:] = rng.standard_normal(
                count * size // 2 // 4).astype(np.float32)
        views.append(np.frombuffer(raw.data, STORED[dtype], count, offset))
    return views

for dtype in STORED:
    for count in (0, 1, 15, 16, 17, 33, 100, 1031):
        for offsets in ((0, 0, 0, 0), (2, 2, 2, 2), (4, 4, 4, 0), (6, 2, 10, 30), (1, 1, 1, 1),
                        (3, 0, 1, 2), (0, 0, 0, 1)):
            b, d, a = trio_at(dtype, count, offsets[:3])
            out = np.frombuffer(bytearray(count * b.itemsize + 64), STORED[dtype], count,
                                offsets[3])
            for wd, wa in ((0.3, 0.9), (1.0, 0.0), (-2.5, 3.75), (3e38, -3e38)):
                merge_tensors(b, d, a, domain_weight=wd, align_weight=wa, out=out)
                digest.update(out.tobytes())
    b, d, a = trio_at(dtype, (8 << 20) // 2 + 13, (2, 2, 2))
    for threads in (1, 2):
        digest.update(merge_tensors(b, d, a, domain_weight=0.25, align_weight=0.5,
                                    threads=threads).tobytes())
    b, d, a = trio_at(dtype, 300_001, (6, 6, 6))
    code = int(as_dtype(dtype))
    operands = native.Operands(b.ctypes.data, code, d.ctypes.data, code, a.ctypes.data, code,
                               len(b), code)
    with tempfile.TemporaryDirectory() as folder:
        paths = [os.path.join(folder, str(j)) for j in range(3)]
        fds = [os.open(p, os.O_RDWR | os.O_CREAT) for p in paths]
        recipes = []
        for wd, wa in ((0.5, 0.5), (2.0, -1.0), (1e38, 1e38)):
            recipe = native.Recipe()
            recipe.domain.weight, recipe.align.weight = wd, wa
            recipes.append(recipe)
        err, crcs, nonfinite = native.merge_to_files(
            operands, [(fd, 7, r) for fd, r in zip(fds, recipes)], 2)
        digest.update(repr((err, crcs, nonfinite)).encode())
        for fd, path in zip(fds, paths):
            os.close(fd)
            digest.update(open(path, "rb").read())
print(digest.hexdigest())
"""


def test_direct_path_and_tiles_give_identical_bits():
    """The direct path (one AVX2 loop for same-dtype task arithmetic) and the tile layer every
    other pass runs must agree bit for bit, NaN payloads, ±inf, NaN/inf counts and CRCs
    included, on every alignment and length around the vector step; the tile layer itself is
    checked against the float64 oracle above."""
    import os
    import subprocess
    import sys

    def digest(env_extra):
        return subprocess.run([sys.executable, "-c", DIRECT_DIGEST], capture_output=True,
                              text=True, check=True,
                              env={**os.environ, **env_extra}).stdout.strip()

    direct = digest({})
    assert direct == digest({"MERGEALIGN_TILES_ONLY": "1"})
    assert direct == digest({"MERGEALIGN_TILES_ONLY": "1", "MERGEALIGN_NO_F16C": "1"})


def recipes_reaching_every_branch():
    """Recipes reaching every branch of merge_math.h's per-element functions: each kind, each
    sparsification per term, sign election and normalisation on and off, a rescale, lambda."""
    from mergealign_fast.kernels import cpu
    from mergealign_fast.methods.core.spec import (KEEP_LARGEST, KEEP_RANDOM, MODELS, NEAR_SWAP,
                                                   VECTORS)

    native = cpu.native()
    made = []
    plain = native.Recipe()
    plain.domain.weight, plain.align.weight = 0.3, 0.9
    made.append(("task arithmetic", plain))
    for divisor in (1.0, 0.7):
        models = native.Recipe()
        models.kind, models.base_weight, models.divisor = MODELS, 0.2, divisor
        models.domain.weight, models.align.weight = 0.5, 0.3
        made.append((f"models /{divisor}", models))
    for t in (0.01, 0.0, -0.5):  # blends and swaps; nothing moves; a negative t clamps to 0
        swap = native.Recipe()
        swap.kind, swap.swap_t = NEAR_SWAP, t
        made.append((f"nearswap t={t}", swap))
    for sparsify in ((0, 0), (KEEP_LARGEST, KEEP_RANDOM), (KEEP_RANDOM, KEEP_LARGEST)):
        for election in (0, 1):
            for normalize in (0, 1):
                r = native.Recipe()
                r.kind, r.sign_election, r.normalize, r.lambda_ = VECTORS, election, normalize, 0.8
                r.divisor = 1.3
                for term, kind, weight in ((r.domain, sparsify[0], 0.6),
                                           (r.align, sparsify[1], 0.7)):
                    term.weight, term.scale, term.sparsify = weight, 2.5, kind
                    term.min_magnitude_bits = int(np.float32(0.01).view(np.uint32))
                    term.last_tie_index = 2**32 + 500
                    term.keep_below, term.key_lo, term.key_hi = 1 << 23, 0x1234567, 0x89abcdef
                made.append((f"vectors {sparsify} e{election} n{normalize}", r))
    return made


@pytest.mark.parametrize("name, recipe", recipes_reaching_every_branch(),
                         ids=[n for n, _ in recipes_reaching_every_branch()])
@pytest.mark.parametrize("dtypes", [("bf16",) * 4, ("fp16",) * 4, ("fp32",) * 4,
                                    ("bf16", "fp16", "fp32", "bf16"),
                                    ("fp32", "bf16", "fp16", "fp16")])
def test_the_per_element_path_the_gpu_runs_matches_the_cpu_kernel(name, recipe, dtypes):
    """The CUDA kernels evaluate merge_math.h element by element (merge_element); the CPU runs
    its own bulk versions (tiles, direct path).  Run the per-element path on the CPU and
    require the same bits, magnitude ties and random draws across 2^32 included, over odd
    lengths and inputs one element off their alignment."""
    from mergealign_fast.dtypes import as_dtype
    from mergealign_fast.kernels import cpu

    native = cpu.native()
    rng = np.random.default_rng(5)
    arrays = []
    for dtype in dtypes[:3]:
        x = (rng.standard_normal(4100) * 0.02).astype(np.float32)
        x[:9] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 0.01, -0.01, 1e-40, 1e-40]  # specials, ties
        arrays.append(x.view(np.uint32).__rshift__(16).astype(np.uint16) if dtype == "bf16"
                      else x.astype(np.float16 if dtype == "fp16" else np.float32))
    out_dtype = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}[dtypes[3]]
    codes = [int(as_dtype(d)) for d in dtypes]
    for count, shift in ((1, 0), (7, 1), (300, 1), (4099, 0), (4099, 1)):
        b, d, a = (x[shift:shift + count] for x in arrays)
        for first in (0, 2**32 - 100):
            ops = native.Operands(b.ctypes.data, codes[0], d.ctypes.data, codes[1],
                                  a.ctypes.data, codes[2], count, codes[3], first)
            bulk, single = np.empty(count, out_dtype), np.empty(count, out_dtype)
            with np.errstate(all="ignore"):
                native.merge_recipe(ops, bulk.ctypes.data, recipe, 2)
                native.merge_elementwise(ops, single.ctypes.data, recipe)
            assert bulk.tobytes() == single.tobytes(), (name, dtypes, count, shift, first)
