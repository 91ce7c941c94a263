"""`mergealign-fast run CONFIG.yml OUT`: a mergekit YAML config read into the engine's inputs.

Supported: `models` (each a local model folder, relative paths from the current directory as
for mergekit-yaml, with optional `parameters`), `base_model`, `merge_method` (any method of the
registry, mergekit's names), `parameters` (scalars, layer gradients, `filter` rules; per model
or shared, a model's own first: mergekit/parameters.py), `dtype`, `out_dtype`,
`tokenizer_source` and the `tokenizer` section (mergekit/tokenizer.py), `chat_template`
(chat_template.py), and `slices`: with passthrough a stack of layer ranges, one model each,
or merged slice by slice with any other method (read: mergekit/slices.py; planned:
plan/slices.py).  The whole config is checked, and every problem reported, before any tensor is
read.  Values are read as mergekit reads them (mergekit/parameters.py); keys mergekit accepts
and ignores are ignored with a warning; what cannot run (slices that merge other models per
slice, `modules`, a model that cannot be found) or would silently merge something else in
mergekit (a misspelled key, `pattern:` for `filter:`) is an error naming it.  Which model takes
which role: mergekit/roles.py.  What a config becomes: loaded.py's RunConfig.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import methods
from ..dtypes import DType, parse_dtype
from ..errors import PlanError
from ..methods.core.parameters import Method, Rule
from .parameters import SHAPE_OPTIONS, ParameterReader
from .loaded import RunConfig
from .roles import config_roles
from .slices import SliceReader
from ..errors import MergeError
from ..io.adapters import config_folder
from ..sources import model_folder
from .tokenizer import TokenizerReader
from ..io import json_text

TOP_LEVEL_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "slices"}
UNSUPPORTED_TOP_LEVEL = {"modules": "modules"}
MODEL_KEYS = {"model", "parameters"}
# mergekit's merge_method for a stack of layer ranges or a copy: a config form, not a merge
# method (nothing is computed but dtype conversions and scales).
PASSTHROUGH = "passthrough"


def load(path: Path, seed: Optional[int] = None, allow_crimes: bool = True) -> RunConfig:
    """Read and check a mergekit YAML file; PlanError lists every problem, one per line.
    mergekit-yaml's flags: `seed` (--random-seed) seeds DARE's masks where the config sets no
    seed; allow_crimes=False refuses models of different architectures, as mergekit does."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError([f"{path}: cannot read: {exc}"]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise PlanError([f"{path}: not valid YAML{line}: {getattr(exc, 'problem', exc)}"]) \
            from None
    if not isinstance(raw, dict):
        raise PlanError([f"{path}: must be a YAML mapping (merge_method, models, ...)"])
    # mergekit's optional keys given as null (`slices: null`) are absent, as pydantic reads them
    raw = {key: value for key, value in raw.items() if value is not None}
    return _Reader(Path(path), raw, seed, allow_crimes).config()


class _Reader(ParameterReader, TokenizerReader, SliceReader):
    def __init__(self, path: Path, raw: dict, seed: Optional[int] = None,
                 allow_crimes: bool = True):
        self.path, self.raw = path, raw
        self.seed, self.allow_crimes = seed, allow_crimes
        self.problems: List[str] = []
        self.read_past: List[str] = []  # see RunConfig.problems
        self.warnings: List[str] = []  # see RunConfig.warnings
        self.shape_options = dict(SHAPE_OPTIONS)  # as given, else mergekit's defaults
        self.mergekit_order: Tuple[Path, ...] = ()  # see RunConfig.mergekit_order

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.path}: {text}")

    def config(self) -> RunConfig:
        self._check_keys()
        if "slices" in self.raw and "models" not in self.raw:
            if self.raw.get("merge_method") == PASSTHROUGH:
                return self._stack_config()
            return self._sliced_config()
        if "slices" in self.raw:
            self.problem("give `slices` or `models`, not both")
        if self.raw.get("merge_method") == PASSTHROUGH:
            return self._copy_config()
        name = self._method_name()
        models = self._models()
        base = self._base()
        self.mergekit_order = _mergekit_order([folder for folder, _ in models], base)
        roles = self._roles(name, base, models) if methods.is_method(name) else None
        rules = []
        if roles is not None:
            rules = self._method_rules(name, roles, models, [self.raw.get("parameters")])
            self._check_weights(name, roles, models, [self.raw.get("parameters")])
        return self._finished(name, roles, base, rules, self._model_names())

    def _model_names(self) -> Tuple[str, ...]:
        """`models` as the config names them (for the model card)."""
        entries = self.raw.get("models")
        return tuple(str(e.get("model") if isinstance(e, dict) else e)
                     for e in (entries if isinstance(entries, list) else []))

    def _copy_config(self) -> RunConfig:
        """passthrough over `models`: one model copied (mergekit's way to convert a dtype or
        re-shard), run as linear over that model with weight 1: (1·x)/1 is x exactly.  With
        `scale` (per tensor, filters allowed; the model's own, else the top level's) it is
        linear unnormalized with the scale as the weight: scale·x, rounded once, as mergekit
        multiplies."""
        models = self._models()
        if len(models) != 1:
            self.problem(f"passthrough with `models` copies one model (got {len(models)}); "
                         "stack layers of several with `slices`")
        scales = [self._passthrough_scale(parameters) for _, parameters in models[:1]]
        scales.append(self._passthrough_scale(self.raw.get("parameters")))
        folder = models[0][0] if models else None
        roles = {"base": folder, "domain": folder, "aligned": folder} if folder else None
        rules = [Rule("weight", "domain", 0.0), Rule("weight", "aligned", 0.0)]
        rules += [Rule("weight", "base", scale) for scale in scales if scale is not None]
        rules.append(Rule("weight", "base", 1.0))
        if len(rules) > 3:  # a scale: the weight is not divided away
            rules.append(Rule("normalize", None, False))
        return self._finished("linear", roles, folder, rules, self._model_names())

    def _passthrough_scale(self, parameters):
        """The `scale` setting of a passthrough `parameters` mapping (None: none given)."""
        if not parameters:
            return None
        if not isinstance(parameters, dict) or set(parameters) - {"scale"}:
            self.problem(f"passthrough takes one parameter, `scale` (got {parameters!r})")
            return None
        return self._setting("scale", parameters["scale"])

    def _method_name(self) -> Optional[str]:
        name = self.raw.get("merge_method")
        if name is None:
            self.problem(f"merge_method is missing (one of: {', '.join(methods.names())})")
        elif not methods.is_method(name):
            self.problem(f"merge_method {name!r} is not supported (supported: "
                         f"{', '.join(methods.names())})")
        return name

    def _base(self) -> Optional[Path]:
        return self._reference(self.raw.get("base_model"), "base_model") \
            if self.raw.get("base_model") is not None else None

    def _method_rules(self, name: str, roles: Dict[str, Path], models,
                      shared_levels: Sequence) -> List[Rule]:
        """The rules of a merge, highest precedence first as mergekit reads them: each model's
        own `parameters`, then the shared mappings of `shared_levels` in order (a slice's, then
        the top level's)."""
        model_roles = [r for r in roles if r != "base"] + ["base"]
        rules = self._model_rules(name, roles, models)
        for level in shared_levels:
            rules += self._rules(level, None, name, model_roles)
        spec = methods.get(name)
        if roles.get("aligned") == roles["base"] and not spec.mergekit.placeholder_base:
            # With one other model the aligned role repeats the base and weighs nothing,
            # before any rule (first match wins): a shared `weight` at the top level must
            # not reach it, or linear would count the base twice.  Linear over one model
            # repeats it in the domain role as well.
            repeated = ("domain", "aligned") if roles["domain"] == roles["base"] \
                else ("aligned",)
            rules[:0] = [Rule("weight", role, 0.0) for role in repeated]
        if spec.mergekit.config_rules is not None:  # (karcher: each merged model weighs 1/n)
            rules[:0] = [Rule(*rule) for rule in spec.mergekit.config_rules(roles)]
        if self.seed is not None and "seed" in spec.parameters:
            rules.append(Rule("seed", None, self.seed))  # after the config's own: it wins
        return rules

    def _finished(self, name: Optional[str], roles: Optional[Dict[str, Path]],
                  base: Optional[Path], rules: List[Rule], model_names: Tuple[str, ...],
                  merged_slices: Tuple = ()) -> RunConfig:
        """The RunConfig of a merge whose roles and rules are read; PlanError if anything in
        the config was wrong."""
        mixed = roles is not None and self._mixed_architectures(roles)
        out_dtype = self._out_dtype()
        tokenizer_from = self._tokenizer(roles or {})
        if merged_slices:
            self._slices_vocabulary_problem()
            vocabulary = None
        else:
            vocabulary = self._vocabulary(roles or {})
        template = self.raw.get("chat_template")
        if template is not None and (not isinstance(template, str) or not template.strip()):
            self.problem(f"chat_template: expected a name, auto or a Jinja template, got "
                         f"{template!r}")
        if self.problems or roles is None:
            raise PlanError(list(dict.fromkeys(self.read_past + self.problems)))
        without_base = methods.get(name).mergekit.without_base
        ours = without_base if without_base and base is None else name
        in_set = tuple(f for r, f in roles.items() if r != "base") if "domain" not in roles \
            else ()
        domain, aligned = in_set[:2] if in_set else (roles["domain"], roles["aligned"])
        return RunConfig(roles["base"], domain, aligned,
                         Method(ours, vectors=self._vectors(name), rules=tuple(rules)),
                         out_dtype, tokenizer_from,
                         tuple(self.read_past), tuple(dict.fromkeys(self.warnings)),
                         str(self.raw.get("base_model") or ""), model_names,
                         self.raw.get("chat_template"), models=in_set,
                         merged_slices=merged_slices,
                         input_dtype=parse_dtype(str(self.raw["dtype"])) if self.raw.get("dtype")
                         else None, vocabulary=vocabulary, mixed_architectures=mixed,
                         stated_out_dtype=self._stated_out_dtype(),
                         mergekit_order=_roles_in_order(roles, self.mergekit_order),
                         mergekit_has_base=base is not None)

    def _check_keys(self) -> None:
        """Unsupported keys are problems; other unknown keys are ignored with a warning, as
        mergekit ignores them (published cards carry `name:`, a top-level `int8_mask`...).  A
        misspelled key close to a known one that is absent is a problem, as mergekit would
        silently merge without it; it is read as that key, so its other problems are found
        too."""
        for key in list(self.raw):
            if key in UNSUPPORTED_TOP_LEVEL:
                self.problem(f"`{key}` ({UNSUPPORTED_TOP_LEVEL[key]}) is not supported")
            elif key not in TOP_LEVEL_KEYS:
                missing = [k for k in TOP_LEVEL_KEYS if k not in self.raw]
                close = difflib.get_close_matches(str(key), missing, n=1, cutoff=0.75)
                if close:
                    self.read_past.append(f"{self.path}: unknown key `{key}`: did you mean "
                                          f"`{close[0]}`? (mergekit would merge without it)")
                    self.raw[close[0]] = self.raw[key]
                else:
                    self.ignored(f"key `{key}`")

    def ignored(self, what: str) -> None:
        """A part of the config mergekit 0.1.5 accepts and ignores: said once, then ignored."""
        self.warnings.append(f"{self.path}: {what} changes nothing: ignored, as mergekit "
                             "ignores it")

    def _reference(self, value, where: str) -> Optional[Path]:
        if not isinstance(value, str) or not value:
            self.problem(f"{where}: expected a model folder, got {value!r}")
            return None
        try:
            folder = model_folder(value)
        except MergeError as exc:
            self.problem(f"{where}: {exc}")
            return None
        if not folder.is_dir():
            self.problem(f"{where}: {value}: no such local folder, and not a Hugging Face Hub "
                         "repo id")
            return None
        return folder

    def _models(self) -> List[Tuple[Path, dict]]:
        entries = self.raw.get("models")
        if not isinstance(entries, list) or not entries:
            self.problem("`models` must be a non-empty list")
            return []
        models = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                self.problem(f"models[{i}]: expected a mapping with `model`")
                continue
            for key in entry:
                if key not in MODEL_KEYS:
                    self.ignored(f"models[{i}]: key `{key}`")
            folder = self._reference(entry["model"], f"models[{i}]")
            parameters = entry.get("parameters") or {}
            if not isinstance(parameters, dict):
                self.problem(f"models[{i}]: `parameters` must be a mapping (got "
                             f"{parameters!r})")
            elif folder is not None:
                models.append((folder, parameters))
        return models

    def _roles(self, name: str, base: Optional[Path], models) -> Optional[Dict[str, Path]]:
        """{role: folder}: which model takes which of the trio's roles, or (more than two
        models besides the base, for the methods defined for any number) of a model set's."""
        return config_roles(methods.get(name), base, [f for f, _ in models], self.problem)

    def _mixed_architectures(self, roles: Dict[str, Path]) -> bool:
        """Whether the models' config.json name different architectures: mergekit refuses them
        without --allow-crimes (a problem then)."""
        found = {}
        for role, folder in roles.items():
            try:
                config = json_text.loads((config_folder(folder) / "config.json").read_text(
                    encoding="utf-8"))
                found[folder] = tuple(config.get("architectures") or ())
            except (OSError, ValueError, AttributeError):
                continue  # no config to compare: the plan's own checks decide
        if len(set(found.values())) <= 1:
            return False
        if not self.allow_crimes:
            listed = "; ".join(f"{folder}: {', '.join(arch) or 'none'}"
                               for folder, arch in found.items())
            self.problem(f"the models have different architectures ({listed}): add "
                         "--allow-crimes to merge them by tensor name anyway")
        return True

    def _stated_out_dtype(self) -> Optional[DType]:
        """`out_dtype` alone (mergekit writes each method's result dtype without it)."""
        value = self.raw.get("out_dtype")
        return parse_dtype(str(value)) if value is not None and not self.problems else None

    def _out_dtype(self) -> Optional[DType]:
        chosen = self.raw.get("out_dtype") or self.raw.get("dtype")
        for key in ("dtype", "out_dtype"):
            value = self.raw.get(key)
            if value is not None:
                try:
                    parse_dtype(str(value))
                except ValueError as exc:
                    self.problem(f"{key}: {exc}")
                    return None
        return parse_dtype(str(chosen)) if chosen else None


def _mergekit_order(listed: List[Path], base: Optional[Path]) -> Tuple[Path, ...]:
    """The models in the order mergekit's methods see them: as listed, then base_model
    when the list does not name it."""
    order = [f.resolve() for f in listed if f is not None]
    if base is not None and base.resolve() not in order:
        order.append(base.resolve())
    return tuple(dict.fromkeys(order))


def _roles_in_order(roles: Dict[str, Path], order: Tuple[Path, ...]) -> Tuple[str, ...]:
    """The first role of each folder of `order` (mergekit's order) that has one."""
    first: Dict[Path, str] = {}
    for role, folder in roles.items():
        first.setdefault(folder.resolve(), role)
    return tuple(first[f] for f in order if f in first)
