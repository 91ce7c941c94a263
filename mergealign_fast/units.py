"""Sizes and units: byte counts as users write them (5GB, 2GiB, mergekit's 5B) and as we print
them, and the path type the public functions take."""

from __future__ import annotations

import os
import re
from typing import Union

PathLike = Union[str, os.PathLike]


def parse_size(text: str) -> int:
    """'5GB' -> 5*10^9, '2GiB' -> 2*2^30, '500MB', '1024' (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {text!r}: use e.g. 5GB, 500MB or 2GiB")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def parse_mergekit_size(text: str) -> int:
    """mergekit's sizes: a whole number with an optional K, M or B suffix, decimal (5B = 5e9
    bytes: its writer compares them with bytes, whatever its help says about parameters)."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"--out-shard-size {text!r}: expected a whole number with an optional "
                         "K, M or B suffix (e.g. 5B)")
    return int(digits) * scale


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
