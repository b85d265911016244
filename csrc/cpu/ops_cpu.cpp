// The CPU implementations of the ops: checks, the fixed chunking, parallel_for, and the pick of
// the kernel variant for this CPU.
//
// Determinism: J's concatenated rows are cut into chunks whose size depends only on P and T,
// never on the thread count. Each chunk's Gram (or norm) partial goes to its own slot and the
// slots are summed in chunk order, so the result is bit-identical for any number of threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <vector>

#include "../task_pieces.h"
#include "kernels.h"
#include "ops_cpu.h"

namespace emtl::cpu {
namespace {

// The kernel variants, narrowest first: each pass runs on the widest the CPU supports (AVX-512
// where it has avx512f/bw/vl/dq and AVX2's extensions, else AVX2 where it has avx2, fma and
// f16c, else the baseline), unless kNarrowerPasses below names a narrower one for its dtype and
// T. EMTL_CPU_ISA=avx512, =avx2 or =baseline runs every pass on that variant (or the widest the
// CPU has, if narrower) and sets the table aside, so that each variant can be tested and measured
// on a wide CPU.
enum class Isa : int { kBaseline, kAvx2, kAvx512 };
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

// Where a narrower variant measured faster than the widest on an AMD Zen 5 core (one thread,
// thread time, both variants interleaved, J of 2^20 and 2^22 columns; csrc/README.md). The pick
// depends only on (pass, dtype, T) and the CPU, never on the data.
struct NarrowerPass {
  Pass pass;
  Storage storage;
  int64_t min_tasks, max_tasks;
  Isa isa;
};
constexpr int64_t kAnyT = std::numeric_limits<int64_t>::max();
constexpr NarrowerPass kNarrowerPasses[] = {
    // float32 tiles through the L1 buffer (T = 9-12): 13-32 % slower at 16 lanes on a J in DRAM.
    // T = 5-8 take the register sweeps at 16 lanes: 1.6-2x as fast as these tiles at 8 lanes on
    // a J in L2, 1.2-1.9x in L3, 0.94-1.9x in DRAM.
    {Pass::kGram, Storage::kFloat32, 9, 12, Isa::kAvx2},
    // 16-bit rows in two groups or more (T > 8): 15-25 % slower at 16 lanes on a J in DRAM.
    {Pass::kCombine, Storage::kBFloat16, 9, kAnyT, Isa::kAvx2},
    {Pass::kCombine, Storage::kFloat16, 9, kAnyT, Isa::kAvx2},
};

Isa widest_supported() {
#if defined(EMTL_WITH_AVX2_KERNELS)
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#if defined(EMTL_WITH_AVX512_KERNELS)
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::kAvx512;
  }
#endif
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The variant EMTL_CPU_ISA names, or none.
std::optional<Isa> forced_isa() {
  const char* forced = std::getenv("EMTL_CPU_ISA");
  if (forced == nullptr) return std::nullopt;
  for (int isa = 0; isa < static_cast<int>(std::size(kIsaNames)); ++isa) {
    if (std::strcmp(forced, kIsaNames[isa]) == 0) return static_cast<Isa>(isa);
  }
  return std::nullopt;
}

struct IsaChoice {
  Isa widest;      // the CPU's widest, capped by EMTL_CPU_ISA
  bool use_table;  // false where EMTL_CPU_ISA names a variant
};

const IsaChoice& isa_choice() {
  static const IsaChoice choice = [] {
    const Isa widest = widest_supported();
    const std::optional<Isa> forced = forced_isa();
    return forced ? IsaChoice{std::min(*forced, widest), false} : IsaChoice{widest, true};
  }();
  return choice;
}

Isa pass_isa(Pass pass, Storage storage, int64_t num_tasks) {
  const IsaChoice& choice = isa_choice();
  if (choice.use_table) {
    for (const NarrowerPass& narrower : kNarrowerPasses) {
      if (narrower.pass == pass && narrower.storage == storage && narrower.min_tasks <= num_tasks &&
          num_tasks <= narrower.max_tasks) {
        return std::min(narrower.isa, choice.widest);
      }
    }
  }
  return choice.widest;
}

const KernelTable& kernels(Pass pass, Storage storage, int64_t num_tasks) {
  switch (pass_isa(pass, storage, num_tasks)) {
#if defined(EMTL_WITH_AVX512_KERNELS)
    case Isa::kAvx512:
      return avx512_kernels();
#endif
#if defined(EMTL_WITH_AVX2_KERNELS)
    case Isa::kAvx2:
      return avx2_kernels();
#endif
    default:
      return default_kernels();
  }
}

// At least ~2^15 elements a chunk (per task: enough work to amortise a partial slot), at least
// 8T (so the T(T+1)/2 partial sums stay small beside the data) and at most kMaxChunks chunks.
constexpr int64_t kMinChunk = int64_t{1} << 15;
constexpr int64_t kMaxChunks = 256;

struct Chunking {
  int64_t size, count;
};

Chunking chunking(int64_t numel, int64_t num_tasks) {
  const int64_t at_most_max = (numel + kMaxChunks - 1) / kMaxChunks;
  int64_t size = std::max({kMinChunk, 8 * num_tasks, at_most_max});
  size = (size + 63) / 64 * 64;
  return Chunking{size, std::max<int64_t>(1, (numel + size - 1) / size)};
}

// body(chunk, begin, end) for every chunk, in parallel. The threads take chunks from a shared
// counter rather than a fixed share each: on a loaded machine a thread that is descheduled
// does not hold the others up. Which thread runs a chunk never changes the result.
template <typename F>
void parallel_over_chunks(const Chunking& chunks, int64_t numel, F&& body) {
  std::atomic<int64_t> next_chunk{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks.count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t chunk = next_chunk++; chunk < chunks.count; chunk = next_chunk++) {
      body(chunk, chunk * chunks.size, std::min(numel, (chunk + 1) * chunks.size));
    }
  });
}

// Runs range_kernel(begin, end, partial) on every chunk, each into its own `width` doubles, and
// sums the partials in chunk order.
template <typename F>
std::vector<double> reduce_over_chunks(const TaskPieces& grads, int64_t width, F&& range_kernel) {
  const Chunking chunks = chunking(grads.numel(), grads.num_tasks());
  std::vector<double> partials(chunks.count * width, 0.0);
  if (grads.numel() > 0) {
    parallel_over_chunks(chunks, grads.numel(), [&](int64_t chunk, int64_t begin, int64_t end) {
      range_kernel(begin, end, partials.data() + chunk * width);
    });
  }
  std::vector<double> total(width, 0.0);
  for (size_t base = 0; base < partials.size(); base += width) {
    for (int64_t index = 0; index < width; ++index) total[index] += partials[base + index];
  }
  return total;
}

at::Tensor task_gram(at::TensorList pieces, int64_t num_tasks) {
  const TaskPieces grads(pieces, num_tasks, "emtl_kernels::task_gram");
  const TaskTable table = grads.table();
  const KernelTable& gram_kernels = kernels(Pass::kGram, table.storage, num_tasks);
  const std::vector<double> lower =
      reduce_over_chunks(grads, num_lower_pairs(num_tasks), [&](int64_t begin, int64_t end, double* partial) {
        gram_kernels.gram_range(table, begin, end, partial);
      });
  at::Tensor gram = at::empty({num_tasks, num_tasks}, grads.options().dtype(at::kFloat));
  float* out = gram.data_ptr<float>();
  for (int64_t i = 0; i < num_tasks; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      out[i * num_tasks + j] = out[j * num_tasks + i] = static_cast<float>(lower[lower_pair_index(i, j)]);
    }
  }
  return gram;
}

at::Tensor task_sq_norms(at::TensorList pieces, int64_t num_tasks) {
  const TaskPieces grads(pieces, num_tasks, "emtl_kernels::task_sq_norms");
  const TaskTable table = grads.table();
  const KernelTable& norm_kernels = kernels(Pass::kSqNorms, table.storage, num_tasks);
  const std::vector<double> total =
      reduce_over_chunks(grads, num_tasks, [&](int64_t begin, int64_t end, double* partial) {
        norm_kernels.sq_norms_range(table, begin, end, partial);
      });
  at::Tensor sq_norms = at::empty({num_tasks}, grads.options().dtype(at::kFloat));
  std::copy(total.begin(), total.end(), sq_norms.data_ptr<float>());
  return sq_norms;
}

void weighted_combine_(at::TensorList pieces, int64_t num_tasks, const at::Tensor& weights, at::TensorList outs,
                       bool accumulate) {
  const char* op = "emtl_kernels::weighted_combine_";
  const TaskPieces grads(pieces, num_tasks, op);
  const std::vector<void*> out_pointers = checked_combine_outputs(grads, weights, outs, op);
  // A task with weight exactly 0 is never read: its gradient may hold inf or NaN.
  const float* all_weights = weights.data_ptr<float>();
  std::vector<int64_t> tasks;
  std::vector<float> active_weights;
  for (int64_t task = 0; task < num_tasks; ++task) {
    if (all_weights[task] != 0.f) {
      tasks.push_back(task);
      active_weights.push_back(all_weights[task]);
    }
  }
  if (tasks.empty()) {
    if (!accumulate) {
      for (const at::Tensor& out : outs) out.zero_();
    }
    return;
  }
  const ActiveTasks active{tasks.data(), active_weights.data(), static_cast<int64_t>(tasks.size())};
  const TaskTable table = grads.table();
  const Chunking chunks = chunking(grads.numel(), num_tasks);
  const KernelTable& combine_kernels = kernels(Pass::kCombine, table.storage, num_tasks);
  parallel_over_chunks(chunks, grads.numel(), [&](int64_t, int64_t begin, int64_t end) {
    combine_kernels.combine_range(table, active, out_pointers.data(), accumulate, begin, end);
  });
}

}  // namespace

const char* widest_kernel_isa() { return kIsaNames[static_cast<int>(isa_choice().widest)]; }

const char* pass_kernel_isa(Pass pass, Storage storage, int64_t num_tasks) {
  return kIsaNames[static_cast<int>(pass_isa(pass, storage, num_tasks))];
}

TORCH_LIBRARY_IMPL(emtl_kernels, CPU, m) {
  m.impl("task_gram", &task_gram);
  m.impl("task_sq_norms", &task_sq_norms);
  m.impl("weighted_combine_", &weighted_combine_);
}

}  // namespace emtl::cpu
