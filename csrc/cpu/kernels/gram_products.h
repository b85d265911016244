// Products of row vectors held in registers, shared by the Gram tiles and the register sweeps:
// the accumulators' type, which pairs of rows a sweep takes, and the accumulator of each.
// Part of the CPU kernels: included by kernels_impl.h alone, once per instruction-set variant.
#pragma once

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

// The type of a tile's accumulators: at 16 lanes the raw vector, as GCC 12 keeps an array of
// at::vec's AVX-512 vectors in memory and stores all of it at every step.
#if defined(CPU_CAPABILITY_AVX512)
using Accumulator = __m512;
C10_ALWAYS_INLINE void fma_into(Accumulator& sum, const Vec& x, const Vec& y) { sum = at::vec::fmadd(x, y, Vec(sum)); }
#else
using Accumulator = Vec;
C10_ALWAYS_INLINE void fma_into(Accumulator& sum, const Vec& x, const Vec& y) { sum = at::vec::fmadd(x, y, sum); }
#endif

// v, from a register: at 16 lanes GCC otherwise folds the load of a strip's row vector into
// each FMA that uses it (15 loads a step for 12 FMAs in a 4 × 3 strip), and the steps wait on
// the load ports (two 512-bit loads a cycle) rather than the FMA units.
C10_ALWAYS_INLINE Vec held_in_register(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 raw = v;
  __asm__("" : "+v"(raw));
  return raw;
#else
  return v;
#endif
}

// The pairs (i, j), j <= i, of T rows that a sweep takes: all of them (a triangle), or, for the
// register sweeps of T >= 7 (below), the triangles of rows 0-3 and of rows 4 on, or the square
// between them.
enum class Sweep { kAll, kTriangles, kSquare };

constexpr bool in_sweep(Sweep sweep, int i, int j) {
  const bool square = i >= kRowBlock && j < kRowBlock;
  return sweep == Sweep::kAll || (sweep == Sweep::kSquare) == square;
}

// The accumulator of the pair (i, j), j <= i, in its sweep: its rank in lower_pair_index order.
constexpr int sweep_slot(Sweep sweep, int i, int j) {
  int slot = 0;
  for (int r = 0; r < i; ++r) {
    for (int c = 0; c <= r; ++c) slot += in_sweep(sweep, r, c);
  }
  for (int c = 0; c < j; ++c) slot += in_sweep(sweep, i, c);
  return slot;
}

constexpr int sweep_pairs(Sweep sweep, int num_rows) { return sweep_slot(sweep, num_rows, 0); }

// sweep_slot(S, i, j) of T rows, or -1 where S does not take the pair, as a table that the
// unrolled loops index with constants: indexed through sweep_slot's own loops, the 16-bit Gram
// pass at T = 16 ran 10 % slower.
template <int NT, Sweep S>
struct SweepSlots {
  int slot[NT][NT];
  constexpr SweepSlots() : slot{} {
    for (int i = 0; i < NT; ++i) {
      for (int j = 0; j < NT; ++j) slot[i][j] = j <= i && in_sweep(S, i, j) ? sweep_slot(S, i, j) : -1;
    }
  }
};
template <int NT, Sweep S>
constexpr SweepSlots<NT, S> kSweepSlots{};

// The products of the row vectors x that sweep S takes, into sum (sweep_slot order: slot
// i(i+1)/2 + j for kAll).
template <int NT, Sweep S = Sweep::kAll>
C10_ALWAYS_INLINE void take_products(const Vec (&x)[NT], Accumulator (&sum)[sweep_pairs(S, NT)]) {
  EMTL_UNROLL
  for (int i = 0; i < NT; ++i) {
    EMTL_UNROLL
    for (int j = 0; j <= i; ++j) {
      constexpr const auto& slots = kSweepSlots<NT, S>.slot;
      if (slots[i][j] >= 0) fma_into(sum[slots[i][j]], x[i], x[j]);
    }
  }
}

// The products of one vector of the rows at e.
template <int NT, Sweep S = Sweep::kAll, typename scalar_t>
C10_ALWAYS_INLINE void sweep_step(const scalar_t* const (&rows)[NT], int64_t e,
                                  Accumulator (&sum)[sweep_pairs(S, NT)]) {
  Vec x[NT];
  EMTL_UNROLL
  for (int i = 0; i < NT; ++i) x[i] = load(rows[i] + e);
  take_products<NT, S>(x, sum);
}

}  // namespace
}  // namespace emtl::cpu::EMTL_CPU_ISA
