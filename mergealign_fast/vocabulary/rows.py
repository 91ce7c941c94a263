"""Each model's vocabulary rows by token (tokens.py builds the output vocabulary): the tensors
whose first axis is a vocabulary, gathered a window of rows at a time in the streaming pass, with
the default rows of the tokens a model lacks computed in float64 and rounded once (no
vocabulary matrix is ever copied whole)."""

from __future__ import annotations

import ctypes
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import DType, bf16_bits_to_f32, f32_to_bf16_bits, storage_numpy_dtype
from ..io.checkpoint import Checkpoint, TensorLocation
from ..kernels import cpu
from ..io.stream import HeldInput, InputChanged
from .tokens import DONOR, MEAN, PADDING, Vocabulary


def common_dtype(dtypes: Sequence[DType]) -> DType:
    """The dtype every model's gathered rows are held in: theirs when they agree, else fp32
    (torch promotes any mix of bf16, fp16 and fp32 to fp32, as mergekit does here)."""
    return dtypes[0] if len(set(dtypes)) == 1 else DType.F32


def _decoded(rows: np.ndarray, dtype: DType) -> np.ndarray:
    return bf16_bits_to_f32(rows) if dtype is DType.BF16 else rows.astype(np.float32)


def _encoded(values: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype is DType.BF16:
        return f32_to_bf16_bits(values.astype(np.float32))
    return values.astype(storage_numpy_dtype(dtype))


def _gathered_rows(view: np.ndarray, index: np.ndarray) -> np.ndarray:
    """view[index] for rows of a mapped input, copied under the kernel's SIGBUS guard: an
    input truncated under the merge is InputChanged, not a killed process."""
    index = np.ascontiguousarray(index, dtype=np.int64)
    if len(index) and (index.min() < 0 or index.max() >= view.shape[0]):
        raise IndexError(f"rows {index.min()}..{index.max()} of a {view.shape[0]}-row tensor")
    rows = np.empty((len(index), view.shape[1]), dtype=view.dtype)
    row_bytes = view.shape[1] * view.dtype.itemsize
    if len(index) and cpu.native().gather_rows_guarded(rows.ctypes.data, view.ctypes.data,
                                                       row_bytes, index.ctypes.data,
                                                       len(index)):
        raise InputChanged("a vocabulary tensor's input changed while it was being read "
                           "(truncated or rewritten under the merge)")
    return rows


class MappedRows:
    """A run of consecutive rows a model has for every token of a chunk (the base's own
    vocabulary, a model that numbers alike): the mapped input itself, as a chunk of a tensor
    merged by index reads it (no copy; the kernel applies any input cast)."""

    def __init__(self, mapped, offset: int, nbytes: int, dtype: DType):
        self.mapped, self.offset, self.nbytes, self.dtype = mapped, offset, nbytes, dtype
        self.address = mapped.address + offset

    def release(self, offset: int, length: int) -> None:
        self.mapped.release(self.offset, self.nbytes)


class TensorRows:
    """A vocabulary tensor of the merge: its sources re-indexed by token, window by window."""

    def __init__(self, vocabulary: Vocabulary, locations: Dict[str, TensorLocation],
                 input_dtype: Optional[DType] = None):
        self.vocabulary = vocabulary
        self.locations = locations
        first = next(iter(locations.values())).entry.shape
        self.width = int(np.prod(first[1:], dtype=np.int64))
        self.shape = (vocabulary.size, *first[1:])
        # Inputs cast first (mergekit's `dtype`) are gathered, and default rows computed, in
        # that dtype, as mergekit casts before it re-indexes.
        self.dtype = input_dtype if input_dtype is not None else \
            common_dtype([DType[loc.entry.dtype] for loc in locations.values()])
        self._role_of = {(loc.file, loc.entry.begin): role for role, loc in locations.items()}
        self._padding: Dict[str, np.ndarray] = {}

    def role_of(self, location: TensorLocation) -> str:
        return self._role_of[(location.file, location.entry.begin)]

    def _source(self, maps, role: str) -> Tuple[object, np.ndarray]:
        loc = self.locations[role]
        mapped = maps.maps[loc.file]
        memory = (ctypes.c_ubyte * loc.entry.nbytes).from_address(mapped.address + loc.entry.begin)
        dtype = DType[loc.entry.dtype]
        view = np.frombuffer(memory, dtype=storage_numpy_dtype(dtype))
        return mapped, view.reshape(loc.entry.shape[0], self.width)

    def _rows(self, maps, role: str, index: np.ndarray, touched: list) -> np.ndarray:
        """Rows `index` of `role`'s source in self.dtype: a copy, widened to fp32 (mixed
        dtypes), or rounded to the dtype the inputs are cast to first (mergekit's `dtype`)."""
        mapped, view = self._source(maps, role)
        if len(index):
            loc = self.locations[role]
            row_bytes = loc.entry.nbytes // loc.entry.shape[0]
            touched.append((mapped, loc.entry.begin + int(index.min()) * row_bytes,
                            (int(index.max()) - int(index.min()) + 1) * row_bytes))
        rows = _gathered_rows(view, index)
        source_dtype = DType[self.locations[role].entry.dtype]
        if source_dtype is self.dtype:
            return rows
        return _encoded(_decoded(rows, source_dtype), self.dtype)

    def _defaults(self, maps, start: int, count: int, touched: list) -> np.ndarray:
        """The default rows of output rows [start, start+count) (zeros where not needed)."""
        v = self.vocabulary
        part = slice(start, start + count)
        fill = v.fill[part]
        out = np.zeros((count, self.width), dtype=storage_numpy_dtype(self.dtype))
        for index, role in enumerate(v.roles):
            donated = (fill == DONOR) & (v.donor_role[part] == index)
            if donated.any():
                out[donated] = self._rows(maps, role, v.donor_row[part][donated], touched)
        averaged = fill == MEAN
        if averaged.any():
            total = np.zeros((int(averaged.sum()), self.width))
            seen = np.zeros(len(total))
            for role, rows in v.mean_of.items():
                mine = rows[part][averaged]
                has = mine >= 0
                total[has] += _decoded(self._rows(maps, role, mine[has], touched), self.dtype)
                seen += has
            out[averaged] = _encoded(total / seen[:, None], self.dtype)
        return out

    def _padding_row(self, maps, role: str) -> np.ndarray:
        """`role`'s mean gathered row over the token rows: what its padding rows hold."""
        if role not in self._padding:
            total = np.zeros(self.width)
            step = max(1, (32 << 20) // max(1, self.width * 4))
            for start in range(0, self.vocabulary.tokens, step):
                n = min(step, self.vocabulary.tokens - start)
                touched: list = []
                block = self._gathered(maps, role, start, n, touched, padding=False)
                total += _decoded(block, self.dtype).sum(axis=0, dtype=np.float64)
                HeldInput(block, self.dtype, touched).release(0, 0)
            self._padding[role] = _encoded(total / max(1, self.vocabulary.tokens), self.dtype)
        return self._padding[role]

    def _gathered(self, maps, role: str, start: int, count: int, touched: list,
                  padding: bool = True, defaults: Optional[np.ndarray] = None) -> np.ndarray:
        """`role`'s output rows [start, start+count) in self.dtype: its own rows, the
        default rows (`defaults`, computed when not given) where it lacks the token, and its
        padding rows."""
        v = self.vocabulary
        own = v.own[role][start:start + count]
        has = own >= 0
        if has.all():
            return self._rows(maps, role, own, touched)
        if defaults is None:
            defaults = self._defaults(maps, start, count, touched)
        out = defaults.copy()
        out[has] = self._rows(maps, role, own[has], touched)
        pad = v.fill[start:start + count] == PADDING
        if padding and pad.any():
            out[pad] = self._padding_row(maps, role)
        return out

    def gather(self, maps, sources: Sequence[TensorLocation], start: int,
               count: int) -> List[object]:
        """Output rows [start, start+count) of each of `sources`: the mapped rows themselves
        where a model has them all in a run (MappedRows), else gathered in self.dtype
        (stream.HeldInput)."""
        touched: list = []
        defaults = None
        blocks = []
        for loc in sources:
            role = self.role_of(loc)
            own = self.vocabulary.own[role][start:start + count]
            if own[0] >= 0 and own[-1] - own[0] == count - 1 and np.all(np.diff(own) == 1):
                row_bytes = loc.entry.nbytes // loc.entry.shape[0]
                blocks.append(MappedRows(maps.maps[loc.file],
                                         loc.entry.begin + int(own[0]) * row_bytes,
                                         count * row_bytes, DType[loc.entry.dtype]))
                continue
            if defaults is None and not np.all(own >= 0):  # shared by the models lacking rows
                defaults = self._defaults(maps, start, count, touched)
            blocks.append(HeldInput(self._gathered(maps, role, start, count, touched,
                                                   defaults=defaults),
                                    self.dtype, touched))
        return blocks


def vocabulary_tensors(vocabulary: Vocabulary, models: Dict[str, Checkpoint],
                       input_dtype: Optional[DType] = None
                       ) -> Tuple[Dict[str, TensorRows], List[str]]:
    """The tensors to gather by token (in input_dtype, when the inputs are cast to one), by
    name, and what keeps any of them from it."""
    base = models[vocabulary.roles[0]]
    rows, problems = {}, []
    for name in base.tensors:
        locations = {role: m.tensors[name] for role, m in models.items() if name in m.tensors}
        if len(locations) < len(models) or not vocabulary.is_vocabulary_tensor(name, locations):
            continue
        found = vocabulary.tensor_problems(name, locations)
        if found:
            problems += found
        else:
            rows[name] = TensorRows(vocabulary, locations, input_dtype)
    return rows, problems
