"""Whether the models number their tokens alike; what a merge by token is given.

The embedding and output matrices have one row per token id, and a merge adds rows of the same
index.  That is right only when every model gives each token the same id; a model whose
tokenizer orders its vocabulary differently (same size, other numbering) would have its rows
added to other tokens' rows, a wrong model with nothing to show for it.  So the tokenizers are
compared before any compute: a token that two models both have under different ids is refused,
naming it (a merge by token, vocabularies.py, gathers the rows instead).  Tokens only one model
has (a reserved slot renamed by a fine-tune, "<|im_start|>" where the base had
"<|reserved_special_token_3|>") keep their slot and are not a conflict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..io.checkpoint import TOKENIZER_FILES
from ..io import json_text

VOCABULARY_FILES = ("tokenizer.json", "vocab.json")  # fast tokenizers; GPT-2 style vocabularies

# ---- what a merge by token is given (built and gathered in vocabularies.py) -------------------

UNION = "union"
# The source of a vocabulary that is no merged model's: a mergekit config's tokenizer_source
# naming a model it does not merge (VocabularySpec.source_folder holds its folder).
OUTSIDE = "outside"
# What a re-saved tokenizer replaces in OUT: every file describing the vocabulary (an old
# tokenizer.model or vocab.json beside the new tokenizer.json would contradict it).
REPLACED_BY_TOKENIZER = frozenset(TOKENIZER_FILES) - {"generation_config.json"}
# The names of tensors indexed by token in the architectures transformers saves (Llama, Qwen,
# Mistral, Gemma: embed_tokens / lm_head; GPT-2: wte; BERT: word_embeddings; Llama's original
# checkpoints: tok_embeddings / output; GPT-NeoX: embed_out; T5: shared).  A tensor is re-indexed
# when its name is one of these AND its first axis is each model's vocabulary size: an MLP whose
# width equals the vocabulary size is not mistaken for one.
VOCABULARY_TENSOR = re.compile(r"(^|\.)(embed|embed_tokens|embeddings|lm_head|wte|"
                               r"word_embeddings|tok_embeddings|embed_out|output|shared)(\.|$)")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from (mergekit's `tokenizer.tokens` entries): `role`'s row of
    the token itself (kind "model"), of another token or id (kind "model_token"), zeros (kind
    "zero"), or the default rules (kind "auto": a token only added); with force, for every
    model, even those that have the token."""

    kind: str
    role: str = ""
    token: Optional[str] = None
    token_id: Optional[int] = None
    force: bool = False


@dataclass(frozen=True)
class VocabularySpec:
    """The output vocabulary: `source` ("union", the role whose tokenizer it is, or OUTSIDE),
    tokens to add or to give set rows, and the padding of the row count."""

    source: str
    tokens: Tuple[Tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: Optional[int] = None
    # The base role is a model of the merge (a mergekit config without base_model has none:
    # then a token two models share is their mean, never the first model's alone).
    has_base: bool = True
    # source OUTSIDE: the folder of the tokenizer that is the output's.
    source_folder: Optional[Path] = None


@dataclass
class TokenizerTables:
    """What the tokenizers say: the output vocabulary, each model's (its ids below its
    vocab_size), each model's vocab_size, and the output tokenizer as transformers saves it."""

    out_vocab: Dict[str, int]
    vocabs: Dict[str, Dict[str, int]]
    sizes: Dict[str, int]
    files: Dict[str, bytes]
    rebuilt: bool  # the output tokenizer differs from its source's files


def vocab_size_holder(config: dict) -> dict:
    """The mapping of a config.json that holds the model's vocab_size: the config itself, or a
    multimodal model's text_config when only that one has it."""
    text = config.get("text_config")
    if isinstance(text, dict) and "vocab_size" in text and "vocab_size" not in config:
        return text
    return config


# ---- whether token ids agree --------------------------------------------------------------------

def _vocabulary_file(folder: Path) -> Optional[Path]:
    return next((folder / name for name in VOCABULARY_FILES if (folder / name).is_file()), None)


def token_ids(path: Path) -> Dict[str, int]:
    """token -> id of a tokenizer.json (its model's vocabulary and the added tokens) or of a
    vocab.json; ValueError when the file is not one."""
    document = json_text.loads(path.read_text(encoding="utf-8"))
    if path.name == "vocab.json":
        vocab, added = document, []
    else:
        vocab = (document.get("model") or {}).get("vocab") or {}
        added = document.get("added_tokens") or []
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        ids = {entry[0]: index for index, entry in enumerate(vocab)}
    elif isinstance(vocab, dict):
        ids = dict(vocab)
    else:
        raise ValueError("no vocabulary")
    ids.update({token["content"]: token["id"] for token in added})
    return ids


def vocabulary_problems(folders: Dict[str, Path]) -> List[str]:
    """One line per model that numbers a token otherwise than the first model (the base); []
    when they agree or a model has no tokenizer file to compare."""
    role, reference = next(iter(folders.items()))
    reference_file = _vocabulary_file(reference)
    if reference_file is None:
        return []
    reference_bytes = reference_file.read_bytes()
    reference_ids: Optional[Dict[str, int]] = None
    problems = []
    for other_role, folder in list(folders.items())[1:]:
        other_file = _vocabulary_file(folder)
        if other_file is None or other_file.name != reference_file.name \
                or other_file.resolve() == reference_file.resolve() \
                or other_file.read_bytes() == reference_bytes:
            continue
        try:
            reference_ids = reference_ids or token_ids(reference_file)
            ids = token_ids(other_file)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # not a tokenizer file we can read: nothing to compare
        moved = next((token for token, index in ids.items()
                      if reference_ids.get(token, index) != index), None)
        if moved is not None:
            problems.append(
                f"{other_role}: {other_file} numbers its tokens otherwise than the {role} model "
                f"({moved!r} is id {ids[moved]} there, {reference_ids[moved]} in {reference_file}):"
                " its embedding rows would be merged with other tokens' rows: merge by token "
                "(merge --vocab, a config's tokenizer_source)")
    return problems
