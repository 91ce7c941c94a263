"""The output's checks: the output folder (not an input, not occupied unless --force or
--resume, a completed merge recognised), and the disk space the merge needs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import PlanError
from ..output.manifest import merge_differences, plan_fingerprint, read_manifest
from ..output import out_dir_problems
from ..sources import pending_download_bytes
from .model import MergePlan
from .options import DISK_HEADROOM_BYTES, MergeOptions


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def output_problems(given, out: Path, folders: Dict[str, Path],
                     options: MergeOptions) -> List[str]:
    """Problems with OUT (`given` as typed, `out` resolved).  A non-empty OUT is left to
    _completed_output when resuming: it may be this very merge, finished."""
    problems = out_dir_problems(given, out)
    if problems:  # OUT itself cannot be published to: what else is true of it does not matter
        return problems
    for role, folder in folders.items():
        src = folder.resolve()
        if _is_within(out, src) or _is_within(src, out):
            problems.append(f"output {given} overlaps the {role} model folder {folder}: "
                            "choose another output folder")
    if out.exists() and not out.is_dir():
        problems.append(f"output {given} exists and is not a directory")
    elif _is_occupied(out) and not (options.force or options.resume):
        problems.append(f"output {given} exists and is not empty: use --force to replace it")
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


def disk_problems(out_dir: Path, needed: int, downloads: Optional[Dict[Path, int]] = None
                  ) -> List[str]:
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
            problems.append(f"not enough free disk for {out_dir}: {'; '.join(parts)}; "
                            f"{free:,} bytes are free on that filesystem")
    return problems


def checked_output(plan: MergePlan, given, folders: Optional[Dict[str, Path]] = None
                   ) -> MergePlan:
    """The last checks of a laid-out plan: OUT as `given` (with `folders`, the inputs, when
    they were not checked yet), this very merge already complete (--resume), the disk."""
    if folders is not None:
        problems = output_problems(given, plan.out_dir, folders, plan.options)
        if problems:
            raise PlanError(problems)
    plan.complete = plan.options.resume and _completed_output(plan, given)
    if not plan.complete:
        downloads = pending_download_bytes(plan.files_read())
        disk = disk_problems(plan.out_dir, plan.output_bytes, downloads)
        if disk:
            raise PlanError(disk)
    return plan
