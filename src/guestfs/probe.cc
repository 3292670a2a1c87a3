#include <array>
#include <cstring>

#include "guestfs/ext_fs.h"
#include "guestfs/fat_fs.h"
#include "guestfs/filesystem.h"
#include "guestfs/util.h"

namespace keel::guestfs {

FileType FileStat::type() const {
  switch (mode & 0170000) {
    case 0100000: return FileType::Regular;
    case 0040000: return FileType::Directory;
    case 0120000: return FileType::Symlink;
    case 0020000: return FileType::CharDevice;
    case 0060000: return FileType::BlockDevice;
    case 0010000: return FileType::Fifo;
    case 0140000: return FileType::Socket;
    default: return FileType::Unknown;
  }
}

std::string mode_string(uint32_t mode) {
  std::string s = "?rwxrwxrwx";
  switch (mode & 0170000) {
    case 0100000: s[0] = '-'; break;
    case 0040000: s[0] = 'd'; break;
    case 0120000: s[0] = 'l'; break;
    case 0020000: s[0] = 'c'; break;
    case 0060000: s[0] = 'b'; break;
    case 0010000: s[0] = 'p'; break;
    case 0140000: s[0] = 's'; break;
  }
  for (int i = 0; i < 9; i++)
    if (!(mode & (1u << (8 - i)))) s[1 + i] = '-';
  if (mode & 04000) s[3] = (mode & 0100) ? 's' : 'S';
  if (mode & 02000) s[6] = (mode & 0010) ? 's' : 'S';
  if (mode & 01000) s[9] = (mode & 0001) ? 't' : 'T';
  return s;
}

namespace {

std::string uuid_string(const uint8_t* b) {
  return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                     b[15]);
}

std::string trim_label(const char* p, size_t n) {
  std::string s(p, strnlen(p, n));
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

bool probe_ext(const std::array<uint8_t, 8192>& head, FsProbe& out) {
  const uint8_t* sb = head.data() + 1024;
  if (load_le16(sb + 56) != 0xef53) return false;
  uint32_t compat = load_le32(sb + 92), incompat = load_le32(sb + 96), ro_compat = load_le32(sb + 100);
  uint32_t ext3_incompat = 0x0002 | 0x0004 | 0x0010;  // filetype, recover, meta_bg
  uint32_t ext3_ro = 0x0001 | 0x0002 | 0x0004;        // sparse_super, large_file, btree_dir
  if (incompat & 0x0008) return false;                // journal device, not a filesystem
  if ((incompat & ~ext3_incompat) || (ro_compat & ~ext3_ro)) {
    out.type = "ext4";
  } else if (compat & 0x0004) {
    out.type = "ext3";
  } else {
    out.type = "ext2";
  }
  out.uuid = uuid_string(sb + 104);
  out.label = trim_label(reinterpret_cast<const char*>(sb + 120), 16);
  return true;
}

bool probe_lvm(const std::array<uint8_t, 8192>& head, FsProbe& out) {
  for (int sector = 0; sector < 4; sector++) {
    const uint8_t* p = head.data() + sector * 512;
    if (std::memcmp(p, "LABELONE", 8) != 0 || std::memcmp(p + 24, "LVM2 001", 8) != 0) continue;
    uint32_t header_offset = load_le32(p + 20);
    if (header_offset < 32 || header_offset + 32 > 512) return false;
    const char* id = reinterpret_cast<const char*>(p + header_offset);
    std::string raw(id, 32);
    // LVM prints PV UUIDs in groups of 6-4-4-4-4-4-6.
    static const int groups[] = {6, 4, 4, 4, 4, 4, 6};
    std::string uuid;
    size_t at = 0;
    for (int g : groups) {
      if (!uuid.empty()) uuid.push_back('-');
      uuid += raw.substr(at, size_t(g));
      at += size_t(g);
    }
    out.type = "LVM2_member";
    out.uuid = uuid;
    return true;
  }
  return false;
}

bool probe_swap(const std::array<uint8_t, 8192>& head, FsProbe& out) {
  if (std::memcmp(head.data() + 4096 - 10, "SWAPSPACE2", 10) != 0 &&
      std::memcmp(head.data() + 4096 - 10, "SWAP-SPACE", 10) != 0)
    return false;
  out.type = "swap";
  out.uuid = uuid_string(head.data() + 1024 + 12);
  out.label = trim_label(reinterpret_cast<const char*>(head.data() + 1024 + 28), 16);
  return true;
}

}  // namespace

Result<FsProbe> probe_filesystem(disk::BlockDevice& device) {
  FsProbe probe;
  std::array<uint8_t, 8192> head{};
  uint64_t n = std::min<uint64_t>(device.size(), head.size());
  if (n < 512) return probe;
  TRY(device.read(0, std::span<uint8_t>(head.data(), n)));
  if (n >= 2048 && probe_ext(head, probe)) return probe;
  if (probe_lvm(head, probe)) return probe;
  if (n >= 4096 && probe_swap(head, probe)) return probe;
  if (auto fat = probe_fat(device)) {
    if (*fat) return **fat;
  }
  return probe;
}

Result<std::unique_ptr<Filesystem>> open_filesystem(disk::BlockDevice& device, const FsProbe& probe,
                                                    bool read_only) {
  if (probe.type == "ext2" || probe.type == "ext3" || probe.type == "ext4")
    return open_ext_filesystem(device, read_only);
  if (probe.type == "vfat") return open_fat_filesystem(device, read_only);
  if (probe.type.empty()) return fail(EINVAL, "no filesystem found on this device");
  return fail(EINVAL, "filesystem type " + probe.type + " cannot be mounted");
}

}  // namespace keel::guestfs
