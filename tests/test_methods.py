"""Merge methods (methods.py) against the float64 oracle, hand-made cases, and their invariants.

Tolerance: reference.method_error_bound, 8u·S of fp32 evaluation (S bounds every intermediate,
including the rounding of τ to fp32) plus half an output spacing.  The oracle takes the discrete
decisions (which elements a trim or drop keeps, which sign wins) on the fp32 values the method
defines, and computes the values in float64 (see reference.py).
"""

import zlib

import numpy as np
import pytest
import torch

from mergealign_fast import merge_tensors
from mergealign_fast.dtypes import DType, storage_numpy_dtype
from mergealign_fast import methods
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.methods.core.recipes import keep_count
from mergealign_fast.methods.core.settings import resolve
from mergealign_fast.methods.core.geometry import slerp_coefficients
from mergealign_fast.dtypes import f32_to_bf16_bits
from mergealign_fast.methods.core.oracle import method_error_bound, method_ref, random_draw24

from conftest import as_f64, random_values

INPUT_DTYPES = [(DType.BF16,) * 3, (DType.F16,) * 3, (DType.F32,) * 3,
                (DType.BF16, DType.F16, DType.F32)]
OUT_DTYPES = [DType.BF16, DType.F32]
SHAPES = [(1,), (7,), (4097,), (123, 431)]
# (method, w_domain, w_align) for each parameter set of the grid.
CASES = {
    "ta-lambda-normalize": (Method("task_arithmetic", lambda_=0.7, normalize=True), 0.6, 0.9),
    "linear": (Method("linear", base_weight=0.2), 0.3, 0.9),
    "ties": (Method("ties", domain_density=0.4, align_density=0.7), 0.6, 0.9),
    "ties-l1-lambda": (Method("ties", domain_density=0.3, align_density=0.3, rescale="l1",
                              lambda_=1.3), 1.0, 0.5),
    "dare-linear": (Method("dare_linear", domain_density=0.5, align_density=0.3, seed=3), 0.5,
                    0.5),
    "dare-linear-inverse": (Method("dare_linear", domain_density=0.6, align_density=0.6,
                                   rescale="inverse_density"), 0.7, 0.4),
    "dare-ties-normalize": (Method("dare_ties", domain_density=0.5, align_density=0.8,
                                   normalize=True), 0.8, 0.6),
    "slerp": (Method("slerp", t=0.3), 0.5, 0.5),
    "slerp-vectors": (Method("slerp_vectors", t=0.7), 0.5, 0.5),
    "chipalign": (Method("chipalign", t=0.4), 0.5, 0.5),
    "resta": (Method("resta", domain_density=0.6), 0.5, 0.8),
    "nuslerp": (Method("nuslerp"), 0.3, 0.6),
    "nuslerp-models": (Method("nuslerp_models"), 0.7, 0.2),
    "model-stock": (Method("model_stock"), 0.5, 0.5),
    "breadcrumbs": (Method("breadcrumbs", domain_density=0.5, align_density=0.3, gamma=0.1),
                    0.6, 0.5),
    "breadcrumbs-ties-l1": (Method("breadcrumbs_ties", domain_density=0.4, align_density=0.8,
                                   gamma=0.3, rescale="l1", normalize=True), 0.7, 0.4),
    # gamma beyond what density leaves: fewer outliers dropped, int(density·n) kept
    "breadcrumbs-crowded": (Method("breadcrumbs", domain_density=0.9, align_density=0.05,
                                   gamma=0.5), 0.5, 0.5),
    "multislerp": (Method("multislerp"), 0.7, 0.4),
    "multislerp-models": (Method("multislerp_models", normalize=False), 0.6, 0.3),
    # |τ| ~ 0.05 here: t = 0.02 swaps the close elements, blends the rest
    "nearswap": (Method("nearswap", t=0.02), 0.5, 0.5),
}


def fine_tuned(rng, base_raw, dtype_in: DType, dtype_out: DType, scale=0.05):
    """base + a small random update, stored in dtype_out: the shape of a real fine-tune."""
    base = as_f64(base_raw, dtype_in).astype(np.float32)
    values = base + rng.standard_normal(base.size).astype(np.float32) * np.float32(scale) * \
        np.maximum(np.abs(base), np.float32(0.01))
    if dtype_out is DType.BF16:
        return f32_to_bf16_bits(values)
    return values.astype(storage_numpy_dtype(dtype_out))


def trio(seed: int, count: int, dtypes):
    rng = np.random.default_rng(seed)
    base = random_values(rng, count, dtypes[0])
    return [base, fine_tuned(rng, base, dtypes[0], dtypes[1]),
            fine_tuned(rng, base, dtypes[0], dtypes[2])]


def as_torch(raw, dtype: DType):
    tensor = torch.from_numpy(np.ascontiguousarray(raw))
    return tensor.view(torch.bfloat16) if dtype is DType.BF16 else tensor


def run_method(raws, dtypes, out_dtype, method, w_domain, w_align, name="t", threads=2):
    out = merge_tensors(*(as_torch(r, d) for r, d in zip(raws, dtypes)), domain_weight=w_domain,
                        align_weight=w_align, out_dtype=out_dtype, method=method, name=name,
                        threads=threads)
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16).numpy().view(np.uint16)
    return out.numpy()


def oracle(raws, dtypes, method, w_domain, w_align, name="t"):
    settings = resolve(method, name, 0.0, (w_domain, w_align))
    return method_ref(settings, name, *(as_f64(r, d) for r, d in zip(raws, dtypes)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtypes", INPUT_DTYPES, ids=lambda t: "-".join(d.short_name for d in t))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: d.short_name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_method_matches_oracle_within_derived_bound(case, dtypes, out_dtype, shape):
    method, w_domain, w_align = CASES[case]
    count = int(np.prod(shape))
    seed = zlib.crc32(repr((case, dtypes, shape)).encode())  # str hash() varies per process
    raws = [r.reshape(shape) for r in trio(seed, count, dtypes)]
    got = as_f64(run_method(raws, dtypes, out_dtype, method, w_domain, w_align), out_dtype)
    exact, scale = oracle(raws, dtypes, method, w_domain, w_align)
    bound = method_error_bound(exact, scale, out_dtype)
    err = np.abs(got.ravel() - exact)
    worst = np.argmax(err / bound) if err.size else 0
    assert np.all(err <= bound), f"worst {np.max(err / bound):.2f} x bound at {worst}"


# ---- the oracle itself, on cases worked out by hand --------------------------------------------

def f32(*values):
    return np.array(values, dtype=np.float32)


def test_ties_sign_election_and_disjoint_mean_by_hand():
    base = f32(0, 0, 0, 0)
    domain = f32(1, -1, 2, 3)
    aligned = f32(-3, -1, 1, 0)
    # weights 1, 1, no trim: element 0: sum -2 -> keep aligned only: -3 / 1.
    # element 1: both -1 agree -> (-1 - 1) / 2 = -1.  element 2: (2 + 1) / 2 = 1.5.
    # element 3: aligned is 0 (no sign) -> only domain: 3 / 1.
    expected = f32(-3, -1, 1.5, 3)
    got = merge_tensors(base, domain, aligned, domain_weight=1.0, align_weight=1.0,
                        method="ties")
    np.testing.assert_array_equal(got, expected)
    exact, _ = oracle([base, domain, aligned], (DType.F32,) * 3, Method("ties"), 1.0, 1.0)
    np.testing.assert_array_equal(exact, expected)


def test_ties_trim_keeps_exactly_k_breaking_ties_by_index():
    base = np.zeros(6, dtype=np.float32)
    domain = f32(0.1, -5, 0.3, 2, -2, 0.2)
    zeros = np.zeros(6, dtype=np.float32)
    # density 0.5 -> k = 3: |−5|, |2|, |−2|.
    got = merge_tensors(base, domain, zeros, domain_weight=1.0, align_weight=0.0,
                        method=Method("ties", domain_density=0.5))
    np.testing.assert_array_equal(got, f32(0, -5, 0, 2, -2, 0))
    # density 1/3 -> k = 2: |2| and |−2| tie for second place, the first in index order wins.
    got = merge_tensors(base, domain, zeros, domain_weight=1.0, align_weight=0.0,
                        method=Method("ties", domain_density=1 / 3))
    np.testing.assert_array_equal(got, f32(0, -5, 0, 2, 0, 0))
    assert keep_count(1 / 3, 6) == 2


def test_ties_keeps_exactly_k_of_a_bf16_tensor_full_of_ties():
    rng = np.random.default_rng(8)
    base = np.zeros(50_000, dtype=np.uint16)
    # Few distinct magnitudes: thousands of elements tie at any threshold.
    domain = f32_to_bf16_bits(rng.integers(-20, 21, 50_000).astype(np.float32) / 8)
    out = run_method([base, domain, base], (DType.BF16,) * 3, DType.F32,
                     Method("ties", domain_density=0.37), 1.0, 0.0)
    assert np.count_nonzero(out) == keep_count(0.37, 50_000)


def test_slerp_and_chipalign_by_hand():
    zero = np.zeros(2, dtype=np.float32)
    x, y = f32(1, 0), f32(0, 1)
    half = np.float32(np.sqrt(0.5))
    got = merge_tensors(zero, x, y, method=Method("slerp", t=0.5))
    np.testing.assert_allclose(got, f32(half, half), rtol=1e-6)
    # ChipAlign: ‖aligned‖ = 2, ‖domain‖ = 8 -> norm 2^(1/2)·8^(1/2) = 4 along the bisector.
    got = merge_tensors(zero, f32(8, 0), f32(0, 2), method=Method("chipalign", t=0.5))
    np.testing.assert_allclose(got, f32(4 * half, 4 * half), rtol=1e-6)
    # Nearly collinear: a linear blend, as mergekit does.
    assert slerp_coefficients(0.25, 1.0, 1.0, 0.99999) == (0.75, 0.25)


def test_resta_adds_the_safety_vector_to_the_whole_expert():
    base, domain, aligned = f32(1, 2, 3), f32(2, 2, 5), f32(1, 4, 3)
    got = merge_tensors(base, domain, aligned, domain_weight=0.1, align_weight=0.5,
                        method="resta")
    np.testing.assert_array_equal(got, domain + np.float32(0.5) * (aligned - base))


# ---- DARE's counter-based mask -----------------------------------------------------------------

def test_random_draw_matches_the_numpy_implementation():
    from mergealign_fast.kernels import cpu

    native = cpu.native()
    for index in (0, 1, 2**31 - 1, 2**32 + 7, 2**40 + 3):
        assert native.random_draw24(0xDEADBEEF, 0x1234, index) == \
            int(random_draw24(0xDEADBEEF, 0x1234, np.array([index]))[0])


def test_dare_keeps_about_density_and_depends_only_on_seed_and_name():
    count = 200_000
    raws = trio(1, count, (DType.F32,) * 3)
    method = Method("dare_linear", domain_density=0.3, align_density=1.0, rescale="none")

    def changed(seed=0, name="t", threads=2):
        out = run_method(raws, (DType.F32,) * 3, DType.F32,
                         Method(method.name, 0.3, 1.0, rescale="none", seed=seed), 1.0, 0.0,
                         name=name, threads=threads)
        return out != raws[0]

    kept = changed()
    # Binomial(200000, 0.3): 5 standard deviations is 1025 elements.
    assert abs(kept.sum() - 0.3 * count) < 5 * np.sqrt(count * 0.3 * 0.7)
    np.testing.assert_array_equal(kept, changed(threads=1))
    assert (kept != changed(seed=1)).mean() > 0.3
    assert (kept != changed(name="other")).mean() > 0.3


def test_dare_l1_rescale_keeps_the_l1_norm_of_each_vector():
    raws = trio(2, 100_000, (DType.F32,) * 3)
    out = run_method(raws, (DType.F32,) * 3, DType.F32,
                     Method("dare_linear", domain_density=0.2, align_density=1.0), 1.0, 0.0)
    before = np.abs(raws[1].astype(np.float64) - raws[0]).sum()
    after = np.abs(out.astype(np.float64) - raws[0]).sum()
    assert abs(after / before - 1) < 1e-4


@pytest.mark.parametrize("method", [
    Method("dare_ties", domain_density=0.4, align_density=0.6, seed=9),
    Method("ties", domain_density=0.3, align_density=0.7, rescale="l1"),
    Method("chipalign", t=0.3),
], ids=lambda m: m.name)
def test_checkpoint_merge_equals_per_tensor_merges_across_windows_and_threads(
        tiny_trio, tmp_path, monkeypatch, method):
    """A chunked, threaded checkpoint merge draws the same masks and thresholds as one call on
    the whole tensor: DARE keys by element index, the selections sum exact counts, the ties
    kept are found across windows."""
    from mergealign_fast import merge_checkpoints
    from mergealign_fast.io import stream
    from mergealign_fast.io.checkpoint import open_checkpoint, read_elements

    monkeypatch.setattr(stream, "WINDOW_BYTES", 4096)  # many windows per tensor
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "out", domain_weight=0.7, align_weight=0.6, method=method,
                      threads=1, fsync=False)
    merged = open_checkpoint(tmp_path / "out")
    models = {role: open_checkpoint(folder) for role, folder in tiny_trio.items()}
    for name, loc in merged.tensors.items():
        raws = [read_elements(models[r].tensors[name]) for r in ("base", "domain", "aligned")]
        dtypes = [DType[models[r].tensors[name].entry.dtype] for r in ("base", "domain",
                                                                       "aligned")]
        expected = run_method(raws, dtypes, DType[loc.entry.dtype], method, 0.7, 0.6,
                              name=name)
        np.testing.assert_array_equal(read_elements(loc).ravel(), expected.ravel(), name)


# ---- parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, message", [
    (Method("nope"), "unknown merge method"),
    (Method("ties", domain_density=1.5), "density must be between 0 and 1"),
    (Method("dare_linear", rescale="l3"), "rescale 'l3'"),
    (Method("dare_linear", seed=-1), "seed must be a non-negative integer"),
])
def test_bad_parameters_are_one_clear_error(method, message):
    zeros = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        merge_tensors(zeros, zeros, zeros, method=method)


def test_linear_with_weights_summing_to_zero_is_refused():
    zeros = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="sum to 0"):
        merge_tensors(zeros, zeros, zeros, domain_weight=0.5, align_weight=-0.5,
                      method="linear")


@pytest.mark.parametrize("ours, other", [
    (Method("ties", domain_density=0.4), Method("ties", domain_density=0.42)),
    (Method("dare_linear", domain_density=0.5, seed=3), Method("dare_linear", domain_density=0.5,
                                                               seed=4)),
    (Method("slerp", t=0.3), Method("slerp", t=0.3001)),
    (Method("chipalign", t=0.4), Method("slerp", t=0.4)),
    (Method("dare_ties", domain_density=0.5), Method("dare_ties", domain_density=0.5,
                                                     rescale="inverse_density")),
], ids=["density", "seed", "t", "chipalign-vs-slerp", "rescale"])
def test_the_oracle_check_catches_a_slightly_different_method(ours, other):
    """The bound is tight enough that a neighbouring parameter fails it."""
    dtypes = (DType.BF16,) * 3
    raws = trio(4, 4097, dtypes)
    got = as_f64(run_method(raws, dtypes, DType.F32, ours, 0.6, 0.9), DType.F32)
    exact, scale = oracle(raws, dtypes, other, 0.6, 0.9)
    assert np.any(np.abs(got - exact) > method_error_bound(exact, scale, DType.F32))


def test_random_masks_of_tiles_straddling_2_to_the_32():
    """Tensors past 2^32 elements: a tile whose indices cross 2^32 takes the per-element path,
    every other tile the bulk one; both must draw the numpy reference's mask."""
    from mergealign_fast.kernels import cpu
    from mergealign_fast.kernels.buffer import Buffer
    from mergealign_fast.methods.core.recipes import DRAW_RANGE, stream_key
    from mergealign_fast.methods.core.spec import KEEP_RANDOM, VECTORS

    native = cpu.native()
    count = 4096
    raws = trio(3, count, (DType.F32,) * 3)
    half = DRAW_RANGE // 2  # density 0.5
    for first in (2**32 - 1000, 2**32, 3 * 2**32 - 128):
        recipe = native.Recipe()
        recipe.kind = VECTORS
        recipe.domain.weight = 1.0
        recipe.domain.sparsify = KEEP_RANDOM
        recipe.domain.keep_below = half
        recipe.domain.key_lo, recipe.domain.key_hi = stream_key(0, "t", "domain")
        out = np.empty(count, dtype=np.float32)
        b, d, a, o = (Buffer(x.ctypes.data, DType.F32, count) for x in (*raws, out))
        cpu.merge_recipe(b, d, a, o, recipe, first, 2)
        draws = random_draw24(*stream_key(0, "t", "domain"), np.arange(first, first + count))
        kept = (raws[1] - raws[0]) * (draws < half)
        np.testing.assert_array_equal(out, raws[0] + kept)


@pytest.mark.parametrize("name", ["slerp", "dare_linear", "ties", "chipalign"])
def test_a_checkpoint_tensor_without_elements_merges(tmp_path, name):
    """A (0, 3) tensor has no windows: its passes sum nothing and its merge writes nothing."""
    from conftest import write_checkpoint
    from mergealign_fast import merge_checkpoints
    from mergealign_fast.io.checkpoint import open_checkpoint

    for i, role in enumerate(("base", "domain", "aligned")):
        write_checkpoint(tmp_path / role, {"w": np.full(4, float(i), dtype=np.float32),
                                           "empty": np.zeros((0, 3), dtype=np.float32)})
    method = Method(name, domain_density=0.5) if "density" in methods.get(name).parameters \
        else Method(name)
    merge_checkpoints(tmp_path / "base", tmp_path / "domain", tmp_path / "aligned",
                      tmp_path / "out", method=method, fsync=False)
    assert open_checkpoint(tmp_path / "out").tensors["empty"].entry.shape == (0, 3)


@pytest.mark.parametrize("steps", [10, 1])  # mergekit's default; one step, far from converged
@pytest.mark.parametrize("dtypes", INPUT_DTYPES, ids=lambda t: "-".join(d.short_name for d in t))
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_karcher_is_the_float64_iteration_within_the_fp32_bound(dtypes, shape, steps):
    """The Karcher mean (weights 0.2 / 0.5 / 0.3 for base, domain, aligned): coefficients from
    the Gram matrix, against the iteration run on the vectors themselves in float64.  (One
    element has no sphere to average on: its unit vectors are ±1.)"""
    rng = np.random.default_rng(31)
    count = int(np.prod(shape))
    base = random_values(rng, count, dtypes[0])
    raws = [base, fine_tuned(rng, base, dtypes[0], dtypes[1]),
            fine_tuned(rng, base, dtypes[0], dtypes[2])]
    method = Method("karcher", base_weight=0.2, max_iter=steps)
    out = run_method(raws, dtypes, DType.F32, method, 0.5, 0.3)
    exact, scale = method_ref(resolve(method, "w", 0.0, (0.5, 0.3)), "w",
                              *(as_f64(r, d) for r, d in zip(raws, dtypes)))
    assert np.all(np.abs(out.astype(np.float64) - exact)
                  <= method_error_bound(exact, scale, DType.F32))
