#include "mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

namespace mergealign {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw FileError(errno, path);
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    close();
    throw FileError(err, path);
  }
  size_ = st.st_size;
  if (size_ == 0) return;  // mmap of length 0 is an error; an empty file maps to nothing
  void* p = ::mmap(nullptr, size_t(size_), PROT_READ, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    close();
    throw FileError(err, path);
  }
  data_ = static_cast<unsigned char*>(p);
  // Merges read every input front to back once: ask for aggressive readahead.
  ::madvise(data_, size_t(size_), MADV_SEQUENTIAL);
}

MappedFile::~MappedFile() { close(); }

void MappedFile::advise(int64_t offset, int64_t length, int advice) const {
  if (data_ == nullptr || length <= 0) return;
  const int64_t page = ::sysconf(_SC_PAGESIZE);
  const int64_t begin = std::max<int64_t>(0, offset) / page * page;
  const int64_t end = std::min(size_, offset + length);
  if (begin >= end) return;
  ::madvise(data_ + begin, size_t(end - begin), advice);
}

void MappedFile::prefetch(int64_t offset, int64_t length) const {
  advise(offset, length, MADV_WILLNEED);
}

void MappedFile::release(int64_t offset, int64_t length) const {
  advise(offset, length, MADV_DONTNEED);
}

void MappedFile::close() {
  if (data_ != nullptr) ::munmap(data_, size_t(size_));
  data_ = nullptr;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace mergealign
