"""A checked merge: its output tensors (PlannedTensor), their shards (PlannedShard) and the
plan the engine runs (MergePlan)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .. import dtypes
from ..dtypes import DType
from ..io.checkpoint import Checkpoint, TensorLocation
from ..methods.core.settings import TensorSettings
from ..methods.core.spec import TRIO_MODELS
from .options import MergeOptions

if TYPE_CHECKING:  # numpy-backed: imported where a merge by token needs it (lean `merge`)
    from ..vocabulary.rows import TensorRows

F64 = "F64"


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    out_dtype: Optional[DType]  # None for a copied tensor
    sources: Tuple[TensorLocation, ...]  # base, then each model (the trio: domain, aligned)
    # A tensor the kernels cannot merge (integer, bool, F64 buffers) but whose bytes are the
    # same in the three models is copied through as it is: its safetensors dtype.
    copied_dtype: Optional[str] = None
    # F64 in the three models and not the same: merged in float64 (writers/f64.py).
    merged_in_f64: bool = False
    # A vocabulary tensor gathered by token (vocabularies.TensorRows), None: read as stored.
    rows: Optional[TensorRows] = field(default=None, compare=False)

    @property
    def is_copied(self) -> bool:
        return self.copied_dtype is not None

    @property
    def on_native_kernel(self) -> bool:
        """Merged chunk by chunk by a writer's kernel (neither copied nor merged in float64)."""
        return self.out_dtype is not None

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def out_safetensors_dtype(self) -> str:
        if self.merged_in_f64:
            return F64
        return self.copied_dtype or self.out_dtype.safetensors_name

    @property
    def out_itemsize(self) -> int:
        if not self.on_native_kernel:
            return dtypes.SAFETENSORS_ITEMSIZE[self.out_safetensors_dtype]
        return self.out_dtype.itemsize

    @property
    def out_nbytes(self) -> int:
        return self.count * self.out_itemsize

    def source_dtype(self, role_index: int) -> DType:
        """The dtype a source's windows reach the kernels in (an adapted one's: fp32)."""
        return DType[self.sources[role_index].streamed_dtype]


@dataclass(frozen=True)
class PlannedShard:
    filename: str
    header: bytes
    tensors: List[PlannedTensor]
    data_offsets: List[int]  # of each tensor, relative to the end of the header

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.out_nbytes for t in self.tensors)


@dataclass
class MergePlan:
    inputs: Dict[str, Checkpoint]
    out_dir: Path
    options: MergeOptions
    shards: List[PlannedShard]
    config: Optional[dict]  # config.json of the output, dtype already set
    # Copied into OUT as they are: tokenizer, generation and chat files, remote code.
    copied_files: List[Path] = field(default_factory=list)
    settings: Dict[str, TensorSettings] = field(default_factory=dict)  # method, per tensor
    # Made for OUT, not copied: the model card and recipe of a mergekit config (model_card.py).
    written_files: Dict[str, bytes] = field(default_factory=dict)
    # --resume found OUT already complete from this very merge: nothing to compute.
    complete: bool = False
    # The models besides the base, by role: the trio's domain and aligned, or a model set's
    # "model 1", "model 2", ... (plan_set).
    model_roles: Tuple[str, ...] = TRIO_MODELS
    # What the user is told before the merge runs (a vocabulary truncated).
    notes: List[str] = field(default_factory=list)

    @property
    def is_set(self) -> bool:
        """A base and a set of models (plan_set) rather than the trio."""
        return self.model_roles != TRIO_MODELS

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def tensor_bytes(self) -> int:
        """Output tensor data, headers excluded: what the progress bar counts."""
        return sum(t.out_nbytes for s in self.shards for t in s.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(loc.entry.nbytes for s in self.shards for t in s.tensors for loc in t.sources)

    def files_read(self) -> List[Path]:
        """Every input file the merge reads (a sliced merge may leave some out), and the side
        files it copies."""
        read = {f for s in self.shards for t in s.tensors for loc in t.sources
                for f in loc.files}
        return sorted(read) + list(self.copied_files)

    @property
    def tensor_count(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    @property
    def dominant_dtype(self) -> DType:
        weight = Counter()
        for shard in self.shards:
            for t in shard.tensors:
                if t.on_native_kernel:
                    weight[t.out_dtype] += t.out_nbytes
        return weight.most_common(1)[0][0] if weight else DType.BF16
