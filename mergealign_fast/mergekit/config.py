"""`mergealign-fast run CONFIG.yml OUT`: a mergekit YAML config through our engine.

Supported: `models` (each a local model folder, relative paths from the current directory as
for mergekit-yaml, with optional `parameters`), `base_model`,
`merge_method` (methods.METHODS: mergekit's task_arithmetic, linear, ties, dare_linear,
dare_ties, breadcrumbs, breadcrumbs_ties, slerp, nuslerp, model_stock, nearswap, multislerp,
karcher, sce, and our slerp_vectors, resta, chipalign), `parameters` (scalars, layer gradients,
`filter` rules; per model or shared, a model's own first), `dtype`, `out_dtype`,
`tokenizer_source` (base, union or one of the models) and the `tokenizer` section: the
vocabulary tensors merged by token (vocabularies.py).
The `chat_template` (chat_template.py), and `slices`: with passthrough a stack of layer ranges,
one model each, or merged slice by slice with any other method (slices.py).  The whole config
is checked, and every problem reported, before any tensor is read; anything else (slices that
merge other models per slice, `modules`, an unknown key or parameter, a hub name
instead of a folder) is an error naming it.  A known parameter the method does not take
(`weight` on slerp, `t` on linear) is ignored with a warning, as mergekit ignores it.

One or two models besides the base map onto the engine's trio (base, domain, aligned):
  task arithmetic family (task_arithmetic, ties, dare_*, resta, slerp_vectors): base_model is
    the base, the other models are domain then aligned (one other model: no aligned term);
  linear: base_model (or the first model) in the base role with its own weight, the others
    domain then aligned;
  slerp: mergekit's t runs from base_model (t = 0) to the other model (t = 1), so base_model
    takes the aligned role and the other the domain role (our t is "toward domain");
  chipalign: the first model is the domain expert, the second the aligned model.
More than two besides the base (linear: besides the first) make a model set (plan.plan_set):
the base, then "model 1", "model 2", ... in the order listed, for the methods defined for any
number of models (methods.SET_METHODS).  Linear over one model is that model: (w·m)/w.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..dtypes import DType, parse_dtype
from ..errors import PlanError
from ..methods import METHODS, PER_MODEL_FOR, RESCALES, SET_METHODS, Method, Rule
from ..plan import SET_ROLE
from ..plan.slices import MergedSlice, SliceSource
from ..io.checkpoint import first_roles
from ..vocabulary import UNION, TokenSource, VocabularySpec

TOP_LEVEL_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "slices"}
UNSUPPORTED_TOP_LEVEL = {"modules": "modules"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
MODEL_KEYS = {"model", "parameters"}
# mergekit parameter -> our parameter name; int8_mask only changes mergekit's memory use.
PARAMETERS = {"weight": "weight", "density": "density", "lambda": "lambda",
              "normalize": "normalize", "rescale": "rescale", "t": "t", "seed": "seed",
              "gamma": "gamma", "int8_mask": None, "normalize_weights": "normalize",
              "max_iter": "max_iter", "tol": "tol", "select_topk": "select_topk",
              "epsilon": "epsilon", "r": "r", "alpha": "alpha"}
# mergekit parameters that are one of ours for some methods only (multislerp's name for
# normalize): for any other method they mean nothing, and are ignored as mergekit ignores them.
ONLY_FOR = {"normalize_weights": ("multislerp",)}
# Parameters ours take that mergekit's method of the same name does not (karcher weighs every
# model equally there): ignored in a config, as mergekit ignores them.
MERGEKIT_IGNORES = {"karcher": ("weight",)}
PER_MODEL = {"weight", "density", "gamma"}  # and PER_MODEL_FOR's, for their methods
NUMERIC = {"weight", "density", "lambda", "t", "gamma", "tol", "scale", "select_topk", "epsilon",
           "r", "alpha"}
# merge_method -> does it need a base model.
NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "resta", "slerp_vectors",
              "model_stock", "breadcrumbs", "breadcrumbs_ties", "slerp", "nearswap", "sce",
              "della", "della_linear", "ram", "ramplus_tl", "arcee_fusion"}
NEEDS_WEIGHTS = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "linear", "nuslerp",
                 "multislerp", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
# Methods whose base role may only stand in for an absent base_model (its weight never counts).
PLACEHOLDER_BASE = ("slerp", "chipalign", "nuslerp", "multislerp")
# mergekit options choosing what a method works on, and the value we support (None: any): whole
# tensors, as both methods do by default.  Rows or filters one by one are refused.
SHAPE_OPTIONS = {"nuslerp_flatten": True, "nuslerp_row_wise": False, "filter_wise": False}
# Which methods read them (mergekit's nuslerp and model_stock; another method ignores them).
SHAPE_OPTIONS_OF = {"nuslerp": ("nuslerp_flatten", "nuslerp_row_wise"),
                    "model_stock": ("filter_wise",)}


def _per_model(method: str) -> set:
    """The parameters a model's own `parameters` may set for `method`."""
    return PER_MODEL | {p for p, methods in PER_MODEL_FOR.items() if method in methods}


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


def _folder(value) -> Path:
    """A model reference as a local folder; a relative path is relative to the current
    directory, as mergekit-yaml reads it."""
    return Path(str(value)).expanduser()


class _Reader:
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
            if self.raw.get("merge_method") == "passthrough":
                return self._stack_config()
            return self._sliced_config()
        if "slices" in self.raw:
            self.problem("give `slices` or `models`, not both")
        if self.raw.get("merge_method") == "passthrough":
            return self._copy_config()
        name = self._method_name()
        models = self._models()
        base = self._base()
        roles = self._roles(name, base, models) if name in METHODS else None
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
            self.problem(f"merge_method is missing (one of: {', '.join(METHODS)})")
        elif name not in METHODS:
            self.problem(f"merge_method {name!r} is not supported (supported: "
                         f"{', '.join(METHODS)})")
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
        if roles.get("aligned") == roles["base"] and name not in PLACEHOLDER_BASE:
            # With one other model the aligned role repeats the base and weighs nothing,
            # before any rule (first match wins): a shared `weight` at the top level must
            # not reach it, or linear would count the base twice.  Linear over one model
            # repeats it in the domain role as well.
            repeated = ("domain", "aligned") if roles["domain"] == roles["base"] \
                else ("aligned",)
            rules[:0] = [Rule("weight", role, 0.0) for role in repeated]
        if name == "karcher":  # mergekit: each model it merges (base_model too) weighs 1/n
            merged = set(first_roles(roles).values())
            rules[:0] = [Rule("weight", role, 1.0 / len(merged) if role in merged else 0.0)
                         for role in roles]
        if self.seed is not None and "seed" in METHODS[name].parameters:
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
        ours = f"{name}_models" if name in ("nuslerp", "multislerp") and base is None else name
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
        roles = self._roles(name, base, models) if name in METHODS else None
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
        folders = [f for f, _ in models]
        if name in NEEDS_BASE and base is None:
            self.problem(f"{name} needs `base_model`")
            return None
        others = [f for f in folders if base is None or f.resolve() != base.resolve()]
        if name == "linear":
            first = base if base is not None else (folders[0] if folders else None)
            others = [f for f in folders if first is None or f.resolve() != first.resolve()]
            limit, base = 2, first
            if first is not None and not others:  # one model: (w·model) / w, as mergekit
                return {"base": first, "domain": first, "aligned": first}
        elif name in ("slerp", "nearswap"):  # from base_model toward one other model
            if len(others) != 1:
                self.problem(f"{name} takes base_model and exactly one other model "
                             f"(got {len(others)} others)")
                return None
            return {"base": base, "domain": others[0], "aligned": base}
        elif name == "nuslerp":
            if len(others) != 2:
                self.problem(f"nuslerp takes exactly two models besides an optional "
                             f"base_model (got {len(others)})")
                return None
            # t runs from the first model to the second: our aligned to our domain.
            return {"base": base or others[0], "domain": others[1], "aligned": others[0]}
        elif name == "karcher":
            # Every listed model and base_model: two or three of them take the trio's roles,
            # more a model set's (without base_model the first model stands in the base role).
            merged = ([base] if base is not None else []) + others
            if len(merged) < 2:
                self.problem(f"karcher merges two or more models (base_model counts), got "
                             f"{len(merged)}")
                return None
            if len(merged) > 3:
                return {"base": merged[0], **{SET_ROLE.format(i + 1): f
                                              for i, f in enumerate(merged[1:])}}
            return {"base": merged[0], "domain": merged[1],
                    "aligned": merged[2] if len(merged) == 3 else merged[0]}
        elif name == "multislerp":
            # Without base_model two models (the base role stands in, as for nuslerp); with
            # it two (the trio) or more (a model set).
            if (len(others) != 2) if base is None else (len(others) < 2):
                self.problem(f"multislerp takes two models, or base_model and two or more "
                             f"others (got {len(others)} besides "
                             f"{'no base_model' if base is None else 'base_model'})")
                return None
            if base is None:
                return {"base": others[0], "domain": others[1], "aligned": others[0]}
            limit = 2
        elif name == "arcee_fusion" and len(others) != 1:
            self.problem(f"arcee_fusion takes base_model and exactly one other model "
                         f"(got {len(others)} others)")
            return None
        elif name in ("model_stock", "sce") and len(others) < 2:
            self.problem(f"{name} takes base_model and at least two other models "
                         f"(got {len(others)})")
            return None
        elif name == "chipalign":
            if len(folders) != 2:
                self.problem(f"chipalign takes two models, domain then aligned "
                             f"(got {len(folders)})")
                return None
            return {"base": folders[1], "domain": folders[0], "aligned": folders[1]}
        else:
            limit = 2
        if base is not None and len(others) > limit and name in SET_METHODS:
            return {"base": base, **{SET_ROLE.format(i + 1): f for i, f in enumerate(others)}}
        if base is None or not 1 <= len(others) <= limit:
            self.problem(f"{name}: the engine merges a base and one or two other models "
                         f"(got {len(others)} besides the base)")
            return None
        # One other model: the aligned role repeats the base, so its vector is zero.
        return {"base": base, "domain": others[0],
                "aligned": others[1] if len(others) == 2 else base}

    def _model_rules(self, name: str, roles: Dict[str, Path], models) -> List[Rule]:
        rules = []
        # A model set's roles follow the listed order, so a folder listed twice is two models.
        in_set = iter([r for r in roles if r != "base"]) if "domain" not in roles else None
        for folder, parameters in models:
            if in_set is None or folder.resolve() == roles["base"].resolve():
                role = self._role_of(folder, roles, name)
            else:
                role = next(in_set)
            accepted = METHODS[name].parameters
            shared = [k for k in parameters
                      if PARAMETERS.get(k) in set(accepted) - _per_model(name)]
            for key in shared:
                self.problem(f"{folder}: `{key}` is a shared parameter: set it under the top "
                             "level `parameters`")
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
        placeholder_base = name in PLACEHOLDER_BASE
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
        accepted = METHODS[method_name].parameters if method_name in METHODS else ()
        rules = []
        for key, value in parameters.items():
            if key in SHAPE_OPTIONS:
                self._shape_option(key, value)
                continue
            if key not in PARAMETERS:
                self.problem(f"unknown parameter `{key}` (supported: "
                             f"{', '.join(p for p in PARAMETERS)})")
                continue
            ours = PARAMETERS[key] if method_name in ONLY_FOR.get(key, (method_name,)) else key
            if ours is None:
                continue
            if method_name in METHODS and (ours not in accepted or
                                           ours in MERGEKIT_IGNORES.get(method_name, ())):
                # mergekit ignores it; configs written for one method carry it to another
                self.warnings.append(f"{self.path}: parameter `{key}` does not apply to "
                                     f"{method_name}: ignored, as mergekit ignores it")
                continue
            setting = self._setting(key, value)
            if setting is None:
                continue
            if ours in _per_model(method_name) and role is None:
                rules += [Rule(ours, r, setting) for r in every_role]
            else:
                rules.append(Rule(ours, role, setting))
        return rules

    def _shape_option(self, key: str, value) -> None:
        if not isinstance(value, bool):
            self.problem(f"parameter `{key}`: {value!r} is not true or false")
        else:
            self.shape_options[key] = value

    def _vectors(self, name: str) -> str:
        """What the method takes as one vector (methods.VECTOR_MODES), from mergekit's
        nuslerp_flatten / nuslerp_row_wise and filter_wise; said once where ignored."""
        given = [k for k, v in self.shape_options.items() if v != SHAPE_OPTIONS[k]]
        for key in given:
            if key not in SHAPE_OPTIONS_OF.get(name, ()):
                self.warnings.append(f"{self.path}: parameter `{key}` does not apply to "
                                     f"{name}: ignored, as mergekit ignores it")
        if name == "nuslerp" and not self.shape_options["nuslerp_flatten"]:
            return "columns" if self.shape_options["nuslerp_row_wise"] else "rows"
        if name == "model_stock" and self.shape_options["filter_wise"]:
            return "rows"
        return "tensor"

    def _setting(self, key: str, value):
        """mergekit's value forms as the immutable Setting of methods.py."""
        if isinstance(value, (bool, int, float, str)):
            return self._scalar(key, value)
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            conditions = []
            for condition in value:
                extra = set(condition) - {"filter", "value"}
                if "value" not in condition or extra:
                    self.problem(f"parameter `{key}`: a condition needs `value` and an "
                                 f"optional `filter` (got {sorted(condition)})")
                    return None
                inner = self._setting(key, condition["value"])
                if inner is None:
                    return None
                conditions.append((condition.get("filter"), inner))
            return tuple(conditions)
        if isinstance(value, list) and value and key in NUMERIC and \
                all(isinstance(v, (int, float, str)) for v in value):
            gradient = tuple(self._scalar(key, v) for v in value)
            return None if None in gradient else gradient
        self.problem(f"parameter `{key}`: cannot read {value!r}")
        return None

    def _scalar(self, key: str, value):
        """One value of a parameter, of its type (None after reporting a problem)."""
        if key in NUMERIC:
            try:  # YAML may give "1e-3" as a string: mergekit reads it as a number too
                number = float(value) if not isinstance(value, bool) else math.nan
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                self.problem(f"parameter `{key}`: {value!r} is not a finite number")
                return None
            return number
        if key in ("seed", "max_iter") and isinstance(value, int) \
                and not isinstance(value, bool) and value >= 0:
            return value
        if key == "rescale" and isinstance(value, bool):
            return "l1" if value else "none"
        if key == "rescale" and value in RESCALES:
            return value
        if key in ("normalize", "normalize_weights", "int8_mask") and isinstance(value, bool):
            return value
        wanted = {"seed": "a non-negative integer", "max_iter": "a non-negative integer",
                  "rescale": "true, false or one of "
                  + ", ".join(RESCALES)}.get(key, "true or false")
        self.problem(f"parameter `{key}`: {value!r} is not {wanted}")
        return None

    def _check_weights(self, name: str, roles: Dict[str, Path], models,
                       shared_levels: Sequence) -> None:
        """mergekit requires a weight for every merged model; so do we (no silent 0.5)."""
        if name not in NEEDS_WEIGHTS:
            return
        shared = any("weight" in (level or {}) for level in shared_levels)
        for folder, parameters in models:
            # Without base_model every model is weighted (the base role only stands in).
            weighted = name == "linear" or self.raw.get("base_model") is None \
                or folder.resolve() != roles["base"].resolve()
            if weighted and not shared and "weight" not in parameters:
                self.problem(f"{folder}: {name} needs a `weight` for this model")
        listed = {folder.resolve() for folder, _ in models}
        if name == "linear" and not shared and roles["base"].resolve() not in listed:
            # mergekit's linear merges base_model too, so it needs a weight as well.
            self.problem(f"base_model {roles['base']}: linear merges it too: list it under "
                         "`models` with a `weight`, or leave base_model out")

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

    def _slices_vocabulary_problem(self) -> None:
        """Slices merge the vocabulary tensors by index: their models must number tokens
        alike (checked), and the tokenizer is base_model's."""
        if self.raw.get("tokenizer") is not None or \
                self.raw.get("tokenizer_source") not in (None, "base"):
            self.problem("tokenizer_source / tokenizer with slices: vocabularies are merged "
                         "by token only for `models` configs; with slices the tokenizer is "
                         "base_model's (give tokenizer_source: base, or leave it out)")

    def _tokenizer_source(self):
        """The output vocabulary's source as given: the `tokenizer` section's (union when it
        names none) or `tokenizer_source`, None when neither is given."""
        section = self.raw.get("tokenizer")
        if isinstance(section, dict):
            return section.get("source", UNION)
        return self.raw.get("tokenizer_source")

    def _tokenizer(self, roles: Dict[str, Path]) -> str:
        """The role whose tokenizer files (and config) OUT gets; for a union, built on the
        base's, the base's."""
        source = self._tokenizer_source()
        if source is not None and not isinstance(source, str):
            self.problem(f"tokenizer_source: expected base, union or a model folder (got "
                         f"{source!r})")
            return "none"
        if source is None or source in ("base", UNION):
            return "base" if roles else "none"
        return self._model_role(source, roles, "tokenizer_source") or "none"

    def _model_role(self, reference, roles: Dict[str, Path], where: str) -> Optional[str]:
        """The role of the merged model `reference` names (a model before the base)."""
        folder = _folder(reference)
        for role in [r for r in roles if r != "base"] + ["base"]:
            if roles[role].resolve() == folder.resolve():
                return role
        self.problem(f"{where}: {reference} is not one of the merged models")
        return None

    def _vocabulary(self, roles: Dict[str, Path]) -> Optional[VocabularySpec]:
        """`tokenizer_source` or the `tokenizer` section as a VocabularySpec: mergekit merges
        by token whenever either is given (by index when neither is)."""
        section = self.raw.get("tokenizer")
        if section is not None and self.raw.get("tokenizer_source") is not None:
            self.problem("give tokenizer_source or a tokenizer section, not both")
            return None
        if section is not None and not (isinstance(section, dict)
                                        and set(section) <= TOKENIZER_KEYS):
            self.problem(f"tokenizer: expected a mapping of {', '.join(sorted(TOKENIZER_KEYS))} "
                         f"(got {section!r})")
            return None
        source = self._tokenizer_source()
        if not isinstance(source, str) or not roles:
            return None  # (a source that is no text is _tokenizer's problem)
        if source not in ("base", UNION):
            source = self._model_role(source, roles, "tokenizer_source")
        tokens = tuple((str(token), self._token_source(str(token), entry, roles))
                       for token, entry in ((section or {}).get("tokens") or {}).items())
        return VocabularySpec(source or "base", tokens, (section or {}).get("pad_to_multiple_of"),
                              has_base=bool(self.raw.get("base_model")))

    def _token_source(self, token: str, entry, roles: Dict[str, Path]) -> TokenSource:
        """One `tokenizer.tokens` entry: {source: a model | {kind: model_token, model, token or
        token_id} | {kind: zero}, force: bool}; without a source, mergekit's default rule."""
        where = f"tokenizer.tokens.{token}"
        if not isinstance(entry, dict) or not set(entry) <= TOKEN_KEYS:
            self.problem(f"{where}: expected a mapping of source and force (got {entry!r})")
            return TokenSource("auto")
        force = bool(entry.get("force", False))
        source = entry.get("source")
        if source is None:
            return TokenSource("auto", force=force)
        if isinstance(source, str):
            return TokenSource("model", self._model_role(source, roles, where) or "", force=force)
        kind = source.get("kind") if isinstance(source, dict) else None
        if kind == "zero":
            return TokenSource("zero", force=force)
        if kind == "model_token" and (source.get("token") is None) != \
                (source.get("token_id") is None):
            token_id = source.get("token_id")
            if token_id is not None and (isinstance(token_id, bool) or
                                         not isinstance(token_id, int)):
                self.problem(f"{where}: token_id must be a whole number (got {token_id!r})")
            return TokenSource("model_token", self._model_role(source.get("model"), roles, where)
                               or "", token=source.get("token"), token_id=token_id, force=force)
        self.problem(f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, "
                     f"model: ..., token: ... | token_id: ...}} (got {source!r})")
        return TokenSource("auto")
        folder = _folder(source)
        for role in [r for r in roles if r != "base"] + ["base"]:
            if roles[role].resolve() == folder.resolve():
                return role
        self.problem(f"tokenizer_source: {source} is not one of the merged models")
        return "none"
