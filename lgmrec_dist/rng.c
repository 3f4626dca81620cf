/* keyed_uniform of lgmrec_dist/rng.py in one pass (the same bits as its torch form, which runs ~20
 * elementwise passes over int64 tensors): out[r, c] from the lowbias32 hash of (key, ids[r] * width + c). */
#include <stdint.h>

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

void keyed_uniform(uint32_t key, const int64_t *ids, int64_t n, int64_t width, float *out, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * width > 32768)
    for (int64_t r = 0; r < n; ++r) {
        for (int64_t c = 0; c < width; ++c) {
            const int64_t counter = ids[r] * width + c;
            const uint32_t h = mix32((uint32_t)(counter & 0xFFFFFFFF) ^ key);
            const uint32_t u = mix32(h ^ (uint32_t)(counter >> 32) ^ 0x5BD1E995u);
            out[r * width + c] = ((float)(u >> 9) + 0.5f) * (1.0f / (1 << 23));
        }
    }
}
