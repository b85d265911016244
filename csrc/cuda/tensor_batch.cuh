// What the CUDA kernels share: the multi-tensor chunk table passed as a kernel argument, the
// host loop that fills it, and float32 loads and stores of every storage dtype.
//
// Chunk table: each shared tensor (a column block of J) is cut into chunks of kChunk elements; a
// launch covers a batch of tensors, and its blocks walk the batch's chunks grid-stride. The batch
// holds each tensor's T piece pointers, its size and the index of its first chunk, so a block
// finds its tensor by a search over at most kMaxTensors entries, and nothing is copied to the
// device before a launch. Words: a batch's "tensor" t is its t-th shared tensor (an index);
// "start" and "length" are a chunk's first element in its tensor and its element count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../task_table.h"

namespace emtl::cuda {

constexpr int kThreads = 256;                // threads per block
constexpr int kWidth = 4;                    // elements a thread loads per row and step
constexpr int64_t kChunk = int64_t{1} << 14;  // elements per chunk; a multiple of kThreads * kWidth
constexpr int64_t kMaxBlocks = 1024;         // blocks per launch along the chunks

// CUDA 12.1 raised the kernel-argument space from 4 KiB to 32 KiB (Volta and later).
#if CUDART_VERSION >= 12010 && !defined(EMTL_SMALL_KERNEL_PARAMS)
constexpr int kMaxPointers = 1024;
constexpr int kMaxTensors = 128;
#else
constexpr int kMaxPointers = 256;
constexpr int kMaxTensors = 32;
#endif

struct TensorBatch {
  const void* pieces[kMaxPointers];      // tensor t's task i at t * num_tasks + i
  void* outs[kMaxTensors];               // combine's outputs; unused by the reductions
  int64_t sizes[kMaxTensors];
  int64_t first_chunk[kMaxTensors + 1];  // tensor t owns chunks [first_chunk[t], first_chunk[t+1])
  bool aligned[kMaxTensors];             // every pointer of tensor t allows kWidth-wide loads
  int num_tensors;

  __host__ __device__ int tensor_of(int64_t chunk) const {
    int lo = 0, hi = num_tensors - 1;  // the last t with first_chunk[t] <= chunk
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_chunk[mid] <= chunk) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

// ---- float32 views of the storage dtypes (explicit conversions: torch builds .cu files with
// __CUDA_NO_HALF_OPERATORS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__).

template <Storage S>
struct Element;

template <>
struct Element<Storage::kFloat32> {
  using type = float;
  __device__ static float load(const type* p) { return *p; }
  __device__ static void load_wide(const type* p, float (&x)[kWidth]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  }
  __device__ static void store(type* p, float value) { *p = value; }
  __device__ static void store_wide(type* p, const float (&x)[kWidth]) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  }
};

// bfloat16 and float16: kWidth elements are one 8-byte word, element 0 in the low half.
template <typename Derived, typename Type>
struct SixteenBitElement {
  using type = Type;
  __device__ static void load_wide(const type* p, float (&x)[kWidth]) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    x[0] = Derived::from_bits(v.x & 0xffffu), x[1] = Derived::from_bits(v.x >> 16);
    x[2] = Derived::from_bits(v.y & 0xffffu), x[3] = Derived::from_bits(v.y >> 16);
  }
  __device__ static void store_wide(type* p, const float (&x)[kWidth]) {
    uint2 v;
    v.x = Derived::to_bits(x[0]) | (Derived::to_bits(x[1]) << 16);
    v.y = Derived::to_bits(x[2]) | (Derived::to_bits(x[3]) << 16);
    *reinterpret_cast<uint2*>(p) = v;
  }
  __device__ static float load(const type* p) {
    return Derived::from_bits(*reinterpret_cast<const unsigned short*>(p));
  }
  __device__ static void store(type* p, float value) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(Derived::to_bits(value));
  }
};

template <>
struct Element<Storage::kBFloat16> : SixteenBitElement<Element<Storage::kBFloat16>, __nv_bfloat16> {
  __device__ static float from_bits(uint32_t bits) { return __uint_as_float(bits << 16); }
  __device__ static uint32_t to_bits(float value) { return __bfloat16_as_ushort(__float2bfloat16_rn(value)); }
};

template <>
struct Element<Storage::kFloat16> : SixteenBitElement<Element<Storage::kFloat16>, __half> {
  __device__ static float from_bits(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  __device__ static uint32_t to_bits(float value) { return __half_as_ushort(__float2half_rn(value)); }
};

inline int64_t element_bytes(Storage storage) { return storage == Storage::kFloat32 ? 4 : 2; }

// Calls launch(batch, num_chunks) for consecutive batches of grads' non-empty tensors; stops at
// the first error. `outs` (one per tensor) may be null. The caller checks T <= kMaxPointers.
template <typename Launch>
cudaError_t for_each_batch(const TaskTable& grads, void* const* outs, Launch&& launch) {
  const int64_t num_tasks = grads.num_tasks;
  const uintptr_t wide_bytes = static_cast<uintptr_t>(kWidth * element_bytes(grads.storage));
  TensorBatch batch{};
  int64_t num_chunks = 0;
  auto flush = [&]() -> cudaError_t {
    if (batch.num_tensors == 0) return cudaSuccess;
    batch.first_chunk[batch.num_tensors] = num_chunks;
    const cudaError_t error = launch(batch, num_chunks);
    batch = TensorBatch{};
    num_chunks = 0;
    return error;
  };
  for (int64_t k = 0; k < grads.num_tensors; ++k) {
    if (grads.size(k) == 0) continue;
    if ((batch.num_tensors + 1) * num_tasks > kMaxPointers || batch.num_tensors == kMaxTensors) {
      if (const cudaError_t error = flush(); error != cudaSuccess) return error;
    }
    const int t = batch.num_tensors++;
    uintptr_t addresses = 0;
    for (int64_t i = 0; i < num_tasks; ++i) {
      batch.pieces[t * num_tasks + i] = grads.piece(i, k);
      addresses |= reinterpret_cast<uintptr_t>(grads.piece(i, k));
    }
    if (outs != nullptr) {
      batch.outs[t] = outs[k];
      addresses |= reinterpret_cast<uintptr_t>(outs[k]);
    }
    batch.aligned[t] = addresses % wide_bytes == 0;
    batch.sizes[t] = grads.size(k);
    batch.first_chunk[t] = num_chunks;
    num_chunks += (grads.size(k) + kChunk - 1) / kChunk;
  }
  return flush();
}

inline unsigned grid_blocks(int64_t num_chunks) {
  return static_cast<unsigned>(num_chunks < kMaxBlocks ? num_chunks : kMaxBlocks);
}

// Where chunk `chunk` of a batch lies: its tensor, first element and length.
struct ChunkSpan {
  int tensor;
  int64_t start, length;
};

__host__ __device__ inline ChunkSpan chunk_span(const TensorBatch& batch, int64_t chunk) {
  const int tensor = batch.tensor_of(chunk);
  const int64_t start = (chunk - batch.first_chunk[tensor]) * kChunk;
  const int64_t rest = batch.sizes[tensor] - start;
  return ChunkSpan{tensor, start, rest < kChunk ? rest : kChunk};
}

// Dispatches a kernel template on the storage tag.
template <template <Storage> class Kernel, typename... Args>
cudaError_t with_storage(Storage storage, Args&&... args) {
  switch (storage) {
    case Storage::kFloat32:
      return Kernel<Storage::kFloat32>::run(args...);
    case Storage::kBFloat16:
      return Kernel<Storage::kBFloat16>::run(args...);
    case Storage::kFloat16:
      return Kernel<Storage::kFloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

}  // namespace emtl::cuda
