"""The native Recipe of a tensor (csrc/merge_operands.h) and the pieces method modules build
theirs from: weighted sums of the models or task vectors, and the generalized task arithmetic
of TIES, DARE and Model Breadcrumbs (trim, drop or band each task vector, rescale, elect a
sign, divide by the agreeing weights).

The magnitude threshold is the k-th largest |τ| (k = max(1, int(density·n)), mergekit's count),
found by a two-pass 16-bit radix selection in the native kernel instead of a sort.  Exactly k
elements are kept: of the elements tied with the threshold (common in bf16 models), the first
in index order (mergekit keeps an arbitrary subset of them: torch's argsort is not stable).
DARE's mask is a counter-based draw keyed by (seed, tensor name, model, element index): the
same seed gives the same model on any thread count or chunking.  Rescale "l1" (mergekit's
default) scales the kept elements so the tensor's L1 norm is unchanged; "inverse_density" is
the DARE paper's 1/p; "none" keeps them as they are.
"""

from __future__ import annotations

import hashlib
from typing import Tuple

from .spec import KEEP_ALL, KEEP_BAND, KEEP_LARGEST, KEEP_RANDOM, MODELS, VECTORS

# kKeepLargest threshold no |τ| reaches: |τ|'s bits are at most 0x7fffffff (a NaN).
KEEP_NONE_BITS = 0x80000000
# last_tie_index that keeps every tie (INT64_MAX), and tie bits no |τ| has (skips a model).
ALL_TIES = 2**63 - 1
NO_TIE_BITS = 0xFFFFFFFF
# Draws are 24-bit: keep_below = density · 2^24.
DRAW_RANGE = 1 << 24
# mergekit: norms below this leave a tensor unrescaled (rescaled_masked_tensor's eps) ...
RESCALE_EPS = 1e-7
# ... a summed weight below this is not divided by (generalized task arithmetic) ...
DIVISOR_EPS = 1e-8


def tensor_recipe(native, s, tensor_name: str, count: int, passes):
    """The native Recipe of one tensor under resolved settings (TensorSettings; runs the
    passes it needs: a TensorPasses)."""
    return s.spec.recipe(native, s, tensor_name, count, passes)


def set_recipe(native, s, tensor_name: str, count: int, passes):
    """The native SetRecipe of one tensor of a base and a set of models (a SetPasses)."""
    return s.spec.set_recipe(native, s, tensor_name, count, passes)


def stream_key(seed: int, tensor_name: str, role: str) -> Tuple[int, int]:
    """The (lo, hi) 32-bit key of a model's random stream in one tensor."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def keep_count(density: float, count: int) -> int:
    """Elements a magnitude trim keeps: mergekit's max(1, int(density·n))."""
    return max(1, int(density * count))


def term_key(term) -> tuple:
    return (term.sparsify, term.min_magnitude_bits, term.last_tie_index,
            term.drop_magnitude_bits, term.drop_last_tie_index, term.keep_below, term.key_lo,
            term.key_hi)



def stock_recipe(recipe, terms, t: float):
    """(1 - t)·base + t·mean(models) as a weighted sum of the models."""
    recipe.kind = MODELS
    recipe.base_weight = 1.0 - t
    for term in terms:
        term.weight = t / len(terms)
    return recipe


def linear_divisor(recipe, s):
    recipe.base_weight = s.w_base
    recipe.divisor = s.w_base + sum(s.weights) if s.normalize else 1.0
    return recipe


def weights_recipe(recipe, kind: int, w_domain: float, w_align: float):
    recipe.kind = kind
    recipe.domain.weight = w_domain
    recipe.align.weight = w_align
    return recipe



def vectors_recipe(recipe, terms, s, tensor_name: str, count: int, passes):
    """TIES / DARE / RESTA / task arithmetic over the models' terms (a Recipe's domain and
    align, or a SetRecipe's terms); `passes` gives thresholds(wanted) and l1(terms)."""
    recipe.kind = VECTORS
    recipe.sign_election = int(s.sign_election)
    recipe.normalize = int(s.normalize)
    recipe.lambda_ = s.lambda_
    weights, densities = list(s.weights), list(s.densities)
    for term, weight in zip(terms, weights):
        term.weight = weight
    total = 0.0
    for weight in weights:
        total += weight
    recipe.divisor = total if abs(total) >= DIVISOR_EPS else 1.0
    if s.sparsify == KEEP_LARGEST:
        wanted = [keep_count(d, count) if 0.0 < d < 1.0 else None for d in densities]
        for term, density, threshold in zip(terms, densities, passes.thresholds(wanted)):
            _trim(term, density, threshold)
    elif s.sparsify == KEEP_RANDOM:
        for term, density, role in zip(terms, densities, s.roles):
            _drop(term, density, stream_key(s.seed, tensor_name, role))
    elif s.sparsify == KEEP_BAND:
        _bands(terms, densities, s.gammas, count, passes)
    _rescale(terms, densities, s.rescale, passes)
    return recipe


def _trim(term, density: float, threshold: Tuple[int, int]) -> None:
    if density >= 1.0:
        return
    term.sparsify = KEEP_LARGEST
    term.min_magnitude_bits, term.last_tie_index = threshold if density > 0.0 \
        else (KEEP_NONE_BITS, ALL_TIES)


def band_counts(density: float, gamma: float, count: int) -> Tuple[int, int]:
    """(k_keep, k_drop) of Model Breadcrumbs as mergekit counts them: of the elements ordered by
    |τ|, the largest k_keep are kept less the largest k_drop: int(density·n) kept, the γ·n
    largest dropped unless fewer would be left than that."""
    kept = int(density * count)
    below = max(0, count - kept - int(gamma * count))
    return count - below, count - below - kept


def _bands(terms, densities, gammas, count: int, passes) -> None:
    counts = [band_counts(d, g, count) if d < 1.0 else None for d, g in zip(densities, gammas)]
    keep = passes.thresholds([c[0] if c and c[0] > 0 else None for c in counts])
    drop = passes.thresholds([c[1] if c and c[1] > 0 else None for c in counts])
    for term, band, kept, dropped in zip(terms, counts, keep, drop):
        if band is None:
            continue
        if band[0] == band[1]:  # nothing in the band
            term.sparsify, term.min_magnitude_bits = KEEP_LARGEST, KEEP_NONE_BITS
            continue
        term.sparsify = KEEP_BAND
        term.min_magnitude_bits, term.last_tie_index = kept
        if band[1] > 0:
            term.drop_magnitude_bits, term.drop_last_tie_index = dropped


def _drop(term, density: float, key: Tuple[int, int]) -> None:
    if density >= 1.0:
        return
    term.sparsify = KEEP_RANDOM
    term.keep_below = int(round(density * DRAW_RANGE))
    term.key_lo, term.key_hi = key


def _rescale(terms, densities, rescale: str, passes) -> None:
    active = [t.sparsify != KEEP_ALL for t in terms]
    if rescale == "none" or not any(active):
        return
    if rescale == "inverse_density":
        for term, density, on in zip(terms, densities, active):
            if on and density > 0.0:
                term.scale = 1.0 / density
        return
    for term, on, (before, after) in zip(terms, active, passes.l1(terms)):
        if on and before >= RESCALE_EPS and after >= RESCALE_EPS:
            term.scale = before / after
