"""The output of a merge, from its hidden partial folder to OUT.

A merge writes into a hidden folder beside OUT, `.OUT.mergealign-partial`, holding an exclusive
lock on the folder itself for as long as it runs: a second merge aimed at the same OUT fails at
once, merges into different folders run side by side.  Each shard is created at its final size
(so a full disk is found before computing), filled by a writer (writers/), checksummed as it is
written, and recorded in the journal (the manifest, manifest.py, replaced atomically) once
complete: a merge that was killed, interrupted or ran out of disk is finished with `--resume`,
keeping the shards whose checksum still matches.  When every shard is done the index, config
and tokenizer files are added and the folder is renamed to OUT in one step, so OUT never holds
a half-written model.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .._version import __version__
from ..errors import MergeError
from ..io.checkpoint import CONFIG_FILE, INDEX_FILE, TensorLocation, index_json
from ..kernels import cpu
from .manifest import (MANIFEST, crc_hex, file_crc32c, manifest_document, merge_differences,
                       plan_fingerprint, read_manifest)
from ..io.stream import WINDOW_BYTES, InputChanged

PARTIAL_SUFFIX = ".mergealign-partial"
# A folder whose lock keeps changing hands (merges publishing and starting at once) is tried
# this many times before giving up.
LOCK_TRIES = 5


def lock_folder(folder: Path, make: bool) -> Optional[int]:
    """An exclusive flock on the folder itself (its directory inode), held through the returned
    descriptor: the lock goes wherever the folder is renamed, and there is no lock file to
    delete (deleting one would let another merge lock a new file in the same folder).  After
    locking, the path must still name the locked folder, since a merge that was publishing may
    have renamed it away meanwhile: then try again.  None when another process holds it
    (or, with make=False, when there is no folder)."""
    for _ in range(LOCK_TRIES):
        if make:
            folder.mkdir(exist_ok=True)
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            if not make:
                return None
            continue
        except (NotADirectoryError, OSError) as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            raise MergeError(f"{folder} is a symbolic link or not a folder: a merge works only "
                             "in a folder it made itself; move it away") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(folder).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise MergeError(f"{folder} keeps changing while merges start and finish: try again")


def resolve_out_dir(out_dir) -> Path:
    """OUT as the merge writes it: absolute, with '.', '..' and symbolic links resolved.  The
    partial folder is made beside the folder the path names in the end (a link's target), on its
    file system, so the final rename never crosses file systems."""
    return Path(os.path.realpath(out_dir))


def partial_dir_for(out_dir: Path) -> Path:
    out_dir = resolve_out_dir(out_dir)
    return out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"


def out_dir_problems(given, out: Path) -> List[str]:
    """Forms of OUT a merge cannot publish to, found before any compute.  `out` is
    resolve_out_dir(given); messages name what the user typed."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        return [f"output {given} is the current directory or holds it: a merge replaces its "
                "output folder as a whole once complete, which would pull it from under this "
                "shell; name a new folder (e.g. -o merged) or run from elsewhere"]
    if out.parent == out:
        return [f"output {given} is the root of the file system: name a folder"]
    if out.is_dir() and os.path.ismount(out):
        return [f"output {given} is a mount point: a merge is written beside its output folder "
                f"and renamed into place, which a mount point does not allow; write to a folder "
                f"inside it (e.g. -o {Path(given) / 'merged'})"]
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        return [f"output {given}: cannot create files in {parent} (permission denied); the "
                "merge writes a hidden folder beside its output"]
    return []


def _identity(path) -> Optional[Tuple[int, int]]:
    """(device, inode) of what `path` names, following links; None when nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _folders_holding(path: Path) -> List[Path]:
    """`path` with its links resolved, and every folder above it."""
    real = Path(os.path.realpath(path))
    return [real, *real.parents]


def overlap_problems(given, out: Path, inputs: Dict[str, Sequence[Path]]) -> List[str]:
    """Inputs a merge into `out` would replace or write into, decided by the identity (device,
    inode) of every file and folder, not by their names: a link, a bind mount or a hidden
    folder that is an input is found too.  `inputs` maps each role to its folder and the files
    read from it.  Refused: the hidden working folder being a link or not a folder (a merge
    writes only into a folder it made); any input file or folder inside OUT or the hidden
    folder (--force would delete it, --resume overwrite it); OUT inside an input folder."""
    hidden = partial_dir_for(out)
    if os.path.islink(hidden) or (os.path.lexists(hidden) and not os.path.isdir(hidden)):
        return [f"{hidden}, the hidden folder a merge into {given} works in, is "
                f"{'a symbolic link' if os.path.islink(hidden) else 'not a folder'}: a merge "
                "writes only into a folder it made itself; move it away"]
    replaced = {i: place for place in (out, hidden) if (i := _identity(place)) is not None}
    holding_out = {_identity(p) for p in _folders_holding(out) if os.path.exists(p)}
    problems = []
    for role, paths in inputs.items():
        folder = paths[0]
        inside = next(((path, replaced[i]) for path in paths for above in _folders_holding(path)
                       if (i := _identity(above)) in replaced), None)
        if inside is not None:
            problems.append(f"output {given} overlaps the {role} model folder {folder}: "
                            f"{inside[0]} lies inside {inside[1]}, which the merge replaces; "
                            "choose another output folder")
        elif _identity(folder) in holding_out:
            problems.append(f"output {given} overlaps the {role} model folder {folder}: the "
                            "output would be written inside an input; choose another output "
                            "folder")
    return problems


# What a model folder holds: the only folders --force replaces (anything else is the user's).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".md",
                       ".jinja", ".py", ".tiktoken", ".yml", ".yaml", ".gguf", ".msgpack", ".h5")
MODEL_MARKERS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", "config.json")


def not_a_model_problem(given, out: Path) -> Optional[str]:
    """Why the non-empty folder `out` is not a model that --force may replace (None when it
    is): every entry a plain file of a model's kinds (weights, JSON, tokenizer, card, code),
    at least one of them weights or a config."""
    entries = sorted(out.iterdir())
    strangers = [e.name + ("/" if e.is_dir() else "") for e in entries
                 if e.is_symlink() or not e.is_file()
                 or not (e.name.endswith(MODEL_FILE_SUFFIXES) or e.name == ".gitattributes")]
    if strangers:
        shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more"
                                            if len(strangers) > 3 else "")
        return (f"output {given} is not a model folder (it holds {shown}): --force replaces "
                "only a model; name a new folder or empty this one yourself")
    if not any(e.name.endswith(MODEL_MARKERS) for e in entries):
        return (f"output {given} holds no weights or config.json: --force replaces only a "
                "model; name a new folder or empty this one yourself")
    return None


def write_fully(fd: int, data, offset: int, path: Path) -> None:
    """pwrite all of `data` at `offset`; a write that makes no progress means the disk is full."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise MergeError(f"{path}: writing failed: disk full?")
        view, offset = view[written:], offset + written


def write_file(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def locked_path(fd: int, folder: Path) -> Path:
    """A path that names the folder open as `fd` whatever happens to `folder`'s name meanwhile
    (Linux's /proc/self/fd/N): files opened through it are created in the locked folder, never
    in a folder another merge made at the same name after this one's was removed."""
    through_fd = Path(f"/proc/self/fd/{fd}")
    return through_fd if _identity(through_fd) == _identity_of_fd(fd) else folder


def _identity_of_fd(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class PartialOutput:
    """The locked hidden folder one merge writes into.  `folder` is its name (for messages and
    the final rename); `inside` the path every file is opened through (locked_path)."""

    def __init__(self, plan):
        self.plan = plan
        self.out_dir = plan.out_dir
        self.folder = partial_dir_for(plan.out_dir)
        self.fingerprint = plan_fingerprint(plan)
        self.lock_fd: Optional[int] = None
        self.inside = self.folder
        self.shards: Dict[str, dict] = {}
        self.side_files: Dict[str, dict] = {}  # recorded once every shard is complete
        self.published = False  # renamed to OUT

    # -- opening: lock, then decide between fresh start, resume and refusal --------------------

    def open(self, resume: bool, force: bool) -> "PartialOutput":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.lock_fd = lock_folder(self.folder, make=True)
        if self.lock_fd is None:
            raise MergeError(f"another merge into {self.out_dir} is running now (it holds "
                             f"{self.folder}); wait for it or choose another output")
        self.inside = locked_path(self.lock_fd, self.folder)
        leftovers = list(self.inside.iterdir())
        if leftovers and not (resume or force):
            self.close()
            raise MergeError(f"{self.folder} holds an interrupted merge into {self.out_dir}: add "
                             "--resume to finish it, or --force to start over")
        if leftovers and resume:
            self._load_journal()
        else:
            for path in leftovers:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return self

    def _load_journal(self) -> None:
        journal = read_manifest(self.inside)
        if not journal:
            return  # killed before the first shard completed: nothing to keep
        if journal.get("fingerprint") != self.fingerprint:
            self.close()
            changes = "; ".join(merge_differences(journal, self.plan))
            raise MergeError(f"the interrupted merge in {self.folder} was started with other "
                             f"inputs or options ({changes}): rerun it as it was, or use --force "
                             "to start over")
        self.shards = dict(journal.get("shards", {}))

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock
            self.lock_fd = None

    # -- shards ---------------------------------------------------------------------------------

    def shard_is_complete(self, name: str, size: int) -> bool:
        """True for a shard the journal records and whose file still has that size and CRC."""
        recorded = self.shards.get(name)
        path = self.inside / name
        if not recorded or recorded["size"] != size or not path.is_file() \
                or path.stat().st_size != size:
            return False
        return crc_hex(file_crc32c(path)) == recorded["crc32c"]

    def record_shard(self, shard: ShardFile, size: int, fsync: bool) -> None:
        self.record_written(shard.path.name, size, shard.checksum.crc, shard.nonfinite, fsync)

    def record_written(self, name: str, size: int, crc: int, nonfinite: Dict[str, int],
                       fsync: bool) -> None:
        """A shard file written completely (here, or by a cluster's worker) into the journal."""
        self.shards[name] = {"size": size, "crc32c": crc_hex(crc)}
        if nonfinite:
            self.shards[name]["nonfinite"] = dict(sorted(nonfinite.items()))
        self._write_manifest(fsync)

    def record_side_files(self, files: Dict[str, dict], fsync: bool) -> None:
        self.side_files = files
        self._write_manifest(fsync)

    def _write_manifest(self, fsync: bool) -> None:
        manifest = manifest_document(self.plan, __version__, self.fingerprint, self.shards,
                                     self.side_files)
        staging = self.inside / (MANIFEST + ".new")
        write_file(staging, (json.dumps(manifest, indent=2) + "\n").encode(), fsync)
        os.replace(staging, self.inside / MANIFEST)

    def discard_if_empty(self) -> bool:
        """After a failure: remove the folder when no shard was completed (nothing to resume).
        Returns True when it was removed (or published: nothing is left there)."""
        if self.published:
            return True
        if self.shards:
            return False
        if self.still_named():  # (never a folder another merge made at the name since)
            shutil.rmtree(self.folder, ignore_errors=True)
        return True

    def still_named(self) -> bool:
        """Whether `folder` still names the folder this merge locked."""
        return self.lock_fd is not None and _identity(self.folder) == _identity_of_fd(self.lock_fd)



def settle_leftover_partial(plan) -> Optional[Path]:
    """After --resume found OUT complete from this very merge: a partial folder beside it that
    holds nothing, or this same merge (an interrupted rerun, or the old model of a --force swap
    killed before it was deleted), is redundant and removed.  One of another merge is kept for
    its own --resume (or --force) and returned, as is one a running merge holds."""
    folder = partial_dir_for(plan.out_dir)
    if not folder.is_dir():
        return None
    lock_fd = lock_folder(folder, make=False)
    if lock_fd is None:
        return folder if folder.exists() else None
    try:
        journal = read_manifest(folder)
        if journal.get("shards") and journal.get("fingerprint") != plan_fingerprint(plan):
            return folder
        shutil.rmtree(folder)
        return None
    finally:
        os.close(lock_fd)


# ---- shard files ----------------------------------------------------------------------------

class ShardChecksum:
    """CRC-32C of a shard file, built from the header and then each chunk in file order."""

    def __init__(self, header: bytes):
        self.native = cpu.native()
        buffer = ctypes.create_string_buffer(header, len(header))
        self.crc = self.native.crc32c(ctypes.addressof(buffer), len(header))

    def add(self, crc: int, length: int) -> None:
        self.crc = self.native.crc32c_combine(self.crc, crc, length)


@dataclass
class ShardFile:
    """One open output file of a pass over a shard (a sweep writes several at once): what a
    writer writes chunks into."""

    fd: int
    path: Path
    checksum: ShardChecksum
    # Per tensor, how many written values are NaN or ±inf (the writers count them).
    nonfinite: Dict[str, int] = field(default_factory=dict)

    def add_nonfinite(self, tensor: str, count: int) -> None:
        if count:
            self.nonfinite[tensor] = self.nonfinite.get(tensor, 0) + count


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


def create_shard_file(path: Path, header: bytes, size: int) -> ShardFile:
    """A new shard file of its final size with its header written (a resumed merge rewrites a
    shard it had not finished)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _reserve(fd, size, path)
        write_fully(fd, header, 0, path)
    except BaseException:
        os.close(fd)
        raise
    return ShardFile(fd, path, ShardChecksum(header))


def copy_tensor(targets: Sequence[ShardFile], source: TensorLocation, file_offset: int) -> None:
    """A tensor copied as it is (plan.PlannedTensor.is_copied) from its base file into each
    target at file_offset, checksummed in file order: the writer must have drained first."""
    native = cpu.native()
    size = source.entry.nbytes
    with open(source.file, "rb") as f:
        for start in range(0, size, WINDOW_BYTES):
            data = bytearray(min(WINDOW_BYTES, size - start))
            if os.preadv(f.fileno(), [data], source.entry.begin + start) != len(data):
                raise InputChanged(f"{source.file}: tensor {source.entry.name} shrank while it "
                                   "was being copied")
            view = (ctypes.c_char * len(data)).from_buffer(data)
            crc = native.crc32c(ctypes.addressof(view), len(data))
            for target in targets:
                write_fully(target.fd, data, file_offset + start, target.path)
                target.checksum.add(crc, len(data))


# ---- publishing -----------------------------------------------------------------------------

def side_files(plan) -> Dict[str, bytes]:
    """name -> content of every file of OUT besides the shards and the manifest."""
    files = {}
    if len(plan.shards) > 1:
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        files[INDEX_FILE] = index_json(weight_map, plan.tensor_bytes)
    if plan.config is not None:
        files[CONFIG_FILE] = json.dumps(plan.config, indent=2).encode() + b"\n"
    for source in plan.copied_files:
        files[source.name] = source.read_bytes()
    files.update(plan.written_files)
    return files


def _write_side_files(partial: "PartialOutput") -> None:
    """The side files, each recorded in the manifest with its size and CRC-32C (verify checks
    them like the shards)."""
    native = cpu.native()
    recorded = {}
    for name, data in side_files(partial.plan).items():
        write_file(partial.inside / name, data, partial.plan.options.fsync)
        buffer = ctypes.create_string_buffer(data, len(data))
        recorded[name] = {"size": len(data),
                          "crc32c": crc_hex(native.crc32c(ctypes.addressof(buffer), len(data)))}
    partial.record_side_files(recorded, partial.plan.options.fsync)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def move_into_place(tmp: Path, out_dir: Path, fsync: bool) -> None:
    """Rename the finished folder to OUT.  A non-empty OUT (allowed by --force) is swapped with
    the new folder in one atomic step, so at every instant OUT is either the old model or the new
    one; the old one is deleted only afterwards."""
    old_lock = lock_folder(out_dir, make=False) if out_dir.is_dir() else None
    try:
        # The old model is locked before it is swapped to the partial folder's path, until it
        # is deleted: a merge starting meanwhile finds that path locked, not free to clear.
        if out_dir.is_dir() and any(out_dir.iterdir()) and _exchange(tmp, out_dir):
            if fsync:
                fsync_dir(out_dir.parent)
            shutil.rmtree(tmp)  # now holds the old model
            return
    finally:
        if old_lock is not None:
            os.close(old_lock)
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):  # no renameat2: two renames
        old = out_dir.parent / f".{out_dir.name}.mergealign-replaced-{os.getpid()}"
        os.rename(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.rename(tmp, out_dir)
    if fsync:
        fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


def publish(partial: PartialOutput) -> None:
    """Side files, then the partial folder becomes OUT."""
    plan = partial.plan
    _write_side_files(partial)
    if plan.options.fsync:
        fsync_dir(partial.inside)
    _check_still_named(partial)
    move_into_place(partial.folder, plan.out_dir, plan.options.fsync)
    partial.published = True
    if _identity(plan.out_dir) != _identity_of_fd(partial.lock_fd):
        raise MergeError(f"{plan.out_dir} is not the folder this merge wrote: its hidden folder "
                         "was replaced while the merge ran; run `mergealign-fast verify` on it "
                         "or merge again with --force")


def _check_still_named(partial: PartialOutput) -> None:
    """The hidden folder must still be the one locked and written: one removed or replaced
    meanwhile (by hand, or by another merge while this one was stopped) is not published."""
    if not partial.still_named():
        raise MergeError(f"{partial.folder} was removed or replaced while this merge ran (it "
                         "was stopped?): what it wrote is gone; merge again")
