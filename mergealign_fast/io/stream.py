"""Input streaming: the memory-mapped input files, and any tensor's three inputs in windows.

Every pass over input data goes through `tensor_chunks`: the merge's writers (CPU and GPU), the
methods' statistics passes and `inspect`.  A merge hands its whole reading order to one native
read-ahead thread (`InputMaps.read_ahead`), which keeps the storage busy a fixed depth ahead of
the chunks; a pass outside a merge asks the kernel to read each next window ahead.  A window's
pages are released from this process once used (they stay in the page cache), so resident input
memory stays at a few windows whatever the model size.  An input truncated or replaced while
mapped is caught in the kernel (InputChanged) and by comparing file identities before a merge is
published (`check_inputs_unchanged`).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, Optional, Sequence, Tuple

from ..dtypes import DType
from ..errors import MergeError
from . import readers
from .checkpoint import Checkpoint, TensorLocation
from ..kernels import cpu

if TYPE_CHECKING:
    from ..vocabulary.rows import TensorRows

# Output bytes per native call.  Between calls the window's input pages are released, so resident
# input pages stay below ~3 windows (96 MiB for bf16) however large a tensor is; at ~4 GB/s of
# output a call lasts ~8 ms, so the Python loop and thread start-up (~0.1 ms) cost about 1%.
WINDOW_BYTES = 32 << 20

# The read-ahead thread (csrc/read_ahead.h) keeps this many input bytes requested beyond the
# merge's position, asked for in pieces of READ_AHEAD_PIECE per input, interleaved as the merge
# reads them.  Set from the cold 3B-trio measurements in benches/RESULTS.md.
READ_AHEAD_BYTES = 512 << 20
READ_AHEAD_PIECE = 8 << 20
# MERGEALIGN_READ_AHEAD: how the thread asks (advise: posix_fadvise WILLNEED, read: pread into a
# scratch buffer) or off (the kernel's own readahead only); MERGEALIGN_READ_AHEAD_BYTES: the
# depth, for measuring others (benches/cold_trio.py).
READ_AHEAD_MODES = {"advise": 0, "read": 1}


def read_ahead_settings() -> Optional[Tuple[int, int]]:
    """(mode code, depth in bytes) of the read-ahead thread from the environment, None when it
    is off; a value it cannot use is a MergeError (checked before a merge creates anything)."""
    mode = os.environ.get("MERGEALIGN_READ_AHEAD", "advise")
    if mode == "off":
        return None
    if mode not in READ_AHEAD_MODES:
        raise MergeError(f"MERGEALIGN_READ_AHEAD={mode}: expected one of "
                         f"{', '.join([*READ_AHEAD_MODES, 'off'])}")
    depth = READ_AHEAD_BYTES
    if os.environ.get("MERGEALIGN_READ_AHEAD_BYTES"):
        from ..units import parse_size  # plan imports this module

        try:
            depth = parse_size(os.environ["MERGEALIGN_READ_AHEAD_BYTES"])
        except ValueError as exc:
            raise MergeError(f"MERGEALIGN_READ_AHEAD_BYTES: {exc}") from None
    return READ_AHEAD_MODES[mode], depth


class InputChanged(MergeError):
    """An input's pages vanished while the kernel read them (truncated while mapped)."""


class InputMaps:
    """Every file of the given checkpoints, memory-mapped once (a folder given twice shares
    maps)."""

    def __init__(self, checkpoints: Iterable[Checkpoint]):
        self.checkpoints = list(checkpoints)
        self.maps: Dict[Path, object] = {}
        self.reader = None  # the native ReadAhead, once read_ahead() started it
        self._positions: Dict[tuple, Tuple[int, int]] = {}  # tensor -> (position, bytes/element)
        self._stack = ExitStack()
        native = cpu.native()
        for checkpoint in self.checkpoints:
            for loc in checkpoint.tensors.values():
                # A Hub file not downloaded is one the merge does not read (download_inputs
                # fetched every file it reads).
                if loc.file not in self.maps and not readers.is_remote(loc.file):
                    self.maps[loc.file] = self._open(native, loc.file)

    def _open(self, native, path: Path):
        try:
            mapped = native.MappedFile(os.fsencode(path))  # (bytes: names not in UTF-8 too)
        except OSError as exc:
            raise MergeError(f"{path}: cannot map: {exc.strerror}") from None
        self._stack.callback(mapped.close)
        return mapped

    def check_unchanged(self) -> None:
        """Each input is still the file whose header was read (before any compute)."""
        for checkpoint in self.checkpoints:
            for loc in checkpoint.tensors.values():
                if loc.file in self.maps and self.maps[loc.file].size < loc.entry.end:
                    raise MergeError(f"{loc.file}: file shrank since its header was read "
                                     f"(now {self.maps[loc.file].size} bytes)")

    def read_ahead(self, tensors: Sequence[Sequence[TensorLocation]],
                   settings: Tuple[int, int]) -> None:
        """Start a native thread reading the inputs of `tensors` (each a tensor's sources, in the
        order the merge will read them) ahead of the merge; settings: (mode, depth) from
        read_ahead_settings().  The merge's chunks report where it is (tensor_chunks).  The
        thread stops with the maps."""
        mode, depth = settings
        native = cpu.native()
        files = {path: i for i, path in enumerate(self.maps)}
        ranges, position = [], 0
        for sources in tensors:
            key = _tensor_key(sources)
            count = sources[0].entry.count
            if key in self._positions or count == 0:
                continue
            itemsizes = [loc.entry.nbytes // count for loc in sources]
            per_element = sum(itemsizes)
            self._positions[key] = (position, per_element)
            step = max(1, READ_AHEAD_PIECE // max(itemsizes))
            for start in range(0, count, step):
                n = min(step, count - start)
                for loc, size in zip(sources, itemsizes):
                    ranges.append(native.ReadAheadRange(
                        files[loc.file], loc.entry.begin + start * size, n * size,
                        position + start * per_element))
            position += count * per_element
        self.reader = native.ReadAhead([m.fd for m in self.maps.values()], ranges, depth, mode)
        self._stack.callback(self.reader.stop)  # registered last: stops before the maps close

    def reached(self, sources: Sequence[TensorLocation], element: int) -> None:
        """The merge is reading `sources` up to `element`: the reader may run further."""
        known = self._positions.get(_tensor_key(sources)) if self.reader is not None else None
        if known is not None:
            position, per_element = known
            self.reader.reached(position + element * per_element)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


@dataclass(frozen=True)
class Chunk:
    """Elements [start, start+count) of one tensor: where its inputs lie and, for a merge,
    where its output goes."""

    start: int
    count: int
    inputs: Tuple[Tuple[object, int, int], ...]  # (mapped file, byte offset, byte length) each
    dtypes: Tuple[DType, ...]  # base, then the models (the trio: domain, aligned)
    file_offset: int  # of the chunk's first output byte in the shard (0 for read-only passes)
    input_cast: int = -1  # MergeOptions.input_cast

    def addresses(self) -> Tuple[int, ...]:
        return tuple(mapped.address + offset for mapped, offset, _ in self.inputs)

    def operands(self, out_dtype: Optional[DType] = None):
        """The native Operands of this chunk, a trio (out_dtype: of a merge; None for
        statistics)."""
        (b, d, a), (db, dd, da) = self.addresses(), self.dtypes
        return cpu.native().Operands(b, int(db), d, int(dd), a, int(da), self.count,
                                     int(out_dtype or DType.F32), self.start, self.input_cast)

    def set_operands(self, out_dtype: DType):
        """The native SetOperands of this chunk: a base and any number of models."""
        addresses = self.addresses()
        return cpu.native().SetOperands(addresses[0], int(self.dtypes[0]), list(addresses[1:]),
                                        [int(d) for d in self.dtypes[1:]], self.count,
                                        int(out_dtype), self.start, self.input_cast)

    def release_inputs(self) -> None:
        """Drop the chunk's input pages from this process (they stay in the page cache)."""
        for mapped, offset, length in self.inputs:
            mapped.release(offset, length)


class ResidentInput:
    """A chunk input that is the caller's memory (merge_tensors' buffers): nothing to release."""

    def __init__(self, address: int):
        self.address = address

    def release(self, offset: int, length: int) -> None:
        """Nothing: the caller owns the memory."""


class HeldInput:
    """A chunk input in memory of its own (rows gathered by token, inputs scaled or merged in
    numpy): an address, a dtype, a byte count, and a release that drops, once, the source
    pages it was made from (`touched`: (mapped file, offset, length) each, one list shared by
    the chunk's inputs)."""

    def __init__(self, values, dtype: DType, touched: list):
        self.values = values
        self.address = values.ctypes.data
        self.dtype = dtype
        self.nbytes = values.nbytes
        self._touched = touched

    def release(self, offset: int, length: int) -> None:
        while self._touched:
            mapped, start, nbytes = self._touched.pop()
            mapped.release(start, nbytes)


CACHE_LINE = 64


class AdaptedWindows:
    """The windows of a LoRA-adapted input (adapters.LowRankDelta): each W + scale·L·R, in fp32
    rounded once to the delta's held dtype, computed by the native low_rank_add from the stored
    window of W into one buffer of this stream's own.  The buffer is reused window after
    window (a fresh one would be faulted in page by page each time): a window's values hold
    until the stream yields the next, which every reader of a stream (writers, passes) is
    done with by then."""

    def __init__(self, location: TensorLocation):
        self.location = location
        self.left, self.right = location.delta.factors()
        shape = location.entry.shape
        self.width = shape[-1] if len(shape) == 2 else 1
        self.dtype = DType[location.entry.dtype]
        self.held = DType[location.streamed_dtype]
        self.threads = cpu.default_threads()
        self.buffer = None

    def window(self, mapped, start: int, count: int,
               align_to: int = 0) -> Tuple[HeldInput, int, int]:
        """Elements [start, start+count) of the adapted tensor: (held input, 0, bytes), cut
        into whole rows and the partial rows at either end.  The window starts at the same
        offset from a cache line as `align_to` (the merge's base input there): the kernel's
        direct path aligns its loads on the base, and a load split across two cache lines
        costs ~25% of a core's bandwidth (csrc/direct_path.h)."""
        import numpy as np

        from ..dtypes import storage_numpy_dtype

        native = cpu.native()
        itemsize, held = self.dtype.itemsize, self.held.itemsize
        first_byte = self.location.entry.begin + start * itemsize
        if self.buffer is None or self.buffer.size < count * held + CACHE_LINE:
            self.buffer = np.empty(count * held + CACHE_LINE, np.uint8)
        shift = (align_to - self.buffer.ctypes.data) % CACHE_LINE
        values = self.buffer[shift:shift + count * held].view(storage_numpy_dtype(self.held))
        rank, width = self.right.shape[0], self.width
        done, end = 0, start + count
        while start + done < end:
            row, col = divmod(start + done, width)
            rows = (end - start - done) // width if col == 0 else 0
            last = width if rows else min(width, col + end - start - done)
            rows = max(rows, 1)
            err = native.low_rank_add(
                values.ctypes.data + held * done, int(self.held),
                mapped.address + first_byte + done * itemsize,
                int(self.dtype), self.left.ctypes.data + 4 * row * rank, self.right.ctypes.data,
                rows, rank, width, col, last, self.location.delta.scale, self.threads)
            if err:
                raise InputChanged(f"{self.location.file}: changed while it was being read")
            done += rows * (last - col)
        touched = [(mapped, first_byte, count * itemsize)]
        window = HeldInput(values, self.held, touched)
        return window, 0, window.nbytes


def _tensor_key(sources: Sequence[TensorLocation]) -> tuple:
    # begin and end: two tensors of a .bin may share a storage and start (a view of a prefix).
    return tuple((loc.file, loc.entry.begin, loc.entry.end) for loc in sources)


def tensor_chunks(sources: Sequence[TensorLocation], maps: InputMaps, max_elements: int, *,
                  file_offset: int = 0, out_itemsize: int = 0, input_cast: int = -1,
                  rows: Optional[TensorRows] = None) -> Iterator[Chunk]:
    """The tensor whose inputs are `sources` (base, domain, aligned) in chunks of at most
    max_elements.  Each chunk tells the maps' reader where the merge is; without a reader (a
    pass outside a merge) it asks the kernel to read the next chunk ahead.  A merge gives where
    the tensor's output starts in its shard and the output element size, to place each chunk's
    output.  A vocabulary tensor merged by token (`rows`) is gathered window by window."""
    if rows is not None:
        yield from _gathered_chunks(sources, rows, maps, max_elements, file_offset,
                                    out_itemsize, input_cast)
        return
    mapped = [maps.maps[loc.file] for loc in sources]
    dtypes = tuple(DType[loc.streamed_dtype] for loc in sources)
    adapted = [AdaptedWindows(loc) if loc.delta is not None else None for loc in sources]
    count = sources[0].entry.count

    def base_address(start: int) -> int:  # of the base's stored window (adapted windows align)
        return (mapped[0].address + sources[0].entry.begin
                + start * DType[sources[0].entry.dtype].itemsize)

    for start in range(0, count, max_elements):
        n = min(max_elements, count - start)
        inputs = tuple((m, loc.entry.begin + start * dtype.itemsize, n * dtype.itemsize)
                       if a is None else a.window(m, start, n, align_to=base_address(start))
                       for m, loc, dtype, a in zip(mapped, sources, dtypes, adapted))
        if maps.reader is not None:
            # The chunk's end: the merge needs all of it now, so the depth counts from there
            # (a GPU chunk can be a whole tensor of hundreds of MB).
            maps.reached(sources, start + n)
        else:
            for m, offset, length in inputs:
                m.prefetch(offset + length, length)
        yield Chunk(start, n, inputs, dtypes, file_offset + start * out_itemsize, input_cast)


def _gathered_chunks(sources: Sequence[TensorLocation], rows: TensorRows, maps: InputMaps,
                     max_elements: int, file_offset: int, out_itemsize: int,
                     input_cast: int) -> Iterator[Chunk]:
    """tensor_chunks of a vocabulary tensor: whole output rows, each input's gathered by token
    into memory of its own (vocabularies.TensorRows)."""
    step = max(1, max_elements // max(1, rows.width))
    for first in range(0, rows.shape[0], step):
        n = min(step, rows.shape[0] - first)
        gathered = rows.gather(maps, sources, first, n)
        start = first * rows.width
        yield Chunk(start, n * rows.width, tuple((g, 0, g.nbytes) for g in gathered),
                    tuple(g.dtype for g in gathered), file_offset + start * out_itemsize,
                    input_cast)


def pass_chunks(sources: Sequence[TensorLocation], maps: InputMaps, input_cast: int = -1,
                rows: Optional[TensorRows] = None) -> Iterator[Chunk]:
    """The chunks of a read-only pass (statistics, inspect): windows of as many elements as a
    window of fp32 output holds."""
    return tensor_chunks(sources, maps, WINDOW_BYTES // 4, input_cast=input_cast, rows=rows)


def file_identity(st: os.stat_result) -> tuple:
    """(device, inode, size, mtime, ctime) of a file: what 'unchanged' means.  The ctime is set
    by the kernel on every write or metadata change and cannot be set back (touch -d sets only
    atime and mtime), so a file rewritten in place with its mtime restored is still noticed."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def input_identities(checkpoints: Iterable[Checkpoint]) -> Dict[Path, tuple]:
    """file_identity of every input file."""
    return {path: file_identity(os.stat(path)) for checkpoint in checkpoints
            for path in checkpoint.files if not readers.is_remote(path)}


def check_inputs_unchanged(before: Dict[Path, tuple]) -> None:
    """Refuse to publish a merge whose inputs were replaced, truncated or rewritten meanwhile:
    its tensors could mix old and new data."""
    for path, identity in before.items():
        try:
            now = os.stat(path)
        except OSError:
            raise MergeError(f"input {path} was removed during the merge") from None
        if (now.st_dev, now.st_ino) != identity[:2]:
            raise MergeError(f"input {path} was replaced during the merge")
        if file_identity(now) != identity:
            raise MergeError(f"input {path} was modified during the merge "
                             f"(size {identity[2]:,} -> {now.st_size:,} bytes)")
