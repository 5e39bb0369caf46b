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
#include "ort_parts.h"
#include "q4gemm.h"
#include "rms_norm.h"

#define ORT_EXPORT __attribute__((visibility("default")))
#define OP_NAME "MatMulNBits"

const ort_custom_op *ort_attention_op(void); /* ort_attention.c: NULL where its kernel cannot run */
const ort_custom_op *ort_attention_op_half(void); /* the same op for a float16 KV cache */
const ort_custom_op *ort_layer_op(void);     /* ort_layer.c: NULL where the attention kernel cannot run */
const ort_custom_op *ort_layer_op_half(void); /* the same op for a float16 KV cache */
const ort_custom_op *ort_bf16_op(void);      /* ort_bf16.c: NULL where the CPU has no bfloat16 path */
const ort_custom_op *ort_bf16_attention_op(void); /* ort_bf16.c: NULL where the AMX path does not run */

enum { OUT_Y, OUT_SUM, OUT_COUNT };

/* MatMulNBits' own node: each input at its place in the op's list */
static const size_t g_own_inputs[LIN_IN_COUNT] = {LIN_A,    LIN_B,    LIN_SCALES, LIN_ZERO_POINTS,
                                                  LIN_G_IDX, LIN_BIAS, LIN_SKIP,   LIN_GAMMA};

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

#define ROOM_TRIM_ROWS 16        /* linear_apply: see the end */
#define ROOM_KEEP ((size_t)1 << 20)
#define NORM_ROWS_PER_TASK 16 /* a prefill's norm is split over the thread pool in tasks of this many rows */

/* The fused norm's inputs checked and its output `sum` made when the node has one (io->sum). */
static OrtStatus *prenorm_bind(const linear_t *kn, OrtKernelContext *ctx, const OrtValue *const in[LIN_IN_COUNT],
                               const ort_tensor_desc *a, linear_io *io) {
    ort_tensor_desc d;
    OrtStatus *s = NULL;
    if (!in[LIN_GAMMA]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "norm_epsilon needs input gamma");
    if (!kn->gamma_checked) {
        ORT_TRY(ort_describe(OP_NAME, in[LIN_GAMMA], "gamma", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "gamma", ORT_TYPE_FLOAT, "float32", kn->k));
    }
    if (in[LIN_SKIP]) {
        ORT_TRY(ort_describe(OP_NAME, in[LIN_SKIP], "skip", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "skip", ORT_TYPE_FLOAT, "float32", d.count));
        if (d.count != a->count) /* ONNX Runtime's norm would broadcast a [K] or [S, K] skip; ours does not */
            return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "skip must have A's shape (%lld elements, %lld given)",
                             (long long)a->count, (long long)d.count);
    }
    size_t outputs = 0;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutputCount)(ctx, &outputs));
    OrtValue *sum = NULL;
    if (outputs > OUT_SUM) {
        if (!in[LIN_SKIP]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "output sum needs input skip");
        ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, OUT_SUM, a->dims, a->rank, &sum));
    }
    io->gamma = (const float *)ort_data_of(in[LIN_GAMMA], &s);
    if (!s && in[LIN_SKIP]) io->skip = (const float *)ort_data_of(in[LIN_SKIP], &s);
    if (!s && sum) io->sum = (float *)ort_data_of(sum, &s);
    return s;
}

/* B, scales and zero_points (if given) against the node's K, N, bits and block_size. */
static OrtStatus *check_weight_inputs(const char *op, const linear_t *kn, const OrtValue *const in[LIN_IN_COUNT]) {
    const int64_t n = kn->n, block = kn->block, bits = kn->bits, blocks = (kn->k + block - 1) / block;
    ort_tensor_desc d;
    ORT_TRY(ort_describe(op, in[LIN_B], "B", &d));
    if (d.type != ORT_TYPE_UINT8)
        return ort_error(op, ORT_INVALID_ARGUMENT, "B must be uint8 (element type %d given)", (int)d.type);
    if (d.rank != 3 || d.dims[0] != n || d.dims[1] != blocks || d.dims[2] != block * bits / 8)
        return ort_error(op, ORT_INVALID_ARGUMENT,
                         "B must be uint8 [N=%lld, %lld, %lld], got rank %zu with %lld bytes", (long long)n,
                         (long long)blocks, (long long)(block * bits / 8), d.rank, (long long)d.count);
    ORT_TRY(ort_describe(op, in[LIN_SCALES], "scales", &d));
    ORT_TRY(ort_expect(op, &d, "scales", ORT_TYPE_FLOAT, "float32", n * blocks));
    if (in[LIN_ZERO_POINTS]) {
        ORT_TRY(ort_describe(op, in[LIN_ZERO_POINTS], "zero_points", &d));
        ORT_TRY(ort_expect(op, &d, "zero_points", ORT_TYPE_UINT8, "uint8", zero_point_count(n, blocks, bits)));
    }
    return NULL;
}

OrtStatus *linear_apply(const char *op, const linear_t *kn, OrtKernelContext *ctx, const linear_io *io) {
    const int64_t k = kn->k, n = kn->n, m = io->m;
    if (m == 0) return NULL;
    /* buffers of this call only, given back to the pool at `done` */
    float *normed = NULL; /* the fused norm's result: the linear's input */
    float *pair = NULL;   /* swiglu: the gate/up result, never seen outside this call */
    void *scratch = NULL;
    OrtStatus *s = NULL;
    if (kn->norm) {
        normed = (float *)ort_room_take((size_t)(m * k) * sizeof(float));
        if (!normed) return ort_error(op, ORT_FAIL, "out of memory (%lld floats)", (long long)(m * k));
        norm_job job = {.x = io->a, .skip = io->skip, .gamma = io->gamma, .epsilon = kn->epsilon, .m = m, .k = k,
                        .sum = io->sum, .normed = normed, .rows_per_task = NORM_ROWS_PER_TASK};
        const size_t tasks = (size_t)((m + NORM_ROWS_PER_TASK - 1) / NORM_ROWS_PER_TASK);
        if (tasks <= 1)
            norm_rows(&job, 0, m);
        else
            s = ORT_FN(ort_api, KernelContext_ParallelFor)(ctx, norm_task, tasks, 0, &job);
        if (s) goto done;
    }
    q4_problem p;
    memset(&p, 0, sizeof p);
    p.a = normed ? normed : io->a;
    p.b = kn->packed ? kn->packed : io->b;
    p.scales = io->scales;
    p.zero_points = io->zero_points;
    p.bias = io->bias;
    p.y = io->y;
    if (kn->swiglu) {
        pair = (float *)ort_room_take((size_t)(m * n) * sizeof(float));
        if (!pair) {
            s = ort_error(op, ORT_FAIL, "out of memory (%lld x %lld floats)", (long long)m, (long long)n);
            goto done;
        }
        p.swiglu = p.y;
        p.y = pair;
    }
    p.m = m;
    p.n = n;
    p.k = k;
    p.block = kn->block;
    p.blocks = kn->table; /* built from these very scales/zero points: they are constant initializers */
    p.blocks_f16 = kn->table_f16;
    p.packed = kn->packed != NULL;
    p.swiglu_paired = kn->paired;
    p.bits = (int)kn->bits;

    q4_plan_t plan;
    if (q4_plan(&p, &plan) != 0) {
        s = ort_error(op, ORT_INVALID_ARGUMENT, "the kernel does not support K=%lld, N=%lld with block_size=%lld "
                      "(block_size must be a multiple of 64, at most 1024; with swiglu N a multiple of 16)",
                      (long long)k, (long long)n, (long long)kn->block);
        goto done;
    }
    if (plan.scratch_bytes) {
        scratch = ort_room_take(plan.scratch_bytes);
        if (!scratch) {
            s = ort_error(op, ORT_FAIL, "out of memory (%zu bytes of scratch)", plan.scratch_bytes);
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
    ort_room_give(scratch);
    ort_room_give(pair);
    ort_room_give(normed);
    /* a decode step's rows (and the lm_head's at the end of a prefill: the last row only): the room a
     * prefill's layers shared goes back to the system, not held while decoding */
    if (m <= ROOM_TRIM_ROWS) ort_room_trim(ROOM_KEEP);
    return s;
}

static OrtStatus *ORT_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const linear_t *kn = (const linear_t *)kernel;
    const int64_t k = kn->k, n = kn->n;

    /* Absent optional inputs: beyond the input count (trailing ones left out of the node) or NULL
     * (an empty name in the node's input list). */
    size_t count = 0;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInputCount)(ctx, &count));
    const OrtValue *in[LIN_IN_COUNT] = {0};
    for (size_t i = 0; i < LIN_IN_COUNT && i < count; i++)
        ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, i, &in[i]));
    static const char *const required[] = {"A", "B", "scales"};
    for (int i = LIN_A; i <= LIN_SCALES; i++)
        if (!in[i]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "required input %s is missing", required[i]);
    if (in[LIN_G_IDX])
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "g_idx is not supported (leave the input empty)");
    if (!kn->norm && (in[LIN_SKIP] || in[LIN_GAMMA]))
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "inputs skip and gamma need attribute norm_epsilon");

    ort_tensor_desc a, d;
    ORT_TRY(ort_describe(OP_NAME, in[LIN_A], "A", &a));
    if (a.type != ORT_TYPE_FLOAT)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A must be float32 (element type %d given)", (int)a.type);
    if (a.rank < 1) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A must have at least one dimension");
    if (a.dims[a.rank - 1] != k)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A's last dimension is %lld, expected K=%lld",
                         (long long)a.dims[a.rank - 1], (long long)k);

    /* decode runs every linear once per token, and each description is an allocation and a handful of
     * calls into ORT on memory the weights' stream has pushed out of the caches */
    if (!kn->constants_checked) ORT_TRY(check_weight_inputs(OP_NAME, kn, in));
    if (in[LIN_BIAS]) {
        ORT_TRY(ort_describe(OP_NAME, in[LIN_BIAS], "bias", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "bias", ORT_TYPE_FLOAT, "float32", n));
    }

    int64_t out_dims[ORT_MAX_RANK];
    memcpy(out_dims, a.dims, a.rank * sizeof out_dims[0]);
    out_dims[a.rank - 1] = kn->swiglu ? n / 2 : n;
    OrtValue *y = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, 0, out_dims, a.rank, &y));
    linear_io io;
    memset(&io, 0, sizeof io);
    io.m = a.count / k;
    if (kn->norm) ORT_TRY(prenorm_bind(kn, ctx, in, &a, &io)); /* with no rows, the sum output is made (empty) */
    if (io.m == 0) return NULL;
    OrtStatus *s = NULL;
    io.a = (const float *)ort_data_of(in[LIN_A], &s);
    if (!s && !kn->packed) io.b = (const uint8_t *)ort_data_of(in[LIN_B], &s);
    if (!s) io.scales = (const float *)ort_data_of(in[LIN_SCALES], &s);
    if (!s && in[LIN_ZERO_POINTS]) io.zero_points = (const uint8_t *)ort_data_of(in[LIN_ZERO_POINTS], &s);
    if (!s && in[LIN_BIAS]) io.bias = (const float *)ort_data_of(in[LIN_BIAS], &s);
    if (!s) io.y = (float *)ort_data_of(y, &s);
    return s ? s : linear_apply(OP_NAME, kn, ctx, &io);
}

/* The kernel's table of scales and zero points, when they are constants and the kernel takes one
 * for these shapes: *table NULL otherwise (Compute then passes the tensors as they come). A copy:
 * nothing of the constant tensors is kept. */
static OrtStatus *make_table(const char *op, const OrtKernelInfo *info, const size_t in[LIN_IN_COUNT], int64_t k,
                             int64_t n, int64_t block, int64_t bits, void **table, int *f16) {
    *table = NULL;
    *f16 = 0;
    if (q4_blocks_bytes(n, k, block, (int)bits, 0) == 0) return NULL;
    size_t count = 0;
    if (ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &count))) return NULL;
    const int64_t blocks = (k + block - 1) / block;
    void *scales = NULL, *zero_points = NULL;
    if (ort_constant_input(info, count, in[LIN_SCALES], ORT_TYPE_FLOAT, n * blocks, &scales) != 1 || !scales)
        return NULL;
    const int64_t zero_points_count = zero_point_count(n, blocks, bits);
    const int zp =
        ort_constant_input(info, count, in[LIN_ZERO_POINTS], ORT_TYPE_UINT8, zero_points_count, &zero_points);
    if (zp == 0 || (zp == 1 && !zero_points)) return NULL;

    *f16 = q4_scales_fit_f16((const float *)scales, (size_t)(n * blocks));
    const size_t bytes = q4_blocks_bytes(n, k, block, (int)bits, *f16);
    if (bytes > SIZE_MAX - 63) return NULL;
    void *t = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!t) return ort_error(op, ORT_FAIL, "out of memory (%zu bytes for the scales table)", bytes);
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
static OrtStatus *make_packed(const char *op, const OrtKernelInfo *info, const size_t in[LIN_IN_COUNT], int64_t k,
                              int64_t n, int64_t block, int64_t bits, uint8_t **packed) {
    *packed = NULL;
    const size_t bytes = q4_packed_bytes(n, k, block, (int)bits);
    if (bytes == 0 || bytes > SIZE_MAX - HUGE_PAGE) return NULL;
    size_t count = 0;
    if (ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &count))) return NULL;
    void *b = NULL;
    const int64_t stored = n * ((k + block - 1) / block) * (block * bits / 8); /* B's elements */
    if (ort_constant_input(info, count, in[LIN_B], ORT_TYPE_UINT8, stored, &b) != 1 || !b) return NULL;
    uint8_t *out = ort_alloc_weights(bytes);
    if (!out) return ort_error(op, ORT_FAIL, "out of memory (%zu bytes for the packed weights)", bytes);
    q4_problem p = weight_shape(k, n, block, bits);
    p.b = (const uint8_t *)b;
    q4_pack(&p, out);
    __atomic_add_fetch(&g_packed_bytes, (size_t)stored, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_released_bytes, ort_release_file_pages(b, (size_t)stored), __ATOMIC_RELAXED);
    *packed = out;
    return NULL;
}

void linear_destroy(linear_t *kn) {
    if (kn) {
        free(kn->table);
        free(kn->packed);
    }
    free(kn);
}

static void ORT_CALL destroy_kernel(void *kernel) { linear_destroy((linear_t *)kernel); }

/* prefix + name, for the attributes of a linear among others in one node */
static const char *attr_name(char *buf, size_t size, const char *prefix, const char *name) {
    snprintf(buf, size, "%s%s", prefix, name);
    return buf;
}

OrtStatus *linear_create(const char *op, const OrtKernelInfo *info, const char *prefix, const size_t in[LIN_IN_COUNT],
                         linear_t **out) {
    *out = NULL;
    char name[64];
#define ATTR(x) attr_name(name, sizeof name, prefix, x)
    int64_t k, n, bits, block;
    ORT_TRY(ort_get_int(op, info, ATTR("K"), &k));
    ORT_TRY(ort_get_int(op, info, ATTR("N"), &n));
    ORT_TRY(ort_get_int(op, info, ATTR("bits"), &bits));
    ORT_TRY(ort_get_int(op, info, ATTR("block_size"), &block));
    if (bits != 4 && bits != 8)
        return ort_error(op, ORT_INVALID_ARGUMENT, "bits=%lld is not supported, only 4 and 8", (long long)bits);
    if (k <= 0 || n <= 0 || block <= 0)
        return ort_error(op, ORT_INVALID_ARGUMENT, "K=%lld, N=%lld and block_size=%lld must be positive",
                         (long long)k, (long long)n, (long long)block);
    void *table = NULL;
    int table_f16 = 0;
    uint8_t *packed = NULL;
    ORT_TRY(make_table(op, info, in, k, n, block, bits, &table, &table_f16));
    /* 8-bit weights are computed from the packed layout only (q4gemm.h) */
    OrtStatus *s = ort_get_int_or(info, "pack", 1) || bits == 8
                       ? make_packed(op, info, in, k, n, block, bits, &packed)
                       : NULL;
    if (!s && bits == 8 && (!packed || !table)) {
        free(table);
        free(packed);
        return ort_error(op, ORT_INVALID_ARGUMENT, "bits=8 needs B, scales and zero_points (if given) as constant "
                         "initializers and a CPU with VNNI; leave the node to com.microsoft MatMulNBits otherwise");
    }
    linear_t *kn = s ? NULL : (linear_t *)calloc(1, sizeof *kn);
    if (!kn) {
        free(table);
        free(packed);
        return s ? s : ort_error(op, ORT_FAIL, "out of memory");
    }
    kn->k = k;
    kn->n = n;
    kn->block = block;
    kn->bits = bits;
    kn->batches = ort_get_int_or(info, "batches", 8);
    if (kn->batches < 1) kn->batches = 1;
    kn->swiglu = ort_get_int_or(info, ATTR("swiglu"), 0) != 0;
    kn->epsilon = 0.0f;
    kn->norm = ort_get_float(info, ATTR("norm_epsilon"), &kn->epsilon);
#undef ATTR
    kn->table = table;
    kn->table_f16 = table_f16;
    kn->packed = packed;
    size_t inputs = 0;
    const int counted = !ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &inputs));
    const int64_t blocks = (k + block - 1) / block;
    if (counted) {
        const int64_t sizes[LIN_IN_COUNT] = {
            [LIN_B] = n * blocks * (block * bits / 8), [LIN_SCALES] = n * blocks,
            [LIN_ZERO_POINTS] = zero_point_count(n, blocks, bits), [LIN_BIAS] = n, [LIN_GAMMA] = k};
        static const ort_elem_type types[LIN_IN_COUNT] = {[LIN_B] = ORT_TYPE_UINT8, [LIN_SCALES] = ORT_TYPE_FLOAT,
                                                          [LIN_ZERO_POINTS] = ORT_TYPE_UINT8,
                                                          [LIN_BIAS] = ORT_TYPE_FLOAT, [LIN_GAMMA] = ORT_TYPE_FLOAT};
        for (int i = LIN_B; i < LIN_IN_COUNT; i++) {
            if (!sizes[i]) continue;
            void *data = NULL;
            if (ort_constant_input(info, inputs, in[i], types[i], sizes[i], &data) == 1)
                kn->constant[i] = data;
        }
    }
    kn->constants_checked = 0;
    if (table && packed && counted) { /* constants, as make_table and make_packed found them */
        const OrtValue *weights[LIN_IN_COUNT] = {0};
        int constant = 1;
        for (int i = LIN_B; i <= LIN_ZERO_POINTS; i++) {
            if (ort_has_input(info, inputs, in[i]) != 1) continue; /* an absent zero_points */
            int is_constant = 0;
            if (ort_dropped(ORT_FN(ort_api, KernelInfoGetConstantInput_tensor)(info, in[i], &is_constant,
                                                                              &weights[i])) || !is_constant)
                constant = 0;
        }
        if (constant) {
            s = check_weight_inputs(op, kn, weights); /* the error Compute would give, at creation */
            if (s) {
                linear_destroy(kn);
                return s;
            }
            kn->constants_checked = 1;
        }
    }
    kn->gamma_checked = kn->norm && kn->constant[LIN_GAMMA] != NULL;
    const int bias = counted ? ort_has_input(info, inputs, in[LIN_BIAS]) : -1; /* -1: unknown, not paired */
    if (kn->swiglu && packed && table && bits == 4 && n % 16 == 0 && bias == 0) {
        q4_problem shape = weight_shape(k, n, block, bits);
        /* else the stored order: slower, the same results */
        kn->paired = q4_pair_swiglu(&shape, packed, table, table_f16) == 0;
        if (kn->paired) __atomic_add_fetch(&g_paired, 1, __ATOMIC_RELAXED);
    }
    *out = kn;
    return NULL;
}

static OrtStatus *ORT_CALL create_kernel(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info,
                                         void **out) {
    (void)op;
    (void)api; /* the same table as ort_api, which was asked for the API version that has every slot we use */
    return linear_create(OP_NAME, info, "", g_own_inputs, (linear_t **)out);
}
static const char *ORT_CALL op_name(const ort_custom_op *op) { (void)op; return OP_NAME; }
static size_t ORT_CALL input_count(const ort_custom_op *op) { (void)op; return LIN_IN_COUNT; }
static size_t ORT_CALL output_count(const ort_custom_op *op) { (void)op; return OUT_COUNT; }

static ort_elem_type ORT_CALL input_type(const ort_custom_op *op, size_t i) {
    (void)op;
    switch (i) {
    case LIN_B:
    case LIN_ZERO_POINTS: return ORT_TYPE_UINT8;
    case LIN_G_IDX: return ORT_TYPE_INT32;
    default: return ORT_TYPE_FLOAT;
    }
}
static ort_io_kind ORT_CALL input_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    return i >= LIN_ZERO_POINTS ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED;
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

/* Where 8-bit weights (the lm_head) run: "amx", "vnni" or "none" (q4gemm.h: q4_path8). */
ORT_EXPORT const char *q4_kernel_path8(void) { return q4_path8(); }

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

/* Bytes the pool of the kernels' intermediate values holds now (ort_room_take), free or taken. */
ORT_EXPORT void q4_room_held(uint64_t *held) { *held = ort_room_held(); }

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
    /* sessions may register the library from several threads at once (the backend makes its nets'
     * sessions side by side): the same pointer each time, stored atomically */
    __atomic_store_n(&ort_api, api, __ATOMIC_RELEASE);
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
    const ort_custom_op *layer = ort_layer_op();
    if (!s && layer) s = ORT_FN(api, CustomOpDomain_Add)(domain, layer);
    const ort_custom_op *layer_half = ort_layer_op_half();
    if (!s && layer_half) s = ORT_FN(api, CustomOpDomain_Add)(domain, layer_half);
    const ort_custom_op *bf16 = ort_bf16_op();
    if (!s && bf16) s = ORT_FN(api, CustomOpDomain_Add)(domain, bf16);
    const ort_custom_op *bf16_attention = ort_bf16_attention_op();
    if (!s && bf16_attention) s = ORT_FN(api, CustomOpDomain_Add)(domain, bf16_attention);
    if (!s) s = ORT_FN(api, AddCustomOpDomain)(options, domain);
    if (s) ORT_FN(api, ReleaseCustomOpDomain)(domain);
    return s;
}
