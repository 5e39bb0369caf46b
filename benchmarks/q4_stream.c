/* How fast the 4-bit decode kernel itself (internvl_edge/kernels/q4gemm.c, one row, q4_pack's layout
 * with its float16 scale table, as the op runs it) streams its weights, against a plain AVX-512 read
 * of the same weights with the same T2 prefetch 8 KB ahead, in one process, outside ONNX Runtime: the
 * two take turns round after round on `copies` distinct weights of N x K (more than the caches), on
 * `threads` threads that split the kernel's tasks (or the bytes) in equal shares. Prints each side's
 * mean GB/s and the median of the per-round ratios: what the kernel leaves of what one core's stream
 * can read, where the bench's roofline compares decode with ONNX Runtime's ReduceSum. The kernel's
 * GB/s count its scale table too (4.7% more bytes than 4-bit weights, 2.3% than 8-bit ones). AVX-512 CPUs
 * with VNNI only. Not part of CI.
 *
 *   gcc -O3 -std=c11 -fno-math-errno -ffp-contract=fast -Wno-psabi -Iinternvl_edge/kernels \
 *       -o /tmp/q4_stream benchmarks/q4_stream.c internvl_edge/kernels/q4gemm.c \
 *       internvl_edge/kernels/isa.c -lm -lpthread
 *   /tmp/q4_stream 17920 1536 40 2 11     # N K copies threads rounds: InternVL3-2B's gate/up
 *   /tmp/q4_stream 151680 1536 3 2 7 8    # ... bits: its 8-bit lm_head (AMX tiles where the CPU has
 *                                         # them; INTERNVL_EDGE_AMX=0: the VNNI tiles)
 */
#define _GNU_SOURCE
#include "q4gemm.h"

#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define HUGE ((size_t)2 << 20)
#define MAX_THREADS 64

static int64_t n_cols, k_depth;
static int copies, threads;
static uint8_t **weights;
static void **tables;
static size_t weight_bytes, table_bytes, tasks;
static q4_problem base;
static int64_t sink;

static void *need(void *p) { /* an allocation that must succeed */
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f,avx512bw"))) static int64_t read_bytes(const uint8_t *p, size_t n) {
    __m512i acc = _mm512_setzero_si512();
    for (size_t i = 0; i < n; i += 64) {
        _mm_prefetch((const char *)p + i + 8192, _MM_HINT_T2);
        acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_load_si512(p + i), _mm512_setzero_si512()));
    }
    return _mm512_reduce_add_epi64(acc);
}

typedef struct {
    int id, kernel;
} job_t;

static void *work(void *arg) {
    const job_t *j = (const job_t *)arg;
    q4_problem p = base;
    int64_t s = 0;
    for (int c = 0; c < copies; c++) {
        if (j->kernel) {
            p.b = weights[c];
            p.blocks = tables[c];
            for (size_t t = tasks * j->id / threads; t < tasks * (j->id + 1) / threads; t++) q4_run(&p, t);
        } else {
            const size_t lo = weight_bytes * j->id / threads / 64 * 64, hi = weight_bytes * (j->id + 1) / threads / 64 * 64;
            s += read_bytes(weights[c] + lo, hi - lo);
        }
    }
    __atomic_add_fetch(&sink, s, __ATOMIC_RELAXED);
    return NULL;
}

/* seconds per copy */
static double pass(int kernel) {
    pthread_t t[MAX_THREADS];
    job_t jobs[MAX_THREADS];
    const double t0 = now();
    for (int i = 0; i < threads; i++) {
        jobs[i] = (job_t){i, kernel};
        if (pthread_create(&t[i], NULL, work, &jobs[i]) != 0) exit(1);
    }
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    return (now() - t0) / copies;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s N K copies threads rounds [bits: 4 or 8]\n", argv[0]);
        return 2;
    }
    n_cols = atol(argv[1]), k_depth = atol(argv[2]), copies = atoi(argv[3]), threads = atoi(argv[4]);
    const int rounds = atoi(argv[5]), bits = argc > 6 ? atoi(argv[6]) : 4;
    if (n_cols % 8 || k_depth % 128 || copies < 1 || threads < 1 || threads > MAX_THREADS || rounds < 1 ||
        (bits != 4 && bits != 8))
        return 2;
    if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vnni")) {
        fprintf(stderr, "this harness needs AVX512-BW and AVX512-VNNI (the kernel's AVX-512 decode tile)\n");
        return 1;
    }
    const int64_t block = 128, nblk = k_depth / block;
    const int64_t stored_bytes = n_cols * k_depth * bits / 8;
    const int64_t zero_bytes = bits == 8 ? n_cols * nblk : n_cols * ((nblk + 1) / 2);
    float *a = need(aligned_alloc(64, (size_t)k_depth * 4)), *scales = need(malloc((size_t)(n_cols * nblk) * 4));
    uint8_t *zeros = need(malloc((size_t)zero_bytes)), *stored = need(malloc((size_t)stored_bytes));
    for (int64_t i = 0; i < k_depth; i++) a[i] = (float)(rand() % 2001 - 1000) / 1000.0f;
    for (int64_t i = 0; i < n_cols * nblk; i++) scales[i] = 0.0078125f * (float)(1 + i % 7); /* float16 values */
    for (int64_t i = 0; i < zero_bytes; i++) zeros[i] = (uint8_t)rand();
    q4_problem p = {.a = a, .scales = scales, .zero_points = zeros, .m = 1, .n = n_cols, .k = k_depth,
                    .block = block, .bits = bits};
    p.y = need(aligned_alloc(64, (size_t)n_cols * 4));
    q4_plan_t plan;
    p.packed = 1, p.blocks = scales, p.blocks_f16 = 1; /* what the plan of 8 bits checks; set again below */
    if (q4_supported() != 0 || q4_plan(&p, &plan) != 0) {
        fprintf(stderr, "the kernel does not take these shapes here\n");
        return 1;
    }
    p.packed = 0, p.blocks = NULL;
    p.scratch = need(aligned_alloc(64, (plan.scratch_bytes + 63) / 64 * 64));
    tasks = plan.tasks;
    weight_bytes = q4_packed_bytes(n_cols, k_depth, block, bits);
    table_bytes = q4_blocks_bytes(n_cols, k_depth, block, bits, 1);
    weights = need(malloc(sizeof *weights * (size_t)copies));
    tables = need(malloc(sizeof *tables * (size_t)copies));
    for (int c = 0; c < copies; c++) { /* distinct weights: one copy would stay in cache */
        for (int64_t i = 0; i < stored_bytes; i++) stored[i] = (uint8_t)rand();
        const size_t rounded = (weight_bytes + HUGE - 1) & ~(HUGE - 1); /* as ort_alloc_weights */
        weights[c] = need(aligned_alloc(HUGE, rounded));
        madvise(weights[c], rounded, MADV_HUGEPAGE);
        p.b = stored;
        q4_pack(&p, weights[c]);
        tables[c] = need(aligned_alloc(64, (table_bytes + 63) / 64 * 64));
        q4_blocks_fill(&p, tables[c], 1);
    }
    p.packed = 1;
    p.blocks_f16 = 1;
    q4_quantize(&p);
    base = p;
    double *ratio = need(malloc(sizeof *ratio * (size_t)rounds)), kernel_gbs = 0, read_gbs = 0;
    for (int r = 0; r < rounds; r++) {
        const double tk = pass(1), tr = pass(0);
        kernel_gbs += (double)(weight_bytes + table_bytes) / tk / 1e9 / rounds;
        read_gbs += (double)weight_bytes / tr / 1e9 / rounds;
        ratio[r] = ((double)(weight_bytes + table_bytes) / tk) / ((double)weight_bytes / tr);
    }
    qsort(ratio, (size_t)rounds, sizeof *ratio, by_value);
    const double median = rounds % 2 ? ratio[rounds / 2] : (ratio[rounds / 2 - 1] + ratio[rounds / 2]) / 2;
    printf("N=%ld K=%ld, %d bits (%s tiles), %d copies, %d threads (%s): kernel %.1f GB/s, read %.1f GB/s; "
           "kernel/read median %.3f [%.3f .. %.3f]\n",
           (long)n_cols, (long)k_depth, bits, bits == 8 ? q4_path8() : "vnni", copies, threads, q4_isa(), kernel_gbs,
           read_gbs, median, ratio[0], ratio[rounds - 1]);
    return 0;
}
