/* z = x w for a frozen table x (n x d, row-major float32) and a narrow weight w (d x a, a a few columns:
 * the hyperedge weights V_m, a = A) (docs/model.md, "Speed rewrites", item 7).
 *
 * The product reads the whole table once and does 2a flops per entry read, so it can run at the speed the
 * table streams from memory; MKL's GEMM, blocked for wide products, ran it at less than half of that (Baby,
 * image: 7,050 x 4,096 x 4: 9-10 ms against 4 ms here). w is held transposed and padded to a multiple of
 * GROUP columns by the caller (a_pad x d, zero rows), so each column is a contiguous row and the loops
 * below have constant trip counts whose accumulators stay in registers.
 *
 * Each entry of z is a dot product over d in one order fixed by d alone, whatever thread computes it: the
 * same inputs give bit-identical results with any thread count.
 */
#include <stdint.h>

#define GROUP 4     /* columns of w per pass */
#define ROWS 4      /* rows of x per pass */
#define LANES 16    /* partial sums per dot product: one AVX-512 register */

/* z[r0 + i, j0 + j] for ROWS rows and GROUP columns at once, each dot product in LANES partial sums
 * (ROWS x GROUP independent chains of vector FMAs; each load of w serves ROWS rows), added up in lane
 * order; rows past n are not read */
static inline void dot_block(const float *x, int64_t n, int64_t d, const float *w, int64_t a_pad, int64_t r0,
                             int64_t j0, float *z) {
    float acc[ROWS][GROUP][LANES] = {{{0}}};
    const float *xr[ROWS];
    for (int64_t i = 0; i < ROWS; ++i) xr[i] = x + (r0 + i < n ? r0 + i : r0) * d;
    int64_t c0 = 0;
    for (; c0 + LANES <= d; c0 += LANES) {
        for (int64_t i = 0; i < ROWS; ++i) {
            for (int64_t j = 0; j < GROUP; ++j) {
                #pragma omp simd
                for (int64_t l = 0; l < LANES; ++l) acc[i][j][l] += xr[i][c0 + l] * w[j * d + c0 + l];
            }
        }
    }
    for (int64_t i = 0; i < ROWS && r0 + i < n; ++i) {
        for (int64_t j = 0; j < GROUP; ++j) {
            float sum = 0.0f;
            for (int64_t l = 0; l < LANES; ++l) sum += acc[i][j][l];
            for (int64_t c = c0; c < d; ++c) sum += xr[i][c] * w[j * d + c];
            z[(r0 + i) * a_pad + j0 + j] = sum;
        }
    }
}

/* z[r, j] = x_r . wt_j */
void narrow_forward(const float *x, int64_t n, int64_t d, const float *wt, int64_t a_pad, float *z,
                    int threads) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * d > 65536)
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t j0 = 0; j0 < a_pad; j0 += GROUP) dot_block(x, n, d, wt + j0 * d, a_pad, b * ROWS, j0, z);
}
