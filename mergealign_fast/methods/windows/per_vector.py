"""Methods applied vector by vector instead of to the whole tensor: mergekit's nuslerp with
`nuslerp_flatten: false` (each row, or with `nuslerp_row_wise: true` each column) and Model
Stock with `filter_wise: true` (each row).

A row is the last dimension (mergekit's dim=-1: `rows` of a (prod(shape[:-1]), shape[-1])
view), a column the first (dim=0: `columns` of a (shape[0], prod(shape[1:])) view); a 1-D tensor
is one vector either way.  Windows hold whole lines of width `line_width` (a row of the first
view, or of the second), so a window is a matrix: rows are summed along it, columns across it.

The merge is two passes over the window stream, memory bounded as every pass: one sums, per
vector in float64 (in index order: the same sums on any machine and thread count), Σx², Σy² and
Σxy of the two task vectors (or models); then each vector's coefficients (c_b, c_d, c_a) come
from the scalar formulas of the method (its spec's ByVectors), and each window's inputs are scaled into fp32 arrays
b' = c_b·b, d' = c_d·(d - b), a' = c_a·(a - b) (task vectors) or c·x (models), which the native
kernel sums as a linear merge with weights 1: (b' + d') + a', the roundings of the whole-tensor
kernel's (base + w_d·τ_d) + w_a·τ_a.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, List, Optional, Sequence, TYPE_CHECKING, Tuple

import numpy as np

from ...dtypes import DType, bf16_bits_to_f32, f32_to_bf16_bits, storage_numpy_dtype
from ...kernels import cpu
from ...io.stream import Chunk, HeldInput, InputChanged

if TYPE_CHECKING:  # annotations only: the settings module reads the registry
    from ..core.settings import TensorSettings

# Elements per window: a window's copies (stored, fp32, float64 differences and products,
# scaled fp32) take ~54 bytes an element, so 1 Mi elements keep them near 55 MB.
WINDOW_ELEMENTS = 1 << 20


def line_width(shape: Sequence[int], vectors: str) -> int:
    """Elements of one line of the matrix view a window is cut from."""
    return int(shape[-1]) if vectors == "rows" else int(np.prod(shape[1:], dtype=np.int64))


def window_elements(shape: Sequence[int], vectors: str) -> int:
    """Whole lines, about WINDOW_ELEMENTS of them."""
    width = line_width(shape, vectors)
    return max(1, WINDOW_ELEMENTS // width) * width


def vector_count(shape: Sequence[int], vectors: str) -> int:
    width = line_width(shape, vectors)
    return int(np.prod(shape, dtype=np.int64)) // width if vectors == "rows" else width


def _vectors_of(s: TensorSettings, shape, chunk: Chunk, coefficients: np.ndarray) -> np.ndarray:
    """The coefficient rows of the chunk's elements, shaped to broadcast over its matrix."""
    width = line_width(shape, s.vectors)
    if s.vectors == "rows":
        first = chunk.start // width
        return coefficients[first:first + chunk.count // width, None, :]
    return coefficients[None, :, :]


def quiet():
    """NaN and inf in the inputs flow through as in the kernel, without numpy's warnings."""
    return np.errstate(invalid="ignore", over="ignore")


class Workspace:
    """Arrays reused from window to window: allocating ~50 MB a window took fresh pages from
    the kernel each time (a tenth of a 1.1B merge's time was clear_page, more in faults).
    Held by the process once used (the largest window's size), reused by its next merge."""

    def __init__(self):
        self._arrays = {}

    def get(self, name: str, count: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        found = self._arrays.get(name)
        if found is None or found.dtype != dtype or found.size < count:
            found = self._arrays[name] = np.empty(count, dtype=dtype)
        return found[:count]


workspace = Workspace()


def decoded(chunk: Chunk, first: Optional[int] = None) -> List[np.ndarray]:
    """The chunk's inputs (the `first` ones only, when given) as float32 arrays (exact;
    rounded first through the input cast, as the kernel rounds them), in the workspace.
    Copied out of the mapping under the kernel's SIGBUS guard, so an input truncated under the
    merge is InputChanged, not a killed process."""
    native, values = cpu.native(), []
    wanted = list(zip(chunk.inputs, chunk.dtypes))[:first]
    for i, ((mapped, offset, length), dtype) in enumerate(wanted):
        raw = workspace.get(f"raw{i}", length // dtype.itemsize, storage_numpy_dtype(dtype))
        if native.copy_guarded(raw.ctypes.data, mapped.address + offset, length):
            raise InputChanged("an input changed while it was being read (truncated or "
                               "rewritten under the merge)")
        x = workspace.get(f"f32_{i}", chunk.count, np.float32)
        if dtype is DType.BF16:
            np.left_shift(raw, 16, out=x.view(np.uint32), dtype=np.uint32)
        else:
            x[:] = raw
        cast = chunk.input_cast not in (-1, int(dtype))  # stored as the cast's dtype: as is
        values.append(_cast(x, chunk.input_cast) if cast else x)
    return values


def task_vectors(chunk: Chunk) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The window's base and τ_m = fp32(model_m - base) (rounded once, as the kernel rounds
    it), in the workspace: valid until the next window."""
    base, *models = decoded(chunk)
    with quiet():
        return base, [np.subtract(x, base, out=workspace.get(f"tau{m}", chunk.count,
                                                                np.float32))
                      for m, x in enumerate(models)]


def _cast(x: np.ndarray, input_cast: int) -> np.ndarray:
    if input_cast == int(DType.BF16):
        x[:] = bf16_bits_to_f32(f32_to_bf16_bits(x))
    elif input_cast == int(DType.F16):
        x[:] = x.astype(np.float16)
    return x


def vector_sums(s: TensorSettings, shape: Sequence[int], windows: Iterator[Chunk]
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vector (Σ d², Σ a², Σ d·a) in float64, over the windows of one pass (windows of
    window_elements, in order).  Differences and products of fp32 values are exact in
    float64; each vector is summed in index order."""
    width = line_width(shape, s.vectors)
    sums = np.zeros((3, vector_count(shape, s.vectors)))
    for chunk in windows:
        b, d, a = decoded(chunk)
        x, y = (workspace.get(name, chunk.count, np.float64) for name in ("x64", "y64"))
        product = workspace.get("product", chunk.count, np.float64).reshape(-1, width)
        with quiet():
            if s.spec.vectors.on_models:
                x[:], y[:] = d, a
            else:
                np.subtract(d, b, out=x, dtype=np.float64)
                np.subtract(a, b, out=y, dtype=np.float64)
            for found, (p, q) in zip(sums, ((x, x), (y, y), (x, y))):
                np.multiply(p.reshape(-1, width), q.reshape(-1, width), out=product)
                if s.vectors == "rows":
                    first = chunk.start // width
                    found[first:first + len(product)] = product.sum(axis=1)
                else:
                    found += product.sum(axis=0)
        chunk.release_inputs()
    return sums[0], sums[1], sums[2]


def vector_coefficients(s: TensorSettings, sums) -> np.ndarray:
    """(n, 3) float32: each vector's (c_b, c_d, c_a), from the method's scalar formula."""
    dd, aa, da = sums
    coefficients = s.spec.vectors.coefficients
    out = np.empty((len(dd), 3), dtype=np.float64)
    for v in range(len(dd)):
        out[v] = coefficients(s, dd[v], aa[v], da[v])
    return out.astype(np.float32)


def held_chunk(chunk: Chunk, arrays: Sequence[np.ndarray]) -> Chunk:
    """`chunk` with fp32 arrays of its own as its inputs (the kernel reads them; releasing
    them drops the chunk's source pages once)."""
    touched = list(chunk.inputs)
    held = [HeldInput(x, DType.F32, touched) for x in arrays]
    return replace(chunk, inputs=tuple((x, 0, x.nbytes) for x in held),
                   dtypes=(DType.F32,) * len(held), input_cast=-1)


def result_chunk(chunk: Chunk, merged: np.ndarray) -> Chunk:
    """The chunk with inputs (its merged window in fp32, zeros, zeros): the kernel's linear
    merge of weights 1 (merge_recipe) rounds it to the output dtype once.  The methods merged
    in numpy (sce.py, della.py, ram.py, fusion.py) hand over their windows this way."""
    zeros = workspace.get("zeros", chunk.count, np.float32)
    zeros[:] = 0.0
    return held_chunk(chunk, [merged, zeros, zeros])


def scaled_chunk(s: TensorSettings, shape: Sequence[int], coefficients: np.ndarray,
                 chunk: Chunk) -> Chunk:
    """The chunk with inputs b', d', a' (module docstring) in the workspace, read as fp32 by a
    linear merge of weights 1 (merge_recipe); valid until the next window is scaled."""
    width = line_width(shape, s.vectors)
    c = _vectors_of(s, shape, chunk, coefficients)
    b, d, a = (x.reshape(-1, width) for x in decoded(chunk))
    out = [workspace.get(f"scaled{i}", chunk.count, np.float32).reshape(-1, width)
           for i in range(3)]
    form = s.spec.vectors.form
    with quiet():
        if form == "models_only":
            out[0][:] = 0.0
            np.multiply(c[..., 1], d, out=out[1])
            np.multiply(c[..., 2], a, out=out[2])
        elif form == "models":
            for j, x in enumerate((b, d, a)):
                np.multiply(c[..., j], x, out=out[j])
        else:
            out[0][:] = b
            for j, x in ((1, d), (2, a)):
                np.subtract(x, b, out=out[j])
                np.multiply(c[..., j], out[j], out=out[j])
    return held_chunk(chunk, [x.ravel() for x in out])


def merge_recipe(native):
    """The native recipe that sums scaled inputs: (1·b' + 1·d') + 1·a', divided by 1."""
    recipe = native.Recipe()
    recipe.kind = 2  # kModels
    recipe.base_weight = 1.0
    recipe.domain.weight = 1.0
    recipe.align.weight = 1.0
    return recipe
