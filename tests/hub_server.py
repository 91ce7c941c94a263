"""A Hugging Face Hub on 127.0.0.1 for the tests: repos the test creates, served over the
endpoints huggingface_hub itself calls (model_info, and HEAD/GET of resolve URLs with Range),
answering errors with the status and X-Error-Code headers the Hub sends, so huggingface_hub
raises its own exceptions (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError).

Why our own: hf-local-hub 3.0.0's wheel holds only a client (its server is a Go binary it does
not ship), and olah 0.5.4 serves local repos whole (no Range: a header read would download the
file), has no gated repos, and pulls some twenty packages.  This one also counts the bytes it
sends per file and can cut off or corrupt a download: what the tests measure and break.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Tuple
from urllib.parse import unquote, urlparse

TOKEN = "hf_local_test_token"
# Files stored with Git LFS on the Hub (their ETag is the sha256 and model_info gives it).
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt")


@dataclass
class Repo:
    commits: Dict[str, Dict[str, Path]] = field(default_factory=dict)
    refs: Dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


class LocalHub:
    def __init__(self):
        self.repos: Dict[str, Repo] = {}
        self.bytes_sent: Counter = Counter()  # (repo, file) -> body bytes sent by GET
        self.gets: Counter = Counter()  # (repo, file) -> GET requests
        self.gets_without_range: Counter = Counter()  # ... of the whole file (downloads)
        # (repo, file) -> [n, times]: the next `times` GETs stop after n bytes each
        self.cut_after: Dict[Tuple[str, str], list] = {}
        self.corrupt: Dict[Tuple[str, str], bool] = {}  # GETs flip the file's last byte
        self._hashes: Dict[Path, str] = {}
        self._server: Optional[ThreadingHTTPServer] = None

    # ---- repos ----
    def add_repo(self, repo_id: str, folder: Path, *, revision: str = "main",
                 gated: bool = False, private: bool = False) -> str:
        """Serve every file of `folder` as repo_id at a new commit on branch `revision`;
        returns the commit hash."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated, repo.private = repo.gated or gated, repo.private or private
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file()}
        listing = json.dumps(sorted((n, self._hash(p)) for n, p in files.items()))
        commit = hashlib.sha1(f"{repo_id}{revision}{listing}".encode()).hexdigest()
        repo.commits[commit] = files
        repo.refs[revision] = commit
        return commit

    def _hash(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = _sha256(path)
        return self._hashes[path]

    def sent_for(self, repo_id: str, suffix: str = "") -> int:
        return sum(n for (repo, name), n in self.bytes_sent.items()
                   if repo == repo_id and name.endswith(suffix))

    # ---- server ----
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def sibling(self, name: str, path: Path) -> dict:
        size = path.stat().st_size
        entry = {"rfilename": name, "size": size,
                 "blobId": hashlib.sha1(path.read_bytes()[:1 << 16]).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": self._hash(path), "size": size, "pointerSize": 134}
        return entry


_API = re.compile(r"^/api/models/(?P<repo>.+?)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _error(self, status: int, code: str, message: str = "") -> None:
        body = json.dumps({"error": message or code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _commit(self, repo_id: str, revision: str):
        """(repo, commit) or None after answering the error."""
        repo = self.hub.repos.get(repo_id)
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        if repo is None or (repo.private and not authorized):
            self._error(401 if repo else 404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and not authorized:
            self._error(401, "GatedRepo", "Access to this repo is restricted")
            return None
        revision = unquote(revision)
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo, commit

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        api = _API.match(path)
        if api:
            return self._model_info(api["repo"], api["rev"] or "main")
        resolve = _RESOLVE.match(path)
        if resolve:
            return self._file(resolve["repo"], resolve["rev"], unquote(resolve["file"]))
        self._error(404, "NotFound")

    do_HEAD = do_GET

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                "gated": "auto" if repo.gated else False, "tags": [], "downloads": 0,
                "likes": 0, "siblings": [self.hub.sibling(n, p) for n, p in files.items()]}
        body = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, repo_id: str, revision: str, name: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        path = repo.commits[commit].get(name)
        if path is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        size = path.stat().st_size
        start, end = 0, size - 1
        wanted = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted[1])
            end = min(size - 1, int(wanted[2])) if wanted[2] else size - 1
        partial = wanted is not None
        self.send_response(206 if partial else 200)
        etag = self.hub._hash(path) if name.endswith(LFS_SUFFIXES) else \
            hashlib.sha1(path.read_bytes()).hexdigest()
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_body(repo_id, name, path, start, end)

    def _send_body(self, repo_id: str, name: str, path: Path, start: int, end: int) -> None:
        key = (repo_id, name)
        self.hub.gets[key] += 1
        if "Range" not in self.headers:
            self.hub.gets_without_range[key] += 1
        limit = None
        # Downloads are cut (whole-file GETs and resumptions "bytes=N-"), never a header read.
        downloading = re.fullmatch(r"(bytes=\d+-)?", self.headers.get("Range", "")) is not None
        if downloading and self.hub.cut_after.get(key, [0, 0])[1] > 0:
            limit = self.hub.cut_after[key][0]
            self.hub.cut_after[key][1] -= 1
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                piece = f.read(min(remaining, 1 << 20))
                if not piece:
                    break
                if self.hub.corrupt.get(key) and f.tell() == path.stat().st_size:
                    piece = piece[:-1] + bytes([piece[-1] ^ 0xFF])
                if limit is not None and sent + len(piece) > limit:
                    piece = piece[:max(0, limit - sent)]
                    self.wfile.write(piece)
                    self.hub.bytes_sent[key] += len(piece)
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(piece)
                self.hub.bytes_sent[key] += len(piece)
                sent += len(piece)
                remaining -= len(piece)
