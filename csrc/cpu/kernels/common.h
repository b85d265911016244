// What every CPU kernel shares: float vectors over J's storage dtypes, cache hints, J's rows cut
// at tensor boundaries, and the unroll and register counts the kernels are sized by.
// Part of the CPU kernels: included by kernels_impl.h alone, once per instruction-set variant.
#pragma once

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();  // floats in a vector

template <typename F>
void with_storage(Storage storage, F&& body) {
  switch (storage) {
    case Storage::kFloat32:
      return body(float{});
    case Storage::kBFloat16:
      return body(c10::BFloat16{});
    case Storage::kFloat16:
      return body(c10::Half{});
  }
}

// ---- kVec elements as one float vector. Every helper is forced inline: a call would pass the
// vectors through memory. The counted forms read `count` < kVec elements and load zeros past them.

C10_ALWAYS_INLINE Vec load(const float* p) { return Vec::loadu(p); }
C10_ALWAYS_INLINE Vec load(const c10::BFloat16* p) {
  Vec x;
  at::vec::load_fp32_from_bf16(p, x);
  return x;
}
C10_ALWAYS_INLINE Vec load(const c10::Half* p) {
  Vec x;
  at::vec::load_fp32_from_fp16(p, x);
  return x;
}

C10_ALWAYS_INLINE Vec load(const float* p, int64_t count) { return Vec::loadu(p, count); }
template <typename Half16>
Vec load(const Half16* p, int64_t count) {
  float widened[kVec] = {};
  for (int64_t e = 0; e < count; ++e) widened[e] = static_cast<float>(p[e]);
  return Vec::loadu(widened);
}

// Two vectors stored at once (one conversion of 2·kVec elements to a 16-bit type).
C10_ALWAYS_INLINE void store_pair(float* p, const Vec& lo, const Vec& hi) {
  lo.store(p);
  hi.store(p + kVec);
}
template <typename Half16>
C10_ALWAYS_INLINE void store_pair(Half16* p, const Vec& lo, const Vec& hi) {
  at::vec::convert_from_float<Half16>(lo, hi).store(p);
}
inline void store_pair(float* p, int64_t count, const Vec& lo, const Vec& hi) {
  lo.store(p, std::min(count, kVec));
  if (count > kVec) hi.store(p + kVec, count - kVec);
}
template <typename Half16>
void store_pair(Half16* p, int64_t count, const Vec& lo, const Vec& hi) {
  at::vec::convert_from_float<Half16>(lo, hi).store(p, count);
}

constexpr int64_t kCacheLine = 64;

// The address `bytes` past p, for prefetch hints only: computed on integers, as it may lie
// outside any object.
C10_ALWAYS_INLINE const char* byte_offset(const void* p, int64_t bytes) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes));
}

// Asks for the cache line `bytes` past p (a hint: it never faults, wherever that lies; it costs
// a load slot).
C10_ALWAYS_INLINE void prefetch(const void* p, int64_t bytes) { __builtin_prefetch(byte_offset(p, bytes), 0, 2); }

// The first cache line boundary at or after p.
inline float* line_aligned(float* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((address + kCacheLine - 1) & ~static_cast<uintptr_t>(kCacheLine - 1));
}

// Lanes summed in double, in lane order: a fixed order, and no float rounding of the total.
inline double lane_sum(const Vec& v) {
  float lanes[kVec];
  v.store(lanes);
  double total = 0.0;
  for (int64_t lane = 0; lane < kVec; ++lane) total += lanes[lane];
  return total;
}

// ---- ranges of a row of J, cut at tensor boundaries

inline int64_t tensor_at(const TaskTable& grads, int64_t position) {
  int64_t lo = 0, hi = grads.num_tensors - 1;  // the last k with offsets[k] <= position
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (grads.offsets[mid] <= position) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// body(k, first, last): the part of [begin, end) in tensor k, as positions inside tensor k.
template <typename F>
void for_each_segment(const TaskTable& grads, int64_t begin, int64_t end, F&& body) {
  for (int64_t k = tensor_at(grads, begin), position = begin; position < end; ++k) {
    const int64_t stop = std::min(end, grads.offsets[k + 1]);
    if (stop > position) body(k, position - grads.offsets[k], stop - grads.offsets[k]);
    position = stop;
  }
}

template <typename scalar_t>
const scalar_t* piece(const TaskTable& grads, int64_t task, int64_t k) {
  return static_cast<const scalar_t*>(grads.piece(task, k));
}


// Loops over accumulators (up to 24 in a Gram tile) must unroll fully for them to stay in
// registers.
#define EMTL_UNROLL _Pragma("GCC unroll 32")

// Rows side by side: a Gram row block, the rows of a squared-norms step.
constexpr int kRowBlock = 4;

// Vector registers: 32 with AVX-512, 16 with AVX2 (and counted so for the baseline).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

}  // namespace
}  // namespace emtl::cpu::EMTL_CPU_ISA
