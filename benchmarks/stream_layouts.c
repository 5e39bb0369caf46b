/* How fast the decode loop of internvl_edge/kernels/q4gemm.c can stream 4-bit weights, by layout and
 * page size, against a plain read of the same bytes: a model of the kernel's AVX-512 8-column tile
 * (same loads, nibble masks, VNNI dot products, per-block reduction and prefetch; scales folded in,
 * no zero points), over ~0.9 GB of weights (an InternVL3-2B decode step), K=1536, blocks of 128,
 * 2 threads with half the columns each, several rounds taking turns. Not part of CI.
 *
 *   gcc -O3 -march=x86-64-v3 -o /tmp/stream_layouts benchmarks/stream_layouts.c -lpthread
 *   /tmp/stream_layouts 2
 *
 *   read         an AVX-512 sum over the bytes: what the memory gives one sequential stream per thread
 *   read-huge    the same on 2 MB pages (numpy marks its large arrays for them: the bench's probe)
 *   stored       ONNX Runtime's layout: each column's K/2 bytes in a row, so a tile of 8 columns
 *                reads 8 interleaved streams (prefetch 2 tiles ahead, as q4gemm.c does)
 *   packed       q4_pack's layout (8 columns' 64 bytes after each other), prefetch 4 KB ahead
 *   packed-huge  the same, in memory marked for 2 MB transparent huge pages (madvise), as the op
 *                allocates it
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define K 1536
#define BLOCK 128
#define NBLK (K / BLOCK)
#define HUGE ((size_t)2 << 20)

enum { READ, READ_HUGE, STORED, PACKED, PACKED_HUGE, MODES };
static const char *const NAMES[MODES] = {"read", "read-huge", "stored", "packed", "packed-huge"};
static int64_t columns;
static uint8_t *weights[MODES];
static float *scales, *out;
static int8_t act[K] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void tile8(const uint8_t *base, int64_t n0, int packed) {
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    const uint8_t *wb = base + n0 * (K / 2);
    const int64_t column_stride = packed ? 64 : K / 2, step_stride = packed ? 512 : 64;
    const int64_t ahead = packed ? 4096 : 2 * 8 * (K / 2);
    __m256 acc_f = _mm256_setzero_ps();
    for (int64_t b = 0; b < NBLK; b++) {
        __m512i acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
        const __m512i a_lo = _mm512_load_si512(act + b * 128), a_hi = _mm512_load_si512(act + b * 128 + 64);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const uint8_t *wp = wb + j * column_stride + b * step_stride;
            _mm_prefetch((const char *)(wp + ahead), _MM_HINT_T0);
            const __m512i w = _mm512_loadu_si512(wp);
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(w, m0f), a_lo);
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(_mm512_srli_epi16(w, 4), m0f), a_hi);
        }
        __m256i v[8];
        for (int j = 0; j < 8; j++) v[j] = _mm256_add_epi32(_mm512_castsi512_si256(acc[j]), _mm512_extracti64x4_epi64(acc[j], 1));
        const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        const __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
        acc_f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(scales + (n0 / 8 * NBLK + b) * 8), acc_f);
    }
    _mm256_storeu_ps(out + n0, acc_f);
}

__attribute__((target("avx512f,avx512bw"))) static void read_all(const uint8_t *base, int64_t lo, int64_t hi) {
    const __m512i *p = (const __m512i *)(base + lo * (K / 2)), *end = (const __m512i *)(base + hi * (K / 2));
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (; p + 4 <= end; p += 4) {
        a0 = _mm512_add_epi32(a0, p[0]);
        a1 = _mm512_add_epi32(a1, p[1]);
        a2 = _mm512_add_epi32(a2, p[2]);
        a3 = _mm512_add_epi32(a3, p[3]);
    }
    out[lo] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

typedef struct {
    int64_t lo, hi;
    int mode;
} job_t;

static void *work(void *arg) {
    const job_t *j = (const job_t *)arg;
    if (j->mode == READ || j->mode == READ_HUGE)
        read_all(weights[j->mode], j->lo, j->hi);
    else
        for (int64_t n = j->lo; n < j->hi; n += 8) tile8(weights[j->mode], n, j->mode != STORED);
    return NULL;
}

static double gbs(int mode, int threads) {
    pthread_t t[64];
    job_t jobs[64];
    const double t0 = now();
    for (int i = 0; i < threads; i++) {
        jobs[i] = (job_t){columns / threads * i, columns / threads * (i + 1), mode};
        pthread_create(&t[i], NULL, work, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    return (double)columns * (K / 2) / (now() - t0) / 1e9;
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 8;
    if (threads < 1 || threads > 64) return 2;
    columns = (1200000 / (8 * threads)) * 8 * threads; /* 0.92 GB of 4-bit weights */
    const size_t bytes = (size_t)columns * (K / 2), rounded = (bytes + HUGE - 1) & ~(HUGE - 1);
    for (int m = 0; m < MODES; m++) {
        weights[m] = (uint8_t *)aligned_alloc(HUGE, rounded);
        if (!weights[m]) return 1;
        madvise(weights[m], rounded, m == PACKED_HUGE || m == READ_HUGE ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        memset(weights[m], 0x37, bytes); /* the same bytes in every layout: only the order matters here */
    }
    scales = (float *)aligned_alloc(64, (size_t)columns * NBLK * sizeof(float));
    out = (float *)aligned_alloc(64, (size_t)columns * sizeof(float));
    for (int64_t i = 0; i < columns * NBLK; i++) scales[i] = 0.01f;
    memset(act, 3, sizeof act);
    printf("%d threads, %.2f GB per pass, GB/s per round\n", threads, bytes / 1e9);
    for (int r = 0; r < rounds; r++) {
        printf("round %d:", r + 1);
        for (int m = 0; m < MODES; m++) printf("  %s %.1f", NAMES[m], gbs(m, threads));
        printf("\n");
        fflush(stdout);
    }
    return 0;
}
