/* See rms_norm.h. Plain C that GCC vectorises for the baseline x86-64 (or any) target: the norm is a
 * few hundred nanoseconds per row, nothing for an instruction-set variant to win. */
#include "rms_norm.h"

#include <math.h>

#define LANES 16 /* partial sums of squares, one per lane of the widest vector */

static void one_row(const float *x, const float *skip, const float *gamma, float epsilon, int64_t k, float *sum,
                    float *normed) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float v = skip ? x[i + j] + skip[i + j] : x[i + j];
            normed[i + j] = v;
            acc[j] += v * v;
        }
    for (; i < k; i++) {
        const float v = skip ? x[i] + skip[i] : x[i];
        normed[i] = v;
        acc[i % LANES] += v * v;
    }
    float total = 0.0f;
    for (int j = 0; j < LANES; j++) total += acc[j];
    const float root = sqrtf(total / (float)k + epsilon);
    if (sum)
        for (i = 0; i < k; i++) sum[i] = normed[i];
    for (i = 0; i < k; i++) normed[i] = normed[i] / root * gamma[i];
}

void norm_rows(const norm_job *job, int64_t first, int64_t count) {
    const int64_t k = job->k;
    for (int64_t r = first; r < first + count && r < job->m; r++)
        one_row(job->x + r * k, job->skip ? job->skip + r * k : 0, job->gamma, job->epsilon, k,
                job->sum ? job->sum + r * k : 0, job->normed + r * k);
}

void norm_task(void *job, size_t task) {
    const norm_job *j = (const norm_job *)job;
    norm_rows(j, (int64_t)task * j->rows_per_task, j->rows_per_task);
}
