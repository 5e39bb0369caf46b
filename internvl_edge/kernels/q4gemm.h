/* Y = A @ dequant(B)^T for 4-bit block-quantised B in ONNX Runtime's MatMulNBits layout, with the
 * activations quantised to int8 per block (what MatMulNBits' accuracy_level=4 does), on x86-64
 * VNNI (AVX512-VNNI or AVX-VNNI) or AVX2.
 *
 * Layout (https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits):
 *   B            uint8 [N, ceil(K/block), block/2]   weight k = 2j of a block in the low nibble of
 *                                              byte j; a partial last block is padded with zeros
 *   scales       float [N, ceil(K/block)]
 *   zero_points  uint8 [N, ceil(K/block/2)]    block 2i in the low nibble of byte i; NULL means 8
 *
 * With `swiglu` set, a task computes matching gate and up columns and writes their product, so
 * the pair's [M, N] result never leaves the cache it was computed in.
 *
 * Use: q4_plan() once per call (checks the shapes, says how much scratch), q4_quantize() once
 * (one thread), then q4_run() for every task 0 .. plan.tasks-1, from any threads, in any order.
 */
#ifndef INTERNVL_EDGE_Q4GEMM_H
#define INTERNVL_EDGE_Q4GEMM_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const float *a;           /* [M, K] */
    const uint8_t *b;         /* [N, ceil(K/block), block/2], or q4_pack's layout when `packed` */
    const float *scales;      /* [N, ceil(K/block)] */
    const uint8_t *zero_points; /* [N, ceil(K/block/2)] or NULL */
    const float *bias;        /* [N] or NULL */
    float *y;                 /* [M, N] */
    int64_t m, n, k, block;
    void *scratch;            /* q4_plan().scratch_bytes, 64-byte aligned */
    const void *blocks;       /* q4_blocks_fill()'s table for these scales/zero points, or NULL */
    int blocks_f16;           /* that table holds the scales as float16 (q4_blocks_fill's f16) */
    float *swiglu;            /* NULL, or [M, N/2]: silu(Y[:, :N/2]) * Y[:, N/2:] (Qwen's gate/up
                                 pair fused in one linear), with y then a scratch [M, N] */
    int packed;               /* b is in q4_pack()'s layout */
    int swiglu_paired;        /* with swiglu: b and blocks in q4_pair_swiglu()'s order, y's columns too */
    int bits;                 /* 4 (0 reads as 4) or 8: then b must be packed and blocks given (q4_plan) */
} q4_problem;

typedef struct {
    size_t scratch_bytes;
    size_t tasks;
} q4_plan_t;

/* 0 when this CPU can run the kernel (x86-64 with AVX2, FMA and F16C at least), else -1. */
int q4_supported(void);
/* A name for the instruction set the kernel runs with here ("avx512vnni", "avxvnni", "avx2"). */
const char *q4_isa(void);
/* 0 and the plan, or -1 when the shapes are not supported (block not a multiple of 64, or above
 * 1024; with swiglu, N not a multiple of 16). */
int q4_plan(const q4_problem *p, q4_plan_t *plan);
void q4_quantize(const q4_problem *p);
/* Scales and zero points rearranged for the decode path, prepared once per weight (the op does it
 * when the session is created, from the constant initializers): its size (0: no table is used for
 * these shapes on this CPU) and the filling, which reads p->n, k, block, scales and zero_points.
 * Per 8 columns and block, the 8 scales then the 8 zero points (one byte each): 40 bytes with float
 * scales, 24 with float16 ones (f16 = 1: allowed when q4_scales_fit_f16 says so). Decode reads the
 * table with the weights every token: 24 bytes instead of 40 per 512 bytes of 4-bit weights, 3% less
 * of a 4-bit linear to read (docs/performance-notes.md, "4-bit linears"). */
size_t q4_blocks_bytes(int64_t n, int64_t k, int64_t block, int bits, int f16);
void q4_blocks_fill(const q4_problem *p, void *table, int f16);
/* 1 when every one of the `count` scales is exactly a float16 value (AWQ checkpoints store float16
 * scales; nets/quant.py rounds its own to float16), else 0. */
int q4_scales_fit_f16(const float *scales, size_t count);
void q4_run(const q4_problem *p, size_t task);

/* B rearranged so that decode reads it as one sequential stream, what the hardware prefetcher
 * follows at full speed (the stored layout is 8 interleaved column streams to it: a model of the
 * decode loop read it at 76% of a plain read's speed, this one at 93-96%, on 2 cores;
 * benchmarks/stream_layouts.c, docs/performance-notes.md). Per group
 * of 8 columns, per 128 weights of the (padded) K, the 8 columns' 64 bytes one after the other,
 * each as stored:
 *
 *   packed[n / 8][k / 128][n % 8][64 bytes]   (the same size as B)
 *
 * q4_packed_bytes: its size, or 0 where the kernel takes no packed B (N not a multiple of 8, or
 * blocks not a multiple of 128). q4_pack reads p->n, k, block, bits, b (stored layout) and writes `out`.
 *
 * 8-bit weights (ONNX Runtime's MatMulNBits with bits=8: one byte per weight, zero point 128 unless
 * given; the decoder's lm_head at --lm-head-bits 8) are computed from this layout only, on the VNNI
 * instruction sets (u8 x s8 products summed in int32: AVX2's 16-bit pair sums would saturate):
 *
 *   packed8[n / 8][k / 64][n % 8][32 even-k bytes | 32 odd-k bytes]   (N padded to whole groups of 8)
 *
 * each 64 weights in the order the activations are quantised in, so one load pairs with them as is. */
size_t q4_packed_bytes(int64_t n, int64_t k, int64_t block, int bits);
/* Where 8-bit weights run here: "amx" (AMX-INT8 tiles, with the AVX-512 build; INTERNVL_EDGE_AMX=0
 * turns it off), "vnni" (the 8-column tiles above), or "none". With "amx" packed8 is instead, per 16
 * columns (N padded to 16) and 64 weights, 16 rows of (16 columns x 4 bytes): byte i of column c in
 * row r is the weight that activation byte 4r + i of the chunk pairs with (even k first, then odd):
 *
 *   packed8_amx[n / 16][k / 64][r][n % 16][i]
 *
 * and the table covers the padding groups of 8 too (their scales 0). */
const char *q4_path8(void);
void q4_pack(const q4_problem *p, uint8_t *out);

/* A fused SwiGLU's packed weights and table put in the order its tasks read them: for each task
 * (Q4_SWIGLU_COLS gate columns, the last one maybe fewer), the groups of 8 gate columns it computes,
 * then the matching up ones. In the stored order a task read two streams 7 MB apart (InternVL3-2B)
 * and every task started both cold: the fused linear ran 1.07x slower than the same weights
 * unfused, alone (benchmarks/matmulnbits.py; docs/performance-notes.md); now the
 * tasks of a range of work are one stream. Takes 4-bit weights with N a multiple of 16, both
 * buffers made for p's shapes (f16: the table's); 0 when done, -1 (both as they were) when there is
 * no memory for the copy it works with. Set swiglu_paired for problems that read them: y (the
 * pair's scratch) then holds the columns in this order too, and bias must be NULL. */
int q4_pair_swiglu(const q4_problem *p, uint8_t *packed, void *table, int f16);

#endif
