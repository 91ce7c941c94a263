"""Streams a planned merge through the native kernel into a Hugging Face model folder.

Data path (DESIGN.md): inputs are memory-mapped; each output shard is created at its final size
in a temporary folder beside OUT; the kernel reads a window of the mapped inputs and pwrite()s the
result in <= 1 MiB pieces; the window's input pages are then released from our mappings (they stay
in the page cache); shards are fsynced; index, config and tokenizer files are added; only then is
the folder renamed to OUT.  OUT therefore never holds a half-written model, and peak memory is a
few windows regardless of model or shard size.  The hidden folder, its lock and its journal
(journal.py) make a killed or interrupted merge resumable and concurrent merges into one OUT safe.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .dtypes import DType
from .errors import MergeError
from .io.checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint, index_json
from .journal import PartialOutput, input_identities
from .kernels import cpu
from .methods import Method, TensorPasses, tensor_recipe
from .plan import MergeOptions, MergePlan, PlannedShard, PlannedTensor, plan_merge
from .progress import Progress
from .params import default_threads

# Output bytes per native call.  Between calls the window's input pages are released, so resident
# input pages stay below ~3 windows (96 MiB for bf16) however large a tensor is; at ~4 GB/s of
# output a call lasts ~8 ms, so the Python loop and thread start-up (~0.1 ms) cost about 1%.
WINDOW_BYTES = 32 << 20
# Input bytes (all three models) of a tensor whose pages stay mapped between a merge method's
# passes over it (see tensor_recipes).
PASS_RESIDENT_BYTES = 128 << 20

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


class InputMaps:
    """Every file of the given checkpoints, memory-mapped once (a folder given twice shares
    maps)."""

    def __init__(self, checkpoints: Iterable[Checkpoint]):
        self.checkpoints = list(checkpoints)
        self.maps: Dict[Path, object] = {}
        self._stack = ExitStack()
        native = cpu.native()
        for checkpoint in self.checkpoints:
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

    def check_unchanged(self) -> None:
        """Each input is still the file whose header was read (before any compute)."""
        for checkpoint in self.checkpoints:
            for loc in checkpoint.tensors.values():
                if self.maps[loc.file].size < loc.entry.end:
                    raise MergeError(f"{loc.file}: file shrank since its header was read "
                                     f"(now {self.maps[loc.file].size} bytes)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


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
        if (now.st_size, now.st_mtime_ns) != identity[2:]:
            raise MergeError(f"input {path} was modified during the merge "
                             f"(size {identity[2]:,} -> {now.st_size:,} bytes)")


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


@dataclass(frozen=True)
class Chunk:
    """Elements [start, start+count) of one tensor: where its inputs lie and where it goes."""

    tensor: PlannedTensor
    start: int
    count: int
    inputs: Tuple[Tuple[object, int, int], ...]  # (mapped file, byte offset, byte length) x 3
    file_offset: int  # of the chunk's first output byte in the shard

    def addresses(self) -> List[int]:
        return [mapped.address + offset for mapped, offset, _ in self.inputs]

    def dtype_codes(self) -> Tuple[int, int, int]:
        return tuple(int(self.tensor.source_dtype(i)) for i in range(3))

    def release_inputs(self) -> None:
        """Drop the chunk's input pages from this process (they stay in the page cache)."""
        for mapped, offset, length in self.inputs:
            mapped.release(offset, length)


def tensor_chunks(tensor: PlannedTensor, maps: InputMaps, file_offset: int,
                  max_elements: int) -> Iterator[Chunk]:
    """The tensor in chunks of at most max_elements; asks for read-ahead of each next chunk."""
    mapped = [maps.maps[loc.file] for loc in tensor.sources]
    sizes = [tensor.source_dtype(i).itemsize for i in range(3)]
    out_size = tensor.out_dtype.itemsize
    for start in range(0, tensor.count, max_elements):
        n = min(max_elements, tensor.count - start)
        inputs = tuple((m, loc.entry.begin + start * size, n * size)
                       for m, loc, size in zip(mapped, tensor.sources, sizes))
        for m, offset, length in inputs:
            m.prefetch(offset + length, length)
        yield Chunk(tensor, start, n, inputs, file_offset + start * out_size)


class InputChanged(MergeError):
    """An input's pages vanished while the kernel read them (truncated while mapped)."""


class ShardChecksum:
    """CRC-32C of a shard file, built from the header and then each chunk in file order."""

    def __init__(self, header: bytes):
        self.native = cpu.native()
        buffer = ctypes.create_string_buffer(header, len(header))
        self.crc = self.native.crc32c(ctypes.addressof(buffer), len(header))

    def add(self, crc: int, length: int) -> None:
        self.crc = self.native.crc32c_combine(self.crc, crc, length)


@dataclass
class ShardTarget:
    """One output file of a pass over a shard (a sweep writes several at once)."""

    fd: int
    path: Path
    checksum: ShardChecksum


class CpuWriter:
    """Merges each chunk with the native kernel straight into the shard file(s)."""

    def __init__(self, options: MergeOptions, threads: int):
        self.options = options
        self.threads = threads
        self.native = cpu.native()

    def chunk_elements(self, tensor: PlannedTensor) -> int:
        return WINDOW_BYTES // tensor.out_dtype.itemsize

    def _merge(self, chunk: Chunk, targets: List[ShardTarget], recipes: list):
        """(errno or 0, CRC-32C per target) of one native pass writing every target."""
        t = chunk.tensor
        b, d, a = chunk.addresses()
        dtypes = chunk.dtype_codes()
        if len(targets) == 1:
            err, crc = self.native.merge_to_file(
                b, dtypes[0], d, dtypes[1], a, dtypes[2], int(t.out_dtype), chunk.count,
                chunk.start, recipes[0], targets[0].fd, chunk.file_offset, self.threads)
            return err, [crc]
        return self.native.merge_to_files(
            b, dtypes[0], d, dtypes[1], a, dtypes[2], int(t.out_dtype), chunk.count, chunk.start,
            [(x.fd, chunk.file_offset, r) for x, r in zip(targets, recipes)], self.threads)

    def write(self, targets: List[ShardTarget], chunk: Chunk, recipes: list) -> None:
        t = chunk.tensor
        err, crcs = self._merge(chunk, targets, recipes)
        if err == errno.EFAULT:
            raise InputChanged(f"an input of tensor {t.name} changed while it was being read")
        if err:
            paths = ", ".join(str(x.path) for x in targets)
            raise MergeError(f"{paths}: writing tensor {t.name} failed: {os.strerror(err)}")
        nbytes = chunk.count * t.out_dtype.itemsize
        for target, crc in zip(targets, crcs):
            target.checksum.add(crc, nbytes)
            if self.options.fsync:  # flush as we go: the disk writes while the next window computes
                self.native.start_writeback(target.fd, chunk.file_offset, nbytes)
        chunk.release_inputs()

    def drain(self) -> None:
        """Everything handed to write() is in the file (nothing is pending on the CPU path)."""


def _keep() -> None:
    """Release callback that keeps a window's pages mapped."""


def tensor_recipes(plans: List[MergePlan], tensor: PlannedTensor, maps: InputMaps,
                   threads: int) -> list:
    """Each plan's native Recipe for `tensor`, after the reduction passes its method needs
    (none for task arithmetic; shared between the plans of a sweep)."""
    native = cpu.native()
    # A method's passes read a tensor several times: a small tensor's pages stay mapped until
    # the merge pass releases them (re-faulting them cost ~1 s of 6 on a 1.1B TIES merge); a
    # large one is released window by window, keeping memory bounded.
    keep_mapped = sum(loc.entry.nbytes for loc in tensor.sources) <= PASS_RESIDENT_BYTES

    def windows():
        for chunk in tensor_chunks(tensor, maps, 0, WINDOW_BYTES // 4):
            yield (chunk.addresses(), chunk.dtype_codes(), chunk.count, chunk.start,
                   _keep if keep_mapped else chunk.release_inputs)

    passes = TensorPasses(native, windows, threads)
    try:
        return [tensor_recipe(native, plan.settings[tensor.name], tensor.name, tensor.count,
                              passes) for plan in plans]
    except OSError as exc:
        if exc.errno == errno.EFAULT:
            raise InputChanged(f"an input of tensor {tensor.name} changed while it was being "
                               "read") from None
        raise


def _write_shard(paths: List[Path], shard: PlannedShard, plans: List[MergePlan],
                 maps: InputMaps, writer, progress: Progress) -> List[int]:
    """Write one shard completely into each of `paths` (one per plan); returns the CRC-32C
    of each file."""
    options = plans[0].options
    threads = options.threads or default_threads()
    targets: List[ShardTarget] = []
    try:
        for path in paths:
            path.unlink(missing_ok=True)  # a resumed merge rewrites a shard it had not finished
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            targets.append(ShardTarget(fd, path, ShardChecksum(shard.header)))
            _reserve(fd, shard.size, path)
            _pwrite_all(fd, shard.header, 0)
        for tensor, offset in zip(shard.tensors, shard.data_offsets):
            recipes = tensor_recipes(plans, tensor, maps, threads)
            chunks = tensor_chunks(tensor, maps, len(shard.header) + offset,
                                   writer.chunk_elements(tensor))
            for chunk in chunks:
                writer.write(targets, chunk, recipes)
                progress.advance(chunk.count * tensor.out_dtype.itemsize * len(targets))
        writer.drain()
        if options.fsync:
            for target in targets:
                os.fsync(target.fd)
        return [target.checksum.crc for target in targets]
    except BaseException:
        for path in paths:  # an unfinished shard only takes space; --resume redoes it
            path.unlink(missing_ok=True)
        raise
    finally:
        for target in targets:
            os.close(target.fd)


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


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_into_place(tmp: Path, out_dir: Path, fsync: bool) -> None:
    """Rename the finished folder to OUT.  A non-empty OUT (allowed by --force) is swapped with
    the new folder in one atomic step, so at every instant OUT is either the old model or the new
    one; the old one is deleted only afterwards."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and _exchange(tmp, out_dir):
        if fsync:
            _fsync_dir(out_dir.parent)
        shutil.rmtree(tmp)  # now holds the old model
        return
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):  # no renameat2: two renames
        old = out_dir.parent / f".{out_dir.name}.mergealign-replaced-{os.getpid()}"
        os.rename(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.rename(tmp, out_dir)
    if fsync:
        _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


def _make_writer(plan: MergePlan):
    options = plan.options
    if options.device.split(":")[0] == "cpu":
        return CpuWriter(options, options.threads or default_threads())
    from .gpu_stream import GpuWriter

    return GpuWriter(plan, options.gpu_memory, options.backend, options.device)


def execute(plan: MergePlan, show_progress: bool = False, writer=None) -> MergeResult:
    """Run a checked plan in OUT's hidden partial folder, then rename it to OUT.

    `writer` (default: from the plan's options) computes and writes each chunk: CpuWriter, or
    gpu_stream.GpuWriter.  On failure or interrupt the partial folder stays, with every completed
    shard recorded in its journal: the same merge with resume=True finishes it."""
    return execute_many([plan], show_progress, writer)[0]


def _same_layout(plans: List[MergePlan]) -> None:
    first = plans[0]
    for plan in plans[1:]:
        if [s.header for s in plan.shards] != [s.header for s in first.shards]:
            raise MergeError("a sweep's outputs must share one layout (same inputs, dtype and "
                             "shard size)")


def execute_many(plans: List[MergePlan], show_progress: bool = False,
                 writer=None) -> List[MergeResult]:
    """Run plans that differ only in their weights and output folders in one pass over the
    inputs: each chunk is read once and merged once per plan (a λ sweep).  One plan is a plain
    merge.  Each output keeps every guarantee of a single merge (its own partial folder, lock,
    journal, manifest and atomic rename)."""
    from . import __version__

    started = time.perf_counter()
    _same_layout(plans)
    partials: List[PartialOutput] = []
    identities = input_identities(plans[0])
    try:
        for plan in plans:
            partials.append(PartialOutput(plan, __version__).open(resume=plan.options.resume,
                                                                   force=plan.options.force))
        with InputMaps(plans[0].inputs.values()) as maps:
            maps.check_unchanged()
            writer = writer or _make_writer(plans[0])
            progress = Progress(plans[0].tensor_bytes * len(plans), "merging",
                                enabled=show_progress)
            for shard in plans[0].shards:
                if all(p.shard_is_complete(shard.filename, shard.size) for p in partials):
                    progress.advance(sum(t.out_nbytes for t in shard.tensors) * len(plans))
                    continue
                crcs = _write_shard([p.folder / shard.filename for p in partials], shard,
                                    plans, maps, writer, progress)
                for partial, crc in zip(partials, crcs):
                    partial.record_shard(shard.filename, shard.size, crc,
                                         plans[0].options.fsync)
            progress.close()
        check_inputs_unchanged(identities)
        for plan, partial in zip(plans, partials):
            _publish(plan, partial)
    except InputChanged as exc:
        for partial in partials:
            partial.discard_if_empty()
        check_inputs_unchanged(identities)  # names the file that changed, when it can
        raise MergeError(f"{exc}; {plans[0].out_dir} was not created") from exc
    except BaseException as exc:
        kept = [p.folder for p in partials if not p.discard_if_empty()]
        if not isinstance(exc, (MergeError, OSError)):
            raise  # KeyboardInterrupt and bugs: the CLI says what was kept
        hint = (f"completed shards are kept in {', '.join(map(str, kept))}: fix the cause and "
                "rerun with --resume to finish" if kept
                else f"nothing was kept; {plans[0].out_dir} is unchanged")
        raise MergeError(f"{exc}; {hint}") from exc
    finally:
        for partial in partials:
            partial.close()
    seconds = time.perf_counter() - started
    return [MergeResult(p.out_dir, seconds, p.input_bytes, p.output_bytes, p.tensor_count,
                        len(p.shards)) for p in plans]


def _publish(plan: MergePlan, partial: PartialOutput) -> None:
    """Side files, then the partial folder becomes OUT."""
    _write_side_files(partial.folder, plan)
    partial.release_lock_file()
    if plan.options.fsync:
        _fsync_dir(partial.folder)
    _move_into_place(partial.folder, plan.out_dir, plan.options.fsync)


def merge_checkpoints(base: Union[str, os.PathLike], domain: Union[str, os.PathLike],
                      aligned: Union[str, os.PathLike], out: Union[str, os.PathLike], *,
                      domain_weight: float = 0.5, align_weight: float = 0.5,
                      out_dtype: Optional[DType] = None,
                      max_shard_size: int = MergeOptions.max_shard_size,
                      tokenizer_from: str = "aligned", force: bool = False,
                      threads: Optional[int] = None, fsync: bool = True,
                      device: str = "cpu", gpu_memory: int = MergeOptions.gpu_memory,
                      backend: str = "auto", resume: bool = False,
                      method: Method = Method(), progress: bool = False) -> MergeResult:
    """Merge three Hugging Face model folders into `out` (see the README for the formula).

    Everything is checked first (PlanError lists every problem); then the merge streams through
    the native kernel in bounded memory and `out` appears only when complete.  device="cuda"
    streams through a GPU within `gpu_memory` bytes of device memory.  resume=True finishes a
    merge that was interrupted, keeping the shards it completed.  `method` picks another merge
    method (methods.py: TIES, DARE, SLERP, ...); the weights are its w_d and w_a.
    """
    options = MergeOptions(domain_weight, align_weight, out_dtype, max_shard_size,
                           tokenizer_from, force, threads, fsync, device, gpu_memory, backend,
                           resume, method)
    return execute(plan_merge(base, domain, aligned, out, options), show_progress=progress)
