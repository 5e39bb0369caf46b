/* The vector part of attention.c, included once per vector width IEA_W (16 floats: AVX-512; 8:
 * AVX2) with IEA_FN(name) suffixing every function, under a `#pragma GCC target` for the ISA. Not
 * a header to include anywhere else. */

#define VF IEA_FN(vf) /* IEA_W floats */
#define VI IEA_FN(vi) /* IEA_W int32 */
typedef float VF __attribute__((vector_size(IEA_W * 4)));
typedef int32_t VI __attribute__((vector_size(IEA_W * 4)));

static inline __attribute__((always_inline)) VF IEA_FN(load)(const float *p) {
    VF v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) void IEA_FN(store)(float *p, VF v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) VF IEA_FN(splat)(float x) { return (VF){0} + x; }
static inline __attribute__((always_inline)) VF IEA_FN(select)(VI mask, VF yes, VF no) {
    return (VF)(((VI)yes & mask) | ((VI)no & ~mask));
}
static inline __attribute__((always_inline)) VF IEA_FN(max)(VF a, VF b) { return IEA_FN(select)(a > b, a, b); }

/* e^x (vec_exp.h) for the scores minus their running maximum */
IE_DEFINE_VEC_EXP(IEA_FN(exp), VF, VI)

/* Horizontal sum and maximum as trees of shuffles (log2(IEA_W) dependent steps), and IEA_W vectors
 * of partial sums folded into one vector of their IEA_W totals, in order: rounds of pairing halves,
 * quarters, ... lanes (IEA_W - 1 adds, twice as many shuffles, instead of IEA_W horizontal sums). */
#if IEA_W == 16
#define IEA_LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
static inline __attribute__((always_inline)) float IEA_FN(hsum)(VF v) {
    v = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}
static inline __attribute__((always_inline)) float IEA_FN(hmax)(VF v) {
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return v[0];
}
static inline __attribute__((always_inline)) VF IEA_FN(reduce)(const VF *p) {
    VF a[8], b[4], c[2];
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
#elif IEA_W == 8
#define IEA_LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7}
static inline __attribute__((always_inline)) float IEA_FN(hsum)(VF v) {
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}
static inline __attribute__((always_inline)) float IEA_FN(hmax)(VF v) {
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = IEA_FN(max)(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
    return v[0];
}
static inline __attribute__((always_inline)) VF IEA_FN(reduce)(const VF *p) {
    VF a[4], b[2];
    for (int m = 0; m < 4; m++)
        a[m] = __builtin_shufflevector(p[2 * m], p[2 * m + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(p[2 * m], p[2 * m + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int m = 0; m < 2; m++)
        b[m] = __builtin_shufflevector(a[2 * m], a[2 * m + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
               __builtin_shufflevector(a[2 * m], a[2 * m + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#else
#error "IEA_W must be 16 or 8"
#endif

/* Rows of one batch entry: queries (normed when q_norm is given) rotated and scaled into scratch, keys
 * (normed when k_norm is given) rotated and values copied into their cache rows. */
static void IEA_FN(prepare)(const ie_attention *p, size_t task) {
    const int64_t chunks = (p->rows + IEA_PREPARE_ROWS - 1) / IEA_PREPARE_ROWS;
    const int64_t b = (int64_t)task / chunks, i0 = (int64_t)task % chunks * IEA_PREPARE_ROWS;
    const int64_t hd = p->head_dim, nh = p->heads, kvh = p->kv_heads, width = (nh + 2 * kvh) * hd;
    const int64_t past = past_length(p, b), q_len = p->query_lens[b];
    const float scale = p->scale > 0.0f ? p->scale : 1.0f / __builtin_sqrtf((float)hd);
    float normed[IEA_MAX_HEAD_DIM];
    for (int64_t i = i0; i < i0 + IEA_PREPARE_ROWS && i < q_len; i++) {
        const int64_t pos = past + i;
        const float *row = p->qkv + (b * p->rows + i) * width;
        float *q = p->scratch + (b * p->rows + i) * nh * hd;
        for (int64_t h = 0; h < nh; h++)
            rotate(p, head_norm(p, row + h * hd, p->q_norm, normed), q + h * hd, pos, scale);
        for (int64_t g = 0; g < kvh; g++) {
            const int64_t at = ((b * kvh + g) * p->capacity + pos) * hd;
            rotate(p, head_norm(p, row + (nh + g) * hd, p->k_norm, normed), p->k_cache + at, pos, 1.0f);
            memcpy(p->v_cache + at, row + (nh + kvh + g) * hd, (size_t)hd * sizeof(float));
        }
    }
}

/* One block of IEA_TILE_KEYS cache rows of (b, g), turned around for the prefill path: kt[d][j] =
 * dimension d of key j0 + j (zeros past the entry's keys), once per call instead of once per tile. */
static void IEA_FN(transpose)(const ie_attention *p, size_t task) {
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

/* One query row of one batch entry against one KV head, for all the query heads that share it.
 * Decode and short chunks: few queries per task, so the keys are read as they lie (row-major).
 * Chunks of IEA_ROW_CHUNK keys, in two phases: the group's scores for the chunk's keys (each head's
 * IEA_W partial-sum vectors per IEA_W keys folded into IEA_W scores by reduce), then the running
 * softmax updated once per chunk and the values accumulated, each head's sums kept in memory
 * between blocks, so no chain of dependent operations runs from one head or block to the next. */
static inline __attribute__((always_inline)) void IEA_FN(attend_row)(const ie_attention *p, int64_t b, int64_t g, int64_t i,
                                                             const int64_t chunks) {
    enum { KEYS = IEA_ROW_KEYS, VECS = IEA_ROW_KEYS / IEA_W, CHUNK = IEA_ROW_CHUNK };
    const int64_t kvh = p->kv_heads, hd = chunks * IEA_W, nh = p->heads, G = nh / kvh;
    float *o = p->out + (b * p->rows + i) * nh * hd + g * G * hd;
    if (i >= p->query_lens[b]) { /* a padded row */
        memset(o, 0, (size_t)(G * hd) * sizeof(float));
        return;
    }
    const int64_t keys = past_length(p, b) + i + 1;
    const float *K = p->k_cache + (b * kvh + g) * p->capacity * hd;
    const float *V = p->v_cache + (b * kvh + g) * p->capacity * hd;
    const float *q = p->scratch + (b * p->rows + i) * nh * hd + g * G * hd;
    float acc[IEA_MAX_GROUP * IEA_MAX_HEAD_DIM] __attribute__((aligned(64)));
    float w[IEA_MAX_GROUP][CHUNK] __attribute__((aligned(64)));
    float run_max[IEA_MAX_GROUP], run_sum[IEA_MAX_GROUP];
    for (int64_t h = 0; h < G; h++) {
        run_max[h] = -__builtin_inff();
        run_sum[h] = 0.0f;
    }
    memset(acc, 0, (size_t)(G * hd) * sizeof(float));
    const VI lane = IEA_LANE_INDEX;
    const int64_t bytes = KEYS * hd * 4, share = (bytes / (G * VECS) + 63) / 64 * 64;
    for (int64_t c0 = 0; c0 < keys; c0 += CHUNK) {
        const int64_t in_chunk = keys - c0 < CHUNK ? keys - c0 : CHUNK;
        for (int64_t j0 = c0; j0 < c0 + in_chunk; j0 += KEYS) {
            const int64_t n = keys - j0 < KEYS ? keys - j0 : KEYS;
            const float *Kb = K + j0 * hd, *Vb = V + j0 * hd;
            for (int64_t h = 0; h < G; h++) {
                VF qv[IEA_MAX_HEAD_DIM / IEA_W];
                for (int64_t c = 0; c < chunks; c++) qv[c] = IEA_FN(load)(q + h * hd + c * IEA_W);
                for (int v = 0; v < VECS; v++) {
                    { /* this block's values (for the second phase) and the next block's keys, a share per
                         (head, vector). Non-temporal: the cache rows are read once per token. Fetching
                         further ahead was slower (L1 holds little more than this) */
                        const int64_t from = (h * VECS + v) * share, to = from + share < bytes ? from + share : bytes;
                        for (int64_t line = from; line < to; line += 64) {
                            __builtin_prefetch((const char *)(Vb) + line, 0, 0);
                            if (j0 + KEYS < keys) __builtin_prefetch((const char *)(Kb + KEYS * hd) + line, 0, 0);
                        }
                    }
                    VF part[IEA_W];
                    const int64_t here = n - v * IEA_W; /* keys of this vector that exist */
                    for (int j = 0; j < IEA_W; j++) part[j] = IEA_FN(splat)(0.0f);
                    if (here >= IEA_W) /* chunk-major: IEA_W independent multiply-add chains */
                        for (int64_t c = 0; c < chunks; c++)
                            for (int j = 0; j < IEA_W; j++)
                                part[j] += qv[c] * IEA_FN(load)(Kb + (v * IEA_W + j) * hd + c * IEA_W);
                    else
                        for (int64_t j = 0; j < here; j++)
                            for (int64_t c = 0; c < chunks; c++)
                                part[j] += qv[c] * IEA_FN(load)(Kb + (v * IEA_W + j) * hd + c * IEA_W);
                    IEA_FN(store)(w[h] + (j0 - c0) + v * IEA_W, IEA_FN(reduce)(part));
                }
            }
        }
        /* the running softmax, once per chunk: scores past the chunk's keys masked */
        const int64_t vecs = (in_chunk + IEA_W - 1) / IEA_W;
        for (int64_t h = 0; h < G; h++) {
            VF top_v = IEA_FN(splat)(run_max[h]);
            for (int64_t v = 0; v < vecs; v++)
                top_v = IEA_FN(max)(top_v, IEA_FN(select)(lane + (int32_t)(v * IEA_W) < (int32_t)in_chunk, IEA_FN(load)(w[h] + v * IEA_W),
                                                          IEA_FN(splat)(-__builtin_inff())));
            const float top = IEA_FN(hmax)(top_v);
            const VF rescale = IEA_FN(exp)(IEA_FN(splat)(run_max[h] - top)); /* 0 on the first chunk */
            VF total = IEA_FN(splat)(0.0f);
            for (int64_t v = 0; v < vecs; v++) {
                const VF e = IEA_FN(select)(lane + (int32_t)(v * IEA_W) < (int32_t)in_chunk, IEA_FN(exp)(IEA_FN(load)(w[h] + v * IEA_W) - top),
                                            IEA_FN(splat)(0.0f));
                total += e;
                IEA_FN(store)(w[h] + v * IEA_W, e);
            }
            run_sum[h] = run_sum[h] * rescale[0] + IEA_FN(hsum)(total);
            run_max[h] = top;
            if (c0)
                for (int64_t c = 0; c < chunks; c++) IEA_FN(store)(acc + h * hd + c * IEA_W, IEA_FN(load)(acc + h * hd + c * IEA_W) * rescale);
        }
        for (int64_t j0 = c0; j0 < c0 + in_chunk; j0 += KEYS) {
            const int64_t n = keys - j0 < KEYS ? keys - j0 : KEYS;
            const float *Vb = V + j0 * hd, *Kb = K + j0 * hd;
            for (int64_t h = 0; h < G; h++) {
                if (j0 + CHUNK < keys) { /* the next chunk's keys, a share per head */
                    const int64_t from = h * share * VECS, to = from + share * VECS < bytes ? from + share * VECS : bytes;
                    for (int64_t line = from; line < to; line += 64)
                        __builtin_prefetch((const char *)(Kb + CHUNK * hd) + line, 0, 0);
                }
                const float *wh = w[h] + (j0 - c0);
                VF x[IEA_MAX_HEAD_DIM / IEA_W], y[IEA_MAX_HEAD_DIM / IEA_W]; /* two sets: chains half as long */
                for (int64_t c = 0; c < chunks; c++) {
                    x[c] = IEA_FN(load)(acc + h * hd + c * IEA_W);
                    y[c] = IEA_FN(splat)(0.0f);
                }
                int64_t j = 0;
                for (; j + 1 < n; j += 2)
                    for (int64_t c = 0; c < chunks; c++) {
                        x[c] += wh[j] * IEA_FN(load)(Vb + j * hd + c * IEA_W);
                        y[c] += wh[j + 1] * IEA_FN(load)(Vb + (j + 1) * hd + c * IEA_W);
                    }
                if (j < n)
                    for (int64_t c = 0; c < chunks; c++) x[c] += wh[j] * IEA_FN(load)(Vb + j * hd + c * IEA_W);
                for (int64_t c = 0; c < chunks; c++) IEA_FN(store)(acc + h * hd + c * IEA_W, x[c] + y[c]);
            }
        }
    }
    for (int64_t h = 0; h < G; h++) {
        const VF inv = IEA_FN(splat)(1.0f / run_sum[h]);
        for (int64_t c = 0; c < chunks; c++) IEA_FN(store)(o + h * hd + c * IEA_W, IEA_FN(load)(acc + h * hd + c * IEA_W) * inv);
    }
}

/* Prefill: up to IEA_TILE_ROWS rows x the group's heads of queries against one KV head. Every
 * block of 64 keys is turned around once (kt[d] = dimension d of the 64 keys) and then scored
 * against IEA_SCORED_W queries at a time: independent chains of broadcast multiply-adds whose lanes
 * are already scores (no per-query reduction), the running softmax updated once per 64 keys. */
static inline __attribute__((always_inline)) void IEA_FN(attend_tile)(const ie_attention *p, int64_t b, int64_t g, int64_t i0,
                                                              const int64_t chunks) {
    enum { KEYS = IEA_TILE_KEYS, VECS = IEA_TILE_KEYS / IEA_W, SCORED = IEA_SCORED_W };
    const int64_t kvh = p->kv_heads, hd = chunks * IEA_W, nh = p->heads, G = nh / kvh;
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
        for (int64_t i = i0; i < real_end; i++) IEA_FN(attend_row)(p, b, g, i, chunks);
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
    const VI lane = IEA_LANE_INDEX;
    for (int64_t j0 = 0; j0 < keys; j0 += KEYS) {
        const int64_t n = keys - j0 < KEYS ? keys - j0 : KEYS;
        const float *kt = turned + j0 * hd;
        const float *Vb = V + j0 * hd;
        for (int64_t u0 = 0; u0 < nq; u0 += SCORED) {
            const int64_t in_block = nq - u0 < SCORED ? nq - u0 : SCORED;
            if (pos[u0 + in_block - 1] < j0) continue; /* all of them before this block: masked */
            const float *q[SCORED];
            for (int u = 0; u < SCORED; u++) q[u] = qp[u < in_block ? u0 + u : u0];
            VF s[SCORED][VECS];
            for (int u = 0; u < SCORED; u++)
                for (int v = 0; v < VECS; v++) s[u][v] = IEA_FN(splat)(0.0f);
            for (int64_t d = 0; d < hd; d++) {
                VF k[VECS];
                for (int v = 0; v < VECS; v++) k[v] = IEA_FN(load)(kt + d * KEYS + v * IEA_W);
                for (int u = 0; u < SCORED; u++) {
                    const float x = q[u][d];
                    for (int v = 0; v < VECS; v++) s[u][v] += x * k[v];
                }
            }
            for (int u = 0; u < in_block; u++) {
                const int64_t qi = u0 + u, seen = pos[qi] - j0 + 1; /* keys of this block it may see */
                if (seen <= 0) continue;
                const int64_t live_n = seen < n ? seen : n;
                VF top_v = IEA_FN(splat)(run_max[qi]);
                for (int v = 0; v < VECS; v++) {
                    s[u][v] = IEA_FN(select)(lane + v * IEA_W < (int32_t)live_n, s[u][v], IEA_FN(splat)(-__builtin_inff()));
                    top_v = IEA_FN(max)(top_v, s[u][v]);
                }
                const float top = IEA_FN(hmax)(top_v);
                const float rescale = IEA_FN(exp)(IEA_FN(splat)(run_max[qi] - top))[0]; /* 0 on the first block */
                float wv[KEYS];
                VF total = IEA_FN(splat)(0.0f);
                for (int v = 0; v < VECS; v++) {
                    const VF w = IEA_FN(select)(lane + v * IEA_W < (int32_t)live_n, IEA_FN(exp)(s[u][v] - top), IEA_FN(splat)(0.0f));
                    total += w;
                    IEA_FN(store)(wv + v * IEA_W, w);
                }
                run_sum[qi] = run_sum[qi] * rescale + IEA_FN(hsum)(total);
                run_max[qi] = top;
                float *a = acc + qi * hd;
                VF x[IEA_MAX_HEAD_DIM / IEA_W]; /* one chain per chunk: independent multiply-adds */
                for (int64_t c = 0; c < chunks; c++) x[c] = IEA_FN(load)(a + c * IEA_W) * rescale;
                for (int64_t j = 0; j < live_n; j++)
                    for (int64_t c = 0; c < chunks; c++) x[c] += wv[j] * IEA_FN(load)(Vb + j * hd + c * IEA_W);
                for (int64_t c = 0; c < chunks; c++) IEA_FN(store)(a + c * IEA_W, x[c]);
            }
        }
    }
    for (int64_t u = 0; u < nq; u++) {
        const int64_t i = i0 + u / G, h = u % G;
        float *o = p->out + (b * p->rows + i) * nh * hd + (g * G + h) * hd;
        const VF inv = IEA_FN(splat)(1.0f / run_sum[u]);
        for (int64_t c = 0; c < chunks; c++) IEA_FN(store)(o + c * IEA_W, IEA_FN(load)(acc + u * hd + c * IEA_W) * inv);
    }
    free(acc);
}

static void IEA_FN(run)(const ie_attention *p, size_t task) {
    const int64_t kvh = p->kv_heads, g = (int64_t)task % kvh;
    if (tiled(p)) {
        const int64_t tiles = (p->rows + IEA_TILE_ROWS - 1) / IEA_TILE_ROWS;
        const int64_t b = (int64_t)task / (tiles * kvh), t = (int64_t)task % (tiles * kvh) / kvh;
        if (p->head_dim == 128) /* Qwen2.5's: a constant trip count keeps the chunks in registers */
            IEA_FN(attend_tile)(p, b, g, t * IEA_TILE_ROWS, 128 / IEA_W);
        else
            IEA_FN(attend_tile)(p, b, g, t * IEA_TILE_ROWS, p->head_dim / IEA_W);
    } else {
        const int64_t b = (int64_t)task / (p->rows * kvh), i = (int64_t)task % (p->rows * kvh) / kvh;
        if (p->head_dim == 128)
            IEA_FN(attend_row)(p, b, g, i, 128 / IEA_W);
        else
            IEA_FN(attend_row)(p, b, g, i, p->head_dim / IEA_W);
    }
}

#undef IEA_LANE_INDEX
#undef VF
#undef VI
