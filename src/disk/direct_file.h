// DirectFile: positional I/O on a file opened with O_DIRECT (cache mode "none"), for callers whose
// buffers, offsets or lengths are not all aligned: qcow2 metadata (8-byte header fields, L1 and
// refcount tables of any length, compressed clusters packed at byte offsets) and the data of
// 512-byte clusters or subclusters. Aligned requests go straight to the file; the others go through
// a per-thread aligned bounce buffer, and writes that cover a block only in part are
// read-modify-write, serialized against all other writes so that two writers of one block never
// lose each other's bytes.
#pragma once

#include <cstdint>
#include <shared_mutex>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"

namespace keel::disk {

class DirectFile {
public:
  // Alignment of buffers, offsets and lengths that O_DIRECT takes on every Linux file system and
  // device (a multiple of any logical block size up to 4 KiB).
  static constexpr uint64_t kAlign = 4096;

  // open(2) with O_DIRECT added. A file system that does not support it (EINVAL) gets an error that
  // says so and what to do instead.
  static Result<UniqueFd> open(const std::string& path, int flags);

  // Whether a request can go to an O_DIRECT file as it is.
  static bool is_aligned(const void* buf, uint64_t offset, uint64_t length) {
    return reinterpret_cast<uintptr_t>(buf) % kAlign == 0 && offset % kAlign == 0 && length % kAlign == 0;
  }
  // This thread's kAlign-aligned bounce buffer of at least n bytes (nullptr when out of memory).
  static uint8_t* bounce_buffer(size_t n);

  // Reads `len` bytes at `offset`; bytes past the end of the file read as zeros.
  Result<void> read(int fd, uint8_t* buf, size_t len, uint64_t offset);
  // Writes `len` bytes at `offset`. A partly covered last block past the end of the file is written
  // whole (zero-padded), so the file may grow to the next multiple of kAlign.
  Result<void> write(int fd, const uint8_t* buf, size_t len, uint64_t offset);

private:
  std::shared_mutex rmw_mutex_;  // shared: whole-block writes; exclusive: read-modify-write
};

}  // namespace keel::disk
