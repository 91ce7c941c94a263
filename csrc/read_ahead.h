// Keeps the storage busy ahead of a merge: a thread asks the kernel to read the input ranges the
// merge will need next, up to `depth` bytes beyond the point the merge has reached.
//
// Why: a mapped input is otherwise read when the kernel first touches it (plus the kernel's own
// readahead within one file), so between the end of one tensor and the first fault of the next,
// and while the CPU computes, the disk idles.  Cold, that left a 3B-parameter merge at 1.2-1.45x
// the time of reading and writing its bytes.  The merge gives the whole sequence of ranges up
// front (every tensor's three inputs, in the order it will read them) and reports its position;
// this thread stays `depth` bytes ahead, never further, so what it brings in is still in the
// page cache when the merge arrives and the pages it needs are never pushed out by ones it does
// not need yet.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace mergealign {

class ReadAhead {
 public:
  // One piece of input the merge will read: bytes [offset, offset + length) of file `file`
  // (an index into the descriptors), needed once the merge's position reaches `position`.
  struct Range {
    int file;
    int64_t offset;
    int64_t length;
    int64_t position;
  };
  enum Mode : int { kAdvise = 0, kRead = 1 };

  // Descriptors are duplicated: the reader owns its own and closes them itself.  kAdvise asks
  // with posix_fadvise(WILLNEED) (asynchronous: the call queues the reads); kRead reads each
  // range with pread into a scratch buffer (synchronous, one request at a time).
  ReadAhead(const std::vector<int>& fds, std::vector<Range> ranges, int64_t depth, int mode);
  ~ReadAhead();
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;

  // The merge has reached `position` (positions only move forward; a smaller one is ignored).
  void reached(int64_t position);
  // Bytes asked for so far (tests, and the progress line's diagnostics).
  int64_t requested() const;
  // Stop the thread and close the descriptors (idempotent; the destructor calls it).
  void stop();

 private:
  void run();
  void fetch(const Range& r);

  std::vector<int> fds_;
  std::vector<Range> ranges_;
  int64_t depth_;
  int mode_;
  mutable std::mutex lock_;
  std::condition_variable moved_;
  int64_t reached_ = 0;
  int64_t requested_ = 0;
  bool stopping_ = false;
  std::vector<unsigned char> scratch_;
  std::thread thread_;
};

}  // namespace mergealign
