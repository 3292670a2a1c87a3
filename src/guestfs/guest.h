// Guest: the disks of one virtual machine, the devices found on them (partitions, LVM logical
// volumes), the filesystems mounted from those devices, and a path walk over the mounts that
// resolves symbolic links the way the guest's kernel would, without ever leaving the guest's tree.
// Device names are those guestfish shows: /dev/sda, /dev/sda1, /dev/VG/LV.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "disk/block_device.h"
#include "guestfs/filesystem.h"
#include "guestfs/partition.h"

namespace keel::guestfs {

enum class DeviceKind { Disk, Partition, LogicalVolume };

struct GuestDevice {
  std::string name;  // /dev/sda, /dev/sda1, /dev/VG/LV
  DeviceKind kind = DeviceKind::Disk;
  disk::BlockDevice* device = nullptr;
  PartitionInfo partition;  // for partitions
  FsProbe probe;
  std::string probe_error;
};

struct Mount {
  std::string mountpoint;
  std::string device;
  std::unique_ptr<Filesystem> fs;
};

// A path resolved to the filesystem that holds it.
struct ResolvedPath {
  Filesystem* fs = nullptr;
  std::string fs_path;     // the path inside that filesystem
  std::string guest_path;  // the canonical guest path (no symlinks, no "..")
};

enum class Follow { Last, NotLast };

class Guest {
public:
  Guest() = default;
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;
  ~Guest();

  // Adds a disk; it becomes /dev/sda, /dev/sdb, ... in order.
  void add_drive(std::unique_ptr<disk::BlockDevice> disk, bool read_only);
  // Reads partition tables and LVM metadata and probes every device for a filesystem.
  Result<void> launch();
  bool read_only() const { return read_only_; }

  const std::vector<GuestDevice>& devices() const { return devices_; }
  std::vector<std::string> list_devices() const;
  std::vector<std::string> list_partitions() const;
  // Devices that hold a filesystem or other recognised content, with its type.
  std::vector<std::pair<std::string, std::string>> list_filesystems() const;
  std::vector<std::string> list_volume_groups() const;
  std::vector<std::string> warnings() const { return warnings_; }
  // Finds a device by name; also accepts /dev/mapper/VG-LV, /dev/vdX, /dev/hdX, UUID=... and LABEL=...
  Result<const GuestDevice*> find_device(const std::string& name) const;

  Result<void> mount(const std::string& device, const std::string& mountpoint, bool read_only);
  Result<void> umount(const std::string& mountpoint);
  void umount_all();
  std::vector<std::pair<std::string, std::string>> mounts() const;  // device, mountpoint
  bool has_mounts() const { return !mounts_.empty(); }

  // The path walk. Paths must be absolute.
  Result<ResolvedPath> resolve(const std::string& path, Follow follow);

  Result<FileStat> lstat(const std::string& path);
  Result<FileStat> stat(const std::string& path);
  Result<std::vector<DirEntry>> readdir(const std::string& path);  // sorted by name
  Result<std::string> readlink(const std::string& path);
  Result<bool> exists(const std::string& path);
  Result<bool> is_dir(const std::string& path);
  Result<bool> is_file(const std::string& path);
  // Reads a whole file (follows links); refuses files larger than `limit`.
  Result<std::string> read_file(const std::string& path, uint64_t limit = 1ull << 30);
  Result<void> read_stream(const std::string& path, uint64_t offset, uint64_t length,
                           const std::function<Result<void>(std::span<const uint8_t>)>& sink);
  Result<FsStats> statvfs(const std::string& path);

  // Visits every entry under `dir` (not `dir` itself), depth first in name order, not following
  // symlinks and crossing into filesystems mounted below. `relative` is relative to `dir`.
  Result<void> walk(const std::string& dir,
                    const std::function<Result<void>(const std::string& relative, const FileStat&)>& visit);

  Result<void> write_file(const std::string& path, std::span<const uint8_t> data, WriteMode mode,
                          uint32_t create_mode = 0644);
  Result<void> mkdir(const std::string& path, uint32_t mode = 0755);
  Result<void> mkdir_p(const std::string& path, uint32_t mode = 0755);
  Result<void> rm(const std::string& path);
  Result<void> rmdir(const std::string& path);
  Result<void> rm_rf(const std::string& path);
  Result<void> mv(const std::string& from, const std::string& to);
  Result<void> cp(const std::string& from, const std::string& to);  // a regular file
  Result<void> cp_a(const std::string& from, const std::string& to);  // recursively, keeping modes and owners
  Result<void> chmod(const std::string& path, uint32_t mode);
  Result<void> chown(const std::string& path, uint32_t uid, uint32_t gid);
  Result<void> ln_s(const std::string& target, const std::string& linkname);
  Result<void> touch(const std::string& path);
  Result<void> set_times(const std::string& path, int64_t atime, int64_t mtime);
  Result<void> sync();

private:
  Mount* mount_for(const std::string& canonical_path, std::string& fs_path);
  Result<FileStat> raw_lstat(const std::string& canonical_path);
  Result<ResolvedPath> resolve_for_create(const std::string& path);
  Result<void> check_writable(const ResolvedPath& r, const std::string& path);

  bool read_only_ = true;
  std::vector<std::unique_ptr<disk::BlockDevice>> disks_;
  std::vector<std::unique_ptr<disk::BlockDevice>> derived_;  // partitions, LVs
  std::vector<GuestDevice> devices_;
  std::vector<std::string> warnings_;
  std::vector<std::string> volume_groups_;
  std::vector<Mount> mounts_;  // sorted by mountpoint length, shortest first
};

// Parses guestfish-style device names for drive letters: "/dev/sda2" -> (0, 2).
std::string drive_name(size_t index);

}  // namespace keel::guestfs
