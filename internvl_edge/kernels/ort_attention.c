/* ONNX Runtime custom op GroupQueryAttention in domain ai.internvl_edge (opset 1): the decoder's
 * com.microsoft GroupQueryAttention nodes as nets/decoder.py writes them, computed by attention.h's
 * kernel. kernels/rewrite.py moves a node here only when it has exactly that form.
 *
 *   inputs:  qkv float [B, S, (num_heads + 2 kv_num_heads) head_dim] (packed, as com.microsoft's
 *            query with key and value absent), past_key, past_value float or float16 (both the
 *            same) [B, kv_num_heads, capacity, head_dim], seqlens_k int32 [B], total_sequence_length int32 [1],
 *            cos_cache, sin_cache float [positions, head_dim / 2], query_seqlens int32 [B],
 *            q_norm, k_norm float [head_dim] (optional, both or neither, with qk_norm_epsilon: Qwen3's
 *            RMS norm of each query and key head before the rotary, which kernels/rewrite.py folds
 *            in from the nodes nets/decoder.py writes for it)
 *   attrs:   num_heads, kv_num_heads; qk_norm_epsilon (float, optional); rotary is always applied
 *            (do_rotary=1, rotate-half)
 *   outputs: output float [B, S, num_heads head_dim], present_key, present_value (past's shape and
 *            element type)
 * Registered twice under this name, once per cache type: ONNX Runtime picks the one whose types match
 * the graph's (kernels/passes.py sets them to float16 where the runtime keeps the cache in half
 * precision), and one compute serves both.
 *
 * present_* bound to the same buffers as past_* (the runtime's IO binding) are updated in place;
 * otherwise past is copied to present first and present is updated.
 */
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "ort_glue.h"
#include "ort_parts.h"

#define OP_NAME "GroupQueryAttention"

enum {
    IN_QKV, IN_PAST_K, IN_PAST_V, IN_SEQLENS_K, IN_TOTAL, IN_COS, IN_SIN, IN_QUERY_LENS, IN_Q_NORM, IN_K_NORM, IN_COUNT
};
enum { IN_REQUIRED = IN_Q_NORM };
enum { OUT_Y, OUT_PRESENT_K, OUT_PRESENT_V, OUT_COUNT };

typedef struct {
    int64_t heads, kv_heads;
    int qk_norm; /* attribute qk_norm_epsilon given: inputs q_norm and k_norm are required */
    float qk_norm_epsilon;
} kernel_t;

static void prepare_task(void *user, size_t task) { attn_prepare((const attn_problem *)user, task); }
static void transpose_task(void *user, size_t task) { attn_transpose((const attn_problem *)user, task); }
static void run_task(void *user, size_t task) { attn_run((const attn_problem *)user, task); }

static OrtStatus *input_of(const char *op, OrtKernelContext *ctx, size_t i, const char *name, ort_elem_type type,
                           const char *type_name, const OrtValue **v, ort_tensor_desc *d) {
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, i, v));
    if (!*v) return ort_error(op, ORT_INVALID_ARGUMENT, "required input %s is missing", name);
    ORT_TRY(ort_describe(op, *v, name, d));
    return ort_expect(op, d, name, type, type_name, -1);
}

static OrtStatus *parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t tasks, attn_problem *p) {
    if (tasks == 1) {
        fn(p, 0);
        return NULL;
    }
    /* a task is a query row (decode: one context's read) or a tile of 16 rows (prefill: causal, so
     * later tiles cost more): up to 256 ranges spread them over the threads without per-task dispatch */
    return tasks ? ORT_FN(ort_api, KernelContext_ParallelFor)(ctx, fn, tasks, tasks < 256 ? tasks : 256, p) : NULL;
}

OrtStatus *attention_bind(const char *op, int64_t nh, int64_t kvh, OrtKernelContext *ctx, const attention_inputs *in,
                          int64_t B, int64_t S, int64_t width, size_t out_k, size_t out_v, attn_problem *p) {
    const OrtValue *past_kv = NULL, *past_vv = NULL, *seqlens = NULL, *total = NULL, *cos = NULL, *sin = NULL,
                   *lens = NULL;
    ort_tensor_desc pk, pv, sk, tot, cs, sn, ql;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, in->past_k, &past_kv));
    if (!past_kv) return ort_error(op, ORT_INVALID_ARGUMENT, "required input past_key is missing");
    ORT_TRY(ort_describe(op, past_kv, "past_key", &pk));
    if (pk.type != ORT_TYPE_FLOAT && pk.type != ORT_TYPE_FLOAT16)
        return ort_error(op, ORT_INVALID_ARGUMENT, "past_key must be float32 or float16 (element type %d given)",
                         (int)pk.type);
    const int half = pk.type == ORT_TYPE_FLOAT16;
    ORT_TRY(input_of(op, ctx, in->past_v, "past_value", pk.type, half ? "float16, as past_key" : "float32, as past_key",
                     &past_vv, &pv));
    ORT_TRY(input_of(op, ctx, in->seqlens_k, "seqlens_k", ORT_TYPE_INT32, "int32", &seqlens, &sk));
    ORT_TRY(input_of(op, ctx, in->total, "total_sequence_length", ORT_TYPE_INT32, "int32", &total, &tot));
    ORT_TRY(input_of(op, ctx, in->cos, "cos_cache", ORT_TYPE_FLOAT, "float32", &cos, &cs));
    ORT_TRY(input_of(op, ctx, in->sin, "sin_cache", ORT_TYPE_FLOAT, "float32", &sin, &sn));
    ORT_TRY(input_of(op, ctx, in->query_lens, "query_seqlens", ORT_TYPE_INT32, "int32", &lens, &ql));

    if (width % (nh + 2 * kvh))
        return ort_error(op, ORT_INVALID_ARGUMENT, "qkv width %lld is not (num_heads + 2 kv_num_heads) x head_dim",
                         (long long)width);
    const int64_t hd = width / (nh + 2 * kvh);
    if (pk.rank != 4 || pk.dims[0] != B || pk.dims[1] != kvh || pk.dims[3] != hd || pv.rank != 4 ||
        memcmp(pk.dims, pv.dims, sizeof pk.dims[0] * 4))
        return ort_error(op, ORT_INVALID_ARGUMENT, "past_key and past_value must both be [%lld, %lld, capacity, %lld]",
                         (long long)B, (long long)kvh, (long long)hd);
    if (sk.count != B || ql.count != B)
        return ort_error(op, ORT_INVALID_ARGUMENT, "seqlens_k and query_seqlens must have %lld entries", (long long)B);
    if (cs.rank != 2 || cs.dims[1] != hd / 2 || sn.rank != 2 || memcmp(cs.dims, sn.dims, sizeof cs.dims[0] * 2))
        return ort_error(op, ORT_INVALID_ARGUMENT, "cos_cache and sin_cache must both be [positions, %lld]",
                         (long long)(hd / 2));

    OrtValue *present_k = NULL, *present_v = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, out_k, pk.dims, 4, &present_k));
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, out_v, pv.dims, 4, &present_v));
    OrtStatus *s = NULL;
    const void *past_k = ort_data_of(past_kv, &s);
    const void *past_v = s ? NULL : ort_data_of(past_vv, &s);
    if (!s) p->k_cache = ort_data_of(present_k, &s);
    if (!s) p->v_cache = ort_data_of(present_v, &s);
    if (!s) p->cos = (const float *)ort_data_of(cos, &s);
    if (!s) p->sin = (const float *)ort_data_of(sin, &s);
    if (!s) p->seqlens_k = (const int32_t *)ort_data_of(seqlens, &s);
    if (!s) p->query_lens = (const int32_t *)ort_data_of(lens, &s);
    if (s) return s;
    /* not bound in place: present starts as a copy of past */
    const size_t cache_bytes = (size_t)pk.count * (half ? 2 : sizeof(float));
    if (p->k_cache != past_k && cache_bytes) memcpy(p->k_cache, past_k, cache_bytes);
    if (p->v_cache != past_v && cache_bytes) memcpy(p->v_cache, past_v, cache_bytes);
    p->batch = B;
    p->rows = S;
    p->heads = nh;
    p->kv_heads = kvh;
    p->head_dim = hd;
    p->capacity = pk.dims[2];
    p->positions = cs.dims[0];
    p->kv_half = half;
    return NULL;
}

OrtStatus *attention_apply(const char *op, OrtKernelContext *ctx, attn_problem *p) {
    char why[240];
    attn_plan_t plan;
    if (attn_plan(p, &plan, why, sizeof why) != 0) return ort_error(op, ORT_INVALID_ARGUMENT, "%s", why);
    if (p->batch == 0 || p->rows == 0) return NULL;
    p->scratch = (float *)ort_room_take(plan.scratch_bytes);
    if (!p->scratch) return ort_error(op, ORT_FAIL, "out of memory (%zu bytes of scratch)", plan.scratch_bytes);
    OrtStatus *s = parallel(ctx, prepare_task, plan.prepare_tasks, p);
    if (!s) s = parallel(ctx, transpose_task, plan.transpose_tasks, p);
    if (!s) s = parallel(ctx, run_task, plan.tasks, p);
    ort_room_give(p->scratch);
    p->scratch = NULL;
    return s;
}

/* this op's own node: each input at its place in the op's list */
static const attention_inputs g_own_inputs = {IN_PAST_K, IN_PAST_V, IN_SEQLENS_K, IN_TOTAL,
                                              IN_COS,    IN_SIN,    IN_QUERY_LENS};

static OrtStatus *ORT_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const kernel_t *kn = (const kernel_t *)kernel;
    size_t count = 0;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInputCount)(ctx, &count));
    if (count < IN_REQUIRED)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "%d inputs expected, %zu given", IN_REQUIRED, count);
    const OrtValue *qkv_v = NULL, *q_norm_v = NULL, *k_norm_v = NULL;
    ort_tensor_desc qkv;
    ORT_TRY(input_of(OP_NAME, ctx, IN_QKV, "qkv", ORT_TYPE_FLOAT, "float32", &qkv_v, &qkv));
    if (qkv.rank != 3) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "qkv must be [batch, sequence, width]");
    const int64_t nh = kn->heads, kvh = kn->kv_heads;
    if (qkv.dims[2] % (nh + 2 * kvh))
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "qkv width %lld is not (num_heads + 2 kv_num_heads) x head_dim",
                         (long long)qkv.dims[2]);
    const int64_t hd = qkv.dims[2] / (nh + 2 * kvh);

    if (kn->qk_norm) {
        ort_tensor_desc q_norm, k_norm;
        if (count < IN_COUNT)
            return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "qk_norm_epsilon needs inputs q_norm and k_norm");
        ORT_TRY(input_of(OP_NAME, ctx, IN_Q_NORM, "q_norm", ORT_TYPE_FLOAT, "float32", &q_norm_v, &q_norm));
        ORT_TRY(input_of(OP_NAME, ctx, IN_K_NORM, "k_norm", ORT_TYPE_FLOAT, "float32", &k_norm_v, &k_norm));
        if (q_norm.count != hd || k_norm.count != hd)
            return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "q_norm and k_norm must have head_dim = %lld values",
                             (long long)hd);
    } else if (count > IN_REQUIRED) {
        const OrtValue *extra = NULL;
        for (size_t i = IN_REQUIRED; i < count && !extra; i++)
            ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, i, &extra));
        if (extra)
            return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "inputs q_norm and k_norm need attribute qk_norm_epsilon");
    }

    const int64_t B = qkv.dims[0], S = qkv.dims[1];
    attn_problem p;
    memset(&p, 0, sizeof p);
    ORT_TRY(attention_bind(OP_NAME, nh, kvh, ctx, &g_own_inputs, B, S, qkv.dims[2], OUT_PRESENT_K, OUT_PRESENT_V, &p));
    const int64_t y_dims[3] = {B, S, nh * hd};
    OrtValue *y = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, OUT_Y, y_dims, 3, &y));
    OrtStatus *s = NULL;
    p.qkv = (const float *)ort_data_of(qkv_v, &s);
    if (!s) p.out = (float *)ort_data_of(y, &s);
    if (!s && kn->qk_norm) p.q_norm = (const float *)ort_data_of(q_norm_v, &s);
    if (!s && kn->qk_norm) p.k_norm = (const float *)ort_data_of(k_norm_v, &s);
    if (s) return s;
    p.qk_norm_epsilon = kn->qk_norm_epsilon;
    return attention_apply(OP_NAME, ctx, &p);
}

static OrtStatus *ORT_CALL create_kernel(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info,
                                         void **out) {
    (void)op;
    (void)api;
    *out = NULL;
    int64_t heads, kv_heads;
    ORT_TRY(ort_get_int(OP_NAME, info, "num_heads", &heads));
    ORT_TRY(ort_get_int(OP_NAME, info, "kv_num_heads", &kv_heads));
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT,
                         "num_heads=%lld must be a positive multiple of kv_num_heads=%lld", (long long)heads,
                         (long long)kv_heads);
    kernel_t *kn = (kernel_t *)malloc(sizeof *kn);
    if (!kn) return ort_error(OP_NAME, ORT_FAIL, "out of memory");
    kn->heads = heads;
    kn->kv_heads = kv_heads;
    kn->qk_norm_epsilon = 0.0f;
    kn->qk_norm = ort_get_float(info, "qk_norm_epsilon", &kn->qk_norm_epsilon);
    *out = kn;
    return NULL;
}

static void ORT_CALL destroy_kernel(void *kernel) { free(kernel); }

static const char *ORT_CALL op_name(const ort_custom_op *op) { (void)op; return OP_NAME; }
static size_t ORT_CALL input_count(const ort_custom_op *op) { (void)op; return IN_COUNT; }
static size_t ORT_CALL output_count(const ort_custom_op *op) { (void)op; return OUT_COUNT; }
static ort_elem_type input_type_of(size_t i, ort_elem_type cache) {
    if (i == IN_PAST_K || i == IN_PAST_V) return cache;
    return i == IN_SEQLENS_K || i == IN_TOTAL || i == IN_QUERY_LENS ? ORT_TYPE_INT32 : ORT_TYPE_FLOAT;
}
static ort_elem_type ORT_CALL input_type(const ort_custom_op *op, size_t i) {
    (void)op;
    return input_type_of(i, ORT_TYPE_FLOAT);
}
static ort_elem_type ORT_CALL input_type_half(const ort_custom_op *op, size_t i) {
    (void)op;
    return input_type_of(i, ORT_TYPE_FLOAT16);
}
static ort_elem_type ORT_CALL output_type_half(const ort_custom_op *op, size_t i) {
    (void)op;
    return i == OUT_Y ? ORT_TYPE_FLOAT : ORT_TYPE_FLOAT16;
}
static ort_io_kind ORT_CALL input_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    return i < IN_REQUIRED ? ORT_IO_REQUIRED : ORT_IO_OPTIONAL;
}

static const ort_op_table g_attention_op = ORT_CACHE_OP_TABLE(input_type, ort_float_output);
static const ort_op_table g_attention_op_half = ORT_CACHE_OP_TABLE(input_type_half, output_type_half);

const ort_custom_op *ort_attention_op(void) { return attn_supported() == 0 ? &g_attention_op.op : NULL; }
const ort_custom_op *ort_attention_op_half(void) { return attn_supported() == 0 ? &g_attention_op_half.op : NULL; }
