// The Gram pass of 5 to 8 tasks in registers, and the Gram pass's choice between the sweeps and
// the tiles.
// Part of the CPU kernels: included by kernels_impl.h alone, once per instruction-set variant.
#pragma once

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

// With 32 vector registers, each step widens the T row vectors once into registers and takes all of
// their products there: no float32 buffer to copy the rows through and no call per tile, which at
// these T cost the tiles as much as their arithmetic. Where the T(T+1)/2 accumulators and the T
// rows outgrow the registers (T >= 7), a block of the rows is read twice, the second time from L1:
// first the triangles of rows 0-3 and of rows 4 on, then the square between them. Each sweep asks
// for its share of the rows kSweepAheadBytes ahead, a cache line of each a step: all of them where
// one sweep reads the block, rows 0-3 and then rows 4 on where two do (asking for all in the first
// sweep, the bursts read a 16-bit J of T = 8 in DRAM at 0.75x the rate, float32 in L2 at 0.9x).

template <int NT>
constexpr bool kOneSweep = NT * (NT + 1) / 2 + NT <= kVectorRegisters - 2;

// Elements of a row a block (16-bit rows of 8 tasks: 8 KiB of L1), and how far ahead the sweeps
// ask. One Zen 5 thread, J in DRAM: asking 2 KiB ahead rather than one block read 16-bit rows of
// T = 5 at 1.2x the rate and the rest as fast, 3 or 4 KiB no faster; blocks of 256 or 1024
// elements were no faster.
constexpr int64_t kSweepBlock = 512;
constexpr int64_t kSweepAheadBytes = 2048;

// The sweep over n elements (a multiple of kVec; of a block where it asks ahead, for rows
// kAskFrom to kAskTo), added to `stored` (kVec floats an entry, lower_pair_index order).
template <int NT, Sweep S, int kAskFrom, int kAskTo, typename scalar_t>
void sweep(const scalar_t* const (&rows)[NT], int64_t n, bool ask_ahead, float* stored) {
  constexpr int kPairs = sweep_pairs(S, NT);
  constexpr int64_t kLineElements = kCacheLine / static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kStep = std::max(kVec, kLineElements);  // a cache line of each row, or a vector
  Accumulator sum[kPairs];
  EMTL_UNROLL
  for (int slot = 0; slot < kPairs; ++slot) sum[slot] = Vec(0.f);
  if (ask_ahead) {
    for (int64_t e = 0; e < n; e += kStep) {
      EMTL_UNROLL
      for (int i = kAskFrom; i < kAskTo; ++i) prefetch(rows[i] + e, kSweepAheadBytes);
      EMTL_UNROLL
      for (int64_t v = 0; v < kStep; v += kVec) sweep_step<NT, S>(rows, e + v, sum);
    }
  } else {
    for (int64_t e = 0; e < n; e += kVec) sweep_step<NT, S>(rows, e, sum);
  }
  EMTL_UNROLL
  for (int i = 0; i < NT; ++i) {
    EMTL_UNROLL
    for (int j = 0; j <= i; ++j) {
      if (in_sweep(S, i, j)) {
        float* const entry = stored + lower_pair_index(i, j) * kVec;
        (Vec::loadu(entry) + Vec(sum[sweep_slot(S, i, j)])).store(entry);
      }
    }
  }
}

template <int NT, typename scalar_t>
void sweeps(const scalar_t* const (&rows)[NT], int64_t n, bool ask_ahead, float* stored) {
  if constexpr (kOneSweep<NT>) {
    sweep<NT, Sweep::kAll, 0, NT>(rows, n, ask_ahead, stored);
  } else {
    sweep<NT, Sweep::kTriangles, 0, kRowBlock>(rows, n, ask_ahead, stored);
    sweep<NT, Sweep::kSquare, kRowBlock, NT>(rows, n, ask_ahead, stored);
  }
}

template <int NT, typename scalar_t>
void register_gram_range(const TaskTable& grads, int64_t begin, int64_t end, double* lower) {
  std::vector<float> stored(num_lower_pairs(NT) * kVec, 0.f);
  const scalar_t* rows[NT];
  for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
    const int64_t whole_end = first + (last - first) / kVec * kVec;
    for (int64_t start = first; start < whole_end; start += kSweepBlock) {
      const int64_t n = std::min(kSweepBlock, whole_end - start);
      for (int i = 0; i < NT; ++i) rows[i] = piece<scalar_t>(grads, i, k) + start;
      sweeps<NT>(rows, n, n == kSweepBlock, stored.data());
    }
    if (whole_end < last) {  // the last n < kVec elements, widened with zeros after them
      alignas(64) float widened[NT][kVec];
      const float* widened_rows[NT];
      for (int i = 0; i < NT; ++i) {
        load(piece<scalar_t>(grads, i, k) + whole_end, last - whole_end).store(widened[i]);
        widened_rows[i] = widened[i];
      }
      sweeps<NT>(widened_rows, kVec, false, stored.data());
    }
  });
  for (int64_t index = 0; index < num_lower_pairs(NT); ++index) {
    lower[index] = lane_sum(Vec::loadu(stored.data() + index * kVec));
  }
}

void gram_range(const TaskTable& grads, int64_t begin, int64_t end, double* lower) {
  with_storage(grads.storage, [&](auto tag) {
    using scalar_t = decltype(tag);
    if constexpr (kVectorRegisters >= 32) {
      switch (grads.num_tasks) {
        case 5: return register_gram_range<5, scalar_t>(grads, begin, end, lower);
        case 6: return register_gram_range<6, scalar_t>(grads, begin, end, lower);
        case 7: return register_gram_range<7, scalar_t>(grads, begin, end, lower);
        case 8: return register_gram_range<8, scalar_t>(grads, begin, end, lower);
        default: break;
      }
    }
    gram_range_of<scalar_t>(grads, begin, end, lower);
  });
}

}  // namespace
}  // namespace emtl::cpu::EMTL_CPU_ISA
