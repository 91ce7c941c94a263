"""A method's parameters resolved for one tensor (`TensorSettings`), from a `Method` and the
tensor's name and layer position, as mergekit resolves filters and gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ... import methods as registry
from ...io.checkpoint import layer_index
from .parameters import (KARCHER_STEPS, KARCHER_TOL, RAMPLUS_ALPHA, RAMPLUS_R, RESCALES, Method,
                         Setting, is_fused_formula, weight_problems)
from .spec import TRIO_MODELS, MethodSpec

@dataclass(frozen=True)
class TensorSettings:
    """A method's parameters resolved for one tensor.  `weights` and `densities` are per model,
    in the order of `roles` (the trio's domain, aligned; or a model set's models)."""

    name: str
    roles: Tuple[str, ...]
    weights: Tuple[float, ...]
    w_base: float
    densities: Tuple[float, ...]
    gammas: Tuple[float, ...]
    lambda_: float
    normalize: bool
    rescale: str
    seed: int
    t: float
    sparsify: int
    sign_election: bool
    max_iter: int = KARCHER_STEPS
    tol: float = KARCHER_TOL
    vectors: str = "tensor"
    select_topk: float = 1.0
    epsilons: Tuple[float, ...] = ()  # per model, as densities
    r: float = RAMPLUS_R
    alpha: float = RAMPLUS_ALPHA
    own: Tuple[Tuple[str, object], ...] = ()  # the method's own parameters (name, value)

    def own_value(self, name: str):
        """The value of one of the method's own parameters (MethodSpec.own_parameters)."""
        return dict(self.own)[name]

    @property
    def w_domain(self) -> float:
        return self.weights[0]

    @property
    def w_align(self) -> float:
        return self.weights[1]

    @property
    def domain_density(self) -> float:
        return self.densities[0]

    @property
    def align_density(self) -> float:
        return self.densities[1]

    @property
    def spec(self) -> MethodSpec:
        return registry.get(self.name)

    @property
    def is_plain_task_arithmetic(self) -> bool:
        return self.roles == TRIO_MODELS and is_fused_formula(self.spec, self.lambda_,
                                                              self.normalize)

    def by_vectors(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this shape is merged vector by vector (windows/per_vector.py);
        a 1-D tensor is one vector, merged whole (Method.problems allows other modes only to
        the methods that take them).  A tensor of no elements ([4, 0]) has no vectors to
        weigh: it takes the whole-tensor route, which writes nothing."""
        return self.vectors != "tensor" and len(shape) >= 2 and all(n > 0 for n in shape)


def layer_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient coordinate: layer i of n is at i/(n-1); tensors outside the layers
    (embeddings, final norm, lm_head) are at 0."""
    index = layer_index(tensor_name)
    if index is None or num_layers <= 1:
        return 0.0 if index is None else 1.0
    return index / (num_layers - 1)


def evaluate(setting: Setting, tensor_name: str, position: float):
    """A mergekit parameter setting's value for one tensor; None when no filter matches."""
    if isinstance(setting, tuple) and setting and isinstance(setting[0], tuple):
        for pattern, value in setting:
            if pattern in (None, "*") or pattern in tensor_name:
                return evaluate(value, tensor_name, position)
        return None
    if isinstance(setting, tuple):
        if not setting:
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(position * (len(setting) - 1))]
        scaled = position * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def resolve(method: Method, tensor_name: str, position: float, weights: Sequence[float],
            roles: Tuple[str, ...] = TRIO_MODELS) -> TensorSettings:
    """The parameters of one tensor: the first rule (model-specific before shared) whose
    setting applies to the tensor, else the method's value.  `weights`: each model's weight
    where no rule sets it; a model set's densities default to 1 (its rules set them)."""

    def value(parameter: str, role: Optional[str], default):
        for scope in ((role, None) if role else (None,)):
            for rule in method.rules:
                if rule.parameter == parameter and rule.role == scope:
                    found = evaluate(rule.setting, tensor_name, position)
                    if found is not None:
                        return found
        return default

    defaults = method.spec.defaults
    densities = (method.domain_density, method.align_density) if roles == TRIO_MODELS \
        else (1.0,) * len(roles)
    return TensorSettings(
        name=method.name,
        roles=roles,
        weights=tuple(float(value("weight", r, w)) for r, w in zip(roles, weights)),
        w_base=float(value("weight", "base", method.base_weight)),
        densities=tuple(float(value("density", r, d)) for r, d in zip(roles, densities)),
        gammas=tuple(float(value("gamma", r, method.gamma)) for r in roles),
        lambda_=float(value("lambda", None, method.lambda_)),
        normalize=bool(value("normalize", None, defaults.normalize if method.normalize is None
                             else method.normalize)),
        rescale=str(value("rescale", None, method.rescale or defaults.rescale)),
        seed=int(value("seed", None, method.seed)),
        t=float(value("t", None, method.t)),
        sparsify=defaults.sparsify,
        sign_election=defaults.sign_election,
        max_iter=int(value("max_iter", None, method.max_iter)),
        tol=float(value("tol", None, method.tol)),
        vectors=method.vectors,
        select_topk=float(value("select_topk", None, method.select_topk)),
        epsilons=tuple(float(value("epsilon", r, defaults.epsilon if method.epsilon is None
                                   else method.epsilon)) for r in roles),
        r=float(value("r", None, method.r)),
        alpha=float(value("alpha", None, method.alpha)),
        own=tuple((p.name, _OF_KIND.get(p.kind, float)(value(p.name, None, p.default)))
                  for p in method.spec.own_parameters),
    )


# How a resolved value of each kind is held (a gradient of counts interpolates to a float).
_OF_KIND = {"bool": bool, "count": int, "rescale": str}


def settings_problems(s: TensorSettings, where: str) -> List[str]:
    """Values out of range (a rule may push one tensor's); each line starts with `where`."""
    problems = []
    spec = s.spec
    weighted = "weight" in spec.parameters  # SLERP's family ignores the weights
    unset = [role for role, w in zip(s.roles, s.weights) if weighted and w != w]
    if unset:  # NaN is "no value" (mergekit configs: no rule matched the tensor)
        named = [f"the {r} model" if r in TRIO_MODELS else r for r in unset]
        problems.append(f"{where}: no weight for {' and '.join(named)}: no `weight` setting "
                        "matches this tensor")
    elif weighted:
        problems += [f"{where}: {p}" for p in weight_problems(dict(zip(s.roles, s.weights)))]
    for role, density, gamma in zip(s.roles, s.densities, s.gammas):
        if not 0.0 <= density <= 1.0:
            problems.append(f"{where}: {role} density must be between 0 and 1 "
                            f"(got {density})")
        if not 0.0 <= gamma <= 1.0:
            problems.append(f"{where}: {role} gamma must be between 0 and 1 (got {gamma})")
    if s.rescale not in RESCALES:
        problems.append(f"{where}: rescale {s.rescale!r}: choose one of "
                        f"{', '.join(RESCALES)}")
    if not 0.0 <= s.select_topk <= 1.0:
        problems.append(f"{where}: select_topk must be between 0 and 1 (got {s.select_topk})")
    problems += [f"{where}: {role} epsilon must be at least 0 (got {e})"
                 for role, e in zip(s.roles, s.epsilons) if not e >= 0]
    if spec.settings_problems is not None:
        problems += spec.settings_problems(s, where)
    if not s.tol > 0:
        problems.append(f"{where}: tol must be a positive number (got {s.tol})")
    return problems
