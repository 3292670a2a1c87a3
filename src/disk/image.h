// open_image: the one entry point consumers (keel-img, keel-fish, keeld, the NBD server) use to open a
// disk image. It probes the format from the file's first bytes (qcow2 magic, VMDK sparse magic or
// descriptor text, else raw) unless the caller names one, and opens backing chains as needed.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "disk/block_device.h"

namespace keel::disk {

enum class ImageFormat { Raw, Qcow2, Vmdk };

std::string format_name(ImageFormat format);
Result<ImageFormat> parse_format(const std::string& name);

// Looks at the first bytes of the file. Errors only when the file cannot be read.
Result<ImageFormat> probe_format(const std::string& path);

// How image files meet the page cache, as qemu's cache modes: Writeback goes through it; None opens
// the image and its backing chain with O_DIRECT (vmdk images are read through the cache either way).
enum class CacheMode { Writeback, None };

Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, OpenMode mode);
Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, OpenMode mode,
                                                std::optional<ImageFormat> format);
Result<std::unique_ptr<BlockDevice>> open_image(const std::string& path, OpenMode mode,
                                                std::optional<ImageFormat> format, CacheMode cache);

}  // namespace keel::disk
