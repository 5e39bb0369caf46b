"""What the environment lets our kernels do, read once per process (`settings()`).

INTERNVL_EDGE_KERNELS: 1 (default) our 4-bit linears and our attention both, 0 neither (the same bundle
runs on ONNX Runtime's kernels), "matmul" or "attention" only that one of ours (to compare them one at
a time); "unpacked" is 1 with the 4-bit weights read as stored instead of repacked (what the repacking
gives), "unfused" is 1 with the norms left as nodes of their own (what folding them gives: fuse_norms),
"unlayered" is 1 with each decoder layer left as five nodes (what one DecoderLayer node gives: fuse_layers).

INTERNVL_EDGE_KV_CACHE: "float16" or "float32", the element type of the KV cache where our attention
takes every attention node. Unset: float16 for bundles whose weights are 4-bit or half precision (the
cache is then half the bytes decode reads per cached token, as llama.cpp's default f16 cache), float32
for -q f32 bundles (the reference's numerics). Where ONNX Runtime's attention runs, float32 always.

More flags belong to the compiled library itself, which reads them once when ONNX Runtime first runs
it, with or without this module in the process: INTERNVL_EDGE_ISA caps the instruction set ("avx2",
"avxvnni", "avx512vnni"; the tests run every variant that way; isa.c); INTERNVL_EDGE_BATCH_INVARIANT=0
lets prefill attention take its tiled path (isa.h); INTERNVL_EDGE_PREFETCH ("nta", "t2") overrides the
prefetch hint the CPU's vendor picks (isa.h); INTERNVL_EDGE_BF16 caps the vision encoder's bfloat16
path ("avx512bf16": not AMX; "none": the float32 encoder; bf16gemm.h); INTERNVL_EDGE_AMX=0 keeps 8-bit
weights (the lm_head) off the AMX-INT8 tiles, on the 8-column VNNI ones (q4gemm.h: q4_path8).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from ..errors import UserError

VARIABLE = "INTERNVL_EDGE_KERNELS"
KV_VARIABLE = "INTERNVL_EDGE_KV_CACHE"
KV_TYPES = ("float16", "float32")


@dataclass(frozen=True)
class KernelSettings:
    matmul: bool = True  # our MatMulNBits may replace ONNX Runtime's
    attention: bool = True  # our GroupQueryAttention may replace ONNX Runtime's
    repack: bool = True  # our MatMulNBits copies constant 4-bit weights into its sequential layout
    fold_norms: bool = True  # the rewrite folds the norms that feed our linears into them
    fuse_layers: bool = True  # the rewrite makes each decoder layer one node (passes.fuse_layers)
    kv_cache: str = ""  # "float16" or "float32" (KV_VARIABLE); "": by the bundle (half_cache)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> KernelSettings:
        value = environ.get(VARIABLE, "1")
        every = value in ("1", "unpacked", "unfused", "unlayered")
        kv = environ.get(KV_VARIABLE, "")
        if kv and kv not in KV_TYPES:
            raise UserError(f"{KV_VARIABLE}={kv} is not a cache type; use float16 or float32, or leave it unset")
        return cls(
            matmul=every or value == "matmul",
            attention=every or value == "attention",
            repack=value != "unpacked",
            fold_norms=value != "unfused",
            fuse_layers=value != "unlayered",
            kv_cache=kv,
        )

    def half_cache(self, quantize: str) -> bool:
        """Whether the KV cache is float16 for a bundle converted with `-q quantize`, where our attention
        runs (INTERNVL_EDGE_KV_CACHE, else float16 unless the weights are float32)."""
        return self.kv_cache == "float16" if self.kv_cache else quantize != "f32"

    @property
    def any(self) -> bool:
        """Whether any of our kernels may run (else the library is not even registered)."""
        return self.matmul or self.attention


@cache
def settings() -> KernelSettings:
    """The process's settings, read from the environment on first use (tests that change the
    environment call `settings.cache_clear()`)."""
    return KernelSettings.from_environ()
