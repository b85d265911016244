/* The FMA roofline of one core: a loop of independent 256-bit fused multiply-adds, the
 * instructions of the native CPU kernels (AVX2 + FMA). 12 accumulators: more than the 2 FMA
 * units x 4 cycles of latency that a core needs in flight, and few enough for the 16 vector
 * registers. bench/roofline.py compiles this file with the system C compiler. */
#include <immintrin.h>

#define FMA_ACCUMULATORS 12
#define FMA_LANES 8

/* Runs `iterations` rounds of FMA_ACCUMULATORS FMAs of FMA_LANES lanes; returns a sum of the
 * accumulators so that the work cannot be dropped. */
float fma_rounds(long long iterations) {
  const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-3f);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256 a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  for (long long k = 0; k < iterations; ++k) {
    a0 = _mm256_fmadd_ps(a0, x, y);
    a1 = _mm256_fmadd_ps(a1, x, y);
    a2 = _mm256_fmadd_ps(a2, x, y);
    a3 = _mm256_fmadd_ps(a3, x, y);
    a4 = _mm256_fmadd_ps(a4, x, y);
    a5 = _mm256_fmadd_ps(a5, x, y);
    a6 = _mm256_fmadd_ps(a6, x, y);
    a7 = _mm256_fmadd_ps(a7, x, y);
    a8 = _mm256_fmadd_ps(a8, x, y);
    a9 = _mm256_fmadd_ps(a9, x, y);
    a10 = _mm256_fmadd_ps(a10, x, y);
    a11 = _mm256_fmadd_ps(a11, x, y);
    /* Keeps the accumulators in registers and the loop as written. */
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
    __asm__ volatile("" : "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
  }
  __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  sum = _mm256_add_ps(sum, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  float lanes[FMA_LANES];
  _mm256_storeu_ps(lanes, sum);
  return lanes[0];
}

/* Scalar FMAs in one round. */
int fma_per_round(void) { return FMA_ACCUMULATORS * FMA_LANES; }
