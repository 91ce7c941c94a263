"""The native CPU backend (csrc/cpu_merge.cpp through the pybind11 module _native).

Importing this module never fails: if the extension is missing or broken, the reason is kept and
reported when a merge asks for this backend (fail at call time, never at import).
"""

from __future__ import annotations

import os
from typing import Optional

from .buffer import Buffer

try:
    from .. import _native
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _native = None
    _IMPORT_ERROR = (f"the native extension did not load ({exc}); "
                     "reinstall with `pip install -e .` to rebuild it")


def unavailable_reason() -> Optional[str]:
    return _IMPORT_ERROR


def native():
    """The _native module, or RuntimeError with the saved reason."""
    if _native is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _native


def default_threads() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def operands(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer, first_index: int = 0):
    """The native Operands of three input buffers and an output buffer (its dtype and count)."""
    return native().Operands(base.address, int(base.dtype), domain.address, int(domain.dtype),
                             aligned.address, int(aligned.dtype), out.count, int(out.dtype),
                             first_index)


def merge(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer,
          w_domain: float, w_align: float, threads: int) -> None:
    native().merge(operands(base, domain, aligned, out), out.address, w_domain, w_align, threads)


def merge_recipe(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer, recipe,
                 first_index: int, threads: int) -> None:
    """Any merge method's per-element pass (methods.tensor_recipe made `recipe`)."""
    native().merge_recipe(operands(base, domain, aligned, out, first_index), out.address, recipe,
                          threads)
