// The CPU kernels for the target's baseline instruction set: the fallback wherever AVX2 is missing.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define EMTL_CPU_ISA baseline
#define EMTL_CPU_ISA_NAME "baseline"
#include "kernels_impl.h"

namespace emtl::cpu {
const KernelTable& default_kernels() { return baseline::kernels(); }
}  // namespace emtl::cpu
