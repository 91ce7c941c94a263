"""`chat_template` of a mergekit config: the template the merged model's tokenizer carries.

mergekit's forms: a name (chatml, llama3, mistral, alpaca, exaone: the well-known prompt formats,
written here as this project's own Jinja), "auto" (the template most of the merged models carry;
none when none does), or a literal Jinja template.  It is written where transformers reads it:
`chat_template.jinja` (transformers reads it in preference to the rest) and the `chat_template`
field of tokenizer_config.json (where older versions look), replacing the tokenizer source's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..errors import PlanError
from ..io import json_text

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

NAMED = {
    # <|im_start|>role\ncontent<|im_end|>\n per message
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
    # a header per message, the content trimmed, the turn closed by <|eot_id|> and a newline
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n'"
        " ~ message['content'] | trim ~ '<|eot_id|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    # " [INST] user [/INST]" then " answer</s>"; a system message opens the first user turn
    "mistral": (
        "{{- bos_token -}}"
        "{%- set system = messages[0]['content'] ~ '\\n\\n' "
        "if messages and messages[0]['role'] == 'system' else '' -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ ' [INST] ' ~ (system if loop.first else '') ~ message['content'] ~ ' [/INST]' }}"
        "{%- else -%}{{ ' ' ~ message['content'] ~ eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    # the system text (or nothing), a blank line, then ### Instruction / ### Response blocks
    # joined by blank lines, every text trimmed; the generation prompt follows a user turn only
    "alpaca": (
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
        "{{- (messages[0]['content'] | trim if has_system else '') ~ '\\n\\n' -}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ '### Instruction:\\n' ~ message['content'] | trim }}"
        "{%- else -%}{{ '### Response:\\n' ~ message['content'] | trim }}{%- endif -%}"
        "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}"
        "{{ '### Response:\\n' }}{%- endif -%}"),
    # [|role|]content, system and assistant turns closed by [|endofturn|] (EXAONE's format;
    # mergekit 0.1.5's own renders its source indentation into the prompt as well)
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '[|user|]' ~ message['content'] ~ '\\n' }}"
        "{%- else -%}"
        "{{ '[|' ~ message['role'] ~ '|]' ~ message['content'] ~ '[|endofturn|]\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"),
}
# mergekit's rule for a literal: at least this long and holding a Jinja brace.
LITERAL_MIN_CHARS = 20


def model_template(folder: Path) -> Optional[str]:
    """The chat template a model folder's tokenizer carries, or None."""
    file = folder / TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8").strip() or None
    try:
        template = json_text.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8")) \
            .get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the "default" one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_template(spec: str, models: Sequence[Path]) -> Optional[str]:
    """The template `spec` names (None: "auto" and no model has one); PlanError when it is
    neither a name, "auto" nor a template."""
    if spec == "auto":
        found = [t for t in (model_template(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if spec in NAMED:
        return NAMED[spec]
    if len(spec) < LITERAL_MIN_CHARS or "{" not in spec:
        raise PlanError([f"chat_template {spec!r}: neither auto, a name ({', '.join(NAMED)}) "
                         "nor a Jinja template"])
    return spec


def template_files(template: str, copied: Sequence[Path],
                   written: Optional[Dict[str, bytes]] = None) -> Dict[str, bytes]:
    """{file: content} that give OUT's tokenizer `template`, from the tokenizer files copied
    into OUT or `written` for it (a tokenizer merged by token); PlanError when there is none (no
    tokenizer to carry it)."""
    names = {path.name: path for path in copied}
    if written and TOKENIZER_CONFIG in written:
        where, read = f"the merged tokenizer's {TOKENIZER_CONFIG}", written[TOKENIZER_CONFIG].decode
    elif TOKENIZER_CONFIG in names:
        where, read = names[TOKENIZER_CONFIG], names[TOKENIZER_CONFIG].read_bytes
    else:
        raise PlanError(["chat_template: the output gets no tokenizer_config.json to carry it "
                         "(set tokenizer_source to a model with a tokenizer, and copy it)"])
    try:
        config = json_text.loads(read())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError([f"{where}: cannot read: {exc}"]) from None
    if not isinstance(config, dict):
        raise PlanError([f"{where}: must hold a JSON object"])
    config["chat_template"] = template
    return {TOKENIZER_CONFIG: (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
            TEMPLATE_FILE: template.encode("utf-8")}
