"""The engine's fused kernels as merge methods inside mergekit 0.1.5.

    import mergealign_fast.mergekit_backend as backend
    backend.register()          # adds mergealign_task_arithmetic, mergealign_ties, ...

After `register()`, a mergekit config may say `merge_method: mergealign_ties` (or any name in
METHOD_NAMES or SPEC_METHODS with the prefix: every mergekit method but passthrough) and
mergekit's own planner, loader, tokenizer handling and writer run as usual; only the
per-tensor arithmetic is ours (the native CPU kernel: fp32 math, one rounding, radix-selected
TIES thresholds, counter-based DARE masks; the numpy-window methods as `run` merges them).
Parameters are mergekit's (plus `seed` for DARE's masks).
mergekit hands each tensor over in memory, so this speeds up the arithmetic, not mergekit's
loading and writing: for whole-checkpoint speed use `mergealign-fast run CONFIG.yml OUT`.

A group merges a base and any number of other models: one or two go through the engine's
base/domain/aligned trio, more through its model-set kernel (merge_set_tensors), as `run`
merges them; linear takes any number of models (the first stands in the base role); slerp the
base and one other.  Tensors on a GPU are merged with task arithmetic on the GPU kernels; other
methods need CPU tensors (mergekit's default).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Tuple

import torch

from ..methods import KARCHER_STEPS, KARCHER_TOL, MULTISLERP_EPS, TRIO_MODELS, Method, Rule
from ..engine.in_memory import merge_set_tensors, merge_tensors

try:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import (BasePolicy, GroupMergeMethod, InputContract,
                                             MergeMethodSpec, ParameterScope, ParameterSpec)
except ImportError as exc:  # pragma: no cover - exercised only without mergekit
    raise ImportError(f"mergealign_fast.mergekit_backend needs mergekit 0.1.5 "
                      f"(pip install mergekit==0.1.5): {exc}") from exc

PREFIX = "mergealign_"
# mergekit method -> (our method, mergekit's default for normalize, for rescale).
METHOD_NAMES: Dict[str, Tuple[str, bool, bool]] = {
    "task_arithmetic": ("task_arithmetic", False, False),
    "ties": ("ties", True, False),
    "dare_linear": ("dare_linear", False, True),
    "dare_ties": ("dare_ties", False, True),
    "linear": ("linear", True, False),
    "slerp": ("slerp", False, False),
    "breadcrumbs": ("breadcrumbs", False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False),
}
# The trio's two model roles: a group of more models is a model set.
TRIO_MODEL_COUNT = 2
# mergekit methods registered with mergekit's own parameters and input contract (its spec,
# renamed), merged by merge_set_tensors (a base and any number of models) or, for nearswap,
# merge_tensors; the values are our parameter of each of theirs.
SPEC_METHODS: Dict[str, Dict[str, str]] = {
    "sce": {"select_topk": "select_topk"},
    "della": {"weight": "weight", "density": "density", "epsilon": "epsilon",
              "lambda": "lambda", "normalize": "normalize", "rescale": "rescale"},
    "della_linear": {"weight": "weight", "density": "density", "epsilon": "epsilon",
                     "lambda": "lambda", "normalize": "normalize", "rescale": "rescale"},
    "ram": {"epsilon": "epsilon"},
    "ramplus_tl": {"epsilon": "epsilon", "r": "r", "alpha": "alpha"},
    "arcee_fusion": {},
    "nearswap": {"t": "t"},
    "model_stock": {"filter_wise": "filter_wise"},
    "nuslerp": {"weight": "weight", "nuslerp_flatten": "nuslerp_flatten",
                "nuslerp_row_wise": "nuslerp_row_wise"},
    "multislerp": {"weight": "weight", "normalize_weights": "normalize", "eps": "eps"},
    "karcher": {"max_iter": "max_iter", "tol": "tol"},
}


def register(prefix: str = PREFIX) -> List[str]:
    """Register every method in METHOD_NAMES and SPEC_METHODS with mergekit under `prefix` +
    its name; returns the names.  Calling it again is harmless."""
    methods = [FusedMethod(name, prefix + name) for name in METHOD_NAMES]
    methods += [SpecMethod(name, prefix + name) for name in SPEC_METHODS]
    registered = {m.spec.name for m in registry.registered_methods()}
    for method in methods:
        if method.spec.name not in registered:
            registry.register(method)
    return [method.spec.name for method in methods]


class SpecMethod(GroupMergeMethod):
    """One of mergekit's methods that we merge too, with mergekit's own parameters."""

    def __init__(self, mergekit_name: str, name: str):
        self.ours = mergekit_name
        theirs = registry.get(mergekit_name).spec
        self.spec = MergeMethodSpec(name, theirs.parameters, theirs.contract,
                                    pretty_name=f"{theirs.pretty_name or mergekit_name} "
                                    "(mergealign)",
                                    optional_tensor_policy=theirs.optional_tensor_policy)

    def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or ""
        ours = SPEC_METHODS[self.ours]
        others = list(group.non_base)
        shared, per_model = {}, [{} for _ in others]
        scopes = {p.name: p.scope for p in self.spec.parameters}
        for theirs, value in parameters.items():
            if theirs not in ours:
                continue  # int8_mask: mergekit's memory only
            if scopes[theirs] != ParameterScope.SHARED:  # per model: by input id
                for settings, entry in zip(per_model, others):
                    settings[ours[theirs]] = value[entry.id]
            else:
                shared[ours[theirs]] = ("l1" if value else "none") \
                    if theirs == "rescale" else value
        special = {"nearswap": _nearswap, "model_stock": _model_stock, "nuslerp": _nuslerp,
                   "multislerp": _multislerp, "karcher": _karcher}.get(self.ours)
        if special is not None:
            return special(group, shared, per_model, name)
        trio = len(others) <= TRIO_MODEL_COUNT  # as `run` merges one or two models
        return merge_set_tensors(group.base.tensor.contiguous(),
                                 [e.tensor.contiguous() for e in others],
                                 method=self.ours, parameters=shared, per_model=per_model,
                                 name=name, roles=TRIO_MODELS[:len(others)] if trio else None)


# The methods whose models map onto the engine's roles as `run` maps a config's
# (mergekit_config.py): each gives the merged tensor of one group.

def _trio(base, domain, aligned, method: Method, name: str, w_domain: float = 0.5,
          w_align: float = 0.5) -> torch.Tensor:
    return merge_tensors(*(t.contiguous() for t in (base, domain, aligned)), method=method,
                         domain_weight=w_domain, align_weight=w_align, name=name)


def _nearswap(group, shared, per_model, name):
    base, other = group.base.tensor, group.non_base[0].tensor
    return _trio(base, other, base, Method("nearswap", t=shared["t"]), name)


def _model_stock(group, shared, per_model, name):
    others = [e.tensor for e in group.non_base]
    vectors = "rows" if shared.get("filter_wise") else "tensor"
    if len(others) <= TRIO_MODEL_COUNT:
        return _trio(group.base.tensor, others[0], others[-1],
                     Method("model_stock", vectors=vectors), name)
    if vectors != "tensor":
        raise ValueError(f"{name}: filter-wise Model Stock merges two models besides the base "
                         f"here (got {len(others)})")
    return merge_set_tensors(group.base.tensor.contiguous(), [t.contiguous() for t in others],
                             method="model_stock", name=name)


def _vectors(shared) -> str:
    """What nuslerp takes as one vector, from mergekit's two options."""
    if shared.get("nuslerp_flatten", True):
        return "tensor"
    return "columns" if shared.get("nuslerp_row_wise") else "rows"


def _nuslerp(group, shared, per_model, name):
    """t runs from the first model to the second: our aligned to our domain."""
    (first, second), (w_first, w_second) = \
        [e.tensor for e in group.non_base], [p["weight"] for p in per_model]
    if group.base is None:  # over the models themselves: the first stands in the base role
        return _trio(first, second, first, Method("nuslerp_models", vectors=_vectors(shared)),
                     name, w_second, w_first)
    return _trio(group.base.tensor, second, first, Method("nuslerp", vectors=_vectors(shared)),
                 name, w_second, w_first)


def _multislerp(group, shared, per_model, name):
    if shared.get("eps", MULTISLERP_EPS) != MULTISLERP_EPS:
        raise ValueError(f"{name}: multislerp's eps is {MULTISLERP_EPS} here (got "
                         f"{shared['eps']})")
    others = [e.tensor for e in group.non_base]
    weights = [p["weight"] for p in per_model]
    normalize = shared.get("normalize", True)
    if group.base is None:  # two models: the first stands in the base role
        return _trio(others[0], others[1], others[0],
                     Method("multislerp_models", normalize=normalize), name, weights[1],
                     weights[0])
    if len(others) <= TRIO_MODEL_COUNT:
        return _trio(group.base.tensor, others[0], others[-1],
                     Method("multislerp", normalize=normalize), name, weights[0],
                     weights[-1] if len(others) == 2 else 0.0)
    return merge_set_tensors(group.base.tensor.contiguous(), [t.contiguous() for t in others],
                             method="multislerp", parameters={"normalize": normalize},
                             per_model=[{"weight": w} for w in weights], name=name)


def _karcher(group, shared, per_model, name):
    """Every model (base_model first), each weighing 1/n, as mergekit's karcher."""
    models = ([group.base] if group.base is not None else []) + list(group.non_base)
    tensors, share = [e.tensor for e in models], 1.0 / len(models)
    steps = {"max_iter": shared.get("max_iter", KARCHER_STEPS),
             "tol": shared.get("tol", KARCHER_TOL)}
    if len(tensors) <= TRIO_MODEL_COUNT + 1:
        aligned = tensors[2] if len(tensors) == 3 else tensors[0]
        return _trio(tensors[0], tensors[1], aligned,
                     Method("karcher", base_weight=share, **steps), name, share,
                     share if len(tensors) == 3 else 0.0)
    return merge_set_tensors(tensors[0].contiguous(), [t.contiguous() for t in tensors[1:]],
                             method="karcher", parameters=steps,
                             per_model=[{"weight": share}] * (len(tensors) - 1),
                             base_parameters={"weight": share}, name=name)


def _spec(mergekit_name: str, name: str) -> MergeMethodSpec:
    ours, normalize, rescale = METHOD_NAMES[mergekit_name]
    if ours == "slerp":
        return MergeMethodSpec(name, (ParameterSpec("t", float, ParameterScope.SHARED),),
                               InputContract(base=BasePolicy.REQUIRED, min_inputs=2,
                                             max_inputs=2), pretty_name="SLERP (mergealign)")
    if ours == "linear":
        return MergeMethodSpec(name, (
            ParameterSpec("weight", float, ParameterScope.INPUT),
            ParameterSpec("normalize", bool, ParameterScope.SHARED, default=normalize)),
            InputContract(min_inputs=1), pretty_name="Linear (mergealign)")
    parameters = [ParameterSpec("weight", float, ParameterScope.NON_BASE),
                  ParameterSpec("normalize", bool, ParameterScope.SHARED, default=normalize),
                  ParameterSpec("lambda", float, ParameterScope.SHARED, default=1.0),
                  ParameterSpec("int8_mask", bool, ParameterScope.SHARED, default=False)]
    if ours != "task_arithmetic":
        parameters += [ParameterSpec("density", float, ParameterScope.NON_BASE, default=1.0),
                       ParameterSpec("rescale", bool, ParameterScope.SHARED, default=rescale)]
    if ours.startswith("dare"):
        parameters.append(ParameterSpec("seed", int, ParameterScope.SHARED, default=0))
    if ours.startswith("breadcrumbs"):
        parameters.append(ParameterSpec("gamma", float, ParameterScope.NON_BASE, default=0.01))
    return MergeMethodSpec(name, tuple(parameters),
                           InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
                           pretty_name=f"{mergekit_name} (mergealign)")


class FusedMethod(GroupMergeMethod):
    """One of our methods, called by mergekit once per output tensor."""

    def __init__(self, mergekit_name: str, name: str):
        self.ours = METHOD_NAMES[mergekit_name][0]
        self.spec = _spec(mergekit_name, name)

    def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or ""
        if self._is_set(group):
            return self._merge_set(group, parameters, name)
        trio, w_domain, w_align, method = self._trio(group, parameters)
        return merge_tensors(*(t.contiguous() for t in trio), domain_weight=w_domain,
                             align_weight=w_align, method=method, name=name)

    def _is_set(self, group) -> bool:
        """More models than the trio holds (linear: besides the first, which is its base)."""
        others = len(group.entries) - 1 if self.ours == "linear" else len(group.non_base)
        return others > TRIO_MODEL_COUNT

    def _merge_set(self, group, p: Dict[str, Any], name: str) -> torch.Tensor:
        """A base and a set of models through the model-set kernel, as `run` merges them."""
        if self.ours == "linear":
            base, *others = group.entries
            base_parameters = {"weight": p["weight"][base.id]}
            shared = {"normalize": p["normalize"]}
        else:
            base, others, base_parameters = group.base, list(group.non_base), {}
            shared = {key: (("l1" if p[key] else "none") if key == "rescale" else p[key])
                      for key in ("lambda", "normalize", "rescale", "seed") if key in p}
        per_model = [{key: p[key][e.id] for key in ("weight", "density", "gamma") if key in p}
                     for e in others]
        return merge_set_tensors(base.tensor.contiguous(),
                                 [e.tensor.contiguous() for e in others], method=self.ours,
                                 parameters=shared, per_model=per_model,
                                 base_parameters=base_parameters, name=name)

    def _trio(self, group, p: Dict[str, Any]):
        """(base, domain, aligned tensors), w_d, w_a and the Method of one group."""
        if self.ours == "linear":
            entries = list(group.entries)
            weights = [p["weight"][e.id] for e in entries]
            while len(entries) < 3:  # missing roles repeat the first model, weight 0
                entries.append(entries[0])
                weights.append(0.0)
            return ([e.tensor for e in entries], weights[1], weights[2],
                    Method("linear", normalize=p["normalize"], base_weight=weights[0]))
        base, others = group.base, list(group.non_base)
        if self.ours == "slerp":  # t = 0 is mergekit's base: our aligned role
            return ([base.tensor, others[0].tensor, base.tensor], 0.5, 0.5,
                    Method("slerp", t=p["t"]))
        weights = [p["weight"][e.id] for e in others]
        densities = [p.get("density", {}).get(e.id, 1.0) for e in others]
        if len(others) == 1:  # no second vector: the aligned role repeats the base
            others.append(base)
            weights.append(0.0)
            densities.append(1.0)
        rescale = "l1" if p.get("rescale") else "none"
        method = Method(self.ours, densities[0], densities[1], p["lambda"],
                        p["normalize"], rescale, p.get("seed", 0))
        if "gamma" in p:  # breadcrumbs: each model's band
            method = replace(method, rules=tuple(
                Rule("gamma", role, p["gamma"][e.id])
                for role, e in zip(TRIO_MODELS, group.non_base)))
        return [base.tensor, others[0].tensor, others[1].tensor], weights[0], weights[1], \
            method
