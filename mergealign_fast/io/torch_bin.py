"""PyTorch .bin checkpoints (what torch.save writes) read without torch and without running any
pickle code: each tensor becomes a TensorEntry with absolute byte offsets into the .bin file, so
the engine maps and streams it exactly like a safetensors file.

torch.save's format (PyTorch >= 1.6): a zip archive, every entry stored uncompressed, of
  <prefix>/data.pkl   the state dict, pickled; each tensor is a call of
                      torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                      whose storage is a persistent id ("storage", torch.<Type>Storage, key,
                      location, numel)
  <prefix>/data/<key> the raw bytes of each storage
  <prefix>/byteorder  "little" or "big"
The legacy format (before 1.6, or `_use_new_zipfile_serialization=False`) is a sequence of
pickles followed by each storage as an 8-byte element count and its bytes.

The pickle is first scanned opcode by opcode (only those a state dict uses are accepted), then
unpickled by an unpickler whose only globals are stand-ins that record what they are given: a
pickle naming anything else is refused, never executed.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from ..dtypes import SAFETENSORS_ITEMSIZE
from .readers import SeekableReader, open_reader
from .safetensors_format import FormatError, TensorEntry

WEIGHTS_FILE = "pytorch_model.bin"
WEIGHTS_INDEX = "pytorch_model.bin.index.json"

# torch.<Type>Storage -> the safetensors dtype of its elements.
STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "DoubleStorage": "F64", "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16",
    "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
}

# Every opcode torch.save's pickler emits for a dict of tensors (protocol 2, and the framing
# opcodes of protocols 4-5 in case a file was re-pickled).  Not among them: INST, OBJ, NEWOBJ,
# the EXT* registry lookups, BYTEARRAY8, NEXT_BUFFER, READONLY_BUFFER.
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE",
    "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "PERSID", "BINPERSID",
})


class _Record:
    """What the unpickler builds; a BUILD opcode may not rewrite it (pickle would otherwise set
    its fields through __dict__, frozen or not)."""

    def __setstate__(self, state) -> None:
        raise ValueError("a BUILD applied to a tensor or storage")


@dataclass(frozen=True)
class _Storage(_Record):
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor(_Record):
    storage: _Storage
    offset: int  # in elements of the storage
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


class _StateDict(OrderedDict):
    """collections.OrderedDict's stand-in: state_dict()'s `_metadata` (BUILD) is dropped."""

    def __setstate__(self, state) -> None:
        pass


def _ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _rebuild_tensor(storage, offset, shape, stride, *_ignored):
    if (not isinstance(storage, _Storage) or not _ints([offset]) or not isinstance(shape, tuple)
            or not isinstance(stride, tuple) or not _ints(shape) or not _ints(stride)
            or min(shape, default=0) < 0):
        raise ValueError("a tensor with malformed storage, offset, size or stride")
    return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, *_ignored):
    return data  # nn.Parameter: its tensor


class _StorageType(str):
    """torch.<Type>Storage, as the dtype it stands for."""


_GLOBALS = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


def _shown(text: str) -> str:
    """A name read from the file, as an error line can hold it (a corrupt one may hold line
    breaks or control characters: then its repr, cut to 80 characters)."""
    return text if text.isprintable() and len(text) <= 80 else repr(text)[:80]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get((module, name))
        if found is None:
            raise FormatError(f"{self._path}: the pickle calls {_shown(f'{module}.{name}')}, "
                              "which a state dict of tensors does not use: refused, not "
                              "executed")
        return found

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[4], int)):
            raise FormatError(f"{self._path}: a persistent id {pid!r:.80} is not a tensor "
                              "storage")
        return _Storage(str(pid[2]), str(pid[1]), pid[4])


class _Bounded:
    """A binary file whose reads never ask for more than it holds: a corrupt length in a pickle
    (BINBYTES8, LONG4: up to 2^64) would otherwise make read(n) allocate n bytes."""

    def __init__(self, raw):
        self._raw = raw
        position = raw.tell()
        self._size = raw.seek(0, io.SEEK_END)
        raw.seek(position)

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._raw.tell())
        return self._raw.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._raw.readline()

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)


def _load_checked(path: Path, raw):
    """The next pickle of the binary file `raw`: its opcodes checked first (pickletools reads
    them up to STOP), then unpickled by the restricted unpickler."""
    raw = _Bounded(raw)
    start = raw.tell()
    try:
        for opcode, _arg, _pos in pickletools.genops(raw):
            if opcode.name not in ALLOWED_OPCODES:
                raise FormatError(f"{path}: the pickle uses opcode {opcode.name}, which a "
                                  "state dict of tensors does not use: refused, not executed")
    except (ValueError, struct.error, UnicodeDecodeError, EOFError) as exc:
        raise FormatError(f"{path}: the pickle at byte {start} is truncated or corrupt "
                          f"({_shown(str(exc))})") from None
    raw.seek(start)
    try:
        return _RestrictedUnpickler(raw, path).load()
    except FormatError:
        raise
    except Exception as exc:  # the pickle machine's own errors: malformed stacks, bad args
        raise FormatError(f"{path}: the pickle is corrupt ({type(exc).__name__}: "
                          f"{_shown(str(exc))})") from None


def _tensors_of(path: Path, obj) -> Dict[str, _Tensor]:
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a pickled {type(obj).__name__}, not a state dict "
                          "(a dict of tensor names to tensors)")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise FormatError(f"{path}: entry {name!r:.80} is a {type(value).__name__}, not a "
                              "tensor (a state dict of tensors is expected)")
    return dict(obj)


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _is_contiguous(tensor: _Tensor) -> bool:
    if math.prod(tensor.shape) <= 1:
        return True
    expected = _contiguous_strides(tensor.shape)
    return all(size == 1 or a == b for size, a, b in zip(tensor.shape, tensor.stride, expected))


def _entry(path: Path, name: str, tensor: _Tensor, storage_begin: int,
           storage_bytes: int) -> TensorEntry:
    """The tensor's bytes in the file; FormatError for what cannot be read as stored."""
    where = f"{path}: tensor {name!r}"
    itemsize = SAFETENSORS_ITEMSIZE[tensor.storage.dtype]
    if len(tensor.stride) != len(tensor.shape) or not _is_contiguous(tensor):
        raise FormatError(f"{where}: stored with strides {list(tensor.stride)} for shape "
                          f"{list(tensor.shape)} (a non-contiguous view): re-save it with "
                          ".contiguous() or as safetensors")
    begin = storage_begin + tensor.offset * itemsize
    nbytes = math.prod(tensor.shape) * itemsize
    if tensor.offset < 0 or (tensor.offset * itemsize + nbytes > storage_bytes):
        raise FormatError(f"{where}: elements {tensor.offset}.."
                          f"{tensor.offset + nbytes // itemsize} lie outside its storage of "
                          f"{storage_bytes // itemsize} elements: truncated or corrupt")
    return TensorEntry(name, tensor.storage.dtype, tensor.shape, begin, begin + nbytes)


def _zip_member_start(raw, member: zipfile.ZipInfo, path: Path) -> int:
    """Where a stored member's bytes begin: after its local header (30 bytes, the name and an
    extra field whose length the local header, not the directory, gives)."""
    raw.seek(member.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise FormatError(f"{path}: zip entry {_shown(member.filename)} has no local header: "
                          "truncated or corrupt")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return member.header_offset + 30 + name_length + extra_length


# What zipfile raises on a damaged archive (a CRC mismatch, a bad local header, a member
# past the end of the file, a compression method it lacks).
ZIP_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error)


def _read_zip(path: Path, raw) -> Dict[str, TensorEntry]:
    try:
        return _read_zip_members(path, raw)
    except ZIP_ERRORS as exc:
        raise FormatError(f"{path}: not a readable torch.save zip archive "
                          f"({_shown(str(exc))}): truncated or corrupt") from None


def _read_zip_members(path: Path, raw) -> Dict[str, TensorEntry]:
    archive = zipfile.ZipFile(raw)
    members = {m.filename: m for m in archive.infolist()}
    file_size = raw.seek(0, io.SEEK_END)
    pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise FormatError(f"{path}: a zip archive without torch.save's <name>/data.pkl (a "
                          "TorchScript or other archive is not a state dict)")
    prefix = pickles[0][: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and archive.read(order).strip() != b"little":
        raise FormatError(f"{path}: saved on a big-endian machine: re-save it on a "
                          "little-endian one, or as safetensors")
    pickled = io.BytesIO(archive.read(members[pickles[0]]))
    tensors = _tensors_of(path, _load_checked(path, pickled))
    entries = {}
    for name, tensor in tensors.items():
        member = members.get(f"{prefix}data/{tensor.storage.key}")
        if member is None:
            raise FormatError(f"{path}: tensor {name!r}: its storage "
                              f"{_shown(tensor.storage.key)} is missing from the archive: "
                              "truncated or corrupt")
        if member.compress_type != zipfile.ZIP_STORED:
            raise FormatError(f"{path}: storage {_shown(member.filename)} is compressed "
                              "(torch.save stores them uncompressed): re-save it with torch.save")
        start = _zip_member_start(raw, member, path)
        if start + member.file_size > file_size:
            raise FormatError(f"{path}: storage {_shown(member.filename)} ends at byte "
                              f"{start + member.file_size} but the file has {file_size} bytes: "
                              "truncated")
        entries[name] = _entry(path, name, tensor, start, member.file_size)
    return entries


# The legacy format's first pickle: torch's magic number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy(path: Path, raw) -> Dict[str, TensorEntry]:
    """Pickles of the magic number, protocol version, system info, the state dict and the
    sorted storage keys; then each storage as <int64 element count><bytes>."""
    if _load_checked(path, raw) != LEGACY_MAGIC:
        raise FormatError(f"{path}: neither a zip archive nor torch's legacy format")
    for _ in range(2):  # protocol version, system info (endianness, type sizes)
        info = _load_checked(path, raw)
        if isinstance(info, dict) and not info.get("little_endian", True):
            raise FormatError(f"{path}: saved on a big-endian machine: re-save it on a "
                              "little-endian one, or as safetensors")
    tensors = _tensors_of(path, _load_checked(path, raw))
    keys = _load_checked(path, raw)
    if not isinstance(keys, list):
        raise FormatError(f"{path}: the legacy storage list is corrupt")
    starts: Dict[str, Tuple[int, int]] = {}
    position = raw.tell()
    size = raw.seek(0, io.SEEK_END)
    dtypes_by_key = {t.storage.key: t.storage.dtype for t in tensors.values()}
    for key in keys:
        if position > size:  # (a corrupt count: no seek past what the file holds)
            break
        raw.seek(position)
        count = raw.read(8)
        if len(count) != 8 or str(key) not in dtypes_by_key:
            raise FormatError(f"{path}: storage {_shown(str(key))} is truncated or unknown")
        nbytes = int.from_bytes(count, "little") * SAFETENSORS_ITEMSIZE[dtypes_by_key[str(key)]]
        starts[str(key)] = (position + 8, nbytes)
        position += 8 + nbytes
    if position > size:
        raise FormatError(f"{path}: storage data ends at byte {position} but the file has "
                          f"{size} bytes: truncated")
    entries = {}
    for name, tensor in tensors.items():
        if tensor.storage.key not in starts:
            raise FormatError(f"{path}: tensor {name!r}: its storage is missing: corrupt")
        begin, nbytes = starts[tensor.storage.key]
        entries[name] = _entry(path, name, tensor, begin, nbytes)
    return entries


def read_bin(path) -> Dict[str, TensorEntry]:
    """Every tensor of one .bin file, located in it; FormatError naming the file and problem."""
    path = Path(path)
    try:
        reader = open_reader(path)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # Small buffered reads: a file still on the Hub answers each with a range request (the
    # zip's local headers are read one per tensor).
    raw = io.BufferedReader(SeekableReader(reader), buffer_size=1 << 10)
    try:
        magic = reader.read_at(0, 4)
        if magic[:2] == b"PK":
            return _read_zip(path, raw)
        if magic[:1] == b"\x80":
            return _read_legacy(path, raw)
        raise FormatError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                          "pickle)")
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        reader.close()
