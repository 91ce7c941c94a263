"""A stateful torture test of the command line: random sequences of what users do to a merge.

A hypothesis state machine drives merges and sweeps (with --force, --resume or neither),
SIGKILL/SIGINT/SIGTERM at random moments, inputs rewritten in place (their times put back or
not) or replaced, OUT symlinked elsewhere or moved away, a second merge at the same time, a full
disk, a broken stderr (`2>/dev/full`), a merge stopped (SIGSTOP) while its hidden folder is
removed and another merge runs, `--force` into a folder that is not a model, OUT's hidden
folder made a link to an input, `verify`, and merges whose domain model is a Hub repo on a
local server (hub_server.py: killed while it downloads, its download cut off once, its cache
files removed between runs),
against a model of what must hold after every step:

1. OUT is absent, or complete: it verifies and equals (bitwise) the merge of the inputs it was
   made from;
2. nothing outside OUT and the tool's hidden siblings is created, changed or removed, inputs
   included (but by the machine's own input rules);
3. every refusal is one line and exit 2;
4. there is always a command that finishes the job (--resume, else --force).

Commands run in children forked from this process (imports done once: a step takes tens of
milliseconds), exactly as `mergealign-fast` runs them: entry.py's set-up, then cli.main.
tests/test_torture.py runs a CI-sized budget; benches/torture.py runs thousands of sequences.
"""

import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mergealign_fast import merge_checkpoints
from mergealign_fast.cli import entry
from mergealign_fast.output.manifest import MANIFEST, verify_output
from mergealign_fast.output import PARTIAL_SUFFIX, partial_dir_for
from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio

ROLES = ("base", "domain", "aligned")
WEIGHTS = [(0.5, 0.5), (0.3, 0.9)]
LAMBDAS = (0.25, 0.75)
# ~12 shards of the tiny trio, one thread: a kill lands between or inside shards.
FLAGS = ["--quiet", "--no-fsync", "--max-shard-size", "100KB", "--threads", "1"]
STATS = {"sequences": 0, "steps": 0, "kills": 0, "refusals": 0, "hub_steps": 0}


def tensors_digest(folder: Path) -> Optional[str]:
    """Digest of a model folder's tensor files (None when it has none)."""
    shards = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not shards:
        return None
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard.name.encode() + shard.read_bytes())
    return digest.hexdigest()


def tree_snapshot(root: Path, excluded) -> Dict[str, Tuple[int, str]]:
    """relative path -> (size, content digest) of every file under root not excluded(path)."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        if excluded(path) or path.is_dir():
            continue
        if path.is_symlink():
            snapshot[str(path.relative_to(root))] = (-1, os.readlink(path))
        else:
            data = path.read_bytes()
            snapshot[str(path.relative_to(root))] = (len(data), hashlib.sha1(data).hexdigest())
    return snapshot


def run_forked(argv: List[str], kill: Optional[Tuple[int, float]] = None,
               started: Optional[list] = None, stderr_to: Optional[str] = None,
               stopped: Optional[callable] = None) -> Tuple[int, str, str]:
    """(exit status or -signal, stdout, stderr) of `mergealign-fast argv` in a forked child;
    with kill=(signal, seconds) the child gets that signal after that delay; with stderr_to
    (e.g. /dev/full) its stdout and stderr go there; with stopped=(seconds, action) the child
    is stopped (SIGSTOP) after that delay, action() runs, and it is continued."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    if stderr_to is not None:
        out = err = open(stderr_to, "w+b")
    # Signals wait until the child has set up what `mergealign-fast` sets up (entry.py): a
    # signal that lands before that would be the harness's, not the tool's, to handle.
    stoppers = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stoppers)
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stoppers)
    else:  # the child: what `mergealign-fast` does, then exit without cleanup handlers
        code = 1
        gc.callbacks.clear()  # the test runner's, inherited by the fork: not the tool's
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, entry._on_sigterm)
            try:  # a signal pending since the fork lands here: as at the tool's start
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stoppers)
                code = entry.main(argv)
            except KeyboardInterrupt as exc:
                code = entry.interrupted_while_starting(exc)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a crash is a finding: status 99 says so
            import traceback

            traceback.print_exc()
            code = 99
        finally:  # nothing may escape: this process is a copy of the test runner
            try:
                signal.pthread_sigmask(signal.SIG_BLOCK, stoppers)  # a late signal: the end
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    if started is not None:
        started.append(pid)
    if kill is not None:
        time.sleep(kill[1])
        try:
            os.kill(pid, kill[0])
        except ProcessLookupError:
            pass
    if stopped is not None:
        time.sleep(stopped[0])
        try:
            os.kill(pid, signal.SIGSTOP)
            stopped[1]()
        finally:
            os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    if stderr_to is not None:
        return os.waitstatus_to_exitcode(status), "", ""
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


class MergeTorture(RuleBasedStateMachine):
    """One workspace per sequence: the three inputs, OUT (`out`, maybe a link), a place
    elsewhere on the same disk, and a sweep root."""

    trio_cache: Optional[Dict[str, Path]] = None  # built once per process
    hub = None  # the local Hub server (hub_server.LocalHub), started once per process
    small_fs: Optional[Path] = None  # a tmpfs mount for the full-disk rule (root only)

    def __init__(self):
        super().__init__()
        STATS["sequences"] += 1
        self.ws = Path(tempfile.mkdtemp(prefix="torture-", dir=self.small_fs))
        trio = self._trio()
        self.inputs = {r: self.ws / "inputs" / r for r in ROLES}
        for role in ROLES:
            shutil.copytree(trio[role], self.inputs[role])
        (self.ws / "elsewhere").mkdir()
        self.out = self.ws / "out"
        # Preconditions read only this model, never the disk: where a kill lands changes the
        # disk, and hypothesis replays a sequence expecting the same rules to be possible.
        self.linked = False
        self.weights = WEIGHTS[0]
        self.expected_out: Optional[str] = None  # digest OUT holds (None: absent)
        self.sweep_expected: Dict[float, Optional[str]] = {lam: None for lam in LAMBDAS}
        self.references: Dict[tuple, Optional[str]] = {}
        # The Hub repo: a frozen copy of the domain model, served as torture/seq<N>; its merge
        # goes to hubout, through the Hub cache hfcache.
        shutil.copytree(trio["domain"], self.ws / "hubsrc" / "domain")
        self.repo = f"torture/seq{STATS['sequences']}"
        self._hub().add_repo(self.repo, self.ws / "hubsrc" / "domain")
        self.hub_out = self.ws / "hubout"
        self.hub_expected: Optional[str] = None
        self.protected = self._snapshot()

    @classmethod
    def _trio(cls) -> Dict[str, Path]:
        if cls.trio_cache is None:
            root = Path(tempfile.mkdtemp(prefix="torture-trio-"))
            cls.trio_cache = ensure_synthetic_trio(root, LLAMA_TINY, seed=11)
        return cls.trio_cache

    @classmethod
    def _hub(cls):
        if cls.hub is None:
            from hub_server import LocalHub

            cls.hub = LocalHub()
            cls.endpoint = cls.hub.start()
        return cls.hub

    # -- the model ------------------------------------------------------------------------------

    def reference(self, weights, folders: Optional[Dict[str, Path]] = None) -> str:
        """Digest of a clean merge of the inputs as they are now (cached per content), or of
        `folders`."""
        folders = folders or self.inputs
        key = ("".join(tensors_digest(folders[r]) or "-" for r in ROLES), weights)
        if key not in self.references:
            scratch = Path(tempfile.mkdtemp(dir=self.ws.parent))
            try:
                merge_checkpoints(*(folders[r] for r in ROLES), scratch / "m",
                                  domain_weight=weights[0], align_weight=weights[1],
                                  max_shard_size="100KB", fsync=False)
                self.references[key] = tensors_digest(scratch / "m")
            finally:
                shutil.rmtree(scratch)
        return self.references[key]

    def _out_area(self, path: Path) -> bool:
        """OUT, its link target and the tool's hidden siblings: where merges may write."""
        rel = path.relative_to(self.ws).parts
        return (rel[:1] in (("out",), ("sweep",), ("hubout",), ("hfcache",))
                or rel[:2] == ("elsewhere", "target")
                or any(p.startswith((".out.", ".target.", ".lambda-", ".hubout.")) for p in rel))

    def _snapshot(self):
        return tree_snapshot(self.ws, self._out_area)

    def _merge_argv(self, weights, *extra) -> List[str]:
        return ["merge", *map(str, (self.inputs[r] for r in ROLES)), "-o", str(self.out),
                "--domain-weight", str(weights[0]), "--align-weight", str(weights[1]),
                *FLAGS, *extra]

    def _check_refusal(self, code: int, stderr: str) -> None:
        if code == 2:
            STATS["refusals"] += 1
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("mergealign-fast: error: "), stderr

    def _after_command(self, code, stdout, stderr, weights, before: Optional[str],
                       killed: bool = False) -> None:
        """Update the model from a command's outcome, checking the outcome is allowed."""
        STATS["steps"] += 1
        assert "Traceback" not in stderr, stderr
        now = tensors_digest(self.out)
        if killed and code not in (0, 2):
            STATS["kills"] += 1
            assert code in (-signal.SIGKILL, 130, 143), (code, stderr)
            assert now in (before, self.reference(weights)), "killed merge left a wrong OUT"
        elif code == 0:
            assert now == self.reference(weights), "OUT is not the merge of its inputs"
        else:
            assert code == 2, (code, stderr)
            self._check_refusal(code, stderr)
            assert now == before, "a refused command changed OUT"
        self.expected_out = now
        if now is not None:
            self.weights = weights

    # -- rules: commands ------------------------------------------------------------------------

    @rule(weights=st.sampled_from(WEIGHTS), mode=st.sampled_from(["", "--force", "--resume"]))
    def merge(self, weights, mode):
        before = tensors_digest(self.out)
        code, out, err = run_forked(self._merge_argv(weights, *filter(None, [mode])))
        self._after_command(code, out, err, weights, before)

    @rule(weights=st.sampled_from(WEIGHTS), mode=st.sampled_from(["", "--force", "--resume"]),
          sig=st.sampled_from([signal.SIGKILL, signal.SIGINT, signal.SIGTERM]),
          delay=st.floats(0.0, 0.15))
    def killed_merge(self, weights, mode, sig, delay):
        before = tensors_digest(self.out)
        code, out, err = run_forked(self._merge_argv(weights, *filter(None, [mode])),
                                    kill=(sig, delay))
        self._after_command(code, out, err, weights, before, killed=True)

    @rule(weights=st.sampled_from(WEIGHTS))
    def two_merges_at_once(self, weights):
        """A second merge into the same OUT while the first runs: it fails at once or runs
        after; either way OUT ends as one complete merge."""
        before = tensors_digest(self.out)
        children = []
        pid = os.fork()
        if pid == 0:
            code = run_forked(self._merge_argv(weights, "--force"))[0]
            os._exit(code & 0xFF)
        children.append(pid)
        code, out, err = run_forked(self._merge_argv(weights, "--force"))
        _, status = os.waitpid(pid, 0)
        first = os.waitstatus_to_exitcode(status)
        assert first in (0, 2) and code in (0, 2), (first, code, err)
        if code == 2:
            self._check_refusal(code, err)
        now = tensors_digest(self.out)
        assert now in (before, self.reference(weights))
        STATS["steps"] += 1
        self.expected_out = now
        if now is not None:
            self.weights = weights

    @rule(mode=st.sampled_from(["", "--force", "--resume"]), kill=st.booleans(),
          delay=st.floats(0.0, 0.2))
    def sweep(self, mode, kill, delay):
        root = self.ws / "sweep"
        argv = ["sweep", *map(str, (self.inputs[r] for r in ROLES)), "-o", str(root),
                "--lambdas", ",".join(map(str, LAMBDAS)), *FLAGS, *filter(None, [mode])]
        before = {lam: tensors_digest(root / f"lambda-{lam}") for lam in LAMBDAS}
        code, _, err = run_forked(argv, kill=(signal.SIGKILL, delay) if kill else None)
        STATS["steps"] += 1
        assert "Traceback" not in err, err
        for lam in LAMBDAS:
            now = tensors_digest(root / f"lambda-{lam}")
            expected = self.reference((lam, round(1 - lam, 12)))
            if code == 0:
                assert now == expected, f"sweep output {lam} is not its merge"
            elif code == 2:
                self._check_refusal(code, err)
                assert now == before[lam]
            else:
                assert kill and code == -signal.SIGKILL, (code, err)
                assert now in (before[lam], expected)
            if now is not None:
                assert verify_output(root / f"lambda-{lam}") == []

    @rule(weights=st.sampled_from(WEIGHTS), mode=st.sampled_from(["", "--force", "--resume"]))
    def merge_with_a_broken_stderr(self, weights, mode):
        """`2>/dev/full`: a finished merge still exits 0 (its messages are lost, not the
        model)."""
        before = tensors_digest(self.out)
        code, out, err = run_forked(self._merge_argv(weights, *filter(None, [mode])),
                                    stderr_to="/dev/full")
        assert code in (0, 2), code
        now = tensors_digest(self.out)
        assert now == (self.reference(weights) if code == 0 else before)
        STATS["steps"] += 1
        self.expected_out = now
        if now is not None:
            self.weights = weights

    @rule(weights=st.sampled_from(WEIGHTS), delay=st.floats(0.0, 0.1))
    def stopped_while_its_hidden_folder_is_replaced(self, weights, delay):
        """A merge is stopped; its hidden folder is removed and another merge runs to the end;
        then it continues.  Whatever it says, exit 0 must mean an OUT that verifies."""
        hidden = partial_dir_for(self.out)
        other: list = []

        def replace_hidden():
            shutil.rmtree(hidden, ignore_errors=True)
            other.append(run_forked(self._merge_argv(weights, "--force")))
        code, _, err = run_forked(self._merge_argv(weights, "--force"),
                                  stopped=(delay, replace_hidden))
        assert "Traceback" not in err, err
        assert code in (0, 1, 2), (code, err)
        now = tensors_digest(self.out)
        if code == 0 or other[0][0] == 0:
            assert now == self.reference(weights)
            assert verify_output(self.out) == [], verify_output(self.out)
        STATS["steps"] += 1
        self.expected_out = now
        if now is not None:
            self.weights = weights

    @rule(weights=st.sampled_from(WEIGHTS))
    def force_into_a_folder_that_is_not_a_model(self, weights):
        """-o ~/somefolder --force: refused, the folder untouched (the invariant checks)."""
        home = self.ws / "home"
        (home / ".ssh").mkdir(parents=True, exist_ok=True)
        (home / ".ssh" / "id_ed25519").write_text("a key")
        self.protected = self._snapshot()
        argv = self._merge_argv(weights, "--force")
        argv[argv.index("-o") + 1] = str(home)
        code, _, err = run_forked(argv)
        STATS["steps"] += 1
        assert code == 2, (code, err)
        self._check_refusal(code, err)

    @rule(role=st.sampled_from(ROLES), mode=st.sampled_from(["--force", "--resume"]))
    def an_input_linked_from_the_hidden_folder(self, role, mode):
        """OUT's hidden folder is a link to an input: refused, the input untouched."""
        hidden = partial_dir_for(self.out)
        if os.path.lexists(hidden):
            return  # (an interrupted merge's own folder: not ours to replace here)
        hidden.symlink_to(self.inputs[role])
        before = tensors_digest(self.out)
        try:
            code, out, err = run_forked(self._merge_argv(self.weights, mode))
        finally:
            hidden.unlink()
        assert code == 2, (code, err)
        self._after_command(code, out, err, self.weights, before)

    @rule()
    def verify(self):
        code, _, err = run_forked(["verify", str(self.out)])
        if self.expected_out is None:
            assert code in (1, 2), "verify passed a missing model"
        else:
            assert code == 0, err

    def _hub_folders(self) -> Dict[str, Path]:
        return {**self.inputs, "domain": self.ws / "hubsrc" / "domain"}

    def _run_from_hub(self, weights, mode: str, kill=None) -> Tuple[int, str, str]:
        """The merge with the domain model by repo id, in a forked child that sees the local
        Hub and this sequence's cache (huggingface_hub's settings, set around the fork)."""
        import huggingface_hub.constants as hub_constants
        from mergealign_fast.io import readers
        from mergealign_fast.sources import hub as hub_source

        names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
        saved = {n: getattr(hub_constants, n) for n in names}
        hub_constants.ENDPOINT = self.endpoint
        hub_constants.HUGGINGFACE_CO_URL_TEMPLATE = \
            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        hub_constants.HF_HUB_CACHE = str(self.ws / "hfcache")
        hub_constants.HF_HUB_OFFLINE = False
        hub_source._SNAPSHOTS.clear()  # each command is a new process
        readers._FROM_THE_HUB.clear()
        argv = ["merge", str(self.inputs["base"]), self.repo, str(self.inputs["aligned"]),
                "-o", str(self.hub_out), "--domain-weight", str(weights[0]),
                "--align-weight", str(weights[1]), *FLAGS, *filter(None, [mode])]
        try:
            return run_forked(argv, kill=kill)
        finally:
            for name, value in saved.items():
                setattr(hub_constants, name, value)

    def _after_hub_command(self, code, err, weights, before, killed=False) -> None:
        STATS["steps"] += 1
        STATS["hub_steps"] += 1
        assert "Traceback" not in err, err
        now = tensors_digest(self.hub_out)
        expected = self.reference(weights, self._hub_folders())
        if killed and code not in (0, 2):
            STATS["kills"] += 1
            assert code in (-signal.SIGKILL, 130, 143), (code, err)
            assert now in (before, expected), "a killed Hub merge left a wrong OUT"
        elif code == 0:
            assert now == expected, "OUT is not the merge of the Hub model"
        else:
            assert code == 2, (code, err)
            self._check_refusal(code, err)
            assert now == before, "a refused command changed OUT"
        self.hub_expected = now

    @rule(weights=st.sampled_from(WEIGHTS), mode=st.sampled_from(["--force", "--resume"]),
          kill=st.booleans(), delay=st.floats(0.0, 0.3))
    def merge_from_hub(self, weights, mode, kill, delay):
        """Killed or not: while it downloads, or while it merges what came down."""
        before = tensors_digest(self.hub_out)
        code, _, err = self._run_from_hub(weights, mode,
                                          kill=(signal.SIGKILL, delay) if kill else None)
        self._after_hub_command(code, err, weights, before, killed=kill)

    @rule(weights=st.sampled_from(WEIGHTS))
    def hub_download_cut_off(self, weights):
        """The connection drops mid-download once: huggingface_hub's retry finishes it."""
        self.hub.cut_after[(self.repo, "model.safetensors")] = [50_000, 1]
        before = tensors_digest(self.hub_out)
        try:
            code, _, err = self._run_from_hub(weights, "--force")
        finally:
            self.hub.cut_after.clear()
        self._after_hub_command(code, err, weights, before)

    @rule()
    def remove_hub_cache_files(self):
        """The user cleans the Hub cache (blobs and links) between two runs."""
        for blob in (self.ws / "hfcache").glob("models--*/blobs/*"):
            blob.unlink()

    # -- rules: what users do to files ----------------------------------------------------------

    @rule(role=st.sampled_from(ROLES), restore_times=st.booleans())
    def rewrite_input(self, role, restore_times):
        """The same size, other values, written in place (and maybe its times put back)."""
        path = self.inputs[role] / "model.safetensors"
        st_before = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(-256, os.SEEK_END)
            old = f.read(256)
            f.seek(-256, os.SEEK_END)
            f.write(bytes(b ^ 0x01 for b in old))
        if restore_times:
            os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
        self.protected = self._snapshot()

    @rule(role=st.sampled_from(ROLES))
    def replace_input(self, role):
        """A new file renamed over the old one (a new inode), as a download tool does."""
        path = self.inputs[role] / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x04
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)
        self.protected = self._snapshot()

    @precondition(lambda self: not self.linked)
    @rule()
    def symlink_out(self):
        """OUT becomes a link to a folder elsewhere (the model, if any, moves there)."""
        target = self.ws / "elsewhere" / "target"
        if self.out.exists():
            os.rename(self.out, target)
        else:
            target.mkdir()
        self.out.symlink_to(target)
        self.linked = True

    @rule()
    def move_out_away(self):
        """The user moves the model (or the folder OUT links to) somewhere and removes the
        link: from now on it is theirs, and OUT is a plain path again."""
        moved = self.ws / f"moved-{time.monotonic_ns()}"
        if self.linked:
            os.rename(self.ws / "elsewhere" / "target", moved)
            self.out.unlink()
            self.linked = False
        elif self.out.exists():
            os.rename(self.out, moved)
        self.expected_out = None
        self.protected = self._snapshot()

    @precondition(lambda self: self.small_fs is not None)
    @rule(weights=st.sampled_from(WEIGHTS), room=st.integers(0, 2_000_000))
    def merge_on_a_full_disk(self, weights, room):
        """Only `room` bytes left on the disk: a clear refusal or a complete merge."""
        filler = self.ws / "filler"
        size = max(0, shutil.disk_usage(self.ws).free - room)
        subprocess.run(["fallocate", "-l", str(size), str(filler)], check=False,
                       capture_output=True)
        before = tensors_digest(self.out)
        try:
            code, out, err = run_forked(self._merge_argv(weights, "--force"))
        finally:
            filler.unlink(missing_ok=True)
        self._after_command(code, out, err, weights, before)

    # -- invariants -----------------------------------------------------------------------------

    @staticmethod
    def _absent_or_complete(out: Path, expected: Optional[str]) -> None:
        now = tensors_digest(out)
        assert now == expected
        if now is not None:
            assert verify_output(out) == [], verify_output(out)

    @invariant()
    def out_is_absent_or_complete(self):
        self._absent_or_complete(self.out, self.expected_out)

    @invariant()
    def hub_out_is_absent_or_complete(self):
        self._absent_or_complete(self.hub_out, self.hub_expected)

    @invariant()
    def nothing_else_changed(self):
        assert self._snapshot() == self.protected, "a file outside OUT changed"

    def teardown(self):
        """There is always a way forward: --resume, else --force, finishes the job."""
        try:
            code, _, err = run_forked(self._merge_argv(self.weights, "--resume"))
            if code == 2:
                code, _, err = run_forked(self._merge_argv(self.weights, "--force"))
            assert code == 0, err
            assert tensors_digest(self.out) == self.reference(self.weights)
            code, _, err = self._run_from_hub(WEIGHTS[0], "--resume")
            if code == 2:
                code, _, err = self._run_from_hub(WEIGHTS[0], "--force")
            assert code == 0, err
            assert tensors_digest(self.hub_out) == self.reference(WEIGHTS[0],
                                                                   self._hub_folders())
            for partial in Path(os.path.realpath(self.out)).parent.glob(f".*{PARTIAL_SUFFIX}"):
                # only an interrupted merge of other inputs or options may stay (resumable)
                journal = json.loads((partial / MANIFEST).read_text())
                finished = json.loads((self.out / MANIFEST).read_text())
                assert journal["shards"] and journal["fingerprint"] != finished["fingerprint"], \
                    f"{partial} was left beside a finished merge it duplicates"
            assert self._snapshot() == self.protected
        finally:
            shutil.rmtree(self.ws, ignore_errors=True)
