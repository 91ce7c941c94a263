// Fused one-pass merges on the CPU: into memory, or straight into output files.
//
// Both run on contiguous per-thread slices (parallel.h), through the direct path (direct_path.h:
// plain task arithmetic over one dtype) or else the tile layer (tiles.h).  A sweep's K recipes
// share one read of each input.
#include "cpu_merge.h"

#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "crc32c.h"
#include "direct_path.h"
#include "file_io.h"
#include "merge_math.h"
#include "model_set.h"
#include "parallel.h"
#include "tiles.h"

namespace mergealign {
namespace {

// Outputs to memory at least this large are written with streaming stores where the direct path
// runs: 8 MiB outgrows a core's L2 (0.5-2 MiB) and most of its share of L3, so the result leaves
// the caches before anyone reads it, and a normal store would first read each line from memory
// (a fifth more traffic for 3 inputs and 1 output).
constexpr int64_t kStreamingOutputBytes = 8 << 20;

// Elements [begin, end) of the operands, merged with each of `k` recipes: output element i of
// recipe j goes to outs[j][i - begin].  The input tiles are loaded once for all recipes, so a
// sweep of K weightings reads the inputs once ((3 + K) N bytes instead of 4 K N).  With
// `nonfinite`, nonfinite[j] is increased by the outputs of recipe j that are NaN or ±inf once
// stored (a compare per element on the fp32 tile, which is in L1 anyway).  `stream`: the outputs
// go to memory that will not be read soon (the direct path may use streaming stores).
MA_CPU_CLONES
void merge_range_multi(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                       int64_t end, unsigned char* const* outs, int64_t* nonfinite,
                       bool stream) {
  if (direct_path_applies(ops, recipes, k)) {
    merge_range_direct(ops, recipes, k, begin, end, outs, nonfinite, stream);
    return;
  }
  alignas(64) float merged[kTile];
  const float limit = overflow_threshold(ops.out_dtype);
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a,
                                     int64_t start, int64_t n) __attribute__((always_inline)) {
    for (int j = 0; j < k; ++j) {
      merge_tile(recipes[j], b, d, a, ops.first_index + start, n, merged);
      store_tile(outs[j], ops.out_dtype, start - begin, n, merged);
      if (nonfinite != nullptr) {
        int64_t bad = 0;
        for (int64_t i = 0; i < n; ++i) bad += !(std::fabs(merged[i]) < limit);
        nonfinite[j] += bad;
      }
    }
  });
}

Recipe task_arithmetic(float w_domain, float w_align) {
  Recipe r;
  r.domain.weight = w_domain;
  r.align.weight = w_align;
  return r;
}

// Write buffers survive between calls: freshly mapped memory filled at ~2 GB/s on first touch
// against ~11 GB/s once resident (measured on the CI VM), so allocating per call would halve
// the speed.
struct WriteBuffers {
  std::mutex lock;  // held for a whole merge_cpu_to_file call
  std::vector<std::unique_ptr<unsigned char, decltype(&std::free)>> per_thread;

  // Room for a piece plus the shift that aligns it with the inputs (direct_buffer_offset).
  unsigned char* get(int t) {
    while (int(per_thread.size()) <= t) {
      auto* p = static_cast<unsigned char*>(
          std::aligned_alloc(64, kWritePieceBytes + kDirectAlignment));
      if (p == nullptr) throw std::bad_alloc();
      per_thread.emplace_back(p, &std::free);
    }
    return per_thread[t].get();
  }
};

WriteBuffers& write_buffers() {
  static WriteBuffers buffers;
  return buffers;
}

}  // namespace

void merge_cpu_recipe(const MergeOperands& ops, const Recipe& recipe, unsigned char* out,
                      int threads) {
  if (ops.count <= 0) return;
  const int n_threads = effective_threads(ops.count, threads);
  const int64_t out_size = dtype_size(ops.out_dtype);
  const bool stream = ops.count * out_size >= kStreamingOutputBytes;
  parallel_slices(ops.count, n_threads, kTile, [&](int, int64_t begin, int64_t end) {
    unsigned char* slice_out = out + begin * out_size;
    merge_range_multi(ops, &recipe, 1, begin, end, &slice_out, nullptr, stream);
  });
}

void merge_cpu(const MergeOperands& ops, unsigned char* out, int threads) {
  merge_cpu_recipe(ops, task_arithmetic(ops.w_domain, ops.w_align), out, threads);
}

namespace {

// The pieces of a merge of `count` elements written to k files: compute(t, start, n, outs,
// nonfinite_row) fills outs[j] with elements [start, start + n) of target j; shift(start) is
// where in its buffer a piece starts.  The one writer behind merge_cpu_to_files and
// merge_set_to_files; see merge_cpu_to_files in cpu_merge.h for what it returns.
template <typename Shift, typename Compute>
int write_merged(int64_t count, int out_dtype, const int* fds, const int64_t* offsets, int k,
                 int threads, uint32_t* crcs, int64_t* nonfinite, Shift shift, Compute compute) {
  std::fill(crcs, crcs + k, 0u);
  std::fill(nonfinite, nonfinite + k, int64_t(0));
  if (count <= 0 || k <= 0) return 0;
  const int n_threads = effective_threads(count, threads);
  const int64_t out_size = dtype_size(out_dtype);
  const int64_t piece = kWritePieceBytes / out_size;
  WriteBuffers& buffers = write_buffers();
  std::lock_guard<std::mutex> hold(buffers.lock);
  std::vector<unsigned char*> thread_buffers(size_t(n_threads) * k);  // [thread][target]
  for (size_t i = 0; i < thread_buffers.size(); ++i) thread_buffers[i] = buffers.get(int(i));

  // Each piece is checksummed while it is still in cache, and the pieces' CRCs are joined in file
  // order afterwards: the shard checksum costs no second pass over the output.
  const int64_t pieces = (count + piece - 1) / piece;
  std::vector<uint32_t> piece_crc(size_t(pieces) * k);  // [piece][target]
  std::vector<int64_t> thread_nonfinite(size_t(n_threads) * k, 0);  // [thread][target]
  std::atomic<int> first_error{0};
  // Buffered writes to one file serialise on the inode lock anyway, and a thread waiting for it
  // in the kernel spins (rwsem_spin_on_owner: 26% of all cycles in a perf profile of a 1.1B
  // merge).  Taking turns here instead lets the waiting thread sleep while the writer copies,
  // and the other thread compute its next piece meanwhile.
  std::vector<std::mutex> write_turn(k);
  auto fail = [&first_error](int err) {
    int expected = 0;
    first_error.compare_exchange_strong(expected, err);
  };
  parallel_slices(count, n_threads, piece, [&](int t, int64_t begin, int64_t end) {
    std::vector<unsigned char*> outs(k);
    for (int64_t start = begin; start < end && first_error.load() == 0; start += piece) {
      const int64_t n = std::min(piece, end - start);
      const int64_t offset = shift(start);
      for (int j = 0; j < k; ++j) outs[j] = thread_buffers[size_t(t) * k + j] + offset;
      // Armed only while reading the mapped inputs.
      auto guarded = [&]() __attribute__((noinline)) {
        compute(start, n, outs.data(), &thread_nonfinite[size_t(t) * k]);
      };
      if (!run_guarded(guarded)) {
        fail(EFAULT);
        return;
      }
      for (int j = 0; j < k; ++j) {
        piece_crc[size_t(start / piece) * k + j] = crc32c_update(0, outs[j], size_t(n * out_size));
        std::lock_guard<std::mutex> turn(write_turn[j]);
        const int err = write_all(fds[j], outs[j], n * out_size, offsets[j] + start * out_size);
        if (err != 0) fail(err);
      }
    }
  });
  if (first_error.load() != 0) return first_error.load();
  for (int t = 0; t < n_threads; ++t) {
    for (int j = 0; j < k; ++j) nonfinite[j] += thread_nonfinite[size_t(t) * k + j];
  }
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t bytes = std::min<int64_t>(piece, count - i * piece) * out_size;
    for (int j = 0; j < k; ++j) {
      const uint32_t c = piece_crc[size_t(i) * k + j];
      crcs[j] = i == 0 ? c : crc32c_combine(crcs[j], c, uint64_t(bytes));
    }
  }
  return 0;
}

// The targets' file descriptors, offsets and recipes, as write_merged and the kernels take them.
template <typename Target>
struct SplitTargets {
  std::vector<int> fds;
  std::vector<int64_t> offsets;
  std::vector<decltype(Target::recipe)> recipes;

  SplitTargets(const Target* targets, int k) {
    for (int j = 0; j < k; ++j) {
      fds.push_back(targets[j].fd);
      offsets.push_back(targets[j].file_offset);
      recipes.push_back(targets[j].recipe);
    }
  }
};

}  // namespace

int merge_cpu_to_files(const MergeOperands& ops, const WriteTarget* targets, int k, int threads,
                       uint32_t* crcs, int64_t* nonfinite) {
  const SplitTargets<WriteTarget> t(targets, k);
  return write_merged(
      ops.count, ops.out_dtype, t.fds.data(), t.offsets.data(), k, threads, crcs, nonfinite,
      // The piece sits as far from a 32-byte boundary as its first input element does, so the
      // direct path's aligned loads meet aligned stores.
      [&](int64_t start) { return direct_buffer_offset(ops, start); },
      [&](int64_t start, int64_t n, unsigned char* const* outs, int64_t* bad) {
        merge_range_multi(ops, t.recipes.data(), k, start, start + n, outs, bad, false);
      });
}

int merge_set_to_files(const ModelSetOperands& ops, const SetWriteTarget* targets, int k,
                       int threads, uint32_t* crcs, int64_t* nonfinite) {
  const SplitTargets<SetWriteTarget> t(targets, k);
  return write_merged(
      ops.count, ops.out_dtype, t.fds.data(), t.offsets.data(), k, threads, crcs, nonfinite,
      [](int64_t) { return int64_t(0); },
      [&](int64_t start, int64_t n, unsigned char* const* outs, int64_t* bad) {
        merge_set_range(ops, t.recipes.data(), k, start, start + n, outs, bad);
      });
}

void merge_cpu_elementwise(const MergeOperands& ops, const Recipe& recipe, unsigned char* out) {
  for (int64_t i = 0; i < ops.count; ++i) {
    const float b = load_input(ops.base, i, ops.base_dtype, ops.input_cast);
    const float d = load_input(ops.domain, i, ops.domain_dtype, ops.input_cast);
    const float a = load_input(ops.aligned, i, ops.aligned_dtype, ops.input_cast);
    store_from_f32(out, i, ops.out_dtype, merge_element(recipe, b, d, a, ops.first_index + i));
  }
}

namespace {

// Values whose exponent bits are all ones (±inf, NaN) among `count` stored words; integer
// compares on the bits, one loop per word size, which GCC vectorises.
template <typename Word>
int64_t count_all_ones_exponent(const unsigned char* data, int64_t count, Word magnitude_mask,
                                Word exponent_mask) {
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    Word w;
    memcpy(&w, data + i * int64_t(sizeof(Word)), sizeof w);
    bad += (w & magnitude_mask) >= exponent_mask;
  }
  return bad;
}

}  // namespace

int64_t count_nonfinite(const unsigned char* data, int64_t count, int dtype) {
  if (dtype == kF32) return count_all_ones_exponent<uint32_t>(data, count, 0x7fffffffu, 0x7f800000u);
  if (dtype == kBF16) return count_all_ones_exponent<uint16_t>(data, count, 0x7fff, 0x7f80);
  return count_all_ones_exponent<uint16_t>(data, count, 0x7fff, 0x7c00);
}

bool cpu_uses_f16c() {
#ifdef MA_HAVE_F16C_PATH
  return cpu_has_f16c();
#else
  return false;
#endif
}

void copy_threads(unsigned char* dst, const unsigned char* src, int64_t bytes, int threads) {
  if (bytes <= 0) return;
  // 4 KiB granules: page-aligned slices, as the kernel's reads of mapped files are.
  parallel_slices(bytes, std::max(1, threads), 4096, [&](int, int64_t begin, int64_t end) {
    std::memcpy(dst + begin, src + begin, size_t(end - begin));
  });
}

std::string cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
#endif
  return "baseline";
}

}  // namespace mergealign
