// The CPU kernels behind the native backend, compiled once per instruction set.
//
// kernels_impl.h (the files of kernels/, one idea each) holds one implementation on at::vec;
// kernels_default.cpp compiles it for the baseline of the target (SSE2 on x86-64, NEON on arm64),
// kernels_avx2.cpp for AVX2+FMA+F16C and kernels_avx512.cpp for AVX-512 F/BW/VL/DQ+FMA+F16C
// (setup.py gives each of these files alone its flags). ops_cpu.cpp picks a table for each pass,
// dtype and T from what the CPU supports and its per-pass table. Each function works on a range
// [begin, end) of positions in a row of J, so one parallel_for over fixed ranges covers every
// tensor at once.
#pragma once

#include <cstdint>

#include "../task_table.h"

namespace emtl::cpu {

// The tasks a combination reads: those whose weight is not zero, in task order.
struct ActiveTasks {
  const int64_t* tasks;
  const float* weights;
  int64_t count;
};

struct KernelTable {
  const char* isa;
  // Writes the lower triangle (lower_pair_index order) of J[:, begin:end] J[:, begin:end]ᵀ.
  void (*gram_range)(const TaskTable& grads, int64_t begin, int64_t end, double* lower);
  // Writes the T squared norms of J[:, begin:end].
  void (*sq_norms_range)(const TaskTable& grads, int64_t begin, int64_t end, double* sq_norms);
  // outs[k] (+)= Σ_a weights[a] · J[tasks[a]] over the positions [begin, end) (float32 sum,
  // one rounding to the storage dtype).
  void (*combine_range)(const TaskTable& grads, const ActiveTasks& active, void* const* outs,
                        bool accumulate, int64_t begin, int64_t end);
};

const KernelTable& default_kernels();
#if defined(EMTL_WITH_AVX2_KERNELS)
const KernelTable& avx2_kernels();
#endif
#if defined(EMTL_WITH_AVX512_KERNELS)
const KernelTable& avx512_kernels();
#endif

}  // namespace emtl::cpu
