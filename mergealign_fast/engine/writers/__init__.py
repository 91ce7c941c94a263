"""Writers compute each chunk of a merge and put it into the shard files.

The engine drives every writer the same way (the `Writer` protocol): for each tensor of a shard
it asks how many elements a chunk may hold, hands each chunk over with the shard files it goes
to and the tensor's recipes, drains before the files are closed, and closes the writer when the
merge ends, whether it succeeded or not.  `CpuWriter` computes in the calling thread's native
call; `GpuWriter` streams chunks through a GPU within a device-memory budget.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from ...kernels.cpu import default_threads
from ...plan import MergePlan, PlannedTensor
from ...io.stream import Chunk


@runtime_checkable
class Writer(Protocol):
    def chunk_elements(self, tensor: PlannedTensor) -> int:
        """Most elements of `tensor` one chunk may hold."""

    def write(self, targets: Sequence, tensor: PlannedTensor, chunk: Chunk,
              recipes: Sequence) -> None:
        """Merge `chunk` of `tensor` with recipes[j] into targets[j] (output.ShardFile), adding
        each output's CRC to its checksum in file order; the chunk's input pages may be released
        once read.  A writer may return before the bytes are written (see drain)."""

    def drain(self) -> None:
        """Everything handed to write() is in the files: called before a shard is closed."""

    def close(self) -> None:
        """Wait for work in flight and free the writer's buffers; called once, also on error."""


def make_writer(plan: MergePlan) -> Writer:
    """The writer the plan's options ask for: the CPU, or a GPU (device cuda / cuda:N)."""
    options = plan.options
    if options.device.split(":")[0] == "cpu":
        from .cpu import CpuWriter

        return CpuWriter(options.fsync, options.threads or default_threads())
    from .gpu import GpuWriter

    return GpuWriter(plan, options.gpu_memory, options.backend, options.device)
