// tar-out / tar-in: a guest directory to and from a POSIX ustar stream (GNU long-name records
// for long paths and link targets; pax path/linkpath records are read).
#pragma once

#include <string>

#include "guestfs/guest.h"

namespace keel::guestfs {

// Writes the contents of `dir` as "./..." entries to `fd`.
Result<void> tar_out(Guest& guest, const std::string& dir, int fd);
// Unpacks a tar stream read from `fd` into `dir` (which must exist). Entries that would leave
// `dir` ("..", absolute paths) are refused.
Result<void> tar_in(Guest& guest, int fd, const std::string& dir);

}  // namespace keel::guestfs
