"""Merging on a GPU within a fixed device-memory budget.

Chunks of each tensor flow through two slots, each a set of device buffers (3 inputs + 1 output)
and pinned host staging buffers:

    host:  mmap -> pinned in[s]          (CPU copy; the input pages are then released)
    h2d:   pinned in[s] -> device in[s]  (copy stream)
    comp:  kernel(device in[s]) -> device out[s]
    d2h:   device out[s] -> pinned out[s] (second copy stream)
    host:  pinned out[s] -> file          (pwrite, when slot s comes round again)

While the GPU copies and computes slot s, the host fills slot s^1, so host copies, both DMA
directions and the kernel overlap.  Events order the reuse of every buffer.  Device memory is
2 slots x chunk x (input bytes + output bytes) per element, sized from the budget up front, so the
peak stays within it whatever the model size; tensors larger than a chunk are split.

The same code runs with device="cpu" (ordinary tensors, no streams, synchronous "events"), which
is how the CPU-only test suite exercises the chunking, slot reuse and file offsets.
"""

from __future__ import annotations

import contextlib
from typing import List, Sequence

from ..dtypes import DType, to_torch
from ..errors import MergeError
from ..kernels import cpu, get_kernel, get_recipe_kernel
from ..kernels.buffer import Buffer
from ..output import write_fully
from ..plan import PlannedTensor
from ..stream import Chunk

SLOTS = 2  # double buffering: one slot in flight on the GPU while the host fills the other
# Sub-buffers start on 256-byte boundaries: the CUDA kernel's 16-byte vector path needs 16, and
# 256 keeps every buffer at the start of a DRAM burst.
ALIGNMENT = 256
# Smaller chunks would make each transfer too short to amortise its ~10 us launch cost.
MIN_CHUNK_ELEMENTS = 4096


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _bytes_per_element(plan):
    """(input bytes, output bytes) per element, each the worst case over the plan's tensors."""
    tensors = [t for shard in plan.shards for t in shard.tensors if t.on_native_kernel]
    inputs = max((sum(t.source_dtype(i).itemsize for i in range(3)) for t in tensors), default=6)
    output = max((t.out_dtype.itemsize for t in tensors), default=2)
    return inputs, output


class _SyncEvent:
    """Stand-in for torch.cuda.Event on the CPU, where every operation is already complete."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Lanes:
    """Streams and events on a CUDA device, or synchronous stand-ins on the CPU."""

    def __init__(self, torch, device):
        self.torch = torch
        self.cuda = device.type == "cuda"
        make = (lambda: torch.cuda.Stream(device)) if self.cuda else (lambda: None)
        self.h2d, self.compute, self.d2h = make(), make(), make()

    def on(self, stream):
        return self.torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def event(self):
        return self.torch.cuda.Event() if self.cuda else _SyncEvent()

    def wait(self, stream, event) -> None:
        if self.cuda:
            stream.wait_event(event)


class _Slot:
    def __init__(self, torch, device, chunk: int, in_bytes: int, out_bytes: int, pin: bool,
                 lanes: _Lanes):
        self.device_in = torch.empty(_align(chunk * in_bytes), dtype=torch.uint8, device=device)
        self.device_out = torch.empty(_align(chunk * out_bytes), dtype=torch.uint8, device=device)
        self.host_in = torch.empty(self.device_in.numel(), dtype=torch.uint8, pin_memory=pin)
        self.host_out = torch.empty(self.device_out.numel(), dtype=torch.uint8, pin_memory=pin)
        self.uploaded, self.computed, self.downloaded = (lanes.event(), lanes.event(),
                                                         lanes.event())
        # (shard file, file offset, tensor, elements) of a result not yet written
        self.pending = None


class GpuWriter:
    """Writer (writers/__init__.py) that computes on `device` within `budget` bytes."""

    def __init__(self, plan, budget: int, backend: str = "auto", device: str = "cuda"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.options = plan.options
        self.kernel = get_kernel(backend, self.device.type)
        # Other methods than the plain formula need the recipe kernel (cuda; cpu for tests).
        self.recipe_kernel = (None if plan.options.method.is_plain_task_arithmetic
                              else get_recipe_kernel(backend, self.device.type))
        self.native = cpu.native()
        in_bytes, out_bytes = _bytes_per_element(plan)
        # Chunks are whole multiples of ALIGNMENT elements, so the three input regions of a slot
        # stay aligned back to back; each device buffer rounds up by < ALIGNMENT bytes.
        overhead = SLOTS * 2 * ALIGNMENT
        per_chunk_element = SLOTS * (in_bytes + out_bytes)
        self.chunk = (budget - overhead) // per_chunk_element // ALIGNMENT * ALIGNMENT
        if self.chunk < MIN_CHUNK_ELEMENTS:
            least = per_chunk_element * MIN_CHUNK_ELEMENTS + overhead
            raise MergeError(f"GPU memory budget of {budget:,} bytes is too small: give at least "
                             f"{least:,} (e.g. --gpu-memory 64MiB)")
        self.lanes = _Lanes(torch, self.device)
        pin = self.device.type == "cuda"
        self.slots = [_Slot(torch, self.device, self.chunk, in_bytes, out_bytes, pin, self.lanes)
                      for _ in range(SLOTS)]
        self.turn = 0

    def chunk_elements(self, tensor: PlannedTensor) -> int:
        return self.chunk

    @property
    def device_bytes(self) -> int:
        """Device memory held by the buffers: what the budget bounds."""
        return sum(s.device_in.numel() + s.device_out.numel() for s in self.slots)

    def _views(self, raw, dtypes: List[DType], count: int):
        """(typed views of consecutive ALIGNMENT-aligned regions of a byte buffer, bytes used)."""
        views, offset = [], 0
        for dtype in dtypes:
            nbytes = count * dtype.itemsize
            views.append(raw[offset:offset + nbytes].view(to_torch(dtype)))
            offset = _align(offset + nbytes)
        return views, offset

    def _flush(self, slot: _Slot) -> None:
        if slot.pending is None:
            return
        target, offset, tensor, count = slot.pending
        slot.downloaded.synchronize()
        address, nbytes = slot.host_out.data_ptr(), count * tensor.out_dtype.itemsize
        target.checksum.add(self.native.crc32c(address, nbytes), nbytes)
        target.add_nonfinite(tensor.name,
                             self.native.count_nonfinite(address, count, int(tensor.out_dtype)))
        write_fully(target.fd, memoryview(slot.host_out.numpy())[:nbytes], offset, target.path)
        slot.pending = None

    def write(self, targets: Sequence, tensor: PlannedTensor, chunk: Chunk,
              recipes: Sequence) -> None:
        """`recipes` (one per target: a sweep's) come from the method's passes on the CPU; plain
        task arithmetic runs on any backend's kernel, other methods on merge_recipe."""
        if len(targets) != 1:
            raise MergeError("sweeps of several weightings run on the CPU (--device cpu)")
        torch, lanes, t = self.torch, self.lanes, tensor
        slot = self.slots[self.turn]
        self.turn = (self.turn + 1) % SLOTS
        self._flush(slot)  # also proves the slot's previous download has finished
        slot.uploaded.synchronize()  # host_in is free once its last upload is done
        in_dtypes = list(chunk.dtypes)
        host_views, in_bytes = self._views(slot.host_in, in_dtypes, chunk.count)
        for view, (mapped, offset, length) in zip(host_views, chunk.inputs):
            view.view(torch.uint8).copy_(_host_bytes(torch, mapped.address + offset, length))
        chunk.release_inputs()
        with lanes.on(lanes.h2d):
            lanes.wait(lanes.h2d, slot.computed)  # the kernel has finished reading device_in
            # Only the bytes this chunk uses: small tensors must not move a whole slot.
            slot.device_in[:in_bytes].copy_(slot.host_in[:in_bytes], non_blocking=True)
            slot.uploaded.record()
        device_inputs, _ = self._views(slot.device_in, in_dtypes, chunk.count)
        [device_out], _ = self._views(slot.device_out, [t.out_dtype], chunk.count)
        with lanes.on(lanes.compute):
            lanes.wait(lanes.compute, slot.uploaded)
            lanes.wait(lanes.compute, slot.downloaded)  # device_out has been copied out
            buffers = [Buffer(v.data_ptr(), dt, chunk.count, owner=v)
                       for v, dt in zip(device_inputs, in_dtypes)]
            out = Buffer(device_out.data_ptr(), t.out_dtype, chunk.count, owner=device_out)
            if self.recipe_kernel is not None:
                self.recipe_kernel(*buffers, out, recipes[0], chunk.start, 1)
            else:
                self.kernel(*buffers, out, self.options.domain_weight,
                            self.options.align_weight, 1)
            slot.computed.record()
        out_bytes = chunk.count * t.out_dtype.itemsize
        with lanes.on(lanes.d2h):
            lanes.wait(lanes.d2h, slot.computed)
            slot.host_out[:out_bytes].copy_(slot.device_out[:out_bytes], non_blocking=True)
            slot.downloaded.record()
        slot.pending = (targets[0], chunk.file_offset, tensor, chunk.count)

    def drain(self) -> None:
        """Write every pending result; called before a shard file is closed."""
        for _ in range(SLOTS):
            self._flush(self.slots[self.turn])
            self.turn = (self.turn + 1) % SLOTS

    def close(self) -> None:
        """Wait for every copy and kernel in flight (an error may have interrupted the pipeline
        with transfers still reading or writing the buffers), then drop the results not written:
        their shard is being discarded."""
        for slot in self.slots:
            for event in (slot.uploaded, slot.computed, slot.downloaded):
                event.synchronize()
            slot.pending = None


def _host_bytes(torch, address: int, length: int):
    """A uint8 tensor over `length` bytes of host memory at `address` (no copy)."""
    import ctypes

    if length == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_uint8 * length).from_address(address), dtype=torch.uint8)
