"""Backends: run a bundle's nets behind one stage contract (base.py).

    base.py   the `Backend` protocol, `KVCache`, the forward-argument checks, device numbers
    ort.py    ONNX Runtime on the CPU, with our kernels (kernels/) as custom ops
    bmrt.py   a Sophgo bmodel through libbmrt (sophgo/bmrt.py's ctypes): a board or the chip simulator

`open_backend` lives here rather than in base.py: it is the one place that knows every implementation,
and each implementation imports base.py, so base.py must not import them back.
"""

from __future__ import annotations

from ..bundle import Manifest
from ..errors import UserError
from .base import Backend


def open_backend(manifest: Manifest, threads: int | None = None, devid=None, log=None, edits=None) -> Backend:
    """The backend the bundle's target names. Implementations load on first use: a CPU process never
    imports the Sophgo runtime's ctypes, nor a Sophgo one ONNX Runtime."""
    backend = manifest.platform.backend
    if backend == "onnxruntime":
        from .ort import OrtBackend

        return OrtBackend(manifest, threads=threads, devid=devid, log=log, edits=edits)
    if backend == "bmrt":  # Sophgo bmodel: libsophon on a board, else TPU-MLIR's chip simulator
        from .bmrt import BmrtBackend

        return BmrtBackend(manifest, threads=threads, devid=devid, log=log)
    raise UserError(f"bundle backend {backend!r} is not available in this installation")
