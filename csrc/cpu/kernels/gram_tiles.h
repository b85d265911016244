// The Gram pass in register tiles through a float32 block in L1 (every T outside the register
// sweeps).
// Part of the CPU kernels: included by kernels_impl.h alone, once per instruction-set variant.
#pragma once

namespace emtl::cpu::EMTL_CPU_ISA {
namespace {

// From 5 to 8 tasks with 32 vector registers, all of the products are taken from registers in one
// or two sweeps over a block (register_gram_range, gram_sweeps.h). Otherwise the lower triangle of
// the T×T products is computed in register tiles, column block by column block: per block of 4
// rows, a triangle on the diagonal (10 accumulators), then strips of those 4 rows by 3 or 6 columns
// below it (12 or 24 accumulators, 7 loads for 12 FMAs or 10 for 24; 2 columns where 4 or 2
// remain), all in one call. Where there are strips (T > 4), each triangle copies its 4 rows of the
// block from J into a float32 buffer in L1 (widening 16-bit rows) as it accumulates them, and its
// strips read the buffer: the strips never read rows of J, which lie a power of two apart and would
// compete for the same L1 sets, and each element is converted once. A single triangle (T <= 4)
// reads J in place, a few long sequential streams (16-bit: up to 3 rows converted in registers, 4
// through the buffer with 16 vector registers, in registers with 32).
//
// Where there are strips, a block's tiles also ask for the next block's rows of J, two rows a
// tile, a cache line a step: the next block reaches the caches while this one is computed, the
// requests spread over all of its arithmetic. (The hardware prefetchers lose each row's stream
// at every block boundary, and a triangle's own requests alone come in bursts that the miss
// buffers cannot hold.)

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

// A triangle read in place has 1, 3, 6 or 10 accumulators: too few chains to keep the FMA units
// busy (each step's FMAs wait on the previous step's, 4 cycles), and an L2- or L3-resident 16-bit
// J was read at 0.6-0.8x float32's byte rate. Where twice the accumulators and the row vectors fit
// in the registers (with two to spare for the conversions), each slot has two, taking alternate
// vectors of the rows, summed at the end.
template <int NI>
constexpr int kSplit = 2 * NI * (NI + 1) / 2 + NI <= kVectorRegisters - 2 ? 2 : 1;

// Accumulates the pairs j <= i of rows[row0 + i] · rows[row0 + j] over n elements (a multiple
// of kVec) into acc (slot i(i+1)/2 + j), reading the rows in place. It asks for nothing ahead: it
// is the only tile (T <= 4, or a tail in the buffer), whose rows are long sequential streams that
// the hardware prefetchers follow (and the requests would have GCC keep 16-bit accumulators on
// the stack). The loops over i and j are unrolled so that the accumulators stay in registers.
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
    const float* copied[NI];
    EMTL_UNROLL
    for (int i = 0; i < NI; ++i) copied[i] = copy[i];
    for (int64_t run = 0; run < n; run += kCopyRun) {
      const int64_t stop = std::min(n, run + kCopyRun);
      for (int64_t e = run; e < stop; e += kVec) {
        EMTL_UNROLL
        for (int i = 0; i < NI; ++i) load(a[i] + e).store(copy[i] + e);
      }
      for (int64_t e = run; e < stop; e += kVec) {
        walk.ask(e);
        sweep_step<NI>(copied, e, sum);
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

}  // namespace
}  // namespace emtl::cpu::EMTL_CPU_ISA
