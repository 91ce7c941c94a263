// Write-back of a merge's finished output ranges on a thread of its own, so that the final fsync
// finds little left to write and the merge never waits for the disk on the way.
//
// Why a thread: sync_file_range(SYNC_FILE_RANGE_WRITE) only queues the writes, but it blocks
// while the device's request queue is full, and called on the merge's thread after each window
// that stall came straight out of the merge (cold 3B trio: 33-41 s with it against 29-31 s
// with no write-back until the final fsync).  Here the merge hands the range over and goes on.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

namespace mergealign {

class WriteBehind {
 public:
  WriteBehind();
  ~WriteBehind();
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;

  // Queue bytes [offset, offset + length) of `fd` for write-back; returns at once (ignored
  // after stop()).  The range holds a duplicate of `fd`, so the caller may close its own at
  // any time (a merge that fails closes its shard files without waiting for this thread).
  void submit(int fd, int64_t offset, int64_t length);
  // Wait until every queued range has been handed to the kernel.  Nothing is reported here: a
  // write that fails surfaces at the caller's fsync, which Linux reports for every write-back
  // error since the file's last fsync (sync_file_range without WAIT flags consumes none).
  void drain();
  // Drain and stop the thread (idempotent; the destructor calls it).
  void stop();

 private:
  struct Range {
    int fd;
    int64_t offset;
    int64_t length;
  };
  void run();

  std::mutex lock_;
  std::condition_variable queued_;
  std::condition_variable idle_;
  std::deque<Range> ranges_;
  bool busy_ = false;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace mergealign
