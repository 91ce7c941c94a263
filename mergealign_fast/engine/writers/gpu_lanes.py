"""The GPU writer's device side (gpu.py): its three streams (upload, compute, download), their
events and copies, and each slot's staging — or, on the CPU (the tests' stand-in device),
synchronous stand-ins, so the whole host pipeline runs without a GPU."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Optional

from ...kernels import cpu

# Random delays of the stress mode: up to 1 ms before each stage.
STRESS_SECONDS = 1e-3
# torch.cuda._sleep spins this many GPU cycles at most (~1 ms at the H200's ~1.98 GHz).
STRESS_CYCLES = 2_000_000
# The stages on the device's streams, each timed from its start to the event that ends it.
GPU_STAGES = ("upload", "kernel", "download")


class SyncEvent:
    """Stand-in for torch.cuda.Event on the CPU, where every operation is already complete."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class Lanes:
    """Streams, events and copies on a CUDA device, or synchronous stand-ins on the CPU."""

    def __init__(self, torch, device, threads: int):
        self.torch = torch
        self.cuda = device.type == "cuda"
        self.index = device.index if self.cuda and device.index is not None else -1
        if self.cuda and self.index < 0:
            self.index = torch.cuda.current_device()
        make = (lambda: torch.cuda.Stream(self.index)) if self.cuda else (lambda: None)
        self.h2d, self.compute, self.d2h = make(), make(), make()
        self.threads = threads

    def on(self, stream):
        return self.torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def event(self):
        """An event that orders streams and times them (torch's timing events cost ~1 us)."""
        return self.torch.cuda.Event(enable_timing=True) if self.cuda else SyncEvent()

    def wait(self, stream, event) -> None:
        if self.cuda:
            stream.wait_event(event)

    def copy(self, dst: int, src: int, nbytes: int, stream) -> None:
        if dst == src or nbytes == 0:
            return  # a CPU "device" sharing the staging memory: nothing to move
        if self.cuda:
            from ...kernels import cuda

            cuda.copy_async(dst, src, nbytes, stream.cuda_stream, self.index)
        else:
            cpu.native().copy_threads(dst, src, nbytes, self.threads)

    def pause(self, stream, rng: Optional[random.Random]) -> None:
        """The stress mode's random delay before a stage on `stream` (None: the host)."""
        if rng is None:
            return
        if self.cuda and stream is not None:
            with self.on(stream):
                self.torch.cuda._sleep(rng.randrange(STRESS_CYCLES))
        else:
            time.sleep(rng.random() * STRESS_SECONDS)

    def synchronize(self) -> None:
        if self.cuda:
            for stream in (self.h2d, self.compute, self.d2h):
                stream.synchronize()


class Slot:
    """One chunk's staging: `in_bytes` of inputs then the output, on the host and the device."""

    def __init__(self, host: int, device: int, in_bytes: int, lanes: Lanes):
        self.host_in, self.host_out = host, host + in_bytes
        self.device_in, self.device_out = device, device + in_bytes
        self.uploaded, self.computed, self.downloaded = (lanes.event(), lanes.event(),
                                                         lanes.event())
        # When each GPU stage began (after its waits): the stage seconds of stage_seconds.
        self.began = {stage: lanes.event() for stage in GPU_STAGES}
        self.downloading = None  # (target, file offset, tensor, count) of a download in flight
        self.writing = None  # (target, tensor, ticket, bytes) of a write in flight


