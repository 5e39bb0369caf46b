"""Our own 4-bit matmul for ONNX Runtime's CPU provider, used for the decoder's 4-bit linears.

Why a kernel of our own (the architecture says "ORT contrib ops where they are the fast path"):
ONNX Runtime 1.32's MatMulNBits re-packs every 4-bit weight when a session is created (most of a
2B bundle's load time: 2.35 s against 0.55 s with this kernel) and its prefill path is slower here;
decode speed is the same for both, memory-bound (BENCHMARKS.md, "Our 4-bit kernel against ONNX
Runtime's"). `q4gemm.c` computes the same thing (int8 activations per block, the weight layout as
stored, results equal to MLAS's within float rounding): scales and zero points laid out once at
load, 64-byte weight loads prefetched ahead for decode, a column-major int8 GEMM for prefill.

It is a custom-op library (`ort_op.c`, plain C against ONNX Runtime's C ABI) built by `pip install`
as `_q4*.so`. The bundle keeps standard `com.microsoft.MatMulNBits` nodes; at load the decoder's
4-bit nodes with int8 activations (accuracy_level 4) are moved to the `ai.internvl_edge` domain in
memory when the library is here and the CPU can run it (x86-64 with AVX2+FMA; VNNI when present).
Elsewhere (another CPU, no compiler at install, INTERNVL_EDGE_KERNELS=0) nothing changes: the same
bundle runs on MLAS.
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import cache

DOMAIN = "ai.internvl_edge"
SOURCE_DOMAIN = "com.microsoft"
OP = "MatMulNBits"
CHUNK = 64  # q4gemm.c reads B 64 weights at a time: blocks must be a multiple of it


@cache
def library_path() -> str | None:
    """The compiled library when it is installed, loadable and the CPU can run it; else None."""
    if os.environ.get("INTERNVL_EDGE_KERNELS", "1") == "0":
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_q4*.so")) + glob.glob(os.path.join(here, "_q4*.pyd"))):
        try:
            lib = ctypes.CDLL(path)
            lib.internvl_edge_kernel_isa.restype = ctypes.c_char_p
            if lib.internvl_edge_kernel_isa().decode() != "none":
                return path
        except (OSError, AttributeError):
            continue
    return None


@cache
def isa() -> str | None:
    """The instruction set the kernel runs with here ("avx512vnni", "avxvnni", "avx2"), or None."""
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    lib.internvl_edge_kernel_isa.restype = ctypes.c_char_p
    return lib.internvl_edge_kernel_isa().decode()


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def takes(node) -> bool:
    """Whether q4gemm computes this node: a com.microsoft MatMulNBits with 4-bit weights in blocks of
    a multiple of 64, int8 activations (accuracy_level 4: what the kernel does) and no g_idx."""
    if node.op_type != OP or node.domain != SOURCE_DOMAIN:
        return False
    a = _attrs(node)
    has_g_idx = len(node.input) > 4 and node.input[4] != ""
    return (a.get("bits") == 4 and a.get("accuracy_level", 0) == 4 and a.get("block_size", 0) % CHUNK == 0
            and not has_g_idx)  # fmt: skip


def rewrite(model, threads: int | None = None) -> int:
    """Move the nodes q4gemm takes to our domain (in place, graph only). Returns how many moved.
    `threads`: the session's intra-op threads; each node then splits its work into 2 contiguous
    ranges per thread (attribute `batches`; the op's default is 8)."""
    from onnx import helper

    moved = 0
    for node in model.graph.node:
        if takes(node):
            node.domain = DOMAIN
            if threads:
                node.attribute.append(helper.make_attribute("batches", 2 * int(threads)))
            moved += 1
    if moved and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return moved
