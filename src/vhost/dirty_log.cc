#include "vhost/dirty_log.h"

namespace keel::vhost {

Result<DirtyLog> DirtyLog::map(int fd, const LogDesc& desc) {
  if (desc.mmap_size == 0) return fail_invalid("dirty log: empty log");
  uint64_t map_size = desc.mmap_offset + desc.mmap_size;
  if (map_size < desc.mmap_offset)
    return fail_invalid("dirty log: offset {:#x} + size {:#x} wraps", desc.mmap_offset, desc.mmap_size);
  // The offset need not be page aligned: map from the file's start and step in.
  DirtyLog log;
  log.mapping_ = TRY(map_frontend_file(fd, map_size, "dirty log"));
  log.bits_ = log.mapping_.data() + desc.mmap_offset;
  log.size_ = desc.mmap_size;
  return log;
}

void DirtyLog::mark_gpa(uint64_t gpa, uint64_t len) {
  if (len == 0 || bits_ == nullptr) return;
  uint64_t first = gpa / kLogPageSize;
  // The last byte may be at the very top of the address space: compute it without wrapping.
  uint64_t last = (len - 1 > UINT64_MAX - gpa ? UINT64_MAX : gpa + (len - 1)) / kLogPageSize;
  const uint64_t pages_covered = size_ * 8;
  for (uint64_t page = first; page <= last; ++page) {
    if (page >= pages_covered) {
      pages_beyond_log_ += last - page + 1;
      return;
    }
    uint8_t bit = static_cast<uint8_t>(1u << (page % 8));
    uint8_t* byte = bits_ + page / 8;
    // Always the atomic OR, with release order: the guest-memory write it follows must be visible
    // before the bit is. Skipping it when the bit looks set would race with QEMU clearing the word
    // (it could read the page before our write lands, then find the bit clear).
    __atomic_fetch_or(byte, bit, __ATOMIC_RELEASE);
  }
}

void DirtyLog::mark_host(const GuestMemory& memory, const uint8_t* host, uint64_t len) {
  uint64_t gpa;
  if (memory.host_to_gpa(host, len, gpa)) mark_gpa(gpa, len);
}

bool DirtyLog::page_dirty(uint64_t page) const {
  if (bits_ == nullptr || page / 8 >= size_) return false;
  return (__atomic_load_n(bits_ + page / 8, __ATOMIC_RELAXED) >> (page % 8)) & 1;
}

}  // namespace keel::vhost
