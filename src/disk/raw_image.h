// RawImage: a plain file or block device, byte for byte. Sparse-aware: block_status uses
// SEEK_DATA/SEEK_HOLE so holes are reported (and copied) as holes.
#pragma once

#include <mutex>
#include <shared_mutex>
#include <string>

#include "base/unique_fd.h"
#include "disk/block_device.h"
#include "disk/hole_map.h"

namespace keel::disk {

class RawImage final : public BlockDevice {
public:
  static Result<std::unique_ptr<RawImage>> open(const std::string& path, OpenMode mode);
  // O_DIRECT: the page cache is bypassed. Requests aligned to 4 KiB (buffer, offset and length) go
  // straight to the device; others go through an aligned bounce buffer (unaligned writes are
  // read-modify-write, serialized).
  static Result<std::unique_ptr<RawImage>> open_direct(const std::string& path, OpenMode mode);
  bool direct() const { return direct_; }
  // Creates (or truncates) a sparse file of `size` bytes.
  static Result<void> create(const std::string& path, uint64_t size);

  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  std::string format() const override { return "raw"; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }

  Result<void> read(uint64_t offset, std::span<uint8_t> out) override;
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override;
  Result<void> flush() override;
  Result<void> discard(uint64_t offset, uint64_t length) override;
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override;
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) override;
  // Changes the virtual size (file length).
  Result<void> resize(uint64_t new_size);

private:
  RawImage(std::string path, UniqueFd fd, uint64_t size, bool read_only, bool is_block_device)
      : path_(std::move(path)), fd_(std::move(fd)), size_(size), read_only_(read_only),
        is_block_device_(is_block_device) {}
  Result<void> check_range(uint64_t offset, uint64_t length, const char* op) const;
  Result<void> direct_io(uint64_t offset, uint8_t* read_out, const uint8_t* write_in, size_t length);
  bool direct_ = false;
  UniqueFd buffered_fd_;  // direct mode: for the file's last, partial block
  std::shared_mutex rmw_mutex_;  // direct mode: aligned writes shared, read-modify-writes alone

  std::string path_;
  UniqueFd fd_;
  uint64_t size_;
  bool read_only_;
  bool is_block_device_;
  HoleMap holes_;
};

}  // namespace keel::disk
