#pragma once

#include <cstdint>

#include "../task_table.h"

namespace emtl::cpu {

// The passes over J, each of which may run on its own kernel variant.
enum class Pass { kGram, kSqNorms, kCombine };

// The widest kernel variant any pass may run on here ("avx512", "avx2" or "baseline"): the CPU's
// widest, capped by EMTL_CPU_ISA.
const char* widest_kernel_isa();

// The variant a pass runs on for a J of this dtype and T.
const char* pass_kernel_isa(Pass pass, Storage storage, int64_t num_tasks);

}  // namespace emtl::cpu
