/* Gumbel-softmax and dropout of the hyperedge logits, forward and backward (docs/model.md §1.6, items 2-3):
 *
 *   p = softmax((z + noise) / tau) over each row's a columns,   h = p * keep / keep_rate
 *
 * for z (n x a, row-major float32), optional Gumbel noise (n x a) and optional keep mask (n x a bytes).
 * In torch these are ~8 passes over the n x a tensors forward and ~5 backward, and a softmax over 4
 * columns is a poor fit for its row kernels; here each is one pass, in blocks of BLOCK rows held in L1.
 * Subnormals are flushed (fastmath.h): an assignment below 1.2e-38 is written as 0, so the products that
 * read h and its gradients downstream never meet one. Rows are independent: bit-identical results with any
 * thread count.
 */
#include <math.h>
#include <stdint.h>

#include "fastmath.h"

#define BLOCK 256 /* rows per block: its temporaries (BLOCK x a floats) stay in L1 for a <= 8 */

void assign_forward(const float *z, const float *noise, const uint8_t *keep, int64_t n, int64_t a, float tau,
                    float keep_rate, float *p, float *h, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel num_threads(threads) if (n * a > 32768)
    {
        FLUSH_DENORMALS_BEGIN
        float shift[BLOCK * a];
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t r0 = blk * BLOCK, rows = n - r0 < BLOCK ? n - r0 : BLOCK, len = rows * a;
            const float *zb = z + r0 * a;
            float *pb = p + r0 * a, *hb = h + r0 * a;
            /* t = (z + noise) / tau into p; each row's maximum, spread over its columns */
            if (noise) {
                const float *nb = noise + r0 * a;
                #pragma omp simd
                for (int64_t i = 0; i < len; ++i) pb[i] = (zb[i] + nb[i]) / tau;
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < len; ++i) pb[i] = zb[i] / tau;
            }
            for (int64_t r = 0; r < rows; ++r) {
                float m = pb[r * a];
                for (int64_t c = 1; c < a; ++c) m = pb[r * a + c] > m ? pb[r * a + c] : m;
                for (int64_t c = 0; c < a; ++c) shift[r * a + c] = m;
            }
            /* below -87 exp is subnormal or 0 (vexp would clamp it to exp(-87)): written as 0 */
            #pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
                const float x = pb[i] - shift[i];
                pb[i] = x < -87.0f ? 0.0f : vexp(x);
            }
            /* 1 / row sum, spread; p = e / sum; h = p * keep / keep_rate */
            for (int64_t r = 0; r < rows; ++r) {
                float s = 0.0f;
                for (int64_t c = 0; c < a; ++c) s += pb[r * a + c];
                for (int64_t c = 0; c < a; ++c) shift[r * a + c] = s;
            }
            #pragma omp simd
            for (int64_t i = 0; i < len; ++i) pb[i] = pb[i] / shift[i];
            if (keep) {
                const uint8_t *kb = keep + r0 * a;
                #pragma omp simd
                for (int64_t i = 0; i < len; ++i) hb[i] = kb[i] ? pb[i] / keep_rate : 0.0f;
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < len; ++i) hb[i] = pb[i];
            }
        }
        FLUSH_DENORMALS_END
    }
}

/* gz = p * (gp - sum_c p gp) / tau with gp = gh * keep / keep_rate */
void assign_backward(const float *p, const uint8_t *keep, const float *gh, int64_t n, int64_t a, float tau,
                     float keep_rate, float *gz, int threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel num_threads(threads) if (n * a > 32768)
    {
        FLUSH_DENORMALS_BEGIN
        float dot[BLOCK * a];
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t r0 = blk * BLOCK, rows = n - r0 < BLOCK ? n - r0 : BLOCK, len = rows * a;
            const float *pb = p + r0 * a, *gb = gh + r0 * a;
            float *ob = gz + r0 * a;
            if (keep) {
                const uint8_t *kb = keep + r0 * a;
                #pragma omp simd
                for (int64_t i = 0; i < len; ++i) ob[i] = kb[i] ? gb[i] / keep_rate : 0.0f;
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < len; ++i) ob[i] = gb[i];
            }
            for (int64_t r = 0; r < rows; ++r) {
                float s = 0.0f;
                for (int64_t c = 0; c < a; ++c) s += pb[r * a + c] * ob[r * a + c];
                for (int64_t c = 0; c < a; ++c) dot[r * a + c] = s;
            }
            #pragma omp simd
            for (int64_t i = 0; i < len; ++i) ob[i] = pb[i] * (ob[i] - dot[i]) / tau;
        }
        FLUSH_DENORMALS_END
    }
}
