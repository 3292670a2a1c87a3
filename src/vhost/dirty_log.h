// DirtyLog: the front-end's dirty-page log for live migration (vhost-user SET_LOG_BASE with
// VHOST_USER_PROTOCOL_F_LOG_SHMFD, QEMU docs/interop/vhost-user.rst "Migration").
//
// While VHOST_F_LOG_ALL is negotiated, every write the back-end makes into guest memory must set
// the bit of each 4 KiB guest-physical page it touched, so QEMU sends those pages again. The log is
// a bitmap shared with QEMU (bit n of byte n / 8 for page n, which is bit n of the little-endian
// u64 words QEMU reads); QEMU clears words while we set bits, so bits are set with atomic ORs,
// each after the write it records.
//
// One thread (the data path's) marks pages; the mapping is replaced only between data-path runs.
#pragma once

#include <cstdint>

#include "base/mapping.h"
#include "base/result.h"
#include "vhost/guest_memory.h"
#include "vhost/message.h"

namespace keel::vhost {

inline constexpr uint64_t kLogPageSize = 4096;

class DirtyLog {
public:
  DirtyLog() = default;
  DirtyLog(DirtyLog&&) noexcept = default;
  DirtyLog& operator=(DirtyLog&&) noexcept = default;

  // Maps the log of a decoded SET_LOG_BASE: `desc.mmap_size` bytes at `desc.mmap_offset` of `fd`,
  // which must be a regular file (QEMU gives a sealed memfd) at least offset + size long, so no
  // write through the mapping can fault past its end.
  static Result<DirtyLog> map(int fd, const LogDesc& desc);

  bool mapped() const { return bits_ != nullptr; }
  // Bytes of bitmap: it covers guest-physical addresses [0, size() * 8 * 4 KiB).
  uint64_t size() const { return size_; }
  // Pages written beyond what the log covers (QEMU sizes it for all of guest memory, so a non-zero
  // count means the front-end gave a log too small for its memory table).
  uint64_t pages_beyond_log() const { return pages_beyond_log_; }

  // Marks the pages of guest-physical [gpa, gpa + len) dirty.
  void mark_gpa(uint64_t gpa, uint64_t len);
  // Marks the pages behind [host, host + len), a range inside `memory`'s mappings (a buffer that
  // gpa_to_host() returned), dirty.
  void mark_host(const GuestMemory& memory, const uint8_t* host, uint64_t len);

  // Whether page `page` is marked (for tests).
  bool page_dirty(uint64_t page) const;

private:
  Mapping mapping_;
  uint8_t* bits_ = nullptr;
  uint64_t size_ = 0;
  uint64_t pages_beyond_log_ = 0;
};

}  // namespace keel::vhost
