"""The tokenizer tables of a merge by token read without transformers: from each model's
`tokenizer.json` with the `tokenizers` library (a Rust extension that imports in ~0.1 s, where
transformers costs 6-8 s in a child process on this VM), the output tokenizer written as
transformers would save it: tokenizer.json with the added tokens, tokenizer_config.json with
their `added_tokens_decoder` entries (and the chat template a union takes), the source's other
tokenizer files as they are.

Only where that reading is the same as transformers': every folder has a tokenizer.json, and its
tokenizer_config.json adds no token tokenizer.json lacks (transformers would add it on load).
Anything else returns None and transformers reads the tokenizers (tokens.py).  Tests compare
the two readings token by token and the saved files through transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import OUTSIDE, UNION, TokenizerTables, VocabularySpec
from ..errors import PlanError
from ..io import json_text

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The special-token settings of tokenizer_config.json that name a token transformers adds on
# load when the vocabulary lacks it.
SPECIAL_SETTINGS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                    "mask_token")
# Files carried with the output tokenizer as they are (the rest of a tokenizer's files describe
# the vocabulary and are replaced by tokenizer.json).
CARRIED = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class _Model:
    """One folder's tokenizer as the tokenizers library reads it."""

    def __init__(self, role: str, folder: Path):
        import tokenizers

        self.folder = folder
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON))
            self.config = _json(folder / TOKENIZER_CONFIG)
        except Exception as exc:  # the Rust extension raises its own Exception subclasses
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError([f"{role}: {folder}: its tokenizer does not load: {reason}"]) \
                from None
        self.vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.added = self.tokenizer.get_added_tokens_decoder()  # {id: AddedToken}

    def agrees_with_transformers(self) -> bool:
        """Whether transformers would load the same vocabulary: no token its config adds."""
        declared = self.config.get("added_tokens_decoder") or {}
        contents = [entry.get("content") for entry in declared.values()
                    if isinstance(entry, dict)]
        for key in SPECIAL_SETTINGS:
            value = self.config.get(key)
            contents.append(value.get("content") if isinstance(value, dict) else value)
        return all(c is None or c in self.vocab for c in contents)

    @property
    def chat_template(self) -> Optional[str]:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self.config.get("chat_template")
        return template if isinstance(template, str) else None


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json_text.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def fast_tables(folders: Dict[str, Path], spec: VocabularySpec, template_from: Optional[str],
                vocabulary_size):
    """TokenizerTables read by the tokenizers library, or None where transformers
    must read them (see the module docstring).  `vocabulary_size(folder, length)` is a model's
    matrix rows."""
    wanted = dict(folders)
    if spec.source == OUTSIDE:
        wanted[OUTSIDE] = spec.source_folder
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None
    if not all((f / TOKENIZER_JSON).is_file() for f in wanted.values()):
        return None
    models = {role: _Model(role, folder) for role, folder in wanted.items()}
    if not all(m.agrees_with_transformers() for m in models.values()):
        return None
    roles = tuple(folders)
    sizes = {r: vocabulary_size(folders[r], models[r].tokenizer.get_vocab_size(True))
             for r in roles}
    vocabs = {r: {t: i for t, i in models[r].vocab.items() if i < sizes[r]} for r in roles}
    base = roles[0]
    beyond = len(models[base].vocab) - len(vocabs[base])
    if beyond and spec.source in (UNION, base):
        raise PlanError([f"base: {folders[base]}: its tokenizer has {beyond} tokens beyond its "
                         f"vocab_size {sizes[base]}: not supported as the output vocabulary"])
    source = {UNION: base, OUTSIDE: OUTSIDE}.get(spec.source, spec.source)
    output = _Output(models[source])
    if spec.source == UNION:
        output.add_union(models, roles, vocabs, sizes)
    output.add_plain([token for token, _ in spec.tokens])
    template = models[template_from].chat_template if template_from in models else None
    if spec.source == UNION and template and not output.model.chat_template:
        output.chat_template = template
    rebuilt = output.changed or spec.source == OUTSIDE
    return TokenizerTables(output.vocab(), vocabs, sizes, output.files(), rebuilt)


class _Output:
    """The output tokenizer: a source's, with tokens added as transformers adds them."""

    def __init__(self, model: _Model):
        import tokenizers

        self.model = model
        self.tokenizer = tokenizers.Tokenizer.from_str(model.tokenizer.to_str())  # a copy
        self.new: List[Tuple[int, object]] = []  # (id, AddedToken) in the order added
        self.chat_template: Optional[str] = None

    @property
    def changed(self) -> bool:
        return bool(self.new) or self.chat_template is not None

    def vocab(self) -> Dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def _add(self, tokens) -> None:
        before = self.tokenizer.get_vocab_size(True)
        self.tokenizer.add_tokens(tokens)
        decoder = self.tokenizer.get_added_tokens_decoder()
        self.new += [(i, decoder[i]) for i in range(before, self.tokenizer.get_vocab_size(True))]

    def add_plain(self, tokens: List[str]) -> None:
        """Tokens the vocabulary lacks, as transformers' add_tokens(str) adds them: not special,
        normalized."""
        import tokenizers

        known = set(self.vocab())
        fresh = [t for t in dict.fromkeys(tokens) if t not in known]
        if fresh:
            self._add([tokenizers.AddedToken(t, special=False, normalized=True) for t in fresh])

    def add_union(self, models: Dict[str, _Model], roles, vocabs, sizes) -> None:
        """mergekit's union on the base's tokenizer: the other models' plain tokens the base
        lacks (model by model, in id order), then their added (special) tokens with their
        settings, first seen first."""
        special: Dict[str, object] = {}
        for role in roles:
            for index, token in sorted(models[role].added.items()):
                if index < sizes[role]:
                    special.setdefault(token.content, token)
        known = set(models[roles[0]].vocab)
        plain = []
        for role in roles:
            for token in sorted(vocabs[role], key=vocabs[role].get):
                if token not in special and token not in known:
                    plain.append(token)
                    known.add(token)
        self.add_plain(plain)
        fresh = [token for content, token in special.items() if content not in self.vocab()]
        if fresh:
            self._add(fresh)

    def files(self) -> Dict[str, bytes]:
        """The output tokenizer's files: the source's as they are when nothing changed."""
        folder = self.model.folder
        carried = {n: (folder / n).read_bytes() for n in CARRIED if (folder / n).is_file()}
        if not self.changed:
            own = {n: (folder / n).read_bytes() for n in (TOKENIZER_JSON, TOKENIZER_CONFIG)
                   if (folder / n).is_file()}
            return {**own, **carried}
        config = dict(self.model.config)
        decoder = dict(config.get("added_tokens_decoder") or {})
        for index, token in self.new:
            decoder[str(index)] = {"content": token.content, "lstrip": token.lstrip,
                                   "normalized": token.normalized, "rstrip": token.rstrip,
                                   "single_word": token.single_word, "special": token.special}
        config["added_tokens_decoder"] = decoder
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return {**carried, TOKENIZER_JSON: self.tokenizer.to_str(pretty=True).encode(),
                TOKENIZER_CONFIG: (json.dumps(config, indent=2, ensure_ascii=False) + "\n")
                .encode()}
