/* The RMS norm that feeds a linear, computed by that linear's node (ort_op.c, attribute norm_epsilon):
 * what ONNX Runtime's SkipSimplifiedLayerNormalization (with a skip) and SimplifiedLayerNormalization
 * (without) compute, per row of K floats:
 *
 *   s = x + skip;   normed = s / sqrt(mean(s * s) + epsilon) * gamma;   sum = s (when asked)
 *
 * the formula of ORT's CPU kernel (onnxruntime/contrib_ops/cpu/skip_layer_norm.cc: the division by
 * the root, then the product with gamma), with the squares summed in 16 float lanes instead of one
 * (a different rounding order, ~1e-7 relative).
 *
 * Why in the linear's node: decode runs one row, 1536 floats on InternVL3-2B, little
 * arithmetic; as nodes of their own the 57 norms made decode up to 1.03x slower
 * (docs/performance-notes.md, "4-bit linears").
 */
#ifndef INTERNVL_EDGE_RMS_NORM_H
#define INTERNVL_EDGE_RMS_NORM_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const float *x;     /* [M, K] */
    const float *skip;  /* [M, K] or NULL */
    const float *gamma; /* [K] */
    float epsilon;
    int64_t m, k;
    float *sum;    /* [M, K] or NULL: x + skip */
    float *normed; /* [M, K] */
    int64_t rows_per_task; /* norm_task's share of the rows */
} norm_job;

void norm_rows(const norm_job *job, int64_t first, int64_t count);
/* rows [task * rows_per_task, ...) of the job: for a thread pool's callback */
void norm_task(void *job, size_t task);

#endif
