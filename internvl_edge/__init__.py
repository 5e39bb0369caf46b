"""internvl-edge: convert InternVL3 checkpoints into a compiled bundle and chat with it on edge hardware."""

from .version import __version__

__all__ = ["__version__", "load"]


def load(bundle: str, threads: int | None = None, device=None, config_path: str | None = None):
    """Open a bundle folder written by `internvl-edge convert` (see internvl_edge.api.load)."""
    from .api import load as _load

    return _load(bundle, threads=threads, device=device, config_path=config_path)
