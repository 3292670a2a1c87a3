#include "disk/image.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "base/unique_fd.h"
#include "disk/image_internal.h"
#include "disk/qcow2_image.h"
#include "disk/raw_image.h"
#include "disk/vmdk_image.h"

namespace keel::disk {

std::string format_name(ImageFormat format) {
  switch (format) {
    case ImageFormat::Raw: return "raw";
    case ImageFormat::Qcow2: return "qcow2";
    case ImageFormat::Vmdk: return "vmdk";
  }
  return "raw";
}

Result<ImageFormat> parse_format(const std::string& name) {
  if (name == "raw") return ImageFormat::Raw;
  if (name == "qcow2") return ImageFormat::Qcow2;
  if (name == "vmdk") return ImageFormat::Vmdk;
  return fail_invalid("unknown image format '{}' (supported: raw, qcow2, vmdk)", name);
}

Result<ImageFormat> probe_format(const std::string& path) {
  UniqueFd fd = TRY(UniqueFd::open(path, O_RDONLY));
  uint8_t head[512] = {};
  size_t n = TRY_CTX(read_full(fd.get(), head, sizeof(head)), "read " + path);
  if (n >= 4 && std::memcmp(head, "QFI\xfb", 4) == 0) return ImageFormat::Qcow2;
  if (n >= 4 && std::memcmp(head, "KDMV", 4) == 0) return ImageFormat::Vmdk;
  if (n >= 21 && std::memcmp(head, "# Disk DescriptorFile", 21) == 0) return ImageFormat::Vmdk;
  return ImageFormat::Raw;
}

Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, OpenMode mode) {
  return open_image(path, mode, std::nullopt);
}

Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, OpenMode mode,
                                                std::optional<ImageFormat> format) {
  return open_image_internal(path, mode, format, 0);
}

Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, OpenMode mode,
                                                std::optional<ImageFormat> format, CacheMode cache) {
  return open_image_internal(path, mode, format, 0, cache);
}

Result<std::unique_ptr<BlockDevice>> open_image_internal(const std::string& path, OpenMode mode,
                                                         std::optional<ImageFormat> format, int depth,
                                                         CacheMode cache) {
  ImageFormat fmt = format ? *format : TRY(probe_format(path));
  switch (fmt) {
    case ImageFormat::Raw: {
      auto raw = TRY(cache == CacheMode::None ? RawImage::open_direct(path, mode) : RawImage::open(path, mode));
      return std::unique_ptr<BlockDevice>(std::move(raw));
    }
    case ImageFormat::Qcow2: {
      Qcow2OpenOptions options;
      options.direct = cache == CacheMode::None;
      auto image = TRY(Qcow2Image::open(path, mode, options, depth));
      return std::unique_ptr<BlockDevice>(std::move(image));
    }
    case ImageFormat::Vmdk: {
      auto image = TRY(VmdkImage::open(path, mode, {}, depth));
      return std::unique_ptr<BlockDevice>(std::move(image));
    }
  }
  return fail(ENOTSUP, "open " + path + ": unknown format");
}

}  // namespace keel::disk
