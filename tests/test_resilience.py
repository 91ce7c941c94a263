"""Nothing lost: checksums and verify, killed and interrupted merges, full disks, inputs that
change under a running merge, file-size limits."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergealign_fast import MergeError, merge_checkpoints
from mergealign_fast.output.manifest import MANIFEST, verify_output
from mergealign_fast.output import partial_dir_for
from mergealign_fast.kernels import cpu
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.tools.synthetic import LlamaShape, ensure_synthetic_trio

from test_engine import FailingNative, all_tensors_bytes, leftovers

# ~40 MB per model in bf16: a merge long enough (0.1-0.3 s) to be killed in the middle.
MEDIUM = LlamaShape(hidden=512, intermediate=1408, layers=6, heads=8, kv_heads=4, vocab=8000)
SHARD = "4MB"  # ~10 shards: a kill usually lands between completed shards


@pytest.fixture(scope="module")
def medium_trio(tmp_path_factory):
    return ensure_synthetic_trio(tmp_path_factory.mktemp("medium"), MEDIUM, seed=5)


def cli(*args, **kwargs):
    return [sys.executable, "-m", "mergealign_fast", *map(str, args)]


def merge_cmd(trio, out, *extra, shard=SHARD):
    return cli("merge", trio["base"], trio["domain"], trio["aligned"], "-o", out,
               "--max-shard-size", shard, "--quiet", *extra)


@pytest.fixture(scope="module")
def reference(medium_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run(merge_cmd(medium_trio, out), check=True)
    return all_tensors_bytes(out)


# ---- checksums and verify ---------------------------------------------------------------------

def test_crc32c_known_answer_and_combine():
    import ctypes

    native = cpu.native()

    def crc(data: bytes, start: int = 0) -> int:
        buffer = ctypes.create_string_buffer(data, len(data))
        return native.crc32c(ctypes.addressof(buffer), len(data), start)

    assert crc(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = os.urandom(100_003)
    for cut in (0, 1, 7, 65536, 100_003):
        a, b = data[:cut], data[cut:]
        assert native.crc32c_combine(crc(a), crc(b), len(b)) == crc(data)
        assert crc(b, crc(a)) == crc(data)


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time, from the polynomial: the reference for the native paths."""
    state = 0xFFFFFFFF
    for byte in data:
        state ^= byte
        for _ in range(8):
            state = (state >> 1) ^ (0x82F63B78 if state & 1 else 0)
    return state ^ 0xFFFFFFFF


@pytest.mark.parametrize("length", [3 * 32 * 1024 - 1, 3 * 32 * 1024, 3 * 32 * 1024 + 7,
                                    100_003, 1 << 20])
def test_crc32c_three_chains_equal_one(length):
    """Long buffers are checksummed as three interleaved chains joined at the end; pieces of
    4 KiB chained one after another take the single-chain path: both must agree, and with the
    bitwise definition."""
    import ctypes

    native = cpu.native()
    data = os.urandom(length)
    buffer = ctypes.create_string_buffer(data, length)
    whole = native.crc32c(ctypes.addressof(buffer), length, 0)
    chained = 0
    for start in range(0, length, 4096):
        chained = native.crc32c(ctypes.addressof(buffer) + start, min(4096, length - start),
                                chained)
    assert whole == chained
    if length <= 100_003:
        assert whole == _crc32c_bitwise(data)


def test_verify_accepts_a_merge_and_names_what_is_wrong(tiny_trio, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out,
                      max_shard_size=100_000)
    assert verify_output(out) == []
    shard = out / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the last tensor
    shard.write_bytes(bytes(data))
    [problem] = verify_output(out)
    assert str(shard) in problem and "CRC-32C" in problem and "changed or is corrupt" in problem
    shard.write_bytes(bytes(data[:-10]))
    assert any("bytes, the merge wrote" in p for p in verify_output(out))
    shard.unlink()
    assert any("missing" in p or "does not exist" in p for p in verify_output(out))
    proc = subprocess.run(cli("verify", out), capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (out / MANIFEST).unlink()
    assert "no mergealign-manifest.json" in verify_output(out)[0]


def test_verify_cli_ok(tiny_trio, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"], out)
    proc = subprocess.run(cli("verify", out), capture_output=True, text=True)
    assert proc.returncode == 0 and ": OK" in proc.stdout


# ---- killed and interrupted -------------------------------------------------------------------

def kill_and_resume(trio, out: Path, reference: dict, kills: int, seed: int,
                    shard: str = SHARD) -> dict:
    """SIGKILL merges at random moments until `kills` of them were killed while running; check
    OUT after each; finally finish with --resume.  Half the rounds resume what the last kill
    left, half start over (--force without --resume), so kills land at every stage.

    Returns counts: kills before OUT appeared (and how many of those left completed shards to
    resume from), kills after it appeared (OUT must then be complete), merges that finished
    first, rounds, and the final resume."""
    rng = random.Random(seed)
    started = time.perf_counter()
    subprocess.run(merge_cmd(trio, out, shard=shard), check=True)
    full = time.perf_counter() - started
    shutil.rmtree(out)
    counts = {"killed": 0, "with_completed_shards": 0, "killed_after_publish": 0,
              "finished_first": 0, "rounds": 0, "resumed_ok": 0}
    while counts["killed"] + counts["killed_after_publish"] < kills \
            and counts["rounds"] < 4 * kills:
        counts["rounds"] += 1
        mode = ["--resume", "--force"] if rng.random() < 0.5 else ["--force"]
        proc = subprocess.Popen(merge_cmd(trio, out, *mode, shard=shard),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # finished, or killed after publishing: then complete and valid
            counts["finished_first" if proc.returncode == 0 else "killed_after_publish"] += 1
            assert verify_output(out) == [] and all_tensors_bytes(out) == reference
            shutil.rmtree(out)
            continue
        counts["killed"] += 1  # killed before publishing: OUT absent, never half-written
        counts["with_completed_shards"] += (partial_dir_for(out) / MANIFEST).exists()
        assert [p.name for p in out.parent.iterdir() if ".mergealign-" in p.name] in (
            [], [partial_dir_for(out).name])
    subprocess.run(merge_cmd(trio, out, "--resume", shard=shard), check=True)
    assert verify_output(out) == [] and all_tensors_bytes(out) == reference
    assert leftovers(out.parent) == []
    counts["resumed_ok"] += 1
    return counts


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(medium_trio, reference, tmp_path):
    """The CI-sized run; benches/kill_harness.py runs the long one (counts in RESULTS.md)."""
    counts = kill_and_resume(medium_trio, tmp_path / "out", reference, kills=5, seed=1)
    assert counts["killed"] + counts["killed_after_publish"] == 5 and counts["resumed_ok"] == 1


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_resume_finishes(medium_trio, reference, tmp_path,
                                                             sig, status, word):
    """SIGTERM (a scheduler stopping the job) ends a merge as Ctrl-C does."""
    out = tmp_path / "out"
    partial = partial_dir_for(out)
    for attempt in range(5):  # the merge may finish before the signal lands; try again
        proc = subprocess.Popen(merge_cmd(medium_trio, out, "--force"),
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not (partial / MANIFEST).exists():
            time.sleep(0.001)  # interrupt once at least one shard is complete
        proc.send_signal(sig)
        stderr = proc.communicate()[1]
        if proc.returncode == status:
            break
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.skip("every merge finished before the signal arrived")
    assert word in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists() and (partial / MANIFEST).exists()
    subprocess.run(merge_cmd(medium_trio, out, "--resume"), check=True)
    assert all_tensors_bytes(out) == reference and leftovers(tmp_path) == []


# ---- inputs that change under a running merge -------------------------------------------------

class ChangingInput(FailingNative):
    """The native module, but before the n-th merge_to_files call an input file is changed."""

    def __init__(self, fail_at: int, change):
        super().__init__(fail_at=0, failure=None)
        self.change_at, self.change = fail_at, change

    def merge_to_files(self, *args):
        if self.calls + 1 == self.change_at:
            self.change()
        return super().merge_to_files(*args)


@pytest.mark.parametrize("how", ["truncated", "replaced", "rewritten"])
def test_input_changed_during_the_merge_is_reported_and_nothing_published(tiny_trio, tmp_path,
                                                                          monkeypatch, how):
    trio = {r: tmp_path / r for r in tiny_trio}
    for role, folder in tiny_trio.items():
        shutil.copytree(folder, trio[role])
    victim = trio["domain"] / "model.safetensors"

    def change():
        if how == "truncated":  # pages of the mapping vanish: SIGBUS, caught
            os.truncate(victim, 4096)
        elif how == "replaced":
            shutil.copy(victim, victim.with_suffix(".new"))
            os.replace(victim.with_suffix(".new"), victim)
        else:
            with open(victim, "r+b") as f:
                f.seek(-8, os.SEEK_END)
                f.write(b"\0" * 8)

    native = ChangingInput(fail_at=5, change=change)
    monkeypatch.setattr(cpu, "native", lambda: native)
    with pytest.raises(MergeError, match=f"input {victim} was"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, pass_name", [
    (Method("ties", domain_density=0.3), "magnitude_histogram"),
    (Method("dare_linear", domain_density=0.3), "sparsity_stats"),
    (Method("slerp"), "vector_stats"),
    (Method("nuslerp", vectors="rows"), "copy_guarded"),  # its windows are copied out
])
def test_input_truncated_during_a_method_pass_is_reported(tiny_trio, tmp_path, monkeypatch,
                                                         method, pass_name):
    """The passes a method makes before merging read the mapped inputs too: a page that
    vanishes under them is caught (SIGBUS) like one under the merge itself."""
    trio = {r: tmp_path / r for r in tiny_trio}
    for role, folder in tiny_trio.items():
        shutil.copytree(folder, trio[role])
    victim = trio["aligned"] / "model.safetensors"
    real = cpu.native()

    class TruncateBeforePass:
        def __getattr__(self, name):
            return getattr(real, name)

    def truncating(*args):
        os.truncate(victim, 4096)
        return getattr(real, pass_name)(*args)

    native = TruncateBeforePass()
    setattr(native, pass_name, truncating)
    monkeypatch.setattr(cpu, "native", lambda: native)
    with pytest.raises(MergeError, match="changed while it was being read|was modified"):
        merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out",
                          method=method)
    assert not (tmp_path / "out").exists()


# ---- full disks and file-size limits ----------------------------------------------------------

def test_too_small_a_filesystem_is_refused_up_front(medium_trio, small_fs):
    filler = small_fs / "filler"
    subprocess.run(["fallocate", "-l", "100M", str(filler)], check=True)
    proc = subprocess.run(merge_cmd(medium_trio, small_fs / "out"), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not enough free disk" in proc.stderr and "bytes are free" in proc.stderr
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_disk_filling_during_the_merge_is_a_clear_error_and_resumable(medium_trio, reference,
                                                                       small_fs):
    """Another writer takes the space after the checks: the shard that cannot be reserved
    fails with ENOSPC, completed shards stay in the partial folder, and once space is freed
    --resume finishes the job."""
    from mergealign_fast.engine.loop import execute
    from mergealign_fast.plan import MergeOptions, plan_merge
    from mergealign_fast.units import parse_size

    out = small_fs / "out"
    plan = plan_merge(medium_trio["base"], medium_trio["domain"], medium_trio["aligned"], out,
                      MergeOptions(max_shard_size=parse_size(SHARD)))
    free = shutil.disk_usage(small_fs).free
    filler = small_fs / "filler"
    subprocess.run(["fallocate", "-l", str(free - plan.shards[0].size - 65536), str(filler)],
                   check=True)
    with pytest.raises(MergeError, match="disk full: cannot reserve"):
        execute(plan)
    assert not out.exists() and (partial_dir_for(out) / MANIFEST).exists()
    filler.unlink()
    subprocess.run(merge_cmd(medium_trio, out, "--resume"), check=True)
    assert all_tensors_bytes(out) == reference


def test_file_size_limit_is_an_error_not_a_signal(tiny_trio, tmp_path):
    import resource

    def limit():  # ulimit -f 40 (KiB): smaller than the first shard
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 10, 40 << 10))

    proc = subprocess.run(cli("merge", tiny_trio["base"], tiny_trio["domain"],
                              tiny_trio["aligned"], "-o", tmp_path / "out",
                              "--max-shard-size", "100KB", "--quiet"),
                          capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    assert "File too large" in proc.stderr and "nothing was kept" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []  # no shard was completed: no partial folder either
