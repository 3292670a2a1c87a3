#include "disk/raw_image.h"

#include "disk/direct_file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace keel::disk {

Result<std::unique_ptr<RawImage>> RawImage::open(const std::string& path, OpenMode mode) {
  bool ro = mode == OpenMode::ReadOnly;
  UniqueFd fd = TRY(UniqueFd::open(path, ro ? O_RDONLY : O_RDWR));
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) return fail_errno("stat " + path);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  bool block = S_ISBLK(st.st_mode);
  if (block && ::ioctl(fd.get(), BLKGETSIZE64, &size) < 0) return fail_errno("BLKGETSIZE64 " + path);
  return std::unique_ptr<RawImage>(new RawImage(path, std::move(fd), size, ro, block));
}

Result<std::unique_ptr<RawImage>> RawImage::open_direct(const std::string& path, OpenMode mode) {
  bool ro = mode == OpenMode::ReadOnly;
  UniqueFd fd = TRY(DirectFile::open(path, ro ? O_RDONLY : O_RDWR));
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) return fail_errno("stat " + path);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  bool block = S_ISBLK(st.st_mode);
  if (block && ::ioctl(fd.get(), BLKGETSIZE64, &size) < 0) return fail_errno("BLKGETSIZE64 " + path);
  auto image = std::unique_ptr<RawImage>(new RawImage(path, std::move(fd), size, ro, block));
  image->direct_ = true;
  image->buffered_fd_ = TRY(UniqueFd::open(path, ro ? O_RDONLY : O_RDWR));
  return image;
}

namespace {
constexpr uint64_t kDirectAlign = DirectFile::kAlign;
bool aligned(const void* p, uint64_t offset, uint64_t length) { return DirectFile::is_aligned(p, offset, length); }
}  // namespace

// Direct I/O through an aligned bounce buffer, in pieces of at most 4 MiB. Reads past the end of the
// file come back as zeros (the last block of a file whose size is not a multiple of 4 KiB).
Result<void> RawImage::direct_io(uint64_t offset, uint8_t* read_out, const uint8_t* write_in, size_t length) {
  const uint64_t piece_max = 4 << 20;
  while (length > 0) {
    uint64_t a = offset / kDirectAlign * kDirectAlign;
    uint64_t in = offset - a;
    size_t n = static_cast<size_t>(std::min<uint64_t>(length, piece_max - in));
    uint64_t b = (offset + n + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    uint8_t* bounce = DirectFile::bounce_buffer(b - a);
    if (!bounce) return fail(ENOMEM, "direct I/O bounce buffer");
    std::unique_lock<std::shared_mutex> lock(rmw_mutex_, std::defer_lock);
    if (write_in) lock.lock();
    if (!write_in || in != 0 || n != b - a) {
      ssize_t got = ::pread(fd_.get(), bounce, b - a, static_cast<off_t>(a));
      if (got < 0) return fail_errno("read " + path_);
      if (static_cast<uint64_t>(got) < b - a) std::memset(bounce + got, 0, b - a - static_cast<uint64_t>(got));
    }
    if (write_in) {
      std::memcpy(bounce + in, write_in, n);
      // Never write past the end of a file (the tail block is padded in memory only).
      uint64_t limit = std::min<uint64_t>(b, is_block_device_ ? b : std::max(size_, offset + n));
      uint64_t len = limit - a;
      if (len % kDirectAlign) {
        // The file's last partial block: write it without O_DIRECT.
        TRY_CTX(pwrite_all(buffered_fd_.get(), bounce + in, n, static_cast<off_t>(offset)), "write " + path_);
        if (::fdatasync(buffered_fd_.get()) < 0) return fail_errno("fdatasync " + path_);
      } else {
        TRY_CTX(pwrite_all(fd_.get(), bounce, len, static_cast<off_t>(a)), "write " + path_);
      }
      write_in += n;
    } else {
      std::memcpy(read_out, bounce + in, n);
      read_out += n;
    }
    offset += n;
    length -= n;
  }
  return ok();
}

Result<void> RawImage::create(const std::string& path, uint64_t size) {
  UniqueFd fd = TRY(UniqueFd::open(path, O_RDWR | O_CREAT | O_TRUNC));
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) < 0) return fail_errno("truncate " + path);
  return ok();
}

Result<void> RawImage::check_range(uint64_t offset, uint64_t length, const char* op) const {
  if (offset > size_ || length > size_ - offset)
    return fail_invalid("{} {}: range {}+{} is beyond the end of the image ({} bytes)", op, path_,
                        offset, length, size_);
  return ok();
}

Result<void> RawImage::read(uint64_t offset, std::span<uint8_t> out) {
  TRY(check_range(offset, out.size(), "read"));
  if (direct_ && !aligned(out.data(), offset, out.size())) return direct_io(offset, out.data(), nullptr, out.size());
  TRY_CTX(pread_all(fd_.get(), out.data(), out.size(), static_cast<off_t>(offset)), "read " + path_);
  return ok();
}

Result<void> RawImage::write(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  TRY(check_range(offset, data.size(), "write"));
  if (direct_ && !aligned(data.data(), offset, data.size())) {
    TRY(direct_io(offset, nullptr, data.data(), data.size()));
    holes_.note_data(offset, data.size());
    return ok();
  }
  std::shared_lock<std::shared_mutex> shared(rmw_mutex_, std::defer_lock);
  if (direct_) shared.lock();
  TRY_CTX(pwrite_all(fd_.get(), data.data(), data.size(), static_cast<off_t>(offset)), "write " + path_);
  holes_.note_data(offset, data.size());
  return ok();
}

Result<void> RawImage::flush() {
  if (read_only_) return ok();
  if (::fdatasync(fd_.get()) < 0) return fail_errno("fdatasync " + path_);
  return ok();
}

Result<void> RawImage::discard(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "discard " + path_ + ": image is open read-only");
  TRY(check_range(offset, length, "discard"));
  if (length == 0 || is_block_device_) return ok();  // a hint only
  holes_.invalidate();
  if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) < 0 &&
      errno != EOPNOTSUPP)
    return fail_errno("discard " + path_);
  return ok();
}

Result<void> RawImage::write_zeroes(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  TRY(check_range(offset, length, "write-zeroes"));
  if (length == 0) return ok();
  if (!is_block_device_) holes_.invalidate();
  if (!is_block_device_ &&
      ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) == 0)
    return ok();
  // No hole punching here: write zeros in large chunks.
  std::vector<uint8_t> zeros(std::min<uint64_t>(length, 1 << 20));
  while (length > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(length, zeros.size()));
    TRY(write(offset, std::span<const uint8_t>(zeros.data(), n)));
    offset += n;
    length -= n;
  }
  return ok();
}

Result<std::vector<Extent>> RawImage::block_status(uint64_t offset, uint64_t length) {
  TRY(check_range(offset, length, "block-status"));
  std::vector<Extent> extents;
  uint64_t end = offset + length;
  auto add = [&](uint64_t start, uint64_t stop, bool data) {
    if (stop <= start) return;
    if (!extents.empty() && extents.back().data == data && !extents.back().file.empty() &&
        extents.back().offset + extents.back().length == start) {
      extents.back().length += stop - start;
      return;
    }
    Extent e;
    e.offset = start;
    e.length = stop - start;
    e.data = data;
    e.zero = !data;
    e.file = path_;  // holes too have a place in the file (qemu-img map reports it)
    e.file_offset = start;
    extents.push_back(std::move(e));
  };
  if (is_block_device_) {
    add(offset, end, true);
    return extents;
  }
  // The file's part of the range (past its end, a resized-but-unwritten tail reads as a hole).
  for (auto& piece : TRY(holes_.pieces(fd_.get(), offset, end))) add(piece.start, piece.end, piece.data);
  return extents;
}

Result<void> RawImage::resize(uint64_t new_size) {
  if (read_only_) return fail(EROFS, "resize " + path_ + ": image is open read-only");
  if (is_block_device_) return fail(ENOTSUP, "resize " + path_ + ": cannot resize a block device");
  if (::ftruncate(fd_.get(), static_cast<off_t>(new_size)) < 0) return fail_errno("resize " + path_);
  holes_.invalidate();
  size_ = new_size;
  return ok();
}

}  // namespace keel::disk
