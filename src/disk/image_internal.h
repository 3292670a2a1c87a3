// Internal: opening an image as part of a backing chain, with the chain's depth so loops end.
#pragma once

#include "disk/image.h"

namespace keel::disk {

Result<std::unique_ptr<BlockDevice>> open_image_internal(const std::string& path, OpenMode mode,
                                                         std::optional<ImageFormat> format, int depth,
                                                         CacheMode cache = CacheMode::Writeback);

}  // namespace keel::disk
