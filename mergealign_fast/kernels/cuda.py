"""The native CUDA backend (csrc/cuda_merge.cu through the pybind11 module _cuda).

Nothing here runs at import: the extension is imported, and the CUDA runtime initialised, only
when a merge asks for this backend or `unavailable_reason()` is called.
"""

from __future__ import annotations

import functools
from typing import Optional

from . import cpu
from .buffer import Buffer


@functools.lru_cache(maxsize=None)
def _load():
    """(module or None, reason it cannot run or None)."""
    try:
        from .. import _cuda
    except ImportError as exc:
        return None, (f"not built ({exc}); reinstall with nvcc on PATH, or set "
                      "MERGEALIGN_FORCE_CUDA=1 to see why the build skipped it")
    error, count = _cuda.device_count()
    if error != 0:
        return None, f"no usable GPU: {_cuda.error_string(error)}"
    if count == 0:
        return None, "no CUDA device"
    return _cuda, None


def unavailable_reason() -> Optional[str]:
    return _load()[1]


def build_info() -> Optional[str]:
    """What _cuda was built for, without touching a GPU; None when it was not built."""
    try:
        from .. import _cuda
    except ImportError:
        return None
    major, minor = divmod(_cuda.runtime_version(), 1000)
    return f"CUDA {major}.{minor // 10} runtime (static), {_cuda.architectures()}"


def device_index(buffer: Buffer) -> int:
    """The CUDA device a buffer's owner (a torch tensor) lives on; -1 when it does not say."""
    device = getattr(buffer.owner, "device", None)
    if device is None or device.type != "cuda":
        return -1
    return device.index if device.index is not None else -1


def current_stream(device: int = -1) -> int:
    """torch's current CUDA stream of `device` (-1: the current device) as an integer handle (0,
    the default stream, without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.current_stream(None if device < 0 else device).cuda_stream


def _module():
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def _check(module, error: int) -> None:
    if error != 0:
        raise RuntimeError(f"CUDA call failed: {module.error_string(error)}")


def merge(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer,
          w_domain: float, w_align: float, threads: int, stream: Optional[int] = None) -> None:
    """Launched on the device the output lives on (made current for the launch, whichever is
    current), on that device's current torch stream unless `stream` is given."""
    module, device = _module(), device_index(out)
    _check(module, module.merge(cpu.operands(base, domain, aligned, out), out.address, w_domain,
                                w_align, current_stream(device) if stream is None else stream,
                                device))


def merge_recipe(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer, recipe,
                 first_index: int, threads: int, stream: Optional[int] = None) -> None:
    """Any merge method's per-element pass on the GPU (the recipe's passes ran on the CPU)."""
    module, device = _module(), device_index(out)
    _check(module, module.merge_recipe(cpu.operands(base, domain, aligned, out, first_index),
                                       out.address, recipe,
                                       current_stream(device) if stream is None else stream,
                                       device))


def copy_async(dst: int, src: int, nbytes: int, stream: int, device: int) -> None:
    """cudaMemcpyAsync between registered host staging and device memory."""
    module = _module()
    _check(module, module.copy_async(dst, src, nbytes, stream, device))


def host_register(address: int, nbytes: int, read_only: bool = False) -> None:
    """Page-lock host memory for DMA (read_only: a read-only mapping, e.g. of an input file)."""
    module = _module()
    error = module.host_register(address, nbytes, read_only)
    if error != 0:
        raise RuntimeError(f"cannot pin {nbytes:,} bytes of host memory: "
                           f"{module.error_string(error)}")


def host_unregister(address: int) -> None:
    _module().host_unregister(address)
