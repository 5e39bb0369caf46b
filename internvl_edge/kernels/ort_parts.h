/* The pieces of this library's ops that the fused DecoderLayer op (ort_layer.c) runs back to back:
 * a 4-bit linear as MatMulNBits computes it (ort_op.c) and the decoder's attention as
 * GroupQueryAttention computes it (ort_attention.c), each taking plain pointers instead of the node's
 * OrtValues, so that one node can run a whole decoder layer. */
#ifndef INTERNVL_EDGE_ORT_PARTS_H
#define INTERNVL_EDGE_ORT_PARTS_H

#include <stddef.h>
#include <stdint.h>

#include "attention.h"
#include "ort_glue.h"

/* MatMulNBits' inputs, in its node's order */
enum { LIN_A, LIN_B, LIN_SCALES, LIN_ZERO_POINTS, LIN_G_IDX, LIN_BIAS, LIN_SKIP, LIN_GAMMA, LIN_IN_COUNT };
#define LIN_ABSENT ((size_t)-1) /* a linear's input that its node does not have */

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
    /* The constant inputs' data, as ORT holds it for the session (NULL where an input is absent or
     * not a constant of the right type and size): what a node that runs this linear among others reads */
    const void *constant[LIN_IN_COUNT];
} linear_t;

/* One call of a linear: rows of A in, rows of Y out (and the norm's sum, with norm and a sum asked). */
typedef struct {
    const float *a;     /* [m, k] */
    const float *skip;  /* [m, k] or NULL: with the norm only */
    const float *gamma; /* [k]: with the norm only */
    float *sum;         /* [m, k] or NULL: a + skip, with the norm only */
    const uint8_t *b;   /* as stored; not read where the kernel holds a packed copy */
    const float *scales;
    const uint8_t *zero_points; /* or NULL */
    const float *bias;          /* [n] or NULL */
    float *y;                   /* [m, n]; [m, n / 2] with swiglu */
    int64_t m;
} linear_io;

/* The linear of a node whose input `i` of MatMulNBits' list is node input in[i] (LIN_ABSENT: none),
 * its attributes named `prefix` + MatMulNBits' names ("K", "N", "bits", "block_size", "swiglu",
 * "norm_epsilon"; "batches" and "pack" unprefixed): the table of scales and the packed copy of B made
 * from constant inputs, a misshapen constant B refused. `op` names the node's op in errors. */
OrtStatus *linear_create(const char *op, const OrtKernelInfo *info, const char *prefix, const size_t in[LIN_IN_COUNT],
                         linear_t **out);
void linear_destroy(linear_t *kn);
/* Y (and the sum) for io's rows, on ORT's thread pool; io's pointers as described, already checked. */
OrtStatus *linear_apply(const char *op, const linear_t *kn, OrtKernelContext *ctx, const linear_io *io);

/* The decoder attention's inputs other than qkv and the query/key norms, as node input indices. */
typedef struct {
    size_t past_k, past_v, seqlens_k, total, cos, sin, query_lens;
} attention_inputs;

/* Checks the attention's inputs for a qkv of [batch, rows, width] floats, makes outputs out_k and
 * out_v (present key and value, copies of past unless bound to the same buffers) and fills
 * everything of *p but qkv, out, q_norm, k_norm and qk_norm_epsilon. */
OrtStatus *attention_bind(const char *op, int64_t heads, int64_t kv_heads, OrtKernelContext *ctx,
                          const attention_inputs *in, int64_t batch, int64_t rows, int64_t width, size_t out_k,
                          size_t out_v, attn_problem *p);
/* Plans and runs *p (bound, with qkv and out set) on ORT's thread pool. */
OrtStatus *attention_apply(const char *op, OrtKernelContext *ctx, attn_problem *p);

#endif
