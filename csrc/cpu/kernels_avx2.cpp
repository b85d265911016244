// The CPU kernels for AVX2 with FMA and F16C. setup.py compiles this file alone with
// -mavx2 -mfma -mf16c and links it after every other object, so that an inline function
// compiled here and elsewhere keeps its baseline copy; ops_cpu.cpp calls into it only on a CPU
// that has all three extensions.
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp needs -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define EMTL_CPU_ISA avx2
#define EMTL_CPU_ISA_NAME "avx2"
#include "kernels_impl.h"

namespace emtl::cpu {
const KernelTable& avx2_kernels() { return avx2::kernels(); }
}  // namespace emtl::cpu
