"""Streams a planned merge through the native kernel into a Hugging Face model folder.

Data path (DESIGN.md): inputs are memory-mapped; each output shard is created at its final size
in a temporary folder beside OUT; the kernel reads a window of the mapped inputs and pwrite()s the
result in <= 1 MiB pieces; the window's input pages are then released from our mappings (they stay
in the page cache); shards are fsynced; index, config and tokenizer files are added; only then is
the folder renamed to OUT.  OUT therefore never holds a half-written model, and peak memory is a
few windows regardless of model or shard size.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from .dtypes import DType
from .errors import MergeError
from .io.checkpoint import CONFIG_FILE, INDEX_FILE, index_json
from .kernels import cpu
from .plan import MergeOptions, MergePlan, PlannedShard, PlannedTensor, plan_merge
from .progress import Progress
from .params import default_threads

# Output bytes per native call.  Between calls the window's input pages are released, so resident
# input pages stay below ~3 windows (96 MiB for bf16) however large a tensor is; at ~4 GB/s of
# output a call lasts ~8 ms, so the Python loop and thread start-up (~0.1 ms) cost about 1%.
WINDOW_BYTES = 32 << 20

TEMP_MARKER = ".mergealign-partial-"


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    seconds: float
    input_bytes: int
    output_bytes: int
    tensors: int
    shards: int

    @property
    def gb_per_s(self) -> float:
        """Bytes moved (inputs read + output written) per second, in GB/s."""
        return (self.input_bytes + self.output_bytes) / max(self.seconds, 1e-9) / 1e9


def temp_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}{TEMP_MARKER}{os.getpid()}"


class _InputMaps:
    """Every input file of the plan, memory-mapped once (a folder given twice shares maps)."""

    def __init__(self, plan: MergePlan):
        self.maps: Dict[Path, object] = {}
        self._stack = ExitStack()
        native = cpu.native()
        for checkpoint in plan.inputs.values():
            for loc in checkpoint.tensors.values():
                if loc.file not in self.maps:
                    self.maps[loc.file] = self._open(native, loc.file)

    def _open(self, native, path: Path):
        try:
            mapped = native.MappedFile(str(path))
        except OSError as exc:
            raise MergeError(f"{path}: cannot map: {exc.strerror}") from None
        self._stack.callback(mapped.close)
        return mapped

    def check_unchanged(self, plan: MergePlan) -> None:
        for checkpoint in plan.inputs.values():
            for loc in checkpoint.tensors.values():
                if self.maps[loc.file].size < loc.entry.end:
                    raise MergeError(f"{loc.file}: file shrank since its header was read "
                                     f"(now {self.maps[loc.file].size} bytes)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocate the shard's blocks now, so a full disk is found before computing, not midway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MergeError(f"{path}: disk full: cannot reserve {size:,} bytes") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
            raise
        os.ftruncate(fd, size)


def _merge_tensor(fd: int, path: Path, file_offset: int, tensor: PlannedTensor,
                  maps: _InputMaps, threads: int, options: MergeOptions,
                  progress: Progress) -> None:
    native = cpu.native()
    mapped = [maps.maps[loc.file] for loc in tensor.sources]
    begins = [loc.entry.begin for loc in tensor.sources]
    in_dtypes = [tensor.source_dtype(i) for i in range(3)]
    out_size = tensor.out_dtype.itemsize
    window = WINDOW_BYTES // out_size
    for start in range(0, tensor.count, window):
        n = min(window, tensor.count - start)
        spans = [(b + start * dt.itemsize, n * dt.itemsize) for b, dt in zip(begins, in_dtypes)]
        for m, (offset, length) in zip(mapped, spans):  # read-ahead of the next window
            m.prefetch(offset + length, length)
        addresses = [m.address + offset for m, (offset, _) in zip(mapped, spans)]
        err = native.merge_to_file(
            addresses[0], int(in_dtypes[0]), addresses[1], int(in_dtypes[1]),
            addresses[2], int(in_dtypes[2]), int(tensor.out_dtype), n,
            options.domain_weight, options.align_weight, fd, file_offset + start * out_size,
            threads)
        if err:
            raise MergeError(f"{path}: writing tensor {tensor.name} failed: {os.strerror(err)}")
        if options.fsync:  # flush as we go: the disk writes while the next window computes
            native.start_writeback(fd, file_offset + start * out_size, n * out_size)
        for m, (offset, length) in zip(mapped, spans):
            m.release(offset, length)
        progress.advance(n * out_size)


def _write_shard(path: Path, shard: PlannedShard, maps: _InputMaps, threads: int,
                 options: MergeOptions, progress: Progress) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _reserve(fd, shard.size, path)
        _pwrite_all(fd, shard.header, 0)
        for tensor, offset in zip(shard.tensors, shard.data_offsets):
            _merge_tensor(fd, path, len(shard.header) + offset, tensor, maps, threads, options,
                          progress)
        if options.fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _write_side_files(folder: Path, plan: MergePlan) -> None:
    fsync = plan.options.fsync
    if len(plan.shards) > 1:
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        _write_file(folder / INDEX_FILE, index_json(weight_map, plan.tensor_bytes), fsync)
    if plan.config is not None:
        _write_file(folder / CONFIG_FILE, json.dumps(plan.config, indent=2).encode() + b"\n", fsync)
    for source in plan.tokenizer_files:
        _write_file(folder / source.name, source.read_bytes(), fsync)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out_dir: Path, fsync: bool) -> None:
    """Rename the finished folder to OUT; a non-empty OUT (allowed by --force) is replaced only
    once the new model is complete, so a failure before this point leaves it untouched."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.parent / f".{out_dir.name}.mergealign-replaced-{os.getpid()}"
        os.rename(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.rename(tmp, out_dir)
    if fsync:
        _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


def execute(plan: MergePlan, show_progress: bool = False) -> MergeResult:
    """Run a checked plan; on any failure or interrupt the temporary folder is removed."""
    started = time.perf_counter()
    threads = plan.options.threads or default_threads()
    plan.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(plan.out_dir)
    tmp.mkdir()
    try:
        with _InputMaps(plan) as maps:
            maps.check_unchanged(plan)
            progress = Progress(plan.tensor_bytes, "merging", enabled=show_progress)
            for shard in plan.shards:
                _write_shard(tmp / shard.filename, shard, maps, threads, plan.options, progress)
            progress.close()
        _write_side_files(tmp, plan)
        if plan.options.fsync:
            _fsync_dir(tmp)
        _move_into_place(tmp, plan.out_dir, plan.options.fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(plan.out_dir, time.perf_counter() - started, plan.input_bytes,
                       plan.output_bytes, plan.tensor_count, len(plan.shards))


def merge_checkpoints(base: Union[str, os.PathLike], domain: Union[str, os.PathLike],
                      aligned: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
                      domain_weight: float = 0.5, align_weight: float = 0.5,
                      out_dtype: Optional[DType] = None,
                      max_shard_size: int = MergeOptions.max_shard_size,
                      tokenizer_from: str = "aligned", force: bool = False,
                      threads: Optional[int] = None, fsync: bool = True,
                      progress: bool = False) -> MergeResult:
    """Merge three Hugging Face model folders into `out` (see the README for the formula).

    Everything is checked first (PlanError lists every problem); then the merge streams through
    the native kernel in bounded memory and `out` appears only when complete.
    """
    options = MergeOptions(domain_weight, align_weight, out_dtype, max_shard_size,
                           tokenizer_from, force, threads, fsync)
    return execute(plan_merge(base, domain, aligned, out, options), show_progress=progress)
