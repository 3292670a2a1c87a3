#include "guestfs/devices.h"

#include <cstring>

namespace keel::guestfs {

MappedDevice::MappedDevice(std::vector<MappedSegment> segments, bool read_only)
    : segments_(std::move(segments)), read_only_(read_only) {
  for (const auto& s : segments_) size_ += s.length;
}

template <typename Fn>
Result<void> MappedDevice::for_each_piece(uint64_t offset, uint64_t length, Fn&& fn) {
  if (offset > size_ || length > size_ - offset)
    return fail(EIO, fmt::format("access beyond the end of the device ({}+{} > {})", offset, length, size_));
  uint64_t seg_start = 0;
  for (const auto& seg : segments_) {
    uint64_t seg_end = seg_start + seg.length;
    if (length == 0) break;
    if (offset < seg_end) {
      uint64_t within = offset - seg_start;
      uint64_t n = std::min(length, seg.length - within);
      TRY(fn(seg, seg.offset + within, n, offset));
      offset += n;
      length -= n;
    }
    seg_start = seg_end;
  }
  return ok();
}

Result<void> MappedDevice::read(uint64_t offset, std::span<uint8_t> out) {
  uint64_t base = offset;
  return for_each_piece(offset, out.size(), [&](const MappedSegment& s, uint64_t at, uint64_t n, uint64_t pos) {
    return s.device->read(at, out.subspan(pos - base, n));
  });
}

Result<void> MappedDevice::write(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "device is read-only");
  uint64_t base = offset;
  return for_each_piece(offset, data.size(), [&](const MappedSegment& s, uint64_t at, uint64_t n, uint64_t pos) {
    return s.device->write(at, data.subspan(pos - base, n));
  });
}

Result<void> MappedDevice::flush() {
  for (const auto& s : segments_) TRY(s.device->flush());
  return ok();
}

Result<void> MappedDevice::discard(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "device is read-only");
  return for_each_piece(offset, length, [&](const MappedSegment& s, uint64_t at, uint64_t n, uint64_t) {
    return s.device->discard(at, n);
  });
}

Result<void> MappedDevice::write_zeroes(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "device is read-only");
  return for_each_piece(offset, length, [&](const MappedSegment& s, uint64_t at, uint64_t n, uint64_t) {
    return s.device->write_zeroes(at, n);
  });
}

Result<std::vector<disk::Extent>> MappedDevice::block_status(uint64_t offset, uint64_t length) {
  std::vector<disk::Extent> result;
  TRY(for_each_piece(offset, length, [&](const MappedSegment& s, uint64_t at, uint64_t n, uint64_t pos) -> Result<void> {
    auto extents = TRY(s.device->block_status(at, n));
    for (auto e : extents) {
      e.offset = pos + (e.offset - at);
      e.file.clear();
      result.push_back(e);
    }
    return ok();
  }));
  return result;
}

Result<void> MemoryDevice::read(uint64_t offset, std::span<uint8_t> out) {
  if (offset > bytes_.size() || out.size() > bytes_.size() - offset)
    return fail(EIO, "read beyond the end of the device");
  if (!out.empty()) std::memcpy(out.data(), bytes_.data() + offset, out.size());
  return ok();
}

Result<void> MemoryDevice::write(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "device is read-only");
  if (offset > bytes_.size() || data.size() > bytes_.size() - offset)
    return fail(EIO, "write beyond the end of the device");
  if (!data.empty()) std::memcpy(bytes_.data() + offset, data.data(), data.size());
  return ok();
}

Result<void> MemoryDevice::write_zeroes(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "device is read-only");
  if (offset > bytes_.size() || length > bytes_.size() - offset)
    return fail(EIO, "write beyond the end of the device");
  std::memset(bytes_.data() + offset, 0, length);
  return ok();
}

Result<std::vector<disk::Extent>> MemoryDevice::block_status(uint64_t offset, uint64_t length) {
  disk::Extent e;
  e.offset = offset;
  e.length = length;
  e.data = true;
  return std::vector<disk::Extent>{e};
}

}  // namespace keel::guestfs
