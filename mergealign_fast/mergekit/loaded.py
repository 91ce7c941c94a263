"""A mergekit config as read: `RunConfig`, the engine's inputs (mergekit/config.py reads it,
mergekit/run.py plans it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..dtypes import DType
from ..methods.core.parameters import Method
from ..methods.core.spec import SET_ROLE
from ..plan.slices import MergedSlice, SliceSource
from ..vocabulary import VocabularySpec


@dataclass
class RunConfig:
    """A mergekit config turned into the engine's inputs."""

    base: Path
    domain: Path
    aligned: Path
    method: Method
    out_dtype: Optional[DType]
    tokenizer_from: str  # base | domain | aligned | none
    # Problems the reader could read past (a misspelled key taken as the key it is close to):
    # reported together with the plan's own, so one run lists everything.
    problems: Tuple[str, ...] = ()
    # What mergekit would silently ignore (a parameter the method does not take), said once.
    warnings: Tuple[str, ...] = ()
    # The models as the config names them (for the model card): base_model ("" if none), and
    # every entry of `models` in order.
    base_name: str = ""
    model_names: Tuple[str, ...] = ()
    # `chat_template` as given: a name, "auto" or a Jinja template (chat_template.py).
    chat_template: Optional[str] = None
    # `slices` of a passthrough stack (slices.py); the three roles are then its donor model.
    slices: Tuple[SliceSource, ...] = ()
    # More than two models besides the base: the model set merged into `base` (plan_set),
    # in the order listed; domain and aligned are then its first two.
    models: Tuple[Path, ...] = ()
    # `slices` merged slice by slice (slices.plan_sliced_merge): each slice's layer ranges by
    # role and its method (the rules of its own parameters); `method` holds all of them.
    merged_slices: Tuple[MergedSlice, ...] = ()
    # `dtype`: what mergekit casts every input to before merging (MergeOptions.input_dtype).
    input_dtype: Optional[DType] = None
    # `tokenizer_source` / `tokenizer`: the vocabularies merged by token (vocabularies.py).
    vocabulary: Optional[VocabularySpec] = None
    # The models name different architectures (merged under --allow-crimes): tensors only
    # some of them have are left out, as mergekit leaves out what its architecture lacks.
    mixed_architectures: bool = False
    # For --compute-dtype mergekit: `out_dtype` as stated (None: each method's result dtype,
    # as mergekit writes), the roles of the models in mergekit's order, whether base_model
    # is given.
    stated_out_dtype: Optional[DType] = None
    mergekit_order: Tuple[str, ...] = ()
    mergekit_has_base: bool = True

    @property
    def folders(self) -> Dict[str, Path]:
        """The merge's folders by role: the trio's, or a model set's."""
        if self.models:
            return {"base": self.base, **{SET_ROLE.format(i + 1): f
                                          for i, f in enumerate(self.models)}}
        return {"base": self.base, "domain": self.domain, "aligned": self.aligned}

    @property
    def merged_folders(self) -> List[Path]:
        """Every model folder the merge reads."""
        if self.slices:
            return [s.folder for s in self.slices]
        return [self.base, *self.models] if self.models else [self.base, self.domain,
                                                               self.aligned]
