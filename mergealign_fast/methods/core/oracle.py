"""The float64 oracle for every method, and the error bound a correct kernel must meet.

Tests and benchmarks import these; nothing here is used on the fast path.  One convention: a
method's oracle (its spec's `oracle`, defined in its module from the pieces here) takes the
resolved settings, the tensor's name, the base and the models as flat float64 arrays and
returns (the float64 result, the error scale S that bounds every fp32 intermediate).
"""

from __future__ import annotations

import numpy as np

from ...dtypes import DType, bf16_bits_to_f32
from . import geometry, recipes, spec


def decode_to_f64(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Stored values (numpy storage dtype) -> float64, exactly."""
    if dtype is DType.BF16:
        return bf16_bits_to_f32(raw).astype(np.float64)
    return raw.astype(np.float64)


# Unit roundoff of fp32, the precision the kernels compute in.
FP32_UNIT_ROUNDOFF = 2.0**-24

# Per output dtype: (ulp of 1.0, smallest positive subnormal).  The spacing of representable
# numbers near |x| is max(ulp(1) * 2^floor(log2|x|), smallest subnormal).
_SPACING = {
    DType.F32: (2.0**-23, 2.0**-149),
    DType.F16: (2.0**-10, 2.0**-24),
    DType.BF16: (2.0**-7, 2.0**-133),
}


def merge_ref(base, domain, aligned, w_domain: float, w_align: float) -> np.ndarray:
    """MergeAlign / task arithmetic in float64: b + w_d (d - b) + w_a (a - b)."""
    b = np.asarray(base, dtype=np.float64)
    d = np.asarray(domain, dtype=np.float64)
    a = np.asarray(aligned, dtype=np.float64)
    return b + w_domain * (d - b) + w_align * (a - b)


def spacing(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Distance between adjacent representable numbers of `dtype` around each |value|."""
    ulp_one, tiniest = _SPACING[dtype]
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    return np.maximum(ulp_one * np.exp2(exponent), tiniest)


def merge_error_bound(base, domain, aligned, w_domain: float, w_align: float,
                      out_dtype: DType) -> np.ndarray:
    """Largest |kernel - merge_ref| a correct fused kernel may show, element by element.

    The kernel rounds the two weights to fp32 (1 rounding each) and evaluates
    ((b + w_d*(d-b)) + w_a*(a-b)) in fp32: two subtractions, two multiplications, two additions.
    Each operation's relative error is at most u = 2^-24, and every intermediate is bounded by
    S = |b| + |w_d (d-b)| + |w_a (a-b)|, so the fp32 result r is within E = 8 u S of the exact value
    (6 operations + 2 weight roundings; first-order, the u^2 terms are far below the slack).
    Storing r rounds once more, by at most half the output spacing at |r| <= |exact| + E.
    """
    b = np.asarray(base, dtype=np.float64)
    d = np.asarray(domain, dtype=np.float64)
    a = np.asarray(aligned, dtype=np.float64)
    scale = np.abs(b) + np.abs(w_domain * (d - b)) + np.abs(w_align * (a - b))
    fp32_error = 8 * FP32_UNIT_ROUNDOFF * scale
    exact = merge_ref(b, d, a, w_domain, w_align)
    return fp32_error + 0.5 * spacing(np.abs(exact) + fp32_error, out_dtype)


# ---- merge methods (methods/) -----------------------------------------------------------------
# Discrete decisions (which elements a trim or a drop keeps, which sign wins an election) are
# taken on the fp32 values the method's definition names (τ = fp32(x - b), the fp32 weighted
# terms); everything else is float64.  An oracle that decided in float64 would disagree with
# any fp32 implementation on elements at a decision boundary by a whole term, not an ulp.


def random_draw24(key_lo: int, key_hi: int, index: np.ndarray) -> np.ndarray:
    """The kernels' counter-based draw (merge_math.h random_draw24), in numpy."""
    i = np.asarray(index, dtype=np.uint64)

    def mix32(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))

    with np.errstate(over="ignore"):
        lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        hi = (i >> np.uint64(32)).astype(np.uint32)
        h = mix32(lo ^ np.uint32(key_lo))
        return mix32(h ^ (hi * np.uint32(0x9E3779B9)) ^ np.uint32(key_hi)) >> np.uint32(8)


def _descending_ranks(magnitude: np.ndarray) -> np.ndarray:
    """Each element's rank by magnitude, largest first (0), ties in index order."""
    order = np.lexsort((np.arange(magnitude.size), -magnitude.astype(np.float64)))
    ranks = np.empty(magnitude.size, dtype=np.int64)
    ranks[order] = np.arange(magnitude.size)
    return ranks


def _kept(tau32: np.ndarray, density: float, sparsify: int, key, gamma: float = 0.0
          ) -> np.ndarray:
    if sparsify == spec.KEEP_ALL or density >= 1.0:
        return np.ones(tau32.shape, dtype=bool)
    if sparsify == spec.KEEP_BAND:
        # Model Breadcrumbs as mergekit counts it: of |τ| in ascending order, ranks
        # [below, below + kept) with kept = int(density·n), below = n - kept - int(γ·n) (≥ 0).
        n = tau32.size
        kept = int(density * n)
        below = max(0, n - kept - int(gamma * n))
        ranks = _descending_ranks(np.abs(tau32))
        return (ranks >= n - below - kept) & (ranks < n - below)
    if sparsify == spec.KEEP_LARGEST:
        if density <= 0.0 or tau32.size == 0:
            return np.zeros(tau32.shape, dtype=bool)
        magnitude = np.abs(tau32)
        k = recipes.keep_count(density, tau32.size)
        threshold = np.partition(magnitude, tau32.size - k)[tau32.size - k]
        above = magnitude > threshold
        ties = magnitude == threshold  # the first ones in index order make the count exactly k
        return above | (ties & (np.cumsum(ties) <= k - above.sum()))
    draws = random_draw24(key[0], key[1], np.arange(tau32.size))
    return draws < np.uint32(int(round(density * recipes.DRAW_RANGE)))


def _rescale_factor(tau32: np.ndarray, kept: np.ndarray, density: float, rescale: str,
                    sparsify: int) -> float:
    if rescale == "none" or sparsify == spec.KEEP_ALL or density >= 1.0:
        return 1.0
    if rescale == "inverse_density":
        return 1.0 / density if density > 0 else 1.0
    before = np.abs(tau32.astype(np.float64)).sum()
    after = np.abs(tau32.astype(np.float64))[kept].sum()
    if before < recipes.RESCALE_EPS or after < recipes.RESCALE_EPS:
        return 1.0
    return before / after


def method_ref(settings, tensor_name: str, base, *models):
    """(float64 result, float64 error scale S) of a merge method on flat arrays: the base and
    each model of settings.roles (the trio: domain, aligned), by the method's own oracle.

    S bounds the magnitude of every fp32 intermediate: a correct kernel is within (6 + n)u·S
    for n models, plus half an output spacing (method_error_bound)."""
    b = np.asarray(base, dtype=np.float64).ravel()
    xs = [np.asarray(x, dtype=np.float64).ravel() for x in models]
    return settings.spec.oracle(settings, tensor_name, b, xs)


def task_arithmetic_ref(s, b: np.ndarray, xs):
    """The MergeAlign formula b + w_d (d - b) + w_a (a - b) and its scale."""
    d, a = xs
    return combination((1.0 - s.w_domain - s.w_align, s.w_domain, s.w_align), (b, d, a), 1.0,
                       exact=b + s.w_domain * (d - b) + s.w_align * (a - b),
                       scale=np.abs(b) + np.abs(s.w_domain * (d - b)) + np.abs(s.w_align * (a - b)))


def task_vector_sum(b: np.ndarray, coefficients, taus):
    """b + Σ c_m τ_m and its scale."""
    return b + sum(c * t for c, t in zip(coefficients, taus)), \
        np.abs(b) + sum(np.abs(c * t) for c, t in zip(coefficients, taus))


def nearswap_ref(t: float, b: np.ndarray, d: np.ndarray):
    """NearSwap from its definition; the scale counts both products and w's own roundings
    (|d - b| and the division, 2u relative) times |d - b|."""
    distance = np.abs(d - b)
    w = np.clip(t / np.maximum(distance, geometry.NEAR_SWAP_EPS), 0.0, 1.0)
    return w * d + (1.0 - w) * b, np.abs(w * d) + np.abs((1.0 - w) * b) + w * distance


def multislerp_ref(s, b: np.ndarray, xs, on_models: bool):
    """Multi-SLERP as its definition states it: unit vectors, their normalized weighted mean,
    the tangent-space average, the exponential map back, the weighted mean norm.  The scale:
    each model's term at its coefficient (the fp32 kernel sums c_m·x_m), plus the base."""
    vectors = [x if on_models else x - b for x in xs]
    weights = np.asarray(s.weights, dtype=np.float64)
    if len(vectors) == 1:
        return xs[0], np.abs(xs[0])
    if s.normalize:
        weights = weights / weights.sum()
    norms = np.array([np.linalg.norm(v) for v in vectors])
    eps = s.own_value("eps")
    weighted_units = [w * v / (n + eps) for w, v, n in zip(weights, vectors, norms)]
    mean = sum(weighted_units) / np.linalg.norm(sum(weighted_units))
    tangent = sum(wu - np.dot(wu, mean) * mean for wu in weighted_units)
    angle = np.linalg.norm(tangent) + eps
    average_norm = np.dot(weights, norms)
    merged = (mean * np.cos(angle) + tangent * (np.sin(angle) / angle)) * average_norm
    origin = np.zeros_like(b) if on_models else b
    stretch = average_norm / np.linalg.norm(sum(weighted_units))  # c_m = stretch·w_m/‖x_m‖
    return origin + merged, np.abs(origin) + stretch * sum(np.abs(wu) for wu in weighted_units)


def karcher_ref(alphas, xs, max_iter: int, tol: float):
    """The weighted Karcher mean as its iteration states it, on the arrays themselves (the
    kernel applies coefficients found on the Gram matrix).  Scale: each model's term."""
    norms = [np.linalg.norm(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    share = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    units = {i: xs[i] / norms[i] for i in valid}
    mean = sum(share[i] * units[i] for i in valid)
    mean = mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            cos = np.clip(np.dot(mean, units[i]), -1.0, 1.0)
            theta = np.arccos(cos)
            if theta >= tol:
                tangent += share[i] * theta / np.sin(theta) * (units[i] - cos * mean)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        mean = mean / np.linalg.norm(mean)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean, sum(np.abs(scale / norms[i] * xs[i]) for i in valid)


def combination(coefficients, arrays, divisor, exact=None, scale=None):
    if exact is None:
        exact = sum(c * x for c, x in zip(coefficients, arrays)) / divisor
        scale = sum(np.abs(c * x) for c, x in zip(coefficients, arrays)) / abs(divisor)
    return exact, scale


def slerp_ref(t: float, x: np.ndarray, y: np.ndarray):
    """(c_x, c_y) with slerp from x (t = 0) to y (t = 1) = c_x·x + c_y·y, from the definition:
    the angle between the normalised vectors, linear interpolation when they are (nearly)
    collinear, a norm below the epsilon taken as 1 (mergekit's conventions)."""
    norms = [float(np.sqrt(v @ v)) for v in (x, y)]
    nx, ny = (n if n > geometry.SLERP_NORM_EPS else 1.0 for n in norms)
    cos = float(np.clip((x / nx) @ (y / ny), -1.0, 1.0))
    if abs(cos) > geometry.SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    angle = np.arccos(cos)
    return np.sin((1.0 - t) * angle) / np.sin(angle), np.sin(t * angle) / np.sin(angle)


def chipalign_ref(t: float, d: np.ndarray, a: np.ndarray):
    """(c_d, c_a) of ChipAlign from its definition: the geodesic between the unit-norm aligned
    and domain tensors at t, rescaled by the geometric mean ‖aligned‖^(1-t)·‖domain‖^t; a tensor
    without direction (zero norm) gives the linear blend."""
    na, nd = float(np.sqrt(a @ a)), float(np.sqrt(d @ d))
    if min(na, nd) <= geometry.SLERP_NORM_EPS:
        return t, 1.0 - t
    c_unit_a, c_unit_d = slerp_ref(t, a / na, d / nd)
    magnitude = na ** (1.0 - t) * nd ** t
    return magnitude * c_unit_d / nd, magnitude * c_unit_a / na


def nuslerp_ref(w_domain: float, w_align: float, x: np.ndarray, y: np.ndarray):
    """(c_x, c_y) of mergekit's nuslerp from x to y, t the second weight's share, from its
    definition: the angle of the normalised vectors (norms clamped up to 1e-7), the linear blend
    only when exactly collinear (1 - cos² <= 1e-16)."""
    total = w_align + w_domain
    t = 0.5 if abs(total) < 1e-6 else w_domain / total
    nx, ny = (max(float(np.sqrt(v @ v)), 1e-7) for v in (x, y))
    cos = float(np.clip((x / nx) @ (y / ny), -1.0, 1.0))
    if 1.0 - cos * cos <= 1e-16:
        return 1.0 - t, t
    angle = np.arccos(cos)
    return np.sin((1.0 - t) * angle) / np.sin(angle), np.sin(t * angle) / np.sin(angle)


def model_stock_ref(b, xs):
    """Model Stock from its definition: t = n·c / (1 + (n-1)·c), c the mean cosine of the
    task vectors' pairs (norm products clamped up to 1e-6); (1-t)·base + t·mean."""
    taus = [x - b for x in xs]
    cosines = [float(np.clip(taus[i] @ taus[j] / max(np.sqrt(taus[i] @ taus[i])
                                                      * np.sqrt(taus[j] @ taus[j]), 1e-6),
                             -1.0, 1.0))
               for i in range(len(taus)) for j in range(i + 1, len(taus))]
    n = len(xs)
    c = sum(cosines) / len(cosines)
    t = 0.0 if abs(1 + (n - 1) * c) < 1e-6 else n * c / (1 + (n - 1) * c)
    return combination((1.0 - t, *[t / n] * n), (b, *xs), 1.0)


def vectors_ref(s, tensor_name, b, xs):
    weights, densities = list(s.weights), list(s.densities)
    b32 = b.astype(np.float32)
    terms32, terms64, scales = [], [], []
    for x, weight, density, gamma, role in zip(xs, weights, densities, s.gammas, s.roles):
        tau32 = x.astype(np.float32) - b32
        key = recipes.stream_key(s.seed, tensor_name, role)
        kept = _kept(tau32, density, s.sparsify, key, gamma)
        factor = _rescale_factor(tau32, kept, density, s.rescale, s.sparsify)
        f32 = np.float32(factor)
        terms32.append(np.where(kept, (tau32 * f32) * np.float32(weight), np.float32(0)))
        terms64.append(np.where(kept, tau32.astype(np.float64) * factor * weight, 0.0))
        scales.append(np.abs(terms64[-1]))
    if s.sign_election:
        total32 = terms32[0]
        for t in terms32[1:]:  # the fp32 sum in model order elects the sign, as in the kernel
            total32 = total32 + t
        up = total32 >= 0
        agree = [np.where(up, t > 0, t < 0) for t in terms32]
        mixed = sum(np.where(k, t, 0.0) for k, t in zip(agree, terms64))
        divisor = sum(np.where(k, w, 0.0) for k, w in zip(agree, weights))
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(terms64)
        total = sum(weights)
        divisor = total if abs(total) >= recipes.DIVISOR_EPS else 1.0
    if not s.normalize:
        divisor = 1.0
    exact = b + s.lambda_ * mixed / divisor
    # τ in fp32 is itself rounded: its error (u|x - b|) is part of what the kernel may show.
    tau_error = sum(np.abs(x - b) * abs(w) for x, w in zip(xs, weights))
    scale = np.abs(b) + abs(s.lambda_) * (sum(scales) + tau_error) / np.abs(divisor)
    return exact, scale


def method_error_bound(exact: np.ndarray, scale: np.ndarray, out_dtype: DType,
                       model_count: int = 2) -> np.ndarray:
    """(6 + n)u·S of fp32 evaluation for n models, plus half the output spacing (see
    merge_error_bound).  Per term its roundings (τ·scale, ·weight, the two coefficients' fp32
    roundings) stay within 4u of the term, |terms| summing to at most S; the n - 1 additions,
    the division, the λ product and the base's addition each add at most u·S.  (τ's own
    rounding is in S.)  Two models: 8u·S."""
    fp32_error = (6 + model_count) * FP32_UNIT_ROUNDOFF * scale
    return fp32_error + 0.5 * spacing(np.abs(exact) + fp32_error, out_dtype)


def della_ref(s, tensor_name: str, shape, base: np.ndarray, models) -> tuple:
    """DELLA (della.py) in float64 on whole flat arrays, from the method's statement: ranks by
    a stable argsort of |τ| along each line, p in float64, numpy's draws; and the scale of the
    merge's fp32 evaluation (|base| + |λ|·Σ|terms| / |divisor|: every rounding of the merge is
    of a value at most that)."""
    from ..windows.della import line_shape

    length, stride = line_shape(shape)
    taus = [np.asarray(x, np.float64) - base for x in models]
    terms = []
    for m, tau in enumerate(taus):
        density, epsilon = s.densities[m], s.epsilons[m]
        lines = np.abs(tau.astype(np.float32)).reshape(-1, length, stride)
        ranks = np.empty(lines.shape)
        np.put_along_axis(ranks, np.argsort(lines, axis=1, kind="stable"),
                          np.arange(length, dtype=np.float64)[None, :, None]
                          * np.ones(lines.shape), axis=1)
        p = (density - epsilon) + ranks.reshape(-1) / max(1, length - 1) * 2 * epsilon
        key = recipes.stream_key(s.seed, tensor_name, s.roles[m])
        keep = random_draw24(key[0], key[1], np.arange(tau.size)) < np.rint(
            p * recipes.DRAW_RANGE)
        keep = np.full(tau.shape, density >= 1.0) if not 0.0 < density < 1.0 else keep
        factor = 1.0
        if s.rescale == "l1" and 0.0 < density < 1.0:
            before, after = np.abs(tau).sum(), np.abs(tau[keep]).sum()
            if before >= recipes.RESCALE_EPS and after >= recipes.RESCALE_EPS:
                factor = before / after
        terms.append(s.weights[m] * factor * tau * keep)
    terms = np.stack(terms)
    weights = np.array(s.weights)[:, None]
    agrees = np.ones(terms.shape, dtype=bool)
    if s.sign_election:
        agrees = np.sign(terms) == np.where(terms.sum(axis=0) >= 0, 1.0, -1.0)
        divisor = (weights * agrees).sum(axis=0)
        divisor[divisor == 0] = 1.0
    else:
        divisor = weights.sum() if abs(weights.sum()) >= recipes.DIVISOR_EPS else 1.0
    if not s.normalize:
        divisor = 1.0
    total = (terms * agrees).sum(axis=0) / divisor
    magnitude = np.abs(terms).sum(axis=0) / np.abs(divisor)
    return base + s.lambda_ * total, np.abs(base) + abs(s.lambda_) * magnitude
