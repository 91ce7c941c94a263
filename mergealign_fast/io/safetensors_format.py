"""The safetensors file format: reading and checking headers, and encoding them.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data.  The JSON
maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
start of the data) plus an optional "__metadata__" of string pairs.  Tensors must tile the data
exactly: no overlaps, no holes, nothing after the last one (the reference implementation rejects
all three, so a file we accept is one every other loader accepts too).

Only the header is read here (from disk, or by range requests from the Hub: readers.py);
tensor data is memory-mapped by the engine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..dtypes import SAFETENSORS_ITEMSIZE
from ..errors import MergeError
from .readers import ByteReader, open_reader
from . import json_text

# The reference implementation refuses headers above 100 MB; a real 405B-model shard header is
# well under 1 MB, so anything larger is a corrupt length field, not a big model.
MAX_HEADER_BYTES = 100_000_000
# Header JSON is padded with spaces so tensor data starts 8-byte aligned relative to the file.
HEADER_ALIGNMENT = 8


class FormatError(MergeError):
    """A safetensors file that is not well formed; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: Tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    data_start: int
    tensors: Dict[str, TensorEntry]
    metadata: Dict[str, str]


def _reject_duplicates(pairs: List[Tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"tensor name {key!r} appears twice")
        seen[key] = value
    return seen


def _read_header_json(path: Path, reader: ByteReader) -> Tuple[dict, int]:
    """(parsed JSON object, header length) or FormatError."""
    file_size = reader.size
    if file_size < 8:
        raise FormatError(f"{path}: file is {file_size} bytes, too short for a safetensors header")
    length = int.from_bytes(reader.read_at(0, 8), "little")
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header length {length} exceeds the "
                          f"{MAX_HEADER_BYTES}-byte limit (corrupt or not safetensors)")
    if length > file_size - 8:
        raise FormatError(f"{path}: header length {length} is larger than the file "
                          f"({file_size} bytes): truncated or not safetensors")
    raw = reader.read_at(8, length)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: header is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json_text.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as exc:
        raise FormatError(f"{path}: header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(obj).__name__}")
    return obj, length


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape of half a surrogate pair: no loader reads it
        raise FormatError(f"{where}: the name is not valid Unicode (a lone surrogate \\u "
                          "escape), which the safetensors library refuses") from None
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_ITEMSIZE:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                          f"got {offsets!r}")
    expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise FormatError(f"{where}: shape {shape} of {dtype} needs {expected} bytes but "
                          f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_tiling(path: Path, entries: Sequence[TensorEntry], data_start: int,
                  file_size: int) -> None:
    """Tensors must cover [data_start, file_size) exactly, in some order."""
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin < position:
            raise FormatError(f"{path}: tensor {entry.name!r} overlaps the tensor before it")
        if entry.begin > position:
            raise FormatError(f"{path}: {entry.begin - position} bytes of unused space before "
                              f"tensor {entry.name!r}")
        position = entry.end
    if position > file_size:
        raise FormatError(f"{path}: tensor data ends at byte {position} but the file has "
                          f"{file_size} bytes: truncated")
    if position < file_size:
        raise FormatError(f"{path}: {file_size - position} bytes after the last tensor")


def read_header(path: os.PathLike) -> SafetensorsHeader:
    """Parse and check one safetensors file's header; FormatError names the file and problem."""
    path = Path(path)
    try:
        reader = open_reader(path)
        try:
            file_size = reader.size
            obj, length = _read_header_json(path, reader)
        finally:
            reader.close()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + length
    entries = [_parse_entry(path, name, entry, data_start) for name, entry in obj.items()]
    _check_tiling(path, entries, data_start, file_size)
    return SafetensorsHeader(path, file_size, data_start, {e.name: e for e in entries}, metadata)


@dataclass(frozen=True)
class EncodedTensor:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int


def encode_header(tensors: Sequence[EncodedTensor],
                  metadata: Optional[Dict[str, str]] = None) -> Tuple[bytes, List[int]]:
    """(header bytes incl. the 8-byte length, data offset of each tensor relative to the data).

    Tensors are laid out back to back in the given order.
    """
    body: dict = {}
    if metadata:
        body["__metadata__"] = dict(metadata)
    offsets, position = [], 0
    for t in tensors:
        body[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                        "data_offsets": [position, position + t.nbytes]}
        offsets.append(position)
        position += t.nbytes
    text = json.dumps(body, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text, offsets
