#include "disk/vmdk_image.h"

namespace keel::disk {

struct VmdkImage::ExtentInfo {};
VmdkImage::~VmdkImage() = default;
Result<std::unique_ptr<VmdkImage>> VmdkImage::open(const std::string& path, OpenMode) {
  return fail(ENOTSUP, path + ": vmdk is not supported yet");
}
Result<void> VmdkImage::create(const std::string& path, const VmdkCreateOptions&) {
  return fail(ENOTSUP, path + ": vmdk is not supported yet");
}
Result<void> VmdkImage::convert_from(BlockDevice&, const std::string& path, const std::string&, bool) {
  return fail(ENOTSUP, path + ": vmdk is not supported yet");
}
Result<void> VmdkImage::parse_bytes(std::span<const uint8_t>) { return fail(ENOTSUP, "vmdk"); }
Result<void> VmdkImage::read(uint64_t, std::span<uint8_t>) { return fail(ENOTSUP, "vmdk"); }
Result<void> VmdkImage::write(uint64_t, std::span<const uint8_t>) { return fail(EROFS, "vmdk is read-only"); }
Result<void> VmdkImage::write_zeroes(uint64_t, uint64_t) { return fail(EROFS, "vmdk is read-only"); }
Result<std::vector<Extent>> VmdkImage::block_status(uint64_t, uint64_t) { return fail(ENOTSUP, "vmdk"); }

}  // namespace keel::disk
