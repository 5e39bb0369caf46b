/* One instruction set's version of the q4gemm kernel: included by q4gemm.c once per ISA with
 * Q4_NAME(x) (suffixes the function names) and Q4_DOT_CHUNK / Q4_BLOCK_SUM defined, under a
 * `#pragma GCC target` for that ISA. Not a header to include anywhere else.
 *
 * Activations are quantised per block to int8 (scale = max|a| / 127) and stored chunk by chunk in
 * the order the packed weights come in: for every 64 weights (one 32-byte load of B) the 32
 * even-k activations, then the 32 odd-k ones, so the low nibbles of the load pair with the first
 * half and the high nibbles with the second, and u8 x s8 dot products (VNNI's vpdpbusd) need no
 * shuffles. Zero points are applied once per block: sum(q * a) - z * sum(a).
 */

static void Q4_NAME(quantize)(const q4_problem *p)
{
    const int64_t K = p->k, B = p->block, nblk = (K + B - 1) / B, Kp = nblk * B;
    int8_t *qa = (int8_t *)p->scratch;
    float *sa = (float *)(qa + p->m * Kp);
    float *ts = sa + p->m * nblk;
    float padded[Q4_MAX_BLOCK];
    for (int64_t r = 0; r < p->m; r++) {
        const float *x = p->a + r * K;
        int8_t *q = qa + r * Kp;
        for (int64_t b = 0; b < nblk; b++) {
            const float *xb = x + b * B;
            if ((b + 1) * B > K) { /* K not a multiple of the block: B holds zeros there, so do we */
                memset(padded, 0, sizeof padded);
                memcpy(padded, xb, (size_t)(K - b * B) * sizeof(float));
                xb = padded;
            }
            uint32_t mx = 0; /* max |x| as bits: the order of non-negative floats is their bits' */
            for (int64_t i = 0; i < B; i++) {
                uint32_t u;
                memcpy(&u, xb + i, 4);
                u &= 0x7fffffffu;
                mx = u > mx ? u : mx;
            }
            float amax;
            memcpy(&amax, &mx, 4);
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int64_t c = 0; c < B; c += Q4_CHUNK) {
                int8_t *lo = q + b * B + c, *hi = lo + Q4_CHUNK / 2;
                const float *xc = xb + c;
                for (int j = 0; j < Q4_CHUNK / 2; j++) {
                    const int32_t e = (int32_t)__builtin_rintf(xc[2 * j] * inv);
                    const int32_t o = (int32_t)__builtin_rintf(xc[2 * j + 1] * inv);
                    lo[j] = (int8_t)e;
                    hi[j] = (int8_t)o;
                    sum += e + o;
                }
            }
            sa[r * nblk + b] = amax / 127.0f;
            ts[r * nblk + b] = amax / 127.0f * (float)sum;
        }
    }
}

/* The sums of the 8 int32 lanes of each of 4 vectors (exact, in any order). */
static inline __attribute__((always_inline)) __m128i Q4_NAME(hsum4)(__m256i v0, __m256i v1, __m256i v2, __m256i v3)
{
    const __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

static inline __attribute__((always_inline)) int32_t Q4_NAME(hsum1)(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* R rows x C columns of Y from rows r0.. and columns n0..; R and C are constants after inlining, so
 * the accumulators live in registers. Each block's dot products are summed across lanes in int32
 * (exact), then scaled into one float per (row, column) in q4_block_end's order, the one every
 * path follows: a row's result is the same whichever tile computes it (batch invariance). */
static inline __attribute__((always_inline)) void Q4_NAME(tile)(const q4_problem *p, int64_t r0, const int R,
                                                                int64_t n0, const int C)
{
    const int64_t B = p->block, nblk = (p->k + B - 1) / B, K = nblk * B, zstride = (nblk + 1) / 2;
    const int8_t *qa = (const int8_t *)p->scratch;
    const float *sa = (const float *)(qa + p->m * K);
    const float *ts = sa + p->m * nblk;
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    Q4_CONSTANTS
    const int64_t ahead = p->packed ? Q4_PACKED_PREFETCH : Q4_PREFETCH * C * (K / 2); /* the next columns' */
    float facc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int j = 0; j < C; j++)
            facc[i][j] = 0.0f;
    for (int64_t b = 0; b < nblk; b++) {
        __m256i acc_lo[4][4], acc_hi[4][4];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
#pragma GCC unroll 4
            for (int j = 0; j < C; j++) {
                acc_lo[i][j] = _mm256_setzero_si256();
                acc_hi[i][j] = _mm256_setzero_si256();
            }
        for (int64_t k0 = b * B; k0 < (b + 1) * B; k0 += Q4_CHUNK) {
            __m256i a_lo[4], a_hi[4];
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) {
                a_lo[i] = _mm256_load_si256((const __m256i *)(qa + (r0 + i) * K + k0));
                a_hi[i] = _mm256_load_si256((const __m256i *)(qa + (r0 + i) * K + k0 + 32));
            }
#pragma GCC unroll 4
            for (int j = 0; j < C; j++) {
                const uint8_t *wp = q4_chunk(p, K, n0 + j, k0);
                _mm_prefetch((const char *)(wp + ahead), Q4_PREFETCH_HINT);
                const __m256i w = _mm256_loadu_si256((const __m256i *)wp);
#pragma GCC unroll 4
                for (int i = 0; i < R; i++)
                    Q4_DOT_CHUNK(acc_lo[i][j], acc_hi[i][j], w, a_lo[i], a_hi[i]);
            }
        }
        int32_t dot[4][4];
        if (R * C == 4) { /* (4 rows, 1 column) or (1 row, 4 columns): one reduction for the four */
            int32_t d4[4];
            _mm_storeu_si128((__m128i *)(void *)d4,
                             Q4_NAME(hsum4)(Q4_BLOCK_SUM(acc_lo[0][0], acc_hi[0][0]),
                                            Q4_BLOCK_SUM(acc_lo[R > 1][C > 1], acc_hi[R > 1][C > 1]),
                                            Q4_BLOCK_SUM(acc_lo[2 * (R > 1)][2 * (C > 1)], acc_hi[2 * (R > 1)][2 * (C > 1)]),
                                            Q4_BLOCK_SUM(acc_lo[3 * (R > 1)][3 * (C > 1)], acc_hi[3 * (R > 1)][3 * (C > 1)])));
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                dot[R > 1 ? u : 0][C > 1 ? u : 0] = d4[u];
        } else {
#pragma GCC unroll 4
            for (int i = 0; i < R; i++)
#pragma GCC unroll 4
                for (int j = 0; j < C; j++)
                    dot[i][j] = Q4_NAME(hsum1)(Q4_BLOCK_SUM(acc_lo[i][j], acc_hi[i][j]));
        }
#pragma GCC unroll 4
        for (int j = 0; j < C; j++) {
            const int64_t n = n0 + j;
            float s;
            int z;
            if (p->swiglu_paired) { /* the columns are in the table's order, not the scales' */
                const uint8_t *entry = (const uint8_t *)p->blocks + ((n / 8) * nblk + b) * Q4_ENTRY_BYTES(p->blocks_f16);
                s = q4_entry_scales(entry, p->blocks_f16)[n % 8];
                z = entry[Q4_ENTRY_ZEROS(p->blocks_f16) + n % 8];
            } else {
                s = p->scales[n * nblk + b];
                z = p->zero_points ? (p->zero_points[n * zstride + b / 2] >> ((b & 1) * 4)) & 0x0F : 8;
            }
            const float sz = s * (float)z;
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) { /* q4_block_end's two steps, one rounding each */
                const float sab = s * sa[(r0 + i) * nblk + b];
                facc[i][j] = __builtin_fmaf((float)dot[i][j], sab, facc[i][j]);
                facc[i][j] = __builtin_fmaf(-sz, ts[(r0 + i) * nblk + b], facc[i][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int j = 0; j < C; j++) {
            const int64_t n = n0 + j;
            p->y[(r0 + i) * p->n + n] = facc[i][j] + (p->bias ? p->bias[n] : 0.0f);
        }
}

/* Decode (one row) on 8 columns of q4_pack's layout, 256 bits at a time: the 8 columns' loads for
 * each 64 weights lie one after the other in memory, and each block ends in q4_block_end. 4 bits:
 * one 32-byte load per column (the AVX-512 build's 4-bit decode is tile8_avx512vnni); 8 bits
 * (q4gemm.h: packed8, VNNI only): one load of its even k and one of its odd k, paired with the
 * activations as they are stored. The last group of 8 may be padding past N (8 bits). */
static inline __attribute__((always_inline)) void Q4_NAME(tile8_sequential)(const q4_problem *p, int64_t r, int64_t n0,
                                                                          const int bits)
{
    const int64_t B = p->block, nblk = (p->k + B - 1) / B, K = nblk * B;
    const int8_t *qa = (const int8_t *)p->scratch + r * K;
    const float *sa = (const float *)((const int8_t *)p->scratch + p->m * K) + r * nblk;
    const float *ts = sa + p->m * nblk;
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    Q4_CONSTANTS
    const int f16 = p->blocks_f16;
    const int64_t entry = Q4_ENTRY_BYTES(f16);
    const uint8_t *group = (const uint8_t *)p->blocks + (size_t)(n0 / 8) * (size_t)nblk * entry;
    const uint8_t *wb = p->b + (n0 / 8) * (bits == 8 ? 8 * K : 4 * K);
    __m256 facc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; b++) {
        __m256i acc[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_setzero_si256();
        for (int64_t k0 = b * B; k0 < (b + 1) * B; k0 += Q4_CHUNK) {
            const __m256i a_lo = _mm256_load_si256((const __m256i *)(qa + k0));
            const __m256i a_hi = _mm256_load_si256((const __m256i *)(qa + k0 + 32));
            const uint8_t *step = wb + (bits == 8 ? k0 / Q4_CHUNK * 8 * Q4_CHUNK : k0 / 128 * 512 + (k0 % 128) / 2);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const uint8_t *wp = step + j * (bits == 8 ? Q4_CHUNK : 64);
                _mm_prefetch((const char *)(wp + Q4_PACKED_PREFETCH), Q4_PREFETCH_HINT);
                if (bits == 8) {
#ifdef Q4_DPBUSD
                    acc[j] = Q4_DPBUSD(acc[j], _mm256_loadu_si256((const __m256i *)wp), a_lo);
                    acc[j] = Q4_DPBUSD(acc[j], _mm256_loadu_si256((const __m256i *)(wp + 32)), a_hi);
#endif
                } else {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)wp);
                    Q4_DOT_ONE(acc[j], w, a_lo, a_hi);
                }
            }
        }
        q4_block_end(acc, group + b * entry, f16, sa[b], ts[b], &facc);
    }
    float y[8];
    _mm256_storeu_ps(y, facc);
    for (int j = 0; j < 8 && n0 + j < p->n; j++)
        p->y[r * p->n + n0 + j] = y[j] + (p->bias ? p->bias[n0 + j] : 0.0f);
}

/* e^x on 8 floats (vec_exp.h) for the fused SwiGLU's sigmoid: 250k of them per decoded token on
 * InternVL3-2B, too many for libm's scalar expf */
IE_DEFINE_VEC_EXP(Q4_NAME(exp8), q4_v8f, q4_v8i)

/* Rows r_lo .. r_hi-1 and columns n_lo .. n_hi-1 of Y. */
static inline __attribute__((always_inline)) void Q4_NAME(columns)(const q4_problem *p, int64_t r_lo, int64_t r_hi,
                                                                   int64_t n_lo, int64_t n_hi)
{
#ifdef Q4_PREFILL_TILE16
    /* from 8 rows on (fewer: the gathers cost more than they save), counted over the whole problem and
     * not this task's share, so that a row's result does not depend on how the rows were split into
     * tasks: a prefill that starts after a reused prefix (reuse.py) computes the rows a whole one does */
    if (p->blocks && p->m >= 8) {
        for (; n_lo + 16 <= n_hi && n_lo + 16 <= p->n / 8 * 8; n_lo += 16)
            Q4_PREFILL_TILE16(p, r_lo, r_hi, n_lo);
    }
#endif
    int64_t r = r_lo;
    for (; r + 4 <= r_hi; r += 4) /* prefill: four rows share every weight load */
        for (int64_t n = n_lo; n < n_hi; n++)
            Q4_NAME(tile)(p, r, 4, n, 1);
    for (; r < r_hi; r++) { /* decode: four columns share every activation load */
        int64_t n = n_lo;
#ifdef Q4_DECODE_TILE8
        if (p->blocks) /* full groups of 8 only: the table covers columns 0 .. 8 * (N / 8) - 1 */
            for (; n + 8 <= n_hi && n + 8 <= p->n / 8 * 8; n += 8)
                Q4_DECODE_TILE8(p, r, n);
#else
        if (p->blocks && p->packed)
            for (; n + 8 <= n_hi && n + 8 <= p->n / 8 * 8; n += 8)
                Q4_NAME(tile8_sequential)(p, r, n, 4);
#endif
        for (; n + 4 <= n_hi; n += 4)
            Q4_NAME(tile)(p, r, 1, n, 4);
        for (; n < n_hi; n++)
            Q4_NAME(tile)(p, r, 1, n, 1);
    }
}

static void Q4_NAME(run)(const q4_problem *p, size_t task)
{
#ifdef Q4_DPBUSD
    if (p->bits == 8) { /* q4_plan: packed, with the table, on a VNNI instruction set */
        const int64_t width = (p->n + 7) / 8 * 8, col_tiles = (width + Q4_TILE_COLS - 1) / Q4_TILE_COLS;
        const int64_t n_lo = (int64_t)(task % col_tiles) * Q4_TILE_COLS;
        const int64_t n_hi = n_lo + Q4_TILE_COLS < width ? n_lo + Q4_TILE_COLS : width;
        const int64_t r_lo = (int64_t)(task / col_tiles) * Q4_TILE_ROWS;
        const int64_t r_hi = r_lo + Q4_TILE_ROWS < p->m ? r_lo + Q4_TILE_ROWS : p->m;
        for (int64_t r = r_lo; r < r_hi; r++)
            for (int64_t n = n_lo; n < n_hi; n += 8)
                Q4_NAME(tile8_sequential)(p, r, n, 8);
        return;
    }
#endif
    const int64_t width = p->swiglu ? p->n / 2 : p->n; /* columns the tasks cover */
    const int64_t cols = p->swiglu ? Q4_SWIGLU_COLS : Q4_TILE_COLS;
    const int64_t col_tiles = (width + cols - 1) / cols;
    const int64_t n_lo = (int64_t)(task % col_tiles) * cols;
    const int64_t n_hi = n_lo + cols < width ? n_lo + cols : width;
    const int64_t r_lo = (int64_t)(task / col_tiles) * Q4_TILE_ROWS;
    const int64_t r_hi = r_lo + Q4_TILE_ROWS < p->m ? r_lo + Q4_TILE_ROWS : p->m;
    if (!p->swiglu) {
        Q4_NAME(columns)(p, r_lo, r_hi, n_lo, n_hi);
        return;
    }
    /* the gate columns, then the matching up ones: side by side when paired (q4_pair_swiglu) */
    const int64_t gate_at = p->swiglu_paired ? 2 * n_lo : n_lo;
    const int64_t up_at = p->swiglu_paired ? 2 * n_lo + (n_hi - n_lo) : width + n_lo;
    Q4_NAME(columns)(p, r_lo, r_hi, gate_at, gate_at + (n_hi - n_lo));
    Q4_NAME(columns)(p, r_lo, r_hi, up_at, up_at + (n_hi - n_lo));
    for (int64_t r = r_lo; r < r_hi; r++) {
        const float *gate = p->y + r * p->n + gate_at - n_lo, *up = p->y + r * p->n + up_at - n_lo;
        float *out = p->swiglu + r * width;
        int64_t n = n_lo;
        for (; n + 8 <= n_hi; n += 8) {
            q4_v8f g, u;
            memcpy(&g, gate + n, sizeof g);
            memcpy(&u, up + n, sizeof u);
            const q4_v8f y = g / (1.0f + Q4_NAME(exp8)(-g)) * u;
            memcpy(out + n, &y, sizeof y);
        }
        for (; n < n_hi; n++) /* silu(g) = g sigmoid(g) */
            out[n] = gate[n] / (1.0f + __builtin_expf(-gate[n])) * up[n];
    }
}
