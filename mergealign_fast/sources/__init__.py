"""Where a model given by the user is: a local folder, or a Hugging Face Hub repo id
("org/name", "org/name@revision" as mergekit writes it) resolved to its folder in the Hub cache
(hub.py).  A local folder of the same name wins, as in mergekit.  `BASE+ADAPTER` (mergekit's
syntax) is BASE with a PEFT LoRA adapter applied, each part a folder or repo id; an adapter
given alone stands on the base its adapter_config.json names (io/adapters.py).

Resolving a repo id downloads only its small files (config, index, tokenizer, remote code);
its weights are read by range requests until the plan has passed every check, and then
downloaded (download_inputs) right before the merge reads them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import MergeError, each_role
from ..io.adapters import AdaptedFolder, is_adapter_folder, read_adapter_config
from ..io.checkpoint import ADAPTER_CONFIG

# huggingface_hub's rule for repo ids: an optional namespace and a name of letters, digits and
# "-_.", no "--" or "..", at most 96 characters.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
REPO_ID_MAX = 96


def hub_reference(spec: str) -> Optional[Tuple[str, Optional[str]]]:
    """(repo id, revision or None) when `spec` can name a Hub repo, else None."""
    repo_id, at, revision = spec.partition("@")
    if (not _REPO_ID.match(repo_id) or len(repo_id) > REPO_ID_MAX or "--" in repo_id
            or ".." in repo_id or repo_id.endswith((".git", ".")) or (at and not revision)):
        return None
    return repo_id, revision or None


def model_folder(spec) -> Path:
    """The folder of the model `spec` names: a local path as given (when it exists, or when it
    cannot be a repo id), else the Hub repo's snapshot folder in the cache; for an adapter
    (BASE+ADAPTER, or an adapter folder alone) an AdaptedFolder.  MergeError names the repo
    and problem (no such repo, gated, no such revision, offline and not cached)."""
    if isinstance(spec, AdaptedFolder):
        return spec
    text = os.fspath(spec)
    if "+" in text and not Path(text).expanduser().exists():
        return _adapted(text)
    folder = _folder(text)
    if not is_adapter_folder(folder):
        return folder
    named = read_adapter_config(folder).base_model
    if named is None:
        raise MergeError(f"{folder}: a PEFT adapter whose {ADAPTER_CONFIG} names no "
                         f"base_model_name_or_path: give it as BASE+{text}")
    try:
        return AdaptedFolder(folder, _folder(named))
    except MergeError as exc:
        raise MergeError(f"{folder}: the adapter's base {named} (base_model_name_or_path): "
                         f"{exc}; or give it as BASE+{text}") from None


def _adapted(text: str) -> AdaptedFolder:
    """BASE+ADAPTER: mergekit splits at the one '+'."""
    parts = text.split("+")
    if len(parts) != 2 or not all(parts):
        raise MergeError(f"{text}: a model is a folder or repo id, or BASE+ADAPTER with one '+'")
    base_spec, adapter_spec = parts
    base, adapter = model_folder(base_spec), _folder(adapter_spec)
    if isinstance(base, AdaptedFolder):
        raise MergeError(f"{text}: {base_spec} is itself an adapter: apply one adapter to a "
                         "full model")
    if not is_adapter_folder(adapter):
        raise MergeError(f"{adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    return AdaptedFolder(adapter, base)


def _folder(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    reference = hub_reference(os.fspath(spec))
    if reference is None:
        return path  # open_checkpoint says "not a directory"
    from . import hub

    return hub.snapshot_folder(*reference)


def model_folders(specs: Dict[str, object]) -> Tuple[Dict[str, Path], List[str]]:
    """model_folder for each role; every problem, one line each, prefixed with its role."""
    return each_role(model_folder, specs)


def download_inputs(paths: Iterable[Path], show_progress: bool = True) -> None:
    """Download the Hub files among `paths` that are not in the cache yet (nothing to do for
    local models), with huggingface_hub's progress bars unless show_progress is False."""
    from ..io import readers

    pending = sorted({Path(p) for p in paths if readers.is_remote(p)})
    if pending:
        from . import hub

        hub.download(pending, show_progress)


def pending_download_bytes(paths: Iterable[Path]) -> Dict[Path, int]:
    """{the Hub cache folder: bytes still to download there} for the Hub files among `paths`."""
    from ..io import readers

    needed: Dict[Path, int] = {}
    for path in {Path(p) for p in paths if readers.is_remote(p)}:
        remote = readers.remote_file(path)
        needed[remote.cache] = needed.get(remote.cache, 0) + remote.size
    return needed
