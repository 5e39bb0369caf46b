/* The attention kernel of attention.h. Written with GCC vector extensions (16 floats per vector)
 * and compiled once per instruction set (the entry points at the end), so one source runs as 512-bit
 * vectors on AVX-512 and as pairs of 256-bit ones on AVX2; isa.h picks one at run time. */
/* 16-float vectors only pass between inlined helpers: GCC's note on their ABI does not apply */
#pragma GCC diagnostic ignored "-Wpsabi"

#include "attention.h"
#include "isa.h"
#include "vec_exp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IEA_LANES 16       /* floats per vector: keys scored per step */
#define IEA_MAX_HEAD_DIM 256
#define IEA_MAX_GROUP 16   /* query heads per KV head (Qwen2.5: 6 for 1.5B, 7 for 7B) */
#define IEA_PREPARE_ROWS 16 /* rows of one prepare task */
#define IEA_TILE_ROWS 16    /* prefill: query rows of one task, every key block read once for all of them */
#define IEA_TILE_FROM 8     /* chunks of at least this many rows take the prefill path */
#define IEA_SCORED 4        /* prefill: queries scored together (x 4 vectors of keys: 16 FMA chains) */
#define IEA_TILE_KEYS 64    /* prefill: keys per block, the running softmax updated once per block */

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) v16f splat(float x) { return (v16f){0} + x; }
static inline __attribute__((always_inline)) v16f select16(v16i mask, v16f yes, v16f no) {
    return (v16f)(((v16i)yes & mask) | ((v16i)no & ~mask));
}

/* e^x (vec_exp.h) for the scores minus their running maximum */
IE_DEFINE_VEC_EXP(exp16, v16f, v16i)

/* Horizontal sum and maximum as trees of shuffles: 4 dependent steps instead of 15. */
static inline __attribute__((always_inline)) float hsum16(v16f v) {
    v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}
static inline __attribute__((always_inline)) v16f max16(v16f a, v16f b) { return select16(a > b, a, b); }
static inline __attribute__((always_inline)) float hmax16(v16f v) {
    v = max16(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = max16(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = max16(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = max16(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
}

/* 16 vectors of partial sums -> one vector of their 16 totals, in order: four rounds of pairing
 * halves, quarters, eighths and lanes (15 adds, 30 shuffles instead of 16 horizontal sums). */
static inline __attribute__((always_inline)) v16f reduce16(const v16f *p) {
    v16f a[8], b[4], c[2];
    for (int m = 0; m < 8; m++)
        a[m] = __builtin_shufflevector(p[2 * m], p[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(p[2 * m], p[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int m = 0; m < 4; m++)
        b[m] = __builtin_shufflevector(a[2 * m], a[2 * m + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * m], a[2 * m + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int m = 0; m < 2; m++)
        c[m] = __builtin_shufflevector(b[2 * m], b[2 * m + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(b[2 * m], b[2 * m + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static int64_t past_length(const ie_attention *p, int64_t b) {
    return (int64_t)p->seqlens_k[b] + 1 - (int64_t)p->query_lens[b];
}

/* Blocks of IEA_TILE_KEYS keys that hold the longest batch entry's keys after the step. */
static int64_t key_blocks(const ie_attention *p) {
    int64_t most = 0;
    for (int64_t b = 0; b < p->batch; b++)
        if (p->query_lens[b] > 0 && (int64_t)p->seqlens_k[b] + 1 > most) most = (int64_t)p->seqlens_k[b] + 1;
    return (most + IEA_TILE_KEYS - 1) / IEA_TILE_KEYS;
}

/* The turned-around keys of (b, g): blocks of [head_dim][IEA_TILE_KEYS], after the queries. */
static float *turned_keys(const ie_attention *p, int64_t b, int64_t g) {
    return p->scratch + p->batch * p->rows * p->heads * p->head_dim +
           (b * p->kv_heads + g) * key_blocks(p) * IEA_TILE_KEYS * p->head_dim;
}

/* rotate-half rotary at `pos` (x[d], x[d + h/2] turned by angle d), times `scale`, into y */
static inline __attribute__((always_inline)) void rotate(const ie_attention *p, const float *x, float *y, int64_t pos, float scale) {
    const int64_t half = p->head_dim / 2;
    const float *c = p->cos + pos * half, *s = p->sin + pos * half;
    for (int64_t d = 0; d < half; d++) {
        const float x1 = x[d], x2 = x[d + half];
        y[d] = (x1 * c[d] - x2 * s[d]) * scale;
        y[d + half] = (x2 * c[d] + x1 * s[d]) * scale;
    }
}

int ie_attention_supported(void) { return ie_isa() != IE_ISA_NONE ? 0 : -1; }

int ie_attention_plan(const ie_attention *p, ie_attention_plan_t *plan, char *why, size_t why_size) {
    const int64_t hd = p->head_dim;
    if (hd <= 0 || hd % IEA_LANES || hd > IEA_MAX_HEAD_DIM) {
        snprintf(why, why_size, "head_dim %lld is not a multiple of %d up to %d", (long long)hd, IEA_LANES,
                 IEA_MAX_HEAD_DIM);
        return -1;
    }
    if (p->kv_heads <= 0 || p->heads % p->kv_heads || p->heads / p->kv_heads > IEA_MAX_GROUP) {
        snprintf(why, why_size, "num_heads %lld is not a multiple of kv_num_heads %lld (at most %d per KV head)",
                 (long long)p->heads, (long long)p->kv_heads, IEA_MAX_GROUP);
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
    const int64_t tiled = p->rows >= IEA_TILE_FROM, blocks = tiled ? key_blocks(p) : 0;
    plan->scratch_bytes = (size_t)(p->batch * p->rows * p->heads * hd + p->batch * p->kv_heads * blocks * IEA_TILE_KEYS * hd) *
                          sizeof(float);
    plan->prepare_tasks = (size_t)(p->batch * ((p->rows + IEA_PREPARE_ROWS - 1) / IEA_PREPARE_ROWS));
    plan->transpose_tasks = (size_t)(p->batch * p->kv_heads * blocks);
    const int64_t units = tiled ? (p->rows + IEA_TILE_ROWS - 1) / IEA_TILE_ROWS : p->rows;
    plan->tasks = (size_t)(p->batch * units * p->kv_heads);
    return 0;
}

/* Rows of one batch entry: queries rotated and scaled into scratch, keys rotated and values copied
 * into their cache rows. */
static inline __attribute__((always_inline)) void prepare(const ie_attention *p, size_t task) {
    const int64_t chunks = (p->rows + IEA_PREPARE_ROWS - 1) / IEA_PREPARE_ROWS;
    const int64_t b = (int64_t)task / chunks, i0 = (int64_t)task % chunks * IEA_PREPARE_ROWS;
    const int64_t hd = p->head_dim, nh = p->heads, kvh = p->kv_heads, width = (nh + 2 * kvh) * hd;
    const int64_t past = past_length(p, b), q_len = p->query_lens[b];
    const float scale = p->scale > 0.0f ? p->scale : 1.0f / __builtin_sqrtf((float)hd);
    for (int64_t i = i0; i < i0 + IEA_PREPARE_ROWS && i < q_len; i++) {
        const int64_t pos = past + i;
        const float *row = p->qkv + (b * p->rows + i) * width;
        float *q = p->scratch + (b * p->rows + i) * nh * hd;
        for (int64_t h = 0; h < nh; h++) rotate(p, row + h * hd, q + h * hd, pos, scale);
        for (int64_t g = 0; g < kvh; g++) {
            const int64_t at = ((b * kvh + g) * p->capacity + pos) * hd;
            rotate(p, row + (nh + g) * hd, p->k_cache + at, pos, 1.0f);
            memcpy(p->v_cache + at, row + (nh + kvh + g) * hd, (size_t)hd * sizeof(float));
        }
    }
}

/* One block of IEA_TILE_KEYS cache rows of (b, g), turned around for the prefill path: kt[d][j] =
 * dimension d of key j0 + j (zeros past the entry's keys), once per call instead of once per tile. */
static inline __attribute__((always_inline)) void transpose(const ie_attention *p, size_t task) {
    const int64_t blocks = key_blocks(p), hd = p->head_dim;
    const int64_t b = (int64_t)task / (p->kv_heads * blocks), g = (int64_t)task / blocks % p->kv_heads;
    const int64_t j0 = (int64_t)task % blocks * IEA_TILE_KEYS;
    const int64_t keys = p->query_lens[b] > 0 ? (int64_t)p->seqlens_k[b] + 1 : 0;
    const int64_t n = keys - j0 < IEA_TILE_KEYS ? (keys - j0 > 0 ? keys - j0 : 0) : IEA_TILE_KEYS;
    const float *K = p->k_cache + ((b * p->kv_heads + g) * p->capacity + j0) * hd;
    float *kt = turned_keys(p, b, g) + j0 * hd;
    for (int64_t j = 0; j < n; j++)
        for (int64_t d = 0; d < hd; d++) kt[d * IEA_TILE_KEYS + j] = K[j * hd + d];
    for (int64_t j = n; j < IEA_TILE_KEYS; j++)
        for (int64_t d = 0; d < hd; d++) kt[d * IEA_TILE_KEYS + j] = 0.0f;
}

/* One query row of one batch entry against one KV head, for all the query heads that share it:
 * a running maximum and sum per head, updated once per 64 keys (the softmax never materialised).
 * Decode and short chunks: few queries per task, so the keys are read as they lie (row-major),
 * each head's 16 partial-sum vectors per 16 keys folded into 16 scores by reduce16. */
static inline __attribute__((always_inline)) void attend_row(const ie_attention *p, int64_t b, int64_t g, int64_t i,
                                                             const int64_t chunks) {
    enum { KEYS = IEA_TILE_KEYS, VECS = IEA_TILE_KEYS / IEA_LANES };
    const int64_t kvh = p->kv_heads, hd = chunks * IEA_LANES, nh = p->heads, G = nh / kvh;
    float *o = p->out + (b * p->rows + i) * nh * hd + g * G * hd;
    if (i >= p->query_lens[b]) { /* a padded row */
        memset(o, 0, (size_t)(G * hd) * sizeof(float));
        return;
    }
    const int64_t keys = past_length(p, b) + i + 1;
    const float *K = p->k_cache + (b * kvh + g) * p->capacity * hd;
    const float *V = p->v_cache + (b * kvh + g) * p->capacity * hd;
    const float *q = p->scratch + (b * p->rows + i) * nh * hd + g * G * hd;
    v16f acc[IEA_MAX_GROUP][IEA_MAX_HEAD_DIM / IEA_LANES];
    float run_max[IEA_MAX_GROUP], run_sum[IEA_MAX_GROUP];
    for (int64_t h = 0; h < G; h++) {
        run_max[h] = -__builtin_inff();
        run_sum[h] = 0.0f;
        for (int64_t c = 0; c < chunks; c++) acc[h][c] = splat(0.0f);
    }
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t j0 = 0; j0 < keys; j0 += KEYS) {
        const int64_t n = keys - j0 < KEYS ? keys - j0 : KEYS;
        const float *Kb = K + j0 * hd, *Vb = V + j0 * hd;
        for (int64_t h = 0; h < G; h++) {
            v16f qv[IEA_MAX_HEAD_DIM / IEA_LANES];
            for (int64_t c = 0; c < chunks; c++) qv[c] = load16(q + h * hd + c * IEA_LANES);
            v16f scores[VECS];
            v16f top_v = splat(run_max[h]);
            for (int v = 0; v < VECS; v++) {
                v16f part[IEA_LANES];
                const int64_t here = n - v * IEA_LANES; /* keys of this vector that exist */
                for (int j = 0; j < IEA_LANES; j++) part[j] = splat(0.0f);
                if (here >= IEA_LANES) /* chunk-major: 16 independent multiply-add chains */
                    for (int64_t c = 0; c < chunks; c++)
                        for (int j = 0; j < IEA_LANES; j++)
                            part[j] += qv[c] * load16(Kb + (v * IEA_LANES + j) * hd + c * IEA_LANES);
                else
                    for (int64_t j = 0; j < here; j++)
                        for (int64_t c = 0; c < chunks; c++)
                            part[j] += qv[c] * load16(Kb + (v * IEA_LANES + j) * hd + c * IEA_LANES);
                scores[v] = select16(lane + v * IEA_LANES < (int32_t)n, reduce16(part), splat(-__builtin_inff()));
                top_v = max16(top_v, scores[v]);
            }
            const float top = hmax16(top_v);
            const float rescale = exp16(splat(run_max[h] - top))[0]; /* 0 on the first block */
            float wv[KEYS];
            v16f total = splat(0.0f);
            for (int v = 0; v < VECS; v++) {
                const v16f w = select16(lane + v * IEA_LANES < (int32_t)n, exp16(scores[v] - top), splat(0.0f));
                total += w;
                store16(wv + v * IEA_LANES, w);
            }
            run_sum[h] = run_sum[h] * rescale + hsum16(total);
            run_max[h] = top;
            v16f x[IEA_MAX_HEAD_DIM / IEA_LANES];
            for (int64_t c = 0; c < chunks; c++) x[c] = acc[h][c] * rescale;
            for (int64_t j = 0; j < n; j++)
                for (int64_t c = 0; c < chunks; c++) x[c] += wv[j] * load16(Vb + j * hd + c * IEA_LANES);
            for (int64_t c = 0; c < chunks; c++) acc[h][c] = x[c];
        }
    }
    for (int64_t h = 0; h < G; h++) {
        const float inv = 1.0f / run_sum[h];
        for (int64_t c = 0; c < chunks; c++) store16(o + h * hd + c * IEA_LANES, acc[h][c] * inv);
    }
}

/* Prefill: up to IEA_TILE_ROWS rows x the group's heads of queries against one KV head. Every
 * block of 64 keys is turned around once (kt[d] = dimension d of the 64 keys) and then scored
 * against 4 queries at a time: 16 independent chains of broadcast multiply-adds whose lanes are
 * already scores (no per-query reduction), the running softmax updated once per 64 keys. */
static inline __attribute__((always_inline)) void attend_tile(const ie_attention *p, int64_t b, int64_t g, int64_t i0,
                                                              const int64_t chunks) {
    enum { KEYS = IEA_TILE_KEYS, VECS = IEA_TILE_KEYS / IEA_LANES, SCORED = IEA_SCORED };
    const int64_t kvh = p->kv_heads, hd = chunks * IEA_LANES, nh = p->heads, G = nh / kvh;
    const int64_t q_len = p->query_lens[b], past = past_length(p, b);
    const int64_t i1 = i0 + IEA_TILE_ROWS < p->rows ? i0 + IEA_TILE_ROWS : p->rows;
    for (int64_t i = i0 > q_len ? i0 : q_len; i < i1; i++) /* padded rows */
        memset(p->out + (b * p->rows + i) * nh * hd + g * G * hd, 0, (size_t)(G * hd) * sizeof(float));
    const int64_t real_end = i1 < q_len ? i1 : q_len;
    if (real_end <= i0) return;
    const int64_t nq = (real_end - i0) * G, keys = past + real_end;
    const float *V = p->v_cache + (b * kvh + g) * p->capacity * hd;
    const float *turned = turned_keys(p, b, g);
    float *acc = (float *)aligned_alloc(64, (size_t)(nq * hd) * sizeof(float));
    if (!acc) { /* no memory for the tile: the row path needs none */
        for (int64_t i = i0; i < real_end; i++) attend_row(p, b, g, i, chunks);
        return;
    }
    const float *qp[IEA_TILE_ROWS * IEA_MAX_GROUP];
    int64_t pos[IEA_TILE_ROWS * IEA_MAX_GROUP];
    float run_max[IEA_TILE_ROWS * IEA_MAX_GROUP], run_sum[IEA_TILE_ROWS * IEA_MAX_GROUP];
    for (int64_t u = 0; u < nq; u++) {
        const int64_t i = i0 + u / G, h = u % G;
        qp[u] = p->scratch + (b * p->rows + i) * nh * hd + (g * G + h) * hd;
        pos[u] = past + i;
        run_max[u] = -__builtin_inff();
        run_sum[u] = 0.0f;
    }
    memset(acc, 0, (size_t)(nq * hd) * sizeof(float));
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t j0 = 0; j0 < keys; j0 += KEYS) {
        const int64_t n = keys - j0 < KEYS ? keys - j0 : KEYS;
        const float *kt = turned + j0 * hd;
        const float *Vb = V + j0 * hd;
        for (int64_t u0 = 0; u0 < nq; u0 += SCORED) {
            const int64_t in_block = nq - u0 < SCORED ? nq - u0 : SCORED;
            if (pos[u0 + in_block - 1] < j0) continue; /* all of them before this block: masked */
            const float *q[SCORED];
            for (int u = 0; u < SCORED; u++) q[u] = qp[u < in_block ? u0 + u : u0];
            v16f s[SCORED][VECS];
            for (int u = 0; u < SCORED; u++)
                for (int v = 0; v < VECS; v++) s[u][v] = splat(0.0f);
            for (int64_t d = 0; d < hd; d++) {
                v16f k[VECS];
                for (int v = 0; v < VECS; v++) k[v] = load16(kt + d * KEYS + v * IEA_LANES);
                for (int u = 0; u < SCORED; u++) {
                    const float x = q[u][d];
                    for (int v = 0; v < VECS; v++) s[u][v] += x * k[v];
                }
            }
            for (int u = 0; u < in_block; u++) {
                const int64_t qi = u0 + u, seen = pos[qi] - j0 + 1; /* keys of this block it may see */
                if (seen <= 0) continue;
                const int64_t live_n = seen < n ? seen : n;
                v16f top_v = splat(run_max[qi]);
                for (int v = 0; v < VECS; v++) {
                    s[u][v] = select16(lane + v * IEA_LANES < (int32_t)live_n, s[u][v], splat(-__builtin_inff()));
                    top_v = max16(top_v, s[u][v]);
                }
                const float top = hmax16(top_v);
                const float rescale = exp16(splat(run_max[qi] - top))[0]; /* 0 on the first block */
                float wv[KEYS];
                v16f total = splat(0.0f);
                for (int v = 0; v < VECS; v++) {
                    const v16f w = select16(lane + v * IEA_LANES < (int32_t)live_n, exp16(s[u][v] - top), splat(0.0f));
                    total += w;
                    store16(wv + v * IEA_LANES, w);
                }
                run_sum[qi] = run_sum[qi] * rescale + hsum16(total);
                run_max[qi] = top;
                float *a = acc + qi * hd;
                v16f x[IEA_MAX_HEAD_DIM / IEA_LANES]; /* one chain per chunk: independent multiply-adds */
                for (int64_t c = 0; c < chunks; c++) x[c] = load16(a + c * IEA_LANES) * rescale;
                for (int64_t j = 0; j < live_n; j++)
                    for (int64_t c = 0; c < chunks; c++) x[c] += wv[j] * load16(Vb + j * hd + c * IEA_LANES);
                for (int64_t c = 0; c < chunks; c++) store16(a + c * IEA_LANES, x[c]);
            }
        }
    }
    for (int64_t u = 0; u < nq; u++) {
        const int64_t i = i0 + u / G, h = u % G;
        float *o = p->out + (b * p->rows + i) * nh * hd + (g * G + h) * hd;
        const v16f inv = splat(1.0f / run_sum[u]);
        for (int64_t c = 0; c < chunks; c++) store16(o + c * IEA_LANES, load16(acc + u * hd + c * IEA_LANES) * inv);
    }
    free(acc);
}

static inline __attribute__((always_inline)) void run(const ie_attention *p, size_t task) {
    const int64_t kvh = p->kv_heads, g = (int64_t)task % kvh;
    if (p->rows >= IEA_TILE_FROM) {
        const int64_t tiles = (p->rows + IEA_TILE_ROWS - 1) / IEA_TILE_ROWS;
        const int64_t b = (int64_t)task / (tiles * kvh), t = (int64_t)task % (tiles * kvh) / kvh;
        if (p->head_dim == 128) /* Qwen2.5's: a constant trip count keeps the chunks in registers */
            attend_tile(p, b, g, t * IEA_TILE_ROWS, 128 / IEA_LANES);
        else
            attend_tile(p, b, g, t * IEA_TILE_ROWS, p->head_dim / IEA_LANES);
    } else {
        const int64_t b = (int64_t)task / (p->rows * kvh), i = (int64_t)task % (p->rows * kvh) / kvh;
        if (p->head_dim == 128)
            attend_row(p, b, g, i, 128 / IEA_LANES);
        else
            attend_row(p, b, g, i, p->head_dim / IEA_LANES);
    }
}

/* The entry points, once per instruction set: everything above is inlined into them. */
#if defined(__x86_64__) && defined(__GNUC__)
#define IEA_VARIANTS(suffix)                                                                        \
    static void prepare_##suffix(const ie_attention *p, size_t task) { prepare(p, task); }         \
    static void transpose_##suffix(const ie_attention *p, size_t task) { transpose(p, task); }     \
    static void run_##suffix(const ie_attention *p, size_t task) { run(p, task); }

#pragma GCC push_options
#pragma GCC target("avx2,fma")
IEA_VARIANTS(avx2)
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
IEA_VARIANTS(avx512)
#pragma GCC pop_options

#define IEA_DISPATCH(name)                                                                          \
    void ie_attention_##name(const ie_attention *p, size_t task) {                                 \
        if (ie_isa() == IE_ISA_AVX512VNNI)                                                          \
            name##_avx512(p, task);                                                                 \
        else if (ie_isa() != IE_ISA_NONE)                                                           \
            name##_avx2(p, task);                                                                   \
    }
#else /* elsewhere the op is not registered (ie_attention_supported) */
#define IEA_DISPATCH(name)                                                                          \
    void ie_attention_##name(const ie_attention *p, size_t task) { name(p, task); }
#endif
IEA_DISPATCH(prepare)
IEA_DISPATCH(transpose)
IEA_DISPATCH(run)
