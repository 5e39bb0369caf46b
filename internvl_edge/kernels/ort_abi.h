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
#define ORT_CALL __stdcall
#else
#define ORT_CALL
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
    ORT_OK = 0,
    ORT_FAIL = 1,
    ORT_INVALID_ARGUMENT = 2,
} ort_error_code;

/* Tensor element types (ONNXTensorElementDataType, = TensorProto.DataType). */
typedef enum {
    ORT_TYPE_UNDEFINED = 0,
    ORT_TYPE_FLOAT = 1,
    ORT_TYPE_UINT8 = 2,
    ORT_TYPE_INT32 = 6,
    ORT_TYPE_FLOAT16 = 10,
    ORT_TYPE_BFLOAT16 = 16,
} ort_elem_type;

/* OrtCustomOpInputOutputCharacteristic. */
typedef enum {
    ORT_IO_REQUIRED = 0,
    ORT_IO_OPTIONAL = 1,
} ort_io_kind;

/* OrtMemType: where the kernel wants an input; 0 is the EP's default (CPU memory here). */
typedef enum {
    ORT_MEM_DEFAULT = 0,
} ort_mem_type;

/* The entry point: OrtApiBase is two function pointers. */
typedef struct {
    const OrtApi *(ORT_CALL *get_api)(uint32_t version);
    const char *(ORT_CALL *get_version_string)(void);
} OrtApiBase;

/* OrtCustomOp, version 16: the smallest version with CreateKernelV2/KernelComputeV2 (kernel creation
 * and compute report errors as an OrtStatus). Optional inputs (GetInputCharacteristic) need >= 8,
 * GetInputMemoryType is read from 13 on, the variadic queries from 14 (only called for variadic
 * inputs). Shape inference and GetStartVersion/GetEndVersion need 17, the in-place/alias queries 18:
 * ORT does not read those at 16, so they are not declared. */
#define ORT_CUSTOM_OP_VERSION 16u

typedef struct ort_custom_op ort_custom_op;
struct ort_custom_op {
    uint32_t version;
    void *(ORT_CALL *create_kernel)(const ort_custom_op *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(ORT_CALL *get_name)(const ort_custom_op *op);
    const char *(ORT_CALL *get_execution_provider_type)(const ort_custom_op *op);
    ort_elem_type (ORT_CALL *get_input_type)(const ort_custom_op *op, size_t index);
    size_t (ORT_CALL *get_input_type_count)(const ort_custom_op *op);
    ort_elem_type (ORT_CALL *get_output_type)(const ort_custom_op *op, size_t index);
    size_t (ORT_CALL *get_output_type_count)(const ort_custom_op *op);
    void (ORT_CALL *kernel_compute)(void *kernel, OrtKernelContext *ctx);
    void (ORT_CALL *kernel_destroy)(void *kernel);
    ort_io_kind (ORT_CALL *get_input_characteristic)(const ort_custom_op *op, size_t index);
    ort_io_kind (ORT_CALL *get_output_characteristic)(const ort_custom_op *op, size_t index);
    ort_mem_type (ORT_CALL *get_input_memory_type)(const ort_custom_op *op, size_t index);
    int (ORT_CALL *get_variadic_input_min_arity)(const ort_custom_op *op);
    int (ORT_CALL *get_variadic_input_homogeneity)(const ort_custom_op *op);
    int (ORT_CALL *get_variadic_output_min_arity)(const ort_custom_op *op);
    int (ORT_CALL *get_variadic_output_homogeneity)(const ort_custom_op *op);
    OrtStatus *(ORT_CALL *create_kernel_v2)(const ort_custom_op *op, const OrtApi *api,
                                            const OrtKernelInfo *info, void **kernel);
    OrtStatus *(ORT_CALL *kernel_compute_v2)(void *kernel, OrtKernelContext *ctx);
};

/* OrtApi: slot indices (pointer-sized entries from the start of the table; every entry of the struct
 * is one slot, none of them are conditionally compiled) and the version that brought the newest one.
 * GetApi(ORT_API_VERSION_NEEDED) returns NULL on an ORT too old to have them all. */
#define ORT_API_VERSION_NEEDED 17u /* KernelContext_ParallelFor: ORT 1.17 (the others are all older) */

enum {
    ORT_SLOT_CreateStatus = 0,
    ORT_SLOT_CreateCustomOpDomain = 26,
    ORT_SLOT_CustomOpDomain_Add = 27,
    ORT_SLOT_AddCustomOpDomain = 28,
    ORT_SLOT_GetTensorMutableData = 51,
    ORT_SLOT_GetTensorElementType = 60,
    ORT_SLOT_GetDimensionsCount = 61,
    ORT_SLOT_GetDimensions = 62,
    ORT_SLOT_GetTensorTypeAndShape = 65,
    ORT_SLOT_KernelInfoGetAttribute_float = 85,
    ORT_SLOT_KernelInfoGetAttribute_int64 = 86,
    ORT_SLOT_KernelContext_GetInputCount = 88,
    ORT_SLOT_KernelContext_GetOutputCount = 89,
    ORT_SLOT_KernelContext_GetInput = 90,
    ORT_SLOT_KernelContext_GetOutput = 91,
    ORT_SLOT_ReleaseStatus = 93,
    ORT_SLOT_ReleaseTensorTypeAndShapeInfo = 99,
    ORT_SLOT_ReleaseCustomOpDomain = 101,
    ORT_SLOT_KernelInfo_GetInputCount = 230,           /* API 14, ORT 1.14 */
    ORT_SLOT_KernelInfo_GetInputName = 232,            /* API 14, ORT 1.14 */
    ORT_SLOT_KernelInfoGetConstantInput_tensor = 249,  /* API 15, ORT 1.15 */
    ORT_SLOT_KernelContext_ParallelFor = 274,          /* API 17, ORT 1.17 */
};

typedef OrtStatus *(ORT_CALL *ort_CreateStatus_fn)(ort_error_code code, const char *msg);
typedef void (ORT_CALL *ort_ReleaseStatus_fn)(OrtStatus *status);
typedef OrtStatus *(ORT_CALL *ort_CreateCustomOpDomain_fn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(ORT_CALL *ort_CustomOpDomain_Add_fn)(OrtCustomOpDomain *domain, const ort_custom_op *op);
typedef OrtStatus *(ORT_CALL *ort_AddCustomOpDomain_fn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef void (ORT_CALL *ort_ReleaseCustomOpDomain_fn)(OrtCustomOpDomain *domain);
typedef OrtStatus *(ORT_CALL *ort_KernelInfoGetAttribute_float_fn)(const OrtKernelInfo *info, const char *name,
                                                                   float *out);
typedef OrtStatus *(ORT_CALL *ort_KernelInfoGetAttribute_int64_fn)(const OrtKernelInfo *info, const char *name,
                                                                   int64_t *out);
/* Inputs of the node (its input list as written, absent optional ones included, as empty names). */
typedef OrtStatus *(ORT_CALL *ort_KernelInfo_GetInputCount_fn)(const OrtKernelInfo *info, size_t *out);
/* out == NULL: *size = strlen(name) + 1 (so 1 for an absent optional input); an error past the count. */
typedef OrtStatus *(ORT_CALL *ort_KernelInfo_GetInputName_fn)(const OrtKernelInfo *info, size_t index, char *out,
                                                              size_t *size);
/* *is_constant = 1 and *out = the tensor when input `index` is a constant initializer (not one a feed
 * may override); 0, *out untouched, otherwise: not constant, absent, or past the count alike. The
 * value is owned by the session. */
typedef OrtStatus *(ORT_CALL *ort_KernelInfoGetConstantInput_tensor_fn)(const OrtKernelInfo *info, size_t index,
                                                                        int *is_constant, const OrtValue **out);
typedef OrtStatus *(ORT_CALL *ort_KernelContext_GetInputCount_fn)(const OrtKernelContext *ctx, size_t *out);
/* Outputs of the node (its output list as written: trailing optional ones left out are not counted). */
typedef OrtStatus *(ORT_CALL *ort_KernelContext_GetOutputCount_fn)(const OrtKernelContext *ctx, size_t *out);
typedef OrtStatus *(ORT_CALL *ort_KernelContext_GetInput_fn)(const OrtKernelContext *ctx, size_t index,
                                                             const OrtValue **out);
typedef OrtStatus *(ORT_CALL *ort_KernelContext_GetOutput_fn)(OrtKernelContext *ctx, size_t index,
                                                              const int64_t *dims, size_t ndims, OrtValue **out);
typedef OrtStatus *(ORT_CALL *ort_KernelContext_ParallelFor_fn)(const OrtKernelContext *ctx,
                                                                void (*fn)(void *user, size_t i), size_t total,
                                                                size_t num_batch, void *user);
typedef OrtStatus *(ORT_CALL *ort_GetTensorTypeAndShape_fn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(ORT_CALL *ort_GetTensorElementType_fn)(const OrtTensorTypeAndShapeInfo *info,
                                                           ort_elem_type *out);
typedef OrtStatus *(ORT_CALL *ort_GetDimensionsCount_fn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(ORT_CALL *ort_GetDimensions_fn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims,
                                                    size_t ndims);
typedef void (ORT_CALL *ort_ReleaseTensorTypeAndShapeInfo_fn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(ORT_CALL *ort_GetTensorMutableData_fn)(OrtValue *value, void **out);

/* ORT_FN(api, Name): entry Name of the OrtApi table, as its typed function pointer. The table is read
 * as an array of generic function pointers (same size and representation as the real entries). */
typedef void (ORT_CALL *ort_fn)(void);
#define ORT_FN(api, name) ((ort_##name##_fn)((const ort_fn *)(const void *)(api))[ORT_SLOT_##name])

#endif
