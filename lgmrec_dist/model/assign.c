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
#include <stddef.h>
#include <stdint.h>

#include "fastmath.h"

#define BLOCK 256 /* rows per block: its temporaries (BLOCK x a floats) stay in L1 for a <= 8 */

struct args {
    const float *z, *noise, *p, *gh; /* inputs (those the direction reads; noise may be NULL) */
    const uint8_t *keep;             /* keep mask, or NULL for no dropout */
    float *out_p, *out;              /* forward: p and h; backward: out = gz */
    int64_t a;
    float tau, keep_rate;
};

/* out = in * keep / keep_rate (dropout and its gradient); out = in without a mask */
static inline void apply_keep(const float *in, const uint8_t *keep, int64_t len, float keep_rate, float *out) {
    if (keep) {
        #pragma omp simd
        for (int64_t i = 0; i < len; ++i) out[i] = keep[i] ? in[i] / keep_rate : 0.0f;
    } else {
        #pragma omp simd
        for (int64_t i = 0; i < len; ++i) out[i] = in[i];
    }
}

/* fn on every block of rows (r0, rows), with a scratch of BLOCK x a floats, subnormals flushed */
static void over_blocks(void (*fn)(const struct args *, int64_t, int64_t, float *), const struct args *args,
                        int64_t n, int threads) {
    const int64_t a = args->a, blocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel num_threads(threads) if (n * a > 32768)
    {
        FLUSH_DENORMALS_BEGIN
        float scratch[BLOCK * a];
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk)
            fn(args, blk * BLOCK, n - blk * BLOCK < BLOCK ? n - blk * BLOCK : BLOCK, scratch);
        FLUSH_DENORMALS_END
    }
}

/* p = softmax((z + noise) / tau), h = p * keep / keep_rate on rows r0 .. r0 + rows - 1 */
static void forward_block(const struct args *g, int64_t r0, int64_t rows, float *shift) {
    const int64_t a = g->a, len = rows * a;
    const float *zb = g->z + r0 * a, tau = g->tau, keep_rate = g->keep_rate;
    float *pb = g->out_p + r0 * a, *hb = g->out + r0 * a;
    /* t = (z + noise) / tau into p; each row's maximum, spread over its columns */
    if (g->noise) {
        const float *nb = g->noise + r0 * a;
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
    /* each row's sum, spread; p = e / sum; h = p * keep / keep_rate */
    for (int64_t r = 0; r < rows; ++r) {
        float s = 0.0f;
        for (int64_t c = 0; c < a; ++c) s += pb[r * a + c];
        for (int64_t c = 0; c < a; ++c) shift[r * a + c] = s;
    }
    #pragma omp simd
    for (int64_t i = 0; i < len; ++i) pb[i] = pb[i] / shift[i];
    apply_keep(pb, g->keep ? g->keep + r0 * a : NULL, len, keep_rate, hb);
}

/* gz = p * (gp - sum_c p gp) / tau with gp = gh * keep / keep_rate on rows r0 .. r0 + rows - 1 */
static void backward_block(const struct args *g, int64_t r0, int64_t rows, float *dot) {
    const int64_t a = g->a, len = rows * a;
    const float *pb = g->p + r0 * a, *gb = g->gh + r0 * a, tau = g->tau, keep_rate = g->keep_rate;
    float *ob = g->out + r0 * a;
    apply_keep(gb, g->keep ? g->keep + r0 * a : NULL, len, keep_rate, ob);
    for (int64_t r = 0; r < rows; ++r) {
        float s = 0.0f;
        for (int64_t c = 0; c < a; ++c) s += pb[r * a + c] * ob[r * a + c];
        for (int64_t c = 0; c < a; ++c) dot[r * a + c] = s;
    }
    #pragma omp simd
    for (int64_t i = 0; i < len; ++i) ob[i] = pb[i] * (ob[i] - dot[i]) / tau;
}

void assign_forward(const float *z, const float *noise, const uint8_t *keep, int64_t n, int64_t a, float tau,
                    float keep_rate, float *p, float *h, int threads) {
    const struct args args = {.z = z, .noise = noise, .keep = keep, .out_p = p, .out = h, .a = a, .tau = tau,
                              .keep_rate = keep_rate};
    over_blocks(forward_block, &args, n, threads);
}

void assign_backward(const float *p, const uint8_t *keep, const float *gh, int64_t n, int64_t a, float tau,
                     float keep_rate, float *gz, int threads) {
    const struct args args = {.p = p, .gh = gh, .keep = keep, .out = gz, .a = a, .tau = tau,
                              .keep_rate = keep_rate};
    over_blocks(backward_block, &args, n, threads);
}
