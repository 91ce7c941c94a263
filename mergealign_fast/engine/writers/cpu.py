"""The CPU writer: each chunk merged by the native kernel straight into the shard file(s)."""

from __future__ import annotations

import errno
import os
from typing import Sequence

from ...io import stream
from ...errors import MergeError
from ...kernels import cpu
from ...plan import PlannedTensor
from ...io.stream import Chunk, InputChanged


class CpuWriter:
    """Writer (writers/__init__.py) computing in one native call per chunk: the kernel's threads
    merge, checksum and pwrite the chunk and return when it is in the file(s)."""

    def __init__(self, fsync: bool, threads: int):
        self.fsync = fsync
        self.threads = threads
        self.native = cpu.native()
        # With fsync, each written chunk is queued for write-back on a native thread, so the
        # disk writes while the merge reads and computes and the shard's fsync has little left.
        self.write_behind = self.native.WriteBehind() if fsync else None

    def chunk_elements(self, tensor: PlannedTensor) -> int:
        """A window of output; for more than three inputs a proportionally smaller one, so the
        input pages resident at once stay what they are for the trio."""
        trio_inputs = 3
        return (stream.WINDOW_BYTES // tensor.out_dtype.itemsize
                * trio_inputs // max(trio_inputs, len(tensor.sources)))

    def write(self, targets: Sequence, tensor: PlannedTensor, chunk: Chunk,
              recipes: Sequence) -> None:
        placed = [(x.fd, chunk.file_offset, r) for x, r in zip(targets, recipes)]
        if isinstance(recipes[0], self.native.SetRecipe):  # a base and a set of models
            err, crcs, nonfinite = self.native.merge_set_to_files(
                chunk.set_operands(tensor.out_dtype), placed, self.threads)
        else:
            err, crcs, nonfinite = self.native.merge_to_files(
                chunk.operands(tensor.out_dtype), placed, self.threads)
        if err == errno.EFAULT:
            raise InputChanged(f"an input of tensor {tensor.name} changed while it was being read")
        if err:
            paths = ", ".join(str(x.path) for x in targets)
            raise MergeError(f"{paths}: writing tensor {tensor.name} failed: {os.strerror(err)}")
        nbytes = chunk.count * tensor.out_dtype.itemsize
        for target, crc, bad in zip(targets, crcs, nonfinite):
            target.checksum.add(crc, nbytes)
            target.add_nonfinite(tensor.name, bad)
            if self.write_behind is not None:
                self.write_behind.submit(target.fd, chunk.file_offset, nbytes)
        chunk.release_inputs()

    def drain(self) -> None:
        """write() returns once the bytes are written; with fsync, wait until their write-back
        has been started (the shard's fsync and close follow)."""
        if self.write_behind is not None:
            self.write_behind.drain()

    def close(self) -> None:
        if self.write_behind is not None:
            self.write_behind.stop()
