"""Methods applied vector by vector instead of to the whole tensor: mergekit's nuslerp with
`nuslerp_flatten: false` (each row, or with `nuslerp_row_wise: true` each column) and Model
Stock with `filter_wise: true` (each row).

A row is the last dimension (mergekit's dim=-1: `rows` of a (prod(shape[:-1]), shape[-1])
view), a column the first (dim=0: `columns` of a (shape[0], prod(shape[1:])) view); a 1-D tensor
is one vector either way.  Element i of a window belongs to vector i // width (rows) or
i % width (columns), so windows need not follow rows.

The merge is two passes over the window stream, memory bounded as every pass: one sums, per
vector in float64, Σx², Σy² and Σxy of the two task vectors (or models); then each vector's
coefficients (c_b, c_d, c_a) come from the scalar formulas of methods.py, and each window's
inputs are scaled into fp32 arrays b' = c_b·b, d' = c_d·(d - b), a' = c_a·(a - b) (task
vectors) or c·x (models), which the native kernel sums as a linear merge with weights 1:
(b' + d') + a', the roundings of the whole-tensor kernel's (base + w_d·τ_d) + w_a·τ_a.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .dtypes import DType, bf16_bits_to_f32, f32_to_bf16_bits, storage_numpy_dtype
from .methods import TensorSettings, model_stock_t, nuslerp_coefficients, nuslerp_t, pair_cosine
from .kernels import cpu
from .stream import Chunk, InputChanged

# Elements per window: the scaled fp32 inputs, each element's vector index and coefficients
# take ~50 bytes an element, so 1 Mi elements keep a window's memory near 50 MB.
WINDOW_ELEMENTS = 1 << 20
# Each vector's statistics on the task vectors (τ = model - base) or on the models themselves.
ON_MODELS = ("nuslerp_models",)


def vector_layout(shape: Sequence[int], vectors: str) -> Tuple[int, bool]:
    """(width, by_row): vector of element i is i // width (rows) or i % width (columns)."""
    if vectors == "rows":
        return int(shape[-1]), True
    return int(np.prod(shape[1:], dtype=np.int64)), False


def vector_count(shape: Sequence[int], vectors: str) -> int:
    width, by_row = vector_layout(shape, vectors)
    total = int(np.prod(shape, dtype=np.int64))
    return total // width if by_row else width


def _keys(start: int, count: int, width: int, by_row: bool) -> np.ndarray:
    index = np.arange(start, start + count, dtype=np.int64)
    return index // width if by_row else index % width


def _decoded(chunk: Chunk) -> List[np.ndarray]:
    """The chunk's inputs as float32 arrays (exact; rounded first through the input cast, as
    the kernel rounds them).  Copied out of the mapping under the kernel's SIGBUS guard, so an
    input truncated under the merge is InputChanged, not a killed process."""
    native, values = cpu.native(), []
    for (mapped, offset, length), dtype in zip(chunk.inputs, chunk.dtypes):
        raw = np.empty(length // dtype.itemsize, dtype=storage_numpy_dtype(dtype))
        if native.copy_guarded(raw.ctypes.data, mapped.address + offset, length):
            raise InputChanged("an input changed while it was being read (truncated or "
                               "rewritten under the merge)")
        x = bf16_bits_to_f32(raw) if dtype is DType.BF16 else raw.astype(np.float32)
        values.append(_cast(x, chunk.input_cast))
    return values


def _cast(x: np.ndarray, input_cast: int) -> np.ndarray:
    if input_cast == int(DType.BF16):
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    if input_cast == int(DType.F16):
        return x.astype(np.float16).astype(np.float32)
    return x


def _pair(s: TensorSettings, values: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(domain's, aligned's) vectors the statistics are taken on, in float64."""
    b, d, a = (v.astype(np.float64) for v in values)
    if s.name in ON_MODELS:
        return d, a
    return d - b, a - b


def vector_sums(s: TensorSettings, shape: Sequence[int], windows: Iterator[Chunk]
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vector (Σ d², Σ a², Σ d·a) in float64, over the windows of one pass (in order, one
    thread: the same sums on any machine)."""
    width, by_row = vector_layout(shape, s.vectors)
    n = vector_count(shape, s.vectors)
    dd, aa, da = np.zeros(n), np.zeros(n), np.zeros(n)
    for chunk in windows:
        d, a = _pair(s, _decoded(chunk))
        keys = _keys(chunk.start, chunk.count, width, by_row)
        dd += np.bincount(keys, weights=d * d, minlength=n)
        aa += np.bincount(keys, weights=a * a, minlength=n)
        da += np.bincount(keys, weights=d * a, minlength=n)
        chunk.release_inputs()
    return dd, aa, da


def vector_coefficients(s: TensorSettings, sums) -> np.ndarray:
    """(n, 3) float32: each vector's (c_b, c_d, c_a), from the scalar formulas of methods.py."""
    dd, aa, da = sums
    out = np.empty((len(dd), 3), dtype=np.float64)
    if s.name == "model_stock":
        for v in range(len(dd)):
            t = model_stock_t([pair_cosine(dd[v], aa[v], da[v])], 2)
            out[v] = (1.0 - t, t / 2, t / 2)
    else:
        t = nuslerp_t(s.w_domain, s.w_align)
        base = 0.0 if s.name in ON_MODELS else 1.0
        for v in range(len(dd)):
            c_a, c_d = nuslerp_coefficients(t, aa[v], dd[v], da[v])
            out[v] = (base, c_d, c_a)
    return out.astype(np.float32)


class ScaledInput:
    """One input of a chunk scaled vector by vector: fp32 memory of its own that a Chunk input
    needs (an address, a byte count, a release that drops the source pages once)."""

    def __init__(self, values: np.ndarray, source: Optional[Chunk]):
        self.values = values
        self.address = values.ctypes.data
        self._source = source

    def release(self, offset: int, length: int) -> None:
        if self._source is not None:
            self._source.release_inputs()
            self._source = None


def scaled_chunk(s: TensorSettings, shape: Sequence[int], coefficients: np.ndarray,
                 chunk: Chunk) -> Chunk:
    """The chunk with inputs b', d', a' (module docstring), read as fp32 by a linear merge of
    weights 1 (merge_recipe)."""
    width, by_row = vector_layout(shape, s.vectors)
    c = coefficients[_keys(chunk.start, chunk.count, width, by_row)]
    b, d, a = _decoded(chunk)
    f32 = np.float32
    if s.name in ON_MODELS:
        scaled = [np.zeros_like(b), c[:, 1] * d, c[:, 2] * a]
    elif s.name == "model_stock":
        scaled = [c[:, 0] * b, c[:, 1] * d, c[:, 2] * a]
    else:
        scaled = [b, c[:, 1] * (d - b), c[:, 2] * (a - b)]
    inputs = [ScaledInput(np.ascontiguousarray(x, dtype=f32), chunk if i == 0 else None)
              for i, x in enumerate(scaled)]
    return replace(chunk, inputs=tuple((x, 0, x.values.nbytes) for x in inputs),
                   dtypes=(DType.F32,) * 3, input_cast=-1)


def merge_recipe(native):
    """The native recipe that sums scaled inputs: (1·b' + 1·d') + 1·a', divided by 1."""
    recipe = native.Recipe()
    recipe.kind = 2  # kModels
    recipe.base_weight = 1.0
    recipe.domain.weight = 1.0
    recipe.align.weight = 1.0
    return recipe
