"""mergealign-fast: fused, streaming, bounded-memory merges of LLM checkpoints.

    theta = base + domain_weight * (domain - base) + align_weight * (aligned - base)

`merge_tensors` merges in-memory arrays/tensors; `merge_checkpoints` merges Hugging Face model
folders.  Importing this package loads neither torch nor any GPU runtime.
"""

from .dtypes import DType
from .engine import MergeResult, merge_checkpoints
from .errors import MergeError, PlanError
from .tensors import merge_tensors

__version__ = "0.1.0"

__all__ = ["DType", "MergeError", "MergeResult", "PlanError", "merge_checkpoints",
           "merge_tensors", "__version__"]
