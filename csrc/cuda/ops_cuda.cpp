// The CUDA implementations of the ops: checks, workspace, the current stream, and the launchers
// of gram.cu and combine.cu. Built only where torch has CUDA (setup.py); nothing here reads a
// device value on the host.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../task_pieces.h"
#include "launch.h"

namespace emtl::cuda {
namespace {

TaskPieces checked_pieces(at::TensorList pieces, int64_t num_tasks, const char* op) {
  TaskPieces grads(pieces, num_tasks, op);
  TORCH_CHECK(grads.device().is_cuda(), op, ": the task gradients are on ", grads.device(),
              ", the CUDA kernel needs them on a CUDA device");
  TORCH_CHECK(num_tasks <= max_tasks(), op, ": the CUDA kernels take at most ", max_tasks(), " tasks, got ",
              num_tasks, "; use backend=\"reference\" for more");
  return grads;
}

// A reduction over J into a new float32 tensor of `shape`, with its workspace.
at::Tensor reduce(at::TensorList pieces, int64_t num_tasks, const char* op, at::IntArrayRef shape,
                  int64_t (*workspace_floats)(const TaskTable&),
                  cudaError_t (*launch)(const TaskTable&, float*, float*, cudaStream_t)) {
  const TaskPieces grads = checked_pieces(pieces, num_tasks, op);
  const c10::cuda::CUDAGuard guard(grads.device());
  const TaskTable table = grads.table();
  const auto options = grads.options().dtype(at::kFloat);
  at::Tensor workspace = at::empty({workspace_floats(table)}, options);
  at::Tensor result = at::empty(shape, options);
  C10_CUDA_CHECK(launch(table, workspace.data_ptr<float>(), result.data_ptr<float>(),
                        c10::cuda::getCurrentCUDAStream()));
  return result;
}

at::Tensor task_gram(at::TensorList pieces, int64_t num_tasks) {
  return reduce(pieces, num_tasks, "emtl_kernels::task_gram", {num_tasks, num_tasks}, gram_workspace_floats,
                launch_gram);
}

at::Tensor task_sq_norms(at::TensorList pieces, int64_t num_tasks) {
  return reduce(pieces, num_tasks, "emtl_kernels::task_sq_norms", {num_tasks}, sq_norms_workspace_floats,
                launch_sq_norms);
}

void weighted_combine_(at::TensorList pieces, int64_t num_tasks, const at::Tensor& weights, at::TensorList outs,
                       bool accumulate) {
  const char* op = "emtl_kernels::weighted_combine_";
  const TaskPieces grads = checked_pieces(pieces, num_tasks, op);
  const std::vector<void*> out_pointers = checked_combine_outputs(grads, weights, outs, op);
  const c10::cuda::CUDAGuard guard(grads.device());
  C10_CUDA_CHECK(launch_combine(grads.table(), weights.data_ptr<float>(), out_pointers.data(), accumulate,
                                c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(emtl_kernels, CUDA, m) {
  m.impl("task_gram", &task_gram);
  m.impl("task_sq_norms", &task_sq_norms);
  m.impl("weighted_combine_", &weighted_combine_);
}

}  // namespace emtl::cuda
