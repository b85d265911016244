// Launchers of the CUDA kernels: raw device pointers, sizes, a storage tag and a stream. No torch
// header here or in the .cu files, so that nvcc alone compiles them (the CPU build of torch
// has no CUDA headers); ops_cuda.cpp is the torch side.
//
// `grads` is a host-side TaskTable whose pieces point to device memory. Every launch goes on
// `stream`, nothing waits for the device, and the piece pointers travel as kernel arguments
// (no host-to-device copy), so the calls can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../task_table.h"

namespace emtl::cuda {

// The most tasks the kernels take (their piece pointers for one tensor fill a launch's arguments).
int64_t max_tasks();

// Floats of device workspace launch_gram and launch_sq_norms need for `grads`.
int64_t gram_workspace_floats(const TaskTable& grads);
int64_t sq_norms_workspace_floats(const TaskTable& grads);

// gram: [T, T] float32, exactly symmetric. Deterministic: two-stage reduction in fixed order.
cudaError_t launch_gram(const TaskTable& grads, float* workspace, float* gram, cudaStream_t stream);

// sq_norms: [T] float32.
cudaError_t launch_sq_norms(const TaskTable& grads, float* workspace, float* sq_norms, cudaStream_t stream);

// outs[k] (+)= Σ_i weights[i] · piece(i, k), float32 sum rounded once; weights: [T] float32 on the
// device; a task whose weight is exactly 0 is not read.
cudaError_t launch_combine(const TaskTable& grads, const float* weights, void* const* outs, bool accumulate,
                           cudaStream_t stream);

}  // namespace emtl::cuda
