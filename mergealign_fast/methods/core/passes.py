"""Reductions over one tensor's inputs, run by the native kernel for the recipes that need
them: the trio's norms and dot products, magnitude thresholds by a two-pass 16-bit radix
selection (exactly k kept, ties in index order), l1 norms under a recipe's masks; and the same
for a base and a set of models, pair by pair."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .geometry import pair_cosine
from .recipes import ALL_TIES, NO_TIE_BITS, term_key

class TensorPasses:
    """Reductions over one tensor's three inputs, for the recipes that need them.

    `windows()` yields the tensor in windows, each a pair (native Operands, release callback);
    each result is computed once and cached, so the recipes of a sweep share the passes."""

    def __init__(self, native, windows, threads: int):
        self.native = native
        self.windows = windows
        self.threads = threads
        self._cache: Dict[tuple, object] = {}

    def _each(self, call) -> None:
        for ops, release in self.windows():
            call(ops)
            release()

    def _summed(self, size: int, call) -> List[float]:
        """Element-wise sums over the windows of the `size`-tuples call(ops) returns for each
        (zeros for a tensor without elements, which has no windows)."""
        sums = [0.0] * size

        def add(ops):
            for i, value in enumerate(call(ops)):
                sums[i] += value

        self._each(add)
        return sums

    def _stats(self, models: bool) -> List[float]:
        """The native vector_stats summed over the windows (models: of the models)."""
        key = ("stats", models)
        if key not in self._cache:
            self._cache[key] = self._summed(11, lambda ops: self.native.vector_stats(
                ops, self.threads, models))
        return self._cache[key]

    def vector_stats(self, models: bool) -> Tuple[float, ...]:
        """(Στ_d², Στ_a², Στ_d·τ_a) of the task vectors, or with models=True
        (Σdomain², Σaligned², Σdomain·aligned) of the models themselves; fp64."""
        sums = self._stats(models)
        return tuple(sums[5:8] if models else sums[0:3])

    def model_gram(self) -> List[List[float]]:
        """Σ x·y of every pair of the models base, domain, aligned (in that order); fp64."""
        dd, aa, da, bb, bd, ba = self._stats(models=True)[5:11]
        return [[bb, bd, ba], [bd, dd, da], [ba, da, aa]]

    def magnitude_thresholds(self, k_domain: Optional[int],
                             k_align: Optional[int]) -> Tuple[Tuple[int, int], ...]:
        """Per model, (fp32 bits of the k-th largest |τ|, index of the last tie to keep): the
        elements above the threshold plus the first ties in index order make exactly k.
        (0, ALL_TIES) where not needed or the tensor has fewer than k elements."""
        key = ("threshold", k_domain, k_align)
        if key not in self._cache:
            ks = (k_domain, k_align)
            # magnitude_histogram's prefixes: the top 16 bits of |τ|, then the low 16 bits of
            # the elements in the selected top bin; SKIP leaves a model out.
            high_bits, skip = self.native.HISTOGRAM_HIGH_BITS, self.native.HISTOGRAM_SKIP
            high = self._histogram([high_bits if k else skip for k in ks])
            picks = [self.native.select_kth_largest(high, m, k) if k else (-1, 0)
                     for m, k in enumerate(ks)]
            low = self._histogram([bin_ if bin_ >= 0 else skip for bin_, _ in picks])
            found = [(0, ALL_TIES), (0, ALL_TIES)]
            ties_wanted = [0, 0]
            for m, (k, (bin_, above)) in enumerate(zip(ks, picks)):
                if not k or bin_ < 0:  # not needed, or fewer than k elements: keep all
                    continue
                low_bin, above_low = self.native.select_kth_largest(low, m, k - above)
                tied = self._bin_count(low, m, low_bin)
                found[m] = ((bin_ << 16) | low_bin, ALL_TIES)
                wanted = k - above - above_low
                ties_wanted[m] = wanted if wanted < tied else 0
            self._cache[key] = self._last_ties(found, ties_wanted)
        return self._cache[key]

    def thresholds(self, wanted: Sequence[Optional[int]]) -> Tuple[Tuple[int, int], ...]:
        """magnitude_thresholds of each model's wanted count (None: not needed)."""
        return self.magnitude_thresholds(*wanted)

    def l1(self, terms) -> List[Tuple[float, float]]:
        """Per model, (‖τ‖₁, ‖kept τ‖₁) under its term's mask."""
        recipe = self.native.Recipe()
        recipe.domain, recipe.align = terms
        norms = self.l1_norms(recipe)
        return [(norms[0], norms[1]), (norms[2], norms[3])]

    def _last_ties(self, found, wanted) -> Tuple[Tuple[int, int], ...]:
        """`found` with the index of the wanted[m]-th tie (index order) where wanted[m] > 0."""
        found = list(found)
        bits = [b if w else NO_TIE_BITS for (b, _), w in zip(found, wanted)]
        remaining = list(wanted)
        for ops, release in self.windows():
            if not any(remaining):
                break
            counts = self.native.count_magnitude_ties(ops, bits[0], bits[1], self.threads)
            for m in (0, 1):
                if remaining[m] and counts[m] >= remaining[m]:
                    index = self.native.nth_magnitude_tie(ops, m, bits[m], remaining[m])
                    found[m] = (found[m][0], index)
                    remaining[m] = 0
                elif remaining[m]:
                    remaining[m] -= counts[m]
            release()
        return tuple(found)

    def _histogram(self, prefixes) -> bytearray:
        """int64[2][HISTOGRAM_BINS] counts of |τ|'s bits (see magnitude_histogram)."""
        hist = bytearray(2 * self.native.HISTOGRAM_BINS * 8)
        if all(p == self.native.HISTOGRAM_SKIP for p in prefixes):
            return hist
        self._each(lambda ops: self.native.magnitude_histogram(ops, prefixes[0], prefixes[1],
                                                               hist, self.threads))
        return hist

    def _bin_count(self, hist: bytearray, row: int, bin_: int) -> int:
        start = (row * self.native.HISTOGRAM_BINS + bin_) * 8
        return int.from_bytes(hist[start:start + 8], "little")

    def l1_norms(self, recipe) -> Tuple[float, float, float, float]:
        """(‖τ_d‖₁, ‖kept τ_d‖₁, ‖τ_a‖₁, ‖kept τ_a‖₁) under the recipe's masks."""
        key = ("l1",) + tuple(term_key(t) for t in (recipe.domain, recipe.align))
        if key not in self._cache:
            self._cache[key] = tuple(self._summed(
                4, lambda ops: self.native.sparsity_stats(ops, recipe, self.threads)))
        return self._cache[key]


class SetPasses:
    """The reductions of a base and any number of models, through the trio's passes: models
    2p and 2p+1 are the domain and aligned of pair p's TensorPasses (an odd last model is
    paired with itself).  `pair_windows(i, j)` yields the windows of base, model i, model j."""

    def __init__(self, native, pair_windows, model_count: int, threads: int):
        self.model_count = model_count
        self.native, self.pair_windows, self.threads = native, pair_windows, threads
        self.pairs = [TensorPasses(native, lambda i=i: pair_windows(i, min(i + 1,
                                                                          model_count - 1)),
                                   threads) for i in range(0, model_count, 2)]

    def _of_pair(self, i: int, j: int) -> TensorPasses:
        return TensorPasses(self.native, lambda: self.pair_windows(i, j), self.threads)

    def gram(self) -> List[List[float]]:
        """Σ τ_i·τ_j of every pair of task vectors (fp64), one pass per pair."""
        n = self.model_count
        found = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                found[i][i], found[j][j], found[i][j] = \
                    self._of_pair(i, j).vector_stats(models=False)
                found[j][i] = found[i][j]
        return found

    def model_gram(self) -> List[List[float]]:
        """Σ x·y of every pair of the base and the models, base first (fp64), one pass per pair
        of models (each gives the base's products too)."""
        n = self.model_count
        found = [[0.0] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            for j in range(i + 1, n):
                pair = self._of_pair(i, j).model_gram()  # base, model i, model j
                at = (0, i + 1, j + 1)
                for row, p in enumerate(at):
                    for column, q in enumerate(at):
                        found[p][q] = pair[row][column]
        return found

    def cosines(self) -> List[float]:
        """The cosine of every pair of task vectors (Model Stock)."""
        g = self.gram()
        return [pair_cosine(g[i][i], g[j][j], g[i][j]) for i in range(self.model_count)
                for j in range(i + 1, self.model_count)]

    @staticmethod
    def _by_pair(values: Sequence, pad) -> List[Tuple]:
        """values two by two; an odd last one paired with `pad` (what the self-pair's second
        model asks for)."""
        padded = list(values) + [pad] * (len(values) % 2)
        return [tuple(padded[i:i + 2]) for i in range(0, len(padded), 2)]

    def thresholds(self, wanted: Sequence[Optional[int]]) -> Tuple[Tuple[int, int], ...]:
        found = [t for passes, pair in zip(self.pairs, self._by_pair(wanted, None))
                 for t in passes.thresholds(pair)]
        return tuple(found[:self.model_count])

    def l1(self, terms) -> List[Tuple[float, float]]:
        found = [n for passes, pair in zip(self.pairs, self._by_pair(terms, terms[-1]))
                 for n in passes.l1(pair)]
        return found[:self.model_count]


