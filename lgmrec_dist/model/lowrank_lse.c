/* Fused low-rank log-sum-exp, forward and backward (docs/model.md, "Speed rewrites", item 3).
 *
 *   lse_r = log sum_s exp(q_r . k_s),   q: b x a_dim (row-major),   kt = k transposed: a_dim x n
 *
 * The b x n logits are never stored: each row's logits are recomputed from the rank-a_dim factors one
 * TILE of columns at a time into a buffer that stays in L1, with an online maximum (forward) or the
 * saved lse (backward). exp is a Cephes-style polynomial that the compiler vectorises.
 *
 * Reduction orders are fixed and do not depend on the thread count: forward rows are independent;
 * the backward is split in tasks by the sizes alone (never in per-thread shares), each task writes its
 * own partial gradients, and the partials are summed in a fixed order. The same inputs therefore give
 * bit-identical results with any number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Denormal inputs and products are flushed to zero while the kernel runs (each thread's MXCSR, restored
 * after): the hyperedge assignments hold values below 1e-38 (a Gumbel-softmax at tau = 0.2), and one
 * denormal operand costs the CPU a microcode assist of ~100 cycles; flushed, a 1e-38 term changes no
 * sum of terms >= exp(0) = 1 that this kernel forms. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FLUSH_DENORMALS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FLUSH_DENORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_DENORMALS_BEGIN
#define FLUSH_DENORMALS_END
#endif

#define TILE 512
#define SEGMENT 8192

int64_t lse_segment(void) { return SEGMENT; }

/* exp(x) to about 1 ulp for x in [-87, 88] (clamped outside: exp(-87) = 1.6e-38 is no longer
 * relevant next to the row maximum's exp(0) = 1, and no denormal is ever produced). */
static inline float vexp(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* buf[s] = q_r . k_{s0+s} for s < t */
static inline void logits_tile(const float *qr, const float *kt, int64_t n, int64_t a_dim, int64_t t,
                               float *buf) {
    const float q0 = qr[0];
    #pragma omp simd
    for (int64_t s = 0; s < t; ++s) buf[s] = q0 * kt[s];
    for (int64_t a = 1; a < a_dim; ++a) {
        const float qa = qr[a];
        const float *ka = kt + a * n;
        #pragma omp simd
        for (int64_t s = 0; s < t; ++s) buf[s] += qa * ka[s];
    }
}

void lse_forward(const float *q, const float *kt, int64_t b, int64_t n, int64_t a_dim, float *lse,
                 int threads) {
    #pragma omp parallel num_threads(threads)
    {
    FLUSH_DENORMALS_BEGIN
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < b; ++r) {
        float buf[TILE];
        const float *qr = q + r * a_dim;
        float m = -INFINITY, sum = 0.0f;
        for (int64_t s0 = 0; s0 < n; s0 += TILE) {
            const int64_t t = n - s0 < TILE ? n - s0 : TILE;
            logits_tile(qr, kt + s0, n, a_dim, t, buf);
            float tile_max = -INFINITY;
            #pragma omp simd reduction(max : tile_max)
            for (int64_t s = 0; s < t; ++s) tile_max = buf[s] > tile_max ? buf[s] : tile_max;
            if (tile_max > m) { /* online rescaling: the running sum follows the running maximum */
                sum *= expf(m - tile_max);
                m = tile_max;
            }
            float tile_sum = 0.0f;
            #pragma omp simd reduction(+ : tile_sum)
            for (int64_t s = 0; s < t; ++s) tile_sum += vexp(buf[s] - m);
            sum += tile_sum;
        }
        lse[r] = m + logf(sum);
    }
    FLUSH_DENORMALS_END
    }
}

/* With p_rs = g_r exp(q_r . k_s - lse_r): gq_r = sum_s p_rs k_s, gk_s = sum_r p_rs q_r (gk written
 * transposed, a_dim x n). Tasks are (block of row_block rows) x (segment of SEGMENT columns): each writes
 * its own partial of gq (gq_part: segments x b x a_dim) and of gk (gk_part: row blocks x a_dim x n), and
 * the partials are then summed in segment / block order. */
void lse_backward(const float *q, const float *kt, const float *lse, const float *g, int64_t b, int64_t n,
                  int64_t a_dim, int64_t row_block, float *gq, float *gkt, float *gq_part, float *gk_part,
                  int threads) {
    const int64_t blocks = (b + row_block - 1) / row_block, segments = (n + SEGMENT - 1) / SEGMENT;
    #pragma omp parallel num_threads(threads)
    {
        FLUSH_DENORMALS_BEGIN
        float buf[TILE];
        #pragma omp for schedule(static) collapse(2)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            for (int64_t seg = 0; seg < segments; ++seg) {
                const int64_t r0 = blk * row_block, r1 = r0 + row_block < b ? r0 + row_block : b;
                const int64_t c0 = seg * SEGMENT, c1 = c0 + SEGMENT < n ? c0 + SEGMENT : n;
                float *pk = gk_part + blk * a_dim * n, *pq = gq_part + seg * b * a_dim;
                for (int64_t a = 0; a < a_dim; ++a) memset(pk + a * n + c0, 0, sizeof(float) * (c1 - c0));
                memset(pq + r0 * a_dim, 0, sizeof(float) * a_dim * (r1 - r0));
                /* column tiles outside, the block's rows inside: the tiles of k and of the partial stay
                 * in L1 while every row of the block passes over them */
                for (int64_t s0 = c0; s0 < c1; s0 += TILE) {
                    const int64_t t = c1 - s0 < TILE ? c1 - s0 : TILE;
                    for (int64_t r = r0; r < r1; ++r) {
                        const float gr = g[r], shift = lse[r];
                        if (gr == 0.0f) continue;
                        const float *qr = q + r * a_dim;
                        logits_tile(qr, kt + s0, n, a_dim, t, buf);
                        #pragma omp simd
                        for (int64_t s = 0; s < t; ++s) buf[s] = gr * vexp(buf[s] - shift);
                        for (int64_t a = 0; a < a_dim; ++a) {
                            const float *ka = kt + a * n + s0;
                            float *pa = pk + a * n + s0;
                            const float qa = qr[a];
                            float acc = 0.0f;
                            #pragma omp simd reduction(+ : acc)
                            for (int64_t s = 0; s < t; ++s) {
                                acc += buf[s] * ka[s];
                                pa[s] += qa * buf[s];
                            }
                            pq[r * a_dim + a] += acc;
                        }
                    }
                }
            }
        }
        /* (the implicit barrier above: every partial is complete) */
        #pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < b * a_dim; ++i) {
            float acc = gq_part[i];
            for (int64_t seg = 1; seg < segments; ++seg) acc += gq_part[seg * b * a_dim + i];
            gq[i] = acc;
        }
        #pragma omp for schedule(static)
        for (int64_t c0 = 0; c0 < a_dim * n; c0 += TILE) {
            const int64_t t = a_dim * n - c0 < TILE ? a_dim * n - c0 : TILE;
            memcpy(gkt + c0, gk_part + c0, sizeof(float) * t);
            for (int64_t blk = 1; blk < blocks; ++blk) {
                const float *pb = gk_part + blk * a_dim * n + c0;
                #pragma omp simd
                for (int64_t c = 0; c < t; ++c) gkt[c0 + c] += pb[c];
            }
        }
        FLUSH_DENORMALS_END
    }
}
