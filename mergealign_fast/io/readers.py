"""Reading bytes of an input file at an offset, wherever the file is: on disk, or still on the
Hub (a weight shard the plan checks before it is downloaded, read by HTTP range requests).

Headers (safetensors' JSON, a .bin's zip directory and pickle) are read through here; tensor
data is memory-mapped by the engine once the file is on disk.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, Optional, Protocol


class ByteReader(Protocol):
    size: int

    def read_at(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class LocalFile:
    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


class RemoteFile(Protocol):
    """A file of a Hub repo at one commit: its bytes on the server, and what identifies it."""

    size: int
    cache: Path  # the Hub cache it downloads into

    def open(self) -> ByteReader: ...

    def identity(self) -> tuple: ...


# Input files known from the Hub, by their path in the Hub cache (on disk once downloaded, and
# until then read from the server by range requests): sources/hub.py registers them.
_FROM_THE_HUB: Dict[Path, RemoteFile] = {}


def register_remote(path: Path, remote: RemoteFile) -> None:
    _FROM_THE_HUB[Path(path)] = remote


def remote_file(path: Path) -> Optional[RemoteFile]:
    """The Hub file behind `path` (downloaded or not), None for a local file."""
    return _FROM_THE_HUB.get(Path(path))


def is_remote(path: Path) -> bool:
    """Whether `path` is a file the plan knows from the Hub and that is not on disk yet."""
    return Path(path) in _FROM_THE_HUB and not os.path.exists(path)


def is_file(path: Path) -> bool:
    """A file on disk, or one the Hub holds for this path (a model folder's listing)."""
    return Path(path).is_file() or is_remote(path)


def open_reader(path: Path) -> ByteReader:
    """A reader of `path`'s bytes; OSError when it is neither on disk nor on the Hub."""
    path = Path(path)
    if is_remote(path):
        return _FROM_THE_HUB[path].open()
    return LocalFile(path)


class SeekableReader(io.RawIOBase):
    """A ByteReader as a read-only binary file (what zipfile and pickle read)."""

    def __init__(self, reader: ByteReader):
        super().__init__()
        self._reader = reader
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._reader.size}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer) -> int:
        data = self._reader.read_at(self._position, min(len(buffer),
                                                        max(0, self._reader.size - self._position)))
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)
