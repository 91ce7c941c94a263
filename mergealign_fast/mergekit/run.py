"""A mergekit config planned for the engine, as mergekit's `run_merge` runs one: the config
read and checked (config.py), the plan its form asks for (a passthrough stack, a merge by
slices, a model set or the trio), its chat template and, unless asked not to, the model card
and recipe that mergekit writes into OUT.  Nothing is computed here: api.run_config and the
command line run the plan."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import PlanError
from ..plan import MergeOptions, MergePlan, plan_merge, plan_set
from .config import RunConfig, load
from .model_card import card_files


# tell(kind, text): what the user is told before the merge runs; kind "warning" (what mergekit
# would silently ignore, a truncated vocabulary) or "note".
Teller = Callable[[str, str], None]


def _python_warning(kind: str, text: str) -> None:
    warnings.warn(text, stacklevel=3)


def plan_config(path, out, options: Optional[MergeOptions] = None, *,
                seed: Optional[int] = None, allow_crimes: bool = True,
                copy_tokenizer: bool = True, write_model_card: bool = True,
                tell: Teller = _python_warning) -> MergePlan:
    """The checked plan of the mergekit YAML file at `path` into `out`; PlanError lists every
    problem of the config and the merge it describes.  `options` holds the merge's own
    settings (shard size, threads, fsync, device, force, resume, ...; the config decides the
    method, weights, dtypes and tokenizer); `seed` and `allow_crimes` are mergekit-yaml's
    --random-seed and --allow-crimes, `copy_tokenizer` its --copy-tokenizer.  `tell` hears the
    warnings and notes (default: Python's warnings)."""
    config = load(Path(path), seed=seed, allow_crimes=allow_crimes)
    for warning in config.warnings:
        tell("warning", warning)
    # NaN weights: a tensor no `weight` setting covers is an error, never a silent default.
    nan = float("nan")
    options = options or MergeOptions()
    in_mergekit = options.compute_dtype == "mergekit"
    options = replace(options, domain_weight=nan, align_weight=nan,
                      out_dtype=config.stated_out_dtype if in_mergekit else config.out_dtype,
                      promote_mixed=True, mergekit_order=config.mergekit_order,
                      mergekit_has_base=config.mergekit_has_base,
                      input_dtype=config.input_dtype, method=config.method,
                      tokenizer_from=config.tokenizer_from if copy_tokenizer else "none",
                      vocabulary=config.vocabulary,
                      leave_out_unshared=config.mixed_architectures)
    try:
        plan = _plan_of(config, out, options)
    except PlanError as exc:
        raise PlanError([*config.problems, *exc.problems]) from None
    if config.problems:
        raise PlanError(list(config.problems))
    for note in plan.notes:
        tell("warning", note)
    if config.chat_template is not None:
        for note in _set_chat_template(plan, config):
            tell("note", note)
    if write_model_card:
        plan.written_files.update(card_files(plan.out_dir, plan.options.method.name,
                                             config.base_name, config.model_names,
                                             Path(path).read_text(encoding="utf-8")))
    return plan


def _plan_of(config: RunConfig, out, options: MergeOptions) -> MergePlan:
    if config.slices:
        from ..plan.slices import plan_passthrough

        return plan_passthrough(list(config.slices), config.base, out,
                                replace(options, domain_weight=0.0, align_weight=0.0))
    if config.merged_slices:
        from ..plan.slices import plan_sliced_merge

        return plan_sliced_merge(config.folders, config.merged_slices, out, options)
    if config.models:
        return plan_set(config.base, config.models, out, options)
    return plan_merge(config.base, config.domain, config.aligned, out, options)


def _set_chat_template(plan: MergePlan, config: RunConfig) -> List[str]:
    """The config's chat_template into OUT's tokenizer files (checked before any compute);
    returns the notes to show."""
    from .chat_template import resolve_template, template_files

    models = list(dict.fromkeys(p.resolve() for p in config.merged_folders))
    template = resolve_template(config.chat_template, models)
    if template is None:
        return ["chat_template auto: none of the models carries a template; the tokenizer "
                "files are copied as they are"]
    plan.written_files.update(template_files(template, plan.copied_files, plan.written_files))
    return []
