// The weighted combination g = Jᵀw of J's rows.
// Part of the CPU kernels: included by kernels_impl.h alone, once per instruction-set variant.
#pragma once

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

// Per span of kCombineSpan elements, the active tasks go in groups of kTaskGroup rows read side
// by side (few enough streams for the prefetchers whatever T is); a float32 buffer in L1 carries
// the sum between groups. Every element sees the same sequence of FMAs in task order, whatever
// the grouping.

constexpr int64_t kCombineSpan = 1024;  // elements per span, a multiple of every step
constexpr int64_t kTaskGroup = 8;

// Vectors of each row a step reads (its accumulators). Two where 16-bit rows in several groups
// are read 8 lanes at a time: 32 bytes of a row a step rather than 64 made the pass 4-35 %
// faster at T = 9-32 on a J in DRAM, one Zen 5 core (csrc/README.md). A single group, or 16
// lanes, ran as fast or faster with four.
template <typename scalar_t, bool kAskAhead>
constexpr int kStepVectors = sizeof(scalar_t) == 2 && kVec == 8 && kAskAhead ? 2 : 4;

template <typename scalar_t, int kN>
C10_ALWAYS_INLINE void load_step(const scalar_t* p, Vec (&x)[kN]) {
  for (int q = 0; q < kN; ++q) x[q] = load(p + q * kVec);
}

template <typename scalar_t, int kN>
void load_step(const scalar_t* p, int64_t count, Vec (&x)[kN]) {
  for (int q = 0; q < kN; ++q) {
    const int64_t left = count - q * kVec;
    x[q] = left >= kVec ? load(p + q * kVec) : left > 0 ? load(p + q * kVec, left) : Vec(0.f);
  }
}

template <typename scalar_t, int kN>
C10_ALWAYS_INLINE void store_step(scalar_t* p, const Vec (&x)[kN]) {
  for (int q = 0; q < kN; q += 2) store_pair(p + q * kVec, x[q], x[q + 1]);
}

template <typename scalar_t, int kN>
void store_step(scalar_t* p, int64_t count, const Vec (&x)[kN]) {
  for (int q = 0; q < kN && count > q * kVec; q += 2) {
    store_pair(p + q * kVec, std::min(count - q * kVec, 2 * kVec), x[q], x[q + 1]);
  }
}

// Asks for the step's elements in the next span of the row, which this group reads after the
// other groups of this span: for T > kTaskGroup a row is read kCombineSpan elements at a time,
// too short a run for the hardware prefetchers to follow. A step shorter than a line asks for
// its line at each of its steps.
template <int64_t kStepBytes, typename scalar_t>
C10_ALWAYS_INLINE void ask_next_span(const scalar_t* p) {
  constexpr int64_t kSpanBytes = kCombineSpan * sizeof(scalar_t);
  for (int64_t line = 0; line < kStepBytes; line += kCacheLine) {
    prefetch(p, kSpanBytes + line);
  }
}

// One step of `count` elements (kN vectors, or fewer at the end of a segment) at offset e of the
// rows: acc = carry (or 0) + Σ_a weights[a] · rows[a][e:], then to the carry or to out.
template <bool kFull, bool kAskAhead, int kN, typename scalar_t>
C10_ALWAYS_INLINE void combine_step(const scalar_t* const* rows, const float* weights, int64_t group, int64_t e,
                                    int64_t count, bool first, bool last, bool accumulate, float* carry,
                                    scalar_t* out) {
  Vec acc[kN];
#pragma GCC unroll 8
  for (int q = 0; q < kN; ++q) acc[q] = first ? Vec(0.f) : Vec::loadu(carry + q * kVec);
  for (int64_t a = 0; a < group; ++a) {
    const Vec weight(weights[a]);
    Vec x[kN];
    if constexpr (kFull) {
      if constexpr (kAskAhead) ask_next_span<kN * kVec * sizeof(scalar_t)>(rows[a] + e);
      load_step(rows[a] + e, x);
    } else {
      load_step(rows[a] + e, count, x);
    }
#pragma GCC unroll 8
    for (int q = 0; q < kN; ++q) acc[q] = at::vec::fmadd(weight, x[q], acc[q]);
  }
  if (!last) {
#pragma GCC unroll 8
    for (int q = 0; q < kN; ++q) acc[q].store(carry + q * kVec);
    return;
  }
  if (accumulate) {
    Vec before[kN];
    if constexpr (kFull) {
      load_step(out + e, before);
    } else {
      load_step(out + e, count, before);
    }
    for (int q = 0; q < kN; ++q) acc[q] = before[q] + acc[q];
  }
  if constexpr (kFull) {
    store_step(out + e, acc);
  } else {
    store_step(out + e, count, acc);
  }
}

// rows: the active tasks' rows at this segment's first position; n elements of out. kAskAhead
// where there are several groups (a single group reads its rows in long sequential runs).
template <bool kAskAhead, typename scalar_t>
void combine_segment(const scalar_t* const* rows, const ActiveTasks& active, scalar_t* out, bool accumulate,
                     int64_t n, float* carry) {
  constexpr int kN = kStepVectors<scalar_t, kAskAhead>;
  constexpr int64_t step = kN * kVec;
  for (int64_t start = 0; start < n; start += kCombineSpan) {
    const int64_t span = std::min(kCombineSpan, n - start);
    for (int64_t g0 = 0; g0 < active.count; g0 += kTaskGroup) {
      const int64_t group = std::min(active.count - g0, kTaskGroup);
      const bool first = g0 == 0, last = g0 + group == active.count;
      const scalar_t* const* group_rows = rows + g0;
      const float* weights = active.weights + g0;
      int64_t e = 0;
      for (; e + step <= span; e += step) {
        combine_step<true, kAskAhead, kN>(group_rows, weights, group, start + e, step, first, last, accumulate, carry + e, out);
      }
      if (e < span) {
        combine_step<false, kAskAhead, kN>(group_rows, weights, group, start + e, span - e, first, last, accumulate, carry + e,
                            out);
      }
    }
  }
}

void combine_range(const TaskTable& grads, const ActiveTasks& active, void* const* outs, bool accumulate,
                   int64_t begin, int64_t end) {
  float carry[kCombineSpan];
  with_storage(grads.storage, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<const scalar_t*> rows(active.count);
    for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
      for (int64_t a = 0; a < active.count; ++a) rows[a] = piece<scalar_t>(grads, active.tasks[a], k) + first;
      auto* out = static_cast<scalar_t*>(outs[k]) + first;
      if (active.count > kTaskGroup) {
        combine_segment<true>(rows.data(), active, out, accumulate, last - first, carry);
      } else {
        combine_segment<false>(rows.data(), active, out, accumulate, last - first, carry);
      }
    });
  });
}

}  // namespace
}  // namespace emtl::cpu::EMTL_CPU_ISA
