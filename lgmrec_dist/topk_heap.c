/* Running top-k of score tiles for the full-ranking evaluation (docs/model.md §2, "Evaluation protocol";
 * lgmrec_dist/evaluation.py, streaming_topk).
 *
 * Each row keeps its k best (score, item) pairs as a min-heap whose root is the row's worst kept pair. A
 * tile is one pass over its scores: a block of 16 scores is looked at only when one of them beats the root,
 * which after the first few thousand items is rare, so the pass costs about a read of the tile (still in
 * cache from the matmul that wrote it) where a tensor top-k per tile sorts, gathers and merges.
 *
 * Order: a higher score is better; of equal scores the lower item id is better. Tiles arrive in increasing
 * item order, so a later item never displaces an equal score already kept. Rows are independent, so the
 * result does not depend on the thread count.
 */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline int worse(float sa, int64_t ia, float sb, int64_t ib) {
    return sa < sb || (sa == sb && ia > ib);
}

static void sift_down(float *hs, int64_t *hi, int64_t len, int64_t pos) {
    const float s = hs[pos];
    const int64_t id = hi[pos];
    for (;;) {
        int64_t child = 2 * pos + 1;
        if (child >= len)
            break;
        if (child + 1 < len && worse(hs[child + 1], hi[child + 1], hs[child], hi[child]))
            ++child;
        if (!worse(hs[child], hi[child], s, id))
            break;
        hs[pos] = hs[child];
        hi[pos] = hi[child];
        pos = child;
    }
    hs[pos] = s;
    hi[pos] = id;
}

static void push(float *hs, int64_t *hi, int64_t len, float s, int64_t id) {
    int64_t pos = len;
    while (pos > 0) {
        const int64_t parent = (pos - 1) / 2;
        if (!worse(s, id, hs[parent], hi[parent]))
            break;
        hs[pos] = hs[parent];
        hi[pos] = hi[parent];
        pos = parent;
    }
    hs[pos] = s;
    hi[pos] = id;
}

/* The root (the row's worst kept pair) gives way to (s, id); returns the new root's score */
static inline float replace_root(float *hs, int64_t *hi, int64_t k, float s, int64_t id) {
    hs[0] = s;
    hi[0] = id;
    sift_down(hs, hi, k, 0);
    return hs[0];
}

/* Merge the tile scores[r * ld + j] (n rows, w columns; column j is item col0 + j) into each row's heap
 * (heap_s, heap_i: n x k; heap_len: how many entries each row holds so far). */
void topk_update(const float *scores, int64_t n, int64_t w, int64_t ld, int64_t col0, float *heap_s,
                 int64_t *heap_i, int64_t *heap_len, int64_t k, int threads) {
    if (k <= 0)
        return;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * w > 65536)
    for (int64_t r = 0; r < n; ++r) {
        const float *row = scores + r * ld;
        float *hs = heap_s + r * k;
        int64_t *hi = heap_i + r * k;
        int64_t len = heap_len[r], j = 0;
        for (; j < w && len < k; ++j)
            push(hs, hi, len++, row[j], col0 + j);
        heap_len[r] = len;
        if (j == w)
            continue;
        float root = hs[0];
        for (; j + 16 <= w; j += 16) {
#if defined(__AVX512F__)
            if (!_mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), _mm512_set1_ps(root), _CMP_GT_OQ))
                continue;
#else
            int any = 0;
            for (int t = 0; t < 16; ++t)
                any |= row[j + t] > root;
            if (!any)
                continue;
#endif
            for (int t = 0; t < 16; ++t)
                if (row[j + t] > root)
                    root = replace_root(hs, hi, k, row[j + t], col0 + j + t);
        }
        for (; j < w; ++j)
            if (row[j] > root)
                root = replace_root(hs, hi, k, row[j], col0 + j);
    }
}

/* Sort each row's heap in place, best first (heap sort: the root, the worst, goes to the end each time). */
void topk_finish(float *heap_s, int64_t *heap_i, const int64_t *heap_len, int64_t n, int64_t k, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * k > 65536)
    for (int64_t r = 0; r < n; ++r) {
        float *hs = heap_s + r * k;
        int64_t *hi = heap_i + r * k;
        for (int64_t end = heap_len[r] - 1; end > 0; --end) {
            const float s = hs[0];
            const int64_t id = hi[0];
            hs[0] = hs[end];
            hi[0] = hi[end];
            hs[end] = s;
            hi[end] = id;
            sift_down(hs, hi, end, 0);
        }
    }
}
