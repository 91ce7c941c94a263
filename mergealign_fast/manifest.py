"""The manifest a merge leaves in OUT, and `mergealign-fast verify`, which checks OUT against it.

The manifest (`mergealign-manifest.json`) records what was merged (method, weights, inputs with
their sizes and times), a fingerprint of the merge's identity, and the size and CRC-32C of every
shard.  While a merge runs, the same file in the partial folder is its journal (output.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, List

from .errors import MergeError
from .io.checkpoint import open_checkpoint
from .kernels import cpu
from .stream import input_identities

MANIFEST = "mergealign-manifest.json"
FORMAT = "mergealign-fast manifest 1"
# Checksums are read back in windows this large, released as they go (bounded memory).
CHECK_WINDOW = 64 << 20


def crc_hex(crc: int) -> str:
    return f"{crc:08x}"


def file_crc32c(path: Path) -> int:
    """CRC-32C of a whole file, read through a memory map in released windows."""
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


def plan_fingerprint(plan) -> str:
    """Identity of a merge: its inputs (path, device, inode, size, mtime), options and layout.
    A partial merge is resumed only by a merge with the same fingerprint."""
    stats = sorted((str(path.resolve()), identity)
                   for path, identity in input_identities(plan.inputs.values()).items())
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


def manifest_document(plan, version: str, fingerprint: str, shards: Dict[str, dict]) -> dict:
    o = plan.options
    return {
        "format": FORMAT, "tool": f"mergealign-fast {version}",
        "method": o.method.name, "method_parameters": method_parameters(o.method),
        "domain_weight": o.domain_weight, "align_weight": o.align_weight,
        "out_dtype": o.out_dtype.short_name if o.out_dtype is not None else "base",
        "inputs": describe_inputs(plan), "fingerprint": fingerprint,
        "shards": dict(sorted(shards.items())),
    }


def verify_output(out_dir: Path) -> List[str]:
    """Problems with a merged folder, checked against its manifest; [] when all is well."""
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
