// The CPU kernels for AVX-512 (F, BW, VL, DQ) with FMA and F16C: 16 floats a vector. setup.py
// compiles this file alone with those flags and links it after every other object, the AVX2
// variant included, so that an inline function compiled here and elsewhere keeps its narrower
// copy; ops_cpu.cpp calls into it only on a CPU that has all of these extensions.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx512.cpp needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define EMTL_CPU_ISA avx512
#define EMTL_CPU_ISA_NAME "avx512"
// GCC 12's _mm512_undefined_* initialise a variable from itself, which -Wmaybe-uninitialized
// reports wherever at::vec widens 16-bit values, and -Wuninitialized where the Gram tiles fold
// their accumulators' halves (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "kernels_impl.h"
#pragma GCC diagnostic pop

namespace emtl::cpu {
const KernelTable& avx512_kernels() { return avx512::kernels(); }
}  // namespace emtl::cpu
