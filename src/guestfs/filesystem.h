// Filesystem: what keel-fish needs from a mounted filesystem. Paths are absolute within the
// filesystem and contain no symlinks except possibly the last component: the Guest's path walk
// resolves links (they may cross mounts) before it calls in here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "disk/block_device.h"

namespace keel::guestfs {

enum class FileType { Regular, Directory, Symlink, CharDevice, BlockDevice, Fifo, Socket, Unknown };

struct FileStat {
  uint64_t ino = 0;
  uint32_t mode = 0;  // type bits and permissions, as st_mode
  uint32_t nlink = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint64_t size = 0;
  uint64_t blocks = 0;  // 512-byte units
  uint32_t blksize = 4096;
  uint64_t rdev = 0;
  int64_t atime = 0;
  int64_t mtime = 0;
  int64_t ctime = 0;
  FileType type() const;
};

struct DirEntry {
  std::string name;
  FileType type = FileType::Unknown;
  uint64_t ino = 0;
};

struct FsStats {
  uint64_t block_size = 0;
  uint64_t blocks = 0;
  uint64_t blocks_free = 0;
  uint64_t blocks_available = 0;  // to non-root users
  uint64_t files = 0;
  uint64_t files_free = 0;
  uint64_t name_max = 255;
};

enum class WriteMode { Truncate, Append };

class Filesystem {
public:
  virtual ~Filesystem() = default;
  virtual std::string type() const = 0;  // "ext4", "vfat", ...
  virtual bool read_only() const = 0;

  virtual Result<FileStat> lstat(const std::string& path) = 0;
  virtual Result<std::vector<DirEntry>> readdir(const std::string& path) = 0;  // without "." and ".."
  virtual Result<std::string> readlink(const std::string& path) = 0;
  // Streams a regular file's bytes from `offset` (at most `length`) to `sink` in chunks.
  virtual Result<void> read(const std::string& path, uint64_t offset, uint64_t length,
                            const std::function<Result<void>(std::span<const uint8_t>)>& sink) = 0;
  virtual Result<FsStats> statvfs() = 0;

  // Writes: create (with `mode` if new) or truncate/append a regular file.
  virtual Result<void> write(const std::string& path, std::span<const uint8_t> data, WriteMode mode,
                             uint32_t create_mode) = 0;
  virtual Result<void> mkdir(const std::string& path, uint32_t mode) = 0;
  virtual Result<void> unlink(const std::string& path) = 0;  // not directories
  virtual Result<void> rmdir(const std::string& path) = 0;   // empty directories
  virtual Result<void> rename(const std::string& from, const std::string& to) = 0;
  virtual Result<void> symlink(const std::string& target, const std::string& path) = 0;
  virtual Result<void> chmod(const std::string& path, uint32_t mode) = 0;
  virtual Result<void> chown(const std::string& path, uint32_t uid, uint32_t gid) = 0;
  virtual Result<void> set_times(const std::string& path, int64_t atime, int64_t mtime) = 0;
  // Writes every change back to the device.
  virtual Result<void> sync() = 0;
};

// What probing a device found.
struct FsProbe {
  std::string type;   // "ext4", "ext3", "ext2", "vfat", "LVM2_member", "swap", "" if unknown
  std::string label;
  std::string uuid;
  std::string version;  // "FAT12"/"FAT16"/"FAT32"
};

// Looks at the first sectors of a device and says which filesystem (if any) is there.
Result<FsProbe> probe_filesystem(disk::BlockDevice& device);

// Opens the filesystem probe_filesystem found. `read_only` refuses all writes.
Result<std::unique_ptr<Filesystem>> open_filesystem(disk::BlockDevice& device, const FsProbe& probe,
                                                    bool read_only);

std::string mode_string(uint32_t mode);  // "drwxr-xr-x"

}  // namespace keel::guestfs
