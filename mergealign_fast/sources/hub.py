"""Hugging Face Hub repos as model folders, through huggingface_hub and its conventions: the
shared cache (HF_HOME, HF_HUB_CACHE), the token (HF_TOKEN or `hf auth login`, for gated and
private repos), HF_HUB_OFFLINE, HF_ENDPOINT, revisions as branches, tags or commit hashes.

snapshot_folder(repo, revision) resolves the revision to a commit, downloads the repo's small
files into the cache's snapshot folder of that commit and registers each weight file there
(io/readers.py): until it is downloaded, the plan reads its header by HTTP range requests.
download() then fetches what the merge reads, with huggingface_hub's progress bars and its
retries, and checks each new file's size and sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import MergeError
from ..io import readers
from ..io.checkpoint import (ADAPTER_CONFIG, ADAPTER_LAYOUTS, CONFIG_FILE, TOKENIZER_FILES, WEIGHT_LAYOUTS,
                             index_weight_map, weight_layout)
from ..io.safetensors_format import FormatError
from ..units import human_bytes

COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
# Bytes asked for by the first range request of a file while planning: it must return the
# 8-byte header length and, for most shards, the whole header with it (a 1.1B model's shard
# header is about 20 KB, a 70B model's about 60 KB).
RANGE_BLOCK = 64 << 10
# ... and by each later one: a .bin's zip local headers, 30 bytes and a name each, are read one
# per tensor, so a 300-tensor shard costs 300 KB rather than 300 blocks.
SMALL_RANGE = 1 << 10
# sha256 is computed over a new download in pieces of this size: bounded memory.
HASH_PIECE = 16 << 20


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401  (submodules load lazily otherwise)
        import huggingface_hub.errors  # noqa: F401
    except ImportError:
        raise MergeError("reading models from the Hugging Face Hub needs huggingface_hub: "
                         "pip install 'mergealign-fast[hub]'") from None
    return huggingface_hub


def cache_dir() -> Path:
    """The Hub cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub)."""
    return Path(_hub().constants.HF_HUB_CACHE)


def _endpoint() -> str:
    return _hub().constants.ENDPOINT


def is_offline() -> bool:
    return bool(_hub().constants.HF_HUB_OFFLINE)


def _repo_folder(repo_id: str) -> Path:
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


class RangeReader:
    """A Hub file's bytes by HTTP range requests, one block remembered."""

    def __init__(self, file: "HubFile"):
        self._file = file
        self.size = file.size
        self._block: Tuple[int, bytes] = (0, b"")

    def _fetch(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        block = RANGE_BLOCK if offset == 0 else SMALL_RANGE
        last = min(self.size, offset + max(length, block)) - 1
        headers = {**build_hf_headers(), "Range": f"bytes={offset}-{last}"}
        try:
            response = get_session().get(self._file.url, headers=headers, timeout=30)
            hf_raise_for_status(response)
        except Exception as exc:  # connection and HTTP errors alike: the caller names the file
            raise OSError(f"range read from the Hub failed ({_first_line(exc)})") from None
        content = response.content
        if response.status_code != 206:  # a server ignoring Range sent the whole file
            content = content[offset:last + 1]
        return content

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        start, data = self._block
        if not (start <= offset and offset + length <= start + len(data)):
            self._block = (offset, self._fetch(offset, length))
            start, data = self._block
        return data[offset - start:offset - start + length]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at one commit (readers.RemoteFile)."""

    repo_id: str
    commit: str
    filename: str
    size: int
    sha256: Optional[str]  # the LFS object's hash; None for a file stored in git itself
    cache: Path = field(compare=False)

    @property
    def url(self) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.filename, revision=self.commit,
                          endpoint=_endpoint())

    def open(self) -> RangeReader:
        if is_offline():
            raise OSError("not in the Hub cache, and HF_HUB_OFFLINE is set")
        return RangeReader(self)

    def identity(self) -> tuple:
        """A file at a commit never changes: the commit and name are its identity."""
        return ("hub", self.repo_id, self.commit, self.filename)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hub_problem(repo: str, exc: Exception) -> MergeError:
    """One line for what huggingface_hub raised about `repo` (repo@revision)."""
    errors = _hub().errors
    if isinstance(exc, errors.GatedRepoError):
        return MergeError(f"{repo}: a gated repo: accept its terms on the Hub, then set HF_TOKEN "
                          "(or run `hf auth login`) with an account that has access")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return MergeError(f"{repo}: no such local folder, and no model repo of that name on "
                          f"{_endpoint()} (a private repo needs HF_TOKEN)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return MergeError(f"{repo}: the repo has no such revision (branch, tag or commit)")
    if isinstance(exc, errors.HfHubHTTPError):
        return MergeError(f"{repo}: the Hub answered: {_first_line(exc)}")
    return MergeError(f"{repo}: cannot reach {_endpoint()} ({_first_line(exc)}); with the "
                      "model in the Hub cache, set HF_HUB_OFFLINE=1")


# Resolved once per process: a repo named by several roles, or planned again by a sweep, is
# one snapshot.
_SNAPSHOTS: Dict[Tuple[str, str, Optional[str]], Path] = {}


def snapshot_folder(repo_id: str, revision: Optional[str]) -> Path:
    """The snapshot folder of repo_id at revision, its small files downloaded and its weight
    files registered (module docstring)."""
    key = (_endpoint() if not is_offline() else "offline", repo_id, revision)
    if key not in _SNAPSHOTS:
        resolve = _cached_snapshot if is_offline() else _remote_snapshot
        _SNAPSHOTS[key] = resolve(repo_id, revision)
    return _SNAPSHOTS[key]


def _named(repo_id: str, revision: Optional[str]) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _weight_files(has, folder: Path) -> List[str]:
    """The weight files of a repo whose listing `has` a name, in transformers' order of
    preference (io/checkpoint.weight_layout), or a PEFT adapter's; an index is read from
    `folder` (already down)."""
    layout = weight_layout(has) or next((a for a in ADAPTER_LAYOUTS if has(a[0])), None)
    if layout is None:
        return []
    file, is_index, _ = layout
    if not is_index:
        return [file]
    try:
        return sorted(set(index_weight_map(folder, file).values()))
    except FormatError:
        return []  # open_checkpoint reports the broken index, naming it


def _small_files(names: Sequence[str]) -> List[str]:
    """What a merge reads besides the weights: config, adapter config, tokenizer, generation
    and chat files, and the remote code config.json's auto_map points into (every top-level
    .py file: mergekit's download skipped them)."""
    wanted = {CONFIG_FILE, ADAPTER_CONFIG, *TOKENIZER_FILES}
    wanted |= {file for file, is_index, _ in WEIGHT_LAYOUTS if is_index}
    return sorted(n for n in names if n in wanted or ("/" not in n and n.endswith(".py")))


def _remote_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    hub = _hub()
    named = _named(repo_id, revision)
    try:
        info = hub.HfApi(endpoint=_endpoint()).model_info(repo_id, revision=revision,
                                                          files_metadata=True)
    except Exception as exc:
        raise _hub_problem(named, exc) from None
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    folder = _repo_folder(repo_id) / "snapshots" / commit

    def fetch(name: str) -> Path:
        try:
            return Path(hub.hf_hub_download(repo_id, name, revision=commit,
                                            cache_dir=cache_dir(), endpoint=_endpoint()))
        except Exception as exc:
            raise _hub_problem(f"{named}: {name}", exc) from None

    for name in _small_files(list(siblings)):
        fetch(name)
    _record_ref(repo_id, revision, commit)
    for name in _weight_files(siblings.__contains__, folder):
        if name in siblings:
            lfs = siblings[name].lfs
            sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None))
            readers.register_remote(folder / name, HubFile(
                repo_id, commit, name, int(siblings[name].size or 0), sha256, cache_dir()))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _record_ref(repo_id: str, revision: Optional[str], commit: str) -> None:
    """refs/<revision> in the cache, as huggingface_hub writes it, so HF_HUB_OFFLINE later
    finds this commit by the same name."""
    if revision is None or not COMMIT_HASH.match(revision):
        ref = _repo_folder(repo_id) / "refs" / (revision or "main")
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text().strip() != commit:
            ref.write_text(commit)


def _cached_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    """The snapshot HF_HUB_OFFLINE allows: the cache's, every weight file present."""
    named = _named(repo_id, revision)
    repo = _repo_folder(repo_id)
    commit = revision if revision and COMMIT_HASH.match(revision) else None
    ref = repo / "refs" / (revision or "main")
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    folder = repo / "snapshots" / str(commit)
    if commit is None or not folder.is_dir():
        raise MergeError(f"{named}: not in the Hub cache ({cache_dir()}) and HF_HUB_OFFLINE is "
                         "set: download it once online, or unset HF_HUB_OFFLINE")
    weights = _weight_files(lambda name: os.path.lexists(folder / name), folder)
    missing = [n for n in weights if not (folder / n).is_file()]
    if not weights:
        raise MergeError(f"{named}: its weights are not in the Hub cache ({folder}) and "
                         "HF_HUB_OFFLINE is set: unset it to download them")
    if missing:
        raise MergeError(f"{named}: {len(missing)} weight files are not in the Hub cache "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) and "
                         "HF_HUB_OFFLINE is set: unset it to download them")
    for name in weights:
        readers.register_remote(folder / name, HubFile(
            repo_id, commit, name, (folder / name).stat().st_size, None, cache_dir()))
    return folder


def download(paths: Sequence[Path], show_progress: bool = True) -> None:
    """Download each Hub file at `paths` (registered, not yet in the cache), then check it;
    show_progress False (--quiet) hides huggingface_hub's bars and our line."""
    files = [readers.remote_file(p) for p in paths]
    total = sum(f.size for f in files)
    if show_progress:
        print(f"downloading {len(files)} files ({human_bytes(total)}) from {_endpoint()} into "
              f"{cache_dir()}", file=sys.stderr)
    hub = _hub()
    bars = None if show_progress else _silent_bars()
    for path, file in zip(paths, files):
        try:
            hub.hf_hub_download(file.repo_id, file.filename, revision=file.commit,
                                cache_dir=file.cache, endpoint=_endpoint(), tqdm_class=bars)
        except Exception as exc:
            raise MergeError(f"{file.repo_id}: downloading {file.filename} failed "
                             f"({_first_line(exc)}); run the same command again (the files "
                             "already downloaded stay in the cache)") from None
        _check_download(path, file)


def _silent_bars():
    """huggingface_hub's progress bar class (tqdm), always disabled: --quiet."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
    return Silent


def _check_download(path: Path, file: HubFile) -> None:
    """A download's size and sha256 against the repo's record; a bad file is removed from the
    cache (blob and link), so the next run downloads it again."""
    size = path.stat().st_size
    problem = None
    if size != file.size:
        problem = f"is {size} bytes, the repo says {file.size}"
    elif file.sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for piece in iter(lambda: f.read(HASH_PIECE), b""):
                digest.update(piece)
        if digest.hexdigest() != file.sha256:
            problem = (f"has sha256 {digest.hexdigest()[:12]}..., the repo says "
                       f"{file.sha256[:12]}...")
    if problem:
        blob = path.resolve()
        path.unlink()
        if blob != path and blob.exists():
            blob.unlink()
        raise MergeError(f"{file.repo_id}: the download of {file.filename} is corrupt (it "
                         f"{problem}): removed from the cache; run the same command again")
