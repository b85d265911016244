// The CPU kernels on at::vec, included once per instruction-set variant (see kernels.h).
//
// The including file defines EMTL_CPU_ISA, the namespace of its variant, and at::vec's
// CPU_CAPABILITY macros; at::vec puts its types in an inline namespace named after
// CPU_CAPABILITY, so the variants' symbols never mix. Nothing here has static initialisers:
// the AVX2 variant must not run a single instruction before the dispatcher has chosen it.
//
// Arithmetic is IEEE float32 (no fast-math anywhere): an inf or NaN in a row reaches its Gram
// diagonal entry, which is how the step detects non-finite gradients.
#ifndef EMTL_CPU_ISA
#error "define EMTL_CPU_ISA, the namespace of the variant, before including kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"

// One idea a file, in the order each needs the ones before it.
#include "kernels/common.h"
#include "kernels/gram_products.h"
#include "kernels/gram_tiles.h"
#include "kernels/gram_sweeps.h"
#include "kernels/sq_norms.h"
#include "kernels/combine.h"

namespace emtl::cpu::EMTL_CPU_ISA {

const KernelTable& kernels() {
  static constexpr KernelTable table{EMTL_CPU_ISA_NAME, gram_range, sq_norms_range, combine_range};
  return table;
}

}  // namespace emtl::cpu::EMTL_CPU_ISA
