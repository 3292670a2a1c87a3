// VmdkImage: VMware's disk format, as qemu-img writes it. Reads monolithicSparse, streamOptimized
// (compressed grains, markers, footer), monolithicFlat and twoGbMaxExtentSparse descriptors;
// writes streamOptimized (and monolithicSparse) by converting from another image. Delta links (a
// descriptor's parentFileNameHint and parentCID) open as a backing chain: unallocated grains read
// from the parent, which must be a VMDK whose CID is the child's parentCID, as qemu checks it.
// monolithicSparse images (deltas included) also open read-write: a write to an unallocated grain
// appends a grain filled from the parent, then records it in the grain table (and its redundant
// copy); the first write gives the image a new CID, as qemu does.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "base/unique_fd.h"
#include "disk/block_device.h"

namespace keel::disk {

struct VmdkCreateOptions {
  uint64_t size = 0;
  std::string subformat = "monolithicSparse";
  // A delta link to this parent (relative to the new image's directory, or absolute).
  std::string parent_file;
};

struct VmdkOpenOptions {
  // Off: a delta link's parent is named but not opened (its grains read as zeros); for the fuzz
  // target, where names come from hostile bytes.
  bool open_parent = true;
};

class VmdkImage final : public BlockDevice {
public:
  static Result<std::unique_ptr<VmdkImage>> open(const std::string& path, OpenMode mode,
                                                 const VmdkOpenOptions& options = {}, int chain_depth = 0);
  // Creates an empty image (monolithicSparse or streamOptimized).
  static Result<void> create(const std::string& path, const VmdkCreateOptions& options);
  // Writes `source` as a new image of the given subformat.
  static Result<void> convert_from(BlockDevice& source, const std::string& path, const std::string& subformat,
                                   bool progress);
  // Parses a sparse extent header or a descriptor from bytes: for the fuzz target.
  static Result<void> parse_bytes(std::span<const uint8_t> bytes);

  ~VmdkImage() override;
  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  std::string format() const override { return "vmdk"; }
  const std::string& create_type() const { return create_type_; }
  uint32_t cid() const { return cid_; }
  uint32_t parent_cid() const { return parent_cid_; }
  // The parent as the descriptor names it (empty: none), and as it was opened.
  const std::string& parent_file() const { return parent_hint_; }
  const std::string& parent_path() const { return parent_resolved_; }
  BlockDevice* parent() const { return parent_.get(); }

  Result<void> read(uint64_t offset, std::span<uint8_t> out) override;
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override;
  Result<void> flush() override;
  Result<void> discard(uint64_t, uint64_t) override { return ok(); }
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override;
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) override;

  struct SparseExtent;
  struct ExtentInfo;

private:
  VmdkImage() = default;
  static Result<void> write_sparse(BlockDevice& source, const std::string& path, const std::string& subformat,
                                   bool progress, uint32_t parent_cid, const std::string& parent_file);
  Result<void> load(const std::string& path, int chain_depth);
  Result<void> load_parent(const std::string& descriptor, int chain_depth);
  VmdkOpenOptions options_;
  Result<void> check_parent_cid() const;
  Result<void> read_parent(uint64_t offset, std::span<uint8_t> out);
  Result<void> make_writable();
  Result<void> renew_cid();
  Result<void> set_grain_sector(uint64_t grain, uint32_t sector);
  Result<void> read_extent(ExtentInfo& e, uint64_t offset, std::span<uint8_t> out);

  std::string path_;
  uint64_t size_ = 0;
  std::string create_type_;
  std::vector<std::unique_ptr<ExtentInfo>> extents_;
  uint32_t cid_ = 0;
  uint32_t parent_cid_ = 0xffffffff;
  std::string parent_hint_;
  std::string parent_resolved_;
  std::unique_ptr<BlockDevice> parent_;
  bool read_only_ = true;
  std::mutex write_mutex_;  // writes are serialized (grain allocation, table entries)
  uint64_t next_grain_sector_ = 0;
  bool cid_renewed_ = false;
};

}  // namespace keel::disk
