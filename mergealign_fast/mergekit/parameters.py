"""A mergekit config's `parameters`, read the way mergekit reads them: per model or shared (a
model's own first, then a slice's, then the top level's), scalars, layer gradients and filter
rules, each value of its parameter's type (methods/core/parameters.py names the types).  A
known parameter the method does not take (`weight` on slerp, `t` on linear) is ignored with a
warning, as mergekit ignores it."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .. import methods
from ..methods.core.parameters import PARAMETERS as OURS, RESCALES, Rule, per_model_parameters

# mergekit's parameters: ours, int8_mask (it only changes mergekit's memory use) and the names
# some methods give one of ours (multislerp's normalize_weights).
IGNORED = ("int8_mask",)
ALIASES = {alias for spec in methods.specs() for alias in spec.mergekit.aliases}
MERGEKIT_PARAMETERS = (*OURS, *IGNORED, *sorted(ALIASES))
# passthrough's one parameter: each tensor times its scale.
SCALE = "scale"
# mergekit options choosing what a method works on, and mergekit's defaults: whole tensors.
SHAPE_OPTIONS = {"nuslerp_flatten": True, "nuslerp_row_wise": False, "filter_wise": False}


def _kind(key: str) -> str:
    """The type of a mergekit parameter's values."""
    if key == SCALE:
        return "number"
    return OURS[key].kind if key in OURS else "bool"  # int8_mask, normalize_weights


# The spellings of true and false mergekit accepts (pydantic's, case-insensitive).
TRUE_WORDS = {"1", "on", "t", "true", "y", "yes"}
FALSE_WORDS = {"0", "off", "f", "false", "n", "no"}


def lax_bool(value) -> Optional[bool]:
    """A boolean as mergekit's validation reads one: true/false, 0/1 (int or float) and the
    words above; None for anything else (2, 0.5, "maybe")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    return None


def lax_number(value) -> Optional[float]:
    """A number as mergekit reads one: ints, floats, booleans (1.0 / 0.0) and numeric text
    ("1e-3": YAML 1.1 gives that spelling as a string); None otherwise."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def lax_count(value) -> Optional[int]:
    """A whole number as mergekit reads one: 3, 3.0, "3", true (1); None for 2.5 or "x"."""
    number = lax_number(value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)


class ParameterReader:
    """The `parameters` part of the config reader (mergekit/config.py): it reports through
    self.problem and self.warnings and records shape options in self.shape_options."""

    def _model_rules(self, name: str, roles: Dict[str, Path], models) -> List[Rule]:
        rules = []
        # A model set's roles follow the listed order, so a folder listed twice is two models.
        in_set = iter([r for r in roles if r != "base"]) if "domain" not in roles else None
        # Without base_model the base role may only stand in for a model of the set (multislerp)
        # rather than take the first model's place (linear, karcher).
        stand_in = in_set is not None and self.raw.get("base_model") is None and any(
            roles[r].resolve() == roles["base"].resolve() for r in roles if r != "base")
        for folder, parameters in models:
            if in_set is None or (not stand_in and
                                  folder.resolve() == roles["base"].resolve()):
                role = self._role_of(folder, roles, name)
            else:
                role = next(in_set)
            spec = methods.get(name)
            shared = [k for k in parameters if spec.mergekit.aliases.get(k, k) in
                      set(spec.parameters) - per_model_parameters(spec)]
            for key in shared:  # mergekit reads shared parameters from shared levels only
                self.ignored(f"{folder}: `{key}` in a model's parameters (a shared parameter: "
                             "set it under the top level `parameters`)")
            rules += self._rules({k: v for k, v in parameters.items() if k not in shared},
                                 role, name)
        return rules

    @staticmethod
    def _role_of(folder: Path, roles: Dict[str, Path], name: str) -> str:
        """The role whose parameters a model's `parameters` set.  A folder can fill two roles:
        the aligned role repeats the base when there is one other model (then it is the base),
        and slerp/chipalign only fill the base role with their aligned model (then aligned)."""
        if "domain" not in roles:  # a model set: a model's own role before the base's
            order = [r for r in roles if r != "base"] + ["base"]
            return next(role for role in order if roles[role].resolve() == folder.resolve())
        if roles["domain"] == roles["base"]:  # linear over one model: it is the base
            return "base"
        placeholder_base = methods.get(name).mergekit.placeholder_base
        repeat = roles["aligned"].resolve() == roles["base"].resolve()
        order = ("domain", "base", "aligned") if repeat and not placeholder_base \
            else ("domain", "aligned", "base")
        return next(role for role in order if roles[role].resolve() == folder.resolve())

    def _rules(self, parameters, role: Optional[str], method_name: str,
               every_role: Sequence[str] = ()) -> List[Rule]:
        """Rules of a `parameters` mapping for `role` (None: shared; a per-model parameter
        given there applies to each of `every_role`)."""
        if parameters is None:
            return []
        if not isinstance(parameters, dict):
            self.problem(f"`parameters` must be a mapping (got {parameters!r})")
            return []
        spec = methods.get(method_name) if methods.is_method(method_name) else None
        accepted = spec.parameters if spec else ()
        rules = []
        for key, value in parameters.items():
            if key in SHAPE_OPTIONS:
                self._shape_option(key, value)
                continue
            if key not in MERGEKIT_PARAMETERS:
                self._unknown_parameter(key, parameters, accepted)
                continue
            if key in IGNORED:
                continue
            ours = spec.mergekit.aliases.get(key, key) if spec else key
            if spec and (ours not in accepted or ours in spec.mergekit.ignores):
                # mergekit ignores it; configs written for one method carry it to another
                self.warnings.append(f"{self.path}: parameter `{key}` does not apply to "
                                     f"{method_name}: ignored, as mergekit ignores it")
                continue
            setting = self._setting(key, value)
            if setting is None:
                continue
            if spec and ours in per_model_parameters(spec) and role is None:
                rules += [Rule(ours, r, setting) for r in every_role]
            else:
                rules.append(Rule(ours, role, setting))
        return rules

    def _unknown_parameter(self, key, parameters: dict, accepted: Sequence[str]) -> None:
        """mergekit looks up only the parameters its method takes: any other name is ignored
        (cards carry `smooth`, `allow_negative_weights`).  One close to a parameter the method
        takes that is not given is a misspelling: mergekit would silently use the default."""
        given = {str(k) for k in parameters}
        close = difflib.get_close_matches(str(key), [p for p in accepted if p not in given],
                                          n=1, cutoff=0.75)
        if close:
            self.problem(f"unknown parameter `{key}`: did you mean `{close[0]}`? (mergekit "
                         f"would silently use {close[0]}'s default)")
        else:
            self.ignored(f"parameter `{key}`")

    def _shape_option(self, key: str, value) -> None:
        truth = lax_bool(value)
        if truth is None:
            self.problem(f"parameter `{key}`: {value!r} is not true or false")
        else:
            self.shape_options[key] = truth

    def _vectors(self, name: str) -> str:
        """What the method takes as one vector (methods.VECTOR_MODES), from mergekit's
        nuslerp_flatten / nuslerp_row_wise and filter_wise; said once where ignored."""
        form = methods.get(name).mergekit
        given = [k for k, v in self.shape_options.items() if v != SHAPE_OPTIONS[k]]
        for key in given:
            if key not in form.shape_options:
                self.warnings.append(f"{self.path}: parameter `{key}` does not apply to "
                                     f"{name}: ignored, as mergekit ignores it")
        return form.vectors_of(self.shape_options) if form.vectors_of else "tensor"

    def _setting(self, key: str, value):
        """mergekit's value forms as the immutable Setting of methods.py."""
        if isinstance(value, (bool, int, float, str)):
            return self._scalar(key, value)
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            conditions = []
            for condition in value:
                if "pattern" in condition and "filter" not in condition:
                    self.problem(f"parameter `{key}`: `pattern` is not a condition's key (its "
                                 "key is `filter`): mergekit ignores it and applies the value "
                                 "to every tensor")
                    return None
                if "value" not in condition:
                    self.problem(f"parameter `{key}`: a condition needs `value` and an "
                                 f"optional `filter` (got {sorted(condition)})")
                    return None
                for extra in sorted(set(map(str, condition)) - {"filter", "value"}):
                    self.ignored(f"parameter `{key}`: a condition's key `{extra}`")
                pattern = condition.get("filter")
                if pattern is not None and not isinstance(pattern, str):
                    self.problem(f"parameter `{key}`: a condition's `filter` is a piece of "
                                 f"tensor name (got {pattern!r})")
                    return None
                inner = self._setting(key, condition["value"])
                if inner is None:
                    return None
                conditions.append((pattern, inner))
            return tuple(conditions)
        if isinstance(value, list) and value and _kind(key) == "number" and \
                all(isinstance(v, (int, float, str)) for v in value):
            gradient = tuple(self._scalar(key, v) for v in value)
            return None if None in gradient else gradient
        self.problem(f"parameter `{key}`: cannot read {value!r}")
        return None

    def _scalar(self, key: str, value):
        """One value of a parameter, of its type, read as mergekit reads it (pydantic's lax
        conversions: `normalize: 1.0`, `"true"` or `yes` are booleans, `"1e-3"` and `true`
        numbers, `seed: 3.0` a count); None after reporting a problem."""
        kind = _kind(key)
        if kind == "number":
            number = lax_number(value)
            if number is None or not math.isfinite(number):
                self.problem(f"parameter `{key}`: {value!r} is not a finite number")
                return None
            return number
        if kind == "count":
            count = lax_count(value)
            if count is not None and count >= 0:
                return count
        if kind == "rescale" and value in RESCALES:  # ours beside mergekit's true / false
            return value
        truth = lax_bool(value) if kind in ("bool", "rescale") else None
        if truth is not None:
            return ("l1" if truth else "none") if kind == "rescale" else truth
        wanted = {"count": "a non-negative integer",
                  "rescale": "true, false or one of " + ", ".join(RESCALES)}.get(kind,
                                                                               "true or false")
        self.problem(f"parameter `{key}`: {value!r} is not {wanted}")
        return None

    def _check_weights(self, name: str, roles: Dict[str, Path], models,
                       shared_levels: Sequence) -> None:
        """mergekit requires a weight for every merged model; so do we (no silent 0.5)."""
        spec = methods.get(name)
        if not spec.mergekit.needs_weights:
            return
        shared = any(isinstance(level, dict) and "weight" in level for level in shared_levels)
        for folder, parameters in models:
            # Without base_model every model is weighted (the base role only stands in).
            weighted = spec.contract.weighs_base or self.raw.get("base_model") is None \
                or folder.resolve() != roles["base"].resolve()
            if weighted and not shared and "weight" not in parameters:
                self.problem(f"{folder}: {name} needs a `weight` for this model")
        listed = {folder.resolve() for folder, _ in models}
        if spec.contract.weighs_base and not shared and roles["base"].resolve() not in listed:
            # mergekit's linear merges base_model too, so it needs a weight as well.
            self.problem(f"base_model {roles['base']}: {name} merges it too: list it under "
                         "`models` with a `weight`, or leave base_model out")

