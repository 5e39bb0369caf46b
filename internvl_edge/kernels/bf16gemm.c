/* bf16gemm.h: the vision encoder's linears in bfloat16 (AMX-BF16 or AVX512-BF16). */
#include "bf16gemm.h"

#include "isa.h"
#include "vec_exp.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

static bf16_path_t detect(void) {
    const char *cap = getenv("INTERNVL_EDGE_BF16");
    if (cap && (strcmp(cap, "none") == 0 || strcmp(cap, "0") == 0)) return BF16_NONE;
    __builtin_cpu_init();
    unsigned a, b, c, d;
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__get_cpuid_count(7, 1, &a, &b, &c, &d))
        return BF16_NONE;
    if (!(a & (1u << 5))) return BF16_NONE; /* CPUID.(7,1):EAX[5] AVX512_BF16 */
    if (cap && strcmp(cap, "avx512bf16") == 0) return BF16_AVX512;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return BF16_AVX512;
    return isa_amx(22) ? BF16_AMX : BF16_AVX512; /* CPUID.(7,0):EDX[22] AMX-BF16 */
}
#else
static bf16_path_t detect(void) { return BF16_NONE; }
#endif

bf16_path_t bf16_path(void) {
    static int cached = -1; /* a race only detects twice, with the same answer */
    if (cached < 0) cached = (int)detect();
    return (bf16_path_t)cached;
}

const char *bf16_path_name(bf16_path_t path) {
    static const char *const names[] = {"none", "avx512bf16", "amx"};
    return names[path];
}

size_t bf16_packed_bytes(int64_t k, int64_t n) { return (size_t)bf16_kp(k) * (size_t)bf16_np(n) * sizeof(uint16_t); }

void bf16_pack(const uint16_t *b, int64_t k, int64_t n, uint16_t *out) {
    const int64_t pairs = bf16_kp(k) / 2, blocks = bf16_np(n) / 16;
    /* B's rows in order (the weight is read once, sequentially), each pair of them interleaved into
     * every column block; zeros past k and n */
    for (int64_t r = 0; r < pairs; r++) {
        const uint16_t *even = 2 * r < k ? b + 2 * r * n : NULL, *odd = 2 * r + 1 < k ? b + (2 * r + 1) * n : NULL;
        for (int64_t cb = 0; cb < blocks; cb++) {
            uint16_t *o = out + (cb * pairs + r) * 32;
            const int64_t c0 = cb * 16, width = n - c0 < 16 ? (n - c0 > 0 ? n - c0 : 0) : 16;
            for (int64_t c = 0; c < 16; c++) {
                o[2 * c] = even && c < width ? even[c0 + c] : 0;
                o[2 * c + 1] = odd && c < width ? odd[c0 + c] : 0;
            }
        }
    }
}

/* float -> bfloat16 bits, nearest even (PyTorch's rounding: c10/util/BFloat16.h, round_to_nearest_even) */
static inline uint16_t round_one(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

size_t bf16_tasks(const bf16_problem *p) {
    const int64_t chunks = (bf16_rows(p->m) + BF16_TASK_ROWS - 1) / BF16_TASK_ROWS;
    return (size_t)(chunks * (bf16_np(p->n) / BF16_COLS));
}

/* Rows r .. r+count-1 (count <= 32) of the 32 columns from c0, from `acc` (row stride 32 floats):
 * the rows and columns that exist, bias added. */
static void store_rows(const bf16_problem *p, int64_t r, int count, int64_t c0, const float *acc) {
    const int64_t width = p->n - c0 < BF16_COLS ? p->n - c0 : BF16_COLS;
    for (int i = 0; i < count && r + i < p->m; i++) {
        float *y = p->y + (r + i) * p->n + c0;
        const float *v = acc + i * BF16_COLS;
        if (p->bias)
            for (int64_t c = 0; c < width; c++) y[c] = v[c] + p->bias[c0 + c];
        else
            for (int64_t c = 0; c < width; c++) y[c] = v[c] + 0.0f; /* as with a bias: -0 becomes +0 */
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

/* o[i] = round_one(x[i] * mul) for i < n, 16 at a time */
static void round_row(const float *x, float mul, uint16_t *o, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16f f;
        memcpy(&f, x + i, sizeof f);
        f *= mul;
        v16u u;
        memcpy(&u, &f, sizeof u);
        const v16u nan = (u & 0x7fffffffu) > 0x7f800000u; /* lanes of all ones where NaN */
        const v16u r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16 & ~nan) | (((u >> 16) | 0x40u) & nan);
        const v16h h = __builtin_convertvector(r, v16h);
        memcpy(o + i, &h, sizeof h);
    }
    for (; i < n; i++) o[i] = round_one(x[i] * mul);
}

void bf16_round(const bf16_problem *p) {
    const int64_t kp = bf16_kp(p->k), rows = bf16_rows(p->m);
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *o = p->a16 + r * kp;
        if (r >= p->m) {
            memset(o, 0, (size_t)kp * sizeof *o);
            continue;
        }
        round_row(p->a + r * p->k, 1.0f, o, p->k);
        memset(o + p->k, 0, (size_t)(kp - p->k) * sizeof *o);
    }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16")
/* 8 rows x 32 columns at a time: per pair of k, the two blocks' 16 columns loaded once, each row's
 * pair broadcast, 16 VDPBF16PS into 16 accumulators. */
static void run_avx512(const bf16_problem *p, int64_t r0, int64_t r1, int64_t c0) {
    const int64_t kp = bf16_kp(p->k), pairs = kp / 2;
    const uint16_t *b0 = p->packed + (c0 / 16) * pairs * 32, *b1 = b0 + pairs * 32;
    float out[8 * BF16_COLS] __attribute__((aligned(64)));
    for (int64_t r = r0; r < r1; r += 8) {
        __m512 acc[8][2];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        const uint16_t *a = p->a16 + r * kp;
        for (int64_t q = 0; q < pairs; q++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + q * 32);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(b1 + q * 32);
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                uint32_t pair;
                memcpy(&pair, a + i * kp + 2 * q, sizeof pair);
                const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, w0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, w1);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            _mm512_store_ps(out + i * BF16_COLS, acc[i][0]);
            _mm512_store_ps(out + i * BF16_COLS + 16, acc[i][1]);
        }
        store_rows(p, r, 8, c0, out);
    }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,amx-tile,amx-bf16")
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* One 32 x 32 block of float sums into c (row stride ldc floats): 32 rows of a (bfloat16, row stride lda
 * elements, kp of them used, a multiple of 32) times the 32 columns of a packed B whose two column
 * blocks start at b0 (b0 + kp * 16 the second). Tiles 0-3 the four 16 x 16 sums, 4-5 the two 16-row
 * halves of A (32 k each), 6-7 the two column blocks of B (16 pairs of k x 16 columns); per 32 k, four
 * loads and four TDPBF16PS. amx_configure() first, in the calling thread. */
static inline void amx_block(const uint16_t *a, int64_t lda, const uint16_t *b0, int64_t kp, float *c, int64_t ldc) {
    const uint16_t *b1 = b0 + kp * 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < kp; k0 += BF16_K_STEP) {
        _tile_loadd(4, a + k0, lda * 2);
        _tile_loadd(5, a + 16 * lda + k0, lda * 2);
        _tile_loadd(6, b0 + k0 * 16, 64);
        _tile_loadd(7, b1 + k0 * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

/* The tile state is configured per task and released after it. */
static void run_amx(const bf16_problem *p, int64_t r0, int64_t r1, int64_t c0) {
    amx_configure();
    const int64_t kp = bf16_kp(p->k);
    const uint16_t *b0 = p->packed + (c0 / 16) * (kp / 2) * 32;
    float out[32 * BF16_COLS] __attribute__((aligned(64)));
    for (int64_t r = r0; r < r1; r += 32) {
        amx_block(p->a16 + r * kp, kp, b0, kp, out, BF16_COLS);
        store_rows(p, r, 32, c0, out);
    }
    _tile_release();
}

VEC_EXP_DEFINE(exp16, v16f, v16i)

/* keys padded to whole panels of 32; head dimensions to 32 as the K of S and as the columns of O */
static int64_t attn_keys(const bf16_attn_problem *p) { return bf16_np(p->seq); }
static int64_t attn_dims(const bf16_attn_problem *p) { return bf16_kp(p->head_dim); }

size_t bf16_attn_scratch_bytes(const bf16_attn_problem *p) {
    /* per (batch, head): K^T as a packed [dims, keys] and V as a packed [keys, dims] */
    return (size_t)(p->batch * p->heads) * 2 * (size_t)(attn_keys(p) * attn_dims(p)) * sizeof(uint16_t);
}

void bf16_attn_pack(const bf16_attn_problem *p, size_t task) {
    const int64_t keys = attn_keys(p), dims = attn_dims(p), width = p->heads * p->head_dim;
    const int64_t b = (int64_t)task / p->heads, h = (int64_t)task % p->heads;
    uint16_t *kt = p->scratch + (int64_t)task * 2 * keys * dims, *vp = kt + keys * dims;
    uint16_t *rows = (uint16_t *)calloc((size_t)(keys * dims), sizeof *rows); /* one of K, V rounded, zero padded */
    if (!rows) return; /* cannot happen on Linux short of exhaustion */
    for (int pass = 0; pass < 2; pass++) {
        const float *x = (pass ? p->v : p->k) + b * p->seq * width + h * p->head_dim;
        for (int64_t key = 0; key < p->seq; key++) round_row(x + key * width, 1.0f, rows + key * dims, p->head_dim);
        if (pass == 0) /* K^T: B[d][key], column blocks of 16 keys, each key's pair of d side by side */
            for (int64_t cb = 0; cb < keys / 16; cb++)
                for (int64_t r = 0; r < dims / 2; r++)
                    for (int c = 0; c < 16; c++)
                        memcpy(kt + ((cb * (dims / 2) + r) * 16 + c) * 2, rows + (cb * 16 + c) * dims + 2 * r,
                               2 * sizeof *rows);
        else /* V: B[key][d], column blocks of 16 dimensions, pairs of keys */
            for (int64_t cb = 0; cb < dims / 16; cb++)
                for (int64_t r = 0; r < keys / 2; r++) {
                    uint16_t *o = vp + (cb * (keys / 2) + r) * 32;
                    const uint16_t *even = rows + 2 * r * dims + cb * 16, *odd = even + dims;
                    for (int c = 0; c < 16; c++) {
                        o[2 * c] = even[c];
                        o[2 * c + 1] = odd[c];
                    }
                }
    }
    free(rows);
}

size_t bf16_attn_tasks(const bf16_attn_problem *p) {
    return (size_t)(p->batch * p->heads * (bf16_rows(p->seq) / 32));
}

void bf16_attn_run(const bf16_attn_problem *p, size_t task) {
    const int64_t keys = attn_keys(p), dims = attn_dims(p), width = p->heads * p->head_dim;
    const int64_t blocks = bf16_rows(p->seq) / 32, head = (int64_t)task / blocks, q0 = ((int64_t)task % blocks) * 32;
    const int64_t b = head / p->heads, h = head % p->heads;
    const uint16_t *kt = p->scratch + head * 2 * keys * dims, *vp = kt + keys * dims;
    uint16_t qb[32 * BF16_ATTN_MAX_HEAD] __attribute__((aligned(64)));
    float c[32 * BF16_COLS] __attribute__((aligned(64)));
    float *s = (float *)aligned_alloc(64, (size_t)(32 * keys) * sizeof(float));
    uint16_t *pb = (uint16_t *)aligned_alloc(64, (size_t)(32 * keys) * sizeof(uint16_t));
    if (!s || !pb) { /* cannot happen on Linux short of exhaustion; the caller's output stays as it was */
        free(s);
        free(pb);
        return;
    }
    const float *q = p->q + b * p->seq * width + h * p->head_dim;
    for (int64_t i = 0; i < 32; i++) {
        uint16_t *row = qb + i * dims;
        memset(row, 0, (size_t)dims * sizeof *row);
        if (q0 + i < p->seq) round_row(q + (q0 + i) * width, 1.0f, row, p->head_dim);
    }
    amx_configure();
    for (int64_t cp = 0; cp < keys / 32; cp++) /* S = Q K^T, 32 keys at a time */
        amx_block(qb, dims, kt + cp * 2 * (dims / 2) * 32, dims, s + cp * 32, keys);
    for (int64_t i = 0; i < 32; i++) { /* softmax(scale S) over the keys there are, rounded to bfloat16 */
        float *row = s + i * keys;
        uint16_t *prow = pb + i * keys;
        memset(prow, 0, (size_t)keys * sizeof *prow);
        if (q0 + i >= p->seq) continue;
        const int64_t n = p->seq;
        int64_t j = 0;
        v16f vmx = {0};
        vmx += row[0];
        for (; j + 16 <= n; j += 16) {
            v16f x;
            memcpy(&x, row + j, sizeof x);
            vmx = (v16f)_mm512_max_ps((__m512)x, (__m512)vmx);
        }
        float mx = vmx[0];
        for (int e = 1; e < 16; e++) mx = vmx[e] > mx ? vmx[e] : mx;
        for (; j < n; j++) mx = row[j] > mx ? row[j] : mx;
        /* keys past n in the last vector: masked to 0 after the exp (their S is 0, not -inf) */
        v16f vsum = {0};
        for (j = 0; j < n; j += 16) {
            v16f x;
            memcpy(&x, row + j, sizeof x);
            x = exp16((x - mx) * p->scale);
            if (j + 16 > n)
                for (int e = (int)(n - j); e < 16; e++) x[e] = 0.0f;
            memcpy(row + j, &x, sizeof x);
            vsum += x;
        }
        float sum = 0.0f;
        for (int e = 0; e < 16; e++) sum += vsum[e];
        round_row(row, 1.0f / sum, prow, n);
    }
    for (int64_t cp = 0; cp < dims / 32; cp++) { /* O = P V, 32 dimensions at a time */
        amx_block(pb, keys, vp + cp * 2 * (keys / 2) * 32, keys, c, BF16_COLS);
        for (int64_t i = 0; i < 32 && q0 + i < p->seq; i++) {
            float *o = p->out + b * p->seq * width + (q0 + i) * width + h * p->head_dim;
            const int64_t end = p->head_dim - cp * 32 < 32 ? p->head_dim - cp * 32 : 32;
            memcpy(o + cp * 32, c + i * 32, (size_t)end * sizeof(float));
        }
    }
    _tile_release();
    free(s);
    free(pb);
}
#pragma GCC pop_options
#endif

void bf16_run(const bf16_problem *p, size_t task) {
    const int64_t panels = bf16_np(p->n) / BF16_COLS;
    /* consecutive tasks share their rows of A (in L2) and take the column panels in turn */
    const int64_t chunk = (int64_t)task / panels, c0 = ((int64_t)task % panels) * BF16_COLS;
    const int64_t r0 = chunk * BF16_TASK_ROWS, rows = bf16_rows(p->m);
    const int64_t r1 = r0 + BF16_TASK_ROWS < rows ? r0 + BF16_TASK_ROWS : rows;
#if defined(__x86_64__) && defined(__GNUC__)
    if (p->path == BF16_AMX)
        run_amx(p, r0, r1, c0);
    else if (p->path == BF16_AVX512)
        run_avx512(p, r0, r1, c0);
#else
    (void)r1;
    (void)c0;
#endif
}
