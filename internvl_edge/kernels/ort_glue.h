/* What the custom ops of this library (ort_op.c: MatMulNBits, ort_attention.c: GroupQueryAttention)
 * share: the OrtApi table, tensor descriptions, errors that name the op, constant-input lookup. */
#ifndef INTERNVL_EDGE_ORT_GLUE_H
#define INTERNVL_EDGE_ORT_GLUE_H

#include <stddef.h>
#include <stdint.h>

#include "ort_abi.h"

#define ORT_DOMAIN "ai.internvl_edge"
#define ORT_MAX_RANK 16

extern const OrtApi *ort_api; /* set once by RegisterCustomOps, before any kernel exists */

typedef struct {
    ort_elem_type type;
    size_t rank;
    int64_t dims[ORT_MAX_RANK];
    int64_t count;
} ort_tensor_desc;

#define ORT_TRY(expr)               \
    do {                            \
        OrtStatus *try_s_ = (expr); \
        if (try_s_) return try_s_;  \
    } while (0)

/* A status "ai.internvl_edge <op>: <message>". */
OrtStatus *ort_error(const char *op, ort_error_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
OrtStatus *ort_describe(const char *op, const OrtValue *v, const char *name, ort_tensor_desc *d);
OrtStatus *ort_expect(const char *op, const ort_tensor_desc *d, const char *name, ort_elem_type type,
                      const char *type_name, int64_t count);
void *ort_data_of(const OrtValue *v, OrtStatus **s);
/* A status we do not pass on: 1 when there was one (released), else 0. */
int ort_dropped(OrtStatus *s);
/* Required int64 attribute: its value, or an error naming it. */
OrtStatus *ort_get_int(const char *op, const OrtKernelInfo *info, const char *name, int64_t *out);
/* Optional int64 attribute: its value, or `fallback` when absent. */
int64_t ort_get_int_or(const OrtKernelInfo *info, const char *name, int64_t fallback);
/* Optional float attribute: 1 and its value in *out when present, else 0 (*out untouched). */
int ort_get_float(const OrtKernelInfo *info, const char *name, float *out);
/* Whether the node gives input `index` (of its `count`): 1 present, 0 absent (past the node's inputs,
 * or an empty name), -1 when ORT could not say. */
int ort_has_input(const OrtKernelInfo *info, size_t count, size_t index);
/* Input `index` of the node as known at kernel creation: -1 absent (past the node's inputs, or an
 * empty name), 0 present but not a constant initializer (a graph input, a computed value, an
 * initializer a feed may override), 1 a constant, with its data when it has the type and element
 * count Compute will ask for (else *data stays NULL: Compute reports the mismatch). Any error from
 * ORT reads as 0. */
int ort_constant_input(const OrtKernelInfo *info, size_t count, size_t index, ort_elem_type type,
                       int64_t elements, void **data);

/* fn(user, task) for tasks 0 .. tasks-1 on ORT's thread pool, as `segments` contiguous ranges: the
 * thread that starts a range runs its tasks in order (one sequential stream of weights), and a thread
 * whose range is done takes the last task left of the range with most left (from its end), so the
 * threads finish within one task of each other instead of within one range. With ORT's own ranges
 * (KernelContext_ParallelFor's num_batch), a thread done with its last range waited for the other's
 * (decode 1.00-1.03x faster: docs/performance-notes.md, "Threading"). `segments` is capped at `tasks`
 * and at ORT_MAX_SEGMENTS; one runs the tasks in order on the calling thread. */
#define ORT_MAX_SEGMENTS 64
OrtStatus *ort_parallel_ranges(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t tasks, size_t segments,
                               void *user);

/* OrtCustomOp callbacks both ops answer alike: the CPU provider, inputs in default (CPU) memory,
 * float outputs, and the variadic queries (asked only of variadic inputs, which neither op has). */
const char *ORT_CALL ort_cpu_provider(const ort_custom_op *op);
ort_mem_type ORT_CALL ort_default_memory(const ort_custom_op *op, size_t index);
ort_elem_type ORT_CALL ort_float_output(const ort_custom_op *op, size_t index);
int ORT_CALL ort_variadic_one(const ort_custom_op *op);
/* every output required */
ort_io_kind ORT_CALL ort_io_required(const ort_custom_op *op, size_t index);

/* The table of an op registered once per KV cache element type (GroupQueryAttention, DecoderLayer):
 * `inputs` and `outputs` give the types; the rest are the static callbacks each such op's file defines
 * under these names (op_name, input_count, output_count, destroy_kernel, input_kind, create_kernel,
 * compute). Zeroed room follows the struct, as ort_op.c's: should an ORT read a field past version 16's,
 * it reads NULL. */
typedef struct {
    ort_custom_op op;
    void *reserved[16];
} ort_op_table;
#define ORT_CACHE_OP_TABLE(inputs, outputs)                                                        \
    {                                                                                              \
        .op = {                                                                                    \
            .version = ORT_CUSTOM_OP_VERSION,                                                      \
            .get_name = op_name,                                                                   \
            .get_execution_provider_type = ort_cpu_provider,                                       \
            .get_input_type = inputs,                                                              \
            .get_input_type_count = input_count,                                                   \
            .get_output_type = outputs,                                                            \
            .get_output_type_count = output_count,                                                 \
            .kernel_destroy = destroy_kernel,                                                      \
            .get_input_characteristic = input_kind,                                                \
            .get_output_characteristic = ort_io_required,                                          \
            .get_input_memory_type = ort_default_memory,                                           \
            .get_variadic_input_min_arity = ort_variadic_one,                                      \
            .get_variadic_input_homogeneity = ort_variadic_one,                                    \
            .get_variadic_output_min_arity = ort_variadic_one,                                     \
            .get_variadic_output_homogeneity = ort_variadic_one,                                   \
            .create_kernel_v2 = create_kernel,                                                     \
            .kernel_compute_v2 = compute,                                                          \
        },                                                                                         \
    }

/* Hand back to the page cache the whole pages of [data, data + bytes) when they lie in one file-backed
 * mapping (ORT's memory-mapped external initializers, once a kernel has made its own copy of one);
 * anonymous memory is left alone. Returns the bytes handed back. */
size_t ort_release_file_pages(const void *data, size_t bytes);
/* 64-byte aligned room for a kernel's copy of a weight, on transparent huge pages from 2 MB on. */
#define HUGE_PAGE ((size_t)2 << 20)
uint8_t *ort_alloc_weights(size_t bytes);

/* Room for a call's intermediate values (64-byte aligned; NULL when out of memory), from a small pool of
 * the blocks earlier calls gave back, so that a prefill's layers reuse one another's instead of each
 * faulting in fresh pages (blocks above glibc's mmap threshold, which the runtime fixes at 1 MiB,
 * backends/ort.py, are mapped and zeroed anew on every malloc). Give it back with ort_room_give. */
void *ort_room_take(size_t bytes);
void ort_room_give(void *room);
/* Hand back to the system the pool's free blocks of more than `keep` bytes: what a decode step does,
 * so that a prefill's room is not held while decoding. */
void ort_room_trim(size_t keep);
/* Bytes the pool holds, free or taken (the tests). */
size_t ort_room_held(void);

#endif
