"""The scalar formulas behind the geodesic and averaging methods: the coefficients of a
weighted sum of the models (or task vectors) from their norms and dot products (fp64), with
mergekit's epsilons.  A method module turns them into a Recipe (methods/core/recipes.py)."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple


# ... and SLERP treats norms below this as 1 and |cos| above this as collinear (linear blend).
SLERP_NORM_EPS = 1e-8
SLERP_DOT_THRESHOLD = 0.9995
# nuslerp's own: norms clamped up to this, collinear when 1 - cos² <= NUSLERP_EPS², and t = 1/2
# when the two weights sum to less than NUSLERP_WEIGHT_EPS in magnitude.
NUSLERP_NORM_EPS = 1e-7
NUSLERP_EPS = 1e-8
NUSLERP_WEIGHT_EPS = 1e-6
# Model Stock: norm products clamped up to this; a denominator below it keeps the base.
MODEL_STOCK_EPS = 1e-6
# NearSwap's floor on |domain - base| (csrc/merge_operands.h kNearSwapEps; mergekit's).
NEAR_SWAP_EPS = 1e-6
# Multi-SLERP: added to each norm before dividing by it, and the least norm of the weighted
# mean of the unit vectors (mergekit's eps).
MULTISLERP_EPS = 1e-8
# Karcher mean: mergekit's defaults (max_iter, tol): at most this many steps, stopping when the
# tangent step is shorter than the tolerance; norms at most the tolerance leave a model out.
KARCHER_STEPS = 10
KARCHER_TOL = 1e-5


def slerp_coefficients(t: float, xx: float, yy: float, xy: float) -> Tuple[float, float]:
    """(c_x, c_y) with slerp(x, y, t) = c_x·x + c_y·y, from Σx², Σy², Σxy (mergekit's formula:
    angle of the normalised vectors, linear blend when nearly collinear)."""
    nx = math.sqrt(xx)
    ny = math.sqrt(yy)
    nx = nx if nx > SLERP_NORM_EPS else 1.0
    ny = ny if ny > SLERP_NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, xy / (nx * ny)))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    return _arc_coefficients(t, dot)


def _arc_coefficients(t: float, cos: float) -> Tuple[float, float]:
    """(c_x, c_y) of the point at t along the great arc from x to y, at angle acos(cos)."""
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def chipalign_coefficients(t: float, dd: float, aa: float, da: float) -> Tuple[float, float]:
    """(c_d, c_a) with ChipAlign = c_d·domain + c_a·aligned: the slerp of the unit tensors
    aligned/‖aligned‖ -> domain/‖domain‖ at t, scaled to ‖aligned‖^(1-t)·‖domain‖^t.  A zero
    tensor has no direction: then it is the linear blend (1-t)·aligned + t·domain."""
    nd, na = math.sqrt(dd), math.sqrt(aa)
    if nd <= SLERP_NORM_EPS or na <= SLERP_NORM_EPS:
        return t, 1.0 - t
    c_a, c_d = slerp_coefficients(t, 1.0, 1.0, da / (nd * na))
    scale = na ** (1.0 - t) * nd ** t
    return scale * c_d / nd, scale * c_a / na


def nuslerp_coefficients(t: float, xx: float, yy: float, xy: float) -> Tuple[float, float]:
    """(c_x, c_y) with nuslerp(x, y, t) = c_x·x + c_y·y from Σx², Σy², Σxy: slerp_coefficients
    with mergekit nuslerp's epsilons (norms clamped, collinear only when 1 - cos² <= eps²)."""
    nx = max(math.sqrt(xx), NUSLERP_NORM_EPS)
    ny = max(math.sqrt(yy), NUSLERP_NORM_EPS)
    cos = min(1.0, max(-1.0, xy / (nx * ny)))
    if 1.0 - cos * cos <= NUSLERP_EPS ** 2:
        return 1.0 - t, t
    return _arc_coefficients(t, cos)


def nuslerp_t(w_domain: float, w_align: float) -> float:
    """nuslerp's t from the two weights: the share of the second model (our domain)."""
    total = w_align + w_domain
    return 0.5 if abs(total) < NUSLERP_WEIGHT_EPS else w_domain / total


def model_stock_t(cosines: Sequence[float], count: int) -> float:
    """Model Stock's interpolation factor from the task vectors' pairwise cosines."""
    cos = sum(cosines) / len(cosines)
    denominator = 1.0 + (count - 1) * cos
    return 0.0 if abs(denominator) < MODEL_STOCK_EPS else count * cos / denominator


def multislerp_coefficients(weights: Sequence[float], gram: Sequence[Sequence[float]],
                            normalize: bool, eps: float = MULTISLERP_EPS) -> List[float]:
    """c_m with Multi-SLERP = [base +] Σ c_m x_m, from the Gram matrix of the x_m (Σ x_i·x_j).

    mergekit projects the unit vectors onto the tangent space at their normalized weighted mean,
    averages there and maps back; the tangent vectors' weighted sum is zero (each unit vector's
    component along the mean, weighted, sums to the mean's norm), so the result is the mean
    direction at the weighted mean norm — a weighted sum of the x_m.  One model is itself; a
    weighted mean of norm below eps is the weighted sum for two models (mergekit's fallback), an
    error for more.  `eps` (mergekit's, 1e-8) keeps the divisions finite."""
    n = len(weights)
    if n == 1:
        return [1.0]
    total = math.fsum(weights)
    w = [x / total for x in weights] if normalize else list(weights)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    a = [w[i] / (norms[i] + eps) for i in range(n)]
    mean_norm = math.sqrt(max(math.fsum(a[i] * a[j] * gram[i][j]
                                        for i in range(n) for j in range(n)), 0.0))
    if mean_norm < eps:
        if n == 2:
            return w
        raise ValueError("multislerp: the weighted mean of the unit task vectors is zero "
                         "(antipodal models whose weights cancel): change the weights")
    average_norm = math.fsum(w[i] * norms[i] for i in range(n))
    return [a[i] * average_norm / mean_norm for i in range(n)]


def karcher_coefficients(gram: Sequence[Sequence[float]], alphas: Sequence[float],
                         max_iter: int = KARCHER_STEPS, tol: float = KARCHER_TOL) -> List[float]:
    """c with the Karcher mean = Σ c_m x_m, from the Gram matrix of the models x_m: mergekit's
    iteration (weighted mean of the unit vectors, then exponential-map steps along the
    weighted sum of the log maps), run on coefficient vectors — every iterate is a combination
    of the unit vectors, so x·y = c_x·G·c_y — in float64."""
    n = len(alphas)
    g = [[float(v) for v in row] for row in gram]

    def dot(p, q):
        return math.fsum(p[i] * g[i][j] * q[j] for i in range(n) for j in range(n))

    def axpy(a, p, q):  # a·p + q
        return [a * x + y for x, y in zip(p, q)]

    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = math.fsum(alphas[i] for i in valid)
    share = {i: alphas[i] / total for i in valid}
    units = {i: [1.0 / norms[i] if k == i else 0.0 for k in range(n)] for i in valid}
    mean = [0.0] * n
    for i in valid:
        mean = axpy(share[i], units[i], mean)
    length = math.sqrt(max(dot(mean, mean), 0.0))
    mean = list(units[valid[0]]) if length < tol else [x / length for x in mean]
    for _ in range(max_iter):
        tangent = [0.0] * n
        for i in valid:
            cos = min(1.0, max(-1.0, dot(mean, units[i])))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent = axpy(share[i] * theta / math.sin(theta), axpy(-cos, mean, units[i]),
                           tangent)
        step = math.sqrt(max(dot(tangent, tangent), 0.0))
        if step < tol:
            break
        mean = axpy(math.cos(step), mean, [math.sin(step) / step * x for x in tangent])
        length = math.sqrt(max(dot(mean, mean), 0.0))
        if length > tol:
            mean = [x / length for x in mean]
    scale = math.fsum(a * r for a, r in zip(alphas, norms))
    return [scale * x for x in mean]


def pair_cosine(xx: float, yy: float, xy: float) -> float:
    """cos of two task vectors from Σx², Σy², Σxy, Model Stock's clamp of the norm product."""
    return min(1.0, max(-1.0, xy / max(math.sqrt(xx) * math.sqrt(yy), MODEL_STOCK_EPS)))

