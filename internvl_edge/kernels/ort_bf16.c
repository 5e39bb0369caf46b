/* ONNX Runtime custom op MatMulBf16 in domain ai.internvl_edge (opset 1): a float linear whose weight
 * is a bfloat16 constant, computed by bf16gemm.h's kernel (AMX-BF16 or AVX512-BF16). The vision
 * encoder's linears (nets/linear.py writes MatMul(x, Cast(W bfloat16 -> float)) + Add(bias)) are moved
 * here at load by kernels/passes.py (rewrite_vision) on CPUs that have one of the two; elsewhere the
 * Cast is folded by ONNX Runtime and the linear runs in float32 as before.
 *
 *   inputs:  A float [..., K], B bfloat16 [K, N] (a constant initializer), bias float [N] (optional)
 *   attrs:   K, N; batches (ranges of work for ORT's thread pool, default 16; ort_parallel_ranges)
 *   outputs: Y float [..., N] = bf16(A) @ B + bias, summed in float32 (bf16gemm.h)
 *
 * B is copied once, at session creation, into bf16_pack's layout; where ORT holds B in a memory-mapped
 * file (external initializers), the pages the copy read are handed back, so the weight is held once,
 * in bfloat16: no float32 copy of the vision encoder exists.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bf16gemm.h"
#include "ort_glue.h"

#define OP_NAME "MatMulBf16"

enum { IN_A, IN_B, IN_BIAS, IN_COUNT };

typedef struct {
    int64_t k, n, batches;
    uint16_t *packed; /* bf16_pack's copy of B */
} kernel_t;

static size_t g_packed_bytes, g_released_bytes; /* bf16_pack_stats */

static void run_task(void *problem, size_t task) { bf16_run((const bf16_problem *)problem, task); }

static OrtStatus *ORT_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const kernel_t *kn = (const kernel_t *)kernel;
    size_t count = 0;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInputCount)(ctx, &count));
    const OrtValue *in[IN_COUNT] = {0};
    for (size_t i = 0; i < IN_COUNT && i < count; i++) ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, i, &in[i]));
    if (!in[IN_A]) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "required input A is missing");
    ort_tensor_desc a, d;
    ORT_TRY(ort_describe(OP_NAME, in[IN_A], "A", &a));
    if (a.type != ORT_TYPE_FLOAT)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A must be float32 (element type %d given)", (int)a.type);
    if (a.rank < 1 || a.dims[a.rank - 1] != kn->k)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "A's last dimension must be K=%lld", (long long)kn->k);
    if (in[IN_BIAS]) {
        ORT_TRY(ort_describe(OP_NAME, in[IN_BIAS], "bias", &d));
        ORT_TRY(ort_expect(OP_NAME, &d, "bias", ORT_TYPE_FLOAT, "float32", kn->n));
    }
    int64_t out_dims[ORT_MAX_RANK];
    memcpy(out_dims, a.dims, a.rank * sizeof out_dims[0]);
    out_dims[a.rank - 1] = kn->n;
    OrtValue *y = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, 0, out_dims, a.rank, &y));
    const int64_t m = a.count / kn->k;
    if (m == 0) return NULL;

    OrtStatus *s = NULL;
    bf16_problem p = {.m = m, .k = kn->k, .n = kn->n, .packed = kn->packed, .path = bf16_path()};
    p.a = (const float *)ort_data_of(in[IN_A], &s);
    if (!s && in[IN_BIAS]) p.bias = (const float *)ort_data_of(in[IN_BIAS], &s);
    if (!s) p.y = (float *)ort_data_of(y, &s);
    if (s) return s;
    const size_t bytes = (size_t)bf16_rows(m) * (size_t)bf16_kp(kn->k) * sizeof(uint16_t);
    p.a16 = (uint16_t *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!p.a16) return ort_error(OP_NAME, ORT_FAIL, "out of memory (%zu bytes for A in bfloat16)", bytes);
    bf16_round(&p);
    const size_t tasks = bf16_tasks(&p);
    if (tasks == 1)
        bf16_run(&p, 0);
    else
        s = ort_parallel_ranges(ctx, run_task, tasks, (size_t)kn->batches, &p);
    free(p.a16);
    return s;
}

static OrtStatus *ORT_CALL create_kernel(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info,
                                         void **out) {
    (void)op;
    (void)api;
    *out = NULL;
    int64_t k, n;
    ORT_TRY(ort_get_int(OP_NAME, info, "K", &k));
    ORT_TRY(ort_get_int(OP_NAME, info, "N", &n));
    if (k <= 0 || n <= 0)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "K=%lld and N=%lld must be positive", (long long)k, (long long)n);
    size_t count = 0;
    ORT_TRY(ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &count));
    void *b = NULL;
    if (ort_constant_input(info, count, IN_B, ORT_TYPE_BFLOAT16, k * n, &b) != 1 || !b)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "B must be a constant bfloat16 initializer of [K=%lld, N=%lld]",
                         (long long)k, (long long)n);
    const size_t bytes = bf16_packed_bytes(k, n);
    kernel_t *kn = (kernel_t *)malloc(sizeof *kn);
    uint16_t *packed = (uint16_t *)ort_alloc_weights(bytes);
    if (!kn || !packed) {
        free(kn);
        free(packed);
        return ort_error(OP_NAME, ORT_FAIL, "out of memory (%zu bytes for the packed weights)", bytes);
    }
    bf16_pack((const uint16_t *)b, k, n, packed);
    const size_t stored = (size_t)(k * n) * sizeof(uint16_t);
    __atomic_add_fetch(&g_packed_bytes, stored, __ATOMIC_RELAXED);
    __atomic_add_fetch(&g_released_bytes, ort_release_file_pages(b, stored), __ATOMIC_RELAXED);
    kn->k = k;
    kn->n = n;
    kn->batches = ort_get_int_or(info, "batches", 16);
    if (kn->batches < 1) kn->batches = 1;
    kn->packed = packed;
    *out = kn;
    return NULL;
}

static void ORT_CALL destroy_kernel(void *kernel) {
    kernel_t *kn = (kernel_t *)kernel;
    if (kn) free(kn->packed);
    free(kn);
}

static const char *ORT_CALL op_name(const ort_custom_op *op) { (void)op; return OP_NAME; }
static size_t ORT_CALL input_count(const ort_custom_op *op) { (void)op; return IN_COUNT; }
static size_t ORT_CALL output_count(const ort_custom_op *op) { (void)op; return 1; }

static ort_elem_type ORT_CALL input_type(const ort_custom_op *op, size_t i) {
    (void)op;
    return i == IN_B ? ORT_TYPE_BFLOAT16 : ORT_TYPE_FLOAT;
}
static ort_io_kind ORT_CALL input_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    return i == IN_BIAS ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED;
}
static ort_io_kind ORT_CALL output_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    (void)i;
    return ORT_IO_REQUIRED;
}

static const struct {
    ort_custom_op op;
    void *reserved[16];
} g_op = {
    .op = {
        .version = ORT_CUSTOM_OP_VERSION,
        .create_kernel = NULL,
        .get_name = op_name,
        .get_execution_provider_type = ort_cpu_provider,
        .get_input_type = input_type,
        .get_input_type_count = input_count,
        .get_output_type = ort_float_output,
        .get_output_type_count = output_count,
        .kernel_compute = NULL,
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

/* MultiHeadAttention in domain ai.internvl_edge (opset 1): com.microsoft's MultiHeadAttention as
 * nets/vision.py writes it, computed by bf16gemm.h's AMX attention; kernels/passes.py moves the vision
 * encoder's nodes here where the AMX path runs (bf16_path() == BF16_AMX).
 *
 *   inputs:  query, key, value float [batch, seq, num_heads x head_dim] (head_dim at most 256)
 *   attrs:   num_heads; scale (float, default 1 / sqrt(head_dim))
 *   outputs: output float [batch, seq, num_heads x head_dim]
 */
#define ATTN_NAME "MultiHeadAttention"

typedef struct {
    int64_t heads;
    float scale; /* 0: 1 / sqrt(head_dim) */
} attn_kernel_t;

static void attn_pack_task(void *problem, size_t task) { bf16_attn_pack((const bf16_attn_problem *)problem, task); }
static void attn_run_task(void *problem, size_t task) { bf16_attn_run((const bf16_attn_problem *)problem, task); }

static OrtStatus *ORT_CALL attn_compute(void *kernel, OrtKernelContext *ctx) {
    const attn_kernel_t *kn = (const attn_kernel_t *)kernel;
    static const char *const names[] = {"query", "key", "value"};
    const OrtValue *in[3];
    ort_tensor_desc d[3];
    for (int i = 0; i < 3; i++) {
        ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, (size_t)i, &in[i]));
        if (!in[i]) return ort_error(ATTN_NAME, ORT_INVALID_ARGUMENT, "required input %s is missing", names[i]);
        ORT_TRY(ort_describe(ATTN_NAME, in[i], names[i], &d[i]));
        ORT_TRY(ort_expect(ATTN_NAME, &d[i], names[i], ORT_TYPE_FLOAT, "float32", d[0].count));
        if (d[i].rank != 3 || memcmp(d[i].dims, d[0].dims, 3 * sizeof d[0].dims[0]) != 0)
            return ort_error(ATTN_NAME, ORT_INVALID_ARGUMENT, "%s must be [batch, seq, hidden] as query is", names[i]);
    }
    const int64_t width = d[0].dims[2];
    if (width % kn->heads || width / kn->heads > BF16_ATTN_MAX_HEAD)
        return ort_error(ATTN_NAME, ORT_INVALID_ARGUMENT, "hidden size %lld is not num_heads=%lld heads of at most %d",
                         (long long)width, (long long)kn->heads, BF16_ATTN_MAX_HEAD);
    OrtValue *y = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, 0, d[0].dims, 3, &y));
    if (d[0].count == 0) return NULL;
    OrtStatus *s = NULL;
    bf16_attn_problem p = {.batch = d[0].dims[0], .seq = d[0].dims[1], .heads = kn->heads,
                           .head_dim = width / kn->heads};
    p.scale = kn->scale > 0.0f ? kn->scale : 1.0f / sqrtf((float)p.head_dim);
    p.q = (const float *)ort_data_of(in[0], &s);
    if (!s) p.k = (const float *)ort_data_of(in[1], &s);
    if (!s) p.v = (const float *)ort_data_of(in[2], &s);
    if (!s) p.out = (float *)ort_data_of(y, &s);
    if (s) return s;
    const size_t bytes = bf16_attn_scratch_bytes(&p);
    p.scratch = (uint16_t *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!p.scratch) return ort_error(ATTN_NAME, ORT_FAIL, "out of memory (%zu bytes of keys and values)", bytes);
    s = ort_parallel_ranges(ctx, attn_pack_task, (size_t)(p.batch * p.heads), 16, &p);
    if (!s) s = ort_parallel_ranges(ctx, attn_run_task, bf16_attn_tasks(&p), 16, &p);
    free(p.scratch);
    return s;
}

static OrtStatus *ORT_CALL attn_create(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info,
                                       void **out) {
    (void)op;
    (void)api;
    *out = NULL;
    int64_t heads;
    ORT_TRY(ort_get_int(ATTN_NAME, info, "num_heads", &heads));
    if (heads <= 0) return ort_error(ATTN_NAME, ORT_INVALID_ARGUMENT, "num_heads=%lld must be positive", (long long)heads);
    attn_kernel_t *kn = (attn_kernel_t *)malloc(sizeof *kn);
    if (!kn) return ort_error(ATTN_NAME, ORT_FAIL, "out of memory");
    kn->heads = heads;
    kn->scale = 0.0f;
    ort_get_float(info, "scale", &kn->scale);
    *out = kn;
    return NULL;
}

static void ORT_CALL attn_destroy(void *kernel) { free(kernel); }
static const char *ORT_CALL attn_name(const ort_custom_op *op) { (void)op; return ATTN_NAME; }
static size_t ORT_CALL attn_input_count(const ort_custom_op *op) { (void)op; return 3; }
static ort_elem_type ORT_CALL attn_input_type(const ort_custom_op *op, size_t i) {
    (void)op;
    (void)i;
    return ORT_TYPE_FLOAT;
}

static const struct {
    ort_custom_op op;
    void *reserved[16];
} g_attn = {
    .op = {
        .version = ORT_CUSTOM_OP_VERSION,
        .create_kernel = NULL,
        .get_name = attn_name,
        .get_execution_provider_type = ort_cpu_provider,
        .get_input_type = attn_input_type,
        .get_input_type_count = attn_input_count,
        .get_output_type = ort_float_output,
        .get_output_type_count = output_count,
        .kernel_compute = NULL,
        .kernel_destroy = attn_destroy,
        .get_input_characteristic = output_kind, /* every input required */
        .get_output_characteristic = output_kind,
        .get_input_memory_type = ort_default_memory,
        .get_variadic_input_min_arity = ort_variadic_one,
        .get_variadic_input_homogeneity = ort_variadic_one,
        .get_variadic_output_min_arity = ort_variadic_one,
        .get_variadic_output_homogeneity = ort_variadic_one,
        .create_kernel_v2 = attn_create,
        .kernel_compute_v2 = attn_compute,
    },
};

/* NULL where the AMX path does not run here. */
const ort_custom_op *ort_bf16_attention_op(void) { return bf16_path() == BF16_AMX ? &g_attn.op : NULL; }

/* NULL where this CPU has neither AMX-BF16 nor AVX512-BF16 (or INTERNVL_EDGE_BF16=none). */
const ort_custom_op *ort_bf16_op(void) { return bf16_path() == BF16_NONE ? NULL : &g_op.op; }

#define ORT_EXPORT __attribute__((visibility("default")))

/* The path the vision encoder's bfloat16 linears take here: "amx", "avx512bf16" or "none". */
ORT_EXPORT const char *bf16_kernel_path(void) { return bf16_path_name(bf16_path()); }

/* Bytes of bfloat16 weights this process's MatMulBf16 kernels packed, and of ORT's memory-mapped
 * originals handed back to the page cache. */
ORT_EXPORT void bf16_pack_stats(uint64_t *packed, uint64_t *released) {
    *packed = __atomic_load_n(&g_packed_bytes, __ATOMIC_RELAXED);
    *released = __atomic_load_n(&g_released_bytes, __ATOMIC_RELAXED);
}
