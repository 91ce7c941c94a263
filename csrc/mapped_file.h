// Read-only memory maps of input files, with explicit release of pages already processed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mergealign {

// An operating-system error on a named file; the bindings turn it into Python's OSError.
struct FileError : std::runtime_error {
  FileError(int err, const std::string& path) : std::runtime_error(path), err(err), path(path) {}
  int err;
  std::string path;
};

// A whole file mapped read-only.  Pages the merge has finished with are dropped from this
// process's page tables with release(): the data stays in the page cache for other readers, but
// no longer counts towards our resident set, so peak RSS is bounded by the window in flight
// rather than by the size of the inputs.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uintptr_t address() const { return reinterpret_cast<uintptr_t>(data_); }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  bool closed() const { return fd_ < 0; }
  int fd() const { return fd_; }

  // Advise the kernel to start reading [offset, offset + length) now (asynchronous readahead).
  void prefetch(int64_t offset, int64_t length) const;
  // Drop the pages wholly or partly inside [offset, offset + length) from this mapping.
  void release(int64_t offset, int64_t length) const;
  void close();

 private:
  void advise(int64_t offset, int64_t length, int advice) const;

  std::string path_;
  int fd_ = -1;
  unsigned char* data_ = nullptr;
  int64_t size_ = 0;
};

}  // namespace mergealign
