/* The FMA roofline of one core: a loop of independent fused multiply-adds as wide as the
 * vectors of the native CPU kernels that run: 512-bit where it is compiled with -mavx512f (the
 * AVX-512 kernels), else 256-bit (AVX2 + FMA). 12 accumulators: more than the 2 FMA units x 4
 * cycles of latency that a core needs in flight, and few enough for the 16 vector registers the
 * "x" constraint allows. bench/roofline.py compiles this file with the system C compiler. */
#include <immintrin.h>

#if defined(__AVX512F__)
typedef __m512 fma_vector;
#define FMA_LANES 16
#define vector_fmadd _mm512_fmadd_ps
#define vector_add _mm512_add_ps
#define vector_set1 _mm512_set1_ps
#define vector_zero _mm512_setzero_ps
#define vector_store _mm512_storeu_ps
#else
typedef __m256 fma_vector;
#define FMA_LANES 8
#define vector_fmadd _mm256_fmadd_ps
#define vector_add _mm256_add_ps
#define vector_set1 _mm256_set1_ps
#define vector_zero _mm256_setzero_ps
#define vector_store _mm256_storeu_ps
#endif

#define FMA_ACCUMULATORS 12

/* Runs `iterations` rounds of FMA_ACCUMULATORS FMAs of FMA_LANES lanes; returns a sum of the
 * accumulators so that the work cannot be dropped. */
float fma_rounds(long long iterations) {
  const fma_vector x = vector_set1(0.999f), y = vector_set1(1e-3f);
  fma_vector a0 = vector_zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  fma_vector a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  for (long long k = 0; k < iterations; ++k) {
    a0 = vector_fmadd(a0, x, y);
    a1 = vector_fmadd(a1, x, y);
    a2 = vector_fmadd(a2, x, y);
    a3 = vector_fmadd(a3, x, y);
    a4 = vector_fmadd(a4, x, y);
    a5 = vector_fmadd(a5, x, y);
    a6 = vector_fmadd(a6, x, y);
    a7 = vector_fmadd(a7, x, y);
    a8 = vector_fmadd(a8, x, y);
    a9 = vector_fmadd(a9, x, y);
    a10 = vector_fmadd(a10, x, y);
    a11 = vector_fmadd(a11, x, y);
    /* Keeps the accumulators in registers and the loop as written. */
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
    __asm__ volatile("" : "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
  }
  fma_vector sum = vector_add(vector_add(vector_add(a0, a1), vector_add(a2, a3)),
                              vector_add(vector_add(a4, a5), vector_add(a6, a7)));
  sum = vector_add(sum, vector_add(vector_add(a8, a9), vector_add(a10, a11)));
  float lanes[FMA_LANES];
  vector_store(lanes, sum);
  return lanes[0];
}

/* Scalar FMAs in one round. */
int fma_per_round(void) { return FMA_ACCUMULATORS * FMA_LANES; }
