// Fused one-pass merge on the CPU.
//
// Data moves in tiles of kTile elements: each input tile is widened to fp32 in a small stack
// array (1 KiB per input, stays in L1), the formula runs on the fp32 tiles, and the result is
// rounded once into the output.  Tiles keep the number of compiled loops at 3 loads + 1 formula +
// 3 stores instead of 3^4 dtype combinations, and each of those loops is a straight line GCC
// vectorises.  Nothing the size of a tensor is ever allocated.
//
// No -march=native: the hot function is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the
// baseline, and the loader picks one at run time (GCC target_clones / ifunc).  Because the build
// uses -ffp-contract=off, every clone computes bit-identical results.
#include "cpu_merge.h"

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "merge_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define MA_HAVE_F16C_PATH 1
#define MA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MA_CPU_CLONES
#endif

namespace mergealign {
namespace {

// 256 fp32 per input tile: 3 inputs + 1 result = 4 KiB, a tenth of a 32-48 KiB L1d.
constexpr int64_t kTile = 256;

// Output bytes per pwrite.  Writes of 16 MiB measured 0.8-6.5 s for 2.2 GB on this VM against
// 0.59 s for 256 KiB writes (DESIGN.md); 1 MiB keeps the per-call overhead negligible while
// staying in the fast regime, and the per-thread buffer stays L2-sized.
constexpr int64_t kWritePieceBytes = 1 << 20;

// Below this many elements one thread does the work: starting a thread (~20-50 us) costs more
// than a 64 Ki-element pass (~40 us at 10 GB/s).
constexpr int64_t kMinElementsPerThread = 1 << 16;

// ---- IEEE half through F16C ----------------------------------------------------------------
// The portable conversions of merge_math.h cost ~10 integer operations per element; on one
// thread an fp16 merge was compute-bound at 16 GB/s against 34 GB/s for bf16.  F16C converts 8
// values per instruction with the same round-to-nearest-even (and quiets NaNs as merge_math.h
// does), so results are bit-identical; it is used when the CPU has it, decided once.

#ifdef MA_HAVE_F16C_PATH
// MERGEALIGN_NO_F16C=1 forces the portable path (the tests compare the two bit for bit).
bool cpu_has_f16c() {
  static const bool yes = [] {
    const char* off = std::getenv("MERGEALIGN_NO_F16C");
    if (off != nullptr && off[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}

__attribute__((target("avx2,f16c"))) void load_half_tile_f16c(const unsigned char* src,
                                                                int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_store_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = load_as_f32(src, i, kF16);
}

__attribute__((target("avx2,f16c"))) void store_half_tile_f16c(unsigned char* dst, int64_t count,
                                                                 const float* src) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_load_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), h);
  }
  for (; i < count; ++i) store_from_f32(dst, i, kF16, src[i]);
}
#endif

inline void load_tile(const unsigned char* src, int dtype, int64_t start, int64_t count,
                      float* dst) {
  switch (dtype) {
    case kBF16:
      for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, start + i, kBF16);
      break;
    case kF16:
#ifdef MA_HAVE_F16C_PATH
      if (cpu_has_f16c()) {
        load_half_tile_f16c(src + 2 * start, count, dst);
        break;
      }
#endif
      for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, start + i, kF16);
      break;
    default:
      for (int64_t i = 0; i < count; ++i) dst[i] = load_as_f32(src, start + i, kF32);
      break;
  }
}

inline void store_tile(unsigned char* dst, int dtype, int64_t start, int64_t count,
                       const float* src) {
  switch (dtype) {
    case kBF16:
      for (int64_t i = 0; i < count; ++i) store_from_f32(dst, start + i, kBF16, src[i]);
      break;
    case kF16:
#ifdef MA_HAVE_F16C_PATH
      if (cpu_has_f16c()) {
        store_half_tile_f16c(dst + 2 * start, count, src);
        break;
      }
#endif
      for (int64_t i = 0; i < count; ++i) store_from_f32(dst, start + i, kF16, src[i]);
      break;
    default:
      for (int64_t i = 0; i < count; ++i) store_from_f32(dst, start + i, kF32, src[i]);
      break;
  }
}

// Calls body(b, d, a, start, n) for each tile of elements [begin, end) of the three inputs,
// widened to fp32: the one place inputs are read, for merges and statistics alike.
template <typename Body>
inline __attribute__((always_inline)) void for_each_tile(const MergeOperands& ops,
                                                         int64_t begin, int64_t end, Body body) {
  alignas(64) float b[kTile];
  alignas(64) float d[kTile];
  alignas(64) float a[kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = std::min(kTile, end - start);
    load_tile(ops.base, ops.base_dtype, start, n, b);
    load_tile(ops.domain, ops.domain_dtype, start, n, d);
    load_tile(ops.aligned, ops.aligned_dtype, start, n, a);
    body(b, d, a, start, n);
  }
}

// keep[i] = term_keeps(term, tau[i], first + i) for one tile (n <= kTile), in loops the compiler
// vectorises: the tie limit becomes a count of leading elements and the random draw's high half
// is mixed once per tile.
inline __attribute__((always_inline)) void keep_tile(const VectorTerm& term, const float* tau,
                                                     int64_t first, int n, uint32_t* keep) {
  if (term.sparsify == kKeepLargest) {
    const uint32_t min_bits = term.min_magnitude_bits;
    const int64_t last = term.last_tie_index;
    const int tie_limit = last >= first + n ? n : (last < first ? 0 : int(last - first + 1));
    for (int i = 0; i < n; ++i) {
      const uint32_t m = magnitude_bits(tau[i]);
      keep[i] = uint32_t((m > min_bits) | ((m == min_bits) & (i < tie_limit)));
    }
  } else if (term.sparsify == kKeepRandom) {
    const uint64_t f = uint64_t(first);
    if ((f >> 32) != ((f + uint64_t(n) - 1) >> 32)) {  // the tile straddles 2^32: per element
      for (int i = 0; i < n; ++i) keep[i] = uint32_t(term_keeps(term, tau[i], first + i));
      return;
    }
    const uint32_t hi = high_mix(term.key_hi, uint32_t(f >> 32));
    const uint32_t lo = uint32_t(f);
    const uint32_t key_lo = term.key_lo;
    const uint32_t below = term.keep_below;
    for (int i = 0; i < n; ++i) keep[i] = uint32_t(draw24(key_lo, hi, lo + uint32_t(i)) < below);
  } else {
    for (int i = 0; i < n; ++i) keep[i] = 1;
  }
}

// Task vectors of one tile, which of their elements each term keeps, and the terms.
struct VectorTile {
  alignas(64) float tau_d[kTile];
  alignas(64) float tau_a[kTile];
  alignas(64) uint32_t keep_d[kTile];  // 32-bit like the floats: GCC vectorises the selects
  alignas(64) uint32_t keep_a[kTile];
  alignas(64) float term_d[kTile];
  alignas(64) float term_a[kTile];

  inline __attribute__((always_inline)) void load(const Recipe& r, const float* b,
                                                  const float* d, const float* a,
                                                  int64_t first, int n) {
    for (int i = 0; i < n; ++i) {
      tau_d[i] = ma_sub(d[i], b[i]);
      tau_a[i] = ma_sub(a[i], b[i]);
    }
    keep_tile(r.domain, tau_d, first, n, keep_d);
    keep_tile(r.align, tau_a, first, n, keep_a);
  }

  inline __attribute__((always_inline)) void weigh(const Recipe& r, int n) {
    for (int i = 0; i < n; ++i) {
      term_d[i] = vector_term(r.domain, tau_d[i], keep_d[i] != 0);
      term_a[i] = vector_term(r.align, tau_a[i], keep_a[i] != 0);
    }
  }
};

// One tile merged with one recipe into `merged`.  The recipe's kind is decided per tile, so each
// formula's loop is a straight line the compiler vectorises.  The recipe is copied first: the
// stores to `merged` could otherwise alias its fields and force a reload every element.
inline __attribute__((always_inline)) void merge_tile(const Recipe& recipe, const float* b,
                                                      const float* d, const float* a,
                                                      int64_t first_index, int64_t count,
                                                      float* merged) {
  const Recipe r = recipe;
  const int n = int(count);
  switch (r.kind) {
    case kTaskArithmetic: {
      const float wd = r.domain.weight;
      const float wa = r.align.weight;
      for (int i = 0; i < n; ++i) merged[i] = merge_one(b[i], d[i], a[i], wd, wa);
      break;
    }
    case kModels:
      for (int i = 0; i < n; ++i) merged[i] = merge_models(r, b[i], d[i], a[i]);
      break;
    default: {
      VectorTile v;
      v.load(r, b, d, a, first_index, n);
      v.weigh(r, n);
      // One loop per election setting, so neither carries the other's selects.
      if (r.sign_election) {
        for (int i = 0; i < n; ++i) {
          merged[i] = combine_terms<true>(r, b[i], v.term_d[i], v.term_a[i]);
        }
      } else {
        for (int i = 0; i < n; ++i) {
          merged[i] = combine_terms<false>(r, b[i], v.term_d[i], v.term_a[i]);
        }
      }
      break;
    }
  }
}

// Elements [begin, end) of the operands, merged with each of `k` recipes: output element i of
// recipe j goes to outs[j][i - begin].  The input tiles are loaded once for all recipes, so a
// sweep of K weightings reads the inputs once ((3 + K) N bytes instead of 4 K N).
MA_CPU_CLONES
void merge_range_multi(const MergeOperands& ops, const Recipe* recipes, int k, int64_t begin,
                       int64_t end, unsigned char* const* outs) {
  alignas(64) float merged[kTile];
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a,
                                     int64_t start, int64_t n) __attribute__((always_inline)) {
    for (int j = 0; j < k; ++j) {
      merge_tile(recipes[j], b, d, a, ops.first_index + start, n, merged);
      store_tile(outs[j], ops.out_dtype, start - begin, n, merged);
    }
  });
}

Recipe task_arithmetic(float w_domain, float w_align) {
  Recipe r;
  r.domain.weight = w_domain;
  r.align.weight = w_align;
  return r;
}

int effective_threads(int64_t count, int requested) {
  const int64_t useful = std::max<int64_t>(1, count / kMinElementsPerThread);
  return int(std::max<int64_t>(1, std::min<int64_t>(requested, useful)));
}

// Runs body(t, begin, end) on `threads` contiguous slices of [0, count), each a multiple of
// `granule` elements except the last.  Contiguous slices keep each thread's reads sequential,
// which is what the kernel's readahead of memory-mapped inputs rewards.
template <typename Body>
void parallel_slices(int64_t count, int threads, int64_t granule, Body body) {
  const int64_t granules = (count + granule - 1) / granule;
  auto slice = [&](int t) {
    const int64_t begin = std::min(count, granules * t / threads * granule);
    const int64_t end = std::min(count, granules * (t + 1) / threads * granule);
    if (begin < end) body(t, begin, end);
  };
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) workers.emplace_back(slice, t);
  slice(0);
  for (auto& w : workers) w.join();
}

// Write buffers survive between calls: freshly mapped memory fills at ~2 GB/s on first touch
// against ~11 GB/s once resident (DESIGN.md), so allocating per call would halve the speed.
struct WriteBuffers {
  std::mutex lock;  // held for a whole merge_cpu_to_file call
  std::vector<std::unique_ptr<unsigned char, decltype(&std::free)>> per_thread;

  unsigned char* get(int t) {
    while (int(per_thread.size()) <= t) {
      auto* p = static_cast<unsigned char*>(std::aligned_alloc(64, kWritePieceBytes));
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

// ---- inputs that vanish under the mapping ----------------------------------------------------
// Reading a page of a memory-mapped input that was truncated away raises SIGBUS, which would
// kill the whole process.  While a kernel thread reads inputs it arms a jump buffer; the handler
// jumps back to it and the call returns EFAULT, which the engine reports as "input changed".
// Faults outside armed regions go to whatever handler was installed before ours.

thread_local sigjmp_buf* t_input_fault = nullptr;
struct sigaction g_previous_sigbus;

void on_sigbus(int sig, siginfo_t* info, void* context) {
  if (t_input_fault != nullptr) siglongjmp(*t_input_fault, 1);
  if (g_previous_sigbus.sa_flags & SA_SIGINFO) {
    g_previous_sigbus.sa_sigaction(sig, info, context);
  } else if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN) {
    g_previous_sigbus.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig);
  }
}

void install_sigbus_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action = {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous_sigbus);
  });
}

// pwrite until done; returns 0 or errno.  A short write without an error means the device is
// full (or a file-size limit hit): report ENOSPC rather than loop forever.
int write_all(int fd, const unsigned char* data, int64_t bytes, int64_t offset) {
  while (bytes > 0) {
    const ssize_t n = ::pwrite(fd, data, size_t(bytes), off_t(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return ENOSPC;
    data += n;
    bytes -= n;
    offset += n;
  }
  return 0;
}

// Runs work() with input faults armed; false when an input page vanished under it (SIGBUS,
// see above).  work is not inlined here: its loop counters must not live in this frame, which
// siglongjmp returns to.
template <typename Work>
bool run_guarded(const Work& work) {
  sigjmp_buf input_fault;
  if (sigsetjmp(input_fault, 1) != 0) {
    t_input_fault = nullptr;
    return false;
  }
  t_input_fault = &input_fault;
  work();
  t_input_fault = nullptr;
  return true;
}

// parallel_slices for passes that only read the inputs: a thread whose input pages vanish
// stops, and the call returns EFAULT instead of killing the process.
template <typename Body>
int guarded_slices(int64_t count, int threads, int64_t granule, Body body) {
  std::atomic<int> fault{0};
  install_sigbus_handler();
  parallel_slices(count, threads, granule, [&](int t, int64_t begin, int64_t end) {
    auto work = [&]() __attribute__((noinline)) { body(t, begin, end); };
    if (!run_guarded(work)) fault.store(EFAULT);
  });
  return fault.load();
}

// A read-only pass: range(begin, end, &partial[t]) on each thread's slice, protected like
// guarded_slices; `partial` gets one default-constructed result per thread, which the caller
// combines in thread order.  Returns 0 or EFAULT.
template <typename Partial, typename Range>
int reduce_slices(const MergeOperands& ops, int threads, std::vector<Partial>* partial,
                  Range range) {
  const int n_threads = effective_threads(ops.count, threads);
  partial->assign(size_t(n_threads), Partial());
  return guarded_slices(ops.count, n_threads, kTile, [&](int t, int64_t begin, int64_t end) {
    range(begin, end, &(*partial)[size_t(t)]);
  });
}

}  // namespace

void merge_cpu_recipe(const MergeOperands& ops, const Recipe& recipe, unsigned char* out,
                      int threads) {
  if (ops.count <= 0) return;
  const int n_threads = effective_threads(ops.count, threads);
  const int64_t out_size = dtype_size(ops.out_dtype);
  parallel_slices(ops.count, n_threads, kTile, [&](int, int64_t begin, int64_t end) {
    unsigned char* slice_out = out + begin * out_size;
    merge_range_multi(ops, &recipe, 1, begin, end, &slice_out);
  });
}

void merge_cpu(const MergeOperands& ops, unsigned char* out, int threads) {
  merge_cpu_recipe(ops, task_arithmetic(ops.w_domain, ops.w_align), out, threads);
}

int merge_cpu_to_files(const MergeOperands& ops, const WriteTarget* targets, int k, int threads,
                       uint32_t* crcs) {
  std::fill(crcs, crcs + k, 0u);
  if (ops.count <= 0 || k <= 0) return 0;
  const int n_threads = effective_threads(ops.count, threads);
  const int64_t out_size = dtype_size(ops.out_dtype);
  const int64_t piece = kWritePieceBytes / out_size;
  WriteBuffers& buffers = write_buffers();
  std::lock_guard<std::mutex> hold(buffers.lock);
  std::vector<unsigned char*> thread_buffers(size_t(n_threads) * k);  // [thread][target]
  for (size_t i = 0; i < thread_buffers.size(); ++i) thread_buffers[i] = buffers.get(int(i));
  std::vector<Recipe> recipes(k);
  for (int j = 0; j < k; ++j) recipes[j] = targets[j].recipe;

  // Each piece is checksummed while it is still in cache, and the pieces' CRCs are joined in file
  // order afterwards: the shard checksum costs no second pass over the output.
  const int64_t pieces = (ops.count + piece - 1) / piece;
  std::vector<uint32_t> piece_crc(size_t(pieces) * k);  // [piece][target]
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
  install_sigbus_handler();
  parallel_slices(ops.count, n_threads, piece, [&](int t, int64_t begin, int64_t end) {
    unsigned char* const* outs = &thread_buffers[size_t(t) * k];
    sigjmp_buf input_fault;
    if (sigsetjmp(input_fault, 1) != 0) {  // an input page vanished (SIGBUS): see above
      t_input_fault = nullptr;
      fail(EFAULT);
      return;
    }
    for (int64_t start = begin; start < end && first_error.load() == 0; start += piece) {
      const int64_t n = std::min(piece, end - start);
      t_input_fault = &input_fault;  // armed only while reading the mapped inputs
      merge_range_multi(ops, recipes.data(), k, start, start + n, outs);
      t_input_fault = nullptr;
      for (int j = 0; j < k; ++j) {
        piece_crc[size_t(start / piece) * k + j] = crc32c_update(0, outs[j], size_t(n * out_size));
        std::lock_guard<std::mutex> turn(write_turn[j]);
        const int err = write_all(targets[j].fd, outs[j], n * out_size,
                                  targets[j].file_offset + start * out_size);
        if (err != 0) fail(err);
      }
    }
  });
  if (first_error.load() != 0) return first_error.load();
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t bytes = std::min<int64_t>(piece, ops.count - i * piece) * out_size;
    for (int j = 0; j < k; ++j) {
      const uint32_t c = piece_crc[size_t(i) * k + j];
      crcs[j] = i == 0 ? c : crc32c_combine(crcs[j], c, uint64_t(bytes));
    }
  }
  return 0;
}

int merge_cpu_to_file(const MergeOperands& ops, int fd, int64_t file_offset, int threads,
                      uint32_t* crc) {
  const WriteTarget target{fd, file_offset, task_arithmetic(ops.w_domain, ops.w_align)};
  return merge_cpu_to_files(ops, &target, 1, threads, crc);
}

namespace {

// fp64 sums in kLanes independent partial sums per tile, added in lane order at the tile's end:
// one running sum would chain every addition on the previous one (4 cycles each) and keep the
// loop scalar.  Tiles start at multiples of kTile in the tensor, so only the split between
// threads changes the order of additions.
constexpr int kLanes = 8;

template <bool kModels>
inline __attribute__((always_inline)) void stats_range_of(const MergeOperands& ops,
                                                          int64_t begin, int64_t end,
                                                          VectorStats* stats) {
  VectorStats local;
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    double s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {};
    int64_t conflicts[kLanes] = {}, both[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      const int lane = int(i % kLanes);
      // Differences and products of fp32 values are exact in fp64.
      const double x = kModels ? double(d[i]) : double(d[i]) - double(b[i]);
      const double y = kModels ? double(a[i]) : double(a[i]) - double(b[i]);
      s0[lane] += x * x;
      s1[lane] += y * y;
      s2[lane] += x * y;
      if (!kModels) {
        conflicts[lane] += (x * y < 0);
        both[lane] += (x != 0 && y != 0);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      if (kModels) {
        local.model_domain_sq += s0[lane];
        local.model_align_sq += s1[lane];
        local.model_dot += s2[lane];
      } else {
        local.domain_sq += s0[lane];
        local.align_sq += s1[lane];
        local.dot += s2[lane];
        local.conflicts += conflicts[lane];
        local.both_nonzero += both[lane];
      }
    }
  });
  *stats = local;
}

MA_CPU_CLONES
void stats_range(const MergeOperands& ops, bool models, int64_t begin, int64_t end,
                 VectorStats* stats) {
  if (models) {
    stats_range_of<true>(ops, begin, end, stats);
  } else {
    stats_range_of<false>(ops, begin, end, stats);
  }
}

}  // namespace

int vector_stats_cpu(const MergeOperands& ops, bool models, int threads, VectorStats* out) {
  VectorStats total;
  *out = total;
  if (ops.count <= 0) return 0;
  std::vector<VectorStats> partial;
  const int err = reduce_slices(ops, threads, &partial, [&](int64_t b, int64_t e, VectorStats* p) {
    stats_range(ops, models, b, e, p);
  });
  if (err != 0) return err;
  for (const VectorStats& p : partial) {
    total.domain_sq += p.domain_sq;
    total.align_sq += p.align_sq;
    total.dot += p.dot;
    total.conflicts += p.conflicts;
    total.both_nonzero += p.both_nonzero;
    total.model_domain_sq += p.model_domain_sq;
    total.model_align_sq += p.model_align_sq;
    total.model_dot += p.model_dot;
  }
  *out = total;
  return 0;
}

namespace {

constexpr int64_t kBins = 1 << 16;

MA_CPU_CLONES
void histogram_range(const MergeOperands& ops, const int* prefix, int64_t begin, int64_t end,
                     int64_t* hist) {
  // Four interleaved uint32 sub-histograms per model: neighbouring elements often fall in one
  // bin, and back-to-back increments of one counter wait for each other's store (~5 cycles);
  // spread over four they overlap.  They are added into hist at the end, and before any counter
  // could pass 2^32.
  constexpr int kWays = 4;
  std::vector<uint32_t> sub(size_t(2) * kWays * kBins, 0);
  int64_t pending = 0;
  auto flush = [&] {
    for (int m = 0; m < 2; ++m) {
      for (int w = 0; w < kWays; ++w) {
        uint32_t* from = &sub[(size_t(m) * kWays + w) * kBins];
        for (int64_t bin = 0; bin < kBins; ++bin) hist[m * kBins + bin] += from[bin];
        std::fill(from, from + kBins, 0u);
      }
    }
    pending = 0;
  };
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    for (int m = 0; m < 2; ++m) {
      if (prefix[m] == kSkip) continue;
      uint32_t* h = &sub[size_t(m) * kWays * kBins];
      const float* x = model[m];
      if (prefix[m] == kHighBits) {
        for (int i = 0; i < int(n); ++i) {
          ++h[(i % kWays) * kBins + (magnitude_bits(ma_sub(x[i], b[i])) >> 16)];
        }
      } else {
        const uint32_t wanted = uint32_t(prefix[m]);
        for (int i = 0; i < int(n); ++i) {
          const uint32_t bits = magnitude_bits(ma_sub(x[i], b[i]));
          if ((bits >> 16) == wanted) ++h[(i % kWays) * kBins + (bits & 0xffffu)];
        }
      }
    }
    pending += n;
    if (pending >= (int64_t(1) << 31)) flush();
  });
  flush();
}

// L1 sums accumulated exactly: |tau| = mantissa * 2^(exponent - 150) for an fp32 with biased
// exponent >= 1 (2^-149 * mantissa for subnormals), so per model, kept or dropped, and exponent
// the integer mantissas are summed in int64 (2^39 elements per bin before overflow).  Integer
// sums do not depend on the order of the additions: the rescale factor, and so the merged
// model, is the same for every thread count and chunking.
struct ExactL1 {
  int64_t bins[2][2][256] = {};  // [model][kept][biased exponent]

  inline __attribute__((always_inline)) void add(int m, float tau, bool kept) {
    const uint32_t bits = magnitude_bits(tau);
    const uint32_t exponent = bits >> 23;
    const uint32_t mantissa = (bits & 0x7fffffu) | (exponent != 0 ? 0x800000u : 0u);
    bins[m][kept][exponent] += mantissa;
  }

  void add(const ExactL1& other) {
    for (int m = 0; m < 2; ++m) {
      for (int k = 0; k < 2; ++k) {
        for (int e = 0; e < 256; ++e) bins[m][k][e] += other.bins[m][k][e];
      }
    }
  }

  // Sum of bins[m][k] in fp64, in exponent order (a fixed order: deterministic).
  double value(int m, int k) const {
    double sum = 0;
    for (int e = 0; e < 256; ++e) {
      sum += std::ldexp(double(bins[m][k][e]), std::max(e, 1) - 150);
    }
    return sum;
  }
};

MA_CPU_CLONES
void sparsity_range(const MergeOperands& ops, const Recipe& r, int64_t begin, int64_t end,
                    ExactL1* sums) {
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a,
                                     int64_t start, int64_t n) __attribute__((always_inline)) {
    VectorTile v;
    v.load(r, b, d, a, ops.first_index + start, int(n));
    for (int i = 0; i < int(n); ++i) {
      sums->add(0, v.tau_d[i], v.keep_d[i] != 0);
      sums->add(1, v.tau_a[i], v.keep_a[i] != 0);
    }
  });
}

MA_CPU_CLONES
void ties_range(const MergeOperands& ops, const uint32_t* bits, int64_t begin, int64_t end,
                int64_t* counts) {
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    for (int m = 0; m < 2; ++m) {
      int64_t c = 0;
      for (int64_t i = 0; i < n; ++i) c += magnitude_bits(ma_sub(model[m][i], b[i])) == bits[m];
      counts[m] += c;
    }
  });
}

// The n-th tie of nth_magnitude_tie in [begin, end): tiles are counted in bulk and only the tile
// holding it is searched element by element.
MA_CPU_CLONES
int64_t find_nth_tie(const MergeOperands& ops, int model, uint32_t bits, int64_t n,
                     int64_t begin, int64_t end) {
  const unsigned char* x = model == 0 ? ops.domain : ops.aligned;
  const int dtype = model == 0 ? ops.domain_dtype : ops.aligned_dtype;
  alignas(64) float bt[kTile];
  alignas(64) float xt[kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    const int count = int(std::min(kTile, end - start));
    load_tile(ops.base, ops.base_dtype, start, count, bt);
    load_tile(x, dtype, start, count, xt);
    int64_t ties = 0;
    for (int i = 0; i < count; ++i) ties += magnitude_bits(ma_sub(xt[i], bt[i])) == bits;
    if (ties < n) {
      n -= ties;
      continue;
    }
    for (int i = 0; i < count; ++i) {
      if (magnitude_bits(ma_sub(xt[i], bt[i])) == bits && --n == 0) {
        return ops.first_index + start + i;
      }
    }
  }
  return -1;
}

}  // namespace

int count_magnitude_ties_cpu(const MergeOperands& ops, const uint32_t bits[2], int threads,
                             int64_t counts[2]) {
  if (ops.count <= 0) return 0;
  std::vector<std::array<int64_t, 2>> partial;
  const int err = reduce_slices(ops, threads, &partial,
                                [&](int64_t b, int64_t e, std::array<int64_t, 2>* p) {
                                  ties_range(ops, bits, b, e, p->data());
                                });
  if (err != 0) return err;
  for (const auto& p : partial) {
    counts[0] += p[0];
    counts[1] += p[1];
  }
  return 0;
}

int nth_magnitude_tie(const MergeOperands& ops, int model, uint32_t bits, int64_t n,
                      int64_t* index) {
  *index = -1;
  int64_t found = -1;
  const int err = guarded_slices(ops.count, 1, kTile, [&](int, int64_t begin, int64_t end) {
    found = find_nth_tie(ops, model, bits, n, begin, end);
  });
  if (err != 0) return err;
  *index = found;
  return 0;
}

int magnitude_histogram_cpu(const MergeOperands& ops, const int prefix[2], int64_t* hist,
                            int threads) {
  if (ops.count <= 0) return 0;
  // Per-thread histograms (2 x 512 KiB each), added in thread order: counts are exact.
  std::vector<std::vector<int64_t>> partial;
  const int err = reduce_slices(ops, threads, &partial,
                                [&](int64_t b, int64_t e, std::vector<int64_t>* p) {
                                  p->assign(2 * kBins, 0);
                                  histogram_range(ops, prefix, b, e, p->data());
                                });
  if (err != 0) return err;
  for (const auto& p : partial) {
    for (int64_t i = 0; i < 2 * kBins; ++i) hist[i] += p[i];
  }
  return 0;
}

Selection select_kth_largest(const int64_t* row, int64_t k) {
  int64_t above = 0;
  for (int bin = int(kBins) - 1; bin >= 0; --bin) {
    if (above + row[bin] >= k) return Selection{bin, above};
    above += row[bin];
  }
  return Selection{-1, above};
}

int sparsity_stats_cpu(const MergeOperands& ops, const Recipe& recipe, int threads,
                       SparsityStats* out) {
  *out = SparsityStats();
  if (ops.count <= 0) return 0;
  std::vector<ExactL1> partial;
  const int err = reduce_slices(ops, threads, &partial, [&](int64_t b, int64_t e, ExactL1* p) {
    sparsity_range(ops, recipe, b, e, p);
  });
  if (err != 0) return err;
  ExactL1 total;
  for (const ExactL1& p : partial) total.add(p);
  for (int m = 0; m < 2; ++m) {
    out->kept_l1[m] = total.value(m, 1);
    out->l1[m] = out->kept_l1[m] + total.value(m, 0);
  }
  return 0;
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
