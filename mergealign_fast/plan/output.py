"""The output's checks: the output folder (not an input, not occupied unless --force or
--resume, a completed merge recognised), and the disk space the merge needs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import PlanError
from ..output.manifest import merge_differences, plan_fingerprint, read_manifest
from ..output import not_a_model_problem, out_dir_problems, overlap_problems, partial_dir_for
from ..sources import pending_download_bytes
from .model import MergePlan
from .options import DISK_HEADROOM_BYTES, MergeOptions


def output_problems(given, out: Path, folders: Dict[str, Path],
                     options: MergeOptions) -> List[str]:
    """Problems with OUT (`given` as typed, `out` resolved).  A non-empty OUT is left to
    _completed_output when resuming: it may be this very merge, finished."""
    problems = out_dir_problems(given, out)
    if problems:  # OUT itself cannot be published to: what else is true of it does not matter
        return problems
    problems += overlap_problems(given, out, {role: [f] for role, f in folders.items()})
    if out.exists() and not out.is_dir():
        problems.append(f"output {given} exists and is not a directory")
    elif _is_occupied(out) and not (options.force or options.resume):
        problems.append(f"output {given} exists and is not empty: use --force to replace it")
    elif _is_occupied(out) and not problems:
        problems += filter(None, [not_a_model_problem(given, out)])
    return problems


def _is_occupied(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


def _completed_output(plan: "MergePlan", given) -> bool:
    """With --resume and without --force, a non-empty OUT must be this merge, complete (True);
    PlanError otherwise."""
    if plan.options.force or not _is_occupied(plan.out_dir):
        return False
    recorded = read_manifest(plan.out_dir)
    if not recorded:
        raise PlanError([f"output {given} exists and is not empty: use --force to replace it"])
    if recorded.get("fingerprint") != plan_fingerprint(plan):
        changes = "; ".join(merge_differences(recorded, plan))
        raise PlanError([f"output {given} holds another merge ({changes}): use --force to "
                         "replace it"])
    return True


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


# A file takes whole blocks: each of the output's files is counted rounded up to this (the
# common 4 KiB of ext4 and xfs); the manifest is budgeted at this many bytes per shard.
BLOCK_BYTES = 4096
MANIFEST_BYTES_PER_SHARD = 256


def _blocks(nbytes: int) -> int:
    return -(-nbytes // BLOCK_BYTES) * BLOCK_BYTES


def output_files(plan: MergePlan) -> int:
    """How many files OUT gets: shards, side files (index, config, tokenizer...), manifest."""
    return len(plan.shards) + 2 + len(plan.copied_files) + len(plan.written_files)


def output_needs(plan: MergePlan) -> int:
    """The disk bytes a merge still has to take: its shards, side files and manifest in whole
    blocks, less what its hidden folder already holds (shards --resume keeps, or leftovers
    --force deletes before writing)."""
    if plan.complete:
        return 0
    side = sum(_blocks(f.stat().st_size) for f in plan.copied_files if f.is_file())
    side += sum(_blocks(len(data)) for data in plan.written_files.values())
    side += _blocks(64 << 10) * 2  # config.json and the index: small, budgeted at 64 KiB
    manifest = _blocks(BLOCK_BYTES + MANIFEST_BYTES_PER_SHARD * len(plan.shards))
    total = sum(_blocks(s.size) for s in plan.shards) + side + manifest
    return max(0, total - _bytes_held(partial_dir_for(plan.out_dir)))


def _bytes_held(folder: Path) -> int:
    if folder.is_symlink() or not folder.is_dir():
        return 0
    return sum(_blocks(f.stat().st_size) for f in folder.iterdir()
               if f.is_file() and not f.is_symlink())


def disk_problems(out_dir: Path, needed: int, downloads: Optional[Dict[Path, int]] = None,
                  files: int = 0) -> List[str]:
    """Free space for OUT's `needed` bytes and for the Hub downloads still to make ({cache
    folder: bytes}), summed per filesystem: a cache on OUT's disk needs room for both."""
    wanted: Dict[int, list] = {}
    for folder, nbytes, what in [(out_dir.parent, needed, f"the merge writes to {out_dir}"),
                                 *[(c, n, f"downloads into {c}")
                                   for c, n in (downloads or {}).items()]]:
        existing = existing_ancestor(Path(folder))
        entry = wanted.setdefault(existing.stat().st_dev, [0, existing, []])
        entry[0] += nbytes
        entry[2].append(f"{what}: {nbytes:,} bytes")
    problems = []
    for nbytes, existing, parts in wanted.values():
        free = shutil.disk_usage(existing).free
        if nbytes + DISK_HEADROOM_BYTES > free:
            problems.append(f"not enough free disk for {out_dir}: {'; '.join(parts)} (and "
                            f"{DISK_HEADROOM_BYTES >> 20} MiB of slack); {free:,} bytes are free "
                            "on that filesystem")
    inodes = _free_inodes(existing_ancestor(Path(out_dir).parent))
    if inodes is not None and files > inodes:
        problems.append(f"not enough free inodes for {out_dir}: the merge creates {files} "
                        f"files, the filesystem has room for {inodes} more")
    return problems


def _free_inodes(folder: Path) -> Optional[int]:
    """Files that can still be created there (None: no fixed limit, as on btrfs)."""
    vfs = os.statvfs(folder)
    return vfs.f_favail if vfs.f_files else None


def _paths_read(plan: MergePlan) -> Dict[str, List[Path]]:
    """Each input's folder and the local files read from it (a Hub file not downloaded yet is
    left out: it will be written into the Hub cache, not read from OUT)."""
    read = set(plan.files_read())
    return {role: [Path(c.folder), *(f for f in c.files if f in read and os.path.lexists(f))]
            for role, c in plan.inputs.items()}


def checked_output(plan: MergePlan, given, folders: Optional[Dict[str, Path]] = None
                   ) -> MergePlan:
    """The last checks of a laid-out plan: OUT as `given` (with `folders`, the inputs, when
    they were not checked yet), this very merge already complete (--resume), the disk."""
    if plan.tensor_count == 0:  # (an empty weight map: what no loader would call a model)
        raise PlanError([f"nothing to merge: the inputs hold no tensors ("
                         f"{', '.join(str(c.folder) for c in plan.inputs.values())})"])
    problems = output_problems(given, plan.out_dir, folders, plan.options) \
        if folders is not None else []
    problems = problems or overlap_problems(given, plan.out_dir, _paths_read(plan))
    if problems:
        raise PlanError(problems)
    plan.complete = plan.options.resume and _completed_output(plan, given)
    if not plan.complete:
        downloads = pending_download_bytes(plan.files_read())
        disk = disk_problems(plan.out_dir, output_needs(plan), downloads, output_files(plan))
        if disk:
            raise PlanError(disk)
    return plan
