// VmdkImage: VMware's disk format, as qemu-img writes it. Reads monolithicSparse, streamOptimized
// (compressed grains, markers, footer), monolithicFlat and twoGbMaxExtentSparse descriptors;
// writes streamOptimized (and monolithicSparse) by converting from another image.
#pragma once

#include <string>
#include <vector>

#include "base/unique_fd.h"
#include "disk/block_device.h"

namespace keel::disk {

struct VmdkCreateOptions {
  uint64_t size = 0;
  std::string subformat = "monolithicSparse";
};

class VmdkImage final : public BlockDevice {
public:
  static Result<std::unique_ptr<VmdkImage>> open(const std::string& path, OpenMode mode);
  // Creates an empty image (monolithicSparse or streamOptimized).
  static Result<void> create(const std::string& path, const VmdkCreateOptions& options);
  // Writes `source` as a new image of the given subformat.
  static Result<void> convert_from(BlockDevice& source, const std::string& path, const std::string& subformat,
                                   bool progress);
  // Parses a sparse extent header or a descriptor from bytes: for the fuzz target.
  static Result<void> parse_bytes(std::span<const uint8_t> bytes);

  ~VmdkImage() override;
  uint64_t size() const override { return size_; }
  bool read_only() const override { return true; }
  std::string format() const override { return "vmdk"; }
  const std::string& create_type() const { return create_type_; }

  Result<void> read(uint64_t offset, std::span<uint8_t> out) override;
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override;
  Result<void> flush() override { return ok(); }
  Result<void> discard(uint64_t, uint64_t) override { return ok(); }
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override;
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) override;

  struct SparseExtent;
  struct ExtentInfo;

private:
  VmdkImage() = default;
  Result<void> load(const std::string& path);
  Result<void> read_extent(ExtentInfo& e, uint64_t offset, std::span<uint8_t> out);

  std::string path_;
  uint64_t size_ = 0;
  std::string create_type_;
  std::vector<std::unique_ptr<ExtentInfo>> extents_;
};

}  // namespace keel::disk
