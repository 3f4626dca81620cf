/* Adam on the given rows of an embedding table and its two moment tables, in one pass over each row
 * (docs/sampled.md, "Embedding tables"): the row's gradient, moments and values are read and written once,
 * where the tensor form gathers, updates and scatters each of them with separate temporaries.
 *
 * The rows are distinct (a step's blocks' input nodes), so threads never write the same row. Each entry's
 * update is the same arithmetic whatever thread computes it: the result does not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>

/* torch.optim.Adam's arithmetic, operation for operation in float32 (m by lerp, v by mul then addcmul, the
 * denominator sqrt(v) / sqrt(1 - beta2^t) + eps, p + (-step_size) * (m / denominator)), without fused
 * multiply-adds, so that a row's update rounds as dense Adam's does */
__attribute__((optimize("fp-contract=off")))
void row_adam(float *table, float *exp_avg, float *exp_avg_sq, const int64_t *rows, const float *grad, int64_t n,
              int64_t d, float w1, float beta2, float w2, float step_size, float bias2_sqrt, float eps, int threads) {
    /* w1 = 1 - beta1 and w2 = 1 - beta2 come rounded from their double values, as torch's scalars do */
    const float neg_step = -step_size;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * d > 65536)
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r = rows[i] * d;
        float *p = table + r, *m = exp_avg + r, *v = exp_avg_sq + r;
        const float *g = grad + i * d;
        #pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
            const float mc = m[c] + w1 * (g[c] - m[c]);
            const float vc = v[c] * beta2 + w2 * g[c] * g[c];
            m[c] = mc;
            v[c] = vc;
            p[c] = p[c] + neg_step * (mc / (sqrtf(vc) / bias2_sqrt + eps));
        }
    }
}
