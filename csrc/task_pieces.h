// Checked views of the ops' tensor arguments, shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "task_table.h"

namespace emtl {

// The `pieces` and `num_tasks` arguments of every op: T×K tensors, task-major, checked to hold
// one supported dtype on one device, contiguous, piece (i, k) as large as piece (0, k).
class TaskPieces {
 public:
  TaskPieces(at::TensorList pieces, int64_t num_tasks, const char* op);

  TaskTable table() const {
    return TaskTable{pointers_.data(), offsets_.data(), num_tasks_, num_tensors_, storage_};
  }
  int64_t num_tasks() const { return num_tasks_; }
  int64_t num_tensors() const { return num_tensors_; }
  int64_t numel() const { return offsets_.back(); }
  at::ScalarType dtype() const { return dtype_; }
  const at::Device& device() const { return device_; }
  const at::TensorOptions options() const { return at::TensorOptions().device(device_); }

 private:
  int64_t num_tasks_;
  int64_t num_tensors_;
  at::ScalarType dtype_;
  Storage storage_;
  at::Device device_;
  std::vector<int64_t> offsets_;
  std::vector<const void*> pointers_;
};

// Checks `weights` ([T] float32) and `outs` (K tensors like the pieces' column k) of
// weighted_combine_; returns the outputs' data pointers.
std::vector<void*> checked_combine_outputs(const TaskPieces& grads, const at::Tensor& weights,
                                           at::TensorList outs, const char* op);

}  // namespace emtl
