#include "write_behind.h"

#include <fcntl.h>
#include <unistd.h>

namespace mergealign {

WriteBehind::WriteBehind() : thread_([this] { run(); }) {}

WriteBehind::~WriteBehind() { stop(); }

void WriteBehind::submit(int fd, int64_t offset, int64_t length) {
  {
    std::lock_guard<std::mutex> hold(lock_);
    if (stopping_) return;
    const int own = ::dup(fd);
    if (own < 0) return;  // out of descriptors: the final fsync still writes everything
    ranges_.push_back({own, offset, length});
  }
  queued_.notify_one();
}

void WriteBehind::drain() {
  std::unique_lock<std::mutex> hold(lock_);
  idle_.wait(hold, [&] { return ranges_.empty() && !busy_; });
}

void WriteBehind::stop() {
  drain();
  {
    std::lock_guard<std::mutex> hold(lock_);
    stopping_ = true;
  }
  queued_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void WriteBehind::run() {
  std::unique_lock<std::mutex> hold(lock_);
  for (;;) {
    queued_.wait(hold, [&] { return stopping_ || !ranges_.empty(); });
    if (ranges_.empty()) return;  // stopping, nothing left
    const Range r = ranges_.front();
    ranges_.pop_front();
    busy_ = true;
    hold.unlock();
    ::sync_file_range(r.fd, r.offset, r.length, SYNC_FILE_RANGE_WRITE);
    ::close(r.fd);
    hold.lock();
    busy_ = false;
    if (ranges_.empty()) idle_.notify_all();
  }
}

}  // namespace mergealign
