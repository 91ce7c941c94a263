#include "host_pipeline.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <new>

#include "cpu_merge.h"
#include "crc32c.h"
#include "file_io.h"
#include "merge_math.h"
#include "parallel.h"

namespace mergealign {

namespace {

constexpr int64_t kPageBytes = 4096;

// Fill granule: each thread copies a contiguous run of whole 64 KiB pieces, so two threads never
// share a page of a staging buffer or of a mapped input (a shared page would be faulted twice).
constexpr int64_t kFillGranule = 64 << 10;

// Bytes [skip, skip + length) of a piece into its staging: read from its file, or copied from
// memory with the input guard.
int copy_piece(const StagePiece& p, int64_t skip, int64_t length) {
  unsigned char* dst = reinterpret_cast<unsigned char*>(p.dst) + skip;
  if (p.fd >= 0) return read_fully(p.fd, dst, length, p.file_offset + skip);
  return copy_guarded(dst, reinterpret_cast<const unsigned char*>(p.src) + skip, length);
}

}  // namespace

HostBuffer::HostBuffer(int64_t bytes) {
  size_ = std::max<int64_t>(kPageBytes, (bytes + kPageBytes - 1) / kPageBytes * kPageBytes);
  void* p = ::mmap(nullptr, size_t(size_), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<unsigned char*>(p);
}

HostBuffer::~HostBuffer() { release(); }

void HostBuffer::release() {
  if (data_ != nullptr) ::munmap(data_, size_t(size_));
  data_ = nullptr;
}

int fill_staging(const std::vector<StagePiece>& pieces, int threads) {
  std::vector<int64_t> starts;  // byte position of each piece in the concatenation
  int64_t total = 0;
  for (const StagePiece& p : pieces) {
    starts.push_back(total);
    total += p.bytes;
  }
  if (total == 0) return 0;
  const int n_threads = std::max(1, std::min<int>(threads, int(total / kFillGranule) + 1));
  std::atomic<int> first_error{0};
  parallel_slices(total, n_threads, kFillGranule, [&](int, int64_t begin, int64_t end) {
    for (size_t i = 0; i < pieces.size() && first_error.load() == 0; ++i) {
      const int64_t lo = std::max(begin, starts[i]);
      const int64_t hi = std::min(end, starts[i] + pieces[i].bytes);
      if (lo >= hi) continue;
      const int err = copy_piece(pieces[i], lo - starts[i], hi - lo);
      int expected = 0;
      if (err != 0) first_error.compare_exchange_strong(expected, err);
    }
  });
  return first_error.load();
}

StagedWriter::StagedWriter() : thread_([this] { run(); }) {}

StagedWriter::~StagedWriter() { stop(); }

int64_t StagedWriter::submit(const Job& job) {
  Job own = job;
  own.fd = ::dup(job.fd);
  const int dup_error = own.fd < 0 ? errno : 0;  // before anything else can change errno
  int64_t ticket;
  {
    std::lock_guard<std::mutex> hold(lock_);
    ticket = next_ticket_++;
    if (own.fd < 0 || stopping_) {
      done_[ticket] = Done{own.fd < 0 ? dup_error : ECANCELED, 0, 0};
      if (own.fd >= 0) ::close(own.fd);
      finished_.notify_all();
      return ticket;
    }
    jobs_.push_back({ticket, own});
  }
  queued_.notify_one();
  return ticket;
}

StagedWriter::Done StagedWriter::wait(int64_t ticket) {
  std::unique_lock<std::mutex> hold(lock_);
  finished_.wait(hold, [&] { return done_.count(ticket) != 0; });
  const Done result = done_[ticket];
  done_.erase(ticket);
  return result;
}

void StagedWriter::stop() {
  {
    std::lock_guard<std::mutex> hold(lock_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    for (const Queued& q : jobs_) {
      ::close(q.job.fd);
      done_[q.ticket] = Done{ECANCELED, 0, 0};
    }
    jobs_.clear();
  }
  queued_.notify_one();
  finished_.notify_all();
  if (thread_.joinable()) thread_.join();
}

double StagedWriter::busy_seconds() const {
  std::lock_guard<std::mutex> hold(lock_);
  return busy_seconds_;
}

StagedWriter::Done StagedWriter::perform(const Job& job) {
  if (job.delay_us > 0) ::usleep(useconds_t(job.delay_us));
  const auto* data = reinterpret_cast<const unsigned char*>(job.data);
  const int64_t size = dtype_size(job.dtype);
  const int64_t piece = kWritePieceBytes / size;
  Done done{0, 0, 0};
  // Piece by piece: each is checksummed and counted, then written while still in cache.
  for (int64_t start = 0; start < job.count && done.error == 0; start += piece) {
    const int64_t n = std::min(piece, job.count - start);
    const unsigned char* p = data + start * size;
    done.crc = crc32c_update(done.crc, p, size_t(n * size));
    done.nonfinite += count_nonfinite(p, n, job.dtype);
    done.error = write_all(job.fd, p, n * size, job.file_offset + start * size);
  }
  ::close(job.fd);
  return done;
}

void StagedWriter::run() {
  std::unique_lock<std::mutex> hold(lock_);
  for (;;) {
    queued_.wait(hold, [&] { return stopping_ || !jobs_.empty(); });
    if (jobs_.empty()) return;  // stopping, nothing left
    const Queued next = jobs_.front();
    jobs_.pop_front();
    hold.unlock();
    const auto began = std::chrono::steady_clock::now();
    const Done done = perform(next.job);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - began;
    hold.lock();
    busy_seconds_ += took.count();
    done_[next.ticket] = done;
    finished_.notify_all();
  }
}

}  // namespace mergealign
