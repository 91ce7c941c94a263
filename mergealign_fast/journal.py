"""The partial output of a merge: its folder, lock, journal and the manifest it leaves in OUT.

A merge writes into a hidden folder beside OUT, `.OUT.mergealign-partial`, holding an exclusive
lock on a file inside it for as long as it runs: a second merge aimed at the same OUT fails at
once, merges into different folders run side by side.  After each completed shard the journal
(`mergealign-manifest.json` in that folder, replaced atomically) records the shard's size and
CRC-32C, so a merge that was killed, interrupted or ran out of disk can be finished with
`--resume`: shards whose checksum still matches are kept, the rest are written again.  The same
file, completed, stays in OUT as the manifest that `mergealign-fast verify` checks.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from .errors import MergeError

MANIFEST = "mergealign-manifest.json"
LOCK = ".lock"
PARTIAL_SUFFIX = ".mergealign-partial"
FORMAT = "mergealign-fast manifest 1"
# Checksums are read back in windows this large, released as they go (bounded memory).
CHECK_WINDOW = 64 << 20


def partial_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"


def crc_hex(crc: int) -> str:
    return f"{crc:08x}"


def file_crc32c(path: Path) -> int:
    """CRC-32C of a whole file, read through a memory map in released windows."""
    from .kernels import cpu

    native = cpu.native()
    mapped = native.MappedFile(str(path))
    try:
        crc = 0
        for offset in range(0, mapped.size, CHECK_WINDOW):
            length = min(CHECK_WINDOW, mapped.size - offset)
            mapped.prefetch(offset + length, length)
            crc = native.crc32c(mapped.address + offset, length, crc)
            mapped.release(offset, length)
        return crc
    finally:
        mapped.close()


def input_identities(plan) -> Dict[Path, tuple]:
    """(device, inode, size, mtime) of every input file: what 'unchanged' means."""
    identities = {}
    for checkpoint in plan.inputs.values():
        for path in checkpoint.files:
            st = os.stat(path)
            identities[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return identities


def plan_fingerprint(plan) -> str:
    """Identity of a merge: its inputs (path, device, inode, size, mtime), options and layout.
    A partial merge is resumed only by a merge with the same fingerprint."""
    stats = sorted((str(path.resolve()), identity)
                   for path, identity in input_identities(plan).items())
    o = plan.options
    layout = [(s.filename, hashlib.sha256(s.header).hexdigest()) for s in plan.shards]
    key = json.dumps([stats, o.domain_weight, o.align_weight, repr(o.method), layout],
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def method_parameters(method) -> dict:
    """The method's parameters as the manifest records them (rules as text)."""
    described = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
                 if f.name not in ("name", "rules")}
    if method.rules:
        described["rules"] = [repr(rule) for rule in method.rules]
    return described


def describe_inputs(plan) -> Dict[str, dict]:
    """What the manifest says about each input model: its folder and files with size and mtime."""
    described = {}
    for role, checkpoint in plan.inputs.items():
        stats = {f: f.stat() for f in checkpoint.files}
        files = {f.name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
                 for f, st in stats.items()}
        described[role] = {"folder": str(checkpoint.folder.resolve()), "files": files}
    return described


class PartialOutput:
    """The locked hidden folder one merge writes into."""

    def __init__(self, plan, version: str):
        self.plan = plan
        self.out_dir = plan.out_dir
        self.folder = partial_dir_for(plan.out_dir)
        self.fingerprint = plan_fingerprint(plan)
        self.version = version
        self.lock_fd: Optional[int] = None
        self.shards: Dict[str, dict] = {}

    # -- opening: lock, then decide between fresh start, resume and refusal --------------------

    def open(self, resume: bool, force: bool) -> "PartialOutput":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(exist_ok=True)
        self.lock_fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise MergeError(f"another merge into {self.out_dir} is running now (it holds "
                             f"{self.folder}); wait for it or choose another output") from None
        leftovers = [p for p in self.folder.iterdir() if p.name != LOCK]
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
        try:
            journal = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return  # killed before the first shard completed: nothing to keep
        if journal.get("fingerprint") != self.fingerprint:
            self.close()
            raise MergeError(f"the interrupted merge in {self.folder} was started with other "
                             "inputs or options (or an input changed since): rerun it as it was, "
                             "or use --force to start over")
        self.shards = dict(journal.get("shards", {}))

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock
            self.lock_fd = None

    # -- shards ---------------------------------------------------------------------------------

    def shard_is_complete(self, name: str, size: int) -> bool:
        """True for a shard the journal records and whose file still has that size and CRC."""
        recorded = self.shards.get(name)
        path = self.folder / name
        if not recorded or recorded["size"] != size or not path.is_file() \
                or path.stat().st_size != size:
            return False
        return crc_hex(file_crc32c(path)) == recorded["crc32c"]

    def record_shard(self, name: str, size: int, crc: int, fsync: bool) -> None:
        self.shards[name] = {"size": size, "crc32c": crc_hex(crc)}
        self._write_manifest(fsync)

    def _write_manifest(self, fsync: bool) -> None:
        o = self.plan.options
        manifest = {
            "format": FORMAT, "tool": f"mergealign-fast {self.version}",
            "method": o.method.name, "method_parameters": method_parameters(o.method),
            "domain_weight": o.domain_weight, "align_weight": o.align_weight,
            "out_dtype": o.out_dtype.short_name if o.out_dtype is not None else "base",
            "inputs": describe_inputs(self.plan), "fingerprint": self.fingerprint,
            "shards": dict(sorted(self.shards.items())),
        }
        staging = self.folder / (MANIFEST + ".new")
        with open(staging, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(staging, self.folder / MANIFEST)

    def discard_if_empty(self) -> bool:
        """After a failure: remove the folder when no shard was completed (nothing to resume).
        Returns True when it was removed."""
        if self.shards:
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        return True

    def release_lock_file(self) -> None:
        """Remove the lock file before the folder becomes OUT (the lock itself stays held)."""
        (self.folder / LOCK).unlink(missing_ok=True)


def verify_output(out_dir: Path) -> List[str]:
    """Problems with a merged folder, checked against its manifest; [] when all is well."""
    from .io.checkpoint import open_checkpoint

    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except OSError:
        return [f"{out_dir}: no {MANIFEST}: not written by mergealign-fast, or not finished"]
    except ValueError as exc:
        return [f"{out_dir / MANIFEST}: not valid JSON: {exc}"]
    if manifest.get("format") != FORMAT:
        return [f"{out_dir / MANIFEST}: unknown format {manifest.get('format')!r}"]
    problems = []
    try:
        checkpoint = open_checkpoint(out_dir)
        files = {f.name for f in checkpoint.files}
        if files != set(manifest["shards"]):
            problems.append(f"{out_dir}: the index names shards {sorted(files)} but the manifest "
                            f"records {sorted(manifest['shards'])}")
    except MergeError as exc:
        problems.append(str(exc))
    for name, recorded in sorted(manifest.get("shards", {}).items()):
        problems += _shard_problems(out_dir / name, recorded)
    return problems


def _shard_problems(path: Path, recorded: dict) -> List[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    size = path.stat().st_size
    if size != recorded["size"]:
        return [f"{path}: {size:,} bytes, the merge wrote {recorded['size']:,}"]
    actual = crc_hex(file_crc32c(path))
    if actual != recorded["crc32c"]:
        return [f"{path}: CRC-32C {actual} but the merge recorded {recorded['crc32c']}: the "
                "file changed or is corrupt"]
    return []
