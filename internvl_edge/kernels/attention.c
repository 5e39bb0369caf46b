/* The attention kernel of attention.h: checks, plan and dispatch here; the vector code, written with
 * GCC vector extensions, in attention_isa.inc, compiled once per instruction set at the end (16-float
 * vectors for AVX-512, 8-float ones for AVX2); isa.h picks one at run time. */
/* the vectors only pass between inlined helpers: GCC's note on their ABI does not apply */
#pragma GCC diagnostic ignored "-Wpsabi"

#include "attention.h"
#include "isa.h"
#include "vec_exp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A line of the KV cache fetched ahead: non-temporally or into L2, as isa_prefetch_nta says (isa.h) */
#define ATTN_PREFETCH_LINE(addr, nta)                                                                  \
    do {                                                                                               \
        if (nta)                                                                                       \
            __builtin_prefetch((addr), 0, 0);                                                          \
        else                                                                                           \
            __builtin_prefetch((addr), 0, 1);                                                          \
    } while (0)

#define ATTN_LANES 16       /* head_dim must be a multiple of the widest vector's floats */
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_MAX_GROUP 16   /* query heads per KV head (Qwen2.5: 6 for 1.5B, 7 for 7B) */
#define ATTN_PREPARE_ROWS 16 /* rows of one prepare task */
#define ATTN_TILE_ROWS 16    /* prefill: query rows of one task, every key block read once for all of them */
#define ATTN_TILE_FROM 8     /* chunks of at least this many rows take the prefill path */
#define ATTN_SCORED 4        /* prefill: queries scored together on AVX-512 (x 4 vectors of keys: 16 chains;
                                AVX2's 16 registers hold the chains of one) */
#define ATTN_TILE_KEYS 64    /* prefill: keys per block, the running softmax updated once per block */
#ifndef ATTN_ROW_KEYS
#define ATTN_ROW_KEYS 16     /* decode (row path): keys per block, the unit of the scores and of the prefetch:
                                the block's keys and values and the next block's stay in L1 while every head
                                of the group reads them (2 x 2 x 16 x 512 bytes at head_dim 128 in float32;
                                a float16 cache's block is widened into one 8 KB buffer instead) */
#endif
#ifndef ATTN_ROW_CHUNK
#define ATTN_ROW_CHUNK 32    /* decode: keys per chunk, the running softmax updated once per chunk: 32 was the
                                fastest of 16, 32, 48, 64, 128 and 256 keys (and of blocks of 32) at context
                                1500 on one thread, in a one-off harness of this file */
#endif
_Static_assert(ATTN_ROW_CHUNK % ATTN_ROW_KEYS == 0, "a chunk is whole blocks");

static int64_t past_length(const attn_problem *p, int64_t b) {
    return (int64_t)p->seqlens_k[b] + 1 - (int64_t)p->query_lens[b];
}

/* Whether the call's rows take the tiled prefill path: chunks of ATTN_TILE_FROM rows or more, unless
 * batch invariance is asked for (the default, isa.h): the tiles score and sum in another order than
 * the row path, so a prompt's KV rows would depend on how its prefill was chunked. */
static int tiled(const attn_problem *p) { return p->rows >= ATTN_TILE_FROM && !isa_batch_invariant(); }

/* Blocks of ATTN_TILE_KEYS keys that hold the longest batch entry's keys after the step. */
static int64_t key_blocks(const attn_problem *p) {
    int64_t most = 0;
    for (int64_t b = 0; b < p->batch; b++)
        if (p->query_lens[b] > 0 && (int64_t)p->seqlens_k[b] + 1 > most) most = (int64_t)p->seqlens_k[b] + 1;
    return (most + ATTN_TILE_KEYS - 1) / ATTN_TILE_KEYS;
}

/* The turned-around keys of (b, g): blocks of [head_dim][ATTN_TILE_KEYS], after the queries. */
static float *turned_keys(const attn_problem *p, int64_t b, int64_t g) {
    return p->scratch + p->batch * p->rows * p->heads * p->head_dim +
           (b * p->kv_heads + g) * key_blocks(p) * ATTN_TILE_KEYS * p->head_dim;
}

/* Qwen3's RMS norm of one query or key head before the rotary (q_norm / k_norm, one weight per
 * dimension shared by the heads): y = x / sqrt(mean(x * x) + epsilon) * gamma, the formula of ONNX
 * Runtime's SimplifiedLayerNormalization that the graph uses where this kernel does not run. Returns
 * x itself when there is no norm (Qwen2). */
static inline __attribute__((always_inline)) const float *head_norm(const attn_problem *p, const float *x,
                                                                    const float *gamma, float *y) {
    if (!gamma) return x;
    const int64_t hd = p->head_dim;
    float squares = 0.0f;
    for (int64_t d = 0; d < hd; d++) squares += x[d] * x[d];
    const float root = __builtin_sqrtf(squares / (float)hd + p->qk_norm_epsilon);
    for (int64_t d = 0; d < hd; d++) y[d] = x[d] / root * gamma[d];
    return y;
}

/* rotate-half rotary at `pos` (x[d], x[d + h/2] turned by angle d), times `scale`, into y */
static inline __attribute__((always_inline)) void rotate(const attn_problem *p, const float *x, float *y, int64_t pos,
                                                         float scale) {
    const int64_t half = p->head_dim / 2;
    const float *c = p->cos + pos * half, *s = p->sin + pos * half;
    for (int64_t d = 0; d < half; d++) {
        const float x1 = x[d], x2 = x[d + half];
        y[d] = (x1 * c[d] - x2 * s[d]) * scale;
        y[d + half] = (x2 * c[d] + x1 * s[d]) * scale;
    }
}

int attn_supported(void) { return isa_selected() != ISA_NONE ? 0 : -1; }

int attn_plan(const attn_problem *p, attn_plan_t *plan, char *why, size_t why_size) {
    const int64_t hd = p->head_dim;
    if (hd <= 0 || hd % ATTN_LANES || hd > ATTN_MAX_HEAD_DIM) {
        snprintf(why, why_size, "head_dim %lld is not a multiple of %d up to %d", (long long)hd, ATTN_LANES,
                 ATTN_MAX_HEAD_DIM);
        return -1;
    }
    if (p->kv_heads <= 0 || p->heads % p->kv_heads || p->heads / p->kv_heads > ATTN_MAX_GROUP) {
        snprintf(why, why_size, "num_heads %lld is not a multiple of kv_num_heads %lld (at most %d per KV head)",
                 (long long)p->heads, (long long)p->kv_heads, ATTN_MAX_GROUP);
        return -1;
    }
    for (int64_t b = 0; b < p->batch; b++) {
        const int64_t q = p->query_lens[b], total = (int64_t)p->seqlens_k[b] + 1;
        if (q < 0 || q > p->rows) {
            snprintf(why, why_size, "query_seqlens[%lld] = %lld is outside 0 .. %lld rows", (long long)b, (long long)q,
                     (long long)p->rows);
            return -1;
        }
        if (q > 0 && (total - q < 0 || total > p->capacity || total > p->positions)) {
            snprintf(why, why_size, "seqlens_k[%lld] = %lld does not fit %lld new rows in a cache of %lld "
                     "(rotary tables of %lld positions)", (long long)b, (long long)p->seqlens_k[b], (long long)q,
                     (long long)p->capacity, (long long)p->positions);
            return -1;
        }
    }
    const int64_t tiles = tiled(p), blocks = tiles ? key_blocks(p) : 0;
    const int64_t queries = p->batch * p->rows * p->heads * hd;
    const int64_t turned = p->batch * p->kv_heads * blocks * ATTN_TILE_KEYS * hd;
    plan->scratch_bytes = (size_t)(queries + turned) * sizeof(float);
    plan->prepare_tasks = (size_t)(p->batch * ((p->rows + ATTN_PREPARE_ROWS - 1) / ATTN_PREPARE_ROWS));
    plan->transpose_tasks = (size_t)(p->batch * p->kv_heads * blocks);
    const int64_t units = tiles ? (p->rows + ATTN_TILE_ROWS - 1) / ATTN_TILE_ROWS : p->rows;
    plan->tasks = (size_t)(p->batch * units * p->kv_heads);
    return 0;
}

/* The vector code, once per instruction set, and the entry points that pick one. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ATTN_W 8
#define ATTN_SCORED_W 1
#define ATTN_FN(name) name##_avx2
#include "attention_isa.inc"
#undef ATTN_W
#undef ATTN_SCORED_W
#undef ATTN_FN
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define ATTN_W 16
#define ATTN_SCORED_W ATTN_SCORED
#define ATTN_FN(name) name##_avx512
#include "attention_isa.inc"
#undef ATTN_W
#undef ATTN_SCORED_W
#undef ATTN_FN
#pragma GCC pop_options

#define ATTN_DISPATCH(name)                                \
    void attn_##name(const attn_problem *p, size_t task) { \
        if (isa_selected() == ISA_AVX512VNNI)              \
            name##_avx512(p, task);                        \
        else if (isa_selected() != ISA_NONE)               \
            name##_avx2(p, task);                          \
    }
#else /* elsewhere the op is not registered (attn_supported), and these do nothing */
#define ATTN_DISPATCH(name) \
    void attn_##name(const attn_problem *p, size_t task) { (void)p, (void)task; }
#endif
ATTN_DISPATCH(prepare)
ATTN_DISPATCH(transpose)
ATTN_DISPATCH(run)
