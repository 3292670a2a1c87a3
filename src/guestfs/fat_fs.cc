#include "guestfs/fat_fs.h"
namespace keel::guestfs {
Result<std::optional<FsProbe>> probe_fat(disk::BlockDevice&) { return std::optional<FsProbe>(); }
Result<std::unique_ptr<Filesystem>> open_fat_filesystem(disk::BlockDevice&, bool) { return fail(ENOSYS, "FAT not yet"); }
}
