// The task-gradient matrix J as the kernels see it: T×K raw pieces, no torch types.
//
// Both the CPU kernels and the CUDA launchers take this view, so neither needs a torch header
// (the .cu files must compile with nvcc alone). Row i of J is the concatenation of
// pieces[i*K + 0 .. i*K + K-1]; piece (i, k) holds offsets[k+1] - offsets[k] elements.
#pragma once

#include <cstdint>

namespace emtl {

// Storage dtype of every piece (and of the combine outputs). Accumulation is always float32.
enum class Storage : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct TaskTable {
  const void* const* pieces;  // [num_tasks * num_tensors], task-major
  const int64_t* offsets;     // [num_tensors + 1]: where tensor k starts in a row of J
  int64_t num_tasks;          // T
  int64_t num_tensors;        // K
  Storage storage;

  int64_t numel() const { return offsets[num_tensors]; }  // P
  int64_t size(int64_t k) const { return offsets[k + 1] - offsets[k]; }
  const void* piece(int64_t task, int64_t k) const { return pieces[task * num_tensors + k]; }
};

// Entries of the lower triangle of a T×T matrix, stored row-major: (i, j) with j <= i sits at
// i(i+1)/2 + j.
inline int64_t num_lower_pairs(int64_t num_tasks) { return num_tasks * (num_tasks + 1) / 2; }
inline int64_t lower_pair_index(int64_t i, int64_t j) { return i * (i + 1) / 2 + j; }

}  // namespace emtl
