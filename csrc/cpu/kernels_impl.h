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
#include <memory>
#include <vector>

#include "kernels.h"

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

// ---- Gram matrix
//
// From 5 to 8 tasks with 32 vector registers, all of the products are taken from registers in one
// or two sweeps over a block (register_gram_range, below the tiles). Otherwise the lower triangle
// of the T×T products is computed in register tiles, column block by column block: per block of
// 4 rows, a triangle on the diagonal (10 accumulators), then strips of those 4 rows by 3 or 6
// columns below it (12 or 24 accumulators, 7 loads for 12 FMAs or 10 for 24; 2 columns where 4
// or 2 remain), all in one call. Where there are strips (T > 4), each triangle copies its 4 rows
// of the block from J into a float32 buffer in L1 (widening 16-bit rows) as it accumulates them,
// and its strips read the buffer: the strips never read rows of J, which lie a power of two apart
// and would compete for the same L1 sets, and each element is converted once. A single triangle (T <= 4) reads J in place, a few long sequential
// streams (16-bit: up to 3 rows converted in registers, 4 through the buffer with 16 vector
// registers, in registers with 32).
//
// Where there are strips, a block's tiles also ask for the next block's rows of J, two rows a
// tile, a cache line a step: the next block reaches the caches while this one is computed, the
// requests spread over all of its arithmetic. (The hardware prefetchers lose each row's stream
// at every block boundary, and a triangle's own requests alone come in bursts that the miss
// buffers cannot hold.)

// Loops over a tile's accumulators (up to 24) must unroll fully for them to stay in registers.
#define EMTL_UNROLL _Pragma("GCC unroll 32")

constexpr int kRowBlock = 4;
constexpr int64_t kGramBlockBytes = 28 * 1024;  // the float32 buffer: T rows of a block, in L1

// Elements of a row per block: a multiple of 2 kVec, at least 8 vectors.
inline int64_t gram_block(int64_t num_tasks) {
  const int64_t length = kGramBlockBytes / (num_tasks * static_cast<int64_t>(sizeof(float)));
  return std::clamp<int64_t>(length / (2 * kVec) * (2 * kVec), 8 * kVec, 256 * kVec);
}

// The two rows of J a tile asks for, at the start of the next block (bytes; element e of a row
// is e·element_bytes in).
struct Ahead {
  const char* rows[2];
  int64_t element_bytes;
};

// The Ahead of a tile that asks for rows `ahead` of the next block, which starts at next_rows.
inline Ahead ahead_of(const char* const* next_rows, const int64_t (&ahead)[2], int64_t element_bytes) {
  return Ahead{{next_rows[ahead[0]], next_rows[ahead[1]]}, element_bytes};
}

// Asks for the two rows of `ahead` over a tile's n steps: step e (an element offset) asks for
// byte 2·e·element_bytes of the rows end to end, so the first half of the steps covers row 0 and
// the second half row 1. A step of float32 rows spans 2·kVec·4 bytes: one cache line up to
// 8 lanes, two at 16 (AVX-512), where the step also asks for the line kVec elements further. The
// row is picked by a select, not a branch: a branch in the tiles' loops leaves GCC keeping the
// accumulators on the stack.
struct AheadWalk {
  const char* first;
  const char* second_less_row;  // the second row, row_bytes before it: its start at offset row_bytes
  int64_t step_bytes;           // 2·element_bytes
  int64_t row_bytes;            // n·element_bytes

  AheadWalk(const Ahead& ahead, int64_t n)
      : first(ahead.rows[0]),
        second_less_row(byte_offset(ahead.rows[1], -n * ahead.element_bytes)),
        step_bytes(2 * ahead.element_bytes),
        row_bytes(n * ahead.element_bytes) {}

  C10_ALWAYS_INLINE void ask(int64_t e) const {
    const int64_t offset = e * step_bytes;
    const char* row = offset < row_bytes ? first : second_less_row;
    prefetch(row, offset);
    if constexpr (kStepSpansTwoLines) prefetch(row, offset + kVec * step_bytes / 2);
  }

  static constexpr bool kStepSpansTwoLines = 2 * kVec * static_cast<int64_t>(sizeof(float)) > kCacheLine;
};

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

// A tile's accumulators start at zero in registers and are added to the stored ones at its end:
// the first FMAs wait on no load. The stored accumulators have kAccLanes lanes: at 16 lanes the
// tile adds its upper half to its lower first, as T(T+1)/2 stored accumulators of 16 lanes would
// outgrow L1 beside the 28 KiB block (33 KiB at T = 32) and evict the block's rows.
constexpr int64_t kAccLanes = kVec == 16 ? 8 : kVec;

C10_ALWAYS_INLINE void add_to_stored(float* stored, const Accumulator& sum) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256 folded = _mm256_add_ps(_mm512_castps512_ps256(sum), _mm512_extractf32x8_ps(sum, 1));
  _mm256_storeu_ps(stored, _mm256_add_ps(_mm256_loadu_ps(stored), folded));
#else
  (Vec::loadu(stored) + Vec(sum)).store(stored);
#endif
}

// Adds a tile's kCount accumulators to the stored ones from `stored` on (consecutive slots). At
// 16 lanes two accumulators fold into one vector (their lower halves plus their upper halves,
// side by side: two slots of 8 lanes), one load, add and store for both.
template <int kCount>
C10_ALWAYS_INLINE void add_tile_to_stored(float* stored, const Accumulator (&sum)[kCount]) {
  int slot = 0;
#if defined(CPU_CAPABILITY_AVX512)
  EMTL_UNROLL
  for (; slot + 1 < kCount; slot += 2) {
    const __m512 lower = _mm512_shuffle_f32x4(sum[slot], sum[slot + 1], 0x44);
    const __m512 upper = _mm512_shuffle_f32x4(sum[slot], sum[slot + 1], 0xee);
    float* const pair = stored + slot * kAccLanes;
    _mm512_storeu_ps(pair, _mm512_add_ps(_mm512_loadu_ps(pair), _mm512_add_ps(lower, upper)));
  }
#endif
  EMTL_UNROLL
  for (; slot < kCount; ++slot) add_to_stored(stored + slot * kAccLanes, sum[slot]);
}

// Accumulates the pairs j <= i of rows[row0 + i] · rows[row0 + j] over n elements (a multiple
// of kVec) into acc (slot i(i+1)/2 + j), reading the rows in place. It asks for nothing ahead: it
// is the only tile (T <= 4, or a tail in the buffer), whose rows are long sequential streams that
// the hardware prefetchers follow (and the requests would have GCC keep 16-bit accumulators on
// the stack). The loops over i and j are unrolled so that the accumulators stay in registers.
//
// Vector registers: 32 with AVX-512, 16 with AVX2 (and counted so for the baseline).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// A triangle read in place has 1, 3, 6 or 10 accumulators: too few chains to keep the FMA units
// busy (each step's FMAs wait on the previous step's, 4 cycles), and an L2- or L3-resident 16-bit
// J was read at 0.6-0.8x float32's byte rate. Where twice the accumulators and the row vectors fit
// in the registers (with two to spare for the conversions), each slot has two, taking alternate
// vectors of the rows, summed at the end.
template <int NI>
constexpr int kSplit = 2 * NI * (NI + 1) / 2 + NI <= kVectorRegisters - 2 ? 2 : 1;

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

template <int NI, typename scalar_t = float>
void direct_triangle(const scalar_t* const* rows, float* const*, int64_t row0, int64_t n, const Ahead&,
                     float* acc) {
  constexpr int kCount = NI * (NI + 1) / 2;
  constexpr int kWays = kSplit<NI>;
  const scalar_t* a[NI];
  EMTL_UNROLL
  for (int i = 0; i < NI; ++i) a[i] = rows[row0 + i];
  Accumulator sum[kWays][kCount];
  EMTL_UNROLL
  for (int slot = 0; slot < kCount; ++slot) {
    EMTL_UNROLL
    for (int way = 0; way < kWays; ++way) sum[way][slot] = Vec(0.f);
  }
  int64_t e = 0;
  for (; e + kWays * kVec <= n; e += kWays * kVec) {
    EMTL_UNROLL
    for (int way = 0; way < kWays; ++way) sweep_step<NI>(a, e + way * kVec, sum[way]);
  }
  if (e < n) sweep_step<NI>(a, e, sum[0]);  // n is a multiple of kVec: one vector left at most
  Accumulator total[kCount];
  EMTL_UNROLL
  for (int slot = 0; slot < kCount; ++slot) {
    total[slot] = sum[0][slot];
    EMTL_UNROLL
    for (int way = 1; way < kWays; ++way) total[slot] = Vec(total[slot]) + Vec(sum[way][slot]);
  }
  add_tile_to_stored(acc, total);
}

// Copies (widens) rows[row0 + i] into copies[row0 + i] and accumulates their triangle, over n
// elements (a multiple of kVec). 16-bit rows are widened, stored and multiplied in one loop, from
// the widened registers: one thread, 16-bit T = 12 1.09-1.25x and T = 16 1.04-1.09x as fast as
// the copy a run ahead, T = 32 as fast (J of 2^20 and 2^22 columns). float32 rows are copied
// kCopyRun elements at a time and multiplied from the copy, the copy of one run reading memory
// while the arithmetic of the previous one is still under way (in one loop float32 ran up to
// 10 % slower).
constexpr int64_t kCopyRun = 16 * kVec;

template <int NI, typename scalar_t>
void buffered_triangle(const scalar_t* const* rows, float* const* copies, int64_t row0, int64_t n,
                       const Ahead& ahead, float* acc) {
  constexpr int kCount = NI * (NI + 1) / 2;
  const scalar_t* a[NI];
  float* copy[NI];
  EMTL_UNROLL
  for (int i = 0; i < NI; ++i) {
    a[i] = rows[row0 + i];
    copy[i] = copies[row0 + i];
  }
  const AheadWalk walk(ahead, n);
  Accumulator sum[kCount];
  EMTL_UNROLL
  for (int slot = 0; slot < kCount; ++slot) sum[slot] = Vec(0.f);
  if constexpr (sizeof(scalar_t) == 2) {
    for (int64_t e = 0; e < n; e += kVec) {
      walk.ask(e);
      Vec x[NI];
      EMTL_UNROLL
      for (int i = 0; i < NI; ++i) {
        x[i] = load(a[i] + e);
        x[i].store(copy[i] + e);
      }
      take_products(x, sum);
    }
  } else {
    for (int64_t run = 0; run < n; run += kCopyRun) {
      const int64_t stop = std::min(n, run + kCopyRun);
      for (int64_t e = run; e < stop; e += kVec) {
        EMTL_UNROLL
        for (int i = 0; i < NI; ++i) load(a[i] + e).store(copy[i] + e);
      }
      for (int64_t e = run; e < stop; e += kVec) {
        walk.ask(e);
        EMTL_UNROLL
        for (int i = 0; i < NI; ++i) {
          const Vec x = Vec::loadu(copy[i] + e);
          EMTL_UNROLL
          for (int j = 0; j <= i; ++j) {
            const Vec y = j == i ? x : Vec::loadu(copy[j] + e);
            fma_into(sum[i * (i + 1) / 2 + j], x, y);
          }
        }
      }
    }
  }
  add_tile_to_stored(acc, sum);
}

// The accumulator of rows[row0 + i] · rows[col0 + j] in a strip of NI rows by NJ columns: row-major
// NI × 3 blocks of 3 columns side by side (NI × NJ where NJ < 3), so that a strip of 6 columns
// holds its entries as two strips of 3 would.
constexpr int64_t strip_slot(int64_t rows, int64_t cols, int64_t i, int64_t j) {
  const int64_t group = cols < 3 ? cols : 3;
  return (j / group) * rows * group + i * group + j % group;
}

// Accumulates rows[row0 + i] · rows[col0 + j] over n elements (a multiple of kVec) into acc
// (strip_slot order).
template <int NI, int NJ>
C10_ALWAYS_INLINE void gram_strip(const float* const* rows, int64_t row0, int64_t col0, int64_t n, const Ahead& ahead,
                                  float* acc) {
  const float* a[NI];
  const float* b[NJ];
  EMTL_UNROLL
  for (int i = 0; i < NI; ++i) a[i] = rows[row0 + i];
  EMTL_UNROLL
  for (int j = 0; j < NJ; ++j) b[j] = rows[col0 + j];
  const AheadWalk walk(ahead, n);
  Accumulator sum[NI * NJ];
  EMTL_UNROLL
  for (int slot = 0; slot < NI * NJ; ++slot) sum[slot] = Vec(0.f);
  for (int64_t e = 0; e < n; e += kVec) {
    walk.ask(e);
    Vec y[NJ];
    EMTL_UNROLL
    for (int j = 0; j < NJ; ++j) y[j] = held_in_register(Vec::loadu(b[j] + e));
    EMTL_UNROLL
    for (int i = 0; i < NI; ++i) {
      const Vec x = held_in_register(Vec::loadu(a[i] + e));
      EMTL_UNROLL
      for (int j = 0; j < NJ; ++j) fma_into(sum[strip_slot(NI, NJ, i, j)], x, y[j]);
    }
  }
  add_tile_to_stored(acc, sum);
}

template <typename scalar_t>
using TriangleKernel = void (*)(const scalar_t* const*, float* const*, int64_t, int64_t, const Ahead&, float*);

// The triangle of `rows` rows from row0: through the buffer where strips read it (`buffered`),
// and for 4 rows of a 16-bit J with 16 registers (too few for 10 accumulators and the
// conversions).
template <int NI, typename scalar_t>
TriangleKernel<scalar_t> triangle_kernel(int64_t rows, bool buffered) {
  if constexpr (NI > 1) {
    if (rows < NI) return triangle_kernel<NI - 1, scalar_t>(rows, buffered);
  }
  if constexpr (std::is_same_v<scalar_t, float> || NI < kRowBlock || kVectorRegisters >= 32) {
    return buffered ? buffered_triangle<NI, scalar_t> : direct_triangle<NI, scalar_t>;
  } else {
    return buffered_triangle<NI, scalar_t>;
  }
}

// Columns of a row block's widest strip: 6 where the 24 accumulators and the 6 column vectors
// fit in the 32 registers (10 loads for 24 FMAs a step, against 7 for 12 at 3 columns), for
// more than kWideFrom tasks. One Zen 5 thread, 16-bit J in DRAM: 1.1-1.2x as fast at T = 32
// and 48, no faster at T = 20-28; at T = 16 the float32 pass (memory-bound) ran 10 % slower.
constexpr int64_t kWideStrip = kVectorRegisters >= 32 ? 6 : 3;
constexpr int64_t kWideFrom = 16;

// A strip of a row block: its first column, its columns (2, 3 or kWideStrip), its accumulators
// and the two rows of the next block it asks for.
struct StripTile {
  int64_t col0, cols, acc;
  int64_t ahead[2];
};

// The strips of the NI rows from row0, one after the other in one call.
template <int NI>
void row_block_strips(const float* const* rows, int64_t row0, const StripTile* strips, int64_t count, int64_t n,
                      const char* const* next_rows, int64_t element_bytes, float* acc) {
  for (const StripTile* strip = strips; strip < strips + count; ++strip) {
    const Ahead ahead = ahead_of(next_rows, strip->ahead, element_bytes);
    float* const strip_acc = acc + strip->acc * kAccLanes;
    switch (strip->cols) {
      case 2: gram_strip<NI, 2>(rows, row0, strip->col0, n, ahead, strip_acc); break;
      case 3: gram_strip<NI, 3>(rows, row0, strip->col0, n, ahead, strip_acc); break;
      default: gram_strip<NI, kWideStrip>(rows, row0, strip->col0, n, ahead, strip_acc); break;
    }
  }
}

using RowBlockKernel = void (*)(const float* const*, int64_t, const StripTile*, int64_t, int64_t,
                                const char* const*, int64_t, float*);

template <int NI>
RowBlockKernel row_block_kernel(int64_t rows) {
  if constexpr (NI > 1) {
    if (rows < NI) return row_block_kernel<NI - 1>(rows);
  }
  return row_block_strips<NI>;
}

// The columns of the next strip where `left` columns remain left of the diagonal: the widest
// that leaves no single column (left starts at a multiple of 4).
inline int64_t strip_columns(int64_t left, int64_t num_tasks) {
  if (left == 2 || left == 4) return 2;
  if (kWideStrip == 6 && num_tasks > kWideFrom && (left == 6 || left >= 8)) return 6;
  return 3;
}

// The tiles, row block by row block: its triangle, then its strips (strip_columns); which rows of
// the next block each tile asks for; and where each of G's lower entries accumulates.
template <typename scalar_t>
struct GramTiles {
  struct Triangle {
    int64_t row0, acc;
    TriangleKernel<scalar_t> from_j;
    TriangleKernel<float> from_copies;
    int64_t ahead[2];
  };
  std::vector<Triangle> triangles;             // one a row block
  std::vector<RowBlockKernel> strip_kernels;   // one a row block
  std::vector<std::vector<StripTile>> strips;  // those of each row block
  int64_t accumulators = 0;                    // of kAccLanes floats
  std::vector<int64_t> entry;                  // lower_pair_index(i, j) -> its accumulator

  explicit GramTiles(int64_t num_tasks) : entry(num_lower_pairs(num_tasks)) {
    const bool buffered = num_tasks > kRowBlock;  // a single triangle has no strips to copy for
    for (int64_t row0 = 0; row0 < num_tasks; row0 += kRowBlock) {
      const int64_t rows = std::min<int64_t>(kRowBlock, num_tasks - row0);
      triangles.push_back(Triangle{row0, accumulators, triangle_kernel<kRowBlock, scalar_t>(rows, buffered),
                                   triangle_kernel<kRowBlock, float>(rows, false), {}});
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j <= i; ++j) entry[lower_pair_index(row0 + i, row0 + j)] = accumulators++;
      }
      strip_kernels.push_back(row_block_kernel<kRowBlock>(rows));
      strips.emplace_back();
      for (int64_t col0 = 0; col0 < row0;) {
        const int64_t cols = strip_columns(row0 - col0, num_tasks);
        strips.back().push_back(StripTile{col0, cols, accumulators, {}});
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < rows; ++i) {
            entry[lower_pair_index(row0 + i, col0 + j)] = accumulators + strip_slot(rows, cols, i, j);
          }
        }
        accumulators += rows * cols;
        col0 += cols;
      }
    }
    assign_ahead(num_tasks);
  }

  // Tile t of the C tiles, in the order they run, asks for rows t and t + S (mod T), S = C mod T
  // (T/2 where C is a multiple of T, where a tile would ask for one row twice): every row where
  // 2C >= T, which holds from T = 5 on, where there are strips (a single triangle asks for
  // nothing).
  void assign_ahead(int64_t num_tasks) {
    int64_t tiles = static_cast<int64_t>(triangles.size());
    for (const auto& row_block : strips) tiles += static_cast<int64_t>(row_block.size());
    const int64_t shift = tiles % num_tasks != 0 ? tiles % num_tasks : num_tasks / 2;
    int64_t tile = 0;
    auto assign = [&](int64_t (&ahead)[2]) {
      ahead[0] = tile % num_tasks;
      ahead[1] = (tile + shift) % num_tasks;
      ++tile;
    };
    for (size_t r = 0; r < triangles.size(); ++r) {
      assign(triangles[r].ahead);
      for (auto& strip : strips[r]) assign(strip.ahead);
    }
  }
};

template <typename scalar_t>
void gram_range_of(const TaskTable& grads, int64_t begin, int64_t end, double* lower) {
  const int64_t num_tasks = grads.num_tasks;
  const int64_t block = gram_block(num_tasks);
  const GramTiles<scalar_t> tiling(num_tasks);
  std::vector<float> accumulators(tiling.accumulators * kAccLanes, 0.f);
  float* const acc = accumulators.data();
  // Written before it is read. Its rows start on cache lines (block is a multiple of 2 kVec
  // floats, a line from 8 lanes on): at 16 lanes, a load from a row that straddled two lines
  // would cost two.
  const std::unique_ptr<float[]> storage(new float[num_tasks * block + kCacheLine / sizeof(float)]);
  float* const buffer = line_aligned(storage.get());
  std::vector<float*> copies(num_tasks);
  for (int64_t i = 0; i < num_tasks; ++i) copies[i] = buffer + i * block;
  std::vector<const scalar_t*> rows(num_tasks);
  std::vector<const char*> next_rows(num_tasks);

  // The tiles over n elements (a multiple of kVec) of the rows (J, or the buffer: from_copies).
  auto run_tiles = [&](bool from_copies, int64_t n, int64_t element_bytes) {
    for (size_t r = 0; r < tiling.triangles.size(); ++r) {
      const auto& triangle = tiling.triangles[r];
      const Ahead ahead = ahead_of(next_rows.data(), triangle.ahead, element_bytes);
      float* const triangle_acc = acc + triangle.acc * kAccLanes;
      if (from_copies) {
        triangle.from_copies(copies.data(), nullptr, triangle.row0, n, ahead, triangle_acc);
      } else {
        triangle.from_j(rows.data(), copies.data(), triangle.row0, n, ahead, triangle_acc);
      }
      const auto& strips = tiling.strips[r];
      tiling.strip_kernels[r](copies.data(), triangle.row0, strips.data(), static_cast<int64_t>(strips.size()), n,
                              next_rows.data(), element_bytes, acc);
    }
  };
  // n elements of tensor k from position start; `next` where the next block starts.
  auto run_block = [&](int64_t k, int64_t start, int64_t n, int64_t next) {
    for (int64_t i = 0; i < num_tasks; ++i) {
      rows[i] = piece<scalar_t>(grads, i, k) + start;
      next_rows[i] = reinterpret_cast<const char*>(piece<scalar_t>(grads, i, k) + next);
    }
    run_tiles(false, n, sizeof(scalar_t));
  };
  // The last n < kVec elements of a segment, widened into the buffer with zeros after them (the
  // tiles ask for the buffer, already in L1).
  auto run_tail = [&](int64_t k, int64_t start, int64_t n) {
    for (int64_t i = 0; i < num_tasks; ++i) {
      load(piece<scalar_t>(grads, i, k) + start, n).store(copies[i]);
      next_rows[i] = reinterpret_cast<const char*>(copies[i]);
    }
    run_tiles(true, kVec, sizeof(float));
  };
  for_each_segment(grads, begin, end, [&](int64_t k, int64_t first, int64_t last) {
    const int64_t whole_end = first + (last - first) / kVec * kVec;
    for (int64_t start = first; start < whole_end; start += block) {
      const int64_t n = std::min(block, whole_end - start);
      // The last block of a segment asks for itself: nothing lies past the segment's end.
      run_block(k, start, n, start + n < whole_end ? start + n : start);
    }
    if (whole_end < last) run_tail(k, whole_end, last - whole_end);
  });

  for (int64_t index = 0; index < num_lower_pairs(num_tasks); ++index) {
    lower[index] = lane_sum(Vec::loadu(acc + tiling.entry[index] * kAccLanes, kAccLanes));
  }
}

// ---- Gram matrix of 5 to 8 rows in registers (32 vector registers)
//
// Each step widens the T row vectors once into registers and takes all of their products there:
// no float32 buffer to copy the rows through and no call per tile, which at these T cost the
// tiles as much as their arithmetic. Where the T(T+1)/2 accumulators and the T rows outgrow the
// registers (T >= 7), a block of the rows is read twice, the second time from L1: first the
// triangles of rows 0-3 and of rows 4 on, then the square between them. Each sweep asks for its
// share of the rows kSweepAheadBytes ahead, a cache line of each a step: all of them where one
// sweep reads the block, rows 0-3 and then rows 4 on where two do (asking for all in the first
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

// ---- squared norms: up to 4 rows side by side, one accumulator each (a step's FMAs on the 4
// rows are independent; more accumulators leave GCC storing them to the stack every step)

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

// ---- weighted combination
//
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

const KernelTable& kernels() {
  static constexpr KernelTable table{EMTL_CPU_ISA_NAME, gram_range, sq_norms_range, combine_range};
  return table;
}

}  // namespace emtl::cpu::EMTL_CPU_ISA
