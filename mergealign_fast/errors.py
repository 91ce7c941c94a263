"""Errors meant for the user: one line each, no traceback (the CLI prints them and exits 2)."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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


def each_role(function: Callable[[T], R], by_role: Dict[str, T]) -> Tuple[Dict[str, R], List[str]]:
    """({role: function(value)}, the problems): a MergeError for one role is its line, prefixed
    with the role, and the other roles go on (every problem is listed in one go)."""
    results, problems = {}, []
    for role, value in by_role.items():
        try:
            results[role] = function(value)
        except MergeError as exc:
            problems.append(f"{role}: {exc}")
    return results, problems
