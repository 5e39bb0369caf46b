/* ONNX Runtime custom-op library: MatMulNBits in domain ai.internvl_edge (opset 1), a drop-in for
 * com.microsoft's MatMulNBits restricted to float32 A and bits=4 (or 8, with a constant B on a VNNI
 * CPU), computed by q4gemm.h's kernel.
 *
 *   inputs:  A float [..., K], B uint8 [N, ceil(K/block), block * bits / 8], scales float
 *            [N * ceil(K/block)], zero_points uint8 (optional: [N * ceil(K/block/2)] at 4 bits,
 *            [N * ceil(K/block)] at 8), g_idx (optional, must be absent), bias float [N] (optional),
 *            skip float (optional, A's shape) and gamma float [K]: with norm_epsilon only
 *   attrs:   K, N, bits (4; or 8, see q4gemm.h), block_size; accuracy_level is accepted and ignored;
 *            batches (ranges of work for ORT's thread pool, default 8; ort_parallel_ranges);
 *            swiglu (default 0);
 *            pack (default 1: a constant B is copied into q4_pack's layout; 0 keeps it as stored);
 *            norm_epsilon (float, optional: the linear's input is the RMS norm of A + skip, see
 *            rms_norm.h; kernels/rewrite.py folds the norm node that feeds the linear into it)
 *   outputs: Y float [..., N]; with swiglu=1, [..., N/2]: silu(first half) * second half, the
 *            gate/up pair of a SwiGLU MLP computed by one fused linear (kernels/rewrite.py fuses
 *            the Split -> Sigmoid -> Mul -> Mul that follow it into the node);
 *            sum float (optional, A's shape, with norm_epsilon and skip): A + skip, the residual
 *
 * Load with SessionOptions.register_custom_ops_library(path); ORT calls RegisterCustomOps. Only the
 * C ABI is used (ort_abi.h), no ORT headers or libraries are needed to build this.
 *
 * When scales (and zero_points, if given) are constant initializers, the kernel's table of them
 * (q4_blocks_fill) is built once at session creation; otherwise Compute passes them as they come.
 * Likewise a constant B is copied once into q4_pack's layout (one sequential stream for decode). ORT's
 * custom-op ABI has no PrePack, so ORT keeps its own B: where that is a memory-mapped file (ORT maps
 * external initializers), the pages the copy read are handed back (see release_file_pages), and
 * the weights are held once, not twice.
 */
#define _GNU_SOURCE /* madvise */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "isa.h"
#include "ort_glue.h"
#include "q4gemm.h"
#include "rms_norm.h"

#define ORT_EXPORT __attribute__((visibility("default")))
#define OP_NAME "MatMulNBits"

const ort_custom_op *ort_attention_op(void); /* ort_attention.c: NULL where its kernel cannot run */
const ort_custom_op *ort_attention_op_half(void); /* the same op for a float16 KV cache */
const ort_custom_op *ort_bf16_op(void);      /* ort_bf16.c: NULL where the CPU has no bfloat16 path */
const ort_custom_op *ort_bf16_attention_op(void); /* ort_bf16.c: NULL where the AMX path does not run */

enum { IN_A, IN_B, IN_SCALES, IN_ZERO_POINTS, IN_G_IDX, IN_BIAS, IN_SKIP, IN_GAMMA, IN_COUNT };
enum { OUT_Y, OUT_SUM, OUT_COUNT };

typedef struct {
    int64_t k, n, block, bits;
    int64_t batches; /* ranges the tasks are split into for ORT's thread pool (attribute `batches`) */
    int64_t swiglu;  /* attribute `swiglu`: output silu(Y[..., :N/2]) * Y[..., N/2:] */
    int norm;        /* attribute `norm_epsilon` given: the input is rms_norm(A + skip) * gamma */
    float epsilon;
    void *table; /* q4_blocks_fill()'s table from constant scales/zero points, 64-byte aligned; or NULL */
    int table_f16; /* it holds float16 scales */
    uint8_t *packed; /* q4_pack()'s copy of a constant B, 64-byte aligned; or NULL (B is read as it comes) */
    int paired;      /* swiglu with packed and table in q4_pair_swiglu()'s order */
    int constants_checked; /* B, scales and zero_points (if given) are constants whose types and sizes
                              were checked at creation (the packed copy and the table were made from
                              them): Compute does not describe them again */
    int gamma_checked;     /* likewise gamma, with the fused norm */
} kernel_t;

/* What the MatMulNBits kernels of this process packed, and how much of ORT's copies they handed back
 * (q4_pack_stats: the tests check that the weights are not held twice); the bytes of
 * their scale tables with float16 and with float scales (q4_table_stats). */
static size_t g_packed_bytes, g_released_bytes, g_table_f16_bytes, g_table_f32_bytes;
static size_t g_paired; /* fused SwiGLU kernels whose weights q4_pair_swiglu put side by side */

/* A problem with only the weight's shape set: what the table and packing functions read. */
static q4_problem weight_shape(int64_t k, int64_t n, int64_t block, int64_t bits) {
    q4_problem p;
    memset(&p, 0, sizeof p);
    p.n = n;
    p.k = k;
    p.block = block;
    p.bits = (int)bits;
    return p;
}

/* zero_points' length: one nibble per block at 4 bits, one byte at 8 */
static int64_t zero_point_count(int64_t n, int64_t blocks, int64_t bits) {
    return n * (bits == 8 ? blocks : (blocks + 1) / 2);
}

static void run_task(void *problem, size_t task) { q4_run((const q4_problem *)problem, task); }

#define NORM_ROWS_PER_TASK 16 /* a prefill's norm is split over the thread pool in tasks of this many rows */

/* The fused norm's inputs checked, its output `sum` made when the node has one, and the normed rows
 * computed into `normed` (m x k floats). */
static OrtStatus *prenorm(const kernel_t *kn, OrtKernelContext *ctx, const OrtValue *const in[IN_COUNT],
                          const ort_tensor_desc *a, float *normed) {
    ort_tensor_desc d;
    if (!in[IN_GAMMA]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "norm_epsilon needs input gamma");
    if (!kn->gamma_checked) {
        ORT_TRY(ort_describe(OP_NAME, in[IN_GAMMA], "gamma", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "gamma", ORT_TYPE_FLOAT, "float32", kn->k));
    }
    if (in[IN_SKIP]) {
        ORT_TRY(ort_describe(OP_NAME, in[IN_SKIP], "skip", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "skip", ORT_TYPE_FLOAT, "float32", d.count));
        if (d.count != a->count) /* ONNX Runtime's norm would broadcast a [K] or [S, K] skip; ours does not */
            return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "skip must have A's shape (%lld elements, %lld given)",
                             (long long)a->count, (long long)d.count);
    }
    size_t outputs = 0;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutputCount)(ctx, &outputs));
    OrtValue *sum = NULL;
    if (outputs > OUT_SUM) {
        if (!in[IN_SKIP]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "output sum needs input skip");
        ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, OUT_SUM, a->dims, a->rank, &sum));
    }
    OrtStatus *s = NULL;
    norm_job job = {.epsilon = kn->epsilon, .m = a->count / kn->k, .k = kn->k, .normed = normed,
                    .rows_per_task = NORM_ROWS_PER_TASK};
    job.x = (const float *)ort_data_of(in[IN_A], &s);
    if (!s) job.gamma = (const float *)ort_data_of(in[IN_GAMMA], &s);
    if (!s && in[IN_SKIP]) job.skip = (const float *)ort_data_of(in[IN_SKIP], &s);
    if (!s && sum) job.sum = (float *)ort_data_of(sum, &s);
    if (s) return s;
    const size_t tasks = (size_t)((job.m + NORM_ROWS_PER_TASK - 1) / NORM_ROWS_PER_TASK);
    if (tasks <= 1) {
        norm_rows(&job, 0, job.m);
        return NULL;
    }
    return ORT_FN(ort_api, KernelContext_ParallelFor)(ctx, norm_task, tasks, 0, &job);
}

/* B, scales and zero_points (if given) against the node's K, N, bits and block_size. */
static OrtStatus *check_weight_inputs(const kernel_t *kn, const OrtValue *const in[IN_COUNT]) {
    const int64_t n = kn->n, block = kn->block, bits = kn->bits, blocks = (kn->k + block - 1) / block;
    ort_tensor_desc d;
    ORT_TRY(ort_describe(OP_NAME, in[IN_B], "B", &d));
    if (d.type != ORT_TYPE_UINT8)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "B must be uint8 (element type %d given)", (int)d.type);
    if (d.rank != 3 || d.dims[0] != n || d.dims[1] != blocks || d.dims[2] != block * bits / 8)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT,
                         "B must be uint8 [N=%lld, %lld, %lld], got rank %zu with %lld bytes", (long long)n,
                         (long long)blocks, (long long)(block * bits / 8), d.rank, (long long)d.count);
    ORT_TRY(ort_describe(OP_NAME, in[IN_SCALES], "scales", &d));
    ORT_TRY(ort_expect(OP_NAME, &d, "scales", ORT_TYPE_FLOAT, "float32", n * blocks));
    if (in[IN_ZERO_POINTS]) {
        ORT_TRY(ort_describe(OP_NAME, in[IN_ZERO_POINTS], "zero_points", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "zero_points", ORT_TYPE_UINT8, "uint8", zero_point_count(n, blocks, bits)));
    }
    return NULL;
}

static OrtStatus *ORT_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const kernel_t *kn = (const kernel_t *)kernel;
    const int64_t k = kn->k, n = kn->n, block = kn->block, bits = kn->bits;

    /* Absent optional inputs: beyond the input count (trailing ones left out of the node) or NULL
     * (an empty name in the node's input list). */
    size_t count = 0;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInputCount)(ctx, &count));
    const OrtValue *in[IN_COUNT] = {0};
    for (size_t i = 0; i < IN_COUNT && i < count; i++) ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, i, &in[i]));
    static const char *const required[] = {"A", "B", "scales"};
    for (int i = IN_A; i <= IN_SCALES; i++)
        if (!in[i]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "required input %s is missing", required[i]);
    if (in[IN_G_IDX]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "g_idx is not supported (leave the input empty)");
    if (!kn->norm && (in[IN_SKIP] || in[IN_GAMMA]))
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "inputs skip and gamma need attribute norm_epsilon");

    ort_tensor_desc a, d;
    ORT_TRY(ort_describe(OP_NAME, in[IN_A], "A", &a));
    if (a.type != ORT_TYPE_FLOAT)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A must be float32 (element type %d given)", (int)a.type);
    if (a.rank < 1) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A must have at least one dimension");
    if (a.dims[a.rank - 1] != k)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A's last dimension is %lld, expected K=%lld",
                         (long long)a.dims[a.rank - 1], (long long)k);

    /* decode runs every linear once per token, and each description is an allocation and a handful of
     * calls into ORT on memory the weights' stream has pushed out of the caches */
    if (!kn->constants_checked) ORT_TRY(check_weight_inputs(kn, in));
    if (in[IN_BIAS]) {
        ORT_TRY(ort_describe(OP_NAME, in[IN_BIAS], "bias", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "bias", ORT_TYPE_FLOAT, "float32", n));
    }

    int64_t out_dims[ORT_MAX_RANK];
    memcpy(out_dims, a.dims, a.rank * sizeof out_dims[0]);
    out_dims[a.rank - 1] = kn->swiglu ? n / 2 : n;
    const int64_t m = a.count / k;
    OrtValue *y = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, 0, out_dims, a.rank, &y));
    if (m == 0 && !kn->norm) return NULL;

    /* buffers of this call only, freed at `done` */
    float *normed = NULL; /* the fused norm's result: the linear's input */
    float *pair = NULL;   /* swiglu: the gate/up result, never seen outside this call */
    void *scratch = NULL;
    OrtStatus *s = NULL;
    q4_problem p;
    memset(&p, 0, sizeof p);
    if (kn->norm) {
        normed = (float *)malloc((size_t)(a.count > 0 ? a.count : 1) * sizeof(float));
        s = normed ? prenorm(kn, ctx, in, &a, normed)
                   : ort_error(OP_NAME, ORT_FAIL, "out of memory (%lld floats)", (long long)a.count);
        if (s || m == 0) goto done; /* no rows: the sum output, if any, is made (empty) */
    }
    p.a = normed ? normed : (const float *)ort_data_of(in[IN_A], &s);
    if (!s) p.b = kn->packed ? kn->packed : (const uint8_t *)ort_data_of(in[IN_B], &s);
    if (!s) p.scales = (const float *)ort_data_of(in[IN_SCALES], &s);
    if (!s && in[IN_ZERO_POINTS]) p.zero_points = (const uint8_t *)ort_data_of(in[IN_ZERO_POINTS], &s);
    if (!s && in[IN_BIAS]) p.bias = (const float *)ort_data_of(in[IN_BIAS], &s);
    if (!s) p.y = (float *)ort_data_of(y, &s);
    if (s) goto done;
    if (kn->swiglu) {
        pair = (float *)malloc((size_t)(m * n) * sizeof(float));
        if (!pair) {
            s = ort_error(OP_NAME, ORT_FAIL, "out of memory (%lld x %lld floats)", (long long)m, (long long)n);
            goto done;
        }
        p.swiglu = p.y;
        p.y = pair;
    }
    p.m = m;
    p.n = n;
    p.k = k;
    p.block = block;
    p.blocks = kn->table; /* built from these very scales/zero points: they are constant initializers */
    p.blocks_f16 = kn->table_f16;
    p.packed = kn->packed != NULL;
    p.swiglu_paired = kn->paired;
    p.bits = (int)bits;

    q4_plan_t plan;
    if (q4_plan(&p, &plan) != 0) {
        s = ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "the kernel does not support K=%lld, N=%lld with block_size=%lld "
                      "(block_size must be a multiple of 64, at most 1024; with swiglu N a multiple of 16)",
                      (long long)k, (long long)n, (long long)block);
        goto done;
    }
    if (plan.scratch_bytes) {
        scratch = aligned_alloc(64, (plan.scratch_bytes + 63) & ~(size_t)63);
        if (!scratch) {
            s = ort_error(OP_NAME, ORT_FAIL, "out of memory (%zu bytes of scratch)", plan.scratch_bytes);
            goto done;
        }
    }
    p.scratch = scratch;

    q4_quantize(&p);
    if (plan.tasks == 1)
        q4_run(&p, 0);
    else if (plan.tasks > 1)
        /* contiguous ranges of tasks, one callback each (ORT's per-task dispatch, num_batch 0, cost
         * more than the work here: decode at 15 instead of 33+ tok/s on InternVL3-2B shapes), the
         * threads sharing the last tasks of each other's ranges */
        s = ort_parallel_ranges(ctx, run_task, plan.tasks, (size_t)(kn->batches > 0 ? kn->batches : 1), &p);
done:
    free(scratch);
    free(pair);
    free(normed);
    return s;
}

/* The kernel's table of scales and zero points, when they are constants and the kernel takes one
 * for these shapes: *table NULL otherwise (Compute then passes the tensors as they come). A copy:
 * nothing of the constant tensors is kept. */
static OrtStatus *make_table(const OrtKernelInfo *info, int64_t k, int64_t n, int64_t block, int64_t bits,
                             void **table, int *f16) {
    *table = NULL;
    *f16 = 0;
    if (q4_blocks_bytes(n, k, block, (int)bits, 0) == 0) return NULL;
    size_t count = 0;
    if (ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &count))) return NULL;
    const int64_t blocks = (k + block - 1) / block;
    void *scales = NULL, *zero_points = NULL;
    if (ort_constant_input(info, count, IN_SCALES, ORT_TYPE_FLOAT, n * blocks, &scales) != 1 || !scales) return NULL;
    const int64_t zero_points_count = zero_point_count(n, blocks, bits);
    const int zp = ort_constant_input(info, count, IN_ZERO_POINTS, ORT_TYPE_UINT8, zero_points_count, &zero_points);
    if (zp == 0 || (zp == 1 && !zero_points)) return NULL;

    *f16 = q4_scales_fit_f16((const float *)scales, (size_t)(n * blocks));
    const size_t bytes = q4_blocks_bytes(n, k, block, (int)bits, *f16);
    if (bytes > SIZE_MAX - 63) return NULL;
    void *t = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!t) return ort_error(OP_NAME, ORT_FAIL, "out of memory (%zu bytes for the scales table)", bytes);
    q4_problem p = weight_shape(k, n, block, bits);
    p.scales = (const float *)scales;
    p.zero_points = (const uint8_t *)zero_points; /* NULL when absent */
    q4_blocks_fill(&p, t, *f16);
    __atomic_add_fetch(*f16 ? &g_table_f16_bytes : &g_table_f32_bytes, bytes, __ATOMIC_RELAXED);
    *table = t;
    return NULL;
}

/* q4_pack's copy of B when B is a constant and the kernel takes packed weights for these shapes:
 * *packed NULL otherwise (Compute then reads B as it comes). */
static OrtStatus *make_packed(const OrtKernelInfo *info, int64_t k, int64_t n, int64_t block, int64_t bits,
                              uint8_t **packed) {
    *packed = NULL;
    const size_t bytes = q4_packed_bytes(n, k, block, (int)bits);
    if (bytes == 0 || bytes > SIZE_MAX - HUGE_PAGE) return NULL;
    size_t count = 0;
    if (ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &count))) return NULL;
    void *b = NULL;
    const int64_t stored = n * ((k + block - 1) / block) * (block * bits / 8); /* B's elements */
    if (ort_constant_input(info, count, IN_B, ORT_TYPE_UINT8, stored, &b) != 1 || !b) return NULL;
    uint8_t *out = ort_alloc_weights(bytes);
    if (!out) return ort_error(OP_NAME, ORT_FAIL, "out of memory (%zu bytes for the packed weights)", bytes);
    q4_problem p = weight_shape(k, n, block, bits);
    p.b = (const uint8_t *)b;
    q4_pack(&p, out);
    __atomic_add_fetch(&g_packed_bytes, (size_t)stored, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_released_bytes, ort_release_file_pages(b, (size_t)stored), __ATOMIC_RELAXED);
    *packed = out;
    return NULL;
}

static void ORT_CALL destroy_kernel(void *kernel) {
    kernel_t *kn = (kernel_t *)kernel;
    if (kn) {
        free(kn->table);
        free(kn->packed);
    }
    free(kn);
}

static OrtStatus *ORT_CALL create_kernel(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info,
                                         void **out) {
    (void)op;
    (void)api; /* the same table as ort_api, which was asked for the API version that has every slot we use */
    *out = NULL;
    int64_t k, n, bits, block;
    ORT_TRY(ort_get_int(OP_NAME, info, "K", &k));
    ORT_TRY(ort_get_int(OP_NAME, info, "N", &n));
    ORT_TRY(ort_get_int(OP_NAME, info, "bits", &bits));
    ORT_TRY(ort_get_int(OP_NAME, info, "block_size", &block));
    if (bits != 4 && bits != 8)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "bits=%lld is not supported, only 4 and 8", (long long)bits);
    if (k <= 0 || n <= 0 || block <= 0)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "K=%lld, N=%lld and block_size=%lld must be positive",
                         (long long)k, (long long)n, (long long)block);
    void *table = NULL;
    int table_f16 = 0;
    uint8_t *packed = NULL;
    ORT_TRY(make_table(info, k, n, block, bits, &table, &table_f16));
    /* 8-bit weights are computed from the packed layout only (q4gemm.h) */
    OrtStatus *s = ort_get_int_or(info, "pack", 1) || bits == 8 ? make_packed(info, k, n, block, bits, &packed) : NULL;
    if (!s && bits == 8 && (!packed || !table)) {
        free(table);
        free(packed);
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "bits=8 needs B, scales and zero_points (if given) as constant "
                         "initializers and a CPU with VNNI; leave the node to com.microsoft MatMulNBits otherwise");
    }
    kernel_t *kn = s ? NULL : (kernel_t *)malloc(sizeof *kn);
    if (!kn) {
        free(table);
        free(packed);
        return s ? s : ort_error(OP_NAME, ORT_FAIL, "out of memory");
    }
    kn->k = k;
    kn->n = n;
    kn->block = block;
    kn->bits = bits;
    kn->batches = ort_get_int_or(info, "batches", 8);
    if (kn->batches < 1) kn->batches = 1;
    kn->swiglu = ort_get_int_or(info, "swiglu", 0) != 0;
    kn->epsilon = 0.0f;
    kn->norm = ort_get_float(info, "norm_epsilon", &kn->epsilon);
    kn->table = table;
    kn->table_f16 = table_f16;
    kn->packed = packed;
    kn->paired = 0;
    size_t inputs = 0;
    const int counted = !ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &inputs));
    kn->constants_checked = 0;
    if (table && packed && counted) { /* constants, as make_table and make_packed found them */
        const OrtValue *weights[IN_COUNT] = {0};
        int constant = 1;
        for (int i = IN_B; i <= IN_ZERO_POINTS; i++) {
            if (ort_has_input(info, inputs, (size_t)i) != 1) continue; /* an absent zero_points */
            int is_constant = 0;
            if (ort_dropped(ORT_FN(ort_api, KernelInfoGetConstantInput_tensor)(info, (size_t)i, &is_constant,
                                                                              &weights[i])) || !is_constant)
                constant = 0;
        }
        if (constant) {
            s = check_weight_inputs(kn, weights); /* the error Compute would give, at creation */
            if (s) {
                destroy_kernel(kn);
                return s;
            }
            kn->constants_checked = 1;
        }
    }
    void *gamma = NULL;
    kn->gamma_checked = kn->norm && counted && ort_constant_input(info, inputs, IN_GAMMA, ORT_TYPE_FLOAT, k, &gamma) == 1
                        && gamma != NULL;
    const int bias = counted ? ort_has_input(info, inputs, IN_BIAS) : -1; /* -1: unknown, not paired */
    if (kn->swiglu && packed && table && bits == 4 && n % 16 == 0 && bias == 0) {
        q4_problem shape = weight_shape(k, n, block, bits);
        /* else the stored order: slower, the same results */
        kn->paired = q4_pair_swiglu(&shape, packed, table, table_f16) == 0;
        if (kn->paired) __atomic_add_fetch(&g_paired, 1, __ATOMIC_RELAXED);
    }
    *out = kn;
    return NULL;
}

static const char *ORT_CALL op_name(const ort_custom_op *op) { (void)op; return OP_NAME; }
static size_t ORT_CALL input_count(const ort_custom_op *op) { (void)op; return IN_COUNT; }
static size_t ORT_CALL output_count(const ort_custom_op *op) { (void)op; return OUT_COUNT; }

static ort_elem_type ORT_CALL input_type(const ort_custom_op *op, size_t i) {
    (void)op;
    switch (i) {
    case IN_B:
    case IN_ZERO_POINTS: return ORT_TYPE_UINT8;
    case IN_G_IDX: return ORT_TYPE_INT32;
    default: return ORT_TYPE_FLOAT;
    }
}
static ort_io_kind ORT_CALL input_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    return i >= IN_ZERO_POINTS ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED;
}
static ort_io_kind ORT_CALL output_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    return i == OUT_Y ? ORT_IO_REQUIRED : ORT_IO_OPTIONAL;
}

/* Zeroed room after the struct: should an ORT ever read a field past version 16's, it reads NULL. */
static const struct {
    ort_custom_op op;
    void *reserved[16];
} g_op = {
    .op = {
        .version = ORT_CUSTOM_OP_VERSION,
        .create_kernel = NULL, /* create_kernel_v2 is used from version 16 on */
        .get_name = op_name,
        .get_execution_provider_type = ort_cpu_provider,
        .get_input_type = input_type,
        .get_input_type_count = input_count,
        .get_output_type = ort_float_output,
        .get_output_type_count = output_count,
        .kernel_compute = NULL, /* kernel_compute_v2 likewise */
        .kernel_destroy = destroy_kernel,
        .get_input_characteristic = input_kind,
        .get_output_characteristic = output_kind,
        .get_input_memory_type = ort_default_memory,
        .get_variadic_input_min_arity = ort_variadic_one,
        .get_variadic_input_homogeneity = ort_variadic_one,
        .get_variadic_output_min_arity = ort_variadic_one,
        .get_variadic_output_homogeneity = ort_variadic_one,
        .create_kernel_v2 = create_kernel,
        .kernel_compute_v2 = compute,
    },
};

ORT_EXPORT const char *q4_kernel_isa(void) { return q4_isa(); }
/* How the kernels prefetch what they read once per token: "nta" or "t2" (isa.h, isa_prefetch_nta) */
ORT_EXPORT const char *q4_prefetch_hint(void) { return isa_prefetch_nta() ? "nta" : "t2"; }

/* Bytes of weights packed by this process's MatMulNBits kernels so far, and of those, how many of
 * ORT's copies were handed back to the page cache. */
ORT_EXPORT void q4_pack_stats(uint64_t *packed, uint64_t *released) {
    *packed = __atomic_load_n(&g_packed_bytes, __ATOMIC_RELAXED);
    *released = __atomic_load_n(&g_released_bytes, __ATOMIC_RELAXED);
}

/* Bytes of the scale tables made by this process's MatMulNBits kernels so far: with float16 scales
 * and with float ones. */
ORT_EXPORT void q4_table_stats(uint64_t *f16, uint64_t *f32) {
    *f16 = __atomic_load_n(&g_table_f16_bytes, __ATOMIC_RELAXED);
    *f32 = __atomic_load_n(&g_table_f32_bytes, __ATOMIC_RELAXED);
}

/* How many fused SwiGLU kernels of this process hold their gate and up weights side by side. */
ORT_EXPORT void q4_paired_count(uint64_t *paired) { *paired = __atomic_load_n(&g_paired, __ATOMIC_RELAXED); }

/* The domain is handed to the session options and must outlive every session made from them, so it
 * is never released (one small object per registration). */
ORT_EXPORT OrtStatus *ORT_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->get_api(ORT_API_VERSION_NEEDED);
    if (!api) {
        const OrtApi *v1 = base->get_api(1); /* CreateStatus is slot 0 in every version */
        return v1 ? ORT_FN(v1, CreateStatus)(ORT_FAIL, ORT_DOMAIN " kernels need ONNX Runtime 1.17 or newer") : NULL;
    }
    ort_api = api;
    if (q4_supported() != 0)
        return ort_error(OP_NAME, ORT_FAIL, "this CPU cannot run the kernel (it needs x86-64 with AVX2, FMA and F16C); "
                         "use com.microsoft MatMulNBits instead");
    OrtCustomOpDomain *domain = NULL;
    ORT_TRY(ORT_FN(api, CreateCustomOpDomain)(ORT_DOMAIN, &domain));
    OrtStatus *s = ORT_FN(api, CustomOpDomain_Add)(domain, &g_op.op);
    const ort_custom_op *attention = ort_attention_op();
    if (!s && attention) s = ORT_FN(api, CustomOpDomain_Add)(domain, attention);
    const ort_custom_op *attention_half = ort_attention_op_half();
    if (!s && attention_half) s = ORT_FN(api, CustomOpDomain_Add)(domain, attention_half);
    const ort_custom_op *bf16 = ort_bf16_op();
    if (!s && bf16) s = ORT_FN(api, CustomOpDomain_Add)(domain, bf16);
    const ort_custom_op *bf16_attention = ort_bf16_attention_op();
    if (!s && bf16_attention) s = ORT_FN(api, CustomOpDomain_Add)(domain, bf16_attention);
    if (!s) s = ORT_FN(api, AddCustomOpDomain)(options, domain);
    if (s) ORT_FN(api, ReleaseCustomOpDomain)(domain);
    return s;
}
