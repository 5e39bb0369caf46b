/* ONNX Runtime custom op DecoderLayer in domain ai.internvl_edge (opset 1): one whole decoder layer,
 * the five nodes kernels/passes.py's fuse_layers finds in a rewritten decoder, run back to back by one
 * node with the same kernels, so each layer costs ONNX Runtime one node instead of five and its values
 * between the kernels never pass through ORT's allocator. Decode gained 1.01x on InternVL3-2B shapes
 * (the time between nodes was mostly cache misses, which happen inside one node too), prefill more,
 * with the pool of ort_room_take (docs/performance-notes.md, "One node per decoder layer").
 *
 *   h    = x + skip                  (x when skip is absent: the first layer)
 *   qkv  = linear_qkv(rms_norm(h) * input_norm) + qkv_bias
 *   a    = attention(qkv, past, ...)  (GroupQueryAttention of ort_attention.c, query/key norms optional)
 *   o    = linear_o(a)
 *   sum  = o + h                     (output 1: the next layer's skip)
 *   y    = linear_down(swiglu(linear_gate_up(rms_norm(sum) * post_norm)))   (output 0)
 *
 *   inputs:  0 x, 1 skip (optional), then MatMulNBits' B, scales, zero_points (optional) of each
 *            linear with qkv's bias (optional) and the norms' gammas as listed in `enum` below, and
 *            GroupQueryAttention's past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
 *            sin_cache, query_seqlens, q_norm, k_norm (optional, both or neither)
 *   attrs:   num_heads, kv_num_heads, qk_norm_epsilon (optional), norm_epsilon, batches, pack;
 *            per linear (prefixes qkv_, o_, gate_up_, down_) K, N, bits, block_size
 *   outputs: y float (x's shape), sum float (x's shape), present_key, present_value (past's shape
 *            and element type; in place where bound to past's buffers)
 * The weights, scales, zero points, biases and norm weights must be constant initializers (the pass
 * fuses only those); the intermediate values live in buffers of the call.
 * Registered twice under this name, once per cache type, as GroupQueryAttention is.
 */
#include <stdlib.h>
#include <string.h>

#include "ort_glue.h"
#include "ort_parts.h"

#define OP_NAME "DecoderLayer"

enum {
    IN_X, IN_SKIP,
    IN_QKV_B, IN_QKV_SCALES, IN_QKV_ZERO_POINTS, IN_QKV_BIAS, IN_INPUT_NORM,
    IN_PAST_K, IN_PAST_V, IN_SEQLENS_K, IN_TOTAL, IN_COS, IN_SIN, IN_QUERY_LENS, IN_Q_NORM, IN_K_NORM,
    IN_O_B, IN_O_SCALES, IN_O_ZERO_POINTS,
    IN_GATE_UP_B, IN_GATE_UP_SCALES, IN_GATE_UP_ZERO_POINTS, IN_POST_NORM,
    IN_DOWN_B, IN_DOWN_SCALES, IN_DOWN_ZERO_POINTS,
    IN_COUNT
};
enum { OUT_Y, OUT_SUM, OUT_PRESENT_K, OUT_PRESENT_V, OUT_COUNT };
enum { QKV, O, GATE_UP, DOWN, LINEARS };

#define A LIN_ABSENT
/* each linear's MatMulNBits inputs as this node's: A, B, scales, zero_points, g_idx, bias, skip, gamma
 * (A and skip are the call's buffers, never node inputs) */
static const size_t g_inputs[LINEARS][LIN_IN_COUNT] = {
    [QKV] = {A, IN_QKV_B, IN_QKV_SCALES, IN_QKV_ZERO_POINTS, A, IN_QKV_BIAS, A, IN_INPUT_NORM},
    [O] = {A, IN_O_B, IN_O_SCALES, IN_O_ZERO_POINTS, A, A, A, A},
    [GATE_UP] = {A, IN_GATE_UP_B, IN_GATE_UP_SCALES, IN_GATE_UP_ZERO_POINTS, A, A, A, IN_POST_NORM},
    [DOWN] = {A, IN_DOWN_B, IN_DOWN_SCALES, IN_DOWN_ZERO_POINTS, A, A, A, A},
};
#undef A
static const char *const g_prefix[LINEARS] = {"qkv_", "o_", "gate_up_", "down_"};
static const attention_inputs g_attention_inputs = {IN_PAST_K, IN_PAST_V, IN_SEQLENS_K, IN_TOTAL,
                                                    IN_COS,    IN_SIN,    IN_QUERY_LENS};

typedef struct {
    linear_t *linear[LINEARS];
    int64_t heads, kv_heads;
    float qk_norm_epsilon;
    const float *q_norm, *k_norm; /* constants, or NULL (no query/key norms) */
} kernel_t;

static void ORT_CALL destroy_kernel(void *kernel) {
    kernel_t *kn = (kernel_t *)kernel;
    if (!kn) return;
    for (int i = 0; i < LINEARS; i++) linear_destroy(kn->linear[i]);
    free(kn);
}

/* Linear `ln` on m rows of a into y, its weights the constants this node holds (checked at creation);
 * with its norm, skip (or NULL) added to a first and the sum written to `sum` (or not kept). */
static OrtStatus *apply(const linear_t *ln, OrtKernelContext *ctx, int64_t m, const float *a, const float *skip,
                        float *sum, float *y) {
    const linear_io io = {.a = a,
                          .skip = skip,
                          .gamma = (const float *)ln->constant[LIN_GAMMA],
                          .sum = sum,
                          .b = (const uint8_t *)ln->constant[LIN_B],
                          .scales = (const float *)ln->constant[LIN_SCALES],
                          .zero_points = (const uint8_t *)ln->constant[LIN_ZERO_POINTS],
                          .bias = (const float *)ln->constant[LIN_BIAS],
                          .y = y,
                          .m = m};
    return linear_apply(OP_NAME, ln, ctx, &io);
}

static OrtStatus *ORT_CALL compute(void *kernel, OrtKernelContext *ctx) {
    const kernel_t *kn = (const kernel_t *)kernel;
    const linear_t *const *ln = (const linear_t *const *)kn->linear;
    const int64_t hidden = ln[QKV]->k, width = ln[QKV]->n, inner = ln[DOWN]->k;
    const OrtValue *x_v = NULL, *skip_v = NULL;
    ort_tensor_desc x, d;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, IN_X, &x_v));
    if (!x_v) return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "required input x is missing");
    ORT_TRY(ort_describe(OP_NAME, x_v, "x", &x));
    if (x.type != ORT_TYPE_FLOAT || x.rank != 3 || x.dims[2] != hidden)
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "x must be float32 [batch, sequence, %lld]", (long long)hidden);
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetInput)(ctx, IN_SKIP, &skip_v));
    if (skip_v) {
        ORT_TRY(ort_describe(OP_NAME, skip_v, "skip", &d));
        if (d.type != ORT_TYPE_FLOAT || d.count != x.count)
            return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "skip must be float32 with x's shape (%lld elements)",
                             (long long)x.count);
    }
    const int64_t B = x.dims[0], S = x.dims[1], m = B * S;

    attn_problem p;
    memset(&p, 0, sizeof p);
    ORT_TRY(attention_bind(OP_NAME, kn->heads, kn->kv_heads, ctx, &g_attention_inputs, B, S, width, OUT_PRESENT_K,
                           OUT_PRESENT_V, &p));
    OrtValue *y_v = NULL, *sum_v = NULL;
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, OUT_Y, x.dims, 3, &y_v));
    ORT_TRY(ORT_FN(ort_api, KernelContext_GetOutput)(ctx, OUT_SUM, x.dims, 3, &sum_v));
    if (m == 0) return NULL;
    OrtStatus *s = NULL;
    const float *xs = (const float *)ort_data_of(x_v, &s);
    const float *skip = s || !skip_v ? NULL : (const float *)ort_data_of(skip_v, &s);
    float *y = s ? NULL : (float *)ort_data_of(y_v, &s);
    float *sum = s ? NULL : (float *)ort_data_of(sum_v, &s);
    if (s) return s;

    /* the call's buffers, each given back after its last reader (ort_room_take: a prefill's layers
     * reuse them; from fresh mallocs, above the runtime's 1 MiB mmap threshold, their pages were faulted
     * in and zeroed at every layer, and prefill ran 1.05-1.10x slower than with five nodes) */
    const int64_t attn_width = kn->heads * p.head_dim;
    float *h = NULL, *qkv = NULL, *att = NULL, *o = NULL, *act = NULL;
#define ROOM(buf, floats)                                                                                \
    do {                                                                                               \
        if (!s && !((buf) = (float *)ort_room_take((size_t)(floats) * sizeof(float))))                \
            s = ort_error(OP_NAME, ORT_FAIL, "out of memory (%lld floats)", (long long)(floats));      \
    } while (0)

    if (skip) ROOM(h, m * hidden);
    ROOM(qkv, m * width);
    if (!s) s = apply(ln[QKV], ctx, m, xs, skip, h, qkv);
    ROOM(att, m * attn_width);
    if (!s) {
        p.qkv = qkv;
        p.out = att;
        p.q_norm = kn->q_norm;
        p.k_norm = kn->k_norm;
        p.qk_norm_epsilon = kn->qk_norm_epsilon;
        s = attention_apply(OP_NAME, ctx, &p);
    }
    ort_room_give(qkv);
    ROOM(o, m * hidden);
    if (!s) s = apply(ln[O], ctx, m, att, NULL, NULL, o);
    ort_room_give(att);
    ROOM(act, m * inner);
    if (!s) s = apply(ln[GATE_UP], ctx, m, o, h ? h : xs, sum, act);
    ort_room_give(o);
    ort_room_give(h);
    if (!s) s = apply(ln[DOWN], ctx, m, act, NULL, NULL, y);
    ort_room_give(act);
#undef ROOM
    return s;
}

/* Whether the node's input `index` is a constant with `count` floats: its data, else NULL. */
static const float *constant_floats(const OrtKernelInfo *info, size_t inputs, size_t index, int64_t count) {
    void *data = NULL;
    return ort_constant_input(info, inputs, index, ORT_TYPE_FLOAT, count, &data) == 1 ? (const float *)data : NULL;
}

static OrtStatus *ORT_CALL create_kernel(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info,
                                         void **out) {
    (void)op;
    (void)api;
    *out = NULL;
    kernel_t *kn = (kernel_t *)calloc(1, sizeof *kn);
    if (!kn) return ort_error(OP_NAME, ORT_FAIL, "out of memory");
    OrtStatus *s = ort_get_int(OP_NAME, info, "num_heads", &kn->heads);
    if (!s) s = ort_get_int(OP_NAME, info, "kv_num_heads", &kn->kv_heads);
    if (!s && (kn->heads <= 0 || kn->kv_heads <= 0 || kn->heads % kn->kv_heads))
        s = ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "num_heads=%lld must be a positive multiple of kv_num_heads=%lld",
                      (long long)kn->heads, (long long)kn->kv_heads);
    for (int i = 0; i < LINEARS && !s; i++) s = linear_create(OP_NAME, info, g_prefix[i], g_inputs[i], &kn->linear[i]);
    size_t inputs = 0;
    if (!s) s = ORT_FN(ort_api, KernelInfo_GetInputCount)(info, &inputs);
    if (s) {
        destroy_kernel(kn);
        return s;
    }
    const linear_t *const *ln = (const linear_t *const *)kn->linear;
    const int64_t hidden = ln[QKV]->k, width = ln[QKV]->n, head_dim = width / (kn->heads + 2 * kn->kv_heads);
    const char *why = NULL;
    if (!ln[QKV]->norm || !ln[GATE_UP]->norm || !ln[GATE_UP]->swiglu || ln[O]->norm || ln[DOWN]->norm ||
        ln[QKV]->swiglu || ln[O]->swiglu || ln[DOWN]->swiglu)
        why = "needs qkv_ and gate_up_norm_epsilon, gate_up_swiglu=1 and no other norm or swiglu";
    else if (width % (kn->heads + 2 * kn->kv_heads) || ln[O]->k != kn->heads * head_dim || ln[O]->n != hidden ||
             ln[GATE_UP]->k != hidden || ln[GATE_UP]->n != 2 * ln[DOWN]->k || ln[DOWN]->n != hidden)
        why = "the linears' K and N do not chain into one layer of the heads given";
    for (int i = 0; i < LINEARS && !why; i++) {
        const linear_t *l = ln[i];
        if (!l->constant[LIN_B] || !l->constant[LIN_SCALES] || (l->norm && !l->constant[LIN_GAMMA]) ||
            (ort_has_input(info, inputs, g_inputs[i][LIN_ZERO_POINTS]) && !l->constant[LIN_ZERO_POINTS]) ||
            (ort_has_input(info, inputs, g_inputs[i][LIN_BIAS]) && !l->constant[LIN_BIAS]))
            why = "the weights, scales, zero points, bias and norm weights must be constant initializers of the "
                  "linears' shapes";
    }
    kn->qk_norm_epsilon = 0.0f;
    if (!why && ort_get_float(info, "qk_norm_epsilon", &kn->qk_norm_epsilon)) {
        kn->q_norm = constant_floats(info, inputs, IN_Q_NORM, head_dim);
        kn->k_norm = constant_floats(info, inputs, IN_K_NORM, head_dim);
        if (!kn->q_norm || !kn->k_norm)
            why = "qk_norm_epsilon needs constant q_norm and k_norm of head_dim values";
    } else if (!why && (ort_has_input(info, inputs, IN_Q_NORM) || ort_has_input(info, inputs, IN_K_NORM))) {
        why = "inputs q_norm and k_norm need attribute qk_norm_epsilon";
    }
    if (why) {
        destroy_kernel(kn);
        return ort_error(OP_NAME, ORT_INVALID_ARGUMENT, "%s", why);
    }
    *out = kn;
    return NULL;
}

static const char *ORT_CALL op_name(const ort_custom_op *op) { (void)op; return OP_NAME; }
static size_t ORT_CALL input_count(const ort_custom_op *op) { (void)op; return IN_COUNT; }
static size_t ORT_CALL output_count(const ort_custom_op *op) { (void)op; return OUT_COUNT; }
static ort_elem_type input_type_of(size_t i, ort_elem_type cache) {
    switch (i) {
    case IN_PAST_K:
    case IN_PAST_V: return cache;
    case IN_SEQLENS_K:
    case IN_TOTAL:
    case IN_QUERY_LENS: return ORT_TYPE_INT32;
    case IN_QKV_B:
    case IN_QKV_ZERO_POINTS:
    case IN_O_B:
    case IN_O_ZERO_POINTS:
    case IN_GATE_UP_B:
    case IN_GATE_UP_ZERO_POINTS:
    case IN_DOWN_B:
    case IN_DOWN_ZERO_POINTS: return ORT_TYPE_UINT8;
    default: return ORT_TYPE_FLOAT;
    }
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
    return i == OUT_Y || i == OUT_SUM ? ORT_TYPE_FLOAT : ORT_TYPE_FLOAT16;
}
static ort_io_kind ORT_CALL input_kind(const ort_custom_op *op, size_t i) {
    (void)op;
    switch (i) {
    case IN_SKIP:
    case IN_QKV_ZERO_POINTS:
    case IN_QKV_BIAS:
    case IN_Q_NORM:
    case IN_K_NORM:
    case IN_O_ZERO_POINTS:
    case IN_GATE_UP_ZERO_POINTS:
    case IN_DOWN_ZERO_POINTS: return ORT_IO_OPTIONAL;
    default: return ORT_IO_REQUIRED;
    }
}

static const ort_op_table g_layer_op = ORT_CACHE_OP_TABLE(input_type, ort_float_output);
static const ort_op_table g_layer_op_half = ORT_CACHE_OP_TABLE(input_type_half, output_type_half);

const ort_custom_op *ort_layer_op(void) { return attn_supported() == 0 ? &g_layer_op.op : NULL; }
const ort_custom_op *ort_layer_op_half(void) { return attn_supported() == 0 ? &g_layer_op_half.op : NULL; }
