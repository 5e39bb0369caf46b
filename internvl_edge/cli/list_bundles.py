"""`internvl-edge list`: the bundles in the bundle home, one line each."""

from __future__ import annotations

import json

from .names import HOME_VARIABLE, bundle_home, human_bytes, named_bundles


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def main(args) -> int:
    bundles = named_bundles()
    if args.json:
        print(json.dumps(bundles, indent=2))
        return 0
    if not bundles:
        print(
            f"no bundles in {bundle_home()} (${HOME_VARIABLE}); make one with `internvl-edge convert ... --name NAME`"
        )
        return 0
    head = ("NAME", "SOURCE", "MODE", "TARGET", "SIZE", "CONTEXT", "DATE")
    rows = [_row(b) for b in bundles]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _row(b: dict) -> tuple[str, ...]:
    date = b["date"].replace("T", " ").rstrip("Z")
    return (b["name"], b["source"], b["mode"], b["target"], human_bytes(b["bytes"]), str(b["context"]), date)
