// The CPU kernels on at::vec, included once per instruction-set variant (see kernels.h).
//
// The including file defines EMTL_CPU_ISA, the namespace of its variant, and at::vec's
// CPU_CAPABILITY macros; at::vec puts its types in an inline namespace named after
// CPU_CAPABILITY, so the variants' symbols never mix. Nothing here has static initialisers:
// the AVX2 variant must not run a single instruction before the dispatcher has chosen it.
//
// Arithmetic is IEEE float32 (no fast-math anywhere): an inf or NaN in a row reaches its Gram
// diagonal entry, which is how the step detects non-finite gradients.
#ifndef EMTL_CPU_ISA
#error "define EMTL_CPU_ISA, the namespace of the variant, before including kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();  // floats in a vector
constexpr int64_t kPair = 2 * kVec;    // elements loaded at once: one 16-bit vector, two float ones

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

// ---- kPair elements as two float vectors; the counted forms read or write `count` < kPair
// elements and load zeros past them.

inline void load_pair(const float* p, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p);
  hi = Vec::loadu(p + kVec);
}

inline void load_pair(const float* p, int64_t count, Vec& lo, Vec& hi) {
  lo = Vec::loadu(p, std::min(count, kVec));
  hi = count > kVec ? Vec::loadu(p + kVec, count - kVec) : Vec(0.f);
}

template <typename Half16>
void load_pair(const Half16* p, Vec& lo, Vec& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<Half16>(at::vec::Vectorized<Half16>::loadu(p));
}

template <typename Half16>
void load_pair(const Half16* p, int64_t count, Vec& lo, Vec& hi) {
  std::tie(lo, hi) =
      at::vec::convert_to_float<Half16>(at::vec::Vectorized<Half16>::loadu(p, count));
}

inline void store_pair(float* p, int64_t count, const Vec& lo, const Vec& hi) {
  if (count == kPair) {
    lo.store(p);
    hi.store(p + kVec);
    return;
  }
  lo.store(p, std::min(count, kVec));
  if (count > kVec) hi.store(p + kVec, count - kVec);
}

template <typename Half16>
void store_pair(Half16* p, int64_t count, const Vec& lo, const Vec& hi) {
  const auto packed = at::vec::convert_from_float<Half16>(lo, hi);
  if (count == kPair) {
    packed.store(p);
  } else {
    packed.store(p, count);
  }
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

// ---- Gram matrix
//
// The T×T products are register-blocked: the lower triangle is cut into tiles, a triangle of
// up to kBlock tasks on the diagonal, and kBlock×kRectCols rectangles below it. A tile keeps its
// accumulators and operands in vector registers (10 + 4 or 8 + 6 of AVX2's 16) and walks a
// micro-chunk of the rows that stays in cache between tiles. T = 8 takes four tiles and exactly
// its 36 products per element; larger T repeats the pattern.

constexpr int kBlock = 4;
constexpr int kRectCols = 2;

struct Tile {
  int64_t row0, rows, col0, cols;
  bool triangle;
  int64_t acc;  // first of its rows*cols accumulators
};

template <typename F>
void for_each_tile(int64_t num_tasks, F&& body) {
  int64_t acc = 0;
  for (int64_t row0 = 0; row0 < num_tasks; row0 += kBlock) {
    const int64_t rows = std::min<int64_t>(kBlock, num_tasks - row0);
    body(Tile{row0, rows, row0, rows, true, acc});
    acc += rows * rows;
    for (int64_t col0 = 0; col0 < row0; col0 += kRectCols) {  // row0 is a multiple of kRectCols
      body(Tile{row0, rows, col0, kRectCols, false, acc});
      acc += rows * kRectCols;
    }
  }
}

inline int64_t num_accumulators(int64_t num_tasks) {
  int64_t count = 0;
  for_each_tile(num_tasks, [&](const Tile& tile) { count += tile.rows * tile.cols; });
  return count;
}

// One vector of kVec elements as floats; the counted form loads zeros past `count`.
inline Vec load_vec(const float* p) { return Vec::loadu(p); }
inline Vec load_vec(const float* p, int64_t count) { return Vec::loadu(p, count); }
inline Vec load_vec(const c10::BFloat16* p) {
  Vec x;
  at::vec::load_fp32_from_bf16(p, x);
  return x;
}
inline Vec load_vec(const c10::Half* p) {
  Vec x;
  at::vec::load_fp32_from_fp16(p, x);
  return x;
}
template <typename Half16>
Vec load_vec(const Half16* p, int64_t count) {
  Vec lo, hi;
  load_pair(p, count, lo, hi);
  return lo;
}

// Accumulates rows[row0 + i] · rows[col0 + j] over n elements into acc (NI*NJ vectors, stored
// unaligned). A triangle tile has col0 == row0 and reads only the pairs j <= i.
template <int NI, int NJ, bool kTriangle, typename scalar_t>
void gram_tile(const scalar_t* const* rows, const Tile& tile, int64_t n, float* acc) {
  const scalar_t* a[NI];
  const scalar_t* b[NJ];
  for (int i = 0; i < NI; ++i) a[i] = rows[tile.row0 + i];
  for (int j = 0; j < NJ; ++j) b[j] = rows[tile.col0 + j];
  Vec sum[NI][NJ];
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) sum[i][j] = Vec::loadu(acc + (i * NJ + j) * kVec);

  auto step = [&](int64_t e, int64_t count) {
    Vec x[NI], y[NJ];
    for (int i = 0; i < NI; ++i) x[i] = count == kVec ? load_vec(a[i] + e) : load_vec(a[i] + e, count);
    for (int j = 0; j < NJ; ++j) {
      if constexpr (kTriangle) {
        y[j] = x[j];
      } else {
        y[j] = count == kVec ? load_vec(b[j] + e) : load_vec(b[j] + e, count);
      }
    }
    for (int i = 0; i < NI; ++i)
      for (int j = 0; j < NJ; ++j)
        if (!kTriangle || j <= i) sum[i][j] = at::vec::fmadd(x[i], y[j], sum[i][j]);
  };
  int64_t e = 0;
  for (; e + kVec <= n; e += kVec) step(e, kVec);
  if (e < n) step(e, n - e);

  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j) sum[i][j].store(acc + (i * NJ + j) * kVec);
}

template <int NI, typename scalar_t>
void gram_tile_rows(const scalar_t* const* rows, const Tile& tile, int64_t n, float* acc) {
  if (tile.triangle) {
    gram_tile<NI, NI, true>(rows, tile, n, acc);
  } else {
    gram_tile<NI, kRectCols, false>(rows, tile, n, acc);
  }
}

template <typename scalar_t>
void run_tile(const scalar_t* const* rows, const Tile& tile, int64_t n, float* accumulators) {
  float* acc = accumulators + tile.acc * kVec;
  switch (tile.rows) {
    case 1: return gram_tile_rows<1>(rows, tile, n, acc);
    case 2: return gram_tile_rows<2>(rows, tile, n, acc);
    case 3: return gram_tile_rows<3>(rows, tile, n, acc);
    default: return gram_tile_rows<kBlock>(rows, tile, n, acc);
  }
}

// Elements of a row per micro-chunk: the T rows of one (up to 256 KiB of float32) stay in L2
// while the tiles walk them, and each row is read in runs of several pages, long enough for the
// hardware prefetchers.
inline int64_t micro_chunk(int64_t num_tasks) {
  const int64_t length = (int64_t{1} << 16) / num_tasks;
  return std::clamp<int64_t>(length / kPair * kPair, 16 * kPair, 1024 * kPair);
}

void gram_range(const TaskTable& grads, int64_t begin, int64_t end, double* lower) {
  const int64_t num_tasks = grads.num_tasks;
  const int64_t span = micro_chunk(num_tasks);
  std::vector<float> accumulators(num_accumulators(num_tasks) * kVec, 0.f);

  with_storage(grads.storage, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<const scalar_t*> rows(num_tasks);
    for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
      for (int64_t start = first; start < last; start += span) {
        const int64_t n = std::min(span, last - start);
        for (int64_t i = 0; i < num_tasks; ++i) rows[i] = piece<scalar_t>(grads, i, k) + start;
        for_each_tile(num_tasks, [&](const Tile& tile) { run_tile(rows.data(), tile, n, accumulators.data()); });
      }
    });
  });

  for_each_tile(num_tasks, [&](const Tile& tile) {
    for (int64_t i = 0; i < tile.rows; ++i) {
      for (int64_t j = 0; j < tile.cols; ++j) {
        if (tile.triangle && j > i) continue;
        const Vec sum = Vec::loadu(accumulators.data() + (tile.acc + i * tile.cols + j) * kVec);
        lower[lower_pair_index(tile.row0 + i, tile.col0 + j)] = lane_sum(sum);
      }
    }
  });
}

// ---- squared norms: each row alone, four accumulators deep to hide the FMA latency

template <typename scalar_t>
double sum_of_squares(const scalar_t* row, int64_t n) {
  Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
  int64_t e = 0;
  for (; e + 2 * kPair <= n; e += 2 * kPair) {
    Vec x[4];
    load_pair(row + e, x[0], x[1]);
    load_pair(row + e + kPair, x[2], x[3]);
    for (int q = 0; q < 4; ++q) acc[q] = at::vec::fmadd(x[q], x[q], acc[q]);
  }
  for (; e < n; e += kPair) {
    Vec lo, hi;
    load_pair(row + e, std::min(kPair, n - e), lo, hi);
    acc[0] = at::vec::fmadd(lo, lo, acc[0]);
    acc[1] = at::vec::fmadd(hi, hi, acc[1]);
  }
  return lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

void sq_norms_range(const TaskTable& grads, int64_t begin, int64_t end, double* sq_norms) {
  std::fill(sq_norms, sq_norms + grads.num_tasks, 0.0);
  with_storage(grads.storage, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
      for (int64_t i = 0; i < grads.num_tasks; ++i) {
        sq_norms[i] += sum_of_squares(piece<scalar_t>(grads, i, k) + first, last - first);
      }
    });
  });
}

// ---- weighted combination
//
// Per micro-chunk, the active tasks go in groups of kTaskGroup rows read side by side (few
// enough streams for the prefetchers whatever T is); a float32 buffer in L1 carries the sum
// between groups. Every element sees the same sequence of FMAs in task order, whatever the
// grouping.

constexpr int64_t kCombineSpan = 1024;  // elements per micro-chunk, a multiple of kStep
constexpr int64_t kStep = 2 * kPair;    // elements per inner step: four accumulators
constexpr int64_t kTaskGroup = 8;

template <typename scalar_t>
void load_step(const scalar_t* p, int64_t count, Vec (&x)[4]) {
  if (count == kStep) {
    load_pair(p, x[0], x[1]);
    load_pair(p + kPair, x[2], x[3]);
  } else {
    load_pair(p, std::min(count, kPair), x[0], x[1]);
    load_pair(p + kPair, std::max<int64_t>(count - kPair, 0), x[2], x[3]);
  }
}

template <typename scalar_t>
void store_step(scalar_t* p, int64_t count, const Vec (&x)[4]) {
  store_pair(p, std::min(count, kPair), x[0], x[1]);
  if (count > kPair) store_pair(p + kPair, count - kPair, x[2], x[3]);
}

template <typename scalar_t>
void combine_span(const TaskTable& grads, const ActiveTasks& active, scalar_t* out, bool accumulate,
                  int64_t k, int64_t start, int64_t n, float* carry) {
  for (int64_t g0 = 0; g0 < active.count; g0 += kTaskGroup) {
    const int64_t g1 = std::min(active.count, g0 + kTaskGroup);
    const bool first = g0 == 0, last = g1 == active.count;
    for (int64_t e = 0; e < n; e += kStep) {
      const int64_t count = std::min(kStep, n - e);
      Vec acc[4];
      for (int q = 0; q < 4; ++q) acc[q] = first ? Vec(0.f) : Vec::loadu(carry + e + q * kVec);
      for (int64_t a = g0; a < g1; ++a) {
        const Vec weight(active.weights[a]);
        Vec x[4];
        load_step(piece<scalar_t>(grads, active.tasks[a], k) + start + e, count, x);
        for (int q = 0; q < 4; ++q) acc[q] = at::vec::fmadd(weight, x[q], acc[q]);
      }
      if (!last) {
        for (int q = 0; q < 4; ++q) acc[q].store(carry + e + q * kVec);
        continue;
      }
      if (accumulate) {
        Vec before[4];
        load_step(out + start + e, count, before);
        for (int q = 0; q < 4; ++q) acc[q] = before[q] + acc[q];
      }
      store_step(out + start + e, count, acc);
    }
  }
}

void combine_range(const TaskTable& grads, const ActiveTasks& active, void* const* outs, bool accumulate,
                   int64_t begin, int64_t end) {
  float carry[kCombineSpan] = {};
  with_storage(grads.storage, [&](auto tag) {
    using scalar_t = decltype(tag);
    for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
      auto* out = static_cast<scalar_t*>(outs[k]);
      for (int64_t start = first; start < last; start += kCombineSpan) {
        combine_span(grads, active, out, accumulate, k, start, std::min(kCombineSpan, last - start), carry);
      }
    });
  });
}

}  // namespace

const KernelTable& kernels() {
  static constexpr KernelTable table{EMTL_CPU_ISA_NAME, gram_range, sq_norms_range, combine_range};
  return table;
}

}  // namespace emtl::cpu::EMTL_CPU_ISA
