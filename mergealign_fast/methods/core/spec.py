"""What a merge method is: a `MethodSpec`, the one record every consumer reads.

A method module (mergealign_fast/methods/<name>.py) builds one or more specs and lists them in
its `METHODS`; the registry (methods/__init__.py) finds them.  A spec says which parameters the
method takes and its defaults, its input contract (a base, how many models), how it is merged
(its route: the fused formula, a native recipe per tensor, vector by vector, or numpy windows),
its float64 oracle, its names and conventions in mergekit configs and in mergekit itself (with
mergekit's own arithmetic of it, for --compute-dtype mergekit), and the row of the method table
in docs/methods.md.  Nothing outside a method's own module tests a
method's name: consumers ask the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

# RecipeKind and Sparsify of csrc/merge_operands.h.
TASK_ARITHMETIC, VECTORS, MODELS, NEAR_SWAP = 0, 1, 2, 3
# The trio's model roles, in the order of the native operands (base first, then these), and
# the roles of a model set: base, then "model 1", "model 2", ... in the order given.
TRIO_MODELS = ("domain", "aligned")
SET_ROLE = "model {}"
KEEP_ALL, KEEP_LARGEST, KEEP_RANDOM, KEEP_BAND = 0, 1, 2, 3

# What a method takes as one vector: the whole tensor (mergekit's default), each row (the last
# dimension: nuslerp_flatten false, Model Stock's filter_wise), or each column (the first
# dimension: nuslerp_flatten false with nuslerp_row_wise).
VECTOR_MODES = ("tensor", "rows", "columns")

# How a tensor of the method is merged (MethodSpec.route).
FUSED = "fused"      # the native recipe kernel, one Recipe per tensor (recipe / set_recipe)
WINDOWS = "windows"  # window by window in numpy on the CPU path (merge_windows)


@dataclass(frozen=True)
class Parameter:
    """One parameter: its kind ("number", "bool", "count": a whole number >= 0, "rescale"),
    the Method fields it sets, and on the command line its flags (flag -> Method field or
    merge option) and help.  The catalogue (methods/core/parameters.py) holds the shared ones;
    a method's own parameter (MethodSpec.own_parameters) has no field but a `default`, and its
    value travels as a Rule of the Method (shared by the models)."""

    name: str
    kind: str
    fields: Tuple[str, ...]
    help: str
    flags: Tuple[Tuple[str, str], ...] = ()
    per_model: bool = False  # set per model for every method that takes it
    default: Optional[object] = None  # a method's own parameter: its value where none is set


@dataclass(frozen=True)
class Defaults:
    """A method's defaults where they differ between methods (mergekit's, where it has the
    method)."""

    normalize: bool = False
    rescale: str = "none"
    sparsify: int = KEEP_ALL
    sign_election: bool = False
    epsilon: float = 0.0  # della: the keep probability's half range; ram: the |τ| that counts


@dataclass(frozen=True)
class Contract:
    """The models a method merges.  `on_sets`: defined for a base and any number of models (a
    model set), not only the trio's two; `fewest`: the least models besides the base."""

    on_sets: bool = False
    fewest: int = 1
    weighs_base: bool = False  # the base has a weight of its own (linear, karcher)


@dataclass(frozen=True)
class ByVectors:
    """A method that may merge vector by vector (methods/windows/per_vector.py): its modes,
    whether each vector's statistics are of the models (else of the task vectors), how the
    scaled inputs are formed ("task_vectors": b, c_d·τ_d, c_a·τ_a; "models": c_b·b, c_d·d,
    c_a·a; "models_only": 0, c_d·d, c_a·a), and (c_b, c_d, c_a) of one vector from its
    (Σd², Σa², Σd·a) and the tensor's settings."""

    modes: Tuple[str, ...]
    on_models: bool
    form: str
    coefficients: Callable


@dataclass(frozen=True)
class MergekitForm:
    """The method in mergekit configs (mergekit/config.py) and inside mergekit (mergekit/
    backend.py).  `config_roles(name, base, others, problem)` maps a config's base_model and
    other models onto the engine's roles (None: the common map, a base and one or two others
    or a model set); `without_base`: the method run when a config has no base_model."""

    needs_base: bool = True
    needs_weights: bool = False
    placeholder_base: bool = False  # the base role only stands in for an absent base_model
    ignores: Tuple[str, ...] = ()  # parameters ours take that mergekit's method does not
    aliases: Dict[str, str] = field(default_factory=dict)  # mergekit's name -> ours
    shape_options: Tuple[str, ...] = ()  # nuslerp_flatten, nuslerp_row_wise, filter_wise
    config_roles: Optional[Callable] = None
    config_rules: Optional[Callable] = None  # rules put first (karcher: 1/n each)
    without_base: Optional[str] = None
    vectors_of: Optional[Callable] = None  # ({shape option: value}) -> one of VECTOR_MODES
    # Inside mergekit: registered with our own parameter list ("ours": the generalized task
    # arithmetic family, linear, slerp) or with mergekit's own spec of the method ("theirs").
    registers: Optional[str] = None
    # How a group of mergekit's tensors maps onto the in-memory merge (theirs; None: a base
    # and its models as merge_set_tensors takes them): backend(group, merge) with
    # group.base / .others / .shared / .per_model / .name and merge.trio / merge.set.
    backend: Optional[Callable] = None
    # --compute-dtype mergekit: the method as mergekit computes it, in torch, in the config's
    # dtype (arithmetic(settings, group) -> tensor; group: methods/core/in_torch.py
    # MergekitGroup), and whether mergekit's result is float32 under a narrower dtype (a
    # float32 mask or coefficient enters its product).  None: `unreproducible` says why not.
    arithmetic: Optional[Callable] = None
    writes_f32: bool = False
    unreproducible: str = "mergekit has no such method"


@dataclass(frozen=True)
class MethodSpec:
    """One merge method (see the module's docstring)."""

    name: str
    summary: str  # the formula, one line for --help and the table of docs/methods.md
    parameters: Tuple[str, ...]  # methods/core/parameters.py names them
    defaults: Defaults = Defaults()
    contract: Contract = Contract()
    route: str = FUSED
    recipe: Optional[Callable] = None      # (native, settings, name, count, passes) -> Recipe
    set_recipe: Optional[Callable] = None  # the same for a model set -> SetRecipe
    merge_windows: Optional[Callable] = None  # (settings, tensor, windows) -> merged chunks
    window_elements: Optional[Callable] = None  # (shape) -> elements of a window
    vectors: Optional[ByVectors] = None
    f64: Optional[Callable] = None  # (settings, base, *models) -> float64 merge (F64 tensors)
    fused_formula: bool = False  # the MergeAlign formula every backend runs without a recipe
    per_model: Tuple[str, ...] = ()  # parameters set per model beyond weight, density, gamma
    # Parameters no other method takes, declared by the method's module (listed in
    # `parameters` too); the catalogue adds them, so flags, config checks and help follow.
    own_parameters: Tuple[Parameter, ...] = ()
    # What a catalogue parameter means for this method where that differs from its help
    # (added to the flag's help).
    meanings: Dict[str, str] = field(default_factory=dict)
    settings_problems: Optional[Callable] = None  # (settings, where) -> [problem]
    flag_problems: Optional[Callable] = None  # ({flag: value given}) -> [problem]
    oracle: Optional[Callable] = None  # (settings, tensor_name, base, *models) -> (exact, scale)
    mergekit: MergekitForm = MergekitForm()  # in mergekit configs, and inside mergekit
    parameters_doc: str = ""  # the table's parameters column

    @property
    def vector_modes(self) -> Tuple[str, ...]:
        return self.vectors.modes if self.vectors else ("tensor",)


def others_at_least(name: str, fewest: int, exactly: bool = False) -> Callable:
    """A MergekitForm.config_roles that only counts a config's models besides base_model (at
    least `fewest`, or exactly) before the common map."""
    def config_roles(base, folders, others, problem):
        if len(others) != fewest if exactly else len(others) < fewest:
            models = f"{('one', 'two', 'three')[fewest - 1]} other model{'s' * (fewest > 1)}"
            count = f"exactly {models} (got {len(others)} others)" if exactly \
                else f"at least {models} (got {len(others)})"
            problem(f"{name} takes base_model and {count}")
            return None
        return base, others
    return config_roles


def in_windows(module: str) -> dict:
    """The MethodSpec fields of a method merged in numpy windows by methods/windows/<module>.py
    (its merge_chunks and window_elements), imported on first use: numpy is loaded only by the
    merges that need it."""
    def implementation():
        import importlib

        return importlib.import_module(f"mergealign_fast.methods.windows.{module}")

    return {"route": WINDOWS,
            "merge_windows": lambda s, tensor, windows: implementation().merge_chunks(
                s, tensor, windows),
            "window_elements": lambda shape: implementation().window_elements(shape)}
