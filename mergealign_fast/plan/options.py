"""MergeOptions: every setting of a merge, with its default (one home for them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .. import dtypes
from ..dtypes import DType
from ..methods.core.parameters import Method
from ..units import parse_size
from ..vocabulary import VocabularySpec

ROLES = ("base", "domain", "aligned")
# transformers' default for save_pretrained(max_shard_size=...): 5 GB in decimal units.
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
# Device memory for streaming merges on a GPU, unless --gpu-memory says otherwise.
DEFAULT_GPU_MEMORY = 2 << 30
# The native kernel's model count (csrc/merge_operands.h kMaxModels).
MAX_SET_MODELS = 32
# Slack beyond what the output's files take (output_needs counts shards, side files and the
# manifest, each rounded up to whole blocks): room for the journal's rewrites and a directory
# block or two, so that a merge that fits is not refused on a small disk.
DISK_HEADROOM_BYTES = 1 << 20
# MergeOptions.compute_dtype: this engine's fp32 arithmetic, or mergekit's.
COMPUTE_DTYPES = ("fp32", "mergekit")


@dataclass(frozen=True)
class MergeOptions:
    domain_weight: float = 0.5
    align_weight: float = 0.5
    out_dtype: Optional[DType] = None  # None: each tensor keeps the base model's dtype
    # With out_dtype None, mergekit's rule instead: a tensor the models store in different
    # dtypes is written in float32, the dtype torch promotes such a mix to (`run` sets it).
    promote_mixed: bool = False
    # mergekit's `dtype`: every input rounded to this dtype before the merge, whose arithmetic
    # stays fp32 with one rounding at the store (None: the values as stored).
    input_dtype: Optional[DType] = None
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    tokenizer_from: str = "aligned"  # base | domain | aligned | none
    # Vocabularies merged by token (vocabularies.py): the output vocabulary's source, or None:
    # rows merged by index, the models must number their tokens alike.
    vocabulary: Optional[VocabularySpec] = None
    # mergekit's --unsafe-truncate-embeddings: vocabulary tensors (embeddings, output head and
    # its bias) whose models differ in rows only are cut to the fewest rows (each model's
    # first ones) instead of refused; the config keeps its vocab_size.  A vocabulary merged by
    # token takes precedence.
    truncate_vocabulary: bool = False
    # Models of different architectures (mergekit's --allow-crimes): tensors only some models
    # have are left out when the model OUT's config.json comes from has none of them (mergekit
    # merges the tensors of one model's architecture); refused otherwise.
    leave_out_unshared: bool = False
    force: bool = False
    threads: Optional[int] = None
    fsync: bool = True
    device: str = "cpu"  # cpu | cuda | cuda:N
    gpu_memory: int = DEFAULT_GPU_MEMORY  # device-memory budget when device is a GPU
    backend: str = "auto"  # kernel on the GPU path: auto | cuda | triton | torch
    resume: bool = False  # finish an interrupted merge into the same OUT
    # How a mergekit config's merged tensors are computed: "fp32" (this engine's arithmetic:
    # fp32 with one rounding at the store, exact statistics) or "mergekit" (mergekit's own
    # arithmetic in the config's dtype, in torch, tensor by tensor: its tensors bit for bit;
    # engine/writers/mergekit_arithmetic.py).
    compute_dtype: str = "fp32"
    # With compute_dtype "mergekit": the roles of the config's models in mergekit's order,
    # the listed ones then base_model when it is not listed (its sums run in it; empty: the
    # roles' order), and whether the config gives base_model (else the base role only
    # stands in for the first model).
    mergekit_order: Tuple[str, ...] = ()
    mergekit_has_base: bool = True
    method: Method = Method()  # methods.py; the weights above are its w_d and w_a

    def __post_init__(self):
        """Sizes may be given as text ("5GB", "2GiB") and the dtype by any of its names, as on
        the command line; a value that cannot be read is a ValueError naming the option."""
        for name in ("max_shard_size", "gpu_memory"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parse_size(value))
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a byte count or a size like '5GB' "
                                 f"(got {value!r})")
        for name in ("out_dtype", "input_dtype"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, dtypes.as_dtype(getattr(self, name)))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r}: choose one of "
                             f"{', '.join(COMPUTE_DTYPES)}")
        if isinstance(self.vocabulary, str):  # "union" or a role: VocabularySpec's source
            object.__setattr__(self, "vocabulary", VocabularySpec(self.vocabulary))

    @property
    def input_cast(self) -> int:
        """The native kernels' input_cast code (-1: none)."""
        return -1 if self.input_dtype is None else int(self.input_dtype)
