#include "base/mapping.h"

namespace keel {

Result<Mapping> Mapping::map_fd(int fd, size_t size, off_t offset, int prot, int flags) {
  if (size == 0) return fail_invalid("mmap: zero-length mapping");
  void* p = ::mmap(nullptr, size, prot, flags, fd, offset);
  if (p == MAP_FAILED) return fail_errno("mmap");
  return Mapping(p, size);
}

Result<Mapping> Mapping::anonymous(size_t size) {
  if (size == 0) return fail_invalid("mmap: zero-length mapping");
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return fail_errno("mmap");
  return Mapping(p, size);
}

void Mapping::reset() {
  if (data_) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace keel
