// Threads and the input-fault guard of the CPU kernel: how a pass is split over threads, and how
// a thread survives reading a memory-mapped input that was truncated under it.
#pragma once

#include <errno.h>
#include <setjmp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace mergealign {

// Below this many elements one thread does the work: starting a thread (~20-50 us) costs more
// than a 64 Ki-element pass (~40 us at 10 GB/s).
constexpr int64_t kMinElementsPerThread = 1 << 16;

inline int effective_threads(int64_t count, int requested) {
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

// ---- inputs that vanish under the mapping ----------------------------------------------------
// Reading a page of a memory-mapped input that was truncated away raises SIGBUS, which would
// kill the whole process.  While a kernel thread reads inputs it arms a jump buffer; the handler
// jumps back to it and the call returns EFAULT, which the engine reports as "input changed".
// Faults outside armed regions go to whatever handler was installed before ours (parallel.cpp).

extern thread_local sigjmp_buf* t_input_fault;
void install_sigbus_handler();

// Runs work() with input faults armed; false when an input page vanished under it.  This is the
// one place a fault is caught.  work must not be inlined here (callers mark their lambda
// noinline): siglongjmp returns to this frame, and a loop counter that lived in it, changed
// after sigsetjmp, would be indeterminate afterwards.
template <typename Work>
bool run_guarded(const Work& work) {
  install_sigbus_handler();
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

// memcpy from a mapped input: 0, or EFAULT when one of its pages vanished.
inline int copy_guarded(void* dst, const void* src, int64_t bytes) {
  auto copy = [&]() __attribute__((noinline)) { std::memcpy(dst, src, size_t(bytes)); };
  return run_guarded(copy) ? 0 : EFAULT;
}

// parallel_slices for passes that only read the inputs: a thread whose input pages vanish
// stops, and the call returns EFAULT instead of killing the process.
template <typename Body>
int guarded_slices(int64_t count, int threads, int64_t granule, Body body) {
  std::atomic<int> fault{0};
  parallel_slices(count, threads, granule, [&](int t, int64_t begin, int64_t end) {
    auto work = [&]() __attribute__((noinline)) { body(t, begin, end); };
    if (!run_guarded(work)) fault.store(EFAULT);
  });
  return fault.load();
}

}  // namespace mergealign
