"""mergealign-fast: fused, streaming, bounded-memory merges of LLM checkpoints.

    theta = base + domain_weight * (domain - base) + align_weight * (aligned - base)

`merge_tensors` merges in-memory arrays/tensors; `merge_checkpoints` merges Hugging Face model
folders (its settings: `MergeOptions`); `sweep_checkpoints` writes one model per λ in one pass;
`Method` picks another merge method (TIES, DARE, SLERP, RESTA, ChipAlign, linear).  Importing
this package loads neither numpy, torch nor any GPU runtime.
"""

from ._version import __version__
from .dtypes import DType
from .engine import MergeResult, merge_checkpoints
from .errors import MergeError, PlanError
from .methods import Method
from .plan import MergeOptions
from .sweep import sweep_checkpoints


def __getattr__(name):
    # merge_tensors pulls in numpy; the merge command does not need it (see dtypes.py).
    if name == "merge_tensors":
        from .tensors import merge_tensors

        return merge_tensors
    raise AttributeError(f"module 'mergealign_fast' has no attribute {name!r}")



__all__ = ["DType", "MergeError", "MergeOptions", "MergeResult", "Method", "PlanError",
           "merge_checkpoints", "merge_tensors", "sweep_checkpoints", "__version__"]
