"""`mergealign-fast check`: the plan of a merge and its problems, without downloading a weight
or computing anything (mergekit's check-compat, as its users asked for it).

For each model: where it is (a folder, or repo@commit and what is still to download), its
architecture, layer count, hidden size, vocabulary and special tokens, RoPE settings, tied
embeddings, chat template, weight format and dtypes; the settings that differ between the
models are marked.  Then the merge's plan (output size, shards, downloads, free disk) or every
problem that stops it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import MergeError, PlanError
from ..io import readers
from ..io.adapters import adapter_base, config_folder, tokenizer_folder
from ..io.checkpoint import CONFIG_FILE, Checkpoint
from ..units import human_bytes
from ..io import json_text

# config.json's settings the report compares (a difference is marked, not refused: merges
# across them are sometimes what the user wants, and the plan's own checks decide).
CONFIG_SETTINGS = ("architectures", "model_type", "num_hidden_layers", "hidden_size",
                   "vocab_size", "rope_theta", "rope_scaling", "tie_word_embeddings",
                   "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
TOKENIZER_SETTINGS = ("bos_token", "eos_token", "pad_token")


def _json(path: Path) -> dict:
    try:
        value = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value) -> object:
    return value.get("content") if isinstance(value, dict) else value


def model_facts(checkpoint: Checkpoint) -> Dict[str, object]:
    """What the report says of one model, by setting name."""
    folder = tokenizer_folder(checkpoint.folder)
    config = _json(config_folder(checkpoint.folder) / CONFIG_FILE)
    tokenizer = _json(folder / "tokenizer_config.json")
    facts: Dict[str, object] = {key: config.get(key) for key in CONFIG_SETTINGS}
    facts.update({key: _token_text(tokenizer.get(key)) for key in TOKENIZER_SETTINGS})
    facts["chat_template"] = ("chat_template.jinja" if (folder / "chat_template.jinja").is_file()
                              else "in tokenizer_config.json" if tokenizer.get("chat_template")
                              else None)
    dtypes = Counter(loc.entry.dtype for loc in checkpoint.tensors.values())
    facts["dtypes"] = ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())
    facts["tensors"] = len(checkpoint.tensors)
    facts["weights"] = ", ".join(sorted({f.suffix.lstrip(".") for f in checkpoint.files
                                         if f.suffix in (".safetensors", ".bin")}))
    return facts


def _source(checkpoint: Checkpoint) -> str:
    base = adapter_base(checkpoint.folder)
    if base is not None:
        return f"LoRA {checkpoint.folder} on {base}"
    remote = [readers.remote_file(f) for f in checkpoint.files]
    if not remote or remote[0] is None:
        return str(checkpoint.folder)
    pending = sum(r.size for f, r in zip(checkpoint.files, remote) if readers.is_remote(f))
    state = f"{human_bytes(pending)} to download" if pending else "in the Hub cache"
    return f"{remote[0].repo_id}@{remote[0].commit[:12]} ({state})"


def facts_table(models: Dict[str, Checkpoint]) -> List[str]:
    """One line per setting, a column per model; '*' marks a setting that differs."""
    facts = {role: model_facts(checkpoint) for role, checkpoint in models.items()}
    lines = ["models:"]
    lines += [f"  {role}: {_source(checkpoint)}" for role, checkpoint in models.items()]
    keys = list(next(iter(facts.values()))) if facts else []
    width = max((len(k) for k in keys), default=0)
    lines.append(f"  {'':<{width}}  " + "  |  ".join(models))
    for key in keys:
        values = [json.dumps(facts[role][key]) if not isinstance(facts[role][key], str)
                  else facts[role][key] for role in models]
        mark = "*" if len(set(values)) > 1 else " "
        lines.append(f"{mark} {key:<{width}}  " + "  |  ".join(values))
    return lines


def plan_lines(plan) -> List[str]:
    import shutil

    from ..plan.output import existing_ancestor
    from ..sources import pending_download_bytes

    downloads = sum(pending_download_bytes(plan.files_read()).values())
    free = shutil.disk_usage(existing_ancestor(plan.out_dir.parent)).free
    return [f"plan: {plan.options.method.name}, {plan.tensor_count} tensors into "
            f"{len(plan.shards)} shards, {human_bytes(plan.output_bytes)} written to "
            f"{plan.out_dir} ({human_bytes(free)} free there)",
            f"  reads {human_bytes(plan.input_bytes)}; downloads {human_bytes(downloads)} "
            "first" if downloads else f"  reads {human_bytes(plan.input_bytes)}; nothing to "
            "download"]


def check(make_plan, folders: Optional[Dict[str, object]] = None) -> Tuple[List[str], List[str]]:
    """(report lines, problems): `make_plan()` builds the plan (PlanError: its problems);
    `folders` ({role: model spec}) are described even when the plan fails."""
    from ..plan.inputs import open_inputs
    from ..sources import model_folders

    problems: List[str] = []
    plan = None
    try:
        plan = make_plan()
    except PlanError as exc:
        problems = exc.problems
    except MergeError as exc:
        problems = str(exc).splitlines()
    models = plan.inputs if plan is not None else {}
    if plan is None and folders:
        resolved, _ = model_folders(folders)
        models, _ = open_inputs(resolved)
    lines = facts_table(models) if models else []
    if plan is not None:
        lines += plan_lines(plan)
    return lines, problems
