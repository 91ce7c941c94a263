"""The engine's fused kernels as merge methods inside mergekit 0.1.5.

    import mergealign_fast.mergekit.backend as backend
    backend.register()          # adds mergealign_task_arithmetic, mergealign_ties, ...

After `register()`, a mergekit config may say `merge_method: mergealign_ties` (or any method of
the registry whose spec says it registers: every mergekit method but passthrough, with the
prefix) and mergekit's own planner, loader, tokenizer handling and writer run as usual; only
the per-tensor arithmetic is ours (the native CPU kernel: fp32 math, one rounding,
radix-selected TIES thresholds, counter-based DARE masks; the numpy-window methods as `run`
merges them).  Parameters are mergekit's (plus `seed` for DARE's masks).  mergekit hands each
tensor over in memory, so this speeds up the arithmetic, not mergekit's loading and writing:
for whole-checkpoint speed use `mergealign-fast run CONFIG.yml OUT`.

A group merges a base and any number of other models: one or two go through the engine's
base/domain/aligned trio, more through its model-set kernel (merge_set_tensors), as `run`
merges them; linear takes any number of models (the first stands in the base role); slerp the
base and one other.  Tensors on a GPU are merged with task arithmetic on the GPU kernels; other
methods need CPU tensors (mergekit's default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import methods
from ..engine.in_memory import merge_set_tensors, merge_tensors
from ..methods.core.parameters import PARAMETERS, Method, Rule
from ..methods.core.spec import TRIO_MODELS, MethodSpec

try:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import (BasePolicy, GroupMergeMethod, InputContract,
                                             MergeMethodSpec, ParameterScope, ParameterSpec)
except ImportError as exc:  # pragma: no cover - exercised only without mergekit
    raise ImportError(f"mergealign_fast.mergekit.backend needs mergekit 0.1.5 "
                      f"(pip install mergekit==0.1.5): {exc}") from exc

PREFIX = "mergealign_"
# The trio's two model roles: a group of more models is a model set.
TRIO_MODEL_COUNT = len(TRIO_MODELS)
# mergekit's types of our parameter kinds (rescale is a switch there: l1 or none).
_TYPES = {"number": float, "bool": bool, "count": int, "rescale": bool}


def registered_specs() -> List[MethodSpec]:
    """The methods registered with mergekit: with our own parameter list, or mergekit's."""
    return [s for s in methods.specs() if s.mergekit.registers]


def register(prefix: str = PREFIX) -> List[str]:
    """Register every method of registered_specs() with mergekit under `prefix` + its name;
    returns the names.  Calling it again is harmless."""
    found = [(FusedMethod if s.mergekit.registers == "ours" else SpecMethod)(s, prefix + s.name)
             for s in registered_specs()]
    registered = {m.spec.name for m in registry.registered_methods()}
    for method in found:
        if method.spec.name not in registered:
            registry.register(method)
    return [method.spec.name for method in found]


@dataclass
class Group:
    """One output tensor's inputs as a method's MergekitForm.backend reads them."""

    base: Optional[torch.Tensor]
    others: List[torch.Tensor]
    shared: Dict[str, Any]
    per_model: List[Dict[str, Any]]
    name: str


class InMemory:
    """The in-memory merges a MergekitForm.backend calls: the trio or a model set."""

    def trio(self, base, domain, aligned, method: str, w_domain: float = 0.5,
             w_align: float = 0.5, **fields) -> torch.Tensor:
        return merge_tensors(*(t.contiguous() for t in (base, domain, aligned)),
                             method=Method(method, **fields), domain_weight=w_domain,
                             align_weight=w_align, name=self.name)

    def set(self, base, others: Sequence, method: str, **options) -> torch.Tensor:
        return merge_set_tensors(base.contiguous(), [t.contiguous() for t in others],
                                 method=method, name=self.name, **options)

    def __init__(self, name: str):
        self.name = name


class SpecMethod(GroupMergeMethod):
    """One of mergekit's methods that we merge too, with mergekit's own parameters."""

    def __init__(self, spec: MethodSpec, name: str):
        self.ours = spec
        theirs = registry.get(spec.name).spec
        self.spec = MergeMethodSpec(name, theirs.parameters, theirs.contract,
                                    pretty_name=f"{theirs.pretty_name or spec.name} "
                                    "(mergealign)",
                                    optional_tensor_policy=theirs.optional_tensor_policy)

    def _ours(self, theirs: str) -> Optional[str]:
        """Our name of one of mergekit's parameters; None for one we do not read."""
        form = self.ours.mergekit
        ours = form.aliases.get(theirs, theirs)
        readable = (*self.ours.parameters, *form.shape_options) if form.backend is None \
            else (*self.ours.parameters, *form.shape_options, "eps")
        return ours if ours in readable else None

    def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or ""
        others = list(group.non_base)
        shared, per_model = {}, [{} for _ in others]
        scopes = {p.name: p.scope for p in self.spec.parameters}
        for theirs, value in parameters.items():
            ours = self._ours(theirs)
            if ours is None:
                continue  # int8_mask: mergekit's memory only
            if scopes[theirs] != ParameterScope.SHARED:  # per model: by input id
                for settings, entry in zip(per_model, others):
                    settings[ours] = value[entry.id]
            else:
                shared[ours] = ("l1" if value else "none") if ours == "rescale" else value
        handler = self.ours.mergekit.backend
        if handler is not None:
            base = group.base.tensor if group.base is not None else None
            return handler(Group(base, [e.tensor for e in others], shared, per_model, name),
                           InMemory(name))
        trio = len(others) <= TRIO_MODEL_COUNT  # as `run` merges one or two models
        return merge_set_tensors(group.base.tensor.contiguous(),
                                 [e.tensor.contiguous() for e in others],
                                 method=self.ours.name, parameters=shared, per_model=per_model,
                                 name=name, roles=TRIO_MODELS[:len(others)] if trio else None)


def _our_parameters(spec: MethodSpec) -> List:
    """mergekit ParameterSpecs of our own parameter list (the generalized task arithmetic
    family, linear, slerp), with mergekit's defaults."""
    weighs_base = spec.contract.weighs_base
    found = []
    for name in spec.parameters:
        parameter = PARAMETERS[name]
        if parameter.per_model:
            scope = ParameterScope.INPUT if weighs_base else ParameterScope.NON_BASE
            default = None if name == "weight" else (1.0 if name == "density" else 0.01)
            found.append(ParameterSpec(name, float, scope, **(
                {} if default is None else {"default": default})))
            continue
        default = {"normalize": spec.defaults.normalize, "lambda": 1.0, "seed": 0,
                   "rescale": spec.defaults.rescale == "l1"}.get(name, parameter.default)
        found.append(ParameterSpec(name, _TYPES[parameter.kind], ParameterScope.SHARED,
                                   **({} if default is None else {"default": default})))
    if "lambda" in spec.parameters:  # the task arithmetic family: mergekit's memory switch
        found.insert(3, ParameterSpec("int8_mask", bool, ParameterScope.SHARED, default=False))
    return found


def _contract(spec: MethodSpec) -> InputContract:
    if spec.contract.weighs_base:  # linear: any models, the first in the base role
        return InputContract(min_inputs=1)
    if "weight" not in spec.parameters:  # slerp: the base and one other
        return InputContract(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2)
    return InputContract(base=BasePolicy.REQUIRED, min_inputs=2)


class FusedMethod(GroupMergeMethod):
    """One of our methods, called by mergekit once per output tensor."""

    def __init__(self, spec: MethodSpec, name: str):
        self.ours = spec
        self.spec = MergeMethodSpec(name, tuple(_our_parameters(spec)), _contract(spec),
                                    pretty_name=f"{spec.name} (mergealign)")

    def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or ""
        if self._is_set(group):
            return self._merge_set(group, parameters, name)
        trio, w_domain, w_align, method = self._trio(group, parameters)
        return merge_tensors(*(t.contiguous() for t in trio), domain_weight=w_domain,
                             align_weight=w_align, method=method, name=name)

    def _is_set(self, group) -> bool:
        """More models than the trio holds (linear: besides the first, which is its base)."""
        weighs_base = self.ours.contract.weighs_base
        others = len(group.entries) - 1 if weighs_base else len(group.non_base)
        return others > TRIO_MODEL_COUNT

    def _merge_set(self, group, p: Dict[str, Any], name: str) -> torch.Tensor:
        """A base and a set of models through the model-set kernel, as `run` merges them."""
        if self.ours.contract.weighs_base:
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
                                 [e.tensor.contiguous() for e in others],
                                 method=self.ours.name, parameters=shared, per_model=per_model,
                                 base_parameters=base_parameters, name=name)

    def _trio(self, group, p: Dict[str, Any]):
        """(base, domain, aligned tensors), w_d, w_a and the Method of one group."""
        ours = self.ours.name
        if self.ours.contract.weighs_base:
            entries = list(group.entries)
            weights = [p["weight"][e.id] for e in entries]
            while len(entries) < 3:  # missing roles repeat the first model, weight 0
                entries.append(entries[0])
                weights.append(0.0)
            return ([e.tensor for e in entries], weights[1], weights[2],
                    Method(ours, normalize=p["normalize"], base_weight=weights[0]))
        base, others = group.base, list(group.non_base)
        if "weight" not in self.ours.parameters:  # slerp: t = 0 is mergekit's base (aligned)
            return ([base.tensor, others[0].tensor, base.tensor], 0.5, 0.5,
                    Method(ours, t=p["t"]))
        weights = [p["weight"][e.id] for e in others]
        densities = [p.get("density", {}).get(e.id, 1.0) for e in others]
        if len(others) == 1:  # no second vector: the aligned role repeats the base
            others.append(base)
            weights.append(0.0)
            densities.append(1.0)
        rescale = "l1" if p.get("rescale") else "none"
        method = Method(ours, densities[0], densities[1], p["lambda"],
                        p["normalize"], rescale, p.get("seed", 0))
        if "gamma" in p:  # breadcrumbs: each model's band
            method = replace(method, rules=tuple(
                Rule("gamma", role, p["gamma"][e.id])
                for role, e in zip(TRIO_MODELS, group.non_base)))
        return [base.tensor, others[0].tensor, others[1].tensor], weights[0], weights[1], \
            method
