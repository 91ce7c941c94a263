"""The read-ahead thread (csrc/read_ahead.h, stream.InputMaps.read_ahead): it stays within its
depth of the merge's position, follows the merge to the end, never changes a result, and says
clearly when its settings are wrong."""

import hashlib
import os
import time

import pytest

from mergealign_fast import merge_checkpoints
from mergealign_fast.errors import MergeError
from mergealign_fast.io.checkpoint import open_checkpoint
from mergealign_fast.io.safetensors_format import read_header
from mergealign_fast.kernels import cpu
from mergealign_fast.methods.core.parameters import Method
from mergealign_fast.io.stream import InputMaps, read_ahead_settings, tensor_chunks

MIB = 1 << 20


def settled(read, timeout=10.0):
    """read() once it has stopped changing for 0.2 s (the thread works asynchronously)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    return last


@pytest.mark.parametrize("mode", [0, 1], ids=["advise", "read"])
def test_the_reader_stays_within_its_depth_of_the_merge(tmp_path, mode):
    native = cpu.native()
    path = tmp_path / "input"
    path.write_bytes(os.urandom(16 * MIB))
    fd = os.open(path, os.O_RDONLY)
    try:
        ranges = [native.ReadAheadRange(0, i * MIB, MIB, i * MIB) for i in range(16)]
        reader = native.ReadAhead([fd], ranges, 4 * MIB, mode)
        assert settled(lambda: reader.requested) == 4 * MIB  # positions 0..3 MiB only
        reader.reached(10 * MIB)
        assert settled(lambda: reader.requested) == 14 * MIB
        reader.reached(2 * MIB)  # positions never move back
        assert settled(lambda: reader.requested) == 14 * MIB
        reader.reached(1 << 40)
        assert settled(lambda: reader.requested) == 16 * MIB
        reader.stop()
        reader.stop()  # idempotent
    finally:
        os.close(fd)  # the reader closed its own copy, not ours
    os.fstat(os.open(path, os.O_RDONLY))


def test_a_reader_stopped_midway_returns_at_once(tmp_path):
    native = cpu.native()
    path = tmp_path / "input"
    path.write_bytes(b"\0" * MIB)
    fd = os.open(path, os.O_RDONLY)
    ranges = [native.ReadAheadRange(0, 0, MIB, i * MIB) for i in range(1000)]
    reader = native.ReadAhead([fd], ranges, MIB, 0)  # waits for the merge after one range
    os.close(fd)
    assert settled(lambda: reader.requested) == MIB
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 1.0
    reader.reached(1 << 40)  # after stop: nothing more is asked for
    assert settled(lambda: reader.requested) == MIB


def test_the_reader_follows_a_merge_through_every_tensor(tiny_trio_sharded, monkeypatch):
    """With a depth of one byte the reader can only follow the chunks' reports; by the last
    chunk it has asked for every input byte of every tensor, across shard files."""
    monkeypatch.setenv("MERGEALIGN_READ_AHEAD_BYTES", "1")
    models = [open_checkpoint(tiny_trio_sharded[r]) for r in ("base", "domain", "aligned")]
    names = sorted(models[0].tensors)
    order = [[m.tensors[name] for m in models] for name in names]
    with InputMaps(models) as maps:
        maps.read_ahead(order, read_ahead_settings())
        # Held back at the first tensor (one read-ahead piece: all of it is at position 0).
        assert settled(lambda: maps.reader.requested) == sum(loc.entry.nbytes
                                                              for loc in order[0])
        for sources in order:
            for _ in tensor_chunks(sources, maps, 1000):
                pass
        total = sum(loc.entry.nbytes for sources in order for loc in sources)
        assert settled(lambda: maps.reader.requested) == total


def output_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_every_read_ahead_mode_merges_the_same_bytes(tiny_trio_sharded, tmp_path, monkeypatch,
                                                     method):
    digests = set()
    for mode, depth in (("off", ""), ("advise", ""), ("read", ""), ("read", "1"),
                        ("advise", "64KiB")):
        monkeypatch.setenv("MERGEALIGN_READ_AHEAD", mode)
        monkeypatch.setenv("MERGEALIGN_READ_AHEAD_BYTES", depth)
        out = tmp_path / f"{mode}-{depth or 'default'}"
        merge_checkpoints(tiny_trio_sharded["base"], tiny_trio_sharded["domain"],
                          tiny_trio_sharded["aligned"], out, method=Method(method))
        digests.add(output_digest(out))
    assert len(digests) == 1


@pytest.mark.parametrize("name, value, message", [
    ("MERGEALIGN_READ_AHEAD", "sometimes", "MERGEALIGN_READ_AHEAD=sometimes: expected one of "
                                           "advise, read, off"),
    ("MERGEALIGN_READ_AHEAD_BYTES", "lots", "MERGEALIGN_READ_AHEAD_BYTES: cannot read size"),
])
def test_a_wrong_read_ahead_setting_is_one_clear_error(tiny_trio, tmp_path, monkeypatch, name,
                                                      value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(MergeError, match=message):
        merge_checkpoints(tiny_trio["base"], tiny_trio["domain"], tiny_trio["aligned"],
                          tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_merge_hands_the_reader_every_tensor_in_the_order_it_writes_them(tiny_trio_sharded,
                                                                           tmp_path,
                                                                           monkeypatch):
    """The reader is only as good as its plan: every tensor, shard after shard, in the order of
    the output (which test_the_reader_follows_a_merge_through_every_tensor then follows)."""
    seen = []
    original = InputMaps.read_ahead

    def recording(self, tensors, settings):
        seen.extend(sources[0].entry.name for sources in tensors)
        original(self, tensors, settings)

    monkeypatch.setattr(InputMaps, "read_ahead", recording)
    result = merge_checkpoints(tiny_trio_sharded["base"], tiny_trio_sharded["domain"],
                               tiny_trio_sharded["aligned"], tmp_path / "out")
    written = []
    for shard in sorted(result.out_dir.glob("*.safetensors")):
        header = read_header(shard)
        written += sorted(header.tensors, key=lambda name: header.tensors[name].begin)
    assert seen == written


def test_write_behind_holds_its_own_descriptors_and_stops_cleanly(tmp_path):
    """The merge closes a failed shard's file at once; ranges still queued must not touch a
    descriptor number the process has reused meanwhile.  After stop(), submit() is ignored and
    drain() does not wait for a thread that is gone."""
    native = cpu.native()
    behind = native.WriteBehind()
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"x" * (4 * MIB))
    for i in range(4):
        behind.submit(fd, i * MIB, MIB)
    os.close(fd)  # before the thread got to them
    behind.drain()
    open_before = len(os.listdir("/proc/self/fd"))
    behind.submit(os.open(path, os.O_RDONLY), 0, MIB)
    behind.drain()
    assert len(os.listdir("/proc/self/fd")) == open_before + 1  # ours, not a leaked duplicate
    behind.stop()
    behind.stop()
    behind.submit(0, 0, MIB)
    behind.drain()
    assert path.read_bytes() == b"x" * (4 * MIB)
