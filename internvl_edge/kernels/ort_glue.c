/* ort_glue.h's helpers, shared by the library's custom ops. */
#define _GNU_SOURCE /* madvise */
#include "ort_glue.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

const OrtApi *ort_api;

OrtStatus *ort_error(const char *op, ort_error_code code, const char *fmt, ...) {
    char msg[400];
    int head = snprintf(msg, sizeof msg, "%s %s: ", ORT_DOMAIN, op);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + head, sizeof msg - (size_t)head, fmt, ap);
    va_end(ap);
    return ORT_FN(ort_api, CreateStatus)(code, msg);
}

OrtStatus *ort_describe(const char *op, const OrtValue *v, const char *name, ort_tensor_desc *d) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    ORT_TRY(ORT_FN(ort_api, GetTensorTypeAndShape)(v, &info));
    OrtStatus *s = ORT_FN(ort_api, GetTensorElementType)(info, &d->type);
    if (!s) s = ORT_FN(ort_api, GetDimensionsCount)(info, &d->rank);
    if (!s && d->rank > ORT_MAX_RANK)
        s = ort_error(op, ORT_INVALID_ARGUMENT, "%s has rank %zu, at most %d is supported", name, d->rank,
                      ORT_MAX_RANK);
    if (!s) s = ORT_FN(ort_api, GetDimensions)(info, d->dims, d->rank);
    ORT_FN(ort_api, ReleaseTensorTypeAndShapeInfo)(info);
    if (s) return s;
    d->count = 1;
    for (size_t i = 0; i < d->rank; i++) d->count *= d->dims[i];
    return NULL;
}

OrtStatus *ort_expect(const char *op, const ort_tensor_desc *d, const char *name, ort_elem_type type,
                      const char *type_name, int64_t count) {
    if (d->type != type)
        return ort_error(op, ORT_INVALID_ARGUMENT, "%s must be %s (element type %d given)", name, type_name,
                         (int)d->type);
    if (count >= 0 && d->count != count)
        return ort_error(op, ORT_INVALID_ARGUMENT, "%s has %lld elements, expected %lld", name,
                         (long long)d->count, (long long)count);
    return NULL;
}

void *ort_data_of(const OrtValue *v, OrtStatus **s) {
    void *p = NULL;
    *s = ORT_FN(ort_api, GetTensorMutableData)((OrtValue *)v, &p);
    return p;
}

int ort_dropped(OrtStatus *s) {
    if (!s) return 0;
    ORT_FN(ort_api, ReleaseStatus)(s);
    return 1;
}

OrtStatus *ort_get_int(const char *op, const OrtKernelInfo *info, const char *name, int64_t *out) {
    if (!ort_dropped(ORT_FN(ort_api, KernelInfoGetAttribute_int64)(info, name, out))) return NULL;
    return ort_error(op, ORT_INVALID_ARGUMENT, "required int64 attribute '%s' is missing", name);
}

int64_t ort_get_int_or(const OrtKernelInfo *info, const char *name, int64_t fallback) {
    int64_t v = fallback;
    return ort_dropped(ORT_FN(ort_api, KernelInfoGetAttribute_int64)(info, name, &v)) ? fallback : v;
}

int ort_get_float(const OrtKernelInfo *info, const char *name, float *out) {
    float v = 0.0f;
    if (ort_dropped(ORT_FN(ort_api, KernelInfoGetAttribute_float)(info, name, &v))) return 0;
    *out = v;
    return 1;
}

int ort_has_input(const OrtKernelInfo *info, size_t count, size_t index) {
    size_t name_size = 0;
    if (index >= count) return 0;
    if (ort_dropped(ORT_FN(ort_api, KernelInfo_GetInputName)(info, index, NULL, &name_size))) return -1;
    return name_size > 1; /* "" is an absent optional input */
}

int ort_constant_input(const OrtKernelInfo *info, size_t count, size_t index, ort_elem_type type,
                       int64_t elements, void **data) {
    *data = NULL;
    const int present = ort_has_input(info, count, index);
    if (present <= 0) return present == 0 ? -1 : 0;
    int is_constant = 0;
    const OrtValue *v = NULL;
    OrtStatus *asked = ORT_FN(ort_api, KernelInfoGetConstantInput_tensor)(info, index, &is_constant, &v);
    if (ort_dropped(asked) || !is_constant || !v)
        return 0;
    ort_tensor_desc d;
    OrtStatus *s = NULL;
    if (ort_dropped(ort_describe("", v, "constant input", &d)) || d.type != type || d.count != elements) return 1;
    void *p = ort_data_of(v, &s);
    if (!ort_dropped(s)) *data = p;
    return 1;
}

const char *ORT_CALL ort_cpu_provider(const ort_custom_op *op) {
    (void)op;
    return NULL; /* NULL: the CPU execution provider */
}

ort_mem_type ORT_CALL ort_default_memory(const ort_custom_op *op, size_t index) {
    (void)op;
    (void)index;
    return ORT_MEM_DEFAULT;
}

ort_elem_type ORT_CALL ort_float_output(const ort_custom_op *op, size_t index) {
    (void)op;
    (void)index;
    return ORT_TYPE_FLOAT;
}

int ORT_CALL ort_variadic_one(const ort_custom_op *op) {
    (void)op;
    return 1;
}
ort_io_kind ORT_CALL ort_io_required(const ort_custom_op *op, size_t index) {
    (void)op;
    (void)index;
    return ORT_IO_REQUIRED;
}

/* One range of ort_parallel_ranges: the next task from its start (low 32 bits) and the end, exclusive
 * (high 32 bits), changed together by compare-and-swap so that a task is taken once; and whether a
 * thread has started it. Its own cache line: the threads update different ranges. */
typedef struct {
    _Alignas(64) uint64_t span;
    int started;
} ort_range;

typedef struct {
    void (*fn)(void *, size_t);
    void *user;
    size_t count;
    ort_range *ranges;
} ort_ranges;

/* Take a task of range r from its start (front = 1) or its end: 1 and the task, or 0 when it is empty. */
static int take(ort_range *r, int front, uint32_t *task) {
    uint64_t cur = __atomic_load_n(&r->span, __ATOMIC_RELAXED);
    for (;;) {
        const uint32_t lo = (uint32_t)cur, hi = (uint32_t)(cur >> 32);
        if (lo >= hi) return 0;
        const uint64_t next = front ? ((uint64_t)hi << 32) | (lo + 1) : ((uint64_t)(hi - 1) << 32) | lo;
        if (__atomic_compare_exchange_n(&r->span, &cur, next, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *task = front ? lo : hi - 1;
            return 1;
        }
    }
}

/* Range r from its start, unless another thread started it. */
static void run_from_start(const ort_ranges *rs, size_t r) {
    if (__atomic_exchange_n(&rs->ranges[r].started, 1, __ATOMIC_RELAXED)) return;
    uint32_t task;
    while (take(&rs->ranges[r], 1, &task)) rs->fn(rs->user, task);
}

static void run_range(void *user, size_t index) {
    const ort_ranges *rs = (const ort_ranges *)user;
    run_from_start(rs, index);
    for (;;) { /* then ranges no thread has started, from their start; then the tail of the others */
        size_t most = 0, at = 0, fresh = rs->count;
        for (size_t i = 0; i < rs->count; i++) {
            const uint64_t span = __atomic_load_n(&rs->ranges[i].span, __ATOMIC_RELAXED);
            const uint32_t lo = (uint32_t)span, hi = (uint32_t)(span >> 32);
            if (hi <= lo) continue;
            if (!__atomic_load_n(&rs->ranges[i].started, __ATOMIC_RELAXED)) {
                fresh = i;
                break;
            }
            if (hi - lo > most) most = hi - lo, at = i;
        }
        if (fresh < rs->count) {
            run_from_start(rs, fresh);
            continue;
        }
        if (!most) return;
        uint32_t task;
        if (take(&rs->ranges[at], 0, &task)) rs->fn(rs->user, task);
    }
}

OrtStatus *ort_parallel_ranges(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t tasks, size_t segments,
                               void *user) {
    if (segments > tasks) segments = tasks;
    if (segments > ORT_MAX_SEGMENTS) segments = ORT_MAX_SEGMENTS;
    if (tasks > UINT32_MAX) return ORT_FN(ort_api, KernelContext_ParallelFor)(ctx, fn, tasks, segments, user);
    if (segments <= 1) {
        for (size_t t = 0; t < tasks; t++) fn(user, t);
        return NULL;
    }
    ort_range ranges[ORT_MAX_SEGMENTS];
    for (size_t i = 0; i < segments; i++) {
        ranges[i].span = ((uint64_t)(tasks * (i + 1) / segments) << 32) | (uint64_t)(tasks * i / segments);
        ranges[i].started = 0;
    }
    ort_ranges rs = {fn, user, segments, ranges};
    return ORT_FN(ort_api, KernelContext_ParallelFor)(ctx, run_range, segments, segments, &rs);
}

/* Hand back to the page cache the whole pages of [data, data + bytes) when they belong to one
 * file-backed mapping (/proc/self/maps: an inode), as ORT's memory-mapped external initializers do:
 * MADV_DONTNEED drops them from this process; should anything read them again, they come back from
 * the file unchanged. Anywhere else (anonymous memory, where MADV_DONTNEED would zero them, or no
 * /proc) nothing is done. Returns the bytes handed back. */
size_t ort_release_file_pages(const void *data, size_t bytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = ((uintptr_t)data + page - 1) & ~(page - 1), hi = ((uintptr_t)data + bytes) & ~(page - 1);
    if (hi <= lo) return 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) return 0;
    char line[512];
    int file_backed = 0;
    while (fgets(line, sizeof line, maps)) {
        unsigned long start, end, offset, inode;
        char perms[8], dev[16];
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu", &start, &end, perms, &offset, dev, &inode) != 6) continue;
        if (start <= (uintptr_t)data && (uintptr_t)data + bytes <= end) {
            file_backed = inode != 0;
            break;
        }
    }
    fclose(maps);
    if (!file_backed || madvise((void *)lo, hi - lo, MADV_DONTNEED) != 0) return 0;
    return hi - lo;
}

/* Room for packed weights: from a huge page's size on, aligned to huge pages and marked for them
 * (transparent huge pages in "madvise" mode, a common default and this machine's, give anonymous
 * memory 4 KB pages otherwise; numpy marks its large arrays the same way, so the bench's bandwidth
 * probe reads huge pages too). Decode streams every weight once per token: a model of the kernel's
 * loop on the packed layout read 93% of a plain read's bandwidth (2 MB pages) from 4 KB pages and
 * 96% from 2 MB pages (benchmarks/stream_layouts.c; docs/performance-notes.md, "4-bit
 * linears"). The last huge page may be partly unused: at most 2 MB per linear, 38 MB
 * over InternVL3-2B's 56 linears of 2 MB or more. */
uint8_t *ort_alloc_weights(size_t bytes) {
    if (bytes < HUGE_PAGE) return (uint8_t *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    const size_t rounded = (bytes + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    uint8_t *p = (uint8_t *)aligned_alloc(HUGE_PAGE, rounded);
    if (p) madvise(p, rounded, MADV_HUGEPAGE);
    return p;
}

/* The pool of ort_room_take: blocks of recent calls, each free or taken by a call now running. */
#define ROOM_SLOTS 8
static struct {
    void *block;
    size_t bytes;
    int taken;
} g_room[ROOM_SLOTS];
static int g_room_lock; /* a spin lock: held for a few loads and stores, never across a call */

static void room_lock(void) {
    while (__atomic_exchange_n(&g_room_lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&g_room_lock, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
}
static void room_unlock(void) { __atomic_store_n(&g_room_lock, 0, __ATOMIC_RELEASE); }

void *ort_room_take(size_t bytes) {
    if (bytes == 0) bytes = 1;
    const size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes) return NULL;
    room_lock();
    int best = -1, spare = -1;
    for (int i = 0; i < ROOM_SLOTS; i++) {
        if (g_room[i].taken) continue;
        if (g_room[i].bytes >= rounded && (best < 0 || g_room[i].bytes < g_room[best].bytes)) best = i;
        if (g_room[i].bytes < rounded && (spare < 0 || g_room[i].bytes < g_room[spare].bytes)) spare = i;
    }
    if (best >= 0) {
        g_room[best].taken = 1;
        room_unlock();
        return g_room[best].block;
    }
    void *old = NULL;
    if (spare >= 0) { /* the smallest free block makes way for this one */
        old = g_room[spare].block;
        g_room[spare].block = NULL;
        g_room[spare].bytes = 0;
        g_room[spare].taken = 1;
    }
    room_unlock();
    free(old);
    void *block = aligned_alloc(64, rounded);
    if (spare >= 0) {
        room_lock();
        g_room[spare].block = block;
        g_room[spare].bytes = block ? rounded : 0;
        g_room[spare].taken = block != NULL;
        room_unlock();
    }
    return block; /* with every slot taken (calls running at once), a block of its own */
}

void ort_room_give(void *room) {
    if (!room) return;
    room_lock();
    for (int i = 0; i < ROOM_SLOTS; i++)
        if (g_room[i].block == room) {
            g_room[i].taken = 0;
            room_unlock();
            return;
        }
    room_unlock();
    free(room);
}

void ort_room_trim(size_t keep) {
    void *gone[ROOM_SLOTS];
    int count = 0;
    room_lock();
    for (int i = 0; i < ROOM_SLOTS; i++)
        if (!g_room[i].taken && g_room[i].bytes > keep) {
            gone[count++] = g_room[i].block;
            g_room[i].block = NULL;
            g_room[i].bytes = 0;
        }
    room_unlock();
    for (int i = 0; i < count; i++) free(gone[i]);
}

size_t ort_room_held(void) {
    size_t held = 0;
    room_lock();
    for (int i = 0; i < ROOM_SLOTS; i++) held += g_room[i].bytes;
    room_unlock();
    return held;
}
