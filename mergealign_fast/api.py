"""The library's public functions, above every layer: merges of model folders (the trio, any
number of models into a base, λ sweeps, mergekit configs), each run here or split by shard
across a Ray cluster.  `merge_tensors` (in memory) lives in engine/in_memory.py.

    from mergealign_fast import merge_checkpoints, merge_models, run_config, sweep_checkpoints
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .engine.loop import MergeResult, execute, execute_many
from .errors import PlanError
from .methods.core.parameters import Method, set_method
from .methods.core.spec import SET_ROLE
from .plan import MergeOptions, MergePlan, plan_merge, plan_set
from .plan.sweep import plan_sweep

PathLike = Union[str, os.PathLike]


def options_with(options: Optional[MergeOptions], changes: dict) -> MergeOptions:
    """`options` (default MergeOptions()) with `changes`; a method may be given by its name,
    with its default parameters (method="ties")."""
    if isinstance(changes.get("method"), str):
        changes = {**changes, "method": Method(changes["method"])}
    return replace(options or MergeOptions(), **changes)


def merge_checkpoints(base: PathLike, domain: PathLike, aligned: PathLike, out: PathLike, *,
                      options: Optional[MergeOptions] = None, progress: bool = False,
                      ray_address: Optional[str] = None, **changes) -> MergeResult:
    """Merge three Hugging Face model folders into `out` (see the README for the formula).

    The merge's settings are a MergeOptions (plan.py lists each with its default); give one as
    `options`, or change any of its fields by keyword: domain_weight=0.7, method=Method("ties"),
    device="cuda", resume=True, ...  Everything is checked first (PlanError lists every
    problem); then the merge streams through the native kernel in bounded memory and `out`
    appears only when complete.  progress=True shows a progress bar on stderr.  ray_address
    ("" for this machine's Ray instance) splits the merge by shard across a Ray cluster
    (cluster.py): the same files.
    """
    options = options_with(options, changes)
    return execute_on(plan_merge(base, domain, aligned, out, options), ray_address, progress)


ModelEntry = Union[PathLike, Tuple[PathLike, Dict[str, object]]]


def merge_models(base: ModelEntry, models: Sequence[ModelEntry], out: PathLike, *,
                 method: str = "task_arithmetic", parameters: Optional[Dict[str, object]] = None,
                 options: Optional[MergeOptions] = None, progress: bool = False,
                 ray_address: Optional[str] = None, **changes) -> MergeResult:
    """Merge any number of model folders into `base`, as a mergekit config does: `method` is
    one of methods.SET_METHODS (task_arithmetic, linear, ties, dare_linear, dare_ties,
    breadcrumbs, breadcrumbs_ties, multislerp, model_stock, karcher, sce).

    Each of `models` is a folder or (folder, {"weight": 0.4, "density": 0.5}); a value may be
    a list, a gradient over the layers.  `parameters` are the shared ones (lambda, normalize,
    rescale, seed; a weight or density there applies to every model); linear weighs the base
    too: give it as (folder, {"weight": w}).  One pass reads each input once, in bounded memory,
    bitwise the same on any thread count.  `options`, **changes, progress and ray_address as
    for merge_checkpoints (the trio's weights there are not used; the tokenizer is the base's
    unless tokenizer_from names "model N" or "none"; vocabulary="union" or "model N" merges
    the vocabulary tensors by token)."""
    entries = [_model_entry(e) for e in [base, *models]]
    per_model = {SET_ROLE.format(i): params for i, (_, params) in enumerate(entries) if i}
    per_model["base"] = entries[0][1]
    try:
        chosen = set_method(method, parameters, per_model)
    except ValueError as exc:
        raise PlanError([str(exc)]) from None
    if options is None:  # the tokenizer and config of the base, as in mergekit
        changes.setdefault("tokenizer_from", "base")
    options = replace(options or MergeOptions(), method=chosen, **changes)
    plan = plan_set(entries[0][0], [folder for folder, _ in entries[1:]], out, options)
    return execute_on(plan, ray_address, progress)


def _model_entry(entry: ModelEntry) -> Tuple[PathLike, Dict[str, object]]:
    if isinstance(entry, tuple):
        folder, parameters = entry
        return folder, dict(parameters or {})
    return entry, {}


def execute_on(plan: MergePlan, ray_address: Optional[str],
               show_progress: bool = False) -> MergeResult:
    """A checked plan run in this process (ray_address None), or split by shard across a Ray
    cluster (cluster.py; "" for this machine's Ray instance)."""
    if ray_address is not None:
        from .engine.cluster import merge_on_ray

        return merge_on_ray(plan, ray_address, show_progress=show_progress)
    return execute(plan, show_progress=show_progress)


def sweep_checkpoints(base: PathLike, domain: PathLike, aligned: PathLike, out_root: PathLike,
                      lambdas: Sequence[float], *, options: Optional[MergeOptions] = None,
                      progress: bool = False, ray_address: Optional[str] = None,
                      **changes) -> List[MergeResult]:
    """Write out_root/lambda-<λ> for each λ (plan_sweep) in one pass.  `options` and `changes`
    are merge_checkpoints'; the weights (and t) are the sweep's.  With `ray_address` ("" for a
    local Ray instance) each λ is a task on a Ray cluster instead (cluster.py)."""
    shared = options_with(options, changes)
    plans = plan_sweep(base, domain, aligned, out_root, lambdas, shared)
    if ray_address is not None:
        from .engine.cluster import sweep_on_ray

        return sweep_on_ray(plans, ray_address, show_progress=progress)
    return execute_many(plans, show_progress=progress)


def run_config(config: PathLike, out: PathLike, *, options: Optional[MergeOptions] = None,
               progress: bool = False, ray_address: Optional[str] = None,
               seed: Optional[int] = None, allow_crimes: bool = True,
               copy_tokenizer: bool = True, write_model_card: bool = True,
               **changes) -> MergeResult:
    """Run the mergekit YAML config at `config` into `out`, as mergekit's `run_merge` does (and
    `mergealign-fast run`): every method, model sets, slices, tokenizer sections and chat
    templates, checked whole before anything is read (PlanError lists every problem).

    The config decides the method, weights, dtypes and tokenizer; `options` and **changes set
    the merge's own settings (max_shard_size, threads, fsync, device, force, resume, ...).
    `seed` and `allow_crimes` are mergekit-yaml's --random-seed and --allow-crimes,
    `copy_tokenizer` its --copy-tokenizer and `write_model_card` its --write-model-card (OUT's
    README.md and mergekit_config.yml).  What mergekit would silently ignore is said with
    Python's warnings.  progress and ray_address as for merge_checkpoints."""
    from .mergekit.run import plan_config

    options = replace(options or MergeOptions(), **changes)
    plan = plan_config(config, out, options, seed=seed, allow_crimes=allow_crimes,
                       copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
    return execute_on(plan, ray_address, progress)
