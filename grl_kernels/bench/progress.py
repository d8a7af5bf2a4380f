"""A minimal progress bar on stderr (a redrawn line on a terminal, one line per step otherwise)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, title: str = "", stream=None, enabled: bool = True, width: int = 24):
        self.total = max(1, int(total))
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, label: str = "") -> None:
        """Announce the step about to run (call before each of the ``total`` steps)."""
        self.done += 1
        if not self.enabled:
            return
        n = min(self.done, self.total)
        fill = int(self.width * (n - 1) / self.total)
        bar = "#" * fill + "-" * (self.width - fill)
        line = f"{self.title} [{bar}] {n}/{self.total} {time.perf_counter() - self.t0:5.0f}s {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(f"{self.title} done: {self.done} steps in {time.perf_counter() - self.t0:.1f}s\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
