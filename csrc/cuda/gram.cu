// The Gram matrix and the squared norms on CUDA: a two-stage deterministic reduction.
//
// Stage 1: the tasks go in tiles of kTile; block (x, y) takes tile pair y (rows of tile a
// against rows of tile b, b <= a; or tile y alone for the norms) over the chunks x, x + gridDim.x,
// ... of a batch. Each thread keeps its kTile×kTile products in registers over its elements,
// then the block sums them in a fixed tree (warp shuffles, then warps in order) into its own
// slot of the workspace. Stage 2 sums the slots in slot order, in double. No atomics: the same
// inputs give the same bits on every run. T <= kTile reads J once; larger T reads each tile
// once per tile pair it is in.
#include "tensor_batch.cuh"
#include "launch.h"

namespace emtl::cuda {
namespace {

constexpr int kTile = 8;

__host__ __device__ inline int num_tiles(int num_tasks) { return (num_tasks + kTile - 1) / kTile; }
__host__ __device__ inline int num_tile_pairs(int num_tasks) {
  const int tiles = num_tiles(num_tasks);
  return tiles * (tiles + 1) / 2;
}

// Partial sums per block and tile (pair): kTile×kTile products, or kTile squares.
template <bool kSquaresOnly>
constexpr int kValues = kSquaresOnly ? kTile : kTile * kTile;

template <bool kSquaresOnly>
__device__ constexpr int value_index(int i, int j) {
  return kSquaresOnly ? i : i * kTile + j;
}

// Sums each of the block's per-thread values in a fixed order; thread v < count writes value v.
template <int kCount>
__device__ void block_sum(const float (&values)[kCount], float* out) {
  __shared__ float warp_sums[kThreads / 32][kCount];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int v = 0; v < kCount; ++v) {
    float sum = values[v];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) warp_sums[warp][v] = sum;
  }
  __syncthreads();
  for (int v = threadIdx.x; v < kCount; v += kThreads) {
    float sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w][v];
    out[v] = sum;
  }
}

template <Storage S, bool kSquaresOnly>
__global__ void __launch_bounds__(kThreads)
    gram_partials_kernel(const TensorBatch batch, int num_tasks, int64_t num_chunks, float* partials) {
  using E = Element<S>;
  using scalar_t = typename E::type;
  int tile_a = blockIdx.y, tile_b = blockIdx.y;
  if (!kSquaresOnly) {  // tile pair y = a(a+1)/2 + b
    tile_a = 0;
    while ((tile_a + 1) * (tile_a + 2) / 2 <= static_cast<int>(blockIdx.y)) ++tile_a;
    tile_b = blockIdx.y - tile_a * (tile_a + 1) / 2;
  }
  const bool same_tile = tile_a == tile_b;
  float acc[kValues<kSquaresOnly>] = {};

  // Adds the products of one group of `width` elements (x: tile a's rows, y: tile b's).
  auto accumulate = [&](const float (&x)[kTile][kWidth], const float (&y)[kTile][kWidth], int width) {
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
#pragma unroll
      for (int j = 0; j < kTile; ++j) {
        if (kSquaresOnly && i != j) continue;
#pragma unroll
        for (int w = 0; w < kWidth; ++w) {
          if (w < width) acc[value_index<kSquaresOnly>(i, j)] = fmaf(x[i][w], y[j][w], acc[value_index<kSquaresOnly>(i, j)]);
        }
      }
    }
  };

  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(batch, chunk);
    const scalar_t* rows_a[kTile];
    const scalar_t* rows_b[kTile];
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
      const int task_a = tile_a * kTile + r, task_b = tile_b * kTile + r;
      const void* const* tensor_pieces = batch.pieces + span.tensor * num_tasks;
      rows_a[r] = task_a < num_tasks ? static_cast<const scalar_t*>(tensor_pieces[task_a]) + span.start : nullptr;
      rows_b[r] = task_b < num_tasks ? static_cast<const scalar_t*>(tensor_pieces[task_b]) + span.start : nullptr;
    }
    float x[kTile][kWidth], y[kTile][kWidth];
    int64_t scalar_from = 0;
    if (batch.aligned[span.tensor]) {
      scalar_from = span.length / kWidth * kWidth;
      for (int64_t e = threadIdx.x * kWidth; e < scalar_from; e += kThreads * kWidth) {
#pragma unroll
        for (int r = 0; r < kTile; ++r) {
          if (rows_a[r] != nullptr) {
            E::load_wide(rows_a[r] + e, x[r]);
          } else {
#pragma unroll
            for (int w = 0; w < kWidth; ++w) x[r][w] = 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < kTile; ++r) {
          if (kSquaresOnly || same_tile || rows_b[r] == nullptr) {
#pragma unroll
            for (int w = 0; w < kWidth; ++w) y[r][w] = (kSquaresOnly || same_tile) ? x[r][w] : 0.f;
          } else {
            E::load_wide(rows_b[r] + e, y[r]);
          }
        }
        accumulate(x, y, kWidth);
      }
    }
    for (int64_t e = scalar_from + threadIdx.x; e < span.length; e += kThreads) {
#pragma unroll
      for (int r = 0; r < kTile; ++r) x[r][0] = rows_a[r] != nullptr ? E::load(rows_a[r] + e) : 0.f;
#pragma unroll
      for (int r = 0; r < kTile; ++r) {
        if (kSquaresOnly || same_tile) {
          y[r][0] = x[r][0];
        } else {
          y[r][0] = rows_b[r] != nullptr ? E::load(rows_b[r] + e) : 0.f;
        }
      }
      accumulate(x, y, 1);
    }
  }
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  block_sum(acc, partials + slot * kValues<kSquaresOnly>);
}

// Stage 2 of the Gram matrix: entry (i, j), j <= i, summed over the slots in order; written to
// both halves so that G is exactly symmetric.
__global__ void gram_finalize_kernel(const float* partials, int64_t num_slots, int num_tasks, float* gram) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<int64_t>(num_tasks) * num_tasks) return;
  const int i = static_cast<int>(index / num_tasks), j = static_cast<int>(index % num_tasks);
  if (j > i) return;
  const int tile_a = i / kTile, tile_b = j / kTile;
  const int pair = tile_a * (tile_a + 1) / 2 + tile_b, pairs = num_tile_pairs(num_tasks);
  const int value = value_index<false>(i % kTile, j % kTile);
  double sum = 0.0;
  for (int64_t slot = 0; slot < num_slots; ++slot) sum += partials[(slot * pairs + pair) * kValues<false> + value];
  gram[static_cast<int64_t>(i) * num_tasks + j] = gram[static_cast<int64_t>(j) * num_tasks + i] = static_cast<float>(sum);
}

__global__ void sq_norms_finalize_kernel(const float* partials, int64_t num_slots, int num_tasks, float* sq_norms) {
  const int task = blockIdx.x * blockDim.x + threadIdx.x;
  if (task >= num_tasks) return;
  const int tiles = num_tiles(num_tasks);
  double sum = 0.0;
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    sum += partials[(slot * tiles + task / kTile) * kValues<true> + value_index<true>(task % kTile, task % kTile)];
  }
  sq_norms[task] = static_cast<float>(sum);
}

// Slots (blocks along the chunks) over all launches for grads: the workspace holds their partials.
int64_t num_slots(const TaskTable& grads) {
  int64_t slots = 0;
  for_each_batch(grads, nullptr, [&](const TensorBatch&, int64_t num_chunks) {
    slots += grid_blocks(num_chunks);
    return cudaSuccess;
  });
  return slots;
}

template <bool kSquaresOnly>
struct PartialsLaunch {
  template <Storage S>
  struct Kernel {
    static cudaError_t run(const TaskTable& grads, float* workspace, cudaStream_t stream) {
      const int num_tasks = static_cast<int>(grads.num_tasks);
      const unsigned groups = kSquaresOnly ? num_tiles(num_tasks) : num_tile_pairs(num_tasks);
      float* partials = workspace;
      return for_each_batch(grads, nullptr, [&](const TensorBatch& batch, int64_t num_chunks) {
        const dim3 grid(grid_blocks(num_chunks), groups);
        gram_partials_kernel<S, kSquaresOnly><<<grid, kThreads, 0, stream>>>(batch, num_tasks, num_chunks, partials);
        partials += static_cast<int64_t>(grid.x) * groups * kValues<kSquaresOnly>;
        return cudaGetLastError();
      });
    }
  };
};

int finalize_blocks(int64_t threads) { return static_cast<int>((threads + kThreads - 1) / kThreads); }

}  // namespace

int64_t max_tasks() { return kMaxPointers; }

int64_t gram_workspace_floats(const TaskTable& grads) {
  return num_slots(grads) * num_tile_pairs(static_cast<int>(grads.num_tasks)) * kValues<false>;
}

int64_t sq_norms_workspace_floats(const TaskTable& grads) {
  return num_slots(grads) * num_tiles(static_cast<int>(grads.num_tasks)) * kValues<true>;
}

cudaError_t launch_gram(const TaskTable& grads, float* workspace, float* gram, cudaStream_t stream) {
  const cudaError_t error = with_storage<PartialsLaunch<false>::Kernel>(grads.storage, grads, workspace, stream);
  if (error != cudaSuccess) return error;
  const int num_tasks = static_cast<int>(grads.num_tasks);
  gram_finalize_kernel<<<finalize_blocks(int64_t{num_tasks} * num_tasks), kThreads, 0, stream>>>(
      workspace, num_slots(grads), num_tasks, gram);
  return cudaGetLastError();
}

cudaError_t launch_sq_norms(const TaskTable& grads, float* workspace, float* sq_norms, cudaStream_t stream) {
  const cudaError_t error = with_storage<PartialsLaunch<true>::Kernel>(grads.storage, grads, workspace, stream);
  if (error != cudaSuccess) return error;
  const int num_tasks = static_cast<int>(grads.num_tasks);
  sq_norms_finalize_kernel<<<finalize_blocks(num_tasks), kThreads, 0, stream>>>(workspace, num_slots(grads),
                                                                                  num_tasks, sq_norms);
  return cudaGetLastError();
}

}  // namespace emtl::cuda
