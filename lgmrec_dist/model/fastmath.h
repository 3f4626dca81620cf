/* Shared by the C kernels of the model: subnormal flushing and a vectorisable exp. */
#ifndef LGMREC_FASTMATH_H
#define LGMREC_FASTMATH_H

#include <stdint.h>
#include <string.h>

/* Denormal inputs and products are flushed to zero while a kernel runs (each thread's MXCSR, restored
 * after, inside the parallel region): a Gumbel-softmax at tau = 0.2 gives hyperedge assignments below
 * 1e-38, and one denormal operand costs the CPU a microcode assist of ~100 cycles; flushed, a 1e-38 term
 * changes no sum it is added to unless that sum is itself below 1e-38. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FLUSH_DENORMALS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FLUSH_DENORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_DENORMALS_BEGIN
#define FLUSH_DENORMALS_END
#endif

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

#endif
