"""The `mergealign-fast` command's entry point: process set-up before anything heavy is imported.

- Standard streams that were closed (`>&-`) are reopened on /dev/null, so that no file the merge
  opens takes their descriptor and no summary print fails a finished merge.
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


def main(argv=None) -> int:
    try:  # cli.main handles interrupts once it runs; before that, this does
        _reopen_closed_std_streams()
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
