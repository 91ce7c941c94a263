"""A mergekit config's tokenizer: `tokenizer_source` (base, union or one of the models) or the
`tokenizer` section (source, tokens, pad_to_multiple_of), read as the VocabularySpec of a merge
by token (mergekit merges the vocabulary tensors by token whenever either is given)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from ..errors import MergeError
from ..sources import model_folder
from ..vocabulary import OUTSIDE, UNION, TokenSource, VocabularySpec

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}


def _folder(value) -> Path:
    """A model reference as its folder (a Hub repo id: its snapshot, sources.model_folder); a
    relative path is relative to the current directory, as mergekit-yaml reads it."""
    try:
        return model_folder(str(value))
    except MergeError:  # a repo no merged model is: "not one of the merged models"
        return Path(str(value)).expanduser()


class TokenizerReader:
    """The tokenizer part of the config reader (mergekit/config.py)."""

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
        # A model not merged gives the vocabulary (re-saved in OUT), base the config.
        return self._role_named(source, roles) or ("base" if roles else "none")

    @staticmethod
    def _role_named(reference, roles: Dict[str, Path]) -> Optional[str]:
        """The role of the merged model `reference` names (a model before the base), None when
        it names none of them."""
        folder = _folder(reference).resolve()
        order = [r for r in roles if r != "base"] + (["base"] if "base" in roles else [])
        return next((role for role in order if roles[role].resolve() == folder), None)

    def _model_role(self, reference, roles: Dict[str, Path], where: str) -> Optional[str]:
        """The role of the merged model `reference` names; a problem when it is none."""
        role = self._role_named(reference, roles)
        if role is None:
            self.problem(f"{where}: {reference} is not one of the merged models")
        return role

    def _outside_source(self, source: str) -> Optional[Path]:
        """The folder of a tokenizer_source that is no merged model (mergekit loads its
        tokenizer as the output's and maps every model's rows onto it)."""
        folder = self._reference(source, "tokenizer_source")
        if folder is not None and not any((folder / name).is_file() for name in
                                          ("tokenizer.json", "tokenizer_config.json",
                                           "tokenizer.model", "vocab.json")):
            self.problem(f"tokenizer_source: {source}: no tokenizer there")
            return None
        return folder

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
        outside = None
        if source not in ("base", UNION):
            role = self._role_named(source, roles)
            outside = self._outside_source(source) if role is None else None
            source = role or OUTSIDE
        tokens = tuple((str(token), self._token_source(str(token), entry, roles))
                       for token, entry in ((section or {}).get("tokens") or {}).items())
        return VocabularySpec(source, tokens, (section or {}).get("pad_to_multiple_of"),
                              has_base=bool(self.raw.get("base_model")),
                              source_folder=outside)

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
