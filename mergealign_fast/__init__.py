"""mergealign-fast: fused, streaming, bounded-memory merges of LLM checkpoints.

    theta = base + domain_weight * (domain - base) + align_weight * (aligned - base)

`merge_tensors` merges in-memory arrays/tensors; `merge_checkpoints` merges Hugging Face model
folders.  Importing this package loads neither numpy, torch nor any GPU runtime.
"""

from .dtypes import DType
from .engine import MergeResult, merge_checkpoints
from .errors import MergeError, PlanError

__version__ = "0.1.0"


def __getattr__(name):
    # merge_tensors pulls in numpy; the merge command does not need it (see dtypes.py).
    if name == "merge_tensors":
        from .tensors import merge_tensors

        return merge_tensors
    raise AttributeError(f"module 'mergealign_fast' has no attribute {name!r}")

__all__ = ["DType", "MergeError", "MergeResult", "PlanError", "merge_checkpoints",
           "merge_tensors", "__version__"]
