"""The `mergealign-fast` command's entry point: process set-up before anything heavy is imported.

- Standard streams that were closed (`>&-`) are reopened on /dev/null, so that no file the merge
  opens takes their descriptor and no summary print fails a finished merge; one that breaks
  while the merge runs (`2>&1 | head -1`, `2>/dev/full`) is silenced, not fatal.
- SIGTERM ends the run like Ctrl-C: completed shards are kept for --resume and a message says so
  (exit 143), instead of a silent death.
- Ctrl-C while the program is still loading ends with one line, not a traceback.
"""

import os
import signal
import sys

from .interrupts import (EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, interrupt_in,  # noqa: F401
                         interrupted_while_starting)


def _on_sigterm(signum, frame):
    raise Terminated()


def _reopen_closed_std_streams() -> None:
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, mode)  # the lowest free descriptor: fd itself
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


class _StreamThatCannotFail:
    """stdout or stderr whose write errors (a reader that went away, `| head -1`; a full disk,
    `2>/dev/full`) do not fail the merge: the stream is pointed at /dev/null from then on, and
    the run's exit status is the merge's."""

    def __init__(self, stream, fd: int):
        self._stream, self._fd = stream, fd

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            self._silence()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._silence()

    def _silence(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._fd)
        os.close(devnull)
        try:
            self._stream.flush()  # what was buffered goes to /dev/null, not to a later error
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _forgiving_std_streams() -> None:
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if not isinstance(stream, _StreamThatCannotFail):
            setattr(sys, name, _StreamThatCannotFail(stream, fd))


def main(argv=None) -> int:
    try:  # cli.main handles interrupts once it runs; before that, this does
        _reopen_closed_std_streams()
        _forgiving_std_streams()
        signal.signal(signal.SIGTERM, _on_sigterm)
        from .main import main as cli_main

        return cli_main(argv)
    except BaseException as exc:  # noqa: BLE001 - only interrupts are handled here
        interrupt = interrupt_in(exc)
        if interrupt is None:
            raise
        return interrupted_while_starting(interrupt)


def mergekit_yaml() -> int:
    """`mergealign-mergekit-yaml CONFIG OUT [mergekit's flags]`: what `alias mergekit-yaml=`
    points at."""
    return main(["mergekit-yaml", *sys.argv[1:]])


def mergekit_extract_lora() -> int:
    """`mergealign-mergekit-extract-lora --model M --base-model B --out-path O [flags]`: what
    `alias mergekit-extract-lora=` points at."""
    return main(["mergekit-extract-lora", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
