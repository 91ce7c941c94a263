"""PyTorch reference backend: the same formula, in the same fp32 order, with torch ops.

Slow (it materialises every intermediate), but independent of our native code, which makes it
the comparison point for the kernels: with contraction off, both must agree bit for bit.
"""

from __future__ import annotations

from typing import Optional

from ..dtypes import CANONICAL_NAN_BITS, DType, to_torch
from .buffer import Buffer


def unavailable_reason() -> Optional[str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed (pip install torch==2.13.0 for the CPU build)"
    return None


def as_torch(buf: Buffer):
    """A torch tensor aliasing the buffer's memory (no copy): its owner when that is a torch
    tensor (CPU or CUDA), else a view of the host address."""
    import ctypes

    import torch

    if isinstance(buf.owner, torch.Tensor) and buf.owner.data_ptr() == buf.address:
        return buf.owner.reshape(-1)
    if buf.count == 0:
        return torch.empty(0, dtype=to_torch(buf.dtype))
    raw = (ctypes.c_uint8 * buf.nbytes).from_address(buf.address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(to_torch(buf.dtype))


def merge(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer,
          w_domain: float, w_align: float, threads: int) -> None:
    import torch

    b, d, a = (as_torch(x).to(torch.float32) for x in (base, domain, aligned))
    wd = torch.tensor(w_domain, dtype=torch.float32)
    wa = torch.tensor(w_align, dtype=torch.float32)
    merged = (b + wd * (d - b)) + wa * (a - b)
    dtype = DType(out.dtype)
    stored = merged.to(to_torch(dtype))
    # Every NaN as the dtype's canonical NaN, as the kernels store it (csrc/merge_math.h).
    bits = stored.view(torch.int32 if dtype is DType.F32 else torch.int16)
    canonical = torch.tensor(CANONICAL_NAN_BITS[dtype], dtype=torch.int64).to(bits.dtype)
    as_torch(out).copy_(torch.where(torch.isnan(merged), canonical.to(bits.device), bits)
                        .view(stored.dtype))
