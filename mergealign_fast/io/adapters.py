"""PEFT LoRA adapters as models: `BASE+ADAPTER` stands for BASE with the adapter applied,
W + scale·B·A for each adapted module, computed window by window while the merge streams
(stream.py, the native low_rank_add), never as a whole model in memory or on disk.

What an adapter folder means is PEFT's (its LoraConfig and save format, peft 0.21):
- adapter_model.safetensors (or adapter_model.bin) holds, per adapted module M (the module's
  name in the model, "model.layers.0.self_attn.q_proj"), `base_model.model.M.lora_A.weight`
  (r x in) and `...lora_B.weight` (out x r); an embedding's `...lora_embedding_A` (r x rows)
  and `...lora_embedding_B` (cols x r), whose product is transposed; `...lora_B.bias` with
  lora_bias; whole tensors of modules_to_save as `base_model.model.M.weight`; and
  `...M.base_layer.weight` where PEFT saved a resized embedding whole (save_embedding_layers).
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and lora_alpha per module
  from rank_pattern / alpha_pattern, whose keys match the end of a module's name.
- fan_in_fan_out: the base stores the weight as in x out (GPT-2's Conv1D), so Δ = (B·A)ᵀ.
- Which modules the adapter may touch: target_modules (names matching a module's last parts,
  or one regular expression matching the whole name), exclude_modules, layers_to_transform
  with layers_pattern.
DoRA, adapter types other than LoRA, and settings that change the model beyond W + ΔW are
refused in one line naming the setting.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import MergeError
from .checkpoint import (ADAPTER_CONFIG, ADAPTER_LAYOUTS, TOKENIZER_FILES, Checkpoint,
                         open_checkpoint, read_elements)
from . import json_text

PEFT_PREFIX = "base_model.model."

# Settings that make the adapted model something other than W + scale·B·A (or that no merge
# can apply), each with what it is.  A setting absent, null, false, empty or "none" is off.
_REFUSED_SETTINGS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each weight by a learned magnitude",
    "layer_replication": "layer replication changes the model's layers",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "use_bdlora": "block-diagonal LoRA",
}

# The keys of an adapter file, less the PEFT prefix: (pattern of (module, part), kind).
_KEY_FORMS = (
    (re.compile(r"(.+)\.lora_([AB])\.weight"), "factor"),
    (re.compile(r"(.+)\.lora_embedding_([AB])"), "embedding factor"),
    (re.compile(r"(.+)\.lora_B\.(bias)"), "bias"),
    (re.compile(r"(.+)\.base_layer\.(weight|bias)"), "base layer"),
)
_DORA_KEY = re.compile(r"\.lora_magnitude_vector(\.weight)?$")


class AdaptedFolder(type(Path())):
    """An adapter folder that stands for `base` with the adapter applied: a path (the adapter
    folder's, named in messages) that carries its base.  Paths made from it (folder / name)
    are plain paths of the adapter folder."""

    base: Optional[Path] = None  # paths derived from one are plain

    def __new__(cls, adapter, base):
        self = super().__new__(cls, adapter)
        self.base = Path(base)
        return self

    def __init__(self, adapter, base):
        if sys.version_info >= (3, 12):  # 3.12 made Path.__init__ take the segments
            super().__init__(adapter)

    def with_segments(self, *segments):  # Python 3.12+: derived paths are plain
        return Path(*segments)

    def __reduce__(self):  # to a cluster's workers
        return AdaptedFolder, (str(self), str(self.base))

    def __repr__(self):
        return f"AdaptedFolder({str(self)!r}, base={str(self.base)!r})"


def adapter_base(folder) -> Optional[Path]:
    """The base an AdaptedFolder stands on; None for any other folder."""
    return getattr(folder, "base", None) if isinstance(folder, AdaptedFolder) else None


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def config_folder(folder) -> Path:
    """Where a model's config.json is: an adapted model's is its base's."""
    return adapter_base(folder) or folder


def tokenizer_folder(folder) -> Path:
    """Where a model's tokenizer is: an adapter folder's own when it carries one (the
    fine-tune's, with any tokens it added), else its base's."""
    base = adapter_base(folder)
    if base is None:
        return folder
    own = Path(folder)
    return own if any((own / n).is_file() for n in TOKENIZER_FILES) else base


def base_mismatch(folder) -> Optional[str]:
    """A warning when an adapter names another base (base_model_name_or_path) than the one it
    is applied to; None when they agree or it names none.  A Hub snapshot counts by its repo
    id, a local folder by its path or its last part."""
    base = adapter_base(folder)
    named = read_adapter_config(folder).base_model if base is not None else None
    if named is None:
        return None
    named_repo = named.partition("@")[0].rstrip("/")
    parts = base.resolve().parts
    given = {str(base.resolve()), base.name.lower()}
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        given.add(parts[-3][len("models--"):].replace("--", "/").lower())
    named_forms = {named_repo.lower(), named_repo.rsplit("/", 1)[-1].lower()}
    if Path(named_repo).expanduser().exists():
        named_forms.add(str(Path(named_repo).expanduser().resolve()))
    if given & named_forms:
        return None
    return (f"adapter {Path(folder)} was trained on {named} (its base_model_name_or_path) but "
            f"is applied to {base}: make sure they are the same model")


@dataclass(frozen=True)
class LowRankDelta:
    """What an adapter adds to one stored tensor: scale · left·right, left rows x r and right
    r x width (the tensor as rows x width, a 1-D one as rows x 1), from the adapter's factors.
    kind: "product" (B·A), "transposed" ((B·A)ᵀ: embeddings and fan_in_fan_out) or "bias"
    (lora_B.bias)."""

    kind: str
    a: Optional[object]  # TensorLocation of lora_A (None for a bias)
    b: object  # TensorLocation of lora_B (or of lora_B.bias)
    scale: float
    # The dtype its windows are held in (W + ΔW rounded once to it), chosen by the plan: the
    # stored weight's, as the adapted model would be saved, or F32 for an fp32 output.  None:
    # F32.
    held: Optional[str] = None

    @property
    def files(self) -> List[Path]:
        return [loc.file for loc in (self.a, self.b) if loc is not None]

    def factors(self):
        """(left, right) as C-contiguous fp32 numpy arrays."""
        import numpy as np

        b = _as_f32(self.b)
        if self.kind == "bias":
            return b.reshape(-1, 1), np.ones((1, 1), np.float32)
        a = _as_f32(self.a)
        if self.kind == "product":
            return b, a
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def _as_f32(location):
    import numpy as np

    from ..dtypes import bf16_bits_to_f32

    values = read_elements(location)
    if location.entry.dtype == "BF16":
        values = bf16_bits_to_f32(values)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(location.entry.shape)


# ---- adapter_config.json ---------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    values: dict

    def get(self, key, default=None):
        value = self.values.get(key)
        return default if value is None else value

    @property
    def base_model(self) -> Optional[str]:
        return self.get("base_model_name_or_path") or None

    @property
    def modules_to_save(self) -> List[str]:
        return list(self.get("modules_to_save", []))

    def rank_and_alpha(self, module: str) -> Tuple[int, float]:
        """PEFT's r and lora_alpha for `module`: the first rank_pattern / alpha_pattern key
        matching the end of its name, else the config's."""
        rank = _pattern_value(self.get("rank_pattern", {}), module, self.get("r", 8))
        alpha = _pattern_value(self.get("alpha_pattern", {}), module, self.get("lora_alpha", 8))
        return int(rank), float(alpha)

    def scale(self, module: str, rank: int) -> float:
        _, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(rank) if self.get("use_rslora", False) else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on `module` (check_target_module_exists)."""
        if self._excluded(module) or self.saved_whole(module):
            return False
        targets = self.get("target_modules")
        if targets is None:
            return False
        if isinstance(targets, str):
            return targets == "all-linear" or re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        if not any(module.endswith(f".{t}") for t in targets):
            return False
        return self._in_transformed_layers(module)

    def _excluded(self, module: str) -> bool:
        excluded = self.get("exclude_modules")
        if not excluded:
            return False
        if isinstance(excluded, str):
            return re.fullmatch(excluded, module) is not None
        return module in excluded or any(module.endswith(f".{e}") for e in excluded)

    def saved_whole(self, module: str) -> bool:
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module)
                   for m in self.modules_to_save)

    def _in_transformed_layers(self, module: str) -> bool:
        layers = self.get("layers_to_transform")
        if layers is None or layers == []:
            return True
        patterns = self.get("layers_pattern")
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        if not patterns:  # the first numbered part of the name is the layer
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            match = next((m for m in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                                      for p in patterns) if m), None)
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_off(value) -> bool:
    return value in (None, False, "", [], {}, "none", 0)


def read_adapter_config(folder: Path) -> AdapterConfig:
    """The adapter's config; MergeError naming the file and setting when it is not a LoRA
    adapter a merge can apply."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        values = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MergeError(f"{path}: cannot read: {exc}") from None
    if not isinstance(values, dict):
        raise MergeError(f"{path}: not a JSON object")
    kind = values.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise MergeError(f"{path}: peft_type {kind}: only LoRA adapters can be merged")
    for key, what in _REFUSED_SETTINGS.items():
        if not _is_off(values.get(key)):
            raise MergeError(f"{path}: {key}: {what}, which cannot be merged as W + scale·B·A")
    problem = _setting_problem(values)
    if problem:
        raise MergeError(f"{path}: {problem}")
    return AdapterConfig(path, values)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 \
        and math.isfinite(value)


def _is_names(value, single_allowed: bool = True) -> bool:
    return (isinstance(value, str) and single_allowed) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value))


def _setting_problem(values: dict) -> Optional[str]:
    """The first setting of an adapter_config.json that is not what PEFT writes there."""
    checks = {
        "r": lambda v: _is_number(v) and float(v).is_integer(),
        "lora_alpha": _is_number,
        "target_modules": _is_names,
        "exclude_modules": _is_names,
        "modules_to_save": lambda v: _is_names(v, single_allowed=False),
        "layers_pattern": _is_names,
        "layers_to_transform": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                        for i in v)),
        "rank_pattern": lambda v: isinstance(v, dict) and all(
            _is_number(x) and float(x).is_integer() for x in v.values()),
        "alpha_pattern": lambda v: isinstance(v, dict) and all(_is_number(x)
                                                               for x in v.values()),
        "use_rslora": lambda v: isinstance(v, bool),
        "fan_in_fan_out": lambda v: isinstance(v, bool),
        "lora_bias": lambda v: isinstance(v, bool),
        "base_model_name_or_path": lambda v: isinstance(v, str),
    }
    for key, valid in checks.items():
        if values.get(key) is not None and not valid(values[key]):
            return f"{key}: {values[key]!r} is not a value PEFT writes there"
    patterns = [values.get("target_modules"), values.get("exclude_modules")]
    patterns += list(values.get("rank_pattern") or {}) + list(values.get("alpha_pattern") or {})
    for pattern in (p for p in patterns if isinstance(p, str)):
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"{pattern!r} is not a regular expression: {exc}"
    return None


# ---- the adapted model ---------------------------------------------------------------------

def adapter_weights(folder: Path):
    """(path, {key: TensorLocation}) of the adapter's weight file."""
    from . import readers

    for name, _, locations_of in ADAPTER_LAYOUTS:
        if readers.is_file(folder / name):
            return folder / name, locations_of(folder / name)
    raise MergeError(f"{folder}: an adapter folder without weights (no "
                     f"{' or '.join(n for n, _, _ in ADAPTER_LAYOUTS)})")


def _base_tensor_name(module: str, part: str, base_tensors) -> Optional[str]:
    """The base tensor a module's part is: "M.weight", or, for checkpoints saved without the
    model's outer prefix (GPT-2's "h.0..." for "transformer.h.0..."), that name less it."""
    for name in (f"{module}.{part}", f"{module.partition('.')[2]}.{part}"):
        if name in base_tensors:
            return name
    return None


@dataclass
class _Module:
    a: Optional[object] = None
    b: Optional[object] = None
    embedding: bool = False
    bias: Optional[object] = None
    base_layer: bool = False  # its base tensors saved whole in the adapter


def _adapter_tensors(path: Path, tensors: dict
                     ) -> Tuple[Dict[str, _Module], Dict[str, object]]:
    """The adapter file's tensors as ({module: its factors}, {base tensor name: a whole
    replacement})."""
    modules: Dict[str, _Module] = {}
    whole: Dict[str, object] = {}
    for key, location in tensors.items():
        if _DORA_KEY.search(key):
            raise MergeError(f"{path}: {key}: a DoRA magnitude vector (use_dora): DoRA cannot "
                             "be merged as W + scale·B·A")
        name = key[len(PEFT_PREFIX):]
        if not key.startswith(PEFT_PREFIX) or "." not in name:
            raise MergeError(f"{path}: {key}: not a PEFT adapter key (expected "
                             f"{PEFT_PREFIX}<module>.<tensor>)")
        for pattern, kind in _KEY_FORMS:
            match = pattern.fullmatch(name)
            if match:
                module, part = match.groups()
                found = modules.setdefault(module, _Module())
                if kind == "factor":
                    setattr(found, part.lower(), location)
                elif kind == "embedding factor":
                    setattr(found, part.lower(), location)
                    found.embedding = True
                elif kind == "bias":
                    found.bias = location
                else:  # a base layer saved whole: replaced, then adapted
                    whole[f"{module}.{part}"] = location
                    found.base_layer = True
                break
        else:
            if re.search(r"\.lora_|lora_embedding|\.modules_to_save\.|trainable_tokens", name):
                raise MergeError(f"{path}: {key}: an adapter tensor of a kind this merge does "
                                 "not apply")
            whole[name] = location
    return modules, whole


def open_model(folder) -> Checkpoint:
    """open_checkpoint of a model folder; of an AdaptedFolder, its base with the adapter."""
    base = adapter_base(folder)
    if base is None:
        return open_checkpoint(folder)
    return open_adapted(folder, open_checkpoint(base))


def open_adapted(folder: AdaptedFolder, base):
    """The Checkpoint of `base` (an open Checkpoint) with the adapter in `folder` applied:
    its tensors are the base's, those the adapter saves whole replaced by the adapter's, and
    the adapted ones carrying their LowRankDelta.  MergeError naming the file, tensor and
    problem for an adapter that does not fit its base."""
    from dataclasses import replace

    config = read_adapter_config(folder)
    path, tensors = adapter_weights(folder)
    modules, whole = _adapter_tensors(path, tensors)
    adapted = dict(base.tensors)
    for name, location in whole.items():
        module = name.rsplit(".", 1)[0]
        if not (module in modules and modules[module].base_layer) and \
                not config.saved_whole(module):
            raise MergeError(f"{path}: {PEFT_PREFIX}{name}: a whole tensor of a module not in "
                             f"modules_to_save ({config.modules_to_save}): PEFT would not load it")
        target = _base_tensor_name(*name.rsplit(".", 1), base.tensors) or name
        adapted[target] = location
    for module, found in sorted(modules.items()):
        if found.a is None and found.b is None and found.bias is None:
            continue  # only its base layer, saved whole
        for part, delta in _module_deltas(config, path, module, found, base, adapted):
            name = _base_tensor_name(module, part, base.tensors)
            adapted[name] = replace(adapted[name], delta=delta)
    files = list(base.files) + [path, config.path]
    return Checkpoint(folder, files, adapted)


def _module_deltas(config: AdapterConfig, path: Path, module: str, found: _Module, base,
                   adapted) -> List[Tuple[str, LowRankDelta]]:
    """The (part, delta) an adapted module adds to its base tensors, checked against them."""
    where = f"{path}: module {module}"
    weight = _base_tensor_name(module, "weight", base.tensors)
    if weight is None:
        raise MergeError(f"{where}: the base ({base.folder}) has no tensor {module}.weight: "
                         "an adapter for another model?")
    if not config.targets(module):
        raise MergeError(f"{where}: not a module the adapter targets (target_modules "
                         f"{config.get('target_modules')!r}): PEFT would not load it")
    if (found.a is None) != (found.b is None):
        missing = "A" if found.a is None else "B"
        raise MergeError(f"{where}: lora_{missing} is missing")
    deltas = []
    rank, _ = config.rank_and_alpha(module)
    if found.a is not None:
        deltas.append(("weight", _weight_delta(config, where, module, found, rank,
                                               adapted[weight])))
    if found.bias is not None:
        bias = _base_tensor_name(module, "bias", base.tensors)
        if not config.get("lora_bias", False):
            raise MergeError(f"{where}: lora_B.bias without lora_bias in {ADAPTER_CONFIG}")
        if bias is None or adapted[bias].entry.shape != found.bias.entry.shape:
            raise MergeError(f"{where}: lora_B.bias {list(found.bias.entry.shape)} does not fit "
                             "the base's bias")
        deltas.append(("bias", LowRankDelta("bias", None, found.bias,
                                            config.scale(module, rank))))
    return deltas


def _weight_delta(config: AdapterConfig, where: str, module: str, found: _Module, rank: int,
                  weight) -> LowRankDelta:
    shape = weight.entry.shape
    a, b = found.a.entry.shape, found.b.entry.shape
    if len(shape) != 2 or len(a) != 2 or len(b) != 2:
        raise MergeError(f"{where}: only 2-D weights are adapted here (base {list(shape)}, "
                         f"lora_A {list(a)}): LoRA on a convolution is not supported")
    for factor in (found.a, found.b):
        if factor.entry.dtype not in ("F32", "F16", "BF16"):
            raise MergeError(f"{where}: {factor.entry.name} has dtype {factor.entry.dtype}")
    if weight.entry.dtype not in ("F32", "F16", "BF16"):
        raise MergeError(f"{where}: the base's {weight.entry.name} is {weight.entry.dtype}: "
                         "LoRA is applied to BF16, F16 and F32 weights")
    if a[0] != rank or b[1] != rank:
        raise MergeError(f"{where}: rank {a[0]} (lora_A {list(a)}, lora_B {list(b)}) but "
                         f"{ADAPTER_CONFIG} says r={rank} for it")
    # fan_in_fan_out is the model's setting, but PEFT applies it to Conv1D layers only (a Linear
    # beside them keeps out x in): the stored shape tells which a module is.
    transposed = found.embedding or (bool(config.get("fan_in_fan_out", False))
                                     and tuple(shape) == (a[1], b[0]))
    product = (a[1], b[0]) if transposed else (b[0], a[1])
    if tuple(shape) != product:
        raise MergeError(f"{where}: lora_B·lora_A is {list(product)} but the base's "
                         f"{weight.entry.name} is {list(shape)}"
                         + ("" if transposed else " (a GPT-2 Conv1D needs fan_in_fan_out)"))
    return LowRankDelta("transposed" if transposed else "product", found.a, found.b,
                        config.scale(module, rank))
