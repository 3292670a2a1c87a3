#include "disk/direct_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace keel::disk {

namespace {

constexpr uint64_t kPieceMax = 4 << 20;  // bounce buffer size per thread, at most

struct BounceBuffer {
  uint8_t* data = nullptr;
  size_t size = 0;
  ~BounceBuffer() { std::free(data); }
  uint8_t* get(size_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<uint8_t*>(std::aligned_alloc(DirectFile::kAlign, n));
      size = data ? n : 0;
    }
    return data;
  }
};
thread_local BounceBuffer t_bounce;

// The aligned blocks [start, end) around the first piece of a request (at most kPieceMax bytes).
struct Piece {
  uint64_t start, in, length, end;
};
Piece piece_of(uint64_t offset, uint64_t len) {
  uint64_t start = offset / DirectFile::kAlign * DirectFile::kAlign;
  uint64_t in = offset - start;
  uint64_t n = std::min<uint64_t>(len, kPieceMax - in);
  uint64_t end = (offset + n + DirectFile::kAlign - 1) / DirectFile::kAlign * DirectFile::kAlign;
  return {start, in, n, end};
}

Result<void> io_error(const char* op, uint64_t offset, size_t len) {
  int err = errno;
  if (err == EINVAL)
    return fail(EINVAL, fmt::format("{} of {} bytes at {} with O_DIRECT: the file system refuses direct I/O "
                                    "(use another cache mode than 'none', or another file system)", op, len, offset));
  return fail(Error::from_errno(err, fmt::format("{} of {} bytes at {}", op, len, offset)));
}

// Aligned buffer, offset and length. Stops at the end of the file and zero-fills the rest: after a
// short read the next offset is unaligned, which O_DIRECT would refuse.
Result<void> read_aligned(int fd, uint8_t* buf, size_t len, uint64_t offset) {
  while (len > 0) {
    ssize_t n = ::pread(fd, buf, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_error("read", offset, len);
    }
    if (n == 0 || static_cast<size_t>(n) % DirectFile::kAlign != 0) {
      size_t keep = static_cast<size_t>(n);
      std::memset(buf + keep, 0, len - keep);
      return ok();
    }
    buf += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return ok();
}

Result<void> write_aligned(int fd, const uint8_t* buf, size_t len, uint64_t offset) {
  while (len > 0) {
    ssize_t n = ::pwrite(fd, buf, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_error("write", offset, len);
    }
    if (n == 0 || static_cast<size_t>(n) % DirectFile::kAlign != 0)
      return fail(EIO, fmt::format("write of {} bytes at {} with O_DIRECT: short write of {} bytes", len, offset, n));
    buf += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return ok();
}

}  // namespace

uint8_t* DirectFile::bounce_buffer(size_t n) { return t_bounce.get(n); }

Result<UniqueFd> DirectFile::open(const std::string& path, int flags) {
  auto fd = UniqueFd::open(path, flags | O_DIRECT);
  if (!fd && fd.error().code() == EINVAL)
    return fail(EINVAL, fmt::format("open {}: the file system does not support O_DIRECT (cache mode 'none'); "
                                    "use another cache mode, or put the image on a file system that has it",
                                    path));
  return fd;
}

Result<void> DirectFile::read(int fd, uint8_t* buf, size_t len, uint64_t offset) {
  if (is_aligned(buf, offset, len)) return read_aligned(fd, buf, len, offset);
  while (len > 0) {
    Piece p = piece_of(offset, len);
    size_t n = static_cast<size_t>(p.length);
    uint8_t* bounce = t_bounce.get(p.end - p.start);
    if (!bounce) return fail(ENOMEM, "direct I/O bounce buffer");
    TRY(read_aligned(fd, bounce, p.end - p.start, p.start));
    std::memcpy(buf, bounce + p.in, n);
    buf += n;
    offset += n;
    len -= n;
  }
  return ok();
}

Result<void> DirectFile::write(int fd, const uint8_t* buf, size_t len, uint64_t offset) {
  if (is_aligned(buf, offset, len)) {
    std::shared_lock lock(rmw_mutex_);
    return write_aligned(fd, buf, len, offset);
  }
  while (len > 0) {
    Piece p = piece_of(offset, len);
    size_t n = static_cast<size_t>(p.length);
    uint64_t span = p.end - p.start;
    uint8_t* bounce = t_bounce.get(span);
    if (!bounce) return fail(ENOMEM, "direct I/O bounce buffer");
    if (p.in == 0 && n == span) {
      // Only the buffer is misaligned: copy, no read.
      std::memcpy(bounce, buf, n);
      std::shared_lock lock(rmw_mutex_);
      TRY(write_aligned(fd, bounce, n, p.start));
    } else {
      std::unique_lock lock(rmw_mutex_);
      TRY(read_aligned(fd, bounce, span, p.start));
      std::memcpy(bounce + p.in, buf, n);
      TRY(write_aligned(fd, bounce, span, p.start));
    }
    buf += n;
    offset += n;
    len -= n;
  }
  return ok();
}

}  // namespace keel::disk
