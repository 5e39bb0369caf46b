"""The compiled library (`_q4*.so`, built by `pip install`): finding and loading it, the instruction
set it runs with here, and the counters it keeps (read through ctypes from the same library ONNX
Runtime loaded, so one copy of them)."""

from __future__ import annotations

import ctypes
import glob
import os
from functools import cache

from .settings import settings

EIGHT_BIT_ISAS = ("avx512vnni", "avxvnni")  # q4gemm's 8-bit path needs u8 x s8 products summed in int32
PACKED_4BIT_ISAS = ("avx512vnni", "avxvnni", "avx2")  # where q4gemm repacks 4-bit weights


@cache
def _library() -> tuple[str, str] | None:
    """(path, instruction set) of the compiled library when it is installed, loadable and the CPU
    can run it (its ISA is not "none"); else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_q4*.so")) + glob.glob(os.path.join(here, "_q4*.pyd"))):
        try:
            lib = ctypes.CDLL(path)
            lib.q4_kernel_isa.restype = ctypes.c_char_p
            name = lib.q4_kernel_isa().decode()
        except (OSError, AttributeError):
            continue
        if name != "none":
            return path, name
    return None


def library_path() -> str | None:
    """The compiled library when it is installed, loadable, the CPU can run it and
    INTERNVL_EDGE_KERNELS allows any of it (settings.py); else None."""
    if not settings().any:
        return None
    found = _library()
    return found[0] if found else None


def isa() -> str | None:
    """The instruction set the kernels run with here ("avx512vnni", "avxvnni", "avx2"), or None: the
    best this CPU has, or the one INTERNVL_EDGE_ISA names (the tests run every variant that way)."""
    return _library()[1] if library_path() is not None else None


def prefetch_hint() -> str | None:
    """How the 4-bit linears and attention prefetch the weights and KV rows they read once per token
    ("nta": non-temporally, on AMD; "t2": into L2, elsewhere; INTERNVL_EDGE_PREFETCH overrides it:
    isa.h), or None where our kernels do not run."""
    return _name("q4_prefetch_hint")


def path8() -> str | None:
    """Where 8-bit weights (the decoder's lm_head) run here: "amx" (AMX-INT8 tiles) or "vnni" (the
    8-column VNNI tiles; INTERNVL_EDGE_AMX=0 keeps them there), or None where our kernels do not take
    them (no library, or an instruction set without VNNI)."""
    name = _name("q4_kernel_path8")
    return None if name == "none" else name


def bf16_path() -> str | None:
    """Where the vision encoder's bfloat16 linears run here ("amx", "avx512bf16"), or None: no library,
    a CPU with neither AMX-BF16 nor AVX512-BF16, or INTERNVL_EDGE_BF16=none (bf16gemm.h). The library
    caps it as INTERNVL_EDGE_BF16 says ("avx512bf16": not AMX), so the tests can run both paths."""
    name = _name("bf16_kernel_path")
    return None if name == "none" else name


def _name(symbol: str) -> str | None:
    """The string the library's function `symbol` returns, or None where our kernels do not run."""
    found = _library() if library_path() is not None else None
    if found is None:
        return None
    fn = getattr(ctypes.CDLL(found[0]), symbol)
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _counters(symbol: str, count: int) -> tuple[int, ...]:
    """The `count` uint64 counters the library's `symbol` reports (0s without the library)."""
    found = _library()
    if found is None:
        return (0,) * count
    values = [ctypes.c_uint64() for _ in range(count)]
    getattr(ctypes.CDLL(found[0]), symbol)(*(ctypes.byref(v) for v in values))
    return tuple(v.value for v in values)


def pack_stats() -> tuple[int, int]:
    """(bytes of 4- and 8-bit weights our MatMulNBits kernels copied into their sequential layout in
    this process, bytes of ONNX Runtime's memory-mapped originals handed back to the page cache)."""
    return _counters("q4_pack_stats", 2)


def bf16_pack_stats() -> tuple[int, int]:
    """(bytes of bfloat16 weights our MatMulBf16 kernels copied into their packed layout in this
    process, bytes of ONNX Runtime's memory-mapped originals handed back to the page cache)."""
    return _counters("bf16_pack_stats", 2)


def table_stats() -> tuple[int, int]:
    """(bytes of scale tables with float16 scales, bytes with float ones) our MatMulNBits kernels made
    in this process: float16 where every scale of a weight is a float16 value (q4gemm.h)."""
    return _counters("q4_table_stats", 2)


def room_held() -> int:
    """Bytes our kernels keep for the intermediate values of their calls (ort_glue.h, ort_room_take):
    what a prefill's layers share, handed back when a decode-sized call runs."""
    return _counters("q4_room_held", 1)[0]


def paired_swiglus() -> int:
    """How many fused SwiGLU linears our kernels made in this process hold each task's gate and up
    weights side by side (q4gemm.h, q4_pair_swiglu): those with a packed B, a table and no bias."""
    return _counters("q4_paired_count", 1)[0]
