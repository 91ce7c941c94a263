"""A raw view of tensor memory: what crosses from Python into a kernel."""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import DType


@dataclass(frozen=True)
class Buffer:
    """`count` elements of `dtype` starting at byte address `address` (any alignment).

    The owner of the memory must keep it alive while a kernel runs; `owner` holds a reference to
    it for exactly that reason.
    """

    address: int
    dtype: DType
    count: int
    owner: object = None

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize
