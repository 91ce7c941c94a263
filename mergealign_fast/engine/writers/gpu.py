"""Merging on a GPU within a fixed device-memory budget, the host side fast enough to feed it.

Each chunk of a tensor (at most STAGE_BYTES of inputs and output) passes five stages, and
SLOTS chunks are in flight at once, each in a slot of its own (pinned host staging + device
buffers, three inputs and one output):

    fill:     input files -> pinned in[s]     native threads (pread), GIL released
    upload:   pinned in[s] -> device in[s]    copy stream
    kernel:   device in[s] -> device out[s]   compute stream
    download: device out[s] -> pinned out[s]  second copy stream
    write:    pinned out[s] -> shard file     native writer thread: CRC-32C, NaN/inf count, pwrite

While the GPU moves and merges chunk i, native threads fill chunk i+1 and the writer thread
writes chunk i-1, so the host's passes over the bytes overlap the transfers, inside a tensor too.
Events order every reuse of a buffer; a slot is filled again only once its write has finished.

Memory: device memory and pinned host memory are each SLOTS x chunk x (input + output bytes per
element), sized up front from the budget (both stay within --gpu-memory), the chunk capped at
the largest tensor.  Pinned memory is page-aligned memory of that exact size, registered with
the driver (torch's pinned allocator rounds to a power of two: a 2 GiB budget pinned ~3 GiB).
Buffers are allocated once and freed only after close() has synchronised every stream, so no
buffer is ever released while a copy or kernel on another stream may still use it.

The same code runs with device="cpu": the cpu backend's kernel stands in for the GPU, copies are
synchronous (or skipped: a CPU "device" may share the staging memory), and the fill and writer
threads are the real ones.  `stress` injects random delays before every stage (host sleeps, the
writer thread's, and torch.cuda._sleep on each stream), so the tests can shake the ordering.
"""

from __future__ import annotations

import errno
import os
import random
import time
from typing import Dict, List, Optional, Sequence

from ...dtypes import DType, to_torch
from ...errors import MergeError
from ...kernels import cpu, get_kernel, get_recipe_kernel
from ...kernels.buffer import Buffer
from ...plan import PlannedTensor
from ...io.stream import Chunk, InputChanged
from .gpu_lanes import GPU_STAGES, STRESS_SECONDS, Lanes, Slot

# Four chunks in flight: one being filled, one on the GPU, one being written, and one spare so a
# stage that runs long (a page-cache miss in the fill, a slow pwrite) does not stall the others.
SLOTS = 4
# Inputs + output of one chunk.  At ~50 GB/s of PCIe a 64 MiB slot is ~1.3 ms of transfer, so the
# ~10 us per copy and launch costs <1%, and four slots (256 MiB of device and of pinned memory)
# fit any GPU.  benches/gpu_check.py times 16, 32 and 64 MiB.
STAGE_BYTES = 64 << 20
# Sub-buffers start on 256-byte boundaries: the CUDA kernel's 16-byte vector path needs 16, and
# 256 keeps every buffer at the start of a DRAM burst.  Chunks are multiples of 256 elements, so
# every region of a slot stays aligned.
ALIGNMENT = 256
# torch's caching allocator rounds a large device allocation up to a multiple of 2 MiB: kept
# out of the budget so the memory actually reserved stays within it.
DEVICE_ROUNDING = 2 << 20
# Smaller chunks would make each transfer too short to amortise its ~10 us launch cost.
MIN_CHUNK_ELEMENTS = 4096
def _align_down(n: int) -> int:
    return n // ALIGNMENT * ALIGNMENT


def _align_up(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _streamed_tensors(plan) -> List[PlannedTensor]:
    return [t for shard in plan.shards for t in shard.tensors if t.on_native_kernel]


def _bytes_per_element(tensors: Sequence[PlannedTensor]):
    """(input bytes, output bytes) per element, each the worst case over the tensors."""
    inputs = max((sum(t.source_dtype(i).itemsize for i in range(3)) for t in tensors), default=6)
    output = max((t.out_dtype.itemsize for t in tensors), default=2)
    return inputs, output


def chunk_elements_for(plan, budget: int, device_type: str, stage_bytes: int) -> int:
    """Elements per chunk: the most that SLOTS slots of the plan's widest element fit in the
    budget (less the allocator's rounding on a GPU) and in stage_bytes a slot, no more than the
    largest tensor needs; MergeError when the budget cannot hold MIN_CHUNK_ELEMENTS."""
    tensors = _streamed_tensors(plan)
    in_bytes, out_bytes = _bytes_per_element(tensors)
    per_element = in_bytes + out_bytes
    slack = DEVICE_ROUNDING if device_type == "cuda" else 0
    from_budget = _align_down((budget - slack) // (SLOTS * per_element))
    if from_budget < MIN_CHUNK_ELEMENTS:
        least = SLOTS * per_element * MIN_CHUNK_ELEMENTS + slack
        raise MergeError(f"GPU memory budget of {budget:,} bytes is too small: give at least "
                         f"{least:,} (e.g. --gpu-memory 64MiB)")
    largest = max((t.sources[0].entry.count for t in tensors), default=MIN_CHUNK_ELEMENTS)
    from_stage = _align_down(stage_bytes // per_element)
    return max(MIN_CHUNK_ELEMENTS, min(from_budget, from_stage, _align_up(largest)))


class GpuWriter:
    """Writer (writers/__init__.py) that computes on `device` within `budget` bytes of device
    memory (and as many of pinned host memory).  `device_copies` (CPU only): keep device
    buffers apart from the staging, so the copies run as on a GPU; `stress`: a seed for random
    delays before every stage; `stage_bytes`: a slot's size (STAGE_BYTES)."""

    def __init__(self, plan, budget: int, backend: str = "auto", device: str = "cuda", *,
                 threads: Optional[int] = None, device_copies: bool = False,
                 stress: Optional[int] = None, stage_bytes: int = STAGE_BYTES):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.options = plan.options
        self.kernel = get_kernel(backend, self.device.type)
        # Other methods than the plain formula need the recipe kernel (cuda; cpu for tests).
        self.recipe_kernel = (None if plan.options.method.is_plain_task_arithmetic
                              else get_recipe_kernel(backend, self.device.type))
        self.native = cpu.native()
        self.threads = threads or plan.options.threads or cpu.default_threads()
        self.chunk = chunk_elements_for(plan, budget, self.device.type, stage_bytes)
        in_bytes, out_bytes = _bytes_per_element(_streamed_tensors(plan))
        self.slot_in_bytes = self.chunk * in_bytes
        self.slot_bytes = self.chunk * (in_bytes + out_bytes)
        self.lanes = Lanes(torch, self.device, self.threads)
        self.rng = random.Random(stress) if stress is not None else None
        self.seconds: Dict[str, float] = dict.fromkeys(("fill", *GPU_STAGES, "wait"), 0.0)
        self._allocate(device_copies or self.device.type == "cuda")
        self.writer_thread = self.native.StagedWriter()
        self.turn = 0

    def _allocate(self, separate_device: bool) -> None:
        """The pinned staging (exact size, registered with the driver on a GPU) and the device
        buffers (one allocation, carved into slots; the staging itself on a CPU sharing it)."""
        total = SLOTS * self.slot_bytes
        self.host = self.native.HostBuffer(total)
        self.pinned = False
        if self.lanes.cuda:
            from ...kernels import cuda

            try:
                cuda.host_register(self.host.address, self.host.size)
            except RuntimeError as exc:
                self.host.release()
                raise MergeError(f"{exc} for the GPU staging; give a smaller --gpu-memory") \
                    from None
            self.pinned = True
        # What the buffers hold (the figures the budget bounds), kept after close() frees them.
        self.device_bytes = total if separate_device else 0
        self.pinned_bytes = self.host.size if self.pinned else 0
        # A torch tensor over the device memory: kernels that take tensors (Triton) get typed
        # views of it, and the CUDA backend reads its device from it.
        try:
            self.device_memory = (
                self.torch.empty(total, dtype=self.torch.uint8, device=self.device)
                if separate_device else _host_tensor(self.torch, self.host.address, total))
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError among them
            self.close()
            raise MergeError(f"{self.device}: cannot allocate {total:,} bytes of staging "
                             f"({str(exc).splitlines()[0]}); give a smaller --gpu-memory") \
                from None
        device_base = self.device_memory.data_ptr()
        self.slots = [Slot(self.host.address + s * self.slot_bytes,
                            device_base + s * self.slot_bytes, self.slot_in_bytes, self.lanes)
                      for s in range(SLOTS)]

    def _device_view(self, address: int, dtype: DType, count: int):
        """A typed torch view of `count` elements of the device memory at `address`."""
        offset = address - self.device_memory.data_ptr()
        return self.device_memory[offset:offset + count * dtype.itemsize].view(to_torch(dtype))

    def chunk_elements(self, tensor: PlannedTensor) -> int:
        return self.chunk

    def write(self, targets: Sequence, tensor: PlannedTensor, chunk: Chunk,
              recipes: Sequence) -> None:
        """`recipes` (one per target: a sweep's) come from the method's passes on the CPU; plain
        task arithmetic runs on any backend's kernel, other methods on merge_recipe."""
        if len(targets) != 1:
            raise MergeError("sweeps of several weightings run on the CPU (--device cpu)")
        try:
            self._write(targets[0], tensor, chunk, recipes[0])
        except RuntimeError as exc:  # a CUDA call that failed: one line, naming the tensor
            raise MergeError(f"tensor {tensor.name}: {str(exc).splitlines()[0]}") from None

    def _write(self, target, tensor: PlannedTensor, chunk: Chunk, recipe) -> None:
        slot = self.slots[self.turn]
        previous = self.slots[(self.turn - 1) % SLOTS]
        self.turn = (self.turn + 1) % SLOTS
        self._retire(slot)  # its last write is done: the output staging is free
        self._waited(slot.uploaded)  # its last upload is done: the input staging is free
        in_dtypes = list(chunk.dtypes)
        self._fill(slot, tensor, chunk, in_dtypes)
        self._enqueue(slot, tensor, chunk, in_dtypes, recipe)
        slot.downloading = (target, chunk.file_offset, tensor, chunk.count)
        self._hand_over(previous)  # its download finished while this chunk was filled

    def _regions(self, start: int, dtypes: List[DType], count: int):
        """(addresses of consecutive ALIGNMENT-aligned regions of `count` elements of each dtype
        from `start`, bytes spanned).  They fit a slot: its capacity is a multiple of ALIGNMENT
        elements."""
        addresses, offset = [], 0
        for dtype in dtypes:
            addresses.append(start + offset)
            offset = _align_up(offset + count * dtype.itemsize)
        return addresses, offset

    def _fill(self, slot: Slot, tensor: PlannedTensor, chunk: Chunk, dtypes) -> None:
        self.lanes.pause(None, self.rng)
        targets, _ = self._regions(slot.host_in, dtypes, chunk.count)
        # Files are read with pread (no page faults), memory of our own (gathered rows) copied.
        pieces = [(source.address + offset, dst, length, getattr(source, "fd", -1), offset)
                  for (source, offset, length), dst in zip(chunk.inputs, targets)]
        began = time.perf_counter()
        err = self.native.fill_staging(pieces, self.threads)
        self.seconds["fill"] += time.perf_counter() - began
        if err == errno.EFAULT:
            raise InputChanged(f"an input of tensor {tensor.name} changed while it was being read")
        if err:
            raise MergeError(f"reading tensor {tensor.name} failed: {os.strerror(err)}")
        chunk.release_inputs()

    def _enqueue(self, slot: Slot, tensor: PlannedTensor, chunk: Chunk, dtypes, recipe) -> None:
        """Upload, merge and download the slot's chunk on the three streams (on the CPU: now)."""
        lanes, count = self.lanes, chunk.count
        _, in_bytes = self._regions(slot.host_in, dtypes, count)
        out_bytes = count * tensor.out_dtype.itemsize
        with lanes.on(lanes.h2d):
            lanes.wait(lanes.h2d, slot.computed)  # the kernel has finished reading device_in
            lanes.pause(lanes.h2d, self.rng)
            self._stage(slot, "upload",
                        lambda: lanes.copy(slot.device_in, slot.host_in, in_bytes, lanes.h2d))
            slot.uploaded.record()
        with lanes.on(lanes.compute):
            lanes.wait(lanes.compute, slot.uploaded)
            lanes.wait(lanes.compute, slot.downloaded)  # device_out has been copied out
            lanes.pause(lanes.compute, self.rng)
            self._stage(slot, "kernel", lambda: self._merge(slot, tensor, chunk, dtypes, recipe))
            slot.computed.record()
        with lanes.on(lanes.d2h):
            lanes.wait(lanes.d2h, slot.computed)
            lanes.pause(lanes.d2h, self.rng)
            self._stage(slot, "download",
                        lambda: lanes.copy(slot.host_out, slot.device_out, out_bytes, lanes.d2h))
            slot.downloaded.record()

    def _stage(self, slot: Slot, stage: str, work) -> None:
        """Run a GPU stage's work on the current stream: on a GPU its start is recorded (the
        seconds are read at hand-over, once the stage is done), on the CPU it is timed now."""
        if self.lanes.cuda:
            slot.began[stage].record()
            work()
            return
        began = time.perf_counter()
        work()
        self.seconds[stage] += time.perf_counter() - began

    def _merge(self, slot: Slot, tensor: PlannedTensor, chunk: Chunk, dtypes, recipe) -> None:
        addresses, _ = self._regions(slot.device_in, dtypes, chunk.count)
        buffers = [Buffer(a, d, chunk.count, owner=self._device_view(a, d, chunk.count))
                   for a, d in zip(addresses, dtypes)]
        out = Buffer(slot.device_out, tensor.out_dtype, chunk.count,
                     owner=self._device_view(slot.device_out, tensor.out_dtype, chunk.count))
        if self.recipe_kernel is not None:
            self.recipe_kernel(*buffers, out, recipe, chunk.start, self.threads)
        else:
            self.kernel(*buffers, out, self.options.domain_weight, self.options.align_weight,
                        self.threads)

    def _waited(self, event) -> None:
        began = time.perf_counter()
        event.synchronize()
        self.seconds["wait"] += time.perf_counter() - began

    def _hand_over(self, slot: Slot) -> None:
        """A slot's finished download to the writer thread."""
        if slot.downloading is None:
            return
        target, offset, tensor, count = slot.downloading
        self._waited(slot.downloaded)
        if self.lanes.cuda:  # every stage of the slot is done: read their GPU times
            for stage, ended in zip(GPU_STAGES, (slot.uploaded, slot.computed, slot.downloaded)):
                self.seconds[stage] += slot.began[stage].elapsed_time(ended) / 1e3
        delay_us = self.rng.randrange(int(STRESS_SECONDS * 1e6)) if self.rng else 0
        ticket = self.writer_thread.submit(target.fd, offset, slot.host_out, count,
                                           int(tensor.out_dtype), delay_us)
        slot.writing = (target, tensor, ticket, count * tensor.out_dtype.itemsize)
        slot.downloading = None

    def _retire(self, slot: Slot) -> None:
        """Wait for a slot's write and add its CRC and NaN/inf count to its shard (in file
        order: slots retire in the order their chunks were written)."""
        if slot.writing is None:
            return
        target, tensor, ticket, nbytes = slot.writing
        slot.writing = None
        began = time.perf_counter()
        err, crc, nonfinite = self.writer_thread.wait(ticket)
        self.seconds["wait"] += time.perf_counter() - began
        if err:
            raise MergeError(f"{target.path}: writing tensor {tensor.name} failed: "
                             f"{os.strerror(err)}")
        target.checksum.add(crc, nbytes)
        target.add_nonfinite(tensor.name, nonfinite)

    def drain(self) -> None:
        """Write every chunk handed over; called before a shard file is closed."""
        order = [self.slots[(self.turn + i) % SLOTS] for i in range(SLOTS)]  # oldest first
        for slot in order:
            self._hand_over(slot)
        for slot in order:
            self._retire(slot)

    @property
    def stage_seconds(self) -> Dict[str, float]:
        """Seconds of each stage summed over the chunks: fill (host threads), upload, kernel
        and download (GPU time between events; on the CPU the synchronous calls), write (the
        writer thread's busy time), and wait (the merge's thread blocked on a stage)."""
        return {**self.seconds, "write": self.writer_thread.busy_seconds}

    def close(self) -> None:
        """Wait for every copy and kernel in flight (an error may have interrupted the pipeline
        with transfers still using the buffers), stop the writer thread (chunks not yet written
        are dropped: their shard is being discarded), then free the buffers."""
        try:
            self.lanes.synchronize()
        finally:
            if hasattr(self, "writer_thread"):
                self.writer_thread.stop()
            for slot in getattr(self, "slots", ()):
                slot.downloading = slot.writing = None
            if self.pinned:
                from ...kernels import cuda

                cuda.host_unregister(self.host.address)
                self.pinned = False
            self.device_memory = None
            self.host.release()


def _host_tensor(torch, address: int, nbytes: int):
    """A uint8 tensor over `nbytes` of host memory at `address` (no copy)."""
    import ctypes

    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
