// Whole reads and writes at a file offset: the I/O loops of the merge-to-file paths and the GPU
// pipeline's fill and writer threads, and the size of the pieces they write.
#pragma once

#include <errno.h>
#include <unistd.h>

#include <cstdint>

namespace mergealign {

// Output bytes per pwrite.  Writes of 16 MiB took 0.8-6.5 s for 2.2 GB on the 2-core CI VM
// against 0.59 s for 256 KiB writes; 1 MiB keeps the per-call overhead negligible while staying
// in the fast regime, and a piece stays L2-sized (checksummed, then written from cache).
constexpr int64_t kWritePieceBytes = 1 << 20;

// Calls step(done) (a pread or pwrite of the bytes from `done` on) until `bytes` have moved.
// Returns 0, the errno of a failed call (EINTR retried), or `at_end` when a call moves nothing.
template <class Step>
inline int move_fully(int64_t bytes, int at_end, Step step) {
  for (int64_t done = 0; done < bytes;) {
    const ssize_t n = step(done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return at_end;
    done += n;
  }
  return 0;
}

// A short write without an error means the device is full (or a file-size limit was hit):
// ENOSPC rather than a loop forever.
inline int write_all(int fd, const unsigned char* data, int64_t bytes, int64_t offset) {
  return move_fully(bytes, ENOSPC, [&](int64_t done) {
    return ::pwrite(fd, data + done, size_t(bytes - done), off_t(offset + done));
  });
}

// A file that ends before `bytes` were read was truncated since its header was read: EFAULT,
// what a vanished page of its mapping gives too.
inline int read_fully(int fd, unsigned char* dst, int64_t bytes, int64_t offset) {
  return move_fully(bytes, EFAULT, [&](int64_t done) {
    return ::pread(fd, dst + done, size_t(bytes - done), off_t(offset + done));
  });
}

}  // namespace mergealign
