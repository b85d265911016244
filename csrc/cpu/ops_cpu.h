#pragma once

namespace emtl::cpu {

// The instruction set of the CPU kernels chosen for this machine: "avx2" or "baseline".
const char* kernel_isa();

}  // namespace emtl::cpu
