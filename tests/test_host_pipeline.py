"""The host half of GPU streaming, on the CPU: the native staging memory, guarded fill and writer
thread (csrc/host_pipeline.h), and the whole GPU writer with the cpu kernel standing in for the
device, shaken by random delays before every stage, against the CPU merge bit for bit.
"""

import os
import shutil

import numpy as np
import pytest

from mergealign_fast import MergeError, merge_checkpoints
from mergealign_fast.engine.loop import execute
from mergealign_fast.kernels import cpu
from mergealign_fast.output.manifest import verify_output
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.plan import MergeOptions, plan_merge

from test_engine import all_tensors_bytes

torch = pytest.importorskip("torch")

native = cpu.native()


# ---- native parts -------------------------------------------------------------------------------

def test_host_buffer_is_page_aligned_and_exactly_its_size():
    buffer = native.HostBuffer(10_000)
    assert buffer.address % 4096 == 0 and buffer.size == 12_288  # whole pages, no more
    view = np.frombuffer((np.ctypeslib.as_ctypes_type(np.uint8) * buffer.size)
                         .from_address(buffer.address), np.uint8)
    view[:] = 7  # writable, all of it
    del view
    buffer.release()
    buffer.release()  # idempotent


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_fill_copies_every_piece_from_files_and_memory_whatever_the_split(tmp_path, threads):
    rng = np.random.default_rng(threads)
    sources = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 1, 200_003, 65_536 * 3 + 7)]
    path = tmp_path / "input"
    path.write_bytes(b"head" + b"".join(s.tobytes() for s in sources))
    fd = os.open(path, os.O_RDONLY)
    total = sum(s.size for s in sources)
    staging = np.zeros(2 * total + 16, np.uint8)
    pieces, offset, file_offset = [], 5, 4  # destinations at odd addresses too
    for s in sources:  # each source once from memory, once from the file
        pieces.append((s.ctypes.data, staging.ctypes.data + offset, s.size, -1, 0))
        pieces.append((0, staging.ctypes.data + offset + total, s.size, fd, file_offset))
        offset, file_offset = offset + s.size, file_offset + s.size
    try:
        assert native.fill_staging(pieces, threads) == 0
    finally:
        os.close(fd)
    expected = b"".join(s.tobytes() for s in sources)
    assert staging[5:5 + total].tobytes() == expected
    assert staging[5 + total:5 + 2 * total].tobytes() == expected
    assert not staging[:5].any() and not staging[5 + 2 * total:].any()


def test_fill_from_a_truncated_input_is_efault_not_sigbus(tmp_path):
    """Read through the descriptor, the file ends early; copied from a mapping, its pages are
    gone (SIGBUS, caught): EFAULT either way."""
    path = tmp_path / "input"
    path.write_bytes(b"\1" * (1 << 20))
    mapped = native.MappedFile(str(path))
    os.truncate(path, 4096)
    staging = np.zeros(1 << 20, np.uint8)
    try:
        for piece in ((mapped.address, staging.ctypes.data, 1 << 20, -1, 0),
                      (0, staging.ctypes.data, 1 << 20, mapped.fd, 0)):
            assert native.fill_staging([piece], 2) == 14
    finally:
        mapped.close()


def test_staged_writer_writes_checksums_and_counts_in_order(tmp_path):
    from mergealign_fast.output.manifest import file_crc32c

    rng = np.random.default_rng(1)
    chunks = [rng.standard_normal(n).astype(np.float32) for n in (1000, 1, 4096)]
    chunks[2][[3, 70]] = [np.nan, np.inf]
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    writer = native.StagedWriter()
    tickets, offset = [], 64
    for c in chunks:
        tickets.append(writer.submit(fd, offset, c.ctypes.data, c.size, 0, delay_us=300))
        offset += c.nbytes
    os.close(fd)  # the writer holds descriptors of its own
    results = [writer.wait(t) for t in reversed(tickets)]  # any order of waiting
    writer.stop()
    assert [r[0] for r in results] == [0, 0, 0]
    assert [r[2] for r in reversed(results)] == [0, 0, 2]
    data = path.read_bytes()
    assert data[64:] == b"".join(c.tobytes() for c in chunks)
    path.write_bytes(chunks[2].tobytes())
    assert results[0][1] == file_crc32c(path)
    assert writer.busy_seconds > 0


def test_staged_writer_reports_a_failed_write_and_drops_queued_jobs_on_stop(tmp_path):
    path = tmp_path / "read-only"
    path.write_bytes(b"")
    data = np.ones(1 << 20, np.uint16)
    read_only = os.open(path, os.O_RDONLY)
    writer = native.StagedWriter()
    failed = writer.submit(read_only, 0, data.ctypes.data, data.size, 2)
    assert writer.wait(failed)[0] == 9  # EBADF: the file was not opened for writing
    fd = os.open(path, os.O_RDWR)
    slow = [writer.submit(fd, 0, data.ctypes.data, data.size, 2, delay_us=200_000)
            for _ in range(3)]
    writer.stop()  # waits for the job running, drops the two queued
    assert [writer.wait(t)[0] for t in slow[1:]] == [125, 125]  # ECANCELED
    assert writer.submit(fd, 0, data.ctypes.data, 1, 2) == 4
    os.close(read_only)
    os.close(fd)


# ---- the GPU writer with the CPU standing in ------------------------------------------------------

# Methods whose final pass runs on the GPU (the numpy-window and per-vector methods run on the
# CPU path only), with parameters that reach their sparsification and election branches.
GPU_PATH_METHODS = [
    None, Method("task_arithmetic", lambda_=0.8), Method("linear"),
    Method("ties", domain_density=0.3, align_density=0.6),
    Method("dare_linear", domain_density=0.5, seed=3), Method("dare_ties", domain_density=0.4),
    Method("slerp", t=0.3), Method("slerp_vectors", t=0.6), Method("chipalign", t=0.4),
    Method("resta", align_density=0.5), Method("nuslerp"),
    Method("breadcrumbs", domain_density=0.8, gamma=0.05),
    Method("breadcrumbs_ties", domain_density=0.8, gamma=0.05), Method("nearswap", t=0.01)]

# 4 slots of 4096 bf16 elements (the least a chunk holds): tensors split into up to 6 chunks.
TINY_BUDGET = 4 * 8 * 4096


def merge_both_ways(trio, tmp_path, method, **writer_options):
    from mergealign_fast.engine.writers.gpu import GpuWriter

    extra = {"method": method} if method else {}
    merge_checkpoints(trio["base"], trio["domain"], trio["aligned"], tmp_path / "cpu",
                      domain_weight=0.7, align_weight=0.6, max_shard_size=100_000, **extra)
    plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], tmp_path / "gpu",
                      MergeOptions(domain_weight=0.7, align_weight=0.6, max_shard_size=100_000,
                                   **extra))
    writer = GpuWriter(plan, TINY_BUDGET, backend="cpu", device="cpu", **writer_options)
    execute(plan, writer=writer)
    return writer


@pytest.mark.parametrize("method", GPU_PATH_METHODS, ids=lambda m: m.name if m else "mergealign")
def test_race_stress_every_method_matches_the_cpu_merge(tiny_trio, tmp_path, method):
    """Random delays of up to 1 ms before each fill, copy, kernel and write, with device
    copies apart from the staging and two fill threads: any missing order between the stages
    shows as a wrong chunk.  The output must be the CPU merge's, and verify must pass."""
    writer = merge_both_ways(tiny_trio, tmp_path, method, device_copies=True, threads=2,
                             stress=sum(map(ord, method.name if method else "")))
    assert writer.chunk == 4096
    assert all_tensors_bytes(tmp_path / "gpu") == all_tensors_bytes(tmp_path / "cpu")
    assert verify_output(tmp_path / "gpu") == []
    seconds = writer.stage_seconds
    assert seconds["fill"] > 0 and seconds["write"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_race_stress_many_seeds(tiny_trio_sharded, tmp_path, seed):
    """More schedules, sharded inputs, dare_ties (masks keyed by element index)."""
    merge_both_ways(tiny_trio_sharded, tmp_path, Method("dare_ties", domain_density=0.4),
                    device_copies=seed % 2 == 0, threads=1 + seed % 3, stress=seed)
    assert all_tensors_bytes(tmp_path / "gpu") == all_tensors_bytes(tmp_path / "cpu")
    assert verify_output(tmp_path / "gpu") == []


def test_input_truncated_under_the_gpu_writer_is_reported_not_a_crash(tiny_trio, tmp_path,
                                                                     monkeypatch):
    """The fill reads the mapped inputs under the SIGBUS guard: a truncated input is the
    one-line "input changed" error, and nothing is published."""
    from mergealign_fast.engine.writers.gpu import GpuWriter

    trio = {r: tmp_path / r for r in tiny_trio}
    for role, folder in tiny_trio.items():
        shutil.copytree(folder, trio[role])
    victim = trio["domain"] / "model.safetensors"
    real = cpu.native()
    fills = []

    class TruncateOnThirdFill:
        def __getattr__(self, name):
            return getattr(real, name)

        def fill_staging(self, pieces, threads):
            fills.append(1)
            if len(fills) == 3:
                os.truncate(victim, 4096)
            return real.fill_staging(pieces, threads)

    monkeypatch.setattr(cpu, "native", lambda: TruncateOnThirdFill())
    plan = plan_merge(trio["base"], trio["domain"], trio["aligned"], tmp_path / "out",
                      MergeOptions())
    with pytest.raises(MergeError, match="changed while it was being read|was modified"):
        execute(plan, writer=GpuWriter(plan, TINY_BUDGET, backend="cpu", device="cpu"))
    assert not (tmp_path / "out").exists() and len(fills) == 3


def test_close_after_an_error_stops_the_writer_and_frees_the_staging(tiny_trio, tmp_path):
    """An error between stages (here: a chunk handed to a file descriptor that is closed) must
    leave no thread or buffer behind: close() waits, stops the writer, frees the memory."""
    from mergealign_fast.engine.writers.gpu import GpuWriter

    plan = plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "out", MergeOptions())
    writer = GpuWriter(plan, TINY_BUDGET, backend="cpu", device="cpu", device_copies=True)
    with pytest.raises(MergeError, match="writing tensor"):
        execute(plan, writer=_BrokenFiles(writer))
    assert writer.host.size > 0 and writer.device_memory is None
    assert not (tmp_path / "out").exists()


class _BrokenFiles:
    """A writer whose chunks go to a descriptor open for reading only (pwrite fails: EBADF)."""

    def __init__(self, inner):
        self.inner = inner
        self.fd = os.open(os.devnull, os.O_RDONLY)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, targets, tensor, chunk, recipes):
        class ReadOnly:
            def __init__(self, target, fd):
                self.target, self.fd, self.path = target, fd, target.path

            def __getattr__(self, name):
                return getattr(self.target, name)

        self.inner.write([ReadOnly(targets[0], self.fd)], tensor, chunk, recipes)


def test_a_failed_device_call_is_one_line_naming_the_tensor(tiny_trio, tmp_path):
    """A CUDA call that fails mid-merge (an illegal address, a lost device) ends the merge with
    one line naming the tensor, the pipeline closed and nothing published."""
    from mergealign_fast.engine.writers.gpu import GpuWriter

    plan = plan_merge(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                      tmp_path / "out", MergeOptions())
    writer = GpuWriter(plan, TINY_BUDGET, backend="cpu", device="cpu")
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA call failed: an illegal memory access was encountered")
        return real(*args)

    real, writer.kernel = writer.kernel, failing
    with pytest.raises(MergeError, match=r"^tensor \S+: CUDA call failed: an illegal memory"):
        execute(plan, writer=writer)
    assert writer.device_memory is None and not (tmp_path / "out").exists()
