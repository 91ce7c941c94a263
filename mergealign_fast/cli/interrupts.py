"""Ctrl-C and SIGTERM as the command line reports them: their exit statuses, and the interrupt
behind an exception.  Shared by the entry point and the commands; imports nothing."""

import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143   # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like an interrupt (KeyboardInterrupt's path keeps partial work)."""


def interrupt_in(exc: BaseException):
    """The Ctrl-C or SIGTERM behind an exception, or None.  An interrupt that lands while Python
    creates a class (a dataclass field's __set_name__, during an import) reaches us wrapped in a
    RuntimeError on Python 3.11: look along the cause chain."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def interrupted_while_starting(exc: KeyboardInterrupt) -> int:
    """One line for a Ctrl-C or SIGTERM before any work began; the exit status."""
    print("\nmergealign-fast: interrupted while starting; nothing was done", file=sys.stderr)
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
