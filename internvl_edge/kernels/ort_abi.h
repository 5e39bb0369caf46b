/* The few parts of ONNX Runtime's C ABI that ort_op.c uses, declared here from scratch so that the
 * library builds without ONNX Runtime's headers.
 *
 * Source of the facts: the public header
 *   https://github.com/microsoft/onnxruntime/blob/main/include/onnxruntime/core/session/onnxruntime_c_api.h
 * with the slot indices checked against the table in onnxruntime/core/session/onnxruntime_c_api.cc
 * (its "End of Version N" markers and static_asserts on the last slot of each version) and against
 * independent language bindings of the same table.
 * Everything below is an ABI fact that ORT keeps stable across releases: the OrtApi function table
 * only ever grows at its end (a slot index never changes), enum values are never renumbered, and
 * OrtCustomOp only grows at its end, ORT reading a field only when the op's `version` says it
 * exists. We never declare the OrtApi struct itself; we fetch slot i of its table of pointers.
 */
#ifndef INTERNVL_EDGE_ORT_ABI_H
#define INTERNVL_EDGE_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#define ORTABI_CALL __stdcall
#else
#define ORTABI_CALL
#endif

/* Opaque handles: only ever used through pointers. */
typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

/* Error codes (OrtErrorCode). */
typedef enum {
    ORTABI_OK = 0,
    ORTABI_FAIL = 1,
    ORTABI_INVALID_ARGUMENT = 2,
} ortabi_error_code;

/* Tensor element types (ONNXTensorElementDataType, = TensorProto.DataType). */
typedef enum {
    ORTABI_TYPE_UNDEFINED = 0,
    ORTABI_TYPE_FLOAT = 1,
    ORTABI_TYPE_UINT8 = 2,
    ORTABI_TYPE_INT32 = 6,
} ortabi_elem_type;

/* OrtCustomOpInputOutputCharacteristic. */
typedef enum {
    ORTABI_IO_REQUIRED = 0,
    ORTABI_IO_OPTIONAL = 1,
} ortabi_io_kind;

/* OrtMemType: where the kernel wants an input; 0 is the EP's default (CPU memory here). */
typedef enum {
    ORTABI_MEM_DEFAULT = 0,
} ortabi_mem_type;

/* The entry point: OrtApiBase is two function pointers. */
typedef struct {
    const OrtApi *(ORTABI_CALL *get_api)(uint32_t version);
    const char *(ORTABI_CALL *get_version_string)(void);
} OrtApiBase;

/* OrtCustomOp, version 16: the smallest version with CreateKernelV2/KernelComputeV2 (kernel creation
 * and compute report errors as an OrtStatus). Optional inputs (GetInputCharacteristic) need >= 8,
 * GetInputMemoryType is read from 13 on, the variadic queries from 14 (only called for variadic
 * inputs). Shape inference and GetStartVersion/GetEndVersion need 17, the in-place/alias queries 18:
 * ORT does not read those at 16, so they are not declared. */
#define ORTABI_CUSTOM_OP_VERSION 16u

typedef struct ortabi_custom_op ortabi_custom_op;
struct ortabi_custom_op {
    uint32_t version;
    void *(ORTABI_CALL *create_kernel)(const ortabi_custom_op *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(ORTABI_CALL *get_name)(const ortabi_custom_op *op);
    const char *(ORTABI_CALL *get_execution_provider_type)(const ortabi_custom_op *op);
    ortabi_elem_type (ORTABI_CALL *get_input_type)(const ortabi_custom_op *op, size_t index);
    size_t (ORTABI_CALL *get_input_type_count)(const ortabi_custom_op *op);
    ortabi_elem_type (ORTABI_CALL *get_output_type)(const ortabi_custom_op *op, size_t index);
    size_t (ORTABI_CALL *get_output_type_count)(const ortabi_custom_op *op);
    void (ORTABI_CALL *kernel_compute)(void *kernel, OrtKernelContext *ctx);
    void (ORTABI_CALL *kernel_destroy)(void *kernel);
    ortabi_io_kind (ORTABI_CALL *get_input_characteristic)(const ortabi_custom_op *op, size_t index);
    ortabi_io_kind (ORTABI_CALL *get_output_characteristic)(const ortabi_custom_op *op, size_t index);
    ortabi_mem_type (ORTABI_CALL *get_input_memory_type)(const ortabi_custom_op *op, size_t index);
    int (ORTABI_CALL *get_variadic_input_min_arity)(const ortabi_custom_op *op);
    int (ORTABI_CALL *get_variadic_input_homogeneity)(const ortabi_custom_op *op);
    int (ORTABI_CALL *get_variadic_output_min_arity)(const ortabi_custom_op *op);
    int (ORTABI_CALL *get_variadic_output_homogeneity)(const ortabi_custom_op *op);
    OrtStatus *(ORTABI_CALL *create_kernel_v2)(const ortabi_custom_op *op, const OrtApi *api,
                                               const OrtKernelInfo *info, void **kernel);
    OrtStatus *(ORTABI_CALL *kernel_compute_v2)(void *kernel, OrtKernelContext *ctx);
};

/* OrtApi: slot indices (pointer-sized entries from the start of the table; every entry of the struct
 * is one slot, none of them are conditionally compiled) and the version that brought the newest one.
 * GetApi(ORTABI_API_VERSION) returns NULL on an ORT too old to have them all. */
#define ORTABI_API_VERSION 17u /* KernelContext_ParallelFor: ORT 1.17 (the others are all older) */

enum {
    ORTABI_SLOT_CreateStatus = 0,
    ORTABI_SLOT_CreateCustomOpDomain = 26,
    ORTABI_SLOT_CustomOpDomain_Add = 27,
    ORTABI_SLOT_AddCustomOpDomain = 28,
    ORTABI_SLOT_GetTensorMutableData = 51,
    ORTABI_SLOT_GetTensorElementType = 60,
    ORTABI_SLOT_GetDimensionsCount = 61,
    ORTABI_SLOT_GetDimensions = 62,
    ORTABI_SLOT_GetTensorTypeAndShape = 65,
    ORTABI_SLOT_KernelInfoGetAttribute_float = 85,
    ORTABI_SLOT_KernelInfoGetAttribute_int64 = 86,
    ORTABI_SLOT_KernelContext_GetInputCount = 88,
    ORTABI_SLOT_KernelContext_GetOutputCount = 89,
    ORTABI_SLOT_KernelContext_GetInput = 90,
    ORTABI_SLOT_KernelContext_GetOutput = 91,
    ORTABI_SLOT_ReleaseStatus = 93,
    ORTABI_SLOT_ReleaseTensorTypeAndShapeInfo = 99,
    ORTABI_SLOT_ReleaseCustomOpDomain = 101,
    ORTABI_SLOT_KernelInfo_GetInputCount = 230,           /* API 14, ORT 1.14 */
    ORTABI_SLOT_KernelInfo_GetInputName = 232,            /* API 14, ORT 1.14 */
    ORTABI_SLOT_KernelInfoGetConstantInput_tensor = 249,  /* API 15, ORT 1.15 */
    ORTABI_SLOT_KernelContext_ParallelFor = 274,          /* API 17, ORT 1.17 */
};

typedef OrtStatus *(ORTABI_CALL *ortabi_CreateStatus)(ortabi_error_code code, const char *msg);
typedef void (ORTABI_CALL *ortabi_ReleaseStatus)(OrtStatus *status);
typedef OrtStatus *(ORTABI_CALL *ortabi_CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(ORTABI_CALL *ortabi_CustomOpDomain_Add)(OrtCustomOpDomain *domain, const ortabi_custom_op *op);
typedef OrtStatus *(ORTABI_CALL *ortabi_AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef void (ORTABI_CALL *ortabi_ReleaseCustomOpDomain)(OrtCustomOpDomain *domain);
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelInfoGetAttribute_float)(const OrtKernelInfo *info, const char *name,
                                                                      float *out);
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name,
                                                                      int64_t *out);
/* Inputs of the node (its input list as written, absent optional ones included, as empty names). */
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelInfo_GetInputCount)(const OrtKernelInfo *info, size_t *out);
/* out == NULL: *size = strlen(name) + 1 (so 1 for an absent optional input); an error past the count. */
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelInfo_GetInputName)(const OrtKernelInfo *info, size_t index, char *out,
                                                                size_t *size);
/* *is_constant = 1 and *out = the tensor when input `index` is a constant initializer (not one a feed
 * may override); 0, *out untouched, otherwise: not constant, absent, or past the count alike. The
 * value is owned by the session. */
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelInfoGetConstantInput_tensor)(const OrtKernelInfo *info, size_t index,
                                                                          int *is_constant, const OrtValue **out);
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelContext_GetInputCount)(const OrtKernelContext *ctx, size_t *out);
/* Outputs of the node (its output list as written: trailing optional ones left out are not counted). */
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelContext_GetOutputCount)(const OrtKernelContext *ctx, size_t *out);
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelContext_GetInput)(const OrtKernelContext *ctx, size_t index,
                                                                const OrtValue **out);
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelContext_GetOutput)(OrtKernelContext *ctx, size_t index,
                                                                 const int64_t *dims, size_t ndims, OrtValue **out);
typedef OrtStatus *(ORTABI_CALL *ortabi_KernelContext_ParallelFor)(const OrtKernelContext *ctx,
                                                                   void (*fn)(void *user, size_t i), size_t total,
                                                                   size_t num_batch, void *user);
typedef OrtStatus *(ORTABI_CALL *ortabi_GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(ORTABI_CALL *ortabi_GetTensorElementType)(const OrtTensorTypeAndShapeInfo *info,
                                                              ortabi_elem_type *out);
typedef OrtStatus *(ORTABI_CALL *ortabi_GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(ORTABI_CALL *ortabi_GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims,
                                                       size_t ndims);
typedef void (ORTABI_CALL *ortabi_ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(ORTABI_CALL *ortabi_GetTensorMutableData)(OrtValue *value, void **out);

/* ORTABI(api, Name): entry Name of the OrtApi table, as its typed function pointer. The table is read
 * as an array of generic function pointers (same size and representation as the real entries). */
typedef void (ORTABI_CALL *ortabi_fn)(void);
#define ORTABI(api, name) ((ortabi_##name)((const ortabi_fn *)(const void *)(api))[ORTABI_SLOT_##name])

#endif
