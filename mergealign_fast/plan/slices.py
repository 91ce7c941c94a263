"""mergekit's `slices`: a model stacked from layer ranges of other models (a "frankenmerge",
`merge_method: passthrough`), or merged slice by slice, planned for the same engine as every
merge.

Each output layer is a layer of one source model, its tensors renamed to the new index and
copied as they are (or converted by the kernel, when `dtype` asks for another dtype).  As in
mergekit, the tensors outside the layers come from the first slice's model (the embedding) and
the last slice's (final norm and output head); config.json, the tokenizer and the rest follow
base_model, else the first slice's model, with the layer count set to the stack's.  The result
keeps every guarantee of a merge: checks first, partial folder, journal, manifest, publish.

Merged slice by slice (any other method), output layer k of a slice is the merge of layer
start + k of each source, with the slice's parameters (its sources' own, then the slice's, then
the top level's) and mergekit's gradient position k / (length - 1) within the slice; the tensors
outside the layers are merged from the same models with the first slice's parameters (embedding)
or the last one's (final norm, head), at position 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import dtypes
from ..dtypes import DType
from ..errors import MergeError, PlanError
from ..io.adapters import open_model
from ..io.checkpoint import Checkpoint, TensorLocation
from ..methods.core.parameters import Method
from ..output import resolve_out_dir
from ..methods.core.spec import TRIO_MODELS
from ..methods.core.settings import resolve
from . import (MergeOptions, MergePlan, PlannedTensor, laid_out, layout_shards, opened_inputs,
               planned_tensor, tensor_settings)
from .inputs import tensor_group_problems
from .output import checked_output
from .side_files import output_config, side_files_of

# The layer a tensor belongs to, as transformers names them: "model.layers.3.", GPT-2's
# "transformer.h.3.", "blocks.3.".
LAYER = re.compile(r"(?<![^.])(layers|h|blocks)\.(\d+)\.")
# Keys of config.json that hold the number of layers (Llama and most; GPT-2; a few others).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Tensors outside the layers that belong before them (the rest belong after: norm, head).
EMBEDDING = re.compile(r"embed|\bwte\b|\bwpe\b")
# What the manifest records as the method (nothing is computed but dtype conversions).
PASSTHROUGH = Method("passthrough")


@dataclass(frozen=True)
class SliceSource:
    """Layers [start, end) of one model folder, as a config's slice names them."""
    name: str      # as the config writes it
    folder: Path
    start: int
    end: int


@dataclass(frozen=True)
class MergedSlice:
    """One slice of a merge by slices: each role's layers [start, end) (base first), and the
    method with the slice's own parameters."""
    ranges: Tuple[Tuple[str, int, int], ...]
    method: Method

    @property
    def length(self) -> int:
        return self.ranges[0][2] - self.ranges[0][1]


def _layers(checkpoint: Checkpoint) -> Dict[int, List[str]]:
    layers: Dict[int, List[str]] = {}
    for name in checkpoint.tensors:
        match = LAYER.search(name)
        if match:
            layers.setdefault(int(match.group(2)), []).append(name)
    return layers


def _renamed(name: str, index: int) -> str:
    match = LAYER.search(name)
    return f"{name[:match.start(2)]}{index}{name[match.end(2):]}"


def _copied(name: str, location: TensorLocation, out_dtype: Optional[DType]) -> PlannedTensor:
    """A tensor copied as it is, or converted by the kernel (an identity merge) to out_dtype."""
    stored = location.entry.dtype
    sources = (location, location, location)
    if out_dtype is None or stored == out_dtype.safetensors_name \
            or dtypes.from_safetensors(stored) is None:
        return PlannedTensor(name, location.entry.shape, None, sources, copied_dtype=stored)
    return PlannedTensor(name, location.entry.shape, out_dtype, sources)


def planned_stack(slices: List[SliceSource], models: Dict[Path, Checkpoint],
                  out_dtype: Optional[DType]) -> Tuple[List[PlannedTensor], int, List[str]]:
    """(the output's tensors, its layer count, problems)."""
    problems, layer_tensors = [], []
    out_index = 0
    for source in slices:
        layers = _layers(models[source.folder])
        count = max(layers) + 1 if layers else 0
        if not 0 <= source.start < source.end <= count:
            problems.append(f"slice of {source.name}: layer_range [{source.start}, {source.end}] "
                            f"is not within its {count} layers")
            continue
        for index in range(source.start, source.end):
            for name in layers.get(index, []):
                location = models[source.folder].tensors[name]
                layer_tensors.append(_copied(_renamed(name, out_index), location, out_dtype))
            out_index += 1
    first, last = models[slices[0].folder], models[slices[-1].folder]
    # the embedding from the first slice's model, the rest (final norm, head) from the last's
    ends = [_copied(n, first.tensors[n], out_dtype) for n in first.tensors
            if not LAYER.search(n) and EMBEDDING.search(n)]
    ends += [_copied(n, last.tensors[n], out_dtype) for n in last.tensors
             if not LAYER.search(n) and not EMBEDDING.search(n)]
    return ends + layer_tensors, out_index, problems


def plan_passthrough(slices: List[SliceSource], donor: Path, out_dir,
                     options: MergeOptions) -> MergePlan:
    """The checked plan of a passthrough stack into out_dir; PlanError lists every problem.
    `donor` gives config.json and (options.tokenizer_from != "none") the tokenizer files."""
    models: Dict[Path, Checkpoint] = {}
    problems = []
    for source in slices:
        if source.folder not in models:
            try:
                models[source.folder] = open_model(source.folder)
            except MergeError as exc:
                problems.append(f"slice of {source.name}: {exc}")
    if problems:
        raise PlanError(problems)
    tensors, layer_count, problems = planned_stack(slices, models, options.out_dtype)
    if problems:
        raise PlanError(problems)
    converted = [t.name for t in tensors if t.on_native_kernel]
    identity = replace(options, domain_weight=0.0, align_weight=0.0)  # out = the source itself
    inputs = {f"slice source {i}: {s.name}": models[s.folder] for i, s in
              enumerate(dict((s.folder, s) for s in slices).values())}
    config_path, copied, problems = side_files_of(
        donor if options.tokenizer_from != "none" else None, donor)
    if problems:
        raise PlanError(problems)
    plan = MergePlan(inputs, resolve_out_dir(out_dir), replace(options, method=PASSTHROUGH),
                     layout_shards(tensors, options.max_shard_size), None, copied,
                     tensor_settings(identity, converted))
    plan.config = _with_layer_count(output_config(config_path, plan.dominant_dtype), layer_count)
    return checked_output(plan, out_dir, {name: m.folder for name, m in inputs.items()})


def plan_sliced_merge(folders: Dict[str, Path], slices: Sequence[MergedSlice], out_dir,
                      options: MergeOptions) -> MergePlan:
    """The checked plan of a merge by slices (see the module's docstring); `folders` by role
    (base first), each slice's ranges by the same roles.  PlanError lists every problem."""
    given, out = out_dir, resolve_out_dir(out_dir)
    models = opened_inputs(folders, given, out, options)
    planner = _SlicePlanner(folders, models, options)
    for name in planner.outside(before=True):
        planner.add(name, {r: name for r in folders}, slices[0].method, 0.0)
    for piece in slices:
        planner.add_slice(piece)
    for name in planner.outside(before=False):
        planner.add(name, {r: name for r in folders}, slices[-1].method, 0.0)
    if planner.problems:
        raise PlanError(planner.problems)
    plan = laid_out(folders, models, planner.tensors, planner.settings, given, out, options)
    plan.config = _with_layer_count(plan.config, planner.layer_count)
    return plan


class _SlicePlanner:
    """The output tensors of a merge by slices and their settings, with every problem found."""

    def __init__(self, folders: Dict[str, Path], models: Dict[str, Checkpoint],
                 options: MergeOptions):
        self.folders, self.models, self.options = folders, models, options
        self.roles = tuple(folders)
        self.layers = {role: _layers(models[role]) for role in self.roles}
        trio = self.roles[1:] == TRIO_MODELS
        self.default_weights = (options.domain_weight, options.align_weight) if trio \
            else (float("nan"),) * (len(self.roles) - 1)
        self.tensors: List[PlannedTensor] = []
        self.settings = {}
        self.problems: List[str] = []
        self.layer_count = 0

    def outside(self, before: bool) -> List[str]:
        """The base's tensors outside the layers: before them (embedding) or after."""
        return [n for n in self.models["base"].tensors
                if not LAYER.search(n) and bool(EMBEDDING.search(n)) == before]

    def add_slice(self, piece: MergedSlice) -> None:
        ranges = {role: (start, end) for role, start, end in piece.ranges}
        for role, (start, end) in ranges.items():
            count = max(self.layers[role]) + 1 if self.layers[role] else 0
            if end > count:
                self.problems.append(f"slice of {self.folders[role]}: layer_range "
                                     f"[{start}, {end}] is not within its {count} layers")
                return
        for k in range(piece.length):
            position = k / (piece.length - 1) if piece.length > 1 else 1.0  # mergekit's t
            for name in self.layers["base"].get(ranges["base"][0] + k, []):
                self.add(_renamed(name, self.layer_count),
                         {r: _renamed(name, ranges[r][0] + k) for r in self.roles},
                         piece.method, position)
            self.layer_count += 1

    def add(self, out_name: str, names: Dict[str, str], method: Method,
            position: float) -> None:
        missing = [f"tensor {names[r]}: missing from {r} ({self.folders[r]})"
                   for r in self.roles if names[r] not in self.models[r].tensors]
        if missing:
            self.problems += missing
            return
        locations = {r: self.models[r].tensors[names[r]] for r in self.roles}
        found = tensor_group_problems(out_name, locations)
        if found:
            self.problems += found
            return
        tensor = planned_tensor(out_name, tuple(locations.values()), self.options.out_dtype,
                                self.options.promote_mixed)
        self.tensors.append(tensor)
        if not tensor.is_copied:
            self.settings[out_name] = resolve(method, out_name, position,
                                              self.default_weights, self.roles[1:])


def _with_layer_count(config: Optional[dict], layer_count: int) -> Optional[dict]:
    if config is not None:
        keys = [k for k in LAYER_COUNT_KEYS if k in config] or [LAYER_COUNT_KEYS[0]]
        for key in keys:
            config[key] = layer_count
    return config
