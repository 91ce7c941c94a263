"""The files besides the weights an output receives: the tokenizer's and the configuration's
(from the base or the tokenizer source), remote code the config's auto_map names, and the output's
config.json with its dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..dtypes import DType
from ..errors import PlanError
from ..io.adapters import config_folder, tokenizer_folder
from ..io.checkpoint import CONFIG_FILE, TOKENIZER_FILES
from ..io import json_text


def side_files_for(folders: Dict[str, Path], tokenizer_from: str):
    """(config.json to copy or None, files to copy as they are, problems).  An adapted model
    gives its own tokenizer when its adapter folder has one, its base's config."""
    source = None if tokenizer_from == "none" else tokenizer_folder(folders[tokenizer_from])
    return side_files_of(source, config_folder(folders["base"]))


def side_files_of(source: Optional[Path], fallback: Path):
    """(config.json or None, files to copy, problems) with the tokenizer of `source` (None: no
    tokenizer) and config.json from `source`, else from `fallback`."""
    copied = [source / n for n in TOKENIZER_FILES if (source / n).is_file()] if source else []
    # config.json follows the tokenizer (an instruct model's config carries its chat eos ids),
    # falling back to the base model's.
    candidates = ([source] if source else []) + [fallback]
    config = next((f / CONFIG_FILE for f in candidates if (f / CONFIG_FILE).is_file()), None)
    problems = []
    for described in [config] + [f for f in copied if f.name == "tokenizer_config.json"]:
        if described is not None:
            code, missing = _remote_code(described)
            copied += [f for f in code if f.name not in {c.name for c in copied}]
            problems += missing
    return config, copied, problems


def _auto_map_modules(described: Path) -> List[str]:
    """The local modules an `auto_map` in a config or tokenizer_config names ("modeling_x" of
    "modeling_x.XModel"; a "repo--module.Class" reference lives in another repository)."""
    try:
        auto_map = json_text.loads(described.read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return []  # an unreadable config is reported where it is read
    if not isinstance(auto_map, dict):  # (transformers reads a mapping; nothing to bring)
        return []
    references = [r for value in auto_map.values()
                  for r in (value if isinstance(value, list) else [value]) if isinstance(r, str)]
    return sorted({r.rsplit(".", 1)[0] for r in references if "--" not in r and "." in r})


def _remote_code(described: Path) -> Tuple[List[Path], List[str]]:
    """(the folder's Python files, problems) for a config whose auto_map names remote code
    (trust_remote_code=True): every .py file goes along, since the named modules import their
    neighbours."""
    modules = _auto_map_modules(described)
    if not modules:
        return [], []
    folder = described.parent
    missing = [f"{described}: auto_map names {m}.py, which is not in {folder}: transformers "
               "could not load the merged model's code" for m in modules
               if not (folder / f"{m}.py").is_file()]
    return sorted(folder.glob("*.py")), missing


def output_config(path: Optional[Path], dtype: DType) -> Optional[dict]:
    """The source config.json with its dtype entry set to what the merge writes."""
    if path is None:
        return None
    try:
        config = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError([f"{path}: cannot read: {exc}"]) from None
    if not isinstance(config, dict):
        raise PlanError([f"{path}: must hold a JSON object"])
    # transformers 4.x reads "torch_dtype", 5.x "dtype": set whichever the source uses.
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype.torch_name
    return config


