"""A progress line on stderr for long offline runs (`hqsmem bag`, `hqsmem bags`): frames done,
frames/s and ETA. Written here because it is 60 lines and tqdm is not a dependency (`hqsmem
bags` uses tqdm's bar on a terminal where it is installed)."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional


class Progress:
    """On a terminal the line is redrawn in place (about 5 times a second); otherwise (a log
    file, CI) one line is printed every `log_every` seconds. With `callback`, nothing is printed:
    callback(done, total) is called on every update instead."""

    def __init__(self, total: int, stream=None, enabled: bool = True, log_every: float = 10.0,
                 callback: Optional[Callable[[int, int], None]] = None, name: str = "hqsmem bag"):
        self.total = max(0, int(total))
        self.callback = callback
        self.name = name
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.2 if self.tty else log_every
        self.start = time.perf_counter()
        self.last = -math.inf
        self.width = 0

    def line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * done / self.total
            left = (self.total - done) / rate if rate > 0 else float("nan")
            eta = hms(left) if math.isfinite(left) else "?"
            return f"{self.name}: {done}/{self.total} frames {pct:5.1f}%  {rate:6.1f} frames/s  ETA {eta}"
        return f"{self.name}: {done} frames  {rate:6.1f} frames/s"

    def update(self, done: int, force: bool = False) -> None:
        if self.callback is not None:
            self.callback(done, self.total)
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        text = self.line(done)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """Another line of output, printed above the progress line (redrawn by the next update)."""
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width, self.last = 0, -math.inf
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, done: int) -> None:
        if self.callback is not None or not self.enabled:
            return
        self.update(done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
