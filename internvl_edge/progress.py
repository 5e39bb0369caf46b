"""Progress lines for long steps (conversion, loading, benchmarks), on stderr.

On a terminal one line is rewritten in place; in a pipe or a log a line is printed when a step starts,
at most every 10% of it, and when it ends, so logs stay short but never silent.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, prefix: str = "", stream=None, enabled: bool = True):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._step = ""
        self._last_decile = -1
        self._t0 = time.perf_counter()
        self._step_t0 = self._t0

    def _write(self, text: str, final: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, name: str) -> None:
        self._step = name
        self._last_decile = -1
        self._step_t0 = time.perf_counter()
        self._write(f"{self.prefix}{name} ...", final=not self.tty)

    def update(self, done: int, total: int, detail: str = "") -> None:
        decile = int(10 * done / max(total, 1))
        if not self.tty and decile == self._last_decile and done != total:
            return
        self._last_decile = decile
        extra = f" {detail}" if detail else ""
        self._write(f"{self.prefix}{self._step} {done}/{total}{extra}", final=not self.tty)

    def done(self, note: str = "") -> None:
        took = time.perf_counter() - self._step_t0
        self._write(f"{self.prefix}{self._step} done in {took:.1f} s{(' ' + note) if note else ''}", final=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0
