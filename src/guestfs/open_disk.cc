#include "guestfs/open_disk.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "disk/image.h"

namespace keel::guestfs {

namespace {

// Returns true when the lock was taken, false when someone else holds a conflicting one.
Result<bool> try_lock(int fd, bool exclusive) {
  struct flock fl;
  std::memset(&fl, 0, sizeof fl);
  fl.l_type = exclusive ? F_WRLCK : F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 0;
  if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return true;
  if (errno == EAGAIN || errno == EACCES) return false;
  return fail_errno("lock image");
}

Result<std::unique_ptr<disk::BlockDevice>> open_device(const std::string& path, bool read_only,
                                                       const std::string& format) {
  std::optional<disk::ImageFormat> fmt;
  if (!format.empty()) fmt = TRY(disk::parse_format(format));
  return disk::open_image(path, read_only ? disk::OpenMode::ReadOnly : disk::OpenMode::ReadWrite, fmt);
}

}  // namespace

Result<OpenedDisk> open_disk(const std::string& path, LockPolicy policy, const std::string& format) {
  OpenedDisk out;
  bool want_write = policy != LockPolicy::ReadOnly;
  // A write lock needs a descriptor open for writing.
  bool can_write = want_write && access(path.c_str(), W_OK) == 0;
  auto lock_fd = TRY(UniqueFd::open(path, can_write ? O_RDWR : O_RDONLY));
  bool writable = false;
  if (want_write) {
    if (!can_write) {
      if (policy == LockPolicy::ReadWrite) return fail(EACCES, path + ": image is not writable");
      out.note = path + ": image is not writable; opened read-only";
    } else if (TRY(try_lock(lock_fd.get(), true))) {
      writable = true;
    } else if (policy == LockPolicy::ReadWrite) {
      return fail(EBUSY, path + ": image is in use by another process (locked); open it with --ro to read it");
    } else {
      out.note = path + ": image is in use by another process; opened read-only";
    }
  }
  if (!writable && !TRY(try_lock(lock_fd.get(), false)))
    return fail(EBUSY, path + ": image is being written by another process");
  out.device = TRY(open_device(path, !writable, format));
  out.lock = std::move(lock_fd);
  out.read_only = !writable;
  return out;
}

}  // namespace keel::guestfs
