"""A dependency-free progress line: bytes done, total, rate and ETA, on stderr."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from .units import human_bytes


class Progress:
    """Redraws at most 10 times a second on a terminal; elsewhere (logs, CI) a line every 10 s."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None,
                 enabled: bool = True, unit: Optional[str] = None):
        """`unit` None counts bytes; a name ("cells") counts items of it."""
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Items are slow (a tune cell takes seconds to minutes): each one is shown.
        self.interval = 0.0 if unit else 0.1 if self.tty else 10.0
        self.started = time.perf_counter()
        self.last_draw = 0.0
        self.status = ""  # shown after the counts ("2 running, 1 failed")

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        fraction = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 and not final else 0.0
        width = 24
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        amount = (f"{self.done}/{self.total} {self.unit}" if self.unit else
                  f"{human_bytes(self.done)}/{human_bytes(self.total)} {human_bytes(rate)}/s")
        status = f"{self.status} " if self.status else ""
        text = (f"{self.label} [{bar}] {fraction:6.1%} {amount} {status}"
                + (f"{elapsed:.1f}s" if final else f"ETA {eta:.0f}s"))
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + text + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter(), final=True)
