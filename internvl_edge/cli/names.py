"""Bundle names: a bundle home ($INTERNVL_EDGE_HOME, default `<user cache>/internvl-edge/bundles`) where
`convert --name NAME` writes and where `-m NAME`, `list` and `rm` look, as ollama keeps its models."""

from __future__ import annotations

import json
import os

from ..bundle import MANIFEST, user_cache_dir
from ..errors import UserError

HOME_VARIABLE = "INTERNVL_EDGE_HOME"


def bundle_home() -> str:
    home = os.environ.get(HOME_VARIABLE)
    return os.path.expanduser(home) if home else os.path.join(user_cache_dir(), "bundles")


def check_name(name: str) -> str:
    """A bundle name is one folder name: letters, digits and `._-`, not starting with a dot."""
    ok = name and not name.startswith(".") and all(c.isalnum() or c in "._-" for c in name)
    if not ok:
        raise UserError(f"bundle name {name!r}: use letters, digits, '.', '_' and '-' only, not starting with '.'")
    return name


def is_name(text: str) -> bool:
    return bool(text) and os.sep not in text and "/" not in text and not text.startswith((".", "~"))


def resolve_bundle(model: str) -> str:
    """`-m`: a bundle folder, else a name in the bundle home; a miss says where both were looked for."""
    path = os.path.expandvars(os.path.expanduser(model))
    if os.path.exists(path) or not is_name(model):
        return path
    named = os.path.join(bundle_home(), model)
    if os.path.isdir(named):
        return named
    raise UserError(
        f"bundle not found: {model} (no such folder, and no bundle named {model} in {bundle_home()}; "
        "see `internvl-edge list`)"
    )


def describe(path: str) -> dict | None:
    """name, source, mode, target, size, context and date of the bundle at `path` (None: not a bundle)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        opts, files = m.get("options", {}), m.get("files", {})
        return {
            "name": os.path.basename(os.path.normpath(path)),
            "source": os.path.basename(os.path.normpath(m.get("source", {}).get("path", "") or "?")),
            "mode": opts.get("quantize", "?"),
            "target": m.get("target", {}).get("chip", "?"),
            "bytes": sum(int(f.get("bytes", 0)) for f in files.values()),
            "context": opts.get("seq_length"),
            "date": m.get("created_at", ""),
            "path": os.path.abspath(path),
        }
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def named_bundles() -> list[dict]:
    home = bundle_home()
    if not os.path.isdir(home):
        return []
    found = (describe(os.path.join(home, n)) for n in sorted(os.listdir(home)) if not n.startswith("."))
    return [b for b in found if b is not None]


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
