"""Vocabularies that differ: the merged tokenizer, and each model's vocabulary rows by token.

An embedding or output head has one row per token id.  Models whose tokenizers number their
tokens otherwise, or that added tokens (a domain expert's "<|im_start|>", a union of several
vocabularies), cannot be merged row by row.  With a vocabulary source (`tokenizer_source`, the
`tokenizer:` section of a mergekit config, `merge --vocab`), mergekit 0.1.5's rules apply:

- the output vocabulary is one model's ("base", or a role), or the union: the base's tokens,
  then each other model's tokens the base lacks, in model order, then the added (special)
  tokens; then any token the config's `tokens` names that is not there yet;
- every tensor whose first axis is a model's vocabulary (the embedding and the output head) is
  re-indexed by token before the merge: output row r of model m is m's row of token r;
- a model that lacks token r takes a default row: that of the only model that has it, else the
  base's when the base has it, else the mean of the rows of the models that have it (zero when
  none has it); a `tokens` entry overrides the default (a model's row of the token, a model's
  row of another token, zero) and with `force` replaces even the rows the models have;
- with `pad_to_multiple_of`, the rows past the last token are each model's mean row.

The merge then runs on the gathered rows as on any other tensor, a window of rows at a time in
the streaming pass (rows.py's TensorRows.gather): no vocabulary matrix is ever copied whole.  Default rows
are computed in float64 and rounded once (mergekit sums in the stored dtype: the two may differ
in the last bit of such a row).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..dtypes import from_safetensors
from ..errors import PlanError
from ..io.checkpoint import CONFIG_FILE, TensorLocation, first_roles
from .fast_tables import fast_tables
from . import (OUTSIDE, UNION, VOCABULARY_TENSOR, TokenizerTables, TokenSource,
               VocabularySpec, vocab_size_holder)
from ..io import json_text

# Fill rules of an output row (Vocabulary.fill): every model has the token (each its own row),
# or the row a model lacking it takes.
OWN, DONOR, MEAN, ZERO, PADDING = range(5)


@dataclass
class Vocabulary:
    """The output vocabulary and, per output row, where each model's row comes from."""

    spec: VocabularySpec
    tokenizer_files: Dict[str, bytes]  # the output tokenizer as transformers saves it
    tokens: int  # output rows that are tokens; `size` with the padding rows
    size: int
    sizes: Dict[str, int]  # each model's vocabulary (its matrices' rows), by role
    own: Dict[str, np.ndarray]  # role -> its row of each output row's token, -1: a default
    fill: np.ndarray  # per output row: OWN, or the rule of the rows of models lacking it
    donor_role: np.ndarray  # DONOR rows: index into `roles`
    donor_row: np.ndarray
    mean_of: Dict[str, np.ndarray]  # MEAN rows: role -> its row, -1 where it lacks the token
    roles: Tuple[str, ...]
    rebuilt: bool  # the tokenizer differs from its source's files: OUT gets it re-saved

    def tensor_problems(self, name: str, locations: Dict[str, TensorLocation]) -> List[str]:
        """What keeps a vocabulary tensor from being gathered by token."""
        shapes = {role: loc.entry.shape for role, loc in locations.items()}
        first = next(iter(shapes.values()))
        problems = [f"tensor {name}: {role} has shape {list(shape)}, base {list(first)}: only "
                    "the vocabulary axis (the first) may differ" for role, shape in shapes.items()
                    if shape[1:] != first[1:]]
        problems += [f"tensor {name} in {loc.file}: dtype {loc.entry.dtype} cannot be gathered "
                     "by token (BF16, F16 and F32 can)" for loc in locations.values()
                     if from_safetensors(loc.entry.dtype) is None]
        return problems

    def is_vocabulary_tensor(self, name: str, locations: Dict[str, TensorLocation]) -> bool:
        return bool(VOCABULARY_TENSOR.search(name)) and all(
            loc.entry.shape and loc.entry.shape[0] == self.sizes[role]
            for role, loc in locations.items())


# ---- building ---------------------------------------------------------------------------------

def _transformers():
    try:
        import transformers
    except ImportError:
        raise PlanError(["merging vocabularies needs transformers: pip install "
                         "'mergealign-fast[vocab]' (or leave out tokenizer_source / --vocab)"]
                        ) from None
    transformers.logging.set_verbosity_error()  # its notes on each load are not the user's
    return transformers


def _load_tokenizer(transformers, role: str, folder: Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # transformers raises anything from OSError to ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError([f"{role}: {folder}: its tokenizer does not load: {reason}"]) from None


def model_vocabulary_size(folder: Path, length: int) -> int:
    """The rows of a model's vocabulary matrices: config.json's vocab_size (a multimodal
    model's text_config), else its tokenizer's `length`."""
    try:
        config = json_text.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        config = {}
    size = vocab_size_holder(config).get("vocab_size") if isinstance(config, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else length


def build_vocabulary(folders: Dict[str, Path], spec: VocabularySpec,
                     template_from: Optional[str] = None) -> Vocabulary:
    """The output vocabulary of `folders` (by role, base first) under `spec`.  A union, built
    on the base's tokenizer, takes the chat template of `template_from` when the base has none
    (an aligned model's template is what a MergeAlign merge is chatted with)."""
    # Read by the tokenizers library where it reads them as transformers does (no torch, no
    # child); else by transformers, in this process if it has torch already (a notebook, tests).
    tables = fast_tables(folders, spec, template_from, model_vocabulary_size)
    if tables is None:
        tables = tokenizer_tables(folders, spec, template_from) if "torch" in sys.modules \
            else _tables_in_child(folders, spec, template_from)
    roles = tuple(folders)
    tokens = max(tables.out_vocab.values()) + 1
    size = _padded(tokens, spec.pad_to_multiple_of)
    own = {role: _rows_of(tables.out_vocab, tables.vocabs[role], size) for role in roles}
    distinct = tuple(first_roles(folders).values())
    return _with_fill_rules(spec, tables, tokens, size, own, roles, distinct)


def _tables_in_child(folders: Dict[str, Path], spec: VocabularySpec,
                     template_from: Optional[str]) -> TokenizerTables:
    """tokenizer_tables in a child process.  transformers imports torch, and a process that
    has imported torch faults mapped file pages ~2.5x slower (measured here: 0.09-0.14 s to
    touch a 2.2 GB page-cached file, 0.24-0.39 s after `import torch`), which slowed a whole
    1.1B merge from 1.0-1.4 s to 1.8-2.4 s: a merging process that has not imported torch does
    not start now (the child costs its imports, ~3 s)."""
    request = pickle.dumps((folders, spec, template_from))
    with tempfile.TemporaryDirectory(prefix="mergealign-vocabulary-") as scratch:
        answer = Path(scratch) / "answer.pickle"
        done = subprocess.run([sys.executable, "-c", CHILD, str(answer)], input=request,
                              capture_output=True)
        if done.returncode != 0 or not answer.is_file():
            said = done.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
            raise PlanError([f"reading the tokenizers failed: {said[-1]}"])
        kind, value = pickle.loads(answer.read_bytes())
    if kind == "problems":
        raise PlanError(value)
    return value


CHILD = ("import sys; from mergealign_fast.vocabulary.tokens import answer_child; "
         "answer_child(sys.argv[1])")


def answer_child(path: str) -> None:
    """The child's side of _tables_in_child: the request on stdin, the answer (tables, or the
    problems found) pickled to `path`."""
    folders, spec, template_from = pickle.loads(sys.stdin.buffer.read())
    try:
        answer = ("tables", tokenizer_tables(folders, spec, template_from))
    except PlanError as exc:
        answer = ("problems", exc.problems)
    Path(path).write_bytes(pickle.dumps(answer))


def tokenizer_tables(folders: Dict[str, Path], spec: VocabularySpec,
                     template_from: Optional[str] = None) -> TokenizerTables:
    """The tokenizers of `folders` read, and the output one built, by transformers."""
    transformers = _transformers()
    roles = tuple(folders)
    tokenizers = {role: _load_tokenizer(transformers, role, folder)
                  for role, folder in folders.items()}
    sizes = {role: model_vocabulary_size(folders[role], len(tokenizers[role]))
             for role in roles}
    vocabs = {role: {t: i for t, i in tok.get_vocab().items() if i < sizes[role]}
              for role, tok in tokenizers.items()}
    base = roles[0]
    beyond = len(tokenizers[base].get_vocab()) - len(vocabs[base])
    if beyond and spec.source in (UNION, base):
        raise PlanError([f"base: {folders[base]}: its tokenizer has {beyond} tokens beyond its "
                         f"vocab_size {sizes[base]}: not supported as the output vocabulary"])
    tokenizer, rebuilt = _output_tokenizer(transformers, spec, tokenizers, vocabs, sizes)
    template = getattr(tokenizers.get(template_from), "chat_template", None)
    if spec.source == UNION and template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    existing = set(tokenizer.get_vocab())
    for token, _ in spec.tokens:
        if token not in existing:
            tokenizer.add_tokens(token)
            existing.add(token)
            rebuilt = True
    with tempfile.TemporaryDirectory(prefix="mergealign-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    return TokenizerTables(tokenizer.get_vocab(), vocabs, sizes, files, rebuilt)


def _output_tokenizer(transformers, spec: VocabularySpec, tokenizers, vocabs, sizes):
    """(the output tokenizer, whether it differs from its source's files)."""
    if spec.source == OUTSIDE:  # no merged model's: OUT gets it re-saved
        return _load_tokenizer(transformers, "tokenizer_source", spec.source_folder), True
    if spec.source != UNION:
        return tokenizers[spec.source], False
    roles = list(tokenizers)
    base = roles[0]
    with tempfile.TemporaryDirectory(prefix="mergealign-tokenizer-") as folder:
        tokenizers[base].save_pretrained(folder)  # a copy: the base's own stays as it was
        union = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)
    # Added (special) tokens of any model, first seen first, keep their settings (special,
    # stripping); the other tokens the base lacks follow the base's, model by model.
    special: Dict[str, object] = {}
    for role in roles:
        for index, info in tokenizers[role].added_tokens_decoder.items():
            if index < sizes[role]:
                special.setdefault(info.content, info)
    known = set(tokenizers[base].get_vocab())
    plain = []
    for role in roles:  # in each model's id order (mergekit's is its hash map's: any order)
        for token in sorted(vocabs[role], key=vocabs[role].get):
            if token not in special and token not in known:
                plain.append(token)
                known.add(token)
    if plain:
        union.add_tokens(plain)
    fresh = [info for token, info in special.items() if token not in union.get_vocab()]
    if fresh:
        union.add_tokens(fresh)
    return union, True


def _padded(rows: int, multiple: Optional[int]) -> int:
    return rows if not multiple else -(-rows // multiple) * multiple


def _rows_of(out_vocab: Dict[str, int], vocab: Dict[str, int], size: int) -> np.ndarray:
    rows = np.full(size, -1, dtype=np.int64)
    for token, index in out_vocab.items():
        found = vocab.get(token)
        if found is not None:
            rows[index] = found
    return rows


def _with_fill_rules(spec: VocabularySpec, tables: TokenizerTables, tokens: int, size: int,
                     own: Dict[str, np.ndarray], roles, distinct) -> Vocabulary:
    """The Vocabulary with each row's default: `tokens` entries first, then mergekit's donor,
    base and mean rules for the rows some model lacks (models counted by `distinct` roles)."""
    fill = np.full(size, OWN, dtype=np.int8)
    donor_role = np.full(size, -1, dtype=np.int64)
    donor_row = np.full(size, -1, dtype=np.int64)
    present = np.stack([own[r] >= 0 for r in distinct])
    count = present.sum(axis=0)
    lacking = count < len(distinct)
    fill[lacking & (count == 0)] = ZERO
    single = lacking & (count == 1)
    fill[single] = DONOR
    which = np.argmax(present[:, single], axis=0)  # the one model (of `distinct`) with it
    donor_role[single] = np.asarray([roles.index(r) for r in distinct])[which]
    donor_row[single] = np.stack([own[r] for r in distinct])[which, np.flatnonzero(single)]
    shared = lacking & (count > 1)
    if spec.has_base:
        from_base = shared & (own[roles[0]] >= 0)
        fill[from_base] = DONOR
        donor_role[from_base] = 0
        donor_row[from_base] = own[roles[0]][from_base]
        shared &= ~from_base
    fill[shared] = MEAN
    fill[tokens:] = PADDING
    own = {role: rows.copy() for role, rows in own.items()}
    for token, source in spec.tokens:
        if source.kind == "auto":  # an added token without a source: the rules above
            continue
        row = tables.out_vocab[token]
        fill[row], donor_role[row], donor_row[row] = _token_rule(token, source, roles,
                                                                 tables.vocabs, tables.sizes)
        if source.force:
            for rows in own.values():
                rows[row] = -1
    mean_of = {r: np.where(fill == MEAN, own[r], -1) for r in distinct}
    return Vocabulary(spec, tables.files, tokens, size, tables.sizes, own, fill, donor_role,
                      donor_row, mean_of, roles, tables.rebuilt)


def _token_rule(token: str, source: TokenSource, roles, vocabs, sizes):
    """(fill, donor role index, donor row) of a `tokens` entry; PlanError when the row it names
    does not exist."""
    if source.kind == "zero":
        return ZERO, -1, -1
    role = source.role
    if source.kind == "model":
        row = vocabs[role].get(token)
        what = f"token {token!r}"
    elif source.token is not None:
        row = vocabs[role].get(source.token)
        what = f"token {source.token!r}"
    else:
        row = source.token_id if 0 <= source.token_id < sizes[role] else None
        what = f"token id {source.token_id}"
    if row is None:
        raise PlanError([f"tokenizer.tokens.{token}: {role} has no {what} "
                         f"(its vocabulary has {sizes[role]} rows)"])
    return DONOR, roles.index(role), row


# ---- gathering --------------------------------------------------------------------------------

