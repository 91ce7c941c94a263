"""`mergealign-fast run CONFIG.yml OUT`: a mergekit YAML config read into the engine's inputs.

Supported: `models` (each a local model folder, relative paths from the current directory as
for mergekit-yaml, with optional `parameters`), `base_model`, `merge_method` (any method of the
registry, mergekit's names), `parameters` (scalars, layer gradients, `filter` rules; per model
or shared, a model's own first: mergekit/parameters.py), `dtype`, `out_dtype`,
`tokenizer_source` and the `tokenizer` section (mergekit/tokenizer.py), `chat_template`
(chat_template.py), and `slices`: with passthrough a stack of layer ranges, one model each,
or merged slice by slice with any other method (plan/slices.py).  The whole config is checked,
and every problem reported, before any tensor is read; anything else (slices that merge other
models per slice, `modules`, an unknown key or parameter, a hub name instead of a folder) is
an error naming it.  Which model takes which role: mergekit/roles.py.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import methods
from ..dtypes import DType, parse_dtype
from ..errors import PlanError
from ..methods.core.parameters import Method, Rule
from ..methods.core.spec import SET_ROLE
from ..plan.slices import MergedSlice, SliceSource
from ..vocabulary import VocabularySpec
from .parameters import SHAPE_OPTIONS, ParameterReader
from .roles import config_roles
from .tokenizer import TokenizerReader, _folder

TOP_LEVEL_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "slices"}
UNSUPPORTED_TOP_LEVEL = {"modules": "modules"}
MODEL_KEYS = {"model", "parameters"}
# mergekit's merge_method for a stack of layer ranges or a copy: a config form, not a merge
# method (nothing is computed but dtype conversions and scales).
PASSTHROUGH = "passthrough"


@dataclass
class RunConfig:
    """A mergekit config turned into the engine's inputs."""

    base: Path
    domain: Path
    aligned: Path
    method: Method
    out_dtype: Optional[DType]
    tokenizer_from: str  # base | domain | aligned | none
    # Problems the reader could read past (a misspelled key taken as the key it is close to):
    # reported together with the plan's own, so one run lists everything.
    problems: Tuple[str, ...] = ()
    # What mergekit would silently ignore (a parameter the method does not take), said once.
    warnings: Tuple[str, ...] = ()
    # The models as the config names them (for the model card): base_model ("" if none), and
    # every entry of `models` in order.
    base_name: str = ""
    model_names: Tuple[str, ...] = ()
    # `chat_template` as given: a name, "auto" or a Jinja template (chat_template.py).
    chat_template: Optional[str] = None
    # `slices` of a passthrough stack (slices.py); the three roles are then its donor model.
    slices: Tuple[SliceSource, ...] = ()
    # More than two models besides the base: the model set merged into `base` (plan_set),
    # in the order listed; domain and aligned are then its first two.
    models: Tuple[Path, ...] = ()
    # `slices` merged slice by slice (slices.plan_sliced_merge): each slice's layer ranges by
    # role and its method (the rules of its own parameters); `method` holds all of them.
    merged_slices: Tuple[MergedSlice, ...] = ()
    # `dtype`: what mergekit casts every input to before merging (MergeOptions.input_dtype).
    input_dtype: Optional[DType] = None
    # `tokenizer_source` / `tokenizer`: the vocabularies merged by token (vocabularies.py).
    vocabulary: Optional[VocabularySpec] = None

    @property
    def folders(self) -> Dict[str, Path]:
        """The merge's folders by role: the trio's, or a model set's."""
        if self.models:
            return {"base": self.base, **{SET_ROLE.format(i + 1): f
                                          for i, f in enumerate(self.models)}}
        return {"base": self.base, "domain": self.domain, "aligned": self.aligned}

    @property
    def merged_folders(self) -> List[Path]:
        """Every model folder the merge reads."""
        if self.slices:
            return [s.folder for s in self.slices]
        return [self.base, *self.models] if self.models else [self.base, self.domain,
                                                               self.aligned]


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
    return _Reader(Path(path), raw, seed, allow_crimes).config()


class _Reader(ParameterReader, TokenizerReader):
    def __init__(self, path: Path, raw: dict, seed: Optional[int] = None,
                 allow_crimes: bool = True):
        self.path, self.raw = path, raw
        self.seed, self.allow_crimes = seed, allow_crimes
        self.problems: List[str] = []
        self.read_past: List[str] = []  # see RunConfig.problems
        self.warnings: List[str] = []  # see RunConfig.warnings
        self.shape_options = dict(SHAPE_OPTIONS)  # as given, else mergekit's defaults

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
        roles = self._roles(name, base, models) if methods.is_method(name) else None
        rules = []
        if roles is not None:
            rules = self._method_rules(name, roles, models, [self.raw.get("parameters")])
            self._check_weights(name, roles, models, [self.raw.get("parameters")])
        return self._finished(name, roles, base, rules, self._model_names())

    def _model_names(self) -> Tuple[str, ...]:
        """`models` as the config names them (for the model card)."""
        return tuple(str(e["model"] if isinstance(e, dict) else e)
                     for e in self.raw.get("models") or [])

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
        if roles is not None and not self.allow_crimes:
            self._check_architectures(roles)
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
                         else None, vocabulary=vocabulary)

    def _sliced_config(self) -> RunConfig:
        """`slices` merged slice by slice (slices.plan_sliced_merge): each output layer is the
        merge of one layer of each source, as mergekit plans it.  Every slice lists the same
        models in the same order (their layer ranges may differ), base_model among them."""
        name = self._method_name()
        base = self._base()
        parsed = self._merged_slices(self.raw.get("slices"))
        if not parsed:
            raise PlanError(list(dict.fromkeys(self.read_past + self.problems)))
        first = [source.folder.resolve() for source, _ in parsed[0][0]]
        for i, (sources, _) in enumerate(parsed[1:], 1):
            if [source.folder.resolve() for source, _ in sources] != first:
                self.problem(f"slices[{i}]: every slice must merge the same models in the same "
                             "order as slices[0] (other models per slice are not supported)")
        if base is not None and base.resolve() not in first:
            self.problem(f"base_model {base}: with slices it must be one of each slice's "
                         "sources (its layer range is the slice's)")
        models = [(source.folder, {}) for source, _ in parsed[0][0]]
        roles = self._roles(name, base, models) if methods.is_method(name) else None
        rules, merged = [], []
        for sources, slice_parameters in parsed if roles is not None else ():
            with_parameters = [(source.folder, parameters) for source, parameters in sources]
            levels = [slice_parameters, self.raw.get("parameters")]
            rules_here = self._method_rules(name, roles, with_parameters, levels)
            self._check_weights(name, roles, with_parameters, levels)
            ranges = {source.folder.resolve(): (source.start, source.end) for source, _ in sources}
            merged.append(MergedSlice(tuple((role, *ranges[folder.resolve()])
                                            for role, folder in roles.items()),
                                      Method(name, vectors=self._vectors(name),
                                             rules=tuple(rules_here))))
            rules += rules_here
        names = tuple(dict.fromkeys(source.name for source, _ in parsed[0][0]))
        return self._finished(name, roles, base, list(dict.fromkeys(rules)), names,
                              tuple(merged))

    def _merged_slices(self, raw) -> List[Tuple[List[Tuple[SliceSource, dict]], dict]]:
        """[(sources with their `parameters`, the slice's `parameters`)] of each slice."""
        if not isinstance(raw, list) or not raw:
            self.problem("`slices` must be a non-empty list")
            return []
        parsed = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or set(item) - {"sources", "parameters"} \
                    or not isinstance(item.get("sources"), list) or not item["sources"]:
                self.problem(f"slices[{i}]: a slice takes `sources` (a non-empty list) and "
                             f"optional `parameters` (got {item!r})")
                continue
            sources = [self._slice_source(f"slices[{i}]", s, ("model", "layer_range",
                                                              "parameters"))
                       for s in item["sources"]]
            if None in sources:
                continue
            if len({s.end - s.start for s in sources}) > 1:
                self.problem(f"slices[{i}]: every source must hold the same number of layers "
                             f"(got {', '.join(f'{s.name} {s.end - s.start}' for s in sources)})")
                continue
            parsed.append(([(s, dict(raw_s.get("parameters") or {}))
                            for s, raw_s in zip(sources, item["sources"])],
                           item.get("parameters") or {}))
        return parsed

    def _stack_config(self) -> RunConfig:
        """`slices` with passthrough: a stack of layer ranges (slices.py)."""
        stack = self._slices(self.raw.get("slices"))
        base_name = self.raw.get("base_model")
        donor = self._reference(base_name, "base_model") if base_name is not None \
            else (stack[0].folder if stack else None)
        self._slices_vocabulary_problem()
        if self.raw.get("parameters"):
            self.problem("`parameters` with passthrough slices (e.g. scale) are not supported")
        if not self.allow_crimes:
            self._check_architectures({s.name: s.folder for s in stack})
        out_dtype = self._out_dtype()
        if self.problems:
            raise PlanError(self.read_past + self.problems)
        return RunConfig(donor, donor, donor, Method(), out_dtype, "base", tuple(self.read_past),
                         tuple(dict.fromkeys(self.warnings)), str(base_name or ""),
                         tuple(dict.fromkeys(s.name for s in stack)),
                         self.raw.get("chat_template"), tuple(stack))

    def _slices(self, raw) -> List[SliceSource]:
        """The passthrough stack: one source per slice."""
        if not isinstance(raw, list) or not raw:
            self.problem("`slices` must be a non-empty list")
            return []
        stack = []
        for i, item in enumerate(raw):
            sources = item.get("sources") if isinstance(item, dict) else None
            if not isinstance(sources, list) or len(sources) != 1:
                self.problem(f"slices[{i}]: passthrough takes exactly one entry under "
                             "`sources` (several are merged: give a merge_method)")
                continue
            source = self._slice_source(f"slices[{i}]", sources[0], ("model", "layer_range"))
            if source is not None:
                stack.append(source)
        return stack

    def _slice_source(self, where: str, source, keys: Tuple[str, ...]
                      ) -> Optional[SliceSource]:
        if not isinstance(source, dict) or set(source) - set(keys):
            self.problem(f"{where}: a source takes {', '.join(f'`{k}`' for k in keys)} (got "
                         f"{source!r})")
            return None
        span = source.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] < span[1]):
            self.problem(f"{where}: layer_range must be [first, end) with 0 <= first < end "
                         f"(got {span!r})")
            return None
        folder = self._reference(source.get("model"), where)
        return SliceSource(str(source["model"]), folder, span[0], span[1]) if folder else None

    def _check_keys(self) -> None:
        """Unknown and unsupported keys, one line each.  A misspelled key close to a known one
        that is absent is read as that key, so its other problems are still found and its
        absence is not reported as well."""
        for key in list(self.raw):
            if key in UNSUPPORTED_TOP_LEVEL:
                self.problem(f"`{key}` ({UNSUPPORTED_TOP_LEVEL[key]}) is not supported")
            elif key not in TOP_LEVEL_KEYS:
                missing = [k for k in TOP_LEVEL_KEYS if k not in self.raw]
                close = difflib.get_close_matches(str(key), missing, n=1, cutoff=0.75)
                if close:
                    self.read_past.append(f"{self.path}: unknown key `{key}`: did you mean "
                                          f"`{close[0]}`?")
                    self.raw[close[0]] = self.raw[key]
                else:
                    self.problem(f"unknown key `{key}` (supported: "
                                 f"{', '.join(sorted(TOP_LEVEL_KEYS))})")

    def _reference(self, value, where: str) -> Optional[Path]:
        if not isinstance(value, str) or not value:
            self.problem(f"{where}: expected a model folder, got {value!r}")
            return None
        if "+" in value:
            self.problem(f"{where}: {value}: LoRA references (model+lora) are not supported")
            return None
        folder = _folder(value)
        if not folder.is_dir():
            self.problem(f"{where}: {value}: no such local folder (hub names are not "
                         "downloaded: give a local path)")
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
                    self.problem(f"models[{i}]: unknown key `{key}` (supported: model, "
                                 "parameters)")
            folder = self._reference(entry["model"], f"models[{i}]")
            if folder is not None:
                models.append((folder, entry.get("parameters") or {}))
        return models

    def _roles(self, name: str, base: Optional[Path], models) -> Optional[Dict[str, Path]]:
        """{role: folder}: which model takes which of the trio's roles, or (more than two
        models besides the base, for the methods defined for any number) of a model set's."""
        return config_roles(methods.get(name), base, [f for f, _ in models], self.problem)

    def _check_architectures(self, roles: Dict[str, Path]) -> None:
        """mergekit refuses to merge models of different architectures without --allow-crimes."""
        found = {}
        for role, folder in roles.items():
            try:
                config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                found[folder] = tuple(config.get("architectures") or ())
            except (OSError, ValueError, AttributeError):
                continue  # no config to compare: the plan's own checks decide
        if len(set(found.values())) > 1:
            listed = "; ".join(f"{folder}: {', '.join(arch) or 'none'}"
                               for folder, arch in found.items())
            self.problem(f"the models have different architectures ({listed}): add "
                         "--allow-crimes to merge them by tensor name anyway")

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

