// FAT12/16/32 with long file names (VFAT), read and write. Our own code: no Debian library reads
// and writes FAT in userspace. Cluster chains are bounds- and loop-checked; a cross-linked or
// looping chain is an error, never a hang.
#pragma once

#include <memory>
#include <optional>

#include "guestfs/filesystem.h"

namespace keel::guestfs {

// Some(probe) when the device holds a FAT filesystem, None when it does not.
Result<std::optional<FsProbe>> probe_fat(disk::BlockDevice& device);
Result<std::unique_ptr<Filesystem>> open_fat_filesystem(disk::BlockDevice& device, bool read_only);

}  // namespace keel::guestfs
