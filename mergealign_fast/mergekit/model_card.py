"""The model card (README.md) and the recipe a merge of a mergekit config leaves in OUT.

The Hugging Face Hub reads the card's YAML front matter: `base_model` lists the merged models
(it builds the model tree from it), `tags` mark it as a merge, `library_name` says transformers
loads it.  The body says how it was made: the method, each model, the configuration as given,
and the tool with its version, so anyone can merge it again.  The configuration itself is
written beside it as mergekit_config.yml, the name mergekit gives it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

from .._version import __version__

CARD_FILE = "README.md"
RECIPE_FILE = "mergekit_config.yml"


def model_card(name: str, method: str, base: str, models: Sequence[str],
               config_text: str) -> str:
    """The card of a merge named `name` (OUT's folder name): `models` are the merged models
    as the config names them, `base` its base model ("" when it has none).  Each name is
    written as a JSON string, which YAML reads back as it is (paths with colons, #)."""
    listed = [base] + [m for m in models if m != base] if base else list(models)
    front = "\n".join(["---", "base_model:", *(f"- {json.dumps(m)}" for m in listed),
                       "library_name: transformers", "tags:", "- merge", "- mergekit",
                       "- mergealign-fast", "---"])
    merged = "\n".join(f"- `{m}`" for m in models if m != base)
    base_line = f"with `{base}` as the base model" if base else "without a base model"
    fence = "````" if "```" in config_text else "```"
    return (f"{front}\n# {name}\n\n"
            f"A merge of pre-trained language models, made with mergealign-fast {__version__} "
            f"from a mergekit configuration.\n\n"
            f"## Merge details\n\n"
            f"Method: `{method}`, {base_line}.\n\n"
            f"### Models merged\n\n{merged}\n\n"
            f"### Configuration\n\nThe configuration that produced this model (also in "
            f"`{RECIPE_FILE}`):\n\n{fence}yaml\n{config_text.rstrip()}\n{fence}\n")


def card_files(out_dir: Path, method: str, base: str, models: Sequence[str],
               config_text: str) -> Dict[str, bytes]:
    """{file name: content} of the card and the recipe for OUT."""
    card = model_card(Path(out_dir).name, method, base, models, config_text)
    return {CARD_FILE: card.encode("utf-8"), RECIPE_FILE: config_text.encode("utf-8")}
