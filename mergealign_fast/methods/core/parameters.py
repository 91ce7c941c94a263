"""The parameters of merge methods: their catalogue, and `Method`, a method with its values.

`PARAMETERS` lists every parameter once (its type, the `Method` fields and command-line flags
that set it, its help); a method's spec names the ones it takes.  A `Method` is a method's name
and its values, optionally varying per tensor and per model by `rules` (mergekit's filters and
layer gradients); `problems()` checks it before any tensor is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from ... import methods as registry
from .geometry import KARCHER_STEPS, KARCHER_TOL
from .spec import MethodSpec, Parameter

# RAM+'s defaults (mergekit's): r scales the unshared elements by up to r·α.
RAMPLUS_R = 0.1
RAMPLUS_ALPHA = 0.2
RESCALES = ("l1", "inverse_density", "none")
# The largest finite float32: the kernels compute in fp32, so a coefficient beyond it would be
# infinite there (a weight of 1e39 made an all-inf model).
FLOAT32_MAX = 3.4028234663852886e38


PARAMETERS: Dict[str, Parameter] = {p.name: p for p in (
    Parameter("weight", "number", (), "weight of each model (of its task vector)",
              (("domain_weight", "domain_weight"), ("align_weight", "align_weight"),
               ("base_weight", "base_weight")), per_model=True),
    Parameter("density", "number", ("domain_density", "align_density"),
              "fraction of each task vector kept (default 1)",
              (("density", ""), ("domain_density", "domain_density"),
               ("align_density", "align_density")), per_model=True),
    Parameter("lambda", "number", ("lambda_",), "scale of the combined vector (default 1)",
              (("lambda_", "lambda_"),)),
    Parameter("normalize", "bool", ("normalize",), "divide by the summed weights",
              (("normalize", "normalize"),)),
    Parameter("rescale", "rescale", ("rescale",), "after dropping: l1, inverse_density or none",
              (("rescale", "rescale"),)),
    Parameter("seed", "count", ("seed",), "seed of the random masks (default 0)",
              (("seed", "seed"),)),
    Parameter("t", "number", ("t",), "0 = aligned, 1 = domain (default 0.5); nearswap: the "
              "distance within which domain's value is taken", (("t", "t"),)),
    Parameter("gamma", "number", ("gamma",), "fraction of the largest |τ| dropped (default "
              "0.01)", (("gamma", "gamma"),), per_model=True),
    Parameter("max_iter", "count", ("max_iter",), "the most iteration steps (default 10)"),
    Parameter("tol", "number", ("tol",), "the shortest step that counts (default 1e-5)"),
    Parameter("select_topk", "number", ("select_topk",), "fraction of elements kept, by "
              "variance across the models (default 1: all)", (("select_topk", "select_topk"),)),
    Parameter("epsilon", "number", ("epsilon",), "della: the keep probability runs from "
              "density - E to density + E (default 0.15); ram: the |τ| above which a model's "
              "change counts (default 1e-5)", (("epsilon", "epsilon"),)),
    Parameter("r", "number", ("r",), "unshared changes scaled by up to 1 + R·alpha (default "
              "0.1)", (("r", "r"),)),
    Parameter("alpha", "number", ("alpha",), "the cap on the ratio of shared to unshared "
              "changes (default 0.2)", (("alpha", "alpha"),)),
)}


def _add_own_parameters() -> None:
    """The parameters method modules declare for themselves join the catalogue."""
    for spec in registry.specs():
        for parameter in spec.own_parameters:
            if PARAMETERS.setdefault(parameter.name, parameter) is not parameter:
                raise RuntimeError(f"{spec.name}: parameter {parameter.name!r} is declared "
                                   "twice (the catalogue or another method has it)")


_add_own_parameters()


def is_fp32_finite(value) -> bool:
    """A real number (not bool) that stays finite when rounded to float32."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and abs(value) <= FLOAT32_MAX)


def weight_problems(weights: Dict[str, float]) -> List[str]:
    """One line per weight (by its model's name) that is not a real number finite in fp32."""
    return [f"{name} weight must be a finite real number, within float32's range "
            f"(|w| <= 3.4e38; got {value!r})"
            for name, value in weights.items() if not is_fp32_finite(value)]


def check_weights(w_domain: float, w_align: float) -> None:
    """ValueError unless both weights are finite real numbers, finite in float32 too."""
    problems = weight_problems({"domain": w_domain, "align": w_align})
    if problems:
        raise ValueError(problems[0])


def per_model_parameters(spec: MethodSpec) -> set:
    """The parameters a model's own settings may hold for the method."""
    return {p for p in spec.parameters if PARAMETERS[p].per_model} | set(spec.per_model)


# A mergekit-style parameter value: a scalar, a layer gradient (tuple of numbers), or
# filter rules ((substring or None, value), ...), the first matching rule winning.
Setting = Union[float, int, bool, str, Tuple]


@dataclass(frozen=True)
class Rule:
    """A parameter's setting for one model role (None: every model / shared)."""

    parameter: str
    role: Optional[str]
    setting: Setting


@dataclass(frozen=True)
class Method:
    """A merge method and its parameters.  Weights live in MergeOptions (domain_weight,
    align_weight); `rules` override any parameter per tensor (mergekit filters and gradients)."""

    name: str = "task_arithmetic"
    domain_density: float = 1.0
    align_density: float = 1.0
    lambda_: float = 1.0
    normalize: Optional[bool] = None  # None: the method's default
    rescale: Optional[str] = None     # None: the method's default
    seed: int = 0
    t: float = 0.5
    base_weight: float = 0.0  # linear, karcher: weight of the base model itself
    gamma: float = 0.01  # breadcrumbs: the fraction of largest magnitudes dropped (mergekit's)
    max_iter: int = KARCHER_STEPS  # karcher: the most iteration steps
    tol: float = KARCHER_TOL       # karcher: the shortest step (and the least norm) that counts
    vectors: str = "tensor"  # one of spec.VECTOR_MODES the method takes
    select_topk: float = 1.0  # sce: the fraction of elements its select step keeps
    epsilon: Optional[float] = None  # della, ram: None is the method's default
    r: float = RAMPLUS_R          # ramplus_tl: the most an unshared element is scaled up, over α
    alpha: float = RAMPLUS_ALPHA  # ramplus_tl: the cap on ρ (shared / unshared elements)
    rules: Tuple[Rule, ...] = field(default=())

    @property
    def spec(self) -> MethodSpec:
        return registry.get(self.name)

    @property
    def is_plain_task_arithmetic(self) -> bool:
        """The MergeAlign formula itself for every tensor (no rule can change a parameter)."""
        return not self.rules and registry.is_method(self.name) and \
            is_fused_formula(self.spec, self.lambda_, self.normalize)

    def _unused_parameter_problems(self) -> List[str]:
        """A parameter set away from its default that the method does not take is a mistake
        (the command line refuses its flag the same way)."""
        defaults = Method(self.name)
        accepted = self.spec.parameters
        problems = [f"{self.name}: {f} does not apply to {self.name} (it takes: "
                    f"{', '.join(accepted) or 'nothing'})"
                    for p in PARAMETERS.values() for f in p.fields
                    if getattr(self, f) != getattr(defaults, f) and p.name not in accepted]
        if self.base_weight != 0.0 and not self.spec.contract.weighs_base:
            problems.append(f"{self.name}: base_weight applies to "
                            f"{' and '.join(base_weighing())} only")
        return problems

    def problems(self) -> List[str]:
        """Everything wrong with the parameters, one line each (checked before any tensor)."""
        if not registry.is_method(self.name):
            return [f"unknown merge method {self.name!r}: choose one of "
                    f"{', '.join(registry.names())}"]
        problems = [f"{self.name}: {label} must be between 0 and 1 (got {value})"
                    for label, value in (("domain density", self.domain_density),
                                         ("aligned density", self.align_density))
                    if not 0.0 <= value <= 1.0]
        if self.rescale is not None and self.rescale not in RESCALES:
            problems.append(f"{self.name}: rescale {self.rescale!r}: choose one of "
                            f"{', '.join(RESCALES)}")
        problems += [f"{self.name}: {label} must be between 0 and 1 (got {value})"
                     for label, value in (("gamma", self.gamma), ("select_topk", self.select_topk))
                     if not 0.0 <= value <= 1.0]
        if self.epsilon is not None and not (is_fp32_finite(self.epsilon) and self.epsilon >= 0):
            problems.append(f"{self.name}: epsilon must be a finite number of at least 0 (got "
                            f"{self.epsilon!r})")
        problems += [f"{self.name}: {label} must be finite, within float32's range (got "
                     f"{value!r})" for label, value in (
                         ("lambda", self.lambda_), ("t", self.t), ("base weight", self.base_weight),
                         ("r", self.r), ("alpha", self.alpha)) if not is_fp32_finite(value)]
        return problems + self._unused_parameter_problems() + self._count_problems()

    def _count_problems(self) -> List[str]:
        problems = []
        if not _is_count(self.max_iter):
            problems.append(f"{self.name}: max_iter must be a whole number of at least 0 (got "
                            f"{self.max_iter!r})")
        if not (is_fp32_finite(self.tol) and self.tol > 0):
            problems.append(f"{self.name}: tol must be a positive number (got {self.tol!r})")
        if not _is_count(self.seed):
            problems.append(f"{self.name}: seed must be a non-negative integer (got {self.seed})")
        modes = self.spec.vector_modes
        if self.vectors not in modes:
            problems.append(f"{self.name}: vectors {self.vectors!r}: it takes "
                            f"{', '.join(modes)}")
        return problems


def _is_count(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def is_fused_formula(spec: MethodSpec, lambda_: float, normalize: Optional[bool]) -> bool:
    """The MergeAlign formula itself (base + w_d τ_d + w_a τ_a), which every backend (GPU
    included) runs without a recipe."""
    return spec.fused_formula and lambda_ == 1.0 and not normalize


def base_weighing() -> List[str]:
    """The methods in which the base has a weight of its own."""
    return [s.name for s in registry.specs() if s.contract.weighs_base]


def set_method(name: str, shared: Optional[Dict[str, object]],
               per_model: Dict[str, Dict[str, object]]) -> Method:
    """A Method for a base and a set of models from mergekit-style parameters: `shared` (the
    top level: lambda, normalize, rescale, seed, and weight/density for every model) and
    per role ("model 1", ..., "base") its own weight/density.  A value is a number, a list (a
    layer gradient) or mergekit's filter rules ([{"filter": "mlp", "value": 0.2}, {"value":
    0.5}]).  ValueError names a parameter the method does not take."""
    accepted = registry.get(name).parameters
    rules = []
    for role, parameters in [(r, p) for r, p in per_model.items()] + [(None, shared or {})]:
        for key, value in parameters.items():
            if key not in accepted:
                raise ValueError(f"{name}: parameter {key!r} does not apply (it takes: "
                                 f"{', '.join(accepted)})")
            rules.append(Rule(key, role, setting_of(key, value)))
    return Method(name, rules=tuple(rules))


def setting_of(key: str, value) -> Setting:
    """A parameter value as given in Python (a value, a list: a gradient, or filter rules) as
    the immutable Setting; ValueError naming the parameter for a value of the wrong type."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if any("value" not in v or set(v) - {"filter", "value"} for v in value):
            raise ValueError(f"parameter {key!r}: a filter rule takes `value` and an optional "
                             f"`filter` (got {value!r})")
        return tuple((v.get("filter"), setting_of(key, v["value"])) for v in value)
    kind = PARAMETERS[key].kind
    if isinstance(value, list) and value and kind == "number":
        return tuple(setting_of(key, v) for v in value)
    if kind == "number" and is_fp32_finite(value) or kind == "bool" and isinstance(value, bool) \
            or kind == "rescale" and value in RESCALES or kind == "count" and _is_count(value):
        return value
    wanted = {"bool": "true or false", "rescale": f"one of {', '.join(RESCALES)}",
              "count": "a non-negative integer"}.get(kind, "a finite number or a list of them")
    raise ValueError(f"parameter {key!r}: {value!r} is not {wanted}")
