// The host half of GPU streaming (mergealign_fast/writers/gpu.py): staging memory of an exact
// size, the fill of staging buffers from memory-mapped inputs, and a writer thread that
// checksums and writes each downloaded chunk.  Torch-free and CUDA-free: the GPU side pins the
// staging memory (cudaHostRegister, in _cuda) and moves it; these run with the GIL released.
//
// Why native: filling from the mapped inputs page-faults through the file, and checksumming and
// writing the output are each a pass over every byte.  Done on the calling Python thread one
// after the other (the first GPU writer), the host needed seconds for a 1.1B trio whose PCIe
// floor is ~0.15 s.  Here the fill runs on several threads under the kernel's SIGBUS guard, and
// the checksum and write of chunk i run on their own thread while chunk i+1 is filled.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace mergealign {

// Page-aligned anonymous memory of exactly `bytes` (rounded up to the 4 KiB page): unlike a
// caching allocator (torch's pinned allocator rounds to a power of two, so a 2 GiB budget pinned
// ~3 GiB), what is asked for is what is held, and the page alignment is what cudaHostRegister
// wants.
class HostBuffer {
 public:
  explicit HostBuffer(int64_t bytes);  // std::bad_alloc when the memory cannot be mapped
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uintptr_t address() const { return reinterpret_cast<uintptr_t>(data_); }
  int64_t size() const { return size_; }
  void release();  // unmap (idempotent; the destructor calls it)

 private:
  unsigned char* data_ = nullptr;
  int64_t size_ = 0;
};

// One input's bytes for a staging buffer: `bytes` at file offset `file_offset` of descriptor
// `fd`, or (fd < 0) in memory at `src`.
struct StagePiece {
  uintptr_t src;
  uintptr_t dst;
  int64_t bytes;
  int fd;
  int64_t file_offset;
};

// Copy every piece, the total split over `threads` threads in contiguous byte ranges.  Files are
// read with pread, not through their mapping: the copy from the page cache then costs no page
// faults (the 6.6 GB of a 1.1B trio, warm, on the 2-core CI VM: 1.04-1.11 s through the
// mapping in 8 runs, 0.85-0.98 s with pread in 11 and 1.15 s in one).  Memory is copied with
// the inputs' SIGBUS guard armed.
// Returns 0, or EFAULT when an input ended early (a file truncated since its header was read)
// or a page of a mapping vanished; another errno when a read failed.
int fill_staging(const std::vector<StagePiece>& pieces, int threads);

// CRC-32C, count of NaN/±inf values and pwrite of finished output chunks, in submission order,
// on one thread of its own.
class StagedWriter {
 public:
  struct Job {
    int fd;                 // duplicated at submit: the caller may close its own at any time
    int64_t file_offset;
    uintptr_t data;         // the downloaded chunk; untouched by the caller until wait(ticket)
    int64_t count;          // elements
    int dtype;
    int64_t delay_us;       // sleep before the job (race stress tests); 0 normally
  };
  struct Done {
    int error;              // 0 or the errno of the failed write
    uint32_t crc;
    int64_t nonfinite;
  };

  StagedWriter();
  ~StagedWriter();
  StagedWriter(const StagedWriter&) = delete;
  StagedWriter& operator=(const StagedWriter&) = delete;

  // Queue a job; returns its ticket (0, 1, 2, ...).  EMFILE-style failures to duplicate the
  // descriptor come back as the job's error.
  int64_t submit(const Job& job);
  // Block until job `ticket` has finished and return its result (each ticket once).
  Done wait(int64_t ticket);
  // Drop jobs not yet started, wait for the one running, stop the thread (idempotent).  After
  // this no job touches its data.
  void stop();
  // Seconds the thread spent on jobs (checksums and writes), for the per-stage report.
  double busy_seconds() const;

 private:
  struct Queued {
    int64_t ticket;
    Job job;
  };
  void run();
  Done perform(const Job& job);

  mutable std::mutex lock_;
  std::condition_variable queued_;
  std::condition_variable finished_;
  std::deque<Queued> jobs_;
  std::map<int64_t, Done> done_;
  int64_t next_ticket_ = 0;
  bool stopping_ = false;
  double busy_seconds_ = 0.0;
  std::thread thread_;
};

}  // namespace mergealign
