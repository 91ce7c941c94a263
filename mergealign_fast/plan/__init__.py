"""Everything checked before the first byte is computed, and the output layout.

`plan_merge` reads only headers.  It collects every problem it finds (names, shapes, dtypes,
output folder, disk space) and raises them together as one PlanError, one line per problem, so a
user fixes them all in one round instead of discovering them one per hour.  Here: the options'
checks, each tensor's settings and route, the layout in shards; beside it options.py (the
options), model.py (what a plan holds), inputs.py (the inputs' checks), output.py (OUT's
checks), side_files.py (the files besides the weights), slices.py (mergekit's slices), sweep.py.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .. import dtypes
from ..dtypes import DType
from ..errors import MergeError, PlanError
from ..io.adapters import base_mismatch
from ..io.checkpoint import (Checkpoint, TensorLocation, group_by_size, layer_index, same_bytes,
                             shard_file_name)
from ..io.safetensors_format import EncodedTensor, encode_header
from ..vocabulary import (OUTSIDE, REPLACED_BY_TOKENIZER, UNION, vocab_size_holder,
                          vocabulary_problems)
from ..kernels import resolve_backend
from .. import methods
from ..methods.core.spec import SET_ROLE, TRIO_MODELS, WINDOWS
from ..methods.core.parameters import check_weights
from ..methods.core.settings import TensorSettings, layer_position, resolve, settings_problems
from ..output import resolve_out_dir
from ..sources import model_folders
from .model import F64, MergePlan, PlannedShard, PlannedTensor  # noqa: F401
from .options import (DEFAULT_GPU_MEMORY, DEFAULT_MAX_SHARD_SIZE, DISK_HEADROOM_BYTES,  # noqa: F401
                      MAX_SET_MODELS, ROLES, MergeOptions)
from .inputs import check_inputs, checked_inputs, open_inputs  # noqa: F401
from .mergekit_arithmetic import mergekit_problems, with_mergekit_dtypes
from .output import output_problems, checked_output
from .side_files import output_config, side_files_for

if TYPE_CHECKING:  # numpy-backed: imported where a merge by token needs it (lean `merge`)
    from ..vocabulary.tokens import Vocabulary
    from ..vocabulary.rows import TensorRows


def _planned_tensors(models: Dict[str, Checkpoint], out_dtype: Optional[DType],
                     promote_mixed: bool = False):
    base = models["base"]
    # Base file order, then offset order: the merge reads the base front to back.
    names = sorted(base.tensors, key=lambda n: (str(base.tensors[n].file),
                                                base.tensors[n].entry.begin))
    for name in names:
        yield planned_tensor(name, tuple(m.tensors[name] for m in models.values()), out_dtype,
                             promote_mixed)


def planned_tensor(name: str, sources: Tuple[TensorLocation, ...], out_dtype: Optional[DType],
                   promote_mixed: bool = False) -> PlannedTensor:
    """The output tensor `name` made from `sources` (checked already: _tensor_problems)."""
    stored = sources[0].entry.dtype
    if dtypes.from_safetensors(stored) is None:
        # F64 in every model, or the same bytes.  Only F64 needs its bytes compared here
        # (identical: copied; else merged in float64).
        if stored != F64 or same_bytes(sources):
            return PlannedTensor(name, sources[0].entry.shape, None, sources,
                                 copied_dtype=stored)
        return PlannedTensor(name, sources[0].entry.shape, None, sources, merged_in_f64=True)
    dtype = DType[stored] if out_dtype is None else out_dtype
    if out_dtype is None and promote_mixed and len({s.entry.dtype for s in sources}) > 1:
        dtype = DType.F32  # any mix of bf16, fp16 and fp32 promotes to fp32 in torch
    return PlannedTensor(name, sources[0].entry.shape, dtype, sources)


def _gathered_by_token(tensor: PlannedTensor, rows: Optional[TensorRows]) -> PlannedTensor:
    """A vocabulary tensor re-indexed by token: the output vocabulary's rows, merged on the
    native kernel from its gathered rows (never copied as a model stores it)."""
    if rows is None:
        return tensor
    out_dtype = rows.dtype if tensor.out_dtype is None else tensor.out_dtype
    return replace(tensor, shape=rows.shape, out_dtype=out_dtype, copied_dtype=None, rows=rows)


def layout_shards(tensors: List[PlannedTensor], max_shard_size: int) -> List[PlannedShard]:
    groups = group_by_size(tensors, lambda t: t.out_nbytes, max_shard_size)
    shards = []
    for i, group in enumerate(groups):
        encoded = [EncodedTensor(t.name, t.out_safetensors_dtype, t.shape, t.out_nbytes)
                   for t in group]
        header, offsets = encode_header(encoded, {"format": "pt"})
        shards.append(PlannedShard(shard_file_name(i, len(groups)), header, group, offsets))
    return shards


def _device_problems(options: MergeOptions) -> List[str]:
    """The GPU path's backend must be able to run before anything is read."""
    kind = options.device.split(":")[0]
    if kind != "cpu" and options.compute_dtype == "mergekit":
        return [f"--compute-dtype mergekit runs on the CPU: leave out --device {options.device}"]
    if kind == "cpu":
        if options.backend not in ("auto", "cpu"):
            return [f"backend {options.backend!r} needs --device cuda; merges on the CPU use the "
                    "native cpu kernel"]
        return []
    if kind != "cuda":
        return [f"device {options.device!r}: choose cpu or cuda (cuda:N for another GPU)"]
    try:
        resolve_backend(options.backend, "cuda")
    except MergeError as exc:
        return [str(exc)]
    return []


def _method_problems(options: MergeOptions) -> List[str]:
    """The method's parameters, and on a GPU a backend that runs methods: the CUDA kernel
    (whether it can run here is _device_problems' question)."""
    method = options.method
    problems = method.problems()
    on_gpu = options.device.split(":")[0] == "cuda"
    if on_gpu and not method.is_plain_task_arithmetic and options.backend in ("triton", "torch"):
        problems.append(f"method {method.name} on {options.device} needs --backend cuda (or "
                        f"auto): {options.backend} runs task_arithmetic only")
    return problems


def tensor_settings(options: MergeOptions, names: List[str],
                    roles: Tuple[str, ...] = TRIO_MODELS) -> Dict[str, TensorSettings]:
    """The method's parameters for each tensor (mergekit layer gradients run over the layers
    found in the names).  A model set's weights come from the method's rules only."""
    layers = [i for i in map(layer_index, names) if i is not None]
    num_layers = max(layers) + 1 if layers else 0
    weights = (options.domain_weight, options.align_weight) if roles == TRIO_MODELS \
        else (math.nan,) * len(roles)
    return {name: resolve(options.method, name, layer_position(name, num_layers), weights, roles)
            for name in names}


def _option_problems(options: MergeOptions, roles: Tuple[str, ...]) -> List[str]:
    problems = _method_problems(options)
    is_set = roles[1:] != TRIO_MODELS
    if not methods.is_method(options.method.name):
        return problems  # (said by Method.problems)
    weighted = "weight" in options.method.spec.parameters
    if weighted and not options.method.rules and not is_set:  # else checked per tensor
        try:
            check_weights(options.domain_weight, options.align_weight)
        except ValueError as exc:
            problems.append(str(exc))
    if is_set:
        problems += _set_problems(options, len(roles) - 1)
    if options.max_shard_size <= 0:
        problems.append(f"max shard size must be positive (got {options.max_shard_size})")
    threads = options.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        problems.append(f"threads must be a whole number of at least 1 (got {threads!r})")
    problems += _device_problems(options)
    if options.tokenizer_from not in (*roles, "none"):
        problems.append(f"tokenizer source {options.tokenizer_from!r}: choose "
                        f"{', '.join(roles)} or none")
    if options.vocabulary is not None:
        problems += _vocabulary_problems(options, roles)
    if options.method.vectors != "tensor" or options.method.spec.route == WINDOWS:
        problems += _numpy_window_problems(options, is_set)
    return problems


def _numpy_window_problems(options: MergeOptions, is_set: bool) -> List[str]:
    """What a merge vector by vector or window by window in numpy (engine/routes.py) cannot
    be given."""
    name, vectors = options.method.name, options.method.vectors
    what = name if vectors == "tensor" else f"{name} by {vectors}"
    problems = []
    if is_set and vectors != "tensor":
        problems.append(f"{what} merges two models besides the base (the trio)")
    if options.device.split(":")[0] != "cpu":
        problems.append(f"{what} runs on the CPU path: leave out --device {options.device}")
    return problems


def _vocabulary_problems(options: MergeOptions, roles: Tuple[str, ...]) -> List[str]:
    """What a merge by token cannot be given: a source that is none of its models, a GPU."""
    spec = options.vocabulary
    problems = []
    if spec.source == OUTSIDE and spec.source_folder is None:
        problems.append("vocabulary source outside the merge: name its folder")
    elif spec.source not in (UNION, OUTSIDE) and spec.source not in roles:
        problems.append(f"vocabulary source {spec.source!r}: choose {UNION} or one of "
                        f"{', '.join(roles)}")
    problems += [f"tokenizer.tokens.{token}: {source.role!r} is none of the merged models"
                 for token, source in spec.tokens if source.kind in ("model", "model_token")
                 and source.role not in roles]
    if spec.pad_to_multiple_of is not None and (isinstance(spec.pad_to_multiple_of, bool) or
                                                not isinstance(spec.pad_to_multiple_of, int)
                                                or spec.pad_to_multiple_of < 1):
        problems.append(f"pad_to_multiple_of must be a whole number of at least 1 (got "
                        f"{spec.pad_to_multiple_of!r})")
    if options.device.split(":")[0] != "cpu":
        problems.append(f"vocabularies merged by token are gathered on the CPU path: leave out "
                        f"--device {options.device}")
    return problems


def _set_problems(options: MergeOptions, model_count: int) -> List[str]:
    """What a merge of a base and a set of models cannot do."""
    name, contract = options.method.name, options.method.spec.contract
    problems = []
    if not contract.on_sets:
        problems.append(f"{name} merges two models (the trio); of {model_count} models: "
                        f"{', '.join(methods.set_names())}")
    fewest = contract.fewest
    if model_count < fewest:
        problems.append(f"{name} needs at least {fewest} model(s) besides the base "
                        f"(got {model_count})")
    if model_count > MAX_SET_MODELS:
        problems.append(f"{model_count} models besides the base: at most {MAX_SET_MODELS} "
                        "in one merge")
    if options.device.split(":")[0] != "cpu":
        problems.append(f"merges of {model_count} models run on the CPU: leave out "
                        f"--device {options.device}")
    return problems


def opened_inputs(folders: Dict[str, Path], given, out_dir: Path,
                  options: MergeOptions) -> Dict[str, Checkpoint]:
    """The checkpoints of a merge whose tensors are not matched by name (slices.py), after the
    options, OUT and the vocabularies are checked; PlanError lists every problem."""
    problems = _option_problems(options, tuple(folders)) + output_problems(given, out_dir,
                                                                            folders, options)
    models, open_problems = open_inputs(folders)
    if len(models) == len(folders):
        open_problems += vocabulary_problems(folders)
    if problems or open_problems:
        raise PlanError(problems + open_problems)
    return models


def plan_merge(base, domain, aligned, out_dir, options: MergeOptions = MergeOptions()) -> MergePlan:
    """Check everything and lay out the output; PlanError lists every problem found."""
    return _plan({"base": base, "domain": domain, "aligned": aligned}, out_dir, options)


def plan_set(base, models: Sequence, out_dir, options: MergeOptions) -> MergePlan:
    """plan_merge for a base and any number of models (roles "model 1", "model 2", ...): the
    method (one defined for model sets) takes each model's weight and density from its rules."""
    specs = {"base": base}
    specs.update((SET_ROLE.format(i + 1), m) for i, m in enumerate(models))
    return _plan(specs, out_dir, options)


def _plan(specs: Dict[str, object], out_dir, options: MergeOptions) -> MergePlan:
    """The plan of the models `specs` names by role (folders or Hub repo ids)."""
    roles = tuple(specs)
    given, out_dir = out_dir, resolve_out_dir(out_dir)
    folders, problems = model_folders(specs)
    problems += _option_problems(options, roles) + output_problems(given, out_dir, folders,
                                                                    options)
    if len(folders) < len(specs):  # the models that resolved: their own problems too
        raise PlanError(problems + open_inputs(folders)[1])
    if problems and options.vocabulary is not None:
        raise PlanError(problems)  # before reading tokenizers for a merge that cannot run
    models, input_problems, vocabulary, gathered, notes = checked_inputs(folders, options)
    if problems or input_problems:
        raise PlanError(problems + input_problems)
    tensors = [_gathered_by_token(t, gathered.get(t.name))
               for t in _planned_tensors(models, options.out_dtype, options.promote_mixed)]
    settings = tensor_settings(options, [t.name for t in tensors if not t.is_copied], roles[1:])
    plan = laid_out(folders, models, tensors, settings, given, out_dir, options, vocabulary)
    plan.notes += notes
    return plan


def _adapted_held_in(tensor: PlannedTensor) -> PlannedTensor:
    """The dtype each LoRA-adapted source of `tensor` is held in while merged: its stored
    dtype, as the adapted model would be saved (what a merge of the saved model reads), or
    fp32 when the output is fp32 (no rounding before the one at the store)."""
    if not any(loc.delta is not None for loc in tensor.sources):
        return tensor
    held = [loc if loc.delta is None else replace(loc, delta=replace(
        loc.delta, held="F32" if tensor.out_dtype == DType.F32 else loc.entry.dtype))
        for loc in tensor.sources]
    return replace(tensor, sources=tuple(held))


def laid_out(folders: Dict[str, Path], models: Dict[str, Checkpoint],
             tensors: List[PlannedTensor], settings: Dict[str, TensorSettings], given,
             out_dir: Path, options: MergeOptions,
             vocabulary: Optional[Vocabulary] = None) -> MergePlan:
    """The plan of checked inputs whose output tensors and their settings are known: the
    settings' own problems, then the layout, side files, config and output checks (with a
    vocabulary merged by token, its tokenizer and vocab_size)."""
    roles = tuple(folders)
    tensors = with_mergekit_dtypes([_adapted_held_in(t) for t in tensors], settings, options)
    if options.method.rules:  # rules can make any one tensor's values wrong
        problems = [p for name, s in settings.items()
                    for p in settings_problems(s, f"tensor {name}")]
    else:  # one set of values for every tensor: say it once
        problems = settings_problems(next(iter(settings.values())), options.method.name) \
            if settings else []
    problems += [f"tensor {t.name} is F64 in every model: it is merged in float64 by "
                 f"{', '.join(s.name for s in methods.specs() if s.f64)} only, not "
                 f"{settings[t.name].name}"
                 for t in tensors if t.merged_in_f64 and settings[t.name].spec.f64 is None]
    problems += _cast_problems(tensors, options) + mergekit_problems(settings, options)
    if problems:
        raise PlanError(problems)
    shards = layout_shards(tensors, options.max_shard_size)
    config_path, copied, side_problems = side_files_for(folders, options.tokenizer_from)
    if side_problems:
        raise PlanError(side_problems)
    plan = MergePlan(models, out_dir, options, shards, None, copied, settings,
                     model_roles=roles[1:])
    plan.notes += [note for note in map(base_mismatch, folders.values()) if note]
    plan.config = output_config(config_path, plan.dominant_dtype)
    if vocabulary is not None:
        _with_vocabulary(plan, vocabulary)
    return checked_output(plan, given)


def _with_vocabulary(plan: MergePlan, vocabulary: Vocabulary) -> None:
    """OUT's tokenizer is the merged vocabulary's (re-saved when it is not its source's files)
    and its config's vocab_size the rows of its matrices."""
    if vocabulary.rebuilt or plan.options.tokenizer_from == "none":
        plan.copied_files = [f for f in plan.copied_files if f.name not in REPLACED_BY_TOKENIZER]
        plan.written_files.update(vocabulary.tokenizer_files)
    if plan.config is not None:
        vocab_size_holder(plan.config)["vocab_size"] = vocabulary.size


def _cast_problems(tensors: List[PlannedTensor], options: MergeOptions) -> List[str]:
    """Inputs cast to `dtype` first are merged on the CPU: the GPU path reads them as stored."""
    cast = options.input_dtype
    if cast is None or options.device.split(":")[0] == "cpu" or cast is DType.F32:
        return []
    changed = {loc.entry.dtype for t in tensors if t.on_native_kernel for loc in t.sources
               if loc.entry.dtype != cast.safetensors_name}
    if not changed:
        return []
    return [f"dtype {cast.torch_name} rounds the {', '.join(sorted(changed))} inputs before the "
            f"merge, which only the CPU path does: leave out --device {options.device} (or give "
            "dtype: float32)"]
