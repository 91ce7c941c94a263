"""The native CPU backend (csrc/cpu_merge.cpp through the pybind11 module _native).

Importing this module never fails: if the extension is missing or broken, the reason is kept and
reported when a merge asks for this backend (STYLE.md: fail at call time, never at import).
"""

from __future__ import annotations

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


def merge(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer,
          w_domain: float, w_align: float, threads: int) -> None:
    native().merge(base.address, int(base.dtype), domain.address, int(domain.dtype),
                   aligned.address, int(aligned.dtype), out.address, int(out.dtype),
                   out.count, w_domain, w_align, threads)


def merge_recipe(base: Buffer, domain: Buffer, aligned: Buffer, out: Buffer, recipe,
                 first_index: int, threads: int) -> None:
    """Any merge method's per-element pass (methods.tensor_recipe made `recipe`)."""
    native().merge_recipe(base.address, int(base.dtype), domain.address, int(domain.dtype),
                          aligned.address, int(aligned.dtype), out.address, int(out.dtype),
                          out.count, first_index, recipe, threads)
