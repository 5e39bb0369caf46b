/* The 4-bit x int8 matmul behind the `ai.internvl_edge` MatMulNBits op (see q4gemm.h and
 * q4gemm_isa.inc): one body compiled per x86-64 instruction set, picked at run time, so the
 * library loads on any x86-64 CPU and says so (q4_supported) where it has nothing to offer. */
#include "q4gemm.h"
#include "isa.h"
#include "vec_exp.h"

#include <stdlib.h>
#include <string.h>

#define Q4_CHUNK 64       /* weights per 32-byte load of B */
#define Q4_TILE_COLS 32   /* columns of one task: a few KB of B, parallel work for every linear */
#define Q4_TILE_ROWS 256  /* rows of one task: long prefills split across threads by rows too */
#ifndef Q4_SWIGLU_COLS
#define Q4_SWIGLU_COLS 128 /* gate (and as many up) columns of one fused SwiGLU task, side by side in
                              the packed weights (q4_pair_swiglu); without that, each task jumps from
                              the gate half to the up half once, where prefetching restarts */
#endif
/* q4_blocks_fill's entry per 8 columns and block: 8 scales (float or float16), then 8 zero points */
#define Q4_ENTRY_BYTES(f16) ((f16) ? 24 : 40)
#define Q4_ENTRY_ZEROS(f16) ((f16) ? 16 : 32)
#define Q4_MAX_BLOCK 1024 /* largest block size taken (a stack buffer pads a partial last block) */
#define Q4_AMX_TILE 16    /* columns of an AMX tile of 8-bit weights, and rows of activations */
#define Q4_AMX_COLS 128   /* columns of one task of the AMX 8-bit path: eight tiles of 16; with 32, the
                             lm_head's 4740 tasks spent ~0.3 ms per token between tasks */
#ifndef Q4_PREFETCH
#define Q4_PREFETCH 2     /* B is read this many column groups ahead: the stream prefetcher alone lags */
#endif

/* One line of weights fetched ahead: they are read once per token, so non-temporally where that keeps
 * them from displacing what decode reuses (KV rows, activations) from L2 and L3, else into L2 (T2):
 * isa_prefetch_nta says which. `nta` is read once per task; the branch is the same every line. */
#define Q4_PREFETCH_LINE(addr, nta)                                                                    \
    do {                                                                                               \
        if (nta)                                                                                       \
            _mm_prefetch((const char *)(addr), _MM_HINT_NTA);                                          \
        else                                                                                           \
            _mm_prefetch((const char *)(addr), _MM_HINT_T2);                                           \
    } while (0)

#ifndef Q4_PACKED_PREFETCH
#define Q4_PACKED_PREFETCH 8192 /* bytes ahead in q4_pack's layout, one stream: tuned on 2 cores with
                                   the NTA hint; decode 1.01-1.04x against 4096 and against 16384
                                   (benchmarks/kernels_ab.py --against; docs/performance-notes.md) */
#endif

/* Column n's 32 bytes of weights k0 .. k0+63 (k0 a multiple of 64), in the stored layout or q4_pack's;
 * kp: K padded to whole blocks. */
static inline __attribute__((always_inline)) const uint8_t *q4_chunk(const q4_problem *p, int64_t kp, int64_t n,
                                                                     int64_t k0)
{
    if (p->packed)
        return p->b + (n >> 3) * (kp * 4) + (k0 >> 7) * 512 + (n & 7) * 64 + ((k0 & 127) >> 1);
    return p->b + n * (kp / 2) + k0 / 2;
}

static int q4_amx8(void);
/* The k (from the chunk's start) of byte j of an AMX tile's column: activation byte j of the chunk, stored
 * even k first, then odd (q4_quantize). */
static inline int64_t q4_amx_korder(int64_t j) { return j < Q4_CHUNK / 2 ? 2 * j : 2 * (j - Q4_CHUNK / 2) + 1; }
static int takes_8bit(int64_t n, int64_t k, int64_t block);
static int64_t q4_width8(int64_t n);

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

typedef float q4_v8f __attribute__((vector_size(32))); /* GCC vector extensions: the SwiGLU epilogue */
typedef int32_t q4_v8i __attribute__((vector_size(32)));

/* The 8 scales of a q4_blocks_fill entry as floats (float16 ones widened: exact). */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) __m256
q4_entry_scales(const uint8_t *entry, const int f16)
{
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)entry))
               : _mm256_loadu_ps((const float *)(const void *)entry);
}

/* The end of one block of an 8-column decode tile (tile8_avx512vnni, tile8_sequential): the 8
 * columns' int32 partial sums reduced across lanes into dot = [c0 .. c7] (exact: integers;
 * q4_block_end does it for 8 lanes each, tile8_avx512vnni for two blocks of 16 at once), then scaled
 * and zero-point corrected here as vectors over the columns from the block's q4_blocks_fill entry, in
 * the one order every path of this kernel follows for every (row, column), so that a row's
 * result does not depend on how many rows share the call or where it sits (batch invariance):
 *   acc = fma(float(dot[c,b]), s[c,b] * sa[b], acc);  acc = acc - (s[c,b] * z[c,b]) * ts[b]  (one rounding)
 * over the blocks in order from acc = 0, then y = acc + bias (0 without one).
 * AVX2 code, inlined into every instruction set's tiles (each a superset). */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) void
q4_block_scale(const __m256i dot, const uint8_t *entry, const int f16, float sab, float tsb, __m256 *facc)
{
    const __m256 s8 = q4_entry_scales(entry, f16);
    const __m128i zeros = _mm_loadl_epi64((const __m128i *)(const void *)(entry + Q4_ENTRY_ZEROS(f16)));
    const __m256i z8 = _mm256_cvtepu8_epi32(zeros);
    *facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s8, _mm256_set1_ps(sab)), *facc);
    *facc = _mm256_fnmadd_ps(_mm256_mul_ps(s8, _mm256_cvtepi32_ps(z8)), _mm256_set1_ps(tsb), *facc);
}

__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) void
q4_block_end(const __m256i v[8], const uint8_t *entry, const int f16, float sab, float tsb, __m256 *facc)
{
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    const __m256i dot =
        _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
    q4_block_scale(dot, entry, f16, sab, tsb, facc);
}

/* VNNI: u8 x s8 dot products of 4 bytes into int32 lanes. The high nibbles are used in place
 * (w & 0xF0 = 16 q), which saves a shift per load; the block sum divides that half by 16 exactly. */
#define Q4_CONSTANTS const __m256i mf0 __attribute__((unused)) = _mm256_set1_epi8((char)0xF0);
#define Q4_BLOCK_SUM(lo, hi) _mm256_add_epi32((lo), _mm256_srai_epi32((hi), 4))
#define Q4_DOT_CHUNK(acc_lo, acc_hi, w, a_lo, a_hi)                          \
    do {                                                                      \
        acc_lo = Q4_DPBUSD(acc_lo, _mm256_and_si256(w, m0f), a_lo);           \
        acc_hi = Q4_DPBUSD(acc_hi, _mm256_and_si256(w, mf0), a_hi);           \
    } while (0)
/* the same 64 weights into one accumulator (the high nibbles shifted down): the 8-column tile's */
#define Q4_DOT_ONE(acc, w, a_lo, a_hi)                                \
    (acc = Q4_DPBUSD(Q4_DPBUSD(acc, _mm256_and_si256(w, m0f), a_lo), \
                     _mm256_and_si256(_mm256_srli_epi16(w, 4), m0f), a_hi))

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define Q4_NAME(x) x##_avx512vnni
#define Q4_DPBUSD _mm256_dpbusd_epi32

/* Sixteen vectors of 16 int32 partial sums into one: lane i = the sum of v[i]'s lanes (exact:
 * integers). Three rounds, each halving the vectors: 32-bit interleaves, 64-bit interleaves, then
 * 128-bit lanes: 45 instructions for 16 sums, where folding each to 8 lanes and q4_block_end's
 * horizontal adds take 50 for two blocks of 8, 12 of them horizontal adds of 3 micro-ops each. */
static inline __attribute__((always_inline)) __m512i sum16_avx512(const __m512i v[16])
{
    __m512i w[8], x[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of (a, b) = v[2i], v[2i+1] */
        w[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) /* per 128-bit lane: v[4i] .. v[4i+3], each summed over that lane */
        x[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(w[2 * i], w[2 * i + 1]),
                                _mm512_unpackhi_epi64(w[2 * i], w[2 * i + 1]));
    /* the four 128-bit lanes of each x[i] summed into lane i */
    const __m512i y01 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_i32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i y23 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_i32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* One block of 8 columns, B weights from k = b * B, into acc[0..7] (16 int32 lanes per column). */
static inline __attribute__((always_inline)) void block8_avx512vnni(const int8_t *qa, const uint8_t *wb, int64_t b,
                                                                    int64_t B, int64_t column_stride,
                                                                    int64_t step_stride, int64_t ahead, int nta,
                                                                    __m512i acc[8])
{
    const __m512i m0f = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++)
        acc[j] = _mm512_setzero_si512();
    for (int64_t k0 = b * B; k0 < (b + 1) * B; k0 += 128) {
        /* the activation layout is per 64 weights [32 even | 32 odd]: pair two of them */
        const __m512i a_lo = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)(qa + k0))),
                                                _mm256_load_si256((const __m256i *)(qa + k0 + 64)), 1);
        const __m512i a_hi = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_load_si256((const __m256i *)(qa + k0 + 32))),
            _mm256_load_si256((const __m256i *)(qa + k0 + 96)), 1);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const uint8_t *wp = wb + j * column_stride + k0 / 128 * step_stride;
            Q4_PREFETCH_LINE(wp + ahead, nta);
            const __m512i w = _mm512_loadu_si512((const void *)wp);
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(w, m0f), a_lo);
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(_mm512_srli_epi16(w, 4), m0f), a_hi);
        }
    }
}

/* Decode (one row) on 8 columns at a time, for blocks of a multiple of 128 weights: B is read 64
 * bytes (one block of 128) per load. Blocks go in pairs: the 16 columns' sums of the pair reduced
 * together (sum16_avx512), then each block ends in q4_block_scale in order, the order every path
 * follows (batch invariance); an odd last block alone, through q4_block_end. Against each block
 * reduced alone, on a Xeon with AVX512-VNNI: InternVL3-2B's 28 layers of linears 1.06-1.10x faster
 * on 4 KB pages, the same (0.99-1.02x) on huge pages (benchmarks/matmulnbits.py --layers 28;
 * docs/performance-notes.md). Reducing once per tile instead, in float, was 1.01-1.02x faster on AMD
 * (benchmarks/kernels_ab.py --against) but gave a row another result than the prefill tiles.
 * Scales and zero points come from q4_blocks_fill's table, laid out for exactly this (decoding them
 * per call, or gathering them, cost a third of the time).
 */
/* Where an 8-column decode tile of row r from column n0 reads: its activations, their block scales
 * and sums, its table entries and weights, and how the weights are laid out. */
typedef struct {
    int64_t B, nblk, K, entry, column_stride, step_stride, ahead;
    const int8_t *qa;
    const float *sa, *ts;
    const uint8_t *group, *wb;
    int f16, nta;
} tile8_at;

static inline __attribute__((always_inline)) tile8_at tile8_where(const q4_problem *p, int64_t r, int64_t n0,
                                                                  const int packed)
{
    tile8_at t;
    t.B = p->block, t.nblk = (p->k + t.B - 1) / t.B, t.K = t.nblk * t.B;
    t.qa = (const int8_t *)p->scratch + r * t.K;
    t.sa = (const float *)((const int8_t *)p->scratch + p->m * t.K) + r * t.nblk;
    t.ts = t.sa + p->m * t.nblk;
    t.f16 = p->blocks_f16;
    t.entry = Q4_ENTRY_BYTES(t.f16);
    t.group = (const uint8_t *)p->blocks + (size_t)(n0 / 8) * (size_t)t.nblk * t.entry;
    /* packed (q4_pack): the 8 columns' 64 bytes follow each other, 512 bytes per 128 weights; else
     * each column's weights are a run of K/2 bytes */
    t.wb = packed ? p->b + (n0 / 8) * (t.K * 4) : p->b + n0 * (t.K / 2);
    t.column_stride = packed ? 64 : t.K / 2, t.step_stride = packed ? 512 : 64;
    t.ahead = packed ? Q4_PACKED_PREFETCH : Q4_PREFETCH * 8 * (t.K / 2);
    t.nta = isa_prefetch_nta();
    return t;
}

#define Q4_DECODE_TILE8(p, r, n0) ((p)->packed ? tile8_avx512vnni(p, r, n0, 1) : tile8_avx512vnni(p, r, n0, 0))
static inline __attribute__((always_inline)) void tile8_avx512vnni(const q4_problem *p, int64_t r, int64_t n0,
                                                                   const int packed)
{
    const tile8_at t = tile8_where(p, r, n0, packed);
    const int64_t B = t.B, nblk = t.nblk, entry = t.entry, column_stride = t.column_stride;
    const int64_t step_stride = t.step_stride, ahead = t.ahead;
    const int8_t *qa = t.qa;
    const float *sa = t.sa, *ts = t.ts;
    const uint8_t *group = t.group, *wb = t.wb;
    const int f16 = t.f16, nta = t.nta;
    __m256 facc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nblk; b += 2) {
        __m512i acc[16];
        block8_avx512vnni(qa, wb, b, B, column_stride, step_stride, ahead, nta, acc);
        block8_avx512vnni(qa, wb, b + 1, B, column_stride, step_stride, ahead, nta, acc + 8);
        const __m512i dots = sum16_avx512(acc);
        q4_block_scale(_mm512_castsi512_si256(dots), group + b * entry, f16, sa[b], ts[b], &facc);
        q4_block_scale(_mm512_extracti64x4_epi64(dots, 1), group + (b + 1) * entry, f16, sa[b + 1], ts[b + 1], &facc);
    }
    if (b < nblk) {
        __m512i acc[8];
        block8_avx512vnni(qa, wb, b, B, column_stride, step_stride, ahead, nta, acc);
        __m256i folded[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            folded[j] = _mm256_add_epi32(_mm512_castsi512_si256(acc[j]), _mm512_extracti64x4_epi64(acc[j], 1));
        q4_block_end(folded, group + b * entry, f16, sa[b], ts[b], &facc);
    }
    if (p->bias)
        facc = _mm256_add_ps(facc, _mm256_loadu_ps(p->bias + n0));
    else
        facc = _mm256_add_ps(facc, _mm256_setzero_ps()); /* what the other paths do: -0 becomes +0 */
    _mm256_storeu_ps(p->y + r * p->n + n0, facc);
}

/* Decode of two rows of a batch (q4gemm_isa.inc's columns, below 8 rows) on 8 columns: each 64-byte
 * load of B feeds both rows. One block at a time, the two rows' 8 columns reduced together
 * (sum16_avx512: lanes 0-7 row r, 8-15 row r + 1), then each row's block ends in q4_block_scale: the
 * same integer dots and the same float steps in the same order as tile8_avx512vnni gives each row
 * alone, so the same bits. */
#define Q4_DECODE_TILE8X2(p, r, n0) ((p)->packed ? tile8x2_avx512vnni(p, r, n0, 1) : tile8x2_avx512vnni(p, r, n0, 0))
static inline __attribute__((always_inline)) void tile8x2_avx512vnni(const q4_problem *p, int64_t r, int64_t n0,
                                                                     const int packed)
{
    const tile8_at t = tile8_where(p, r, n0, packed);
    const int64_t B = t.B, nblk = t.nblk, K = t.K, entry = t.entry;
    const int8_t *qa = t.qa;
    const float *sa = t.sa, *ts = t.ts;
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    __m256 facc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nblk; b++) {
        __m512i acc[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            acc[j] = _mm512_setzero_si512();
        for (int64_t k0 = b * B; k0 < (b + 1) * B; k0 += 128) {
            __m512i a_lo[2], a_hi[2]; /* as block8_avx512vnni pairs them, per row */
#pragma GCC unroll 2
            for (int i = 0; i < 2; i++) {
                const int8_t *q = qa + i * K + k0;
                a_lo[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)q)),
                                             _mm256_load_si256((const __m256i *)(q + 64)), 1);
                a_hi[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)(q + 32))),
                                             _mm256_load_si256((const __m256i *)(q + 96)), 1);
            }
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const uint8_t *wp = t.wb + j * t.column_stride + k0 / 128 * t.step_stride;
                Q4_PREFETCH_LINE(wp + t.ahead, t.nta);
                const __m512i w = _mm512_loadu_si512((const void *)wp);
                const __m512i lo = _mm512_and_si512(w, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m0f);
#pragma GCC unroll 2
                for (int i = 0; i < 2; i++) {
                    acc[8 * i + j] = _mm512_dpbusd_epi32(acc[8 * i + j], lo, a_lo[i]);
                    acc[8 * i + j] = _mm512_dpbusd_epi32(acc[8 * i + j], hi, a_hi[i]);
                }
            }
        }
        const __m512i dots = sum16_avx512(acc);
        q4_block_scale(_mm512_castsi512_si256(dots), t.group + b * entry, t.f16, sa[b], ts[b], &facc[0]);
        q4_block_scale(_mm512_extracti64x4_epi64(dots, 1), t.group + b * entry, t.f16, sa[nblk + b], ts[nblk + b],
                       &facc[1]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) {
        const __m256 y = _mm256_add_ps(facc[i], p->bias ? _mm256_loadu_ps(p->bias + n0) : _mm256_setzero_ps());
        _mm256_storeu_ps(p->y + (r + i) * p->n + n0, y); /* +0 without a bias, as every path: -0 becomes +0 */
    }
}

/* Prefill (many rows) on 16 columns at a time, blocks of a multiple of 128 weights: each block of
 * the 16 columns is turned around once into "16 columns x 8 weights" vectors (a dword gather per
 * column: weights k .. k+7; low nibbles = even k, high = odd k, the order the activations are
 * stored in), then every row multiplies it with its activations broadcast, 8 rows at a time:
 * lanes are columns, so a block's scale and zero point are one vector multiply-add per row.
 *
 *   y[r, n0..n0+15] += float(sum_k q[k, :] a_q[r, k]) * s[:, b] * sa[r, b] - s[:, b] z[:, b] * ts[r, b]
 */
#define Q4_PREFILL_TILE16(p, r_lo, r_hi, n0) prefill16_avx512vnni(p, r_lo, r_hi, n0)
static inline __attribute__((always_inline)) void rows16_avx512vnni(const q4_problem *p, const __m512i *wt,
                                                                    int64_t b, int64_t r, const int R, int64_t n0,
                                                                    __m512 s16, __m512 sz16)
{
    const int64_t B = p->block, nblk = (p->k + B - 1) / B, K = nblk * B;
    const int8_t *qa = (const int8_t *)p->scratch;
    const float *sa = (const float *)(qa + p->m * K);
    const float *ts = sa + p->m * nblk;
    __m512i acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++)
        acc[i] = _mm512_setzero_si512();
    for (int64_t s = 0; s < B / 8; s++) {
        const int64_t k = b * B + 8 * s, act = k / 64 * 64 + (k % 64) / 2; /* even k here, odd k 32 later */
        const __m512i lo = _mm512_load_si512((const void *)(wt + 2 * s));
        const __m512i hi = _mm512_load_si512((const void *)(wt + 2 * s + 1));
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) {
            int32_t even, odd;
            memcpy(&even, qa + (r + i) * K + act, 4);
            memcpy(&odd, qa + (r + i) * K + act + 32, 4);
            acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_set1_epi32(even));
            acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_set1_epi32(odd));
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
        float *y = p->y + (r + i) * p->n + n0;
        const __m512 scale = _mm512_mul_ps(s16, _mm512_set1_ps(sa[(r + i) * nblk + b]));
        __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), scale, _mm512_loadu_ps(y));
        _mm512_storeu_ps(y, _mm512_fnmadd_ps(sz16, _mm512_set1_ps(ts[(r + i) * nblk + b]), v));
    }
}

static void prefill16_avx512vnni(const q4_problem *p, int64_t r_lo, int64_t r_hi, int64_t n0)
{
    const int64_t B = p->block, nblk = (p->k + B - 1) / B, K = nblk * B;
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    /* where each of the 16 columns starts: packed (q4_pack), lanes 8-15 are the next group and a
     * column's 64 bytes per 128 weights are 64 apart; else a column is K/2 bytes */
    const __m512i columns = p->packed
        ? _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(lane, 3), _mm512_set1_epi32((int)(K * 4))),
                           _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 6))
        : _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)(K / 2)));
    const uint8_t *w0 = p->packed ? p->b + (n0 / 8) * (K * 4) : p->b + n0 * (K / 2);
    const int f16 = p->blocks_f16;
    const int64_t entry = Q4_ENTRY_BYTES(f16);
    const uint8_t *g0 = (const uint8_t *)p->blocks + (size_t)(n0 / 8) * (size_t)nblk * entry;
    const uint8_t *g1 = g0 + (size_t)nblk * entry;
    __m512i wt[2 * Q4_MAX_BLOCK / 8];
    for (int64_t r = r_lo; r < r_hi; r++) /* from 0, the bias added last: the decode tiles' order */
        _mm512_storeu_ps(p->y + r * p->n + n0, _mm512_setzero_ps());
    for (int64_t b = 0; b < nblk; b++) {
        for (int64_t s = 0; s < B / 8; s++) {
            const int64_t k = b * B + 8 * s; /* weights k .. k+7 of each column: 4 bytes */
            const uint8_t *at = w0 + (p->packed ? k / 128 * 512 + (k % 128) / 2 : k / 2);
            const __m512i w = _mm512_i32gather_epi32(columns, (const void *)at, 1);
            wt[2 * s] = _mm512_and_si512(w, m0f);
            wt[2 * s + 1] = _mm512_and_si512(_mm512_srli_epi32(w, 4), m0f);
        }
        const uint8_t *e0 = g0 + b * entry, *e1 = g1 + b * entry;
        const __m512 s16 = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(q4_entry_scales(e0, f16))),
            _mm256_castps_pd(q4_entry_scales(e1, f16)), 1)); /* 8 + 8 scales */
        const __m128i z0 = _mm_loadl_epi64((const __m128i *)(const void *)(e0 + Q4_ENTRY_ZEROS(f16)));
        const __m128i z1 = _mm_loadl_epi64((const __m128i *)(const void *)(e1 + Q4_ENTRY_ZEROS(f16)));
        const __m512 sz16 = _mm512_mul_ps(s16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(z0, z1))));
        int64_t r = r_lo;
        for (; r + 8 <= r_hi; r += 8)
            rows16_avx512vnni(p, wt, b, r, 8, n0, s16, sz16);
        for (; r < r_hi; r++)
            rows16_avx512vnni(p, wt, b, r, 1, n0, s16, sz16);
    }
    const __m512 bias = p->bias ? _mm512_loadu_ps(p->bias + n0) : _mm512_setzero_ps();
    for (int64_t r = r_lo; r < r_hi; r++) {
        float *y = p->y + r * p->n + n0;
        _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), bias));
    }
}
#include "q4gemm_isa.inc"
#undef Q4_DECODE_TILE8
#undef Q4_DECODE_TILE8X2
#undef Q4_PREFILL_TILE16
#undef Q4_NAME
#undef Q4_DPBUSD
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define Q4_NAME(x) x##_avxvnni
#define Q4_DPBUSD _mm256_dpbusd_avx_epi32 /* the same instruction in its VEX encoding */
#include "q4gemm_isa.inc"
#undef Q4_NAME
#undef Q4_DPBUSD
#undef Q4_DOT_CHUNK
#undef Q4_DOT_ONE
#undef Q4_CONSTANTS
#undef Q4_BLOCK_SUM
#pragma GCC pop_options

/* 8-bit weights on AMX-INT8 (q4gemm.h, packed8 for AMX): per 64 weights, a 16-column tile of B is
 * 16 rows of (16 columns x 4 bytes), each column's 4 bytes the weights its activation bytes 4r .. 4r+3
 * pair with (the activations keep their order: per 64 weights the 32 even k, then the 32 odd k). One
 * TDPBSUD multiplies up to 16 rows of activations with 1 KB of weights; its int32 sums are those of
 * the VNNI tiles exactly, and each block ends in the same two steps as q4_block_scale's, lane by
 * lane, so every (row, column) gets the same float result bit for bit. What it buys is one pass over
 * the weights for up to 16 rows of a decode batch, where the VNNI tiles read a task's weights again for
 * every row; at one row it streams as fast as they do (docs/performance-notes.md, "4-bit linears"). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} q4_tile_config;

__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c,amx-tile,amx-int8"))) static void
amx8_configure(int rows)
{
    q4_tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = (uint8_t)rows; /* the sums: rows x 16 int32 */
    cfg.colsb[0] = 64;
    cfg.rows[1] = (uint8_t)rows; /* the activations: rows x 64 bytes */
    cfg.colsb[1] = 64;
    cfg.rows[2] = Q4_AMX_TILE; /* the weights: 16 rows of 64 bytes */
    cfg.colsb[2] = 64;
    _tile_loadconfig(&cfg);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c,amx-tile,amx-int8"))) static void
amx8_columns(const q4_problem *p, int64_t r0, int rows, int64_t n0)
{
    const int64_t B = p->block, nblk = (p->k + B - 1) / B, K = nblk * B;
    const int8_t *qa = (const int8_t *)p->scratch;
    const float *sa = (const float *)(qa + p->m * K);
    const float *ts = sa + p->m * nblk;
    const int f16 = p->blocks_f16;
    const int64_t entry = Q4_ENTRY_BYTES(f16);
    const uint8_t *g0 = (const uint8_t *)p->blocks + (size_t)(n0 / 8) * (size_t)nblk * entry;
    const uint8_t *g1 = g0 + (size_t)nblk * entry;
    const uint8_t *wb = p->b + (n0 / Q4_AMX_TILE) * (Q4_AMX_TILE * K);
    const int nta = isa_prefetch_nta();
    int32_t dots[Q4_AMX_TILE][Q4_AMX_TILE] __attribute__((aligned(64)));
    __m512 acc[Q4_AMX_TILE];
    for (int i = 0; i < rows; i++)
        acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblk; b++) {
        _tile_zero(0);
        for (int64_t k0 = b * B; k0 < (b + 1) * B; k0 += Q4_CHUNK) {
            const uint8_t *w = wb + k0 * Q4_AMX_TILE;
            /* just before the tile's load: with a block's prefetches all before its first load, a
             * harness streamed slower (docs/performance-notes.md, "4-bit linears") */
            for (int line = 0; line < Q4_AMX_TILE * 64; line += 64)
                Q4_PREFETCH_LINE(w + line + Q4_PACKED_PREFETCH, nta);
            _tile_loadd(1, qa + r0 * K + k0, K);
            _tile_loadd(2, w, 64);
            _tile_dpbsud(0, 1, 2);
        }
        _tile_stored(0, dots, 64);
        /* q4_block_scale's two steps on 16 columns: two table entries of 8 */
        const __m512 s16 = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(q4_entry_scales(g0 + b * entry, f16))),
            _mm256_castps_pd(q4_entry_scales(g1 + b * entry, f16)), 1)); /* 8 + 8 scales */
        const __m128i z0 = _mm_loadl_epi64((const __m128i *)(const void *)(g0 + b * entry + Q4_ENTRY_ZEROS(f16)));
        const __m128i z1 = _mm_loadl_epi64((const __m128i *)(const void *)(g1 + b * entry + Q4_ENTRY_ZEROS(f16)));
        const __m512 sz = _mm512_mul_ps(s16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(z0, z1))));
        for (int i = 0; i < rows; i++) {
            const int64_t r = r0 + i;
            const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)dots[i]));
            acc[i] = _mm512_fmadd_ps(d, _mm512_mul_ps(s16, _mm512_set1_ps(sa[r * nblk + b])), acc[i]);
            acc[i] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(ts[r * nblk + b]), acc[i]);
        }
    }
    for (int i = 0; i < rows; i++) {
        float y[Q4_AMX_TILE];
        _mm512_storeu_ps(y, acc[i]);
        for (int j = 0; j < Q4_AMX_TILE && n0 + j < p->n; j++)
            p->y[(r0 + i) * p->n + n0 + j] = y[j] + (p->bias ? p->bias[n0 + j] : 0.0f);
    }
}

/* One task: Q4_AMX_COLS columns of up to Q4_TILE_ROWS rows, 16 rows (one tile of activations) at a
 * time; the tile state is configured for the task and released after it. */
__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c,amx-tile,amx-int8"))) static void
run_amx8(const q4_problem *p, size_t task)
{
    const int64_t width = (p->n + Q4_AMX_TILE - 1) / Q4_AMX_TILE * Q4_AMX_TILE;
    const int64_t col_tiles = (width + Q4_AMX_COLS - 1) / Q4_AMX_COLS;
    const int64_t n_lo = (int64_t)(task % col_tiles) * Q4_AMX_COLS;
    const int64_t n_hi = n_lo + Q4_AMX_COLS < width ? n_lo + Q4_AMX_COLS : width;
    const int64_t r_lo = (int64_t)(task / col_tiles) * Q4_TILE_ROWS;
    const int64_t r_hi = r_lo + Q4_TILE_ROWS < p->m ? r_lo + Q4_TILE_ROWS : p->m;
    int configured = 0;
    for (int64_t r = r_lo; r < r_hi; r += Q4_AMX_TILE) {
        const int rows = (int)(r_hi - r < Q4_AMX_TILE ? r_hi - r : Q4_AMX_TILE);
        if (rows != configured) {
            amx8_configure(rows);
            configured = rows;
        }
        for (int64_t n = n_lo; n < n_hi; n += Q4_AMX_TILE)
            amx8_columns(p, r, rows, n);
    }
    if (configured)
        _tile_release();
}

/* q4_pack's AMX layout with AVX512-VBMI: per column and 64 weights, one permute puts the bytes in the
 * activations' order (even k, then odd) and one scatter stores its 16 groups of 4 in the 16 tile rows. */
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void pack_amx8_vbmi(const q4_problem *p, int64_t kp,
                                                                                      uint8_t *out)
{
    uint8_t order[64];
    for (int j = 0; j < 64; j++)
        order[j] = (uint8_t)q4_amx_korder(j);
    const __m512i idx = _mm512_loadu_si512((const void *)order);
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16)); /* a tile row is 16 int32 */
    for (int64_t g = 0; g < q4_width8(p->n) / Q4_AMX_TILE; g++)
        for (int64_t k0 = 0; k0 < kp; k0 += Q4_CHUNK, out += Q4_AMX_TILE * Q4_CHUNK)
            for (int64_t c = 0; c < Q4_AMX_TILE; c++) {
                const int64_t n = g * Q4_AMX_TILE + c;
                const __m512i w = n < p->n ? _mm512_permutexvar_epi8(
                                                 idx, _mm512_loadu_si512((const void *)(p->b + n * kp + k0)))
                                           : _mm512_setzero_si512(); /* a padding column */
                _mm512_i32scatter_epi32((void *)(out + c * 4), rows, w, 4);
            }
}

/* AVX2 without VNNI: vpmaddubsw (u8 x s8 pairs into int16; 2 x 15 x 127 per pair, no saturation)
 * then vpmaddwd by ones into int32. 16 q would saturate int16 here, so the high nibbles are shifted. */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define Q4_NAME(x) x##_avx2
#define Q4_CONSTANTS const __m256i ones16 = _mm256_set1_epi16(1);
#define Q4_BLOCK_SUM(lo, hi) ((void)(hi), (lo))
#define Q4_DOT_ONE(acc, w, a_lo, a_hi) Q4_DOT_CHUNK(acc, acc, w, a_lo, a_hi) /* its sums are in acc_lo alone */
#define Q4_DOT_CHUNK(acc_lo, acc_hi, w, a_lo, a_hi)                                                  \
    do {                                                                                              \
        const __m256i lo_ = _mm256_maddubs_epi16(_mm256_and_si256(w, m0f), a_lo);                     \
        const __m256i hi_ = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m0f), a_hi); \
        acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(_mm256_add_epi16(lo_, hi_), ones16));   \
    } while (0)
#include "q4gemm_isa.inc"
#undef Q4_NAME
#undef Q4_DOT_CHUNK
#undef Q4_DOT_ONE
#undef Q4_CONSTANTS
#undef Q4_BLOCK_SUM
#pragma GCC pop_options

void q4_quantize(const q4_problem *p)
{
    switch (isa_selected()) {
    case ISA_AVX512VNNI: quantize_avx512vnni(p); break;
    case ISA_AVXVNNI: quantize_avxvnni(p); break;
    case ISA_AVX2: quantize_avx2(p); break;
    default: break;
    }
}

void q4_run(const q4_problem *p, size_t task)
{
    if (p->bits == 8 && q4_amx8()) {
        run_amx8(p, task);
        return;
    }
    switch (isa_selected()) {
    case ISA_AVX512VNNI: run_avx512vnni(p, task); break;
    case ISA_AVXVNNI: run_avxvnni(p, task); break;
    case ISA_AVX2: run_avx2(p, task); break;
    default: break;
    }
}

#else /* not x86-64 with GCC or clang: nothing here; the runtime keeps ONNX Runtime's own kernel */

void q4_quantize(const q4_problem *p) { (void)p; }
void q4_run(const q4_problem *p, size_t task) { (void)p; (void)task; }

#endif

int q4_supported(void) { return isa_selected() != ISA_NONE ? 0 : -1; }

/* Whether 8-bit weights take the AMX-INT8 path: the AVX-512 build is selected, the CPU has AMX-TILE
 * and AMX-INT8 (CPUID.(7,0):EDX[24], [25]), Linux grants the tile data to the process, and
 * INTERNVL_EDGE_AMX is not "0" (the tests run the VNNI tiles that way). Decided once: the packed
 * layout (q4_pack) and the kernel must agree for the life of the process. */
static int q4_amx8(void)
{
    static int decided = -1;
    int v = __atomic_load_n(&decided, __ATOMIC_ACQUIRE);
    if (v >= 0)
        return v;
    v = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    const char *off = getenv("INTERNVL_EDGE_AMX");
    if (isa_selected() == ISA_AVX512VNNI && !(off && strcmp(off, "0") == 0))
        v = isa_amx(25); /* CPUID.(7,0):EDX[25] AMX-INT8 */
#endif
    /* the first answer stored stands: the layout q4_pack chose and the kernel q4_run takes must agree,
     * even if two first callers were answered differently (a refused permission, say) */
    int unset = -1;
    if (!__atomic_compare_exchange_n(&decided, &unset, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        v = unset;
    return v;
}

const char *q4_path8(void) { return takes_8bit(1, Q4_CHUNK, Q4_CHUNK) ? (q4_amx8() ? "amx" : "vnni") : "none"; }

const char *q4_isa(void) { return isa_name(isa_selected()); }

static int takes_8bit(int64_t n, int64_t k, int64_t block)
{
    return (isa_selected() == ISA_AVX512VNNI || isa_selected() == ISA_AVXVNNI) && n > 0 && k > 0 && block > 0 &&
           block % Q4_CHUNK == 0 && block <= Q4_MAX_BLOCK;
}

/* Columns of 8-bit weights as packed: N padded to whole groups of 8 (16: AMX tiles). */
static int64_t q4_width8(int64_t n)
{
    const int64_t g = q4_amx8() ? 16 : 8;
    return (n + g - 1) / g * g;
}

size_t q4_blocks_bytes(int64_t n, int64_t k, int64_t block, int bits, int f16)
{
    if (bits == 8) /* every group of 8, the padding ones too */
        return takes_8bit(n, k, block)
                   ? (size_t)(q4_width8(n) / 8) * (size_t)((k + block - 1) / block) * Q4_ENTRY_BYTES(f16)
                   : 0;
    if (isa_selected() != ISA_NONE && block > 0 && block % 128 == 0 && n >= 8 && k > 0) /* the 8-column tiles' */
        return (size_t)(n / 8) * (size_t)((k + block - 1) / block) * Q4_ENTRY_BYTES(f16);
    return 0;
}

/* x as float16 bits when x is exactly a float16 value (normal, subnormal or zero): 1, else 0. */
static int f16_bits(float x, uint16_t *out)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, field = (u >> 23) & 0xFFu, mantissa = u & 0x7FFFFFu;
    if (field == 0) { /* zero (a float32 subnormal is below float16's range) */
        *out = (uint16_t)sign;
        return mantissa == 0;
    }
    const int e = (int)field - 127;
    if (e > 15 || e < -24) /* beyond float16 (or inf, nan) */
        return 0;
    if (e >= -14) { /* normal: 10 of the 23 mantissa bits */
        *out = (uint16_t)(sign | (uint32_t)(e + 15) << 10 | mantissa >> 13);
        return (mantissa & 0x1FFFu) == 0;
    }
    const uint32_t significand = mantissa | 0x800000u, dropped = (uint32_t)(-(e + 1)); /* subnormal: m * 2^-24 */
    *out = (uint16_t)(sign | significand >> dropped);
    return (significand & ((1u << dropped) - 1)) == 0;
}

int q4_scales_fit_f16(const float *scales, size_t count)
{
    uint16_t h;
    for (size_t i = 0; i < count; i++)
        if (!f16_bits(scales[i], &h))
            return 0;
    return 1;
}

void q4_blocks_fill(const q4_problem *p, void *table, int f16)
{
    const int64_t nblk = (p->k + p->block - 1) / p->block, zstride = (nblk + 1) / 2;
    const int64_t groups = p->bits == 8 ? q4_width8(p->n) / 8 : p->n / 8;
    const int width = f16 ? 2 : 4, zeros = Q4_ENTRY_ZEROS(f16);
    uint8_t *out = (uint8_t *)table;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t b = 0; b < nblk; b++, out += Q4_ENTRY_BYTES(f16))
            for (int j = 0; j < 8; j++) {
                const int64_t n = g * 8 + j;
                if (n >= p->n) { /* a padding column: scale and zero point 0, so it adds nothing */
                    memset(out + width * j, 0, (size_t)width);
                    out[zeros + j] = 0;
                    continue;
                }
                const float scale = p->scales[n * nblk + b];
                uint16_t h = 0;
                if (f16)
                    f16_bits(scale, &h); /* exact: the caller checked q4_scales_fit_f16 */
                memcpy(out + width * j, f16 ? (const void *)&h : (const void *)&scale, (size_t)width);
                if (p->bits == 8)
                    out[zeros + j] = p->zero_points ? p->zero_points[n * nblk + b] : 128;
                else
                    out[zeros + j] = p->zero_points ? (p->zero_points[n * zstride + b / 2] >> ((b & 1) * 4)) & 0x0F : 8;
            }
}

size_t q4_packed_bytes(int64_t n, int64_t k, int64_t block, int bits)
{
    if (bits == 8)
        return takes_8bit(n, k, block) ? (size_t)q4_width8(n) * (size_t)((k + block - 1) / block * block) : 0;
    if (n <= 0 || n % 8 || k <= 0 || block <= 0 || block % 128)
        return 0;
    return (size_t)n * (size_t)((k + block - 1) / block * block) / 2;
}

void q4_pack(const q4_problem *p, uint8_t *out)
{
    const int64_t kp = (p->k + p->block - 1) / p->block * p->block;
    if (p->bits == 8 && q4_amx8()) { /* [n / 16][k / 64][tile row r][column c][byte i]: q4_amx_korder */
#if defined(__x86_64__) && defined(__GNUC__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512vbmi")) { /* every CPU with AMX so far: 0.3 s less at load (2B) */
            pack_amx8_vbmi(p, kp, out);
            return;
        }
#endif
        for (int64_t g = 0; g < q4_width8(p->n) / Q4_AMX_TILE; g++)
            for (int64_t k0 = 0; k0 < kp; k0 += Q4_CHUNK, out += Q4_AMX_TILE * Q4_CHUNK)
                for (int64_t c = 0; c < Q4_AMX_TILE; c++) {
                    const int64_t n = g * Q4_AMX_TILE + c;
                    for (int64_t j = 0; j < Q4_CHUNK; j++) /* tile row j / 4, byte j % 4 of the column */
                        out[(j / 4) * 64 + c * 4 + j % 4] = n < p->n ? p->b[n * kp + k0 + q4_amx_korder(j)] : 0;
                }
        return;
    }
    if (p->bits == 8) {
        for (int64_t g = 0; g < (p->n + 7) / 8; g++)
            for (int64_t k0 = 0; k0 < kp; k0 += Q4_CHUNK)
                for (int64_t j = 0; j < 8; j++, out += Q4_CHUNK) {
                    const int64_t n = g * 8 + j;
                    if (n >= p->n) { /* padding column */
                        memset(out, 0, Q4_CHUNK);
                        continue;
                    }
                    const uint8_t *w = p->b + n * kp + k0;
                    for (int i = 0; i < Q4_CHUNK / 2; i++) { /* even k first, then odd: the activations' order */
                        out[i] = w[2 * i];
                        out[Q4_CHUNK / 2 + i] = w[2 * i + 1];
                    }
                }
        return;
    }
    for (int64_t g = 0; g < p->n / 8; g++)
        for (int64_t k0 = 0; k0 < kp; k0 += 128)
            for (int64_t j = 0; j < 8; j++, out += 64)
                memcpy(out, p->b + (g * 8 + j) * (kp / 2) + k0 / 2, 64);
}

/* Where group g (of 8 columns, stored order) of a fused SwiGLU of `groups` groups lies in
 * q4_pair_swiglu's order. */
static int64_t paired_group(int64_t g, int64_t groups)
{
    const int64_t half = groups / 2, per_task = Q4_SWIGLU_COLS / 8, up = g >= half, h = up ? g - half : g;
    const int64_t first = h / per_task * per_task, in_task = half - first < per_task ? half - first : per_task;
    return 2 * first + (up ? in_task : 0) + (h - first);
}

/* `groups` runs of `bytes` each moved from index g to paired_group(g) through `copy` (as large). */
static void pair_runs(uint8_t *data, uint8_t *copy, int64_t groups, size_t bytes)
{
    memcpy(copy, data, (size_t)groups * bytes);
    for (int64_t g = 0; g < groups; g++)
        memcpy(data + (size_t)paired_group(g, groups) * bytes, copy + (size_t)g * bytes, bytes);
}

int q4_pair_swiglu(const q4_problem *p, uint8_t *packed, void *table, int f16)
{
    const int64_t nblk = (p->k + p->block - 1) / p->block, groups = p->n / 8;
    const size_t weights = q4_packed_bytes(p->n, p->k, p->block, 4);
    const size_t entries = q4_blocks_bytes(p->n, p->k, p->block, 4, f16);
    if (p->n % 16 || (p->bits != 0 && p->bits != 4) || !weights || !entries)
        return -1;
    uint8_t *copy = (uint8_t *)malloc(weights > entries ? weights : entries);
    if (!copy)
        return -1;
    pair_runs(packed, copy, groups, weights / (size_t)groups);
    pair_runs((uint8_t *)table, copy, groups, (size_t)nblk * Q4_ENTRY_BYTES(f16));
    free(copy);
    return 0;
}

int q4_plan(const q4_problem *p, q4_plan_t *plan)
{
    if (p->block <= 0 || p->block % Q4_CHUNK || p->block > Q4_MAX_BLOCK || p->k <= 0 || p->m < 0 || p->n <= 0)
        return -1;
    if (p->bits == 8 && (!p->packed || !p->blocks || p->swiglu || !takes_8bit(p->n, p->k, p->block)))
        return -1;
    if (p->swiglu_paired && (!p->swiglu || !p->packed || !p->blocks || p->bias))
        return -1;
    if (p->bits != 0 && p->bits != 4 && p->bits != 8)
        return -1;
    const int64_t nblk = (p->k + p->block - 1) / p->block;
    plan->scratch_bytes = (size_t)(p->m * nblk * p->block + 2 * p->m * nblk * (int64_t)sizeof(float));
    if (p->swiglu && p->n % 16) /* the up half must start on a group of 8 columns */
        return -1;
    const int64_t width = p->swiglu ? p->n / 2 : p->bits == 8 ? q4_width8(p->n) : p->n;
    const int64_t cols = p->swiglu ? Q4_SWIGLU_COLS : p->bits == 8 && q4_amx8() ? Q4_AMX_COLS : Q4_TILE_COLS;
    plan->tasks = (size_t)(((width + cols - 1) / cols) * ((p->m + Q4_TILE_ROWS - 1) / Q4_TILE_ROWS));
    return 0;
}
