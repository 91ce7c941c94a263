"""The manifest a merge leaves in OUT, and `mergealign-fast verify`, which checks OUT against it.

The manifest (`mergealign-manifest.json`) records what was merged (method, weights, inputs with
their sizes and times), a fingerprint of the merge's identity, and the size and CRC-32C of every
shard.  While a merge runs, the same file in the partial folder is its journal (output.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import json
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import MergeError
from ..io.checkpoint import ADAPTER_CONFIG, ADAPTER_LAYOUTS, open_checkpoint
from ..kernels import cpu
from ..io import readers
from ..io.stream import input_identities
from ..io import json_text

MANIFEST = "mergealign-manifest.json"
FORMAT = "mergealign-fast manifest 1"
# Checksums are read back in windows this large, released as they go (bounded memory).
CHECK_WINDOW = 64 << 20


def crc_hex(crc: int) -> str:
    return f"{crc:08x}"


def file_crc32c(path: Path) -> int:
    """CRC-32C of a whole file, read through a memory map in released windows."""
    native = cpu.native()
    mapped = native.MappedFile(os.fsencode(path))  # (bytes: any folder name, UTF-8 or not)
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


def read_manifest(folder: Path) -> dict:
    """The manifest (or journal) in `folder`; {} when there is none or it cannot be read (a
    merge killed before its first shard completed leaves none)."""
    try:
        manifest = json_text.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if damage_of(manifest) is None else {}


def damage_of(manifest) -> Optional[str]:
    """What is malformed in a manifest or journal as read (None when it is well formed): the
    shards and side files it records must each have a whole size and a CRC-32C.  A damaged
    journal is no journal (--resume starts that merge over); `verify` reports the damage."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for key in ("shards", "files"):
        records = manifest.get(key, {})
        if not isinstance(records, dict):
            return f"its {key!r} is not an object"
        for name, record in records.items():
            if not (isinstance(record, dict) and type(record.get("size")) is int
                    and isinstance(record.get("crc32c"), str) and "/" not in name):
                return f"its record of {name!r} under {key!r} is damaged"
    return None


def plan_fingerprint(plan) -> str:
    """Identity of a merge: its inputs (path, device, inode, size, mtime), options and layout.
    A partial merge is resumed only by a merge with the same fingerprint."""
    stats = sorted((str(path), identity) for path, identity in recorded_identities(plan).items())
    o = plan.options
    layout = [(s.filename, hashlib.sha256(s.header).hexdigest()) for s in plan.shards]
    identity = [stats, o.domain_weight, o.align_weight, repr(o.method), layout]
    if o.input_dtype is not None:  # (absent before inputs could be cast: old keys still hold)
        identity.append(o.input_dtype.short_name)
    if o.vocabulary is not None:  # (likewise: merges by index keep their keys)
        identity.append(vocabulary_record(o.vocabulary))
    if o.compute_dtype != "fp32":  # (likewise: merges in this engine's arithmetic)
        identity.append(o.compute_dtype)
    identity.append(side_file_digests(plan))  # what OUT holds besides tensors is the merge too
    key = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


# Side files are hashed in pieces this large (a tokenizer.json may be hundreds of MB).
DIGEST_PIECE = 8 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(DIGEST_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def side_file_digests(plan) -> Dict[str, str]:
    """name -> SHA-256 of config.json and of each file copied into OUT from an input (the
    tokenizer, generation config, chat template...).  A merge with another tokenizer source,
    or over an input whose side file was edited, is another merge: --resume does not call it
    complete.  Files the merge writes itself (a merged tokenizer, a config run's README and
    mergekit_config.yml) follow from what the fingerprint already holds, and are added to a
    plan only after its output is checked, so they are not part of it."""
    digests = {source.name: _file_digest(source) for source in plan.copied_files}
    if plan.config is not None:
        digests["config.json"] = hashlib.sha256(
            json.dumps(plan.config, sort_keys=True).encode()).hexdigest()
    return dict(sorted(digests.items()))


def method_parameters(method) -> dict:
    """The method's parameters as the manifest records them (rules as text)."""
    described = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
                 if f.name not in ("name", "rules")}
    if method.rules:
        described["rules"] = [repr(rule) for rule in method.rules]
    return described


_IDENTITY_FIELDS = ("device", "inode", "size", "mtime_ns", "ctime_ns")
# The options a manifest records, whose change makes another merge.
_OPTION_FIELDS = ("method", "method_parameters", "domain_weight", "align_weight", "out_dtype",
                  "input_dtype", "compute_dtype", "max_shard_size", "vocabulary")


def vocabulary_record(spec) -> Optional[dict]:
    """A merge by token's VocabularySpec as the manifest records it (None: rows by index)."""
    if spec is None:
        return None
    record = {"source": spec.source, "has_base": spec.has_base,
              "pad_to_multiple_of": spec.pad_to_multiple_of,
              "tokens": {token: dataclasses.asdict(source) for token, source in spec.tokens}}
    if spec.source_folder is not None:
        record["source_folder"] = str(spec.source_folder)
    return record


def recorded_identities(plan) -> Dict[Path, tuple]:
    """Each input file's identity (checkpoint_identities) of a merge's inputs."""
    return checkpoint_identities(plan.inputs.values())


def checkpoint_identities(checkpoints) -> Dict[Path, tuple]:
    """Each file's identity: a local file's (stream.file_identity: device, inode, size,
    mtime, ctime, of the resolved path), a Hub file's repo, commit and name (the same before
    and after it is downloaded, so --resume knows it)."""
    checkpoints = list(checkpoints)
    local = input_identities(checkpoints)
    identities = {}
    for checkpoint in checkpoints:
        for path in checkpoint.files:
            remote = readers.remote_file(path)
            identities[path if remote else path.resolve()] = \
                remote.identity() if remote else local[path]
    return identities


def _file_record(identity: tuple) -> dict:
    if identity[0] == "hub":
        return dict(zip(("source", "repo", "commit", "file"), identity))
    return dict(zip(_IDENTITY_FIELDS, identity))


def describe_inputs(plan) -> Dict[str, dict]:
    """What the manifest says about each input model: its folder (and for a Hub model its repo
    and commit), and each file's identity (recorded_identities)."""
    identities = recorded_identities(plan)
    described = {}
    for role, checkpoint in plan.inputs.items():
        files = {}
        for f in checkpoint.files:
            remote = readers.remote_file(f)
            files[f.name] = _file_record(identities[f if remote else f.resolve()])
        described[role] = {"folder": str(checkpoint.folder.resolve()), "files": files}
        base = getattr(checkpoint.folder, "base", None)  # an adapter applied to this base
        if base is not None:
            described[role]["adapter_on"] = str(Path(base).resolve())
        first = readers.remote_file(checkpoint.files[0]) if checkpoint.files else None
        if first is not None:
            described[role].update(repo=first.repo_id, commit=first.commit)
    return described


def manifest_document(plan, version: str, fingerprint: str, shards: Dict[str, dict],
                      side_files: Optional[Dict[str, dict]] = None) -> dict:
    o = plan.options
    return {
        "format": FORMAT, "tool": f"mergealign-fast {version}",
        "method": o.method.name, "method_parameters": method_parameters(o.method),
        "domain_weight": o.domain_weight, "align_weight": o.align_weight,
        "out_dtype": o.out_dtype.short_name if o.out_dtype is not None
        else "promoted" if o.promote_mixed else "base",
        "input_dtype": o.input_dtype.short_name if o.input_dtype is not None else "stored",
        "compute_dtype": o.compute_dtype,
        "max_shard_size": o.max_shard_size, "vocabulary": vocabulary_record(o.vocabulary),
        "inputs": describe_inputs(plan), "fingerprint": fingerprint,
        "shards": dict(sorted(shards.items())),
        "files": dict(sorted((side_files or {}).items())),
        "side_files": side_file_digests(plan),
    }


def nonfinite_counts(shards: Dict[str, dict]) -> Dict[str, int]:
    """Per tensor, the NaN/inf values the shards of a manifest record."""
    return {tensor: count for shard in shards.values()
            for tensor, count in shard.get("nonfinite", {}).items()}


def _same(a, b) -> bool:
    """Equal as JSON (a NaN weight equals itself; tuples equal the lists JSON read back)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def merge_differences(recorded: dict, plan) -> List[str]:
    """How the merge a manifest (or journal) records differs from `plan`, one line each: which
    input file changed and how, which option has another value."""
    now = manifest_document(plan, "", "", {})
    lines = []
    for role, then in recorded.get("inputs", {}).items():
        current = now["inputs"].get(role, {})
        if then.get("folder") != current.get("folder"):
            lines.append(f"input {role}: was {then.get('folder')}, now {current.get('folder')}")
            continue
        files_then, files_now = then.get("files", {}), current.get("files", {})
        for name in sorted(set(files_then) | set(files_now)):
            a, b = files_then.get(name), files_now.get(name)
            if a is None or b is None:
                lines.append(f"input {role}: {name} was {'added' if a is None else 'removed'}")
            elif not _same(a, b):
                changed = ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                lines.append(f"input {role}: {current['folder']}/{name} changed since then "
                             f"({changed})")
    for key in _OPTION_FIELDS:
        if not _same(recorded.get(key), now[key]):
            lines.append(f"option {key}: {recorded.get(key)!r} then, {now[key]!r} now")
    then, files_now = recorded.get("side_files") or {}, now["side_files"]
    for name in sorted(set(then) | set(files_now)):
        if then.get(name) != files_now.get(name):
            how = ("is written now, not then" if name not in then else
                   "was written then, not now" if name not in files_now else "differs")
            lines.append(f"side file {name} {how} (another tokenizer or config source, or an "
                         "input's file edited since)")
    return lines or ["the output layout differs (another dtype or shard size)"]


def verify_output(out_dir: Path) -> List[str]:
    """Problems with a merged folder, checked against its manifest; [] when all is well."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return [f"{out_dir}: does not exist"]
    if not out_dir.is_dir():
        return [f"{out_dir}: not a directory (give the merged model's folder)"]
    try:
        manifest = json_text.loads((out_dir / MANIFEST).read_text())
    except OSError:
        return [f"{out_dir}: no {MANIFEST}: not written by mergealign-fast, or not finished"]
    except ValueError as exc:
        return [f"{out_dir / MANIFEST}: not valid JSON: {exc}"]
    damage = damage_of(manifest)
    if damage is not None:
        return [f"{out_dir / MANIFEST}: damaged manifest ({damage})"]
    if manifest.get("format") != FORMAT:
        return [f"{out_dir / MANIFEST}: unknown format {manifest.get('format')!r}"]
    problems = []
    try:
        files = _weight_file_names(out_dir)
        if files != set(manifest.get("shards", {})):
            problems.append(f"{out_dir}: the index names shards {sorted(files)} but the manifest "
                            f"records {sorted(manifest.get('shards', {}))}")
    except MergeError as exc:
        problems.append(str(exc))
    for name, recorded in sorted({**manifest.get("shards", {}),
                                  **manifest.get("files", {})}.items()):
        problems += _file_problems(out_dir / name, recorded)
    return problems


def _weight_file_names(folder: Path) -> set:
    """The weight files of a merged model, or of an extracted adapter."""
    if (folder / ADAPTER_CONFIG).is_file():
        return {name for name, _, _ in ADAPTER_LAYOUTS if (folder / name).is_file()}
    return {f.name for f in open_checkpoint(folder).files}


def _file_problems(path: Path, recorded: dict) -> List[str]:
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
