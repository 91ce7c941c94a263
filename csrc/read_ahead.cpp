#include "read_ahead.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace mergealign {

// kRead reads in pieces of this size into one reused buffer: large enough that a request costs
// little per byte, small enough to stay in L2 and keep a stop prompt.
constexpr int64_t kReadPieceBytes = 1 << 20;

ReadAhead::ReadAhead(const std::vector<int>& fds, std::vector<Range> ranges, int64_t depth,
                     int mode)
    : ranges_(std::move(ranges)), depth_(depth), mode_(mode) {
  for (int fd : fds) fds_.push_back(::dup(fd));  // -1 on failure: its ranges are skipped
  if (mode_ == kRead) scratch_.resize(size_t(kReadPieceBytes));
  thread_ = std::thread([this] { run(); });
}

ReadAhead::~ReadAhead() { stop(); }

void ReadAhead::stop() {
  {
    std::lock_guard<std::mutex> hold(lock_);
    stopping_ = true;
  }
  moved_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (int& fd : fds_) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
}

void ReadAhead::reached(int64_t position) {
  {
    std::lock_guard<std::mutex> hold(lock_);
    if (position <= reached_) return;
    reached_ = position;
  }
  moved_.notify_all();
}

int64_t ReadAhead::requested() const {
  std::lock_guard<std::mutex> hold(lock_);
  return requested_;
}

void ReadAhead::fetch(const Range& r) {
  const int fd = fds_[size_t(r.file)];
  if (fd < 0) return;
  if (mode_ == kAdvise) {
    ::posix_fadvise(fd, off_t(r.offset), off_t(r.length), POSIX_FADV_WILLNEED);
    return;
  }
  for (int64_t done = 0; done < r.length;) {
    const int64_t n = std::min(kReadPieceBytes, r.length - done);
    const ssize_t got = ::pread(fd, scratch_.data(), size_t(n), off_t(r.offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return;  // the merge itself reports a file that cannot be read
    done += got;
    std::lock_guard<std::mutex> hold(lock_);
    if (stopping_) return;
  }
}

void ReadAhead::run() {
  for (const Range& r : ranges_) {
    {
      std::unique_lock<std::mutex> hold(lock_);
      moved_.wait(hold, [&] { return stopping_ || r.position < reached_ + depth_; });
      if (stopping_) return;
    }
    fetch(r);
    std::lock_guard<std::mutex> hold(lock_);
    requested_ += r.length;
  }
}

}  // namespace mergealign
