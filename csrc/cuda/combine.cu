// The weighted combination on CUDA: outs[k] (+)= Σ_i w_i · piece(i, k).
//
// Blocks walk the chunks of a batch grid-stride; a thread takes kWidth consecutive elements
// (one 16- or 8-byte load per task where the tensor's pieces are aligned), sums the tasks in
// task order in float32 and writes each output element once, so no reduction across threads is
// needed and the result does not depend on the launch shape. The weights are staged in shared memory; a
// task whose weight is exactly 0 is skipped, its gradient never read.
#include "tensor_batch.cuh"
#include "launch.h"

namespace emtl::cuda {
namespace {

template <Storage S>
__global__ void __launch_bounds__(kThreads) combine_kernel(const TensorBatch batch, int num_tasks,
                                                           const float* weights, bool accumulate,
                                                           int64_t num_chunks) {
  using E = Element<S>;
  using scalar_t = typename E::type;
  // Static, sized for the most tasks: with the weights in dynamic shared memory sized to T,
  // compute-sanitizer's memcheck reported 12-byte shared reads past the end on an H100.
  __shared__ float task_weights[kMaxPointers];
  for (int i = threadIdx.x; i < num_tasks; i += kThreads) task_weights[i] = weights[i];
  __syncthreads();

  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(batch, chunk);
    const void* const* tensor_pieces = batch.pieces + span.tensor * num_tasks;
    scalar_t* out = static_cast<scalar_t*>(batch.outs[span.tensor]) + span.start;
    int64_t scalar_from = 0;
    if (batch.aligned[span.tensor]) {
      scalar_from = span.length / kWidth * kWidth;
      for (int64_t e = threadIdx.x * kWidth; e < scalar_from; e += kThreads * kWidth) {
        float sum[kWidth] = {};
        for (int i = 0; i < num_tasks; ++i) {
          const float weight = task_weights[i];
          if (weight == 0.f) continue;
          float x[kWidth];
          E::load_wide(static_cast<const scalar_t*>(tensor_pieces[i]) + span.start + e, x);
#pragma unroll
          for (int w = 0; w < kWidth; ++w) sum[w] = fmaf(weight, x[w], sum[w]);
        }
        if (accumulate) {
          float before[kWidth];
          E::load_wide(out + e, before);
#pragma unroll
          for (int w = 0; w < kWidth; ++w) sum[w] = before[w] + sum[w];
        }
        E::store_wide(out + e, sum);
      }
    }
    for (int64_t e = scalar_from + threadIdx.x; e < span.length; e += kThreads) {
      float sum = 0.f;
      for (int i = 0; i < num_tasks; ++i) {
        const float weight = task_weights[i];
        if (weight != 0.f) sum = fmaf(weight, E::load(static_cast<const scalar_t*>(tensor_pieces[i]) + span.start + e), sum);
      }
      E::store(out + e, accumulate ? E::load(out + e) + sum : sum);
    }
  }
}

template <Storage S>
struct CombineLaunch {
  static cudaError_t run(const TaskTable& grads, const float* weights, void* const* outs, bool accumulate,
                         cudaStream_t stream) {
    const int num_tasks = static_cast<int>(grads.num_tasks);
    return for_each_batch(grads, outs, [&](const TensorBatch& batch, int64_t num_chunks) {
      combine_kernel<S><<<grid_blocks(num_chunks), kThreads, 0, stream>>>(batch, num_tasks, weights,
                                                                                   accumulate, num_chunks);
      return cudaGetLastError();
    });
  }
};

}  // namespace

cudaError_t launch_combine(const TaskTable& grads, const float* weights, void* const* outs, bool accumulate,
                           cudaStream_t stream) {
  return with_storage<CombineLaunch>(grads.storage, grads, weights, outs, accumulate, stream);
}

}  // namespace emtl::cuda
