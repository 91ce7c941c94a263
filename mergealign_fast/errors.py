"""Errors meant for the user: one line each, no traceback (the CLI prints them and exits 2)."""

from __future__ import annotations

from typing import Iterable, List


class MergeError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class PlanError(MergeError):
    """Several problems found while checking a merge before any compute; one line per problem."""

    # More lines than this drown the first (usually the cause of the rest).
    MAX_LINES = 20

    def __init__(self, problems: Iterable[str]):
        self.problems: List[str] = list(problems)
        shown = self.problems[: self.MAX_LINES]
        hidden = len(self.problems) - len(shown)
        lines = shown + ([f"... and {hidden} more problems"] if hidden > 0 else [])
        super().__init__("\n".join(lines))
