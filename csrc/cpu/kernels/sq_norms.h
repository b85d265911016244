// The squared norms of J's rows.
// Part of the CPU kernels: included by kernels_impl.h alone, once per instruction-set variant.
#pragma once

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

// Up to 4 rows side by side, one accumulator each (a step's FMAs on the 4 rows are independent;
// more accumulators leave GCC storing them to the stack every step).

template <int NI, typename scalar_t>
void sum_of_squares(const scalar_t* const* rows, int64_t n, double* sq_norms) {
  Vec acc[NI];
  EMTL_UNROLL
  for (int i = 0; i < NI; ++i) acc[i] = Vec(0.f);
  int64_t e = 0;
  for (; e + kVec <= n; e += kVec) {
    EMTL_UNROLL
    for (int i = 0; i < NI; ++i) {
      const Vec x = load(rows[i] + e);
      acc[i] = at::vec::fmadd(x, x, acc[i]);
    }
  }
  if (e < n) {
    EMTL_UNROLL
    for (int i = 0; i < NI; ++i) {
      const Vec x = load(rows[i] + e, n - e);
      acc[i] = at::vec::fmadd(x, x, acc[i]);
    }
  }
  for (int i = 0; i < NI; ++i) sq_norms[i] += lane_sum(acc[i]);
}

void sq_norms_range(const TaskTable& grads, int64_t begin, int64_t end, double* sq_norms) {
  std::fill(sq_norms, sq_norms + grads.num_tasks, 0.0);
  with_storage(grads.storage, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
      for (int64_t i0 = 0; i0 < grads.num_tasks; i0 += kRowBlock) {
        const scalar_t* rows[kRowBlock];
        const int64_t count = std::min<int64_t>(kRowBlock, grads.num_tasks - i0);
        for (int64_t i = 0; i < count; ++i) rows[i] = piece<scalar_t>(grads, i0 + i, k) + first;
        double* out = sq_norms + i0;
        switch (count) {
          case 1: sum_of_squares<1>(rows, last - first, out); break;
          case 2: sum_of_squares<2>(rows, last - first, out); break;
          case 3: sum_of_squares<3>(rows, last - first, out); break;
          default: sum_of_squares<kRowBlock>(rows, last - first, out); break;
        }
      }
    });
  });
}

}  // namespace
}  // namespace emtl::cpu::EMTL_CPU_ISA
