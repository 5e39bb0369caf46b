/* The vision encoder's float linears in bfloat16: Y = bf16(A) @ B + bias, B a bfloat16 weight [K, N]
 * kept as the checkpoint stores it (no float32 copy), A rounded to bfloat16 (nearest even), every
 * product exact in float32 and summed in float32: the numerics of a bfloat16 matmul as PyTorch runs
 * one on the CPU (bfloat16 inputs, float32 accumulation), without its rounding of Y to bfloat16.
 *
 * Two paths, chosen once per process (bf16_path, capped by INTERNVL_EDGE_BF16): AMX-BF16 tiles
 * (TDPBF16PS: 16 x 16 sums of 32 products each) where the CPU and the kernel allow them, else
 * AVX512-BF16 (VDPBF16PS: 16 sums of 2 products per instruction). Both read B from bf16_pack's
 * layout, made once per weight when the session is created: per 16 columns, the K/2 pairs of rows,
 * each the 16 columns' (even k, odd k) values side by side, the order both instructions take B in.
 * A row's result does not depend on the other rows of the call (the K order is the same for every
 * row), so a tile's embeddings are the same alone or in a batch of tiles.
 *
 * A call: bf16_round (A to bfloat16, rows padded to BF16_ROWS with zeros), then bf16_run for tasks
 * 0 .. bf16_tasks() - 1 on any threads (a task: BF16_COLS columns of BF16_TASK_ROWS rows).
 */
#ifndef INTERNVL_EDGE_BF16GEMM_H
#define INTERNVL_EDGE_BF16GEMM_H

#include <stddef.h>
#include <stdint.h>

#define BF16_ROWS 32       /* A's rows are padded to a multiple of this (the AMX path's block of rows) */
#define BF16_COLS 32       /* a task's columns: two blocks of 16 */
#define BF16_TASK_ROWS 128 /* a task's rows (the last task of a column may have fewer) */
#define BF16_K_STEP 32     /* K is padded to a multiple of this (one AMX tile of A: 32 bfloat16 per row) */

typedef enum { BF16_NONE, BF16_AVX512, BF16_AMX } bf16_path_t;

typedef struct {
    int64_t m, k, n;         /* Y [m, n] = bf16(A) [m, k] @ B [k, n] + bias */
    const float *a;          /* [m, k] */
    uint16_t *a16;           /* bf16_round's output: [bf16_rows(m), bf16_kp(k)] bfloat16 bits */
    const uint16_t *packed;  /* bf16_pack's layout of B */
    const float *bias;       /* [n] or NULL */
    float *y;                /* [m, n] */
    bf16_path_t path;        /* bf16_path() when the call was planned */
} bf16_problem;

/* The path this process runs: the best the CPU (and, for AMX, the kernel: Linux's permission to use
 * the tile registers) allows, capped by INTERNVL_EDGE_BF16 ("avx512bf16": not AMX; "none": neither). */
bf16_path_t bf16_path(void);
const char *bf16_path_name(bf16_path_t path);

static inline int64_t bf16_kp(int64_t k) { return (k + BF16_K_STEP - 1) / BF16_K_STEP * BF16_K_STEP; }
static inline int64_t bf16_rows(int64_t m) { return (m + BF16_ROWS - 1) / BF16_ROWS * BF16_ROWS; }
static inline int64_t bf16_np(int64_t n) { return (n + BF16_COLS - 1) / BF16_COLS * BF16_COLS; }

/* Bytes of bf16_pack's layout for B [k, n]. */
size_t bf16_packed_bytes(int64_t k, int64_t n);
/* B [k, n] (row-major bfloat16 bits) into the packed layout (zeros past k and n). */
void bf16_pack(const uint16_t *b, int64_t k, int64_t n, uint16_t *out);
/* A into p->a16 (bfloat16, nearest even; NaN stays NaN), padding rows and columns with zeros. */
void bf16_round(const bf16_problem *p);
size_t bf16_tasks(const bf16_problem *p);
void bf16_run(const bf16_problem *p, size_t task);

/* The vision encoder's attention (com.microsoft MultiHeadAttention as nets/vision.py writes it: q, k, v
 * [batch, seq, heads x head_dim], no mask, not causal) on AMX only: per head, S = bf16(Q) bf16(K)^T
 * summed in float32, softmax(scale S) in float32 over the keys, P rounded to bfloat16, O = P bf16(V)
 * summed in float32: transformers' eager attention run in bfloat16 (its softmax in float32), without its
 * rounding of S and O to bfloat16. A call: bf16_attn_pack for tasks 0 .. batch x heads - 1 (each head's
 * keys and values into bf16_pack's layout, in the scratch), then bf16_attn_run for tasks 0 ..
 * bf16_attn_tasks() - 1 (a task: 32 query rows of one head). */
#define BF16_ATTN_MAX_HEAD 256

typedef struct {
    int64_t batch, seq, heads, head_dim;
    float scale;
    const float *q, *k, *v; /* [batch, seq, heads x head_dim] */
    float *out;             /* the same shape */
    uint16_t *scratch;      /* bf16_attn_scratch_bytes() */
} bf16_attn_problem;

size_t bf16_attn_scratch_bytes(const bf16_attn_problem *p);
void bf16_attn_pack(const bf16_attn_problem *p, size_t task);
size_t bf16_attn_tasks(const bf16_attn_problem *p);
void bf16_attn_run(const bf16_attn_problem *p, size_t task);

#endif
