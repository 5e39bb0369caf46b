/* ort_glue.h's helpers, shared by the library's custom ops. */
#include "ort_glue.h"

#include <stdarg.h>
#include <stdio.h>

const OrtApi *g_api;

OrtStatus *ie_error(const char *op, ortabi_error_code code, const char *fmt, ...) {
    char msg[400];
    int head = snprintf(msg, sizeof msg, "%s %s: ", IE_DOMAIN, op);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + head, sizeof msg - (size_t)head, fmt, ap);
    va_end(ap);
    return ORTABI(g_api, CreateStatus)(code, msg);
}

OrtStatus *ie_describe(const char *op, const OrtValue *v, const char *name, tensor_desc *d) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    TRY(ORTABI(g_api, GetTensorTypeAndShape)(v, &info));
    OrtStatus *s = ORTABI(g_api, GetTensorElementType)(info, &d->type);
    if (!s) s = ORTABI(g_api, GetDimensionsCount)(info, &d->rank);
    if (!s && d->rank > IE_MAX_RANK)
        s = ie_error(op, ORTABI_INVALID_ARGUMENT, "%s has rank %zu, at most %d is supported", name, d->rank, IE_MAX_RANK);
    if (!s) s = ORTABI(g_api, GetDimensions)(info, d->dims, d->rank);
    ORTABI(g_api, ReleaseTensorTypeAndShapeInfo)(info);
    if (s) return s;
    d->count = 1;
    for (size_t i = 0; i < d->rank; i++) d->count *= d->dims[i];
    return NULL;
}

OrtStatus *ie_expect(const char *op, const tensor_desc *d, const char *name, ortabi_elem_type type,
                     const char *type_name, int64_t count) {
    if (d->type != type)
        return ie_error(op, ORTABI_INVALID_ARGUMENT, "%s must be %s (element type %d given)", name, type_name,
                        (int)d->type);
    if (count >= 0 && d->count != count)
        return ie_error(op, ORTABI_INVALID_ARGUMENT, "%s has %lld elements, expected %lld", name,
                        (long long)d->count, (long long)count);
    return NULL;
}

void *ie_data_of(const OrtValue *v, OrtStatus **s) {
    void *p = NULL;
    *s = ORTABI(g_api, GetTensorMutableData)((OrtValue *)v, &p);
    return p;
}

int ie_dropped(OrtStatus *s) {
    if (!s) return 0;
    ORTABI(g_api, ReleaseStatus)(s);
    return 1;
}

OrtStatus *ie_get_int(const char *op, const OrtKernelInfo *info, const char *name, int64_t *out) {
    if (!ie_dropped(ORTABI(g_api, KernelInfoGetAttribute_int64)(info, name, out))) return NULL;
    return ie_error(op, ORTABI_INVALID_ARGUMENT, "required int64 attribute '%s' is missing", name);
}

int64_t ie_get_int_or(const OrtKernelInfo *info, const char *name, int64_t fallback) {
    int64_t v = fallback;
    return ie_dropped(ORTABI(g_api, KernelInfoGetAttribute_int64)(info, name, &v)) ? fallback : v;
}

int ie_get_float(const OrtKernelInfo *info, const char *name, float *out) {
    float v = 0.0f;
    if (ie_dropped(ORTABI(g_api, KernelInfoGetAttribute_float)(info, name, &v))) return 0;
    *out = v;
    return 1;
}

int ie_has_input(const OrtKernelInfo *info, size_t count, size_t index) {
    size_t name_size = 0;
    if (index >= count) return 0;
    if (ie_dropped(ORTABI(g_api, KernelInfo_GetInputName)(info, index, NULL, &name_size))) return -1;
    return name_size > 1; /* "" is an absent optional input */
}

int ie_constant_input(const OrtKernelInfo *info, size_t count, size_t index, ortabi_elem_type type,
                      int64_t elements, void **data) {
    *data = NULL;
    const int present = ie_has_input(info, count, index);
    if (present <= 0) return present == 0 ? -1 : 0;
    int is_constant = 0;
    const OrtValue *v = NULL;
    if (ie_dropped(ORTABI(g_api, KernelInfoGetConstantInput_tensor)(info, index, &is_constant, &v)) || !is_constant ||
        !v)
        return 0;
    tensor_desc d;
    OrtStatus *s = NULL;
    if (ie_dropped(ie_describe("", v, "constant input", &d)) || d.type != type || d.count != elements) return 1;
    void *p = ie_data_of(v, &s);
    if (!ie_dropped(s)) *data = p;
    return 1;
}

const char *ORTABI_CALL ie_cpu_provider(const ortabi_custom_op *op) {
    (void)op;
    return NULL; /* NULL: the CPU execution provider */
}

ortabi_mem_type ORTABI_CALL ie_default_memory(const ortabi_custom_op *op, size_t index) {
    (void)op;
    (void)index;
    return ORTABI_MEM_DEFAULT;
}

ortabi_elem_type ORTABI_CALL ie_float_output(const ortabi_custom_op *op, size_t index) {
    (void)op;
    (void)index;
    return ORTABI_TYPE_FLOAT;
}

int ORTABI_CALL ie_variadic_one(const ortabi_custom_op *op) {
    (void)op;
    return 1;
}
