"""Merge methods: what each one computes, and how it becomes a native Recipe per tensor.

Every method runs through the same streaming engine and fused kernel.  A method is a Method
(its name and parameters, optionally varying per tensor like mergekit's filters and layer
gradients); for each tensor, `tensor_recipe` resolves the parameters, runs the reductions the
method needs over the tensor (fp64, in the native kernel) and returns the per-element Recipe of
csrc/merge_operands.h.  Element values follow the formulas below; mergekit 0.1.5 is the
reference for the semantics of the methods it has.

    task_arithmetic  base + λ·(w_d τ_d + w_a τ_a)                   (MergeAlign; λ = 1 default)
    linear           (w_b base + w_d domain + w_a aligned) / Σw     (normalize: default true)
    ties             magnitude trim of each τ to its density, sign election by the sum of the
                     weighted terms, disjoint mean (divide by the weights that agree)
    dare_linear      random drop of each τ to its density, rescale, weighted sum
    dare_ties        random drop, rescale, sign election, weighted sum
    slerp            slerp(aligned, domain, t)           per tensor, mergekit's formula
    slerp_vectors    base + slerp(τ_a, τ_d, t)
    resta            domain + β·τ_a, β = w_a; optional DARE on τ_d (its density)
    chipalign        ‖aligned‖^(1-t)·‖domain‖^t · slerp(aligned/‖aligned‖, domain/‖domain‖, t)
    nuslerp          base + slerp(τ_a, τ_d, t), t = w_d / (w_d + w_a)  (mergekit's nuslerp with
                     a base_model; its own epsilons; whole tensors, rows or columns)
    nuslerp_models   slerp(aligned, domain, t), t as nuslerp   (mergekit's nuslerp without one)
    model_stock      (1 - t)·base + t·mean(models), t = n·c / (1 + (n - 1)·c) from the mean
                     cosine c of the task vectors' pairs (Model Stock; mergekit's; whole
                     tensors, or rows for two models)
    breadcrumbs      drop each τ's largest γ·n and its smallest magnitudes, keeping int(density·n)
                     (Model Breadcrumbs), weighted sum; breadcrumbs_ties with TIES' election
    multislerp       base + ‖x‖_w · normalize(Σ w_m x_m/‖x_m‖), x_m = τ_m, weights normalized
                     (mergekit's Multi-SLERP: the weighted mean of the unit task vectors,
                     projected back to the sphere, at the weighted mean norm; per tensor);
                     multislerp_models the same over the models themselves (no base_model)
    karcher          ‖x‖_α · the weighted Karcher (Riemannian) mean of the unit models on the
                     sphere, α = the weights of base, domain and aligned (--base-weight, the two
                     weights; a mergekit config: 1/n for each model it lists, base_model too);
                     mergekit's iteration (max_iter 10 steps, tol 1e-5), per tensor
    nearswap         w·domain + (1 - w)·base, w = clamp(t / |domain - base|, 0, 1) per element:
                     the domain model's value where the two are within t, else a step of t
                     toward it (mergekit's NearSwap; aligned is not used)
    sce              select by variance across the models, weights from the kept τ², sign
                     erase (sce.py; any number of models)
    della            DARE whose keep probability grows with |τ|'s rank in its row, from
                     density - ε to density + ε, rescale, TIES' election; della_linear without
                     the election (della.py; any number of models)
    ram              base + the mean of the τ_m with |τ_m| > ε per element (Reinforced Agent
                     Merging); ramplus_tl scales a model's unshared elements by 1 + r·min(ρ, α)
                     (ram.py; any number of models)
    arcee_fusion     base + τ where |τ|·KL(softmax(model row) ‖ softmax(base row)) reaches
                     median + 1.5·IQR of that importance over the tensor (fusion.py; one model)

τ_d = domain - base and τ_a = aligned - base.  Every t is how far toward the domain expert
(t = 0: aligned, t = 1: domain), so a λ sweep sets t = λ = w_d for every method.

The magnitude threshold is the k-th largest |τ| (k = max(1, int(density·n)), mergekit's count),
found by a two-pass 16-bit radix selection in the native kernel instead of a sort.  Exactly k
elements are kept: of the elements tied with the threshold (common in bf16 models), the first
in index order (mergekit keeps an arbitrary subset of them: torch's argsort is not stable).
DARE's mask is a counter-based draw keyed by (seed, tensor name, model, element index): the
same seed gives the same model on any thread count or chunking.  Rescale "l1" (mergekit's
default) scales the kept elements so the tensor's L1 norm is unchanged; "inverse_density" is
the DARE paper's 1/p; "none" keeps them as they are.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..errors import MergeError
from ..io.checkpoint import layer_index

# RecipeKind, Sparsify (csrc/merge_operands.h)
TASK_ARITHMETIC, VECTORS, MODELS, NEAR_SWAP = 0, 1, 2, 3
KEEP_ALL, KEEP_LARGEST, KEEP_RANDOM, KEEP_BAND = 0, 1, 2, 3
# kKeepLargest threshold no |τ| reaches: |τ|'s bits are at most 0x7fffffff (a NaN).
KEEP_NONE_BITS = 0x80000000
# last_tie_index that keeps every tie (INT64_MAX), and tie bits no |τ| has (skips a model).
ALL_TIES = 2**63 - 1
NO_TIE_BITS = 0xFFFFFFFF
# Draws are 24-bit: keep_below = density · 2^24.
DRAW_RANGE = 1 << 24
# mergekit: norms below this leave a tensor unrescaled (rescaled_masked_tensor's eps) ...
RESCALE_EPS = 1e-7
# ... a summed weight below this is not divided by (generalized task arithmetic) ...
DIVISOR_EPS = 1e-8
# ... and SLERP treats norms below this as 1 and |cos| above this as collinear (linear blend).
SLERP_NORM_EPS = 1e-8
SLERP_DOT_THRESHOLD = 0.9995
# nuslerp's own: norms clamped up to this, collinear when 1 - cos² <= NUSLERP_EPS², and t = 1/2
# when the two weights sum to less than NUSLERP_WEIGHT_EPS in magnitude.
NUSLERP_NORM_EPS = 1e-7
NUSLERP_EPS = 1e-8
NUSLERP_WEIGHT_EPS = 1e-6
# Model Stock: norm products clamped up to this; a denominator below it keeps the base.
MODEL_STOCK_EPS = 1e-6
# NearSwap's floor on |domain - base| (csrc/merge_operands.h kNearSwapEps; mergekit's).
NEAR_SWAP_EPS = 1e-6
# Multi-SLERP: added to each norm before dividing by it, and the least norm of the weighted
# mean of the unit vectors (mergekit's eps).
MULTISLERP_EPS = 1e-8
# Karcher mean: mergekit's defaults (max_iter, tol): at most this many steps, stopping when the
# tangent step is shorter than the tolerance; norms at most the tolerance leave a model out.
KARCHER_STEPS = 10
KARCHER_TOL = 1e-5

RESCALES = ("l1", "inverse_density", "none")


@dataclass(frozen=True)
class MethodInfo:
    """What a method accepts and its defaults (mergekit's, where mergekit has the method)."""

    parameters: Tuple[str, ...]
    normalize: bool = False
    rescale: str = "none"
    sparsify: int = KEEP_ALL
    sign_election: bool = False
    epsilon: float = 0.0  # della: the keep probability's half range; ram: the |τ| that counts


_VECTOR_PARAMS = ("weight", "density", "lambda", "normalize", "rescale")
METHODS: Dict[str, MethodInfo] = {
    "task_arithmetic": MethodInfo(("weight", "lambda", "normalize")),
    "linear": MethodInfo(("weight", "normalize"), normalize=True),
    "ties": MethodInfo(_VECTOR_PARAMS, normalize=True, sparsify=KEEP_LARGEST,
                       sign_election=True),
    "dare_linear": MethodInfo(_VECTOR_PARAMS + ("seed",), rescale="l1", sparsify=KEEP_RANDOM),
    "dare_ties": MethodInfo(_VECTOR_PARAMS + ("seed",), rescale="l1", sparsify=KEEP_RANDOM,
                            sign_election=True),
    "slerp": MethodInfo(("t",)),
    "slerp_vectors": MethodInfo(("t",)),
    "resta": MethodInfo(("weight", "density", "rescale", "seed"), rescale="inverse_density",
                        sparsify=KEEP_RANDOM),
    "chipalign": MethodInfo(("t",)),
    "nuslerp": MethodInfo(("weight",)),
    "nuslerp_models": MethodInfo(("weight",)),
    "model_stock": MethodInfo(()),
    "breadcrumbs": MethodInfo(_VECTOR_PARAMS + ("gamma",), sparsify=KEEP_BAND),
    "breadcrumbs_ties": MethodInfo(_VECTOR_PARAMS + ("gamma",), sparsify=KEEP_BAND,
                                   sign_election=True),
    "nearswap": MethodInfo(("t",)),
    "multislerp": MethodInfo(("weight", "normalize"), normalize=True),
    "multislerp_models": MethodInfo(("weight", "normalize"), normalize=True),
    "karcher": MethodInfo(("weight", "max_iter", "tol")),
    "sce": MethodInfo(("select_topk",)),
    # mergekit's defaults: della normalizes and rescales (l1), ε = 0.15; della_linear rescales.
    "della": MethodInfo(_VECTOR_PARAMS + ("epsilon", "seed"), normalize=True, rescale="l1",
                        sign_election=True, epsilon=0.15),
    "della_linear": MethodInfo(_VECTOR_PARAMS + ("epsilon", "seed"), rescale="l1",
                               epsilon=0.15),
    "ram": MethodInfo(("epsilon",), epsilon=1e-5),
    "ramplus_tl": MethodInfo(("epsilon", "r", "alpha"), epsilon=1e-5),
    "arcee_fusion": MethodInfo(()),
}
# Methods merged window by window in numpy on the CPU path, not by a native recipe: the module
# of each (a module with window_elements and merge_chunks).
NUMPY_METHODS = {"sce": "sce", "della": "della", "della_linear": "della", "ram": "ram",
                 "ramplus_tl": "ram", "arcee_fusion": "fusion"}


def numpy_method(name: str):
    """The module that merges a NUMPY_METHODS method (numpy: imported on first use)."""
    import importlib

    return importlib.import_module(f".windows.{NUMPY_METHODS[name]}", __package__)


# Parameters set per model for these methods only (ram's epsilon is shared, as in mergekit).
PER_MODEL_FOR = {"epsilon": ("della", "della_linear")}
# RAM+'s defaults (mergekit's): r scales the unshared elements by up to r·α.
RAMPLUS_R = 0.1
RAMPLUS_ALPHA = 0.2



# The largest finite float32: the kernels compute in fp32, so a coefficient beyond it would be
# infinite there (a weight of 1e39 made an all-inf model).
FLOAT32_MAX = 3.4028234663852886e38


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


def _is_plain_task_arithmetic(name: str, lambda_: float, normalize: Optional[bool]) -> bool:
    """The MergeAlign formula itself (base + w_d τ_d + w_a τ_a), which every backend (GPU
    included) runs without a recipe."""
    return name == "task_arithmetic" and lambda_ == 1.0 and not normalize


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
    base_weight: float = 0.0  # linear: weight of the base model itself
    gamma: float = 0.01  # breadcrumbs: the fraction of largest magnitudes dropped (mergekit's)
    max_iter: int = KARCHER_STEPS  # karcher: the most iteration steps
    tol: float = KARCHER_TOL       # karcher: the shortest step (and the least norm) that counts
    vectors: str = "tensor"  # one of VECTOR_MODES (PER_VECTOR_METHODS)
    select_topk: float = 1.0  # sce: the fraction of elements its select step keeps
    epsilon: Optional[float] = None  # della, ram: None is the method's default (MethodInfo)
    r: float = RAMPLUS_R          # ramplus_tl: the most an unshared element is scaled up, over α
    alpha: float = RAMPLUS_ALPHA  # ramplus_tl: the cap on ρ (shared / unshared elements)
    rules: Tuple[Rule, ...] = field(default=())

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.name]

    @property
    def is_plain_task_arithmetic(self) -> bool:
        """The MergeAlign formula itself for every tensor (no rule can change a parameter)."""
        return not self.rules and _is_plain_task_arithmetic(self.name, self.lambda_,
                                                            self.normalize)

    def _unused_parameter_problems(self) -> List[str]:
        """A parameter set away from its default that the method does not take is a mistake
        (the command line refuses its flag the same way)."""
        defaults = Method(self.name)
        accepted = self.info.parameters
        problems = [f"{self.name}: {f} does not apply to {self.name} (it takes: "
                    f"{', '.join(accepted) or 'nothing'})"
                    for f, parameter in _FIELD_PARAMETERS.items()
                    if getattr(self, f) != getattr(defaults, f) and parameter not in accepted]
        if self.base_weight != 0.0 and self.name not in ("linear", "karcher"):
            problems.append(f"{self.name}: base_weight applies to linear and karcher only")
        return problems

    def problems(self) -> List[str]:
        """Everything wrong with the parameters, one line each (checked before any tensor)."""
        if self.name not in METHODS:
            return [f"unknown merge method {self.name!r}: choose one of {', '.join(METHODS)}"]
        problems = []
        for label, value in (("domain density", self.domain_density),
                             ("aligned density", self.align_density)):
            if not 0.0 <= value <= 1.0:
                problems.append(f"{self.name}: {label} must be between 0 and 1 (got {value})")
        if self.rescale is not None and self.rescale not in RESCALES:
            problems.append(f"{self.name}: rescale {self.rescale!r}: choose one of "
                            f"{', '.join(RESCALES)}")
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"{self.name}: gamma must be between 0 and 1 (got {self.gamma})")
        if not 0.0 <= self.select_topk <= 1.0:
            problems.append(f"{self.name}: select_topk must be between 0 and 1 (got "
                            f"{self.select_topk})")
        if self.epsilon is not None and not (is_fp32_finite(self.epsilon) and self.epsilon >= 0):
            problems.append(f"{self.name}: epsilon must be a finite number of at least 0 (got "
                            f"{self.epsilon!r})")
        for label, value in (("lambda", self.lambda_), ("t", self.t),
                             ("base weight", self.base_weight), ("r", self.r),
                             ("alpha", self.alpha)):
            if not is_fp32_finite(value):
                problems.append(f"{self.name}: {label} must be finite, within float32's range "
                                f"(got {value!r})")
        problems += self._unused_parameter_problems()
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) \
                or self.max_iter < 0:
            problems.append(f"{self.name}: max_iter must be a whole number of at least 0 (got "
                            f"{self.max_iter!r})")
        if not (is_fp32_finite(self.tol) and self.tol > 0):
            problems.append(f"{self.name}: tol must be a positive number (got {self.tol!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"{self.name}: seed must be a non-negative integer (got {self.seed})")
        modes = PER_VECTOR_METHODS.get(self.name, ("tensor",))
        if self.vectors not in modes:
            problems.append(f"{self.name}: vectors {self.vectors!r}: it takes "
                            f"{', '.join(modes)}")
        return problems


def set_method(name: str, shared: Optional[Dict[str, object]],
               per_model: Dict[str, Dict[str, object]]) -> Method:
    """A Method for a base and a set of models from mergekit-style parameters: `shared` (the
    top level: lambda, normalize, rescale, seed, and weight/density for every model) and
    per role ("model 1", ..., "base") its own weight/density.  A value is a number, a list (a
    layer gradient) or mergekit's filter rules ([{"filter": "mlp", "value": 0.2}, {"value":
    0.5}]).  ValueError names a parameter the method does not take."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}: choose one of {', '.join(METHODS)}")
    accepted = METHODS[name].parameters
    rules = []
    for role, parameters in [(r, p) for r, p in per_model.items()] + [(None, shared or {})]:
        for key, value in parameters.items():
            if key not in accepted:
                raise ValueError(f"{name}: parameter {key!r} does not apply (it takes: "
                                 f"{', '.join(accepted)})")
            rules.append(Rule(key, role, _setting_of(key, value)))
    return Method(name, rules=tuple(rules))


# What each parameter's values must be, as a mergekit config types them.
_NUMERIC = ("weight", "density", "lambda", "t", "gamma", "tol", "select_topk", "epsilon", "r",
            "alpha")


def _setting_of(key: str, value) -> Setting:
    """A parameter value as given in Python (a value, a list: a gradient, or filter rules) as
    the immutable Setting; ValueError naming the parameter for a value of the wrong type."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if any("value" not in v or set(v) - {"filter", "value"} for v in value):
            raise ValueError(f"parameter {key!r}: a filter rule takes `value` and an optional "
                             f"`filter` (got {value!r})")
        return tuple((v.get("filter"), _setting_of(key, v["value"])) for v in value)
    if isinstance(value, list) and value and key in _NUMERIC:
        return tuple(_setting_of(key, v) for v in value)
    if key in _NUMERIC and is_fp32_finite(value) or key == "normalize" and isinstance(value, bool) \
            or key == "rescale" and value in RESCALES \
            or key in ("seed", "max_iter") and isinstance(value, int) \
            and not isinstance(value, bool) and value >= 0:
        return value
    wanted = {"normalize": "true or false", "rescale": f"one of {', '.join(RESCALES)}",
              "seed": "a non-negative integer", "max_iter": "a non-negative integer"}.get(
        key, "a finite number or a list of them")
    raise ValueError(f"parameter {key!r}: {value!r} is not {wanted}")


# Method field -> the parameter it sets (MethodInfo.parameters names what a method takes).
_FIELD_PARAMETERS = {"domain_density": "density", "align_density": "density",
                     "lambda_": "lambda", "normalize": "normalize", "rescale": "rescale",
                     "seed": "seed", "t": "t", "gamma": "gamma", "max_iter": "max_iter",
                     "tol": "tol", "select_topk": "select_topk", "epsilon": "epsilon",
                     "r": "r", "alpha": "alpha"}


# What a method treats as one vector (per_vector.py): the whole tensor (mergekit's default),
# each row (the last dimension: nuslerp_flatten false, Model Stock's filter_wise), or each
# column (the first dimension: nuslerp_flatten false with nuslerp_row_wise).
VECTOR_MODES = ("tensor", "rows", "columns")
# The methods that take another than the whole tensor, and which.
PER_VECTOR_METHODS = {"nuslerp": VECTOR_MODES, "nuslerp_models": VECTOR_MODES,
                      "model_stock": ("tensor", "rows")}

# The trio's model roles, in the order of the native operands (base first, then these).
TRIO_MODELS = ("domain", "aligned")
# The methods defined for any number of models; the others take exactly two (the trio).
SET_METHODS = ("task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "model_stock",
               "breadcrumbs", "breadcrumbs_ties", "multislerp", "karcher", "sce", "della",
               "della_linear", "ram", "ramplus_tl")


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
    def is_plain_task_arithmetic(self) -> bool:
        return self.roles == TRIO_MODELS and _is_plain_task_arithmetic(self.name, self.lambda_,
                                                                       self.normalize)

    def by_vectors(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this shape is merged vector by vector (per_vector.py); a 1-D
        tensor is one vector, merged whole."""
        return self.name in PER_VECTOR_METHODS and self.vectors != "tensor" and len(shape) >= 2


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

    info = method.info
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
        normalize=bool(value("normalize", None, info.normalize if method.normalize is None
                             else method.normalize)),
        rescale=str(value("rescale", None, method.rescale or info.rescale)),
        seed=int(value("seed", None, method.seed)),
        t=float(value("t", None, method.t)),
        sparsify=info.sparsify,
        sign_election=info.sign_election,
        max_iter=int(value("max_iter", None, method.max_iter)),
        tol=float(value("tol", None, method.tol)),
        vectors=method.vectors,
        select_topk=float(value("select_topk", None, method.select_topk)),
        epsilons=tuple(float(value("epsilon", r, info.epsilon if method.epsilon is None
                                   else method.epsilon)) for r in roles),
        r=float(value("r", None, method.r)),
        alpha=float(value("alpha", None, method.alpha)),
    )


def settings_problems(s: TensorSettings, where: str) -> List[str]:
    """Values out of range (a rule may push one tensor's); each line starts with `where`."""
    problems = []
    weighted = "weight" in METHODS[s.name].parameters  # SLERP's family ignores the weights
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
    problems += _epsilon_problems(s, where)
    if not s.tol > 0:
        problems.append(f"{where}: tol must be a positive number (got {s.tol})")
    if s.name == "linear" and s.normalize and s.w_base + sum(s.weights) == 0:
        problems.append(f"{where}: the weights sum to 0, so linear cannot normalize them: "
                        "set normalize false (--no-normalize) or change the weights")
    return problems


def _epsilon_problems(s: TensorSettings, where: str) -> List[str]:
    """ε at least 0; for DELLA a probability band density ± ε inside (0, 1) wherever the
    density drops anything (mergekit refuses the merge otherwise), rescaled as mergekit can."""
    problems = [f"{where}: {role} epsilon must be at least 0 (got {e})"
                for role, e in zip(s.roles, s.epsilons) if not e >= 0]
    if s.name in PER_MODEL_FOR["epsilon"]:
        if s.rescale == "inverse_density":
            problems.append(f"{where}: rescale must be l1 or none for {s.name} (got "
                            "inverse_density)")
        problems += [f"{where}: {role} density {d} ± epsilon {e} must stay inside (0, 1)"
                     for role, d, e in zip(s.roles, s.densities, s.epsilons)
                     if 0 < d < 1 and not (d - e > 0 and d + e < 1)]
    return problems


# ---- per-tensor recipes -----------------------------------------------------------------------

def stream_key(seed: int, tensor_name: str, role: str) -> Tuple[int, int]:
    """The (lo, hi) 32-bit key of a model's random stream in one tensor."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def keep_count(density: float, count: int) -> int:
    """Elements a magnitude trim keeps: mergekit's max(1, int(density·n))."""
    return max(1, int(density * count))


def slerp_coefficients(t: float, xx: float, yy: float, xy: float) -> Tuple[float, float]:
    """(c_x, c_y) with slerp(x, y, t) = c_x·x + c_y·y, from Σx², Σy², Σxy (mergekit's formula:
    angle of the normalised vectors, linear blend when nearly collinear)."""
    nx = math.sqrt(xx)
    ny = math.sqrt(yy)
    nx = nx if nx > SLERP_NORM_EPS else 1.0
    ny = ny if ny > SLERP_NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, xy / (nx * ny)))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    return _arc_coefficients(t, dot)


def _arc_coefficients(t: float, cos: float) -> Tuple[float, float]:
    """(c_x, c_y) of the point at t along the great arc from x to y, at angle acos(cos)."""
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def chipalign_coefficients(t: float, dd: float, aa: float, da: float) -> Tuple[float, float]:
    """(c_d, c_a) with ChipAlign = c_d·domain + c_a·aligned: the slerp of the unit tensors
    aligned/‖aligned‖ -> domain/‖domain‖ at t, scaled to ‖aligned‖^(1-t)·‖domain‖^t.  A zero
    tensor has no direction: then it is the linear blend (1-t)·aligned + t·domain."""
    nd, na = math.sqrt(dd), math.sqrt(aa)
    if nd <= SLERP_NORM_EPS or na <= SLERP_NORM_EPS:
        return t, 1.0 - t
    c_a, c_d = slerp_coefficients(t, 1.0, 1.0, da / (nd * na))
    scale = na ** (1.0 - t) * nd ** t
    return scale * c_d / nd, scale * c_a / na


def nuslerp_coefficients(t: float, xx: float, yy: float, xy: float) -> Tuple[float, float]:
    """(c_x, c_y) with nuslerp(x, y, t) = c_x·x + c_y·y from Σx², Σy², Σxy: slerp_coefficients
    with mergekit nuslerp's epsilons (norms clamped, collinear only when 1 - cos² <= eps²)."""
    nx = max(math.sqrt(xx), NUSLERP_NORM_EPS)
    ny = max(math.sqrt(yy), NUSLERP_NORM_EPS)
    cos = min(1.0, max(-1.0, xy / (nx * ny)))
    if 1.0 - cos * cos <= NUSLERP_EPS ** 2:
        return 1.0 - t, t
    return _arc_coefficients(t, cos)


def nuslerp_t(w_domain: float, w_align: float) -> float:
    """nuslerp's t from the two weights: the share of the second model (our domain)."""
    total = w_align + w_domain
    return 0.5 if abs(total) < NUSLERP_WEIGHT_EPS else w_domain / total


def model_stock_t(cosines: Sequence[float], count: int) -> float:
    """Model Stock's interpolation factor from the task vectors' pairwise cosines."""
    cos = sum(cosines) / len(cosines)
    denominator = 1.0 + (count - 1) * cos
    return 0.0 if abs(denominator) < MODEL_STOCK_EPS else count * cos / denominator


def multislerp_coefficients(weights: Sequence[float], gram: Sequence[Sequence[float]],
                            normalize: bool) -> List[float]:
    """c_m with Multi-SLERP = [base +] Σ c_m x_m, from the Gram matrix of the x_m (Σ x_i·x_j).

    mergekit projects the unit vectors onto the tangent space at their normalized weighted mean,
    averages there and maps back; the tangent vectors' weighted sum is zero (each unit vector's
    component along the mean, weighted, sums to the mean's norm), so the result is the mean
    direction at the weighted mean norm — a weighted sum of the x_m.  One model is itself; a
    weighted mean of norm below eps is the weighted sum for two models (mergekit's fallback), an
    error for more."""
    n = len(weights)
    if n == 1:
        return [1.0]
    total = math.fsum(weights)
    w = [x / total for x in weights] if normalize else list(weights)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    a = [w[i] / (norms[i] + MULTISLERP_EPS) for i in range(n)]
    mean_norm = math.sqrt(max(math.fsum(a[i] * a[j] * gram[i][j]
                                        for i in range(n) for j in range(n)), 0.0))
    if mean_norm < MULTISLERP_EPS:
        if n == 2:
            return w
        raise ValueError("multislerp: the weighted mean of the unit task vectors is zero "
                         "(antipodal models whose weights cancel): change the weights")
    average_norm = math.fsum(w[i] * norms[i] for i in range(n))
    return [a[i] * average_norm / mean_norm for i in range(n)]


def karcher_coefficients(gram: Sequence[Sequence[float]], alphas: Sequence[float],
                         max_iter: int = KARCHER_STEPS, tol: float = KARCHER_TOL) -> List[float]:
    """c with the Karcher mean = Σ c_m x_m, from the Gram matrix of the models x_m: mergekit's
    iteration (weighted mean of the unit vectors, then exponential-map steps along the
    weighted sum of the log maps), run on coefficient vectors — every iterate is a combination
    of the unit vectors, so x·y = c_x·G·c_y — in float64."""
    n = len(alphas)
    g = [[float(v) for v in row] for row in gram]

    def dot(p, q):
        return math.fsum(p[i] * g[i][j] * q[j] for i in range(n) for j in range(n))

    def axpy(a, p, q):  # a·p + q
        return [a * x + y for x, y in zip(p, q)]

    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    total = math.fsum(alphas[i] for i in valid)
    share = {i: alphas[i] / total for i in valid}
    units = {i: [1.0 / norms[i] if k == i else 0.0 for k in range(n)] for i in valid}
    mean = [0.0] * n
    for i in valid:
        mean = axpy(share[i], units[i], mean)
    length = math.sqrt(max(dot(mean, mean), 0.0))
    mean = list(units[valid[0]]) if length < tol else [x / length for x in mean]
    for _ in range(max_iter):
        tangent = [0.0] * n
        for i in valid:
            cos = min(1.0, max(-1.0, dot(mean, units[i])))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent = axpy(share[i] * theta / math.sin(theta), axpy(-cos, mean, units[i]),
                           tangent)
        step = math.sqrt(max(dot(tangent, tangent), 0.0))
        if step < tol:
            break
        mean = axpy(math.cos(step), mean, [math.sin(step) / step * x for x in tangent])
        length = math.sqrt(max(dot(mean, mean), 0.0))
        if length > tol:
            mean = [x / length for x in mean]
    scale = math.fsum(a * r for a, r in zip(alphas, norms))
    return [scale * x for x in mean]


def pair_cosine(xx: float, yy: float, xy: float) -> float:
    """cos of two task vectors from Σx², Σy², Σxy, Model Stock's clamp of the norm product."""
    return min(1.0, max(-1.0, xy / max(math.sqrt(xx) * math.sqrt(yy), MODEL_STOCK_EPS)))


class TensorPasses:
    """Reductions over one tensor's three inputs, for the recipes that need them.

    `windows()` yields the tensor in windows, each a pair (native Operands, release callback);
    each result is computed once and cached, so the recipes of a sweep share the passes."""

    def __init__(self, native, windows, threads: int):
        self.native = native
        self.windows = windows
        self.threads = threads
        self._cache: Dict[tuple, object] = {}

    def _each(self, call) -> None:
        for ops, release in self.windows():
            call(ops)
            release()

    def _summed(self, size: int, call) -> List[float]:
        """Element-wise sums over the windows of the `size`-tuples call(ops) returns for each
        (zeros for a tensor without elements, which has no windows)."""
        sums = [0.0] * size

        def add(ops):
            for i, value in enumerate(call(ops)):
                sums[i] += value

        self._each(add)
        return sums

    def _stats(self, models: bool) -> List[float]:
        """The native vector_stats summed over the windows (models: of the models)."""
        key = ("stats", models)
        if key not in self._cache:
            self._cache[key] = self._summed(11, lambda ops: self.native.vector_stats(
                ops, self.threads, models))
        return self._cache[key]

    def vector_stats(self, models: bool) -> Tuple[float, ...]:
        """(Στ_d², Στ_a², Στ_d·τ_a) of the task vectors, or with models=True
        (Σdomain², Σaligned², Σdomain·aligned) of the models themselves; fp64."""
        sums = self._stats(models)
        return tuple(sums[5:8] if models else sums[0:3])

    def model_gram(self) -> List[List[float]]:
        """Σ x·y of every pair of the models base, domain, aligned (in that order); fp64."""
        dd, aa, da, bb, bd, ba = self._stats(models=True)[5:11]
        return [[bb, bd, ba], [bd, dd, da], [ba, da, aa]]

    def magnitude_thresholds(self, k_domain: Optional[int],
                             k_align: Optional[int]) -> Tuple[Tuple[int, int], ...]:
        """Per model, (fp32 bits of the k-th largest |τ|, index of the last tie to keep): the
        elements above the threshold plus the first ties in index order make exactly k.
        (0, ALL_TIES) where not needed or the tensor has fewer than k elements."""
        key = ("threshold", k_domain, k_align)
        if key not in self._cache:
            ks = (k_domain, k_align)
            # magnitude_histogram's prefixes: the top 16 bits of |τ|, then the low 16 bits of
            # the elements in the selected top bin; SKIP leaves a model out.
            high_bits, skip = self.native.HISTOGRAM_HIGH_BITS, self.native.HISTOGRAM_SKIP
            high = self._histogram([high_bits if k else skip for k in ks])
            picks = [self.native.select_kth_largest(high, m, k) if k else (-1, 0)
                     for m, k in enumerate(ks)]
            low = self._histogram([bin_ if bin_ >= 0 else skip for bin_, _ in picks])
            found = [(0, ALL_TIES), (0, ALL_TIES)]
            ties_wanted = [0, 0]
            for m, (k, (bin_, above)) in enumerate(zip(ks, picks)):
                if not k or bin_ < 0:  # not needed, or fewer than k elements: keep all
                    continue
                low_bin, above_low = self.native.select_kth_largest(low, m, k - above)
                tied = self._bin_count(low, m, low_bin)
                found[m] = ((bin_ << 16) | low_bin, ALL_TIES)
                wanted = k - above - above_low
                ties_wanted[m] = wanted if wanted < tied else 0
            self._cache[key] = self._last_ties(found, ties_wanted)
        return self._cache[key]

    def thresholds(self, wanted: Sequence[Optional[int]]) -> Tuple[Tuple[int, int], ...]:
        """magnitude_thresholds of each model's wanted count (None: not needed)."""
        return self.magnitude_thresholds(*wanted)

    def l1(self, terms) -> List[Tuple[float, float]]:
        """Per model, (‖τ‖₁, ‖kept τ‖₁) under its term's mask."""
        recipe = self.native.Recipe()
        recipe.domain, recipe.align = terms
        norms = self.l1_norms(recipe)
        return [(norms[0], norms[1]), (norms[2], norms[3])]

    def _last_ties(self, found, wanted) -> Tuple[Tuple[int, int], ...]:
        """`found` with the index of the wanted[m]-th tie (index order) where wanted[m] > 0."""
        found = list(found)
        bits = [b if w else NO_TIE_BITS for (b, _), w in zip(found, wanted)]
        remaining = list(wanted)
        for ops, release in self.windows():
            if not any(remaining):
                break
            counts = self.native.count_magnitude_ties(ops, bits[0], bits[1], self.threads)
            for m in (0, 1):
                if remaining[m] and counts[m] >= remaining[m]:
                    index = self.native.nth_magnitude_tie(ops, m, bits[m], remaining[m])
                    found[m] = (found[m][0], index)
                    remaining[m] = 0
                elif remaining[m]:
                    remaining[m] -= counts[m]
            release()
        return tuple(found)

    def _histogram(self, prefixes) -> bytearray:
        """int64[2][HISTOGRAM_BINS] counts of |τ|'s bits (see magnitude_histogram)."""
        hist = bytearray(2 * self.native.HISTOGRAM_BINS * 8)
        if all(p == self.native.HISTOGRAM_SKIP for p in prefixes):
            return hist
        self._each(lambda ops: self.native.magnitude_histogram(ops, prefixes[0], prefixes[1],
                                                               hist, self.threads))
        return hist

    def _bin_count(self, hist: bytearray, row: int, bin_: int) -> int:
        start = (row * self.native.HISTOGRAM_BINS + bin_) * 8
        return int.from_bytes(hist[start:start + 8], "little")

    def l1_norms(self, recipe) -> Tuple[float, float, float, float]:
        """(‖τ_d‖₁, ‖kept τ_d‖₁, ‖τ_a‖₁, ‖kept τ_a‖₁) under the recipe's masks."""
        key = ("l1",) + tuple(_term_key(t) for t in (recipe.domain, recipe.align))
        if key not in self._cache:
            self._cache[key] = tuple(self._summed(
                4, lambda ops: self.native.sparsity_stats(ops, recipe, self.threads)))
        return self._cache[key]


class SetPasses:
    """The reductions of a base and any number of models, through the trio's passes: models
    2p and 2p+1 are the domain and aligned of pair p's TensorPasses (an odd last model is
    paired with itself).  `pair_windows(i, j)` yields the windows of base, model i, model j."""

    def __init__(self, native, pair_windows, model_count: int, threads: int):
        self.model_count = model_count
        self.native, self.pair_windows, self.threads = native, pair_windows, threads
        self.pairs = [TensorPasses(native, lambda i=i: pair_windows(i, min(i + 1,
                                                                          model_count - 1)),
                                   threads) for i in range(0, model_count, 2)]

    def _of_pair(self, i: int, j: int) -> TensorPasses:
        return TensorPasses(self.native, lambda: self.pair_windows(i, j), self.threads)

    def gram(self) -> List[List[float]]:
        """Σ τ_i·τ_j of every pair of task vectors (fp64), one pass per pair."""
        n = self.model_count
        found = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                found[i][i], found[j][j], found[i][j] = \
                    self._of_pair(i, j).vector_stats(models=False)
                found[j][i] = found[i][j]
        return found

    def model_gram(self) -> List[List[float]]:
        """Σ x·y of every pair of the base and the models, base first (fp64), one pass per pair
        of models (each gives the base's products too)."""
        n = self.model_count
        found = [[0.0] * (n + 1) for _ in range(n + 1)]
        for i in range(n):
            for j in range(i + 1, n):
                pair = self._of_pair(i, j).model_gram()  # base, model i, model j
                at = (0, i + 1, j + 1)
                for row, p in enumerate(at):
                    for column, q in enumerate(at):
                        found[p][q] = pair[row][column]
        return found

    def cosines(self) -> List[float]:
        """The cosine of every pair of task vectors (Model Stock)."""
        g = self.gram()
        return [pair_cosine(g[i][i], g[j][j], g[i][j]) for i in range(self.model_count)
                for j in range(i + 1, self.model_count)]

    @staticmethod
    def _by_pair(values: Sequence, pad) -> List[Tuple]:
        """values two by two; an odd last one paired with `pad` (what the self-pair's second
        model asks for)."""
        padded = list(values) + [pad] * (len(values) % 2)
        return [tuple(padded[i:i + 2]) for i in range(0, len(padded), 2)]

    def thresholds(self, wanted: Sequence[Optional[int]]) -> Tuple[Tuple[int, int], ...]:
        found = [t for passes, pair in zip(self.pairs, self._by_pair(wanted, None))
                 for t in passes.thresholds(pair)]
        return tuple(found[:self.model_count])

    def l1(self, terms) -> List[Tuple[float, float]]:
        found = [n for passes, pair in zip(self.pairs, self._by_pair(terms, terms[-1]))
                 for n in passes.l1(pair)]
        return found[:self.model_count]


def _term_key(term) -> tuple:
    return (term.sparsify, term.min_magnitude_bits, term.last_tie_index,
            term.drop_magnitude_bits, term.drop_last_tie_index, term.keep_below, term.key_lo,
            term.key_hi)


def tensor_recipe(native, s: TensorSettings, tensor_name: str, count: int, passes: TensorPasses):
    """The native Recipe of one tensor under resolved settings (runs the passes it needs)."""
    recipe = native.Recipe()
    if s.is_plain_task_arithmetic:
        return _weights_recipe(recipe, TASK_ARITHMETIC, s.w_domain, s.w_align)
    if s.name == "linear":
        recipe = _weights_recipe(recipe, MODELS, s.w_domain, s.w_align)
        return _linear_divisor(recipe, s)
    if s.name in GEODESIC:
        return _geodesic_recipe(recipe, s, passes)
    if s.name == "model_stock":
        t = model_stock_t([pair_cosine(*passes.vector_stats(models=False))], 2)
        return _stock_recipe(recipe, [recipe.domain, recipe.align], t)
    if s.name == "nearswap":
        recipe.kind = NEAR_SWAP
        recipe.swap_t = s.t
        return recipe
    if s.name == "karcher":
        c_b, c_d, c_a = _karcher(s, passes.model_gram())
        recipe = _weights_recipe(recipe, MODELS, c_d, c_a)
        recipe.base_weight = c_b
        return recipe
    if s.name in ("multislerp", "multislerp_models"):
        on_models = s.name == "multislerp_models"
        dd, aa, da = passes.vector_stats(models=on_models)
        c_d, c_a = _multislerp(s, tensor_name, [[dd, da], [da, aa]])
        return _weights_recipe(recipe, MODELS if on_models else TASK_ARITHMETIC, c_d, c_a)
    return _vectors_recipe(recipe, [recipe.domain, recipe.align], s, tensor_name, count, passes)


def set_recipe(native, s: TensorSettings, tensor_name: str, count: int, passes: SetPasses):
    """The native SetRecipe of one tensor of a base and a set of models (SET_METHODS): plain
    task arithmetic is mergekit's base + λ·Σ w_m τ_m (sum first, then added to the base)."""
    recipe = native.SetRecipe()
    terms = [recipe.term(m) for m in range(len(s.roles))]
    if s.name == "model_stock":
        return _stock_recipe(recipe, terms, model_stock_t(passes.cosines(), len(terms)))
    if s.name == "multislerp":  # base + Σ c_m τ_m: plain task arithmetic's recipe
        recipe.kind = VECTORS
        for term, c in zip(terms, _multislerp(s, tensor_name, passes.gram())):
            term.weight = c
        return recipe
    if s.name == "linear":
        recipe.kind = MODELS
        for term, weight in zip(terms, s.weights):
            term.weight = weight
        return _linear_divisor(recipe, s)
    if s.name == "karcher":  # c_b·base + Σ c_m·x_m
        recipe.kind = MODELS
        recipe.base_weight, *coefficients = _karcher(s, passes.model_gram())
        for term, c in zip(terms, coefficients):
            term.weight = c
        return recipe
    return _vectors_recipe(recipe, terms, s, tensor_name, count, passes)


def _karcher(s: TensorSettings, gram) -> List[float]:
    """Karcher's coefficients of the base and each model, from their Gram matrix."""
    return karcher_coefficients(gram, (s.w_base, *s.weights), s.max_iter, s.tol)


def _multislerp(s: TensorSettings, tensor_name: str, gram) -> List[float]:
    try:
        return multislerp_coefficients(s.weights, gram, s.normalize)
    except ValueError as exc:
        raise MergeError(f"tensor {tensor_name}: {exc}") from None


def _stock_recipe(recipe, terms, t: float):
    """(1 - t)·base + t·mean(models) as a weighted sum of the models."""
    recipe.kind = MODELS
    recipe.base_weight = 1.0 - t
    for term in terms:
        term.weight = t / len(terms)
    return recipe


def _linear_divisor(recipe, s: TensorSettings):
    recipe.base_weight = s.w_base
    recipe.divisor = s.w_base + sum(s.weights) if s.normalize else 1.0
    return recipe


def _weights_recipe(recipe, kind: int, w_domain: float, w_align: float):
    recipe.kind = kind
    recipe.domain.weight = w_domain
    recipe.align.weight = w_align
    return recipe


# Methods whose recipe is a weighted sum with coefficients from the tensor's norms and dots.
GEODESIC = ("slerp", "slerp_vectors", "chipalign", "nuslerp", "nuslerp_models")


def _geodesic_recipe(recipe, s: TensorSettings, passes: TensorPasses):
    if s.name in ("slerp_vectors", "nuslerp"):  # base + c_d·τ_d + c_a·τ_a
        dd, aa, da = passes.vector_stats(models=False)
        if s.name == "nuslerp":
            c_a, c_d = nuslerp_coefficients(nuslerp_t(s.w_domain, s.w_align), aa, dd, da)
        else:
            c_a, c_d = slerp_coefficients(s.t, aa, dd, da)
        return _weights_recipe(recipe, TASK_ARITHMETIC, c_d, c_a)
    dd, aa, da = passes.vector_stats(models=True)
    if s.name == "slerp":
        c_a, c_d = slerp_coefficients(s.t, aa, dd, da)
    elif s.name == "nuslerp_models":
        c_a, c_d = nuslerp_coefficients(nuslerp_t(s.w_domain, s.w_align), aa, dd, da)
    else:
        c_d, c_a = chipalign_coefficients(s.t, dd, aa, da)
    return _weights_recipe(recipe, MODELS, c_d, c_a)


def _vectors_recipe(recipe, terms, s: TensorSettings, tensor_name: str, count: int, passes):
    """TIES / DARE / RESTA / task arithmetic over the models' terms (a Recipe's domain and
    align, or a SetRecipe's terms); `passes` gives thresholds(wanted) and l1(terms)."""
    recipe.kind = VECTORS
    recipe.sign_election = int(s.sign_election)
    recipe.normalize = int(s.normalize)
    recipe.lambda_ = s.lambda_
    weights, densities = list(s.weights), list(s.densities)
    if s.name == "resta":  # RESTA keeps the whole expert and its alignment vector
        weights[0], densities[1] = 1.0, 1.0
    for term, weight in zip(terms, weights):
        term.weight = weight
    total = 0.0
    for weight in weights:
        total += weight
    recipe.divisor = total if abs(total) >= DIVISOR_EPS else 1.0
    if s.sparsify == KEEP_LARGEST:
        wanted = [keep_count(d, count) if 0.0 < d < 1.0 else None for d in densities]
        for term, density, threshold in zip(terms, densities, passes.thresholds(wanted)):
            _trim(term, density, threshold)
    elif s.sparsify == KEEP_RANDOM:
        for term, density, role in zip(terms, densities, s.roles):
            _drop(term, density, stream_key(s.seed, tensor_name, role))
    elif s.sparsify == KEEP_BAND:
        _bands(terms, densities, s.gammas, count, passes)
    _rescale(terms, densities, s.rescale, passes)
    return recipe


def _trim(term, density: float, threshold: Tuple[int, int]) -> None:
    if density >= 1.0:
        return
    term.sparsify = KEEP_LARGEST
    term.min_magnitude_bits, term.last_tie_index = threshold if density > 0.0 \
        else (KEEP_NONE_BITS, ALL_TIES)


def band_counts(density: float, gamma: float, count: int) -> Tuple[int, int]:
    """(k_keep, k_drop) of Model Breadcrumbs as mergekit counts them: of the elements ordered by
    |τ|, the largest k_keep are kept less the largest k_drop: int(density·n) kept, the γ·n
    largest dropped unless fewer would be left than that."""
    kept = int(density * count)
    below = max(0, count - kept - int(gamma * count))
    return count - below, count - below - kept


def _bands(terms, densities, gammas, count: int, passes) -> None:
    counts = [band_counts(d, g, count) if d < 1.0 else None for d, g in zip(densities, gammas)]
    keep = passes.thresholds([c[0] if c and c[0] > 0 else None for c in counts])
    drop = passes.thresholds([c[1] if c and c[1] > 0 else None for c in counts])
    for term, band, kept, dropped in zip(terms, counts, keep, drop):
        if band is None:
            continue
        if band[0] == band[1]:  # nothing in the band
            term.sparsify, term.min_magnitude_bits = KEEP_LARGEST, KEEP_NONE_BITS
            continue
        term.sparsify = KEEP_BAND
        term.min_magnitude_bits, term.last_tie_index = kept
        if band[1] > 0:
            term.drop_magnitude_bits, term.drop_last_tie_index = dropped


def _drop(term, density: float, key: Tuple[int, int]) -> None:
    if density >= 1.0:
        return
    term.sparsify = KEEP_RANDOM
    term.keep_below = int(round(density * DRAW_RANGE))
    term.key_lo, term.key_hi = key


def _rescale(terms, densities, rescale: str, passes) -> None:
    active = [t.sparsify != KEEP_ALL for t in terms]
    if rescale == "none" or not any(active):
        return
    if rescale == "inverse_density":
        for term, density, on in zip(terms, densities, active):
            if on and density > 0.0:
                term.scale = 1.0 / density
        return
    for term, on, (before, after) in zip(terms, active, passes.l1(terms)):
        if on and before >= RESCALE_EPS and after >= RESCALE_EPS:
            term.scale = before / after
