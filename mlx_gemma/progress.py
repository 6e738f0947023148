"""A small progress bar for long work (conversion, training), quiet off a terminal.

On a terminal it redraws one line on stderr; elsewhere (CI logs, pipes) it
prints nothing until `close()`, which prints one summary line.  `enabled=False`
(e.g. `convert(..., progress=False)`) silences it entirely.
"""

from __future__ import annotations

import sys
import time


def format_rate(per_second: float) -> str:
    """A rate in at most three significant figures, never rounded to 0 (a 270M model on a
    CPU may train at under a token per second)."""
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.3g}"


class Progress:
    def __init__(self, label: str, total: int, unit: str = "", stream=None, enabled: bool | None = None):
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if enabled is None else enabled
        self.silent = enabled is False
        self.done, self.note, self.start = 0, "", time.perf_counter()
        self._last_draw = 0.0

    def update(self, done: int, note: str = "") -> None:
        self.done, self.note = done, note
        now = time.perf_counter()
        if self.live and (now - self._last_draw > 0.1 or done >= self.total):
            self._last_draw = now
            width = 24
            filled = int(width * min(done, self.total) / self.total)
            bar = "#" * filled + "-" * (width - filled)
            text = f"\r{self.label} [{bar}] {done}/{self.total}{self.unit} {note[:40]:<40}"
            self.stream.write(text)
            self.stream.flush()

    def __call__(self, done: int, total: int | None = None, note: str = "") -> None:
        """Callback form `(done, total, note)`, as readers and writers report."""
        if total is not None:
            self.total = max(int(total), 1)
        self.update(done, note)

    def close(self, summary: str = "") -> None:
        if self.silent:
            return
        elapsed = time.perf_counter() - self.start
        end = f"{self.label}: {summary or f'{self.done}/{self.total}{self.unit}'} in {elapsed:.1f}s"
        self.stream.write(("\r" + " " * 100 + "\r" if self.live else "") + end + "\n")
        self.stream.flush()
