"""A per-machine cache of ONNX Runtime's optimised graphs with their pre-packed weights.

Loading a net costs two things: graph optimisation (folding the Cast that widens half-precision
weights, fusions) and pre-packing (MatMulNBits rearranges its 4/8-bit blocks into the layout of the
kernel this CPU runs). Both produce the same result every time on the same machine and ONNX Runtime,
so the first load saves the optimised graph, with the folded and pre-packed weights in an external
data file (`session.save_external_prepacked_constant_initializers`), and later loads memory-map it:
no work at load and no heap copy of the weights.
https://github.com/microsoft/onnxruntime/pull/23069 (pre-packed blobs serialised and memory-mapped)

Pre-packed layouts depend on the CPU's instruction set and the runtime version, so the cache is keyed
by both (and by the net's checksums); it lives in the user's cache folder, never in the bundle.
It is opt-in (INTERNVL_EDGE_ORT_CACHE=1): it trades 1-2x the bundle in disk for a faster load; see
BENCHMARKS.md. INTERNVL_EDGE_CACHE_DIR moves it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from functools import cache

from .bundle import user_cache_dir

GRAPH = "model.onnx"
DATA = "model.data"


def cache_root() -> str:
    return os.path.join(os.environ.get("INTERNVL_EDGE_CACHE_DIR") or user_cache_dir(), "ort")


def enabled() -> bool:
    return os.environ.get("INTERNVL_EDGE_ORT_CACHE", "0") == "1"


@cache  # the same for every net of every load
def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def cache_key(ort_version: str, checksums: list[str]) -> str:
    text = "|".join([ort_version, _cpu_signature(), "all", *checksums])  # "all": ORT_ENABLE_ALL graphs
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_graph(key: str) -> str | None:
    path = os.path.join(cache_root(), key, GRAPH)
    return path if os.path.isfile(path) and os.path.isfile(os.path.join(cache_root(), key, DATA)) else None


def build(ort, source: str, key: str, make_options):
    """Create a session for `source` while ORT writes its optimised, pre-packed copy into the cache.
    Returns the session (usable right away). Any failure leaves no cache entry behind."""
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
    try:
        so = make_options()
        so.optimized_model_filepath = os.path.join(staging, GRAPH)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        session = ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
        if not os.path.isfile(os.path.join(staging, DATA)):  # nothing large enough: not worth caching
            shutil.rmtree(staging, ignore_errors=True)
            return session
        final = os.path.join(root, key)
        try:
            os.rename(staging, final)
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
        return session
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
