"""The inputs' checks: tensor names, shapes and dtypes across the models, vocabulary tensors, and
the model folders opened (headers only)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .. import dtypes
from ..errors import PlanError, each_role
from ..io.adapters import open_model, tokenizer_folder
from ..io.checkpoint import Checkpoint, TensorLocation, same_bytes
from ..sources import model_folders
from ..vocabulary import VOCABULARY_TENSOR, vocabulary_problems
from .model import F64
from .options import MergeOptions

if TYPE_CHECKING:  # numpy-backed: imported where a merge by token needs it (lean `merge`)
    from ..vocabulary.tokens import Vocabulary


def _name_problems(models: Dict[str, Checkpoint]) -> List[str]:
    base = models["base"]
    problems = []
    for role in list(models)[1:]:
        other = models[role]
        for name in sorted(set(base.tensors) - set(other.tensors)):
            problems.append(f"tensor {name}: in base ({base.folder}) but missing from {role} "
                            f"({other.folder})")
        for name in sorted(set(other.tensors) - set(base.tensors)):
            problems.append(f"tensor {name}: in {role} ({other.folder}) but not in base "
                            f"({base.folder})")
    return problems


def _describe_shape_difference(name: str, role: str, base_shape, other_shape) -> str:
    line = f"tensor {name}: shape differs: base {list(base_shape)} vs {role} {list(other_shape)}"
    same_rank = len(base_shape) == len(other_shape) and len(base_shape) >= 1
    if same_rank and tuple(base_shape[1:]) == tuple(other_shape[1:]):
        extra = other_shape[0] - base_shape[0]
        who, rows = (role, extra) if extra > 0 else ("base", -extra)
        line += f" ({who} has {rows} extra rows"
        line += (": added vocabulary? merge by token: merge --vocab, a config's "
                 "tokenizer_source)") if VOCABULARY_TENSOR.search(name) else ")"
    return line


def _tensor_problems(models: Dict[str, Checkpoint], gathered=()) -> List[str]:
    """Problems of the tensors every model has, but those `gathered` by token (whose own
    problems vocabulary_tensors found)."""
    problems = []
    base = models["base"]
    others = list(models)[1:]
    common = [n for n in base.tensors if all(n in models[r].tensors for r in others)
              and n not in gathered]
    for name in common:
        problems += tensor_group_problems(name, {r: models[r].tensors[name] for r in models})
    return problems


def tensor_group_problems(name: str, locations: Dict[str, TensorLocation]) -> List[str]:
    """What keeps the tensors of one output (by role, base first) from being merged: dtypes
    the kernels cannot merge, shapes that differ from the base's."""
    problems = _unmergeable_dtype_problems(name, locations)
    base_shape = locations["base"].entry.shape
    for role, location in list(locations.items())[1:]:
        if location.entry.shape != base_shape:
            problems.append(_describe_shape_difference(name, role, base_shape,
                                                       location.entry.shape))
    return problems


def _is_copied(locations) -> bool:
    """A tensor the kernels cannot merge that is the same bytes in every model: copied."""
    entries = [loc.entry for loc in locations]
    return (dtypes.from_safetensors(entries[0].dtype) is None
            and all((e.dtype, e.shape) == (entries[0].dtype, entries[0].shape) for e in entries)
            and same_bytes(locations))


def _all_f64(locations) -> bool:
    """F64 of one shape in every model: merged in float64 (or copied when identical)."""
    entries = [loc.entry for loc in locations]
    return all((e.dtype, e.shape) == (F64, entries[0].shape) for e in entries)


def _unmergeable_dtype_problems(name: str, locations: Dict[str, TensorLocation]) -> List[str]:
    unmergeable = {r: loc for r, loc in locations.items()
                   if dtypes.from_safetensors(loc.entry.dtype) is None}
    found = list(locations.values())
    if not unmergeable or _all_f64(found) or _is_copied(found):
        return []
    return [f"tensor {name} in {loc.file}: dtype {loc.entry.dtype} cannot be merged "
            "(supported: BF16, F16, F32, and F64 in every model; other dtypes are copied "
            "when the models hold the same bytes, and these differ)"
            for loc in unmergeable.values()]


def checked_inputs(folders: Dict[str, Path], options: Optional[MergeOptions] = None):
    """(the checkpoints, every problem with them together (names, shapes, dtypes), the output
    vocabulary when merged by token (else None), the tensors gathered by token, notes for the
    user: vocabulary tensors truncated, tensors left out)."""
    models, problems = open_inputs(folders)
    vocabulary, gathered, notes = None, {}, []
    tokenizers = {role: tokenizer_folder(folder) for role, folder in folders.items()}
    if len(models) == len(folders):
        if options is not None and options.vocabulary is not None:
            from ..vocabulary.rows import vocabulary_tensors

            vocabulary = _vocabulary(tokenizers, options)
            gathered, found = vocabulary_tensors(vocabulary, models, options.input_dtype)
            problems += found + _adapted_by_token(models, gathered)
        elif options is not None and options.truncate_vocabulary:
            cut = _truncate_vocabulary_tensors(models)
            notes += [f"UNSAFE vocabulary truncation (--unsafe-truncate-embeddings): "
                      f"{', '.join(cut)}; rows past them are dropped, so the models must "
                      "number their tokens alike"] if cut else []
        else:
            problems += vocabulary_problems(tokenizers)
        found = []  # (the tensors only some models have, said once, not per model)
        if options is not None and options.leave_out_unshared:
            found, left_out = _leave_out_unshared(models, options.tokenizer_from)
            notes += [f"models of different architectures (--allow-crimes): {len(left_out)} "
                      f"tensors only some have are left out, as mergekit leaves them out "
                      f"({', '.join(left_out[:3])}{', ...' * (len(left_out) > 3)})"] \
                if left_out else []
        problems += (found or _name_problems(models)) + _tensor_problems(models, gathered)
    return models, problems, vocabulary, gathered, notes


def _leave_out_unshared(models: Dict[str, Checkpoint],
                        config_from: str) -> Tuple[List[str], List[str]]:
    """Models of different architectures: the tensors only some have are taken out of every
    model (mergekit, with --allow-crimes, merges the tensors of one model's architecture: a
    Llama beside a Qwen2 leaves out the Qwen2's attention biases).  Only when the model OUT's
    config.json comes from has none of them: else OUT would describe tensors it lacks.
    Returns (problems, the names left out)."""
    shared = set.intersection(*(set(m.tensors) for m in models.values()))
    unshared = sorted(set().union(*(m.tensors for m in models.values())) - shared)
    if not unshared:
        return [], []
    source = config_from if config_from in models else "base"
    described = [n for n in unshared if n in models[source].tensors]
    if described:
        lacking = next(r for r, m in models.items() if described[0] not in m.tensors)
        return [f"tensor {described[0]}: {source} ({models[source].folder}) has it and "
                f"{lacking} ({models[lacking].folder}) does not ({len(described)} such "
                f"tensors): OUT's config.json comes from {source}, so they cannot be left out; "
                f"take base_model (and tokenizer_source) from a model that lacks them"], []
    for model in models.values():
        for name in unshared:
            model.tensors.pop(name, None)
    return [], unshared


def _adapted_by_token(models: Dict[str, Checkpoint], gathered) -> List[str]:
    """A vocabulary tensor a LoRA adapter changes cannot be gathered by token (its rows are
    computed, not stored)."""
    return [f"tensor {name}: {role} ({models[role].folder}) changes it by LoRA: a merge by "
            "token (--vocab, tokenizer_source) takes stored rows; save the embedding whole "
            "(modules_to_save) or merge by index"
            for name in gathered for role in models
            if getattr(models[role].tensors.get(name), "delta", None) is not None]


def _truncate_vocabulary_tensors(models: Dict[str, Checkpoint]) -> List[str]:
    """Cut each vocabulary tensor whose models differ in rows only to the fewest rows (a row
    is contiguous, so the first rows are a prefix of the stored bytes); returns their names."""
    base = models["base"]
    cut = []
    for name in base.tensors:
        locations = [m.tensors.get(name) for m in models.values()]
        if not VOCABULARY_TENSOR.search(name) or None in locations:
            continue
        shapes = {loc.entry.shape for loc in locations}
        if len(shapes) == 1 or any(not s or s[1:] != locations[0].entry.shape[1:]
                                   for s in shapes):
            continue
        rows = min(s[0] for s in shapes)
        for model in models.values():
            loc = model.tensors[name]
            row_bytes = loc.entry.nbytes // loc.entry.shape[0]
            model.tensors[name] = TensorLocation(loc.file, replace(
                loc.entry, shape=(rows, *loc.entry.shape[1:]),
                end=loc.entry.begin + rows * row_bytes))
        cut.append(f"{name} to {rows} rows")
    return cut


def _vocabulary(folders: Dict[str, Path], options: MergeOptions) -> Vocabulary:
    """The output vocabulary of a merge by token; its chat template, when the union has none,
    from the model whose tokenizer OUT would otherwise get."""
    from ..vocabulary.tokens import build_vocabulary

    return build_vocabulary(folders, options.vocabulary, template_from=options.tokenizer_from)


def check_inputs(base, domain, aligned) -> Dict[str, Checkpoint]:
    """Open and cross-check a base/domain/aligned trio (folders or Hub repo ids); PlanError
    lists every problem."""
    folders, problems = model_folders({"base": base, "domain": domain, "aligned": aligned})
    if problems:
        raise PlanError(problems)
    models, problems, *_ = checked_inputs(folders)
    if problems:
        raise PlanError(problems)
    return models


def open_inputs(folders: Dict[str, Path]) -> Tuple[Dict[str, Checkpoint], List[str]]:
    return each_role(open_model, folders)
