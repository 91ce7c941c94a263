"""Element types: one table linking safetensors names, the native dtype codes, numpy and torch.

numpy has no bfloat16, so bf16 data travels through numpy as uint16 bit patterns.  Neither numpy
nor torch is imported here at module level: the merge command needs neither, and importing numpy
alone starts OpenBLAS threads that spin for a while (5% of a 1.1B merge's cycles in perf).
"""

from __future__ import annotations

import enum
from typing import Any


class DType(enum.IntEnum):
    """Dtypes the merge kernels read and write.  Values are the codes of csrc/merge_math.h."""

    F32 = 0
    F16 = 1
    BF16 = 2

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.F32 else 2

    @property
    def safetensors_name(self) -> str:
        return self.name

    @property
    def short_name(self) -> str:
        return _SHORT_NAMES[self]

    @property
    def torch_name(self) -> str:
        """torch's name ("bfloat16"), as config.json's torch_dtype/dtype spells it too."""
        return _TORCH_NAMES[self]


_SHORT_NAMES = {DType.F32: "fp32", DType.F16: "fp16", DType.BF16: "bf16"}
_TORCH_NAMES = {DType.F32: "float32", DType.F16: "float16", DType.BF16: "bfloat16"}

# Every whole-byte dtype the safetensors format defines (its sub-byte F4 and F6 are not yet):
# its size in bytes, and the numpy dtype that holds its stored bytes (float8 as raw bytes, bf16
# as uint16 bits).  A header naming one of these is
# well formed even when the merge cannot compute in it (that is reported separately, by name).
_SAFETENSORS_DTYPES = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "F8_E5M2": (1, "uint8"),
    "F8_E4M3": (1, "uint8"), "F8_E8M0": (1, "uint8"),
    "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"), "BF16": (2, "uint16"),
    "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"), "C64": (8, "complex64"),
}
SAFETENSORS_ITEMSIZE = {name: size for name, (size, _) in _SAFETENSORS_DTYPES.items()}

_ALIASES = {
    "fp32": DType.F32, "float32": DType.F32, "f32": DType.F32,
    "fp16": DType.F16, "float16": DType.F16, "f16": DType.F16, "half": DType.F16,
    "bf16": DType.BF16, "bfloat16": DType.BF16,
}


def parse_dtype(name: str) -> DType:
    """'bf16', 'bfloat16', 'BF16', 'float16', ... -> DType; ValueError naming the choices."""
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown dtype {name!r}: choose bf16, fp16 or fp32")


def from_safetensors(name: str) -> DType | None:
    """The DType for a safetensors dtype string, or None when the kernels cannot merge it."""
    return DType[name] if name in DType.__members__ else None


def as_dtype(value: Any) -> DType:
    """A DType from what a user may pass: a DType, a name ('bf16', 'float16', ...), a torch dtype
    or a numpy dtype; ValueError naming the choices otherwise."""
    if isinstance(value, DType):
        return value
    if isinstance(value, str):
        return parse_dtype(value)
    module = type(value).__module__
    try:
        if module.startswith("torch"):
            return from_torch(value)
        if module.startswith("numpy") or hasattr(value, "dtype"):
            import numpy as np

            return from_numpy(np.dtype(value))
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    raise ValueError(f"unknown dtype {value!r}: choose bf16, fp16 or fp32")


def from_numpy(dtype: Any) -> DType:
    """float32, float16, and bf16 as either ml_dtypes' bfloat16 or raw uint16 bit patterns
    (numpy has no bf16 of its own; uint16 is never a weight dtype, so it is unambiguous)."""
    table = {"float32": DType.F32, "float16": DType.F16, "uint16": DType.BF16,
             "bfloat16": DType.BF16}
    if dtype.name in table and not dtype.isnative:
        raise TypeError(f"numpy array of {dtype.str!r} is in the other byte order than this "
                        "machine's: convert it first (a.astype(a.dtype.newbyteorder('=')))")
    if dtype.name in table:
        return table[dtype.name]
    raise TypeError(f"numpy arrays must be float32, float16 or bf16 bits as uint16 "
                    f"(got {dtype})")


def from_torch(dtype: Any) -> DType:
    import torch  # only reached when the caller already passed torch tensors

    table = {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16}
    if dtype not in table:
        raise TypeError(f"torch tensors must be float32, float16 or bfloat16 (got {dtype})")
    return table[dtype]


def to_torch(dtype: DType) -> Any:
    import torch

    return getattr(torch, dtype.torch_name)


def stored_numpy_dtype(safetensors_name: str) -> Any:
    """The numpy dtype that holds a safetensors dtype's stored bytes (little-endian)."""
    import numpy as np

    return np.dtype(_SAFETENSORS_DTYPES[safetensors_name][1]).newbyteorder("<")


def storage_numpy_dtype(dtype: DType) -> Any:
    """The numpy dtype that holds this dtype's raw bits (uint16 for bf16)."""
    return stored_numpy_dtype(dtype.safetensors_name)


def bf16_bits_to_f32(bits: Any) -> Any:
    """Exact widening of bf16 bit patterns (a uint16 numpy array) to float32."""
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


# The one NaN a merge stores per dtype (csrc/merge_math.h says why): raw bits.
CANONICAL_NAN_BITS = {DType.F32: 0x7FC00000, DType.BF16: 0x7FC0, DType.F16: 0x7E00}


def f32_to_bf16_bits(values: Any) -> Any:
    """float32 -> bf16 bit patterns (uint16 numpy array), round-to-nearest-even, NaN as the
    canonical bf16 NaN: the rounding of csrc/merge_math.h."""
    import numpy as np

    x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((x + np.uint32(0x7FFF) + ((x >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = CANONICAL_NAN_BITS[DType.BF16]
    return rounded
