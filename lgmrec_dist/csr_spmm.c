/* out = A x for a CSR matrix A (rows x cols, int64 indptr / indices, float32 values) and a dense row-major
 * float32 x (cols x d) (docs/model.md, "Speed rewrites", item 6).
 *
 * Each output row is written once, by one thread, from accumulators that live in registers: no zero fill
 * of the output beforehand and no copy afterwards (torch's CSR product on CPU does both, and at Baby size
 * the fill and the copy of a 26,495 x 64 result cost as much as the product). The row's terms are added
 * in the order of its stored entries whatever thread computes it, so the result is bit-identical with
 * any thread count and any schedule.
 */
#include <stdint.h>

#define PREFETCH 8 /* entries ahead: x's rows are read in the row's column order, not sequentially */

/* out_r[c0 : c0 + W] = sum_j values[j] x[indices[j], c0 : c0 + W] over the row's entries j, for a
 * constant W: the trip count is known, so the accumulators stay in registers */
#define ROW_TILE(W)                                                                                       \
    static inline void row_tile_##W(const int64_t *indices, const float *values, int64_t j0, int64_t j1, \
                                    const float *x, int64_t d, int64_t c0, float *out_r) {               \
        float acc[W] = {0};                                                                               \
        for (int64_t j = j0; j < j1; ++j) {                                                               \
            const float v = values[j];                                                                    \
            const float *xr = x + indices[j] * d + c0;                                                    \
            if (j + PREFETCH < j1) {                                                                      \
                const float *next = x + indices[j + PREFETCH] * d + c0;                                   \
                for (int64_t c = 0; c < W; c += 16) __builtin_prefetch(next + c);                         \
            }                                                                                             \
            _Pragma("omp simd") for (int64_t c = 0; c < W; ++c) acc[c] += v * xr[c];                      \
        }                                                                                                 \
        _Pragma("omp simd") for (int64_t c = 0; c < W; ++c) out_r[c0 + c] = acc[c];                       \
    }
ROW_TILE(64)
ROW_TILE(16)
ROW_TILE(4)
ROW_TILE(1)

void csr_spmm(const int64_t *indptr, const int64_t *indices, const float *values, int64_t rows,
              const float *x, int64_t d, float *out, int threads) {
    /* dynamic: rows differ in length (node degrees); which thread takes a row does not change its sum */
    #pragma omp parallel for schedule(dynamic, 256) num_threads(threads) if (rows * d > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t j0 = indptr[r], j1 = indptr[r + 1];
        float *out_r = out + r * d;
        /* columns in tiles of 64, then 16, 4 and 1 (a 4-column x, the hyperedge logits, is one pass) */
        int64_t c0 = 0;
        for (; c0 + 64 <= d; c0 += 64) row_tile_64(indices, values, j0, j1, x, d, c0, out_r);
        for (; c0 + 16 <= d; c0 += 16) row_tile_16(indices, values, j0, j1, x, d, c0, out_r);
        for (; c0 + 4 <= d; c0 += 4) row_tile_4(indices, values, j0, j1, x, d, c0, out_r);
        for (; c0 < d; ++c0) row_tile_1(indices, values, j0, j1, x, d, c0, out_r);
    }
}
