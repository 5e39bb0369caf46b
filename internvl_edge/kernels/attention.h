/* Causal grouped-query attention over an in-place KV cache, with rotary embeddings: what
 * com.microsoft GroupQueryAttention computes for the decoder (packed QKV, do_rotary=1 with
 * rotate-half rotary, past and present sharing one buffer, right-padded chunks), in float32; for
 * Qwen3 also the RMS norm of each query and key head before the rotary, which the graph computes with
 * nodes of its own in front of com.microsoft's kernel (nets/decoder.py).
 *
 * Spec: https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.GroupQueryAttention
 *
 * For batch entry b the chunk's first query_lens[b] rows are real and seqlens_k[b] + 1 tokens are in
 * the cache after the step, so row i sits at position p = seqlens_k[b] + 1 - query_lens[b] + i: its
 * key and value (key rotated at p) are written to cache row p, and its query (rotated at p) attends
 * to cache rows 0 .. p. Padded rows (i >= query_lens[b]) write nothing and output zeros.
 *
 * Why our own (kernels/__init__.py has the figures): ONNX Runtime's CPU kernel reads each KV head
 * once per query head, for every query row; this one reads a KV head's rows once for all the query
 * heads that share it (one task per batch entry, KV head and query row, a flash-attention style
 * running softmax so nothing of size context is stored).
 *
 * The cache in float16 (kv_half) halves the bytes decode reads per token: each block of keys and values
 * is widened to float32 once, into a buffer in L1, and the sums run in float32 as with a float32 cache.
 *
 * Use: attn_plan() checks the shapes and says how much scratch and how many tasks, then
 * attn_prepare(p, task) for tasks 0 .. plan.prepare_tasks-1 (rotary and cache writes),
 * attn_transpose(p, task) for tasks 0 .. plan.transpose_tasks-1 (none for decode), then
 * attn_run(p, task) for tasks 0 .. plan.tasks-1; each phase from any threads in any order,
 * one phase after the other.
 */
#ifndef INTERNVL_EDGE_ATTENTION_H
#define INTERNVL_EDGE_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const float *qkv;         /* [batch, rows, (heads + 2 * kv_heads) * head_dim]: q heads, k heads, v heads */
    void *k_cache, *v_cache;  /* [batch, kv_heads, capacity, head_dim], updated in place: float32, or
                                 IEEE float16 with kv_half (written rounded to nearest, read widened) */
    int kv_half;
    const float *cos, *sin;   /* [positions, head_dim / 2] */
    const int32_t *seqlens_k; /* [batch]: tokens in the cache after the step, minus one */
    const int32_t *query_lens; /* [batch]: real rows of the chunk */
    float *out;               /* [batch, rows, heads * head_dim] */
    int64_t batch, rows, heads, kv_heads, head_dim, capacity, positions;
    float scale;              /* on q.k; 0: 1 / sqrt(head_dim) */
    const float *q_norm, *k_norm; /* [head_dim] or NULL: Qwen3's RMS norm weights of each query and key head,
                                     applied before the rotary (x / sqrt(mean(x^2) + qk_norm_epsilon) * w) */
    float qk_norm_epsilon;
    float *scratch;           /* plan.scratch_bytes, 64-byte aligned: the rotated, scaled queries, and
                                 for chunks of many rows the keys turned around in blocks */
} attn_problem;

typedef struct {
    size_t scratch_bytes;
    size_t prepare_tasks, transpose_tasks, tasks;
} attn_plan_t;

/* 0 when this CPU can run the kernel (x86-64 with AVX2, FMA and F16C at least), else -1. */
int attn_supported(void);
/* 0 and the plan; or -1 and a message in `why` (shapes the kernel does not take: head_dim not a
 * multiple of 16 or above 256, heads not a multiple of kv_heads; or lengths out of range). */
int attn_plan(const attn_problem *p, attn_plan_t *plan, char *why, size_t why_size);
void attn_prepare(const attn_problem *p, size_t task);
void attn_transpose(const attn_problem *p, size_t task);
void attn_run(const attn_problem *p, size_t task);

#endif
