"""Writing the benchmark scripts' records: a file is replaced whole or not at all (a run stopped
half-way leaves the previous results.json or BENCHMARKS.md as it was)."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
