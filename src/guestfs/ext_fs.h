// ext2/3/4 through libext2fs (the library behind e2fsprogs and fuse2fs). Its I/O goes through an
// io_manager of ours that reads and writes a keel::disk::BlockDevice, so a partition inside a qcow2
// image is used in place, without a raw copy.
#pragma once

#include <memory>

#include "guestfs/filesystem.h"

namespace keel::guestfs {

// Opens an ext filesystem. Writing is refused (with a message that says why) when the journal needs
// recovery; reading such a filesystem is still allowed.
Result<std::unique_ptr<Filesystem>> open_ext_filesystem(disk::BlockDevice& device, bool read_only);

}  // namespace keel::guestfs
