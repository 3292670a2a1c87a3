// Opens a disk image for keel-fish and guards it with a lock, so two writers never touch one image.
//
// Writers take an exclusive OFD lock on the whole image file; readers take a shared one. QEMU
// holds shared locks on bytes of images it runs, so a running VM's image cannot be opened for
// writing, and a keel-fish writer keeps QEMU (and other keel-fish writers) away.
#pragma once

#include <memory>
#include <string>

#include "base/unique_fd.h"
#include "disk/block_device.h"

namespace keel::guestfs {

enum class LockPolicy {
  ReadOnly,        // --ro: shared lock
  ReadWrite,       // --rw: exclusive lock, error if the image is in use
  PreferReadWrite, // default: exclusive lock if free, else fall back to read-only
};

struct OpenedDisk {
  std::unique_ptr<disk::BlockDevice> device;
  UniqueFd lock;  // held for as long as the device is open
  bool read_only = true;
  std::string note;  // why the image was opened read-only, if it was downgraded
};

// `format` is "" (detect), "raw", "qcow2" or "vmdk".
Result<OpenedDisk> open_disk(const std::string& path, LockPolicy policy, const std::string& format = "");

}  // namespace keel::guestfs
