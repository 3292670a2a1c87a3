// Block devices that guestfs builds on top of the disks it is given: a window onto part of a disk
// (a partition), a concatenation of windows (an LVM logical volume), and a byte buffer (tests and
// fuzz targets). None owns the devices it maps; the Guest that made them keeps the disks alive.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "disk/block_device.h"

namespace keel::guestfs {

// One piece of a MappedDevice: `length` bytes at `offset` in `device`.
struct MappedSegment {
  disk::BlockDevice* device = nullptr;
  uint64_t offset = 0;
  uint64_t length = 0;
};

// The segments laid end to end. A partition is one segment; a linear LV is one per LVM segment.
class MappedDevice final : public disk::BlockDevice {
public:
  explicit MappedDevice(std::vector<MappedSegment> segments, bool read_only);

  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  std::string format() const override { return "mapped"; }
  Result<void> read(uint64_t offset, std::span<uint8_t> out) override;
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override;
  Result<void> flush() override;
  Result<void> discard(uint64_t offset, uint64_t length) override;
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override;
  Result<std::vector<disk::Extent>> block_status(uint64_t offset, uint64_t length) override;

private:
  // Calls fn(segment, offset-in-segment-device, length, offset-in-this-device) for each piece.
  template <typename Fn>
  Result<void> for_each_piece(uint64_t offset, uint64_t length, Fn&& fn);

  std::vector<MappedSegment> segments_;
  uint64_t size_ = 0;
  bool read_only_;
};

// A disk held in memory: fuzz targets and unit tests.
class MemoryDevice final : public disk::BlockDevice {
public:
  explicit MemoryDevice(std::vector<uint8_t> bytes, bool read_only = false)
      : bytes_(std::move(bytes)), read_only_(read_only) {}

  uint64_t size() const override { return bytes_.size(); }
  bool read_only() const override { return read_only_; }
  std::string format() const override { return "memory"; }
  Result<void> read(uint64_t offset, std::span<uint8_t> out) override;
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override;
  Result<void> flush() override { return ok(); }
  Result<void> discard(uint64_t, uint64_t) override { return ok(); }
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override;
  Result<std::vector<disk::Extent>> block_status(uint64_t offset, uint64_t length) override;
  std::vector<uint8_t>& bytes() { return bytes_; }

private:
  std::vector<uint8_t> bytes_;
  bool read_only_;
};

}  // namespace keel::guestfs
