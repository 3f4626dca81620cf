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

#include "fastmath.h"

#define TILE 512
#define SEGMENT 8192

int64_t lse_segment(void) { return SEGMENT; }

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

/* logits_tile for two rows at once: each load of k serves both (the same operations per row) */
static inline void logits_tile2(const float *q0, const float *q1, const float *kt, int64_t n, int64_t a_dim,
                                int64_t t, float *buf0, float *buf1) {
    const float q00 = q0[0], q10 = q1[0];
    #pragma omp simd
    for (int64_t s = 0; s < t; ++s) {
        buf0[s] = q00 * kt[s];
        buf1[s] = q10 * kt[s];
    }
    for (int64_t a = 1; a < a_dim; ++a) {
        const float q0a = q0[a], q1a = q1[a];
        const float *ka = kt + a * n;
        #pragma omp simd
        for (int64_t s = 0; s < t; ++s) {
            buf0[s] += q0a * ka[s];
            buf1[s] += q1a * ka[s];
        }
    }
}

/* one tile of logits into the running (maximum, sum) of a row */
static inline void online_tile(const float *buf, int64_t t, float *m, float *sum) {
    float tile_max = -INFINITY;
    #pragma omp simd reduction(max : tile_max)
    for (int64_t s = 0; s < t; ++s) tile_max = buf[s] > tile_max ? buf[s] : tile_max;
    if (tile_max > *m) { /* online rescaling: the running sum follows the running maximum */
        *sum *= expf(*m - tile_max);
        *m = tile_max;
    }
    const float shift = *m;
    float tile_sum = 0.0f;
    #pragma omp simd reduction(+ : tile_sum)
    for (int64_t s = 0; s < t; ++s) tile_sum += vexp(buf[s] - shift);
    *sum += tile_sum;
}

/* rows in pairs (logits_tile2: each load of k serves both); a row's result is the same either way */
void lse_forward(const float *q, const float *kt, int64_t b, int64_t n, int64_t a_dim, float *lse,
                 int threads) {
    const int64_t pairs = (b + 1) / 2;
    #pragma omp parallel num_threads(threads)
    {
    FLUSH_DENORMALS_BEGIN
    #pragma omp for schedule(static)
    for (int64_t pr = 0; pr < pairs; ++pr) {
        float buf[TILE], buf1[TILE];
        const int64_t r = 2 * pr;
        const float *qr = q + r * a_dim;
        float m = -INFINITY, sum = 0.0f, m1 = -INFINITY, sum1 = 0.0f;
        for (int64_t s0 = 0; s0 < n; s0 += TILE) {
            const int64_t t = n - s0 < TILE ? n - s0 : TILE;
            if (r + 1 < b) {
                logits_tile2(qr, qr + a_dim, kt + s0, n, a_dim, t, buf, buf1);
                online_tile(buf1, t, &m1, &sum1);
            } else {
                logits_tile(qr, kt + s0, n, a_dim, t, buf);
            }
            online_tile(buf, t, &m, &sum);
        }
        lse[r] = m + logf(sum);
        if (r + 1 < b) lse[r + 1] = m1 + logf(sum1);
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
        float buf[TILE], buf1[TILE];
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
                        if (r + 1 < r1 && g[r + 1] != 0.0f) {
                            /* rows r and r + 1 together: each load of k and each load and store of the
                             * partial gk serve both; the partial still adds row r's term, then row r + 1's */
                            const float g1 = g[r + 1], shift1 = lse[r + 1];
                            const float *q0r = q + r * a_dim, *q1r = q0r + a_dim;
                            logits_tile2(q0r, q1r, kt + s0, n, a_dim, t, buf, buf1);
                            #pragma omp simd
                            for (int64_t s = 0; s < t; ++s) {
                                buf[s] = gr * vexp(buf[s] - shift);
                                buf1[s] = g1 * vexp(buf1[s] - shift1);
                            }
                            for (int64_t a = 0; a < a_dim; ++a) {
                                const float *ka = kt + a * n + s0;
                                float *pa = pk + a * n + s0;
                                const float q0a = q0r[a], q1a = q1r[a];
                                float acc0 = 0.0f, acc1 = 0.0f;
                                #pragma omp simd reduction(+ : acc0, acc1)
                                for (int64_t s = 0; s < t; ++s) {
                                    acc0 += buf[s] * ka[s];
                                    acc1 += buf1[s] * ka[s];
                                    const float v = pa[s] + q0a * buf[s];
                                    pa[s] = v + q1a * buf1[s];
                                }
                                pq[r * a_dim + a] += acc0;
                                pq[(r + 1) * a_dim + a] += acc1;
                            }
                            ++r;
                            continue;
                        }
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
