"""Prompt files: JSON Lines, one object per line with a "prompt" string (other fields are kept
with the answers, untouched)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from ..errors import MergeError
from ..io import json_text

PROMPT_FIELD = "prompt"


def read_prompts(path: Path, flag: str) -> List[str]:
    """The prompts of a JSONL file; MergeError naming the file, line and problem."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MergeError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"{flag} {path}: cannot be read ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json_text.loads(line)
        except json.JSONDecodeError as exc:
            raise MergeError(f"{flag} {path}, line {number}: not JSON ({exc.msg})") from None
        text = record.get(PROMPT_FIELD) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise MergeError(f"{flag} {path}, line {number}: no non-empty \"{PROMPT_FIELD}\" "
                             "string (each line is an object like {\"prompt\": \"...\"})")
        prompts.append(text)
    if not prompts:
        raise MergeError(f"{flag} {path}: no prompts (the file is empty)")
    return prompts
