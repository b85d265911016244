#include "task_pieces.h"

#include <c10/util/Exception.h>

namespace emtl {
namespace {

Storage storage_of(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat:
      return Storage::kFloat32;
    case at::kBFloat16:
      return Storage::kBFloat16;
    case at::kHalf:
      return Storage::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": the task gradients have dtype ", dtype,
                       "; supported: float32, bfloat16, float16");
  }
}

}  // namespace

TaskPieces::TaskPieces(at::TensorList pieces, int64_t num_tasks, const char* op)
    : num_tasks_(num_tasks), device_(at::kCPU) {
  TORCH_CHECK(num_tasks >= 1, op, ": num_tasks must be at least 1, got ", num_tasks);
  TORCH_CHECK(!pieces.empty() && pieces.size() % num_tasks == 0, op, ": got ", pieces.size(),
              " pieces for ", num_tasks, " tasks; expected num_tasks * K of them (K >= 1 shared tensors), task-major");
  num_tensors_ = static_cast<int64_t>(pieces.size()) / num_tasks;
  TORCH_CHECK(pieces[0].defined(), op, ": piece 0 is an undefined tensor");
  dtype_ = pieces[0].scalar_type();
  storage_ = storage_of(dtype_, op);
  device_ = pieces[0].device();

  offsets_.reserve(num_tensors_ + 1);
  offsets_.push_back(0);
  for (int64_t k = 0; k < num_tensors_; ++k) offsets_.push_back(offsets_.back() + pieces[k].numel());

  pointers_.reserve(pieces.size());
  for (int64_t index = 0; index < static_cast<int64_t>(pieces.size()); ++index) {
    const at::Tensor& piece = pieces[index];
    const int64_t task = index / num_tensors_, k = index % num_tensors_;
    TORCH_CHECK(piece.defined(), op, ": piece ", index, " (task ", task, ", tensor ", k, ") is undefined");
    TORCH_CHECK_TYPE(piece.scalar_type() == dtype_, op, ": piece ", index, " (task ", task, ", tensor ", k,
                     ") has dtype ", piece.scalar_type(), ", piece 0 has ", dtype_, ": one dtype for all");
    TORCH_CHECK(piece.device() == device_, op, ": piece ", index, " (task ", task, ", tensor ", k, ") is on ",
                piece.device(), ", piece 0 on ", device_, ": one device for all");
    TORCH_CHECK(piece.numel() == offsets_[k + 1] - offsets_[k], op, ": piece ", index, " (task ", task,
                ", tensor ", k, ") has ", piece.numel(), " elements, task 0's tensor ", k, " has ",
                offsets_[k + 1] - offsets_[k]);
    TORCH_CHECK(piece.is_contiguous(), op, ": piece ", index, " (task ", task, ", tensor ", k,
                ") is not contiguous");
    pointers_.push_back(piece.data_ptr());
  }
}

std::vector<void*> checked_combine_outputs(const TaskPieces& grads, const at::Tensor& weights,
                                           at::TensorList outs, const char* op) {
  TORCH_CHECK(weights.defined() && weights.dim() == 1 && weights.numel() == grads.num_tasks(), op,
              ": weights must be a 1-D tensor of num_tasks = ", grads.num_tasks(), " entries, got ",
              weights.defined() ? weights.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ",
                   weights.scalar_type());
  TORCH_CHECK(weights.device() == grads.device(), op, ": weights are on ", weights.device(),
              ", the task gradients on ", grads.device());
  TORCH_CHECK(weights.is_contiguous(), op, ": weights must be contiguous");
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == grads.num_tensors(), op, ": got ", outs.size(),
              " outputs for ", grads.num_tensors(), " shared tensors");
  const TaskTable table = grads.table();
  std::vector<void*> pointers;
  pointers.reserve(outs.size());
  for (int64_t k = 0; k < grads.num_tensors(); ++k) {
    const at::Tensor& out = outs[k];
    TORCH_CHECK(out.defined(), op, ": output ", k, " is undefined");
    TORCH_CHECK_TYPE(out.scalar_type() == grads.dtype(), op, ": output ", k, " has dtype ", out.scalar_type(),
                     ", the task gradients ", grads.dtype());
    TORCH_CHECK(out.device() == grads.device(), op, ": output ", k, " is on ", out.device(),
                ", the task gradients on ", grads.device());
    TORCH_CHECK(out.numel() == table.size(k), op, ": output ", k, " has ", out.numel(),
                " elements, shared tensor ", k, " has ", table.size(k));
    TORCH_CHECK(out.is_contiguous(), op, ": output ", k, " is not contiguous");
    pointers.push_back(out.data_ptr());
  }
  return pointers;
}

}  // namespace emtl
