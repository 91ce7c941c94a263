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

// One tile merged with one recipe into `merged`.  The recipe's kind is decided per tile, so each
// formula's loop is a straight line the compiler vectorises.
inline __attribute__((always_inline)) void merge_tile(const Recipe& r, const float* b,
                                                      const float* d, const float* a,
                                                      int64_t first_index, int64_t n,
                                                      float* merged) {
  switch (r.kind) {
    case kTaskArithmetic: {
      const float wd = r.domain.weight;
      const float wa = r.align.weight;
      for (int64_t i = 0; i < n; ++i) merged[i] = merge_one(b[i], d[i], a[i], wd, wa);
      break;
    }
    case kModels:
      for (int64_t i = 0; i < n; ++i) merged[i] = merge_models(r, b[i], d[i], a[i]);
      break;
    default:
      for (int64_t i = 0; i < n; ++i) {
        merged[i] = merge_vectors(r, b[i], d[i], a[i], first_index + i);
      }
      break;
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

MA_CPU_CLONES
void stats_range(const MergeOperands& ops, int64_t begin, int64_t end, VectorStats* stats) {
  VectorStats local;
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    for (int64_t i = 0; i < n; ++i) {
      // Differences in fp64 are exact for fp32/fp16/bf16 inputs.
      const double td = double(d[i]) - double(b[i]);
      const double ta = double(a[i]) - double(b[i]);
      local.domain_sq += td * td;
      local.align_sq += ta * ta;
      local.dot += td * ta;
      local.conflicts += (td * ta < 0);
      local.both_nonzero += (td != 0 && ta != 0);
      local.model_domain_sq += double(d[i]) * double(d[i]);
      local.model_align_sq += double(a[i]) * double(a[i]);
      local.model_dot += double(d[i]) * double(a[i]);
    }
  });
  *stats = local;
}

}  // namespace

int vector_stats_cpu(const MergeOperands& ops, int threads, VectorStats* out) {
  VectorStats total;
  *out = total;
  if (ops.count <= 0) return 0;
  const int n_threads = effective_threads(ops.count, threads);
  std::vector<VectorStats> partial(n_threads);
  const int err = guarded_slices(ops.count, n_threads, kTile, [&](int t, int64_t b, int64_t e) {
    stats_range(ops, b, e, &partial[t]);
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
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    for (int m = 0; m < 2; ++m) {
      if (prefix[m] == kSkip) continue;
      int64_t* row = hist + m * kBins;
      const float* x = model[m];
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t bits = float_bits(ma_sub(x[i], b[i])) & 0x7fffffffu;
        if (prefix[m] == kHighBits) {
          ++row[bits >> 16];
        } else if (int64_t(bits >> 16) == prefix[m]) {
          ++row[bits & 0xffffu];
        }
      }
    }
  });
}

MA_CPU_CLONES
void sparsity_range(const MergeOperands& ops, const Recipe& r, int64_t begin, int64_t end,
                    SparsityStats* stats) {
  SparsityStats local;
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a,
                                     int64_t start, int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    const VectorTerm* term[2] = {&r.domain, &r.align};
    for (int m = 0; m < 2; ++m) {
      for (int64_t i = 0; i < n; ++i) {
        const float tau = ma_sub(model[m][i], b[i]);
        const double magnitude = tau < 0 ? -double(tau) : double(tau);
        local.l1[m] += magnitude;
        if (term_keeps(*term[m], tau, ops.first_index + start + i)) local.kept_l1[m] += magnitude;
      }
    }
  });
  *stats = local;
}

MA_CPU_CLONES
void ties_range(const MergeOperands& ops, const uint32_t* bits, int64_t begin, int64_t end,
                int64_t* counts) {
  for_each_tile(ops, begin, end, [&](const float* b, const float* d, const float* a, int64_t,
                                     int64_t n) __attribute__((always_inline)) {
    const float* model[2] = {d, a};
    for (int m = 0; m < 2; ++m) {
      int64_t c = 0;
      for (int64_t i = 0; i < n; ++i) {
        c += (float_bits(ma_sub(model[m][i], b[i])) & 0x7fffffffu) == bits[m];
      }
      counts[m] += c;
    }
  });
}

}  // namespace

int count_magnitude_ties_cpu(const MergeOperands& ops, const uint32_t bits[2], int threads,
                             int64_t counts[2]) {
  if (ops.count <= 0) return 0;
  const int n_threads = effective_threads(ops.count, threads);
  std::vector<int64_t> partial(size_t(n_threads) * 2, 0);
  const int err = guarded_slices(ops.count, n_threads, kTile, [&](int t, int64_t b, int64_t e) {
    ties_range(ops, bits, b, e, &partial[size_t(t) * 2]);
  });
  if (err != 0) return err;
  for (int t = 0; t < n_threads; ++t) {
    counts[0] += partial[size_t(t) * 2];
    counts[1] += partial[size_t(t) * 2 + 1];
  }
  return 0;
}

int nth_magnitude_tie(const MergeOperands& ops, int model, uint32_t bits, int64_t n,
                      int64_t* index) {
  const unsigned char* x = model == 0 ? ops.domain : ops.aligned;
  const int dtype = model == 0 ? ops.domain_dtype : ops.aligned_dtype;
  *index = -1;
  int64_t found = -1;
  const int err = guarded_slices(ops.count, 1, kTile, [&](int, int64_t begin, int64_t end) {
    int64_t remaining = n;
    for (int64_t i = begin; i < end; ++i) {
      const float tau = ma_sub(load_as_f32(x, i, dtype), load_as_f32(ops.base, i, ops.base_dtype));
      if ((float_bits(tau) & 0x7fffffffu) == bits && --remaining == 0) {
        found = ops.first_index + i;
        return;
      }
    }
  });
  if (err != 0) return err;
  *index = found;
  return 0;
}

int magnitude_histogram_cpu(const MergeOperands& ops, const int prefix[2], int64_t* hist,
                            int threads) {
  if (ops.count <= 0) return 0;
  const int n_threads = effective_threads(ops.count, threads);
  // Per-thread histograms (2 x 512 KiB each), added in thread order: counts are exact.
  std::vector<std::vector<int64_t>> partial(n_threads, std::vector<int64_t>(2 * kBins, 0));
  const int err = guarded_slices(ops.count, n_threads, kTile, [&](int t, int64_t b, int64_t e) {
    histogram_range(ops, prefix, b, e, partial[t].data());
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
  SparsityStats total;
  *out = total;
  if (ops.count <= 0) return 0;
  const int n_threads = effective_threads(ops.count, threads);
  std::vector<SparsityStats> partial(n_threads);
  const int err = guarded_slices(ops.count, n_threads, kTile, [&](int t, int64_t b, int64_t e) {
    sparsity_range(ops, recipe, b, e, &partial[t]);
  });
  if (err != 0) return err;
  for (const SparsityStats& p : partial) {
    for (int m = 0; m < 2; ++m) {
      total.l1[m] += p.l1[m];
      total.kept_l1[m] += p.kept_l1[m];
    }
  }
  *out = total;
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
