#include "disk/raw_image.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

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
  TRY_CTX(pread_all(fd_.get(), out.data(), out.size(), static_cast<off_t>(offset)), "read " + path_);
  return ok();
}

Result<void> RawImage::write(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  TRY(check_range(offset, data.size(), "write"));
  TRY_CTX(pwrite_all(fd_.get(), data.data(), data.size(), static_cast<off_t>(offset)), "write " + path_);
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
  uint64_t pos = offset;
  while (pos < end) {
    off_t data = ::lseek(fd_.get(), static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {  // no data after pos: the rest is a hole
        add(pos, end, false);
        break;
      }
      // Filesystems without SEEK_DATA: report everything as data.
      add(pos, end, true);
      break;
    }
    uint64_t data_start = std::min<uint64_t>(static_cast<uint64_t>(data), end);
    add(pos, data_start, false);
    if (data_start >= end) break;
    off_t hole = ::lseek(fd_.get(), static_cast<off_t>(data_start), SEEK_HOLE);
    uint64_t data_end = hole < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(hole), end);
    add(data_start, data_end, true);
    pos = data_end;
  }
  return extents;
}

Result<void> RawImage::resize(uint64_t new_size) {
  if (read_only_) return fail(EROFS, "resize " + path_ + ": image is open read-only");
  if (is_block_device_) return fail(ENOTSUP, "resize " + path_ + ": cannot resize a block device");
  if (::ftruncate(fd_.get(), static_cast<off_t>(new_size)) < 0) return fail_errno("resize " + path_);
  size_ = new_size;
  return ok();
}

}  // namespace keel::disk
