"""Our own kernels for ONNX Runtime's CPU provider: the decoder's 4-bit (and 8-bit) linears and its attention.

Why a kernel of our own (the architecture says "ORT contrib ops where they are the fast path"):
ONNX Runtime 1.32's MatMulNBits re-packs every 4-bit weight when a session is created (most of a
2B bundle's load time: 2.35 s against 0.55 s with this kernel) and its prefill path is slower here;
decode speed is the same for both, memory-bound (docs/performance-notes.md, "4-bit
linears"). `q4gemm.c` computes the same thing (int8 activations per block, results equal to MLAS's
within float rounding): each constant weight copied once at load into one sequential stream per 8
columns on 2 MB pages (ORT's memory-mapped original handed back; decode 1.1x faster than on the
stored layout: docs/performance-notes.md), scales and zero points laid out once,
weight loads prefetched ahead, a column-major int8 GEMM for prefill; on VNNI CPUs also 8-bit
weights (the lm_head at --lm-head-bits 8).

Attention (`attention.c`): ONNX Runtime's CPU GroupQueryAttention works one query head at a time,
reading a KV head's cache once for each of the query heads that share it. Ours reads each KV head
once for the query heads that share it, with a running softmax; on InternVL3-2B shapes the decoder's
28 attention nodes take 1.3 ms per token at context 300 against ORT's 2.6, and decode at context 1500
is 1.17x faster (docs/performance-notes.md, "Attention"). Prefill
rows take the decode row path one by one, so that a prompt's KV rows do not depend on how it was
chunked (batch invariance, the default); with INTERNVL_EDGE_BATCH_INVARIANT=0 chunks of 8 rows and
more take a tiled path instead (keys turned around once per call, 4 queries x 64 keys of
multiply-add chains), faster on long prompts. The cache is float16 for 4-bit and half-precision
bundles (passes.halve_caches, settings.py's INTERNVL_EDGE_KV_CACHE): each block of 16 cached rows is
widened to float32 once, in L1, for all the query heads that share it; decode at context 1500 1.05x
faster on InternVL3-2B shapes (docs/performance-notes.md, "Attention"). The 4-bit linears compute every row in one order
whatever tile computes it, with no opt-out (q4gemm.c, q4_block_end).

The vision encoder (`bf16gemm.c`): where the CPU has AVX512-BF16 (and AMX-BF16: Sapphire Rapids and
later; Zen 4 and later have the first only), its float linears read the checkpoint's bfloat16 weights
as they are (MatMulBf16: no float32 copy at load) and multiply bfloat16-rounded activations with them,
summing in float32, and on AMX its attention runs the same way (the numerics of transformers running
the model in bfloat16, without rounding the sums): 2.9x faster than ONNX Runtime's float32 on a 2-core
AMX machine, 0.6 GB less memory (BENCHMARKS.md, "bfloat16 vision"). INTERNVL_EDGE_BF16=avx512bf16 keeps
AMX out, =none the float32 encoder.

It is a custom-op library (`ort_op.c`, `ort_attention.c`: plain C against ONNX Runtime's C ABI)
built by `pip install` as `_q4*.so`. The bundle keeps standard `com.microsoft` nodes; at load the
decoder's 4-bit MatMulNBits with int8 activations (accuracy_level 4) and its GroupQueryAttention
nodes of the form nets/decoder.py writes are moved to the `ai.internvl_edge` domain in memory when
the library is here and the CPU can run it (x86-64 with AVX2+FMA+F16C; VNNI when present). Elsewhere
(another CPU, no compiler at install, INTERNVL_EDGE_KERNELS=0) nothing changes: the same bundle runs
on ONNX Runtime's kernels.

The package: `library.py` finds and loads the compiled library and reads its counters, `settings.py`
reads the environment's flags once (`KernelSettings`), `passes.py` moves and fuses the decoder graph's
nodes onto our kernels over one `GraphIndex`. The C side, one name prefix per component: `q4_` the
4-bit GEMM (q4gemm.c), `bf16_` the vision encoder's bfloat16 GEMM and attention (bf16gemm.c), `attn_`
attention (attention.c), `norm_` the RMS norm (rms_norm.c), `isa_` the
CPU detection (isa.c), `ort_` the ONNX Runtime ABI and glue (ort_abi.h, ort_glue.c, ort_op.c,
ort_attention.c, ort_bf16.c); `*_isa.inc` are the kernels' bodies, compiled once per instruction set.
"""

from .library import (
    EIGHT_BIT_ISAS,
    PACKED_4BIT_ISAS,
    bf16_pack_stats,
    bf16_path,
    isa,
    library_path,
    pack_stats,
    paired_swiglus,
    path8,
    prefetch_hint,
    room_held,
    table_stats,
)
from .passes import (
    ATTENTION_ISAS,
    ATTENTION_OP,
    BF16_OP,
    DOMAIN,
    LAYER_OP,
    OP,
    SOURCE_DOMAIN,
    VISION_ATTENTION_OP,
    GraphIndex,
    fold_qk_norms,
    fuse_layers,
    fuse_norms,
    fuse_swiglu,
    rewrite,
    rewrite_vision,
    table_inputs,
    takes,
    takes_attention,
    takes_vision_attention,
)
from .settings import KV_VARIABLE, KernelSettings, settings

__all__ = [
    "ATTENTION_ISAS",
    "ATTENTION_OP",
    "BF16_OP",
    "DOMAIN",
    "LAYER_OP",
    "EIGHT_BIT_ISAS",
    "bf16_pack_stats",
    "bf16_path",
    "OP",
    "PACKED_4BIT_ISAS",
    "SOURCE_DOMAIN",
    "VISION_ATTENTION_OP",
    "GraphIndex",
    "KV_VARIABLE",
    "KernelSettings",
    "fold_qk_norms",
    "fuse_layers",
    "fuse_norms",
    "fuse_swiglu",
    "isa",
    "library_path",
    "pack_stats",
    "paired_swiglus",
    "path8",
    "prefetch_hint",
    "rewrite",
    "rewrite_vision",
    "settings",
    "table_inputs",
    "room_held",
    "table_stats",
    "takes",
    "takes_attention",
    "takes_vision_attention",
]
