#include "guestfs/fat_fs.h"

#include <algorithm>
#include <cstring>
#include <ctime>

#include "guestfs/util.h"

namespace keel::guestfs {

namespace {

constexpr uint8_t kAttrReadOnly = 0x01;
constexpr uint8_t kAttrVolume = 0x08;
constexpr uint8_t kAttrDirectory = 0x10;
constexpr uint8_t kAttrArchive = 0x20;
constexpr uint8_t kAttrLongName = 0x0f;
constexpr size_t kSlot = 32;
constexpr size_t kMaxDirBytes = 65536 * kSlot;  // the FAT limit: 65536 entries per directory
constexpr uint64_t kMaxFatBytes = 256ull << 20;

struct Geometry {
  uint32_t bytes_per_sector = 0;
  uint32_t sectors_per_cluster = 0;
  uint32_t cluster_size = 0;
  uint32_t reserved_sectors = 0;
  uint32_t num_fats = 0;
  uint32_t root_entries = 0;
  uint64_t total_sectors = 0;
  uint32_t fat_sectors = 0;
  uint32_t root_dir_sectors = 0;
  uint64_t first_data_sector = 0;
  uint32_t cluster_count = 0;
  int fat_bits = 0;  // 12, 16, 32
  uint32_t root_cluster = 0;
  uint32_t fsinfo_sector = 0;
  uint32_t volume_id = 0;
  std::string boot_label;
};

Result<Geometry> parse_boot_sector(const uint8_t* b, uint64_t device_size) {
  if (!(b[0] == 0xeb || b[0] == 0xe9)) return fail_invalid("no FAT boot sector jump");
  Geometry g;
  g.bytes_per_sector = load_le16(b + 11);
  g.sectors_per_cluster = b[13];
  g.reserved_sectors = load_le16(b + 14);
  g.num_fats = b[16];
  g.root_entries = load_le16(b + 17);
  uint32_t total16 = load_le16(b + 19);
  uint32_t fat16_size = load_le16(b + 22);
  uint32_t total32 = load_le32(b + 32);
  auto bps = g.bytes_per_sector;
  if (bps != 512 && bps != 1024 && bps != 2048 && bps != 4096) return fail_invalid("FAT: bad sector size {}", bps);
  auto spc = g.sectors_per_cluster;
  if (spc == 0 || (spc & (spc - 1)) != 0) return fail_invalid("FAT: bad sectors per cluster {}", spc);
  g.cluster_size = bps * spc;
  if (g.cluster_size > 256 * 1024) return fail_invalid("FAT: cluster size {} is too large", g.cluster_size);
  if (g.reserved_sectors == 0) return fail_invalid("FAT: no reserved sectors");
  if (g.num_fats == 0 || g.num_fats > 4) return fail_invalid("FAT: bad number of FATs {}", g.num_fats);
  g.total_sectors = total16 ? total16 : total32;
  g.fat_sectors = fat16_size ? fat16_size : load_le32(b + 36);
  if (g.fat_sectors == 0) return fail_invalid("FAT: FAT size is zero");
  g.root_dir_sectors = (g.root_entries * 32 + bps - 1) / bps;
  g.first_data_sector = uint64_t(g.reserved_sectors) + uint64_t(g.num_fats) * g.fat_sectors + g.root_dir_sectors;
  if (g.total_sectors <= g.first_data_sector) return fail_invalid("FAT: no room for data");
  if (g.total_sectors * bps > device_size)
    return fail_invalid("FAT: filesystem ({} sectors) is larger than its device", g.total_sectors);
  uint64_t clusters = (g.total_sectors - g.first_data_sector) / spc;
  if (clusters > 0x0ffffff4) return fail_invalid("FAT: too many clusters");
  g.cluster_count = uint32_t(clusters);
  g.fat_bits = clusters < 4085 ? 12 : clusters < 65525 ? 16 : 32;
  // The FAT must have an entry for every cluster.
  uint64_t needed = g.fat_bits == 12 ? (uint64_t(clusters + 2) * 3 + 1) / 2 : uint64_t(clusters + 2) * (g.fat_bits / 8);
  if (uint64_t(g.fat_sectors) * bps < needed) return fail_invalid("FAT: FAT is too small for the cluster count");
  if (g.fat_bits == 32) {
    if (fat16_size != 0 || g.root_entries != 0) return fail_invalid("FAT32: inconsistent boot sector");
    g.root_cluster = load_le32(b + 44);
    g.fsinfo_sector = load_le16(b + 48);
    if (g.root_cluster < 2 || g.root_cluster >= clusters + 2) return fail_invalid("FAT32: bad root cluster");
    if (b[66] == 0x29) {
      g.volume_id = load_le32(b + 67);
      g.boot_label.assign(reinterpret_cast<const char*>(b + 71), 11);
    }
  } else {
    if (g.root_entries == 0) return fail_invalid("FAT12/16: no root directory entries");
    if (b[38] == 0x29) {
      g.volume_id = load_le32(b + 39);
      g.boot_label.assign(reinterpret_cast<const char*>(b + 43), 11);
    }
  }
  return g;
}

std::string trim_right(std::string s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

uint8_t short_name_checksum(const uint8_t* name11) {
  uint8_t sum = 0;
  for (int i = 0; i < 11; i++) sum = uint8_t(((sum & 1) << 7) + (sum >> 1) + name11[i]);
  return sum;
}

std::string ascii_lower(std::string s) {
  for (auto& c : s) c = char(std::tolower(uint8_t(c)));
  return s;
}

int64_t fat_time_to_unix(uint16_t date, uint16_t time_field) {
  if (date == 0) return 0;
  struct tm tm = {};
  tm.tm_year = 80 + (date >> 9);
  tm.tm_mon = std::max(0, ((date >> 5) & 15) - 1);
  tm.tm_mday = std::max(1, date & 31);
  tm.tm_hour = time_field >> 11;
  tm.tm_min = (time_field >> 5) & 63;
  tm.tm_sec = (time_field & 31) * 2;
  return int64_t(timegm(&tm));
}

void unix_to_fat_time(int64_t t, uint16_t& date, uint16_t& time_field) {
  time_t tt = time_t(std::max<int64_t>(t, 315532800));  // FAT cannot go before 1980
  struct tm tm;
  gmtime_r(&tt, &tm);
  if (tm.tm_year < 80) tm.tm_year = 80;
  if (tm.tm_year > 80 + 127) tm.tm_year = 80 + 127;
  date = uint16_t(((tm.tm_year - 80) << 9) | ((tm.tm_mon + 1) << 5) | tm.tm_mday);
  time_field = uint16_t((tm.tm_hour << 11) | (tm.tm_min << 5) | (tm.tm_sec / 2));
}

struct DirRef {
  bool fixed_root = false;  // FAT12/16 root: a fixed run of sectors
  uint32_t cluster = 0;
  bool operator==(const DirRef& o) const { return fixed_root == o.fixed_root && cluster == o.cluster; }
};

struct FatEntry {
  std::string name;         // long name, or the 8.3 name as Linux shows it
  uint8_t short_name[11] = {};
  uint8_t attr = 0;
  uint8_t nt_flags = 0;
  uint32_t cluster = 0;
  uint32_t size = 0;
  uint16_t wdate = 0, wtime = 0, adate = 0, cdate = 0, ctime = 0;
  size_t first_slot = 0;  // first LFN slot (or the short slot when there is no long name)
  size_t short_slot = 0;
  bool is_dir() const { return attr & kAttrDirectory; }
};

struct Located {
  bool is_root = false;
  DirRef parent;
  FatEntry entry;
};

class FatFilesystem final : public Filesystem {
public:
  FatFilesystem(disk::BlockDevice& device, Geometry g, bool read_only)
      : device_(device), g_(std::move(g)), read_only_(read_only) {}
  ~FatFilesystem() override { (void)sync(); }

  Result<void> load() {
    uint64_t fat_bytes = uint64_t(g_.fat_sectors) * g_.bytes_per_sector;
    if (fat_bytes > kMaxFatBytes) return fail_invalid("FAT is too large ({} bytes)", fat_bytes);
    fat_.resize(size_t(fat_bytes));
    TRY(device_.read(uint64_t(g_.reserved_sectors) * g_.bytes_per_sector, fat_));
    fat_dirty_.assign(g_.fat_sectors, false);
    return ok();
  }

  std::string type() const override { return "vfat"; }
  bool read_only() const override { return read_only_; }

  Result<FileStat> lstat(const std::string& path) override {
    auto loc = TRY(locate(path));
    FileStat st;
    if (loc.is_root) {
      st.mode = 040755;
      st.ino = 1;
      auto entries = TRY(read_entries(root_ref()));
      st.nlink = 2 + uint32_t(std::count_if(entries.begin(), entries.end(), [](const FatEntry& e) { return e.is_dir(); }));
      st.blksize = g_.cluster_size;
      return st;
    }
    const FatEntry& e = loc.entry;
    bool dir = e.is_dir();
    st.mode = dir ? 040755 : 0100755;
    if (e.attr & kAttrReadOnly) st.mode &= ~0222u;
    st.ino = (uint64_t(loc.parent.cluster) << 20) + e.short_slot + 2;
    st.size = dir ? 0 : e.size;
    st.blksize = g_.cluster_size;
    st.mtime = fat_time_to_unix(e.wdate, e.wtime);
    st.ctime = st.mtime;
    st.atime = fat_time_to_unix(e.adate, 0);
    if (dir) {
      auto clusters = TRY(chain(e.cluster, kMaxDirBytes / g_.cluster_size + 1));
      st.blocks = uint64_t(clusters.size()) * g_.cluster_size / 512;
      st.size = uint64_t(clusters.size()) * g_.cluster_size;
      auto entries = TRY(read_entries(DirRef{false, e.cluster}));
      st.nlink = 2 + uint32_t(std::count_if(entries.begin(), entries.end(), [](const FatEntry& c) { return c.is_dir(); }));
    } else {
      st.nlink = 1;
      st.blocks = (uint64_t(e.size) + g_.cluster_size - 1) / g_.cluster_size * g_.cluster_size / 512;
    }
    return st;
  }

  Result<std::vector<DirEntry>> readdir(const std::string& path) override {
    auto ref = TRY(dir_ref(path));
    std::vector<DirEntry> out;
    for (const auto& e : TRY(read_entries(ref))) {
      DirEntry d;
      d.name = e.name;
      d.type = e.is_dir() ? FileType::Directory : FileType::Regular;
      out.push_back(std::move(d));
    }
    return out;
  }

  Result<std::string> readlink(const std::string& path) override {
    return fail(EINVAL, path + ": not a symbolic link (FAT has none)");
  }

  Result<void> read(const std::string& path, uint64_t offset, uint64_t length,
                    const std::function<Result<void>(std::span<const uint8_t>)>& sink) override {
    auto loc = TRY(locate(path));
    if (loc.is_root || loc.entry.is_dir()) return fail(EISDIR, path + ": is a directory");
    uint64_t size = loc.entry.size;
    if (offset >= size) return ok();
    length = std::min(length, size - offset);
    uint64_t needed = (size + g_.cluster_size - 1) / g_.cluster_size;
    auto clusters = TRY_CTX(chain(loc.entry.cluster, needed), path);
    if (clusters.size() < needed)
      return fail(EIO, fmt::format("{}: cluster chain ({} clusters) is shorter than the file size ({} bytes)", path,
                                   clusters.size(), size));
    std::vector<uint8_t> buffer;
    uint64_t pos = offset;
    uint64_t end = offset + length;
    while (pos < end) {
      // Read runs of consecutive clusters in one request.
      size_t index = size_t(pos / g_.cluster_size);
      size_t run = 1;
      while (index + run < clusters.size() && clusters[index + run] == clusters[index] + run &&
             uint64_t(run) * g_.cluster_size < (1u << 20))
        run++;
      uint64_t within = pos % g_.cluster_size;
      uint64_t n = std::min<uint64_t>(uint64_t(run) * g_.cluster_size - within, end - pos);
      buffer.resize(size_t(n));
      TRY(device_.read(cluster_offset(clusters[index]) + within, buffer));
      TRY(sink(buffer));
      pos += n;
    }
    return ok();
  }

  Result<FsStats> statvfs() override {
    FsStats s;
    s.block_size = g_.cluster_size;
    s.blocks = g_.cluster_count;
    uint64_t free_clusters = 0;
    for (uint32_t c = 2; c < g_.cluster_count + 2; c++)
      if (fat_get(c) == 0) free_clusters++;
    s.blocks_free = s.blocks_available = free_clusters;
    s.files = 0;
    s.files_free = 0;
    s.name_max = 255;
    return s;
  }

  Result<void> write(const std::string& path, std::span<const uint8_t> data, WriteMode mode,
                     uint32_t create_mode) override {
    TRY(writable());
    auto existing = locate(path);
    Located loc;
    if (existing) {
      loc = *existing;
      if (loc.is_root || loc.entry.is_dir()) return fail(EISDIR, path + ": is a directory");
    } else {
      if (existing.error().code() != ENOENT) return tl::unexpected(existing.error());
      loc = TRY(create_entry(path, 0, create_mode));
    }
    FatEntry& e = loc.entry;
    uint64_t offset = mode == WriteMode::Append ? e.size : 0;
    if (offset + data.size() > 0xffffffffull) return fail(EFBIG, path + ": FAT files are limited to 4 GiB");
    if (mode == WriteMode::Truncate && e.cluster) {
      TRY(free_chain(e.cluster));
      e.cluster = 0;
      e.size = 0;
    }
    uint64_t new_size = offset + data.size();
    uint64_t needed = (new_size + g_.cluster_size - 1) / g_.cluster_size;
    std::vector<uint32_t> clusters;
    if (e.cluster) clusters = TRY(chain(e.cluster, UINT64_MAX));
    if (clusters.size() > needed) {
      // A longer chain than the file needs (left by a truncating writer): trim it.
      if (needed == 0) {
        TRY(free_chain(e.cluster));
        e.cluster = 0;
        clusters.clear();
      } else {
        TRY(free_chain(clusters[needed]));
        fat_set(clusters[needed - 1], eoc());
        clusters.resize(needed);
      }
    }
    while (clusters.size() < needed) {
      uint32_t c = TRY(allocate_cluster(clusters.empty() ? 0 : clusters.back()));
      if (clusters.empty()) e.cluster = c;
      clusters.push_back(c);
    }
    size_t done = 0;
    while (done < data.size()) {
      uint64_t pos = offset + done;
      size_t index = size_t(pos / g_.cluster_size);
      uint64_t within = pos % g_.cluster_size;
      size_t n = size_t(std::min<uint64_t>(g_.cluster_size - within, data.size() - done));
      TRY(device_.write(cluster_offset(clusters[index]) + within, data.subspan(done, n)));
      done += n;
    }
    e.size = uint32_t(new_size);
    uint16_t d, t;
    unix_to_fat_time(time(nullptr), d, t);
    e.wdate = d;
    e.wtime = t;
    e.adate = d;
    e.attr |= kAttrArchive;
    TRY(update_entry(loc));
    return ok();
  }

  Result<void> mkdir(const std::string& path, uint32_t mode) override {
    TRY(writable());
    if (locate(path)) return fail(EEXIST, path + ": already exists");
    uint32_t cluster = TRY(allocate_cluster(0));
    TRY(zero_cluster(cluster));
    auto loc = create_entry(path, kAttrDirectory, mode, cluster);
    if (!loc) {
      (void)free_chain(cluster);
      return tl::unexpected(loc.error());
    }
    // "." and ".." (cluster 0 when the parent is the root).
    std::vector<uint8_t> dots(2 * kSlot, 0);
    auto fill = [&](uint8_t* slot, const char* name, uint32_t c) {
      std::memset(slot, ' ', 11);
      std::memcpy(slot, name, std::strlen(name));
      slot[11] = kAttrDirectory;
      store_le16(slot + 20, uint16_t(c >> 16));
      store_le16(slot + 26, uint16_t(c));
      store_le16(slot + 22, loc->entry.wtime);
      store_le16(slot + 24, loc->entry.wdate);
      store_le16(slot + 14, loc->entry.ctime);
      store_le16(slot + 16, loc->entry.cdate);
      store_le16(slot + 18, loc->entry.adate);
    };
    uint32_t parent_cluster = loc->parent.fixed_root || loc->parent.cluster == g_.root_cluster ? 0 : loc->parent.cluster;
    fill(dots.data(), ".", cluster);
    fill(dots.data() + kSlot, "..", parent_cluster);
    TRY(device_.write(cluster_offset(cluster), dots));
    return ok();
  }

  Result<void> unlink(const std::string& path) override {
    TRY(writable());
    auto loc = TRY(locate(path));
    if (loc.is_root || loc.entry.is_dir()) return fail(EISDIR, path + ": is a directory");
    TRY(remove_entry(loc));
    if (loc.entry.cluster) TRY(free_chain(loc.entry.cluster));
    return ok();
  }

  Result<void> rmdir(const std::string& path) override {
    TRY(writable());
    auto loc = TRY(locate(path));
    if (loc.is_root) return fail(EBUSY, "cannot remove the root directory");
    if (!loc.entry.is_dir()) return fail(ENOTDIR, path + ": not a directory");
    if (!TRY(read_entries(DirRef{false, loc.entry.cluster})).empty()) return fail(ENOTEMPTY, path + ": directory not empty");
    TRY(remove_entry(loc));
    if (loc.entry.cluster) TRY(free_chain(loc.entry.cluster));
    return ok();
  }

  Result<void> rename(const std::string& from, const std::string& to) override {
    TRY(writable());
    auto src = TRY(locate(from));
    if (src.is_root) return fail(EBUSY, "cannot rename the root directory");
    if (src.entry.is_dir() && (to == from || to.rfind(from + "/", 0) == 0))
      return fail(EINVAL, "cannot move " + from + " into itself");
    if (auto dst = locate(to)) {
      if (dst->is_root) return fail(EBUSY, "cannot replace the root directory");
      if (dst->entry.is_dir() != src.entry.is_dir()) return fail(dst->entry.is_dir() ? EISDIR : ENOTDIR, to + ": type differs");
      if (dst->parent == src.parent && dst->entry.short_slot == src.entry.short_slot) {
        if (dst->entry.name == base_name(to)) return ok();
      } else if (dst->entry.is_dir()) {
        TRY(rmdir(to));
      } else {
        TRY(unlink(to));
      }
      src = TRY(locate(from));
    }
    TRY(remove_entry(src));
    auto created = create_entry(to, src.entry.attr, 0, src.entry.cluster, &src.entry);
    if (!created) return tl::unexpected(created.error());
    if (src.entry.is_dir() && !(created->parent == src.parent)) {
      // Point the moved directory's ".." at its new parent.
      uint32_t parent_cluster =
          created->parent.fixed_root || created->parent.cluster == g_.root_cluster ? 0 : created->parent.cluster;
      std::vector<uint8_t> slot(kSlot);
      uint64_t at = cluster_offset(src.entry.cluster) + kSlot;
      TRY(device_.read(at, slot));
      if (slot[0] == '.' && slot[1] == '.') {
        store_le16(&slot[20], uint16_t(parent_cluster >> 16));
        store_le16(&slot[26], uint16_t(parent_cluster));
        TRY(device_.write(at, slot));
      }
    }
    return ok();
  }

  Result<void> symlink(const std::string&, const std::string& path) override {
    return fail(EPERM, path + ": FAT filesystems cannot hold symbolic links");
  }

  Result<void> chmod(const std::string& path, uint32_t mode) override {
    // FAT keeps one permission bit: read-only, from the owner's write bit.
    TRY(writable());
    auto loc = TRY(locate(path));
    if (loc.is_root) return ok();
    uint8_t attr = (mode & 0200) ? uint8_t(loc.entry.attr & ~kAttrReadOnly) : uint8_t(loc.entry.attr | kAttrReadOnly);
    if (attr == loc.entry.attr) return ok();
    loc.entry.attr = attr;
    return update_entry(loc);
  }

  Result<void> chown(const std::string& path, uint32_t uid, uint32_t gid) override {
    TRY(locate(path));
    if (uid == 0 && gid == 0) return ok();
    return fail(EPERM, path + ": FAT filesystems have no owners");
  }

  Result<void> set_times(const std::string& path, int64_t atime, int64_t mtime) override {
    TRY(writable());
    auto loc = TRY(locate(path));
    if (loc.is_root) return ok();
    uint16_t d, t, ad, at;
    unix_to_fat_time(mtime, d, t);
    unix_to_fat_time(atime, ad, at);
    loc.entry.wdate = d;
    loc.entry.wtime = t;
    loc.entry.adate = ad;
    return update_entry(loc);
  }

  Result<void> sync() override {
    if (read_only_) return ok();
    bool any = false;
    for (uint32_t s = 0; s < g_.fat_sectors; s++) {
      if (!fat_dirty_[s]) continue;
      any = true;
      auto bytes = std::span<const uint8_t>(fat_.data() + size_t(s) * g_.bytes_per_sector, g_.bytes_per_sector);
      for (uint32_t f = 0; f < g_.num_fats; f++) {
        uint64_t at = (uint64_t(g_.reserved_sectors) + uint64_t(f) * g_.fat_sectors + s) * g_.bytes_per_sector;
        TRY(device_.write(at, bytes));
      }
      fat_dirty_[s] = false;
    }
    if (any && g_.fat_bits == 32 && g_.fsinfo_sector && g_.fsinfo_sector < g_.reserved_sectors) {
      std::vector<uint8_t> info(512);
      uint64_t at = uint64_t(g_.fsinfo_sector) * g_.bytes_per_sector;
      TRY(device_.read(at, info));
      if (load_le32(&info[0]) == 0x41615252 && load_le32(&info[484]) == 0x61417272) {
        uint32_t free_clusters = 0;
        for (uint32_t c = 2; c < g_.cluster_count + 2; c++)
          if (fat_get(c) == 0) free_clusters++;
        store_le32(&info[488], free_clusters);
        store_le32(&info[492], next_free_ >= 2 ? next_free_ : 0xffffffff);
        TRY(device_.write(at, info));
      }
    }
    return device_.flush();
  }

  // The volume label from the root directory (mkfs.fat and Windows keep it there).
  Result<std::string> root_label() {
    auto raw = TRY(read_dir(root_ref(), nullptr));
    for (size_t i = 0; i + kSlot <= raw.size(); i += kSlot) {
      const uint8_t* s = &raw[i];
      if (s[0] == 0) break;
      if (s[0] == 0xe5 || s[11] == kAttrLongName) continue;
      if (s[11] & kAttrVolume) return trim_right(std::string(reinterpret_cast<const char*>(s), 11));
    }
    return std::string();
  }

private:
  Result<void> writable() {
    if (read_only_) return fail(EROFS, "filesystem is mounted read-only");
    if (!chains_checked_) {
      TRY(check_chains());
      chains_checked_ = true;
    }
    return ok();
  }

  // Before the first write: every cluster belongs to at most one file or directory. Freeing a
  // cross-linked chain would free another file's data, so such a filesystem is not written to.
  Result<void> check_chains() {
    std::vector<uint8_t> owner(size_t(g_.cluster_count) + 2, 0);
    auto claim = [&](uint32_t first, const std::string& what) -> Result<void> {
      auto clusters = TRY_CTX(chain(first, UINT64_MAX), what);
      for (uint32_t c : clusters) {
        if (owner[c]) return fail(EUCLEAN, fmt::format("{}: cluster {} is cross-linked with another file; "
                                                       "refusing to write (run fsck.fat)", what, c));
        owner[c] = 1;
      }
      return ok();
    };
    if (g_.fat_bits == 32) TRY(claim(g_.root_cluster, "/"));
    std::function<Result<void>(DirRef, const std::string&, int)> visit = [&](DirRef dir, const std::string& path,
                                                                           int depth) -> Result<void> {
      if (depth > 256) return fail(ELOOP, path + ": directories nest too deeply");
      for (const auto& e : TRY(read_entries(dir))) {
        std::string child = join_path(path, e.name);
        if (e.cluster == 0) continue;
        TRY(claim(e.cluster, child));
        if (e.is_dir()) TRY(visit(DirRef{false, e.cluster}, child, depth + 1));
      }
      return ok();
    };
    return visit(root_ref(), "/", 0);
  }

  DirRef root_ref() const { return g_.fat_bits == 32 ? DirRef{false, g_.root_cluster} : DirRef{true, 0}; }

  uint32_t eoc() const { return g_.fat_bits == 12 ? 0xfff : g_.fat_bits == 16 ? 0xffff : 0x0fffffff; }
  bool is_eoc(uint32_t v) const {
    return g_.fat_bits == 12 ? v >= 0xff8 : g_.fat_bits == 16 ? v >= 0xfff8 : v >= 0x0ffffff8;
  }

  uint32_t fat_get(uint32_t n) const {
    switch (g_.fat_bits) {
      case 12: {
        size_t at = n + n / 2;
        uint16_t v = load_le16(&fat_[at]);
        return (n & 1) ? v >> 4 : v & 0xfff;
      }
      case 16: return load_le16(&fat_[size_t(n) * 2]);
      default: return load_le32(&fat_[size_t(n) * 4]) & 0x0fffffff;
    }
  }

  void fat_set(uint32_t n, uint32_t value) {
    size_t at = 0, len = 0;
    switch (g_.fat_bits) {
      case 12: {
        at = n + n / 2;
        len = 2;
        uint16_t v = load_le16(&fat_[at]);
        v = (n & 1) ? uint16_t((v & 0x000f) | (value << 4)) : uint16_t((v & 0xf000) | (value & 0xfff));
        store_le16(&fat_[at], v);
        break;
      }
      case 16:
        at = size_t(n) * 2;
        len = 2;
        store_le16(&fat_[at], uint16_t(value));
        break;
      default:
        at = size_t(n) * 4;
        len = 4;
        store_le32(&fat_[at], (load_le32(&fat_[at]) & 0xf0000000) | (value & 0x0fffffff));
    }
    for (size_t b = at; b < at + len; b++) fat_dirty_[b / g_.bytes_per_sector] = true;
  }

  uint64_t cluster_offset(uint32_t cluster) const {
    return (g_.first_data_sector + uint64_t(cluster - 2) * g_.sectors_per_cluster) * g_.bytes_per_sector;
  }

  bool valid_cluster(uint32_t c) const { return c >= 2 && c < g_.cluster_count + 2; }

  // The clusters of a chain, at most `limit` of them. Loops and out-of-range links are errors.
  Result<std::vector<uint32_t>> chain(uint32_t first, uint64_t limit) {
    std::vector<uint32_t> out;
    if (first == 0) return out;
    std::vector<bool> seen(size_t(g_.cluster_count) + 2, false);
    uint32_t c = first;
    while (out.size() < limit) {
      if (!valid_cluster(c)) return fail(EIO, fmt::format("FAT chain points to invalid cluster {}", c));
      if (seen[c]) return fail(EIO, fmt::format("FAT chain starting at cluster {} loops back to cluster {}", first, c));
      seen[c] = true;
      out.push_back(c);
      uint32_t next = fat_get(c);
      if (is_eoc(next)) break;
      if (next == 0) return fail(EIO, fmt::format("FAT chain starting at cluster {} runs into a free cluster", first));
      c = next;
    }
    return out;
  }

  Result<std::vector<uint8_t>> read_dir(DirRef ref, std::vector<uint32_t>* clusters_out) {
    std::vector<uint8_t> raw;
    if (ref.fixed_root) {
      raw.resize(size_t(g_.root_entries) * kSlot);
      uint64_t at = (uint64_t(g_.reserved_sectors) + uint64_t(g_.num_fats) * g_.fat_sectors) * g_.bytes_per_sector;
      TRY(device_.read(at, raw));
      return raw;
    }
    auto clusters = TRY(chain(ref.cluster, kMaxDirBytes / g_.cluster_size + 1));
    if (uint64_t(clusters.size()) * g_.cluster_size > kMaxDirBytes + g_.cluster_size)
      return fail(EIO, "directory is larger than FAT allows");
    raw.resize(clusters.size() * g_.cluster_size);
    for (size_t i = 0; i < clusters.size(); i++)
      TRY(device_.read(cluster_offset(clusters[i]), std::span<uint8_t>(raw.data() + i * g_.cluster_size, g_.cluster_size)));
    if (clusters_out) *clusters_out = std::move(clusters);
    return raw;
  }

  Result<void> write_dir_slots(DirRef ref, const std::vector<uint8_t>& raw, const std::vector<uint32_t>& clusters,
                               size_t first_slot, size_t count) {
    // Writes back only the slots that changed.
    for (size_t s = first_slot; s < first_slot + count; s++) {
      size_t byte = s * kSlot;
      uint64_t at;
      if (ref.fixed_root) {
        at = (uint64_t(g_.reserved_sectors) + uint64_t(g_.num_fats) * g_.fat_sectors) * g_.bytes_per_sector + byte;
      } else {
        at = cluster_offset(clusters[byte / g_.cluster_size]) + byte % g_.cluster_size;
      }
      TRY(device_.write(at, std::span<const uint8_t>(raw.data() + byte, kSlot)));
    }
    return ok();
  }

  std::vector<FatEntry> parse_entries(const std::vector<uint8_t>& raw) {
    std::vector<FatEntry> out;
    std::u16string lfn;
    int lfn_expected = 0;
    uint8_t lfn_checksum = 0;
    size_t lfn_start = 0;
    bool lfn_valid = false;
    size_t slots = raw.size() / kSlot;
    for (size_t i = 0; i < slots; i++) {
      const uint8_t* s = &raw[i * kSlot];
      if (s[0] == 0) break;
      if (s[0] == 0xe5) {
        lfn_valid = false;
        continue;
      }
      if ((s[11] & 0x3f) == kAttrLongName) {
        int ord = s[0] & 0x1f;
        if (s[0] & 0x40) {
          lfn_expected = ord;
          lfn_checksum = s[13];
          lfn_start = i;
          lfn.assign(size_t(ord) * 13, u'\0');
          lfn_valid = ord >= 1 && ord <= 20;
        } else if (!lfn_valid || ord != lfn_expected - 1 || s[13] != lfn_checksum) {
          lfn_valid = false;
          continue;
        } else {
          lfn_expected = ord;
        }
        if (!lfn_valid || ord < 1) {
          lfn_valid = false;
          continue;
        }
        static const int offsets[13] = {1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30};
        for (int k = 0; k < 13; k++) lfn[size_t(ord - 1) * 13 + size_t(k)] = char16_t(load_le16(s + offsets[k]));
        continue;
      }
      FatEntry e;
      std::memcpy(e.short_name, s, 11);
      e.attr = s[11];
      e.nt_flags = s[12];
      e.ctime = load_le16(s + 14);
      e.cdate = load_le16(s + 16);
      e.adate = load_le16(s + 18);
      e.cluster = (g_.fat_bits == 32 ? uint32_t(load_le16(s + 20)) << 16 : 0) | load_le16(s + 26);
      e.wtime = load_le16(s + 22);
      e.wdate = load_le16(s + 24);
      e.size = load_le32(s + 28);
      e.short_slot = i;
      bool have_lfn = lfn_valid && lfn_expected == 1 && short_name_checksum(s) == lfn_checksum;
      lfn_valid = false;
      if (e.attr & kAttrVolume) continue;  // the volume label, not a file
      if (have_lfn) {
        size_t end = lfn.find(u'\0');
        if (end != std::u16string::npos) lfn.resize(end);
        e.name = utf16_to_utf8(lfn);
        e.first_slot = lfn_start;
      } else {
        std::string base = trim_right(std::string(reinterpret_cast<const char*>(s), 8));
        std::string ext = trim_right(std::string(reinterpret_cast<const char*>(s + 8), 3));
        if (!base.empty() && uint8_t(base[0]) == 0x05) base[0] = char(0xe5);
        if (e.nt_flags & 0x08) base = ascii_lower(base);
        if (e.nt_flags & 0x10) ext = ascii_lower(ext);
        e.name = ext.empty() ? base : base + "." + ext;
        e.first_slot = i;
      }
      if (e.name == "." || e.name == ".." || e.name.empty() || e.name.find('/') != std::string::npos) continue;
      if (e.is_dir() && e.cluster == 0) continue;  // a directory with no clusters is broken: hide it
      out.push_back(std::move(e));
    }
    return out;
  }

  Result<std::vector<FatEntry>> read_entries(DirRef ref) {
    auto raw = TRY(read_dir(ref, nullptr));
    return parse_entries(raw);
  }

  static bool names_equal(const std::string& a, const std::string& b) {
    // FAT compares names without regard to (ASCII) case.
    return a.size() == b.size() && ascii_lower(a) == ascii_lower(b);
  }

  Result<Located> locate(const std::string& path) {
    Located loc;
    auto parts = split_path(path);
    if (parts.empty()) {
      loc.is_root = true;
      return loc;
    }
    DirRef dir = root_ref();
    for (size_t i = 0; i < parts.size(); i++) {
      auto entries = TRY(read_entries(dir));
      auto it = std::find_if(entries.begin(), entries.end(), [&](const FatEntry& e) { return names_equal(e.name, parts[i]); });
      if (it == entries.end()) return fail(ENOENT, path + ": No such file or directory");
      if (i + 1 == parts.size()) {
        loc.parent = dir;
        loc.entry = *it;
        return loc;
      }
      if (!it->is_dir()) return fail(ENOTDIR, path + ": Not a directory");
      dir = DirRef{false, it->cluster};
    }
    return loc;
  }

  Result<DirRef> dir_ref(const std::string& path) {
    auto loc = TRY(locate(path));
    if (loc.is_root) return root_ref();
    if (!loc.entry.is_dir()) return fail(ENOTDIR, path + ": Not a directory");
    return DirRef{false, loc.entry.cluster};
  }

  Result<uint32_t> allocate_cluster(uint32_t previous) {
    uint32_t total = g_.cluster_count;
    uint32_t start = next_free_ >= 2 && next_free_ < total + 2 ? next_free_ : 2;
    for (uint32_t k = 0; k < total; k++) {
      uint32_t c = 2 + (start - 2 + k) % total;
      if (fat_get(c) != 0) continue;
      fat_set(c, eoc());
      if (previous) fat_set(previous, c);
      next_free_ = c + 1;
      return c;
    }
    return fail(ENOSPC, "FAT filesystem is full");
  }

  Result<void> zero_cluster(uint32_t c) { return device_.write_zeroes(cluster_offset(c), g_.cluster_size); }

  Result<void> free_chain(uint32_t first) {
    auto clusters = TRY(chain(first, UINT64_MAX));
    for (uint32_t c : clusters) fat_set(c, 0);
    return ok();
  }

  // Makes the 8.3 name for `name`, unique in `existing`. Sets `needs_lfn` when the 8.3 form does
  // not say all the long name says.
  void make_short_name(const std::string& name, const std::vector<FatEntry>& existing, uint8_t out[11],
                       bool& needs_lfn) {
    auto valid = [](char c) {
      return std::isalnum(uint8_t(c)) || std::strchr("$%'-_@~`!(){}^#&", c) != nullptr;
    };
    std::string upper;
    for (char c : name) upper.push_back(char(std::toupper(uint8_t(c))));
    size_t dot = upper.rfind('.');
    std::string base = dot == std::string::npos || dot == 0 ? upper : upper.substr(0, dot);
    std::string ext = dot == std::string::npos || dot == 0 ? "" : upper.substr(dot + 1);
    bool lossy = false;
    auto clean = [&](const std::string& s, size_t max) {
      std::string r;
      for (char c : s) {
        if (c == ' ' || c == '.') {
          lossy = true;
          continue;
        }
        if (!valid(c) || uint8_t(c) >= 0x80) {
          r.push_back('_');
          lossy = true;
        } else {
          r.push_back(c);
        }
      }
      if (r.size() > max) {
        r.resize(max);
        lossy = true;
      }
      return r;
    };
    std::string b = clean(base, 8), x = clean(ext, 3);
    if (b.empty()) {
      b = "_";
      lossy = true;
    }
    needs_lfn = lossy || name != (x.empty() ? b : b + "." + x);
    auto taken = [&](const uint8_t n[11]) {
      return std::any_of(existing.begin(), existing.end(),
                         [&](const FatEntry& e) { return std::memcmp(e.short_name, n, 11) == 0; });
    };
    auto fill = [&](const std::string& bb) {
      std::memset(out, ' ', 11);
      std::memcpy(out, bb.data(), std::min<size_t>(bb.size(), 8));
      std::memcpy(out + 8, x.data(), std::min<size_t>(x.size(), 3));
    };
    if (!lossy) {
      fill(b);
      if (!taken(out)) return;
    }
    for (int n = 1; n < 1000000; n++) {
      std::string tail = "~" + std::to_string(n);
      std::string bb = b.substr(0, std::min<size_t>(b.size(), 8 - tail.size())) + tail;
      fill(bb);
      if (!taken(out)) return;
    }
  }

  // Adds a directory entry for `path` (whose parent must exist); returns where it went.
  Result<Located> create_entry(const std::string& path, uint8_t attr, uint32_t mode, uint32_t cluster = 0,
                               const FatEntry* copy_from = nullptr) {
    std::string name = base_name(path);
    if (name.empty() || name == "." || name == ".." || name.size() > 255)
      return fail(EINVAL, path + ": invalid FAT file name");
    for (char c : name)
      if (std::strchr("\"*/:<>?\\|", c) || uint8_t(c) < 0x20) return fail(EINVAL, path + ": invalid character in a FAT file name");
    DirRef dir = TRY(dir_ref(parent_path(path)));
    std::vector<uint32_t> clusters;
    auto raw = TRY(read_dir(dir, &clusters));
    auto entries = parse_entries(raw);
    if (std::any_of(entries.begin(), entries.end(), [&](const FatEntry& e) { return names_equal(e.name, name); }))
      return fail(EEXIST, path + ": already exists");
    FatEntry e;
    bool needs_lfn = false;
    make_short_name(name, entries, e.short_name, needs_lfn);
    std::u16string lfn = utf8_to_utf16(name);
    size_t lfn_slots = needs_lfn ? (lfn.size() + 12) / 13 : 0;
    if (lfn_slots > 20) return fail(ENAMETOOLONG, path + ": name is too long");
    size_t need = lfn_slots + 1;
    // Find `need` consecutive free slots; extend the directory when there are none.
    size_t slots = raw.size() / kSlot, run = 0, start = 0;
    bool found = false;
    for (size_t i = 0; i < slots; i++) {
      uint8_t first = raw[i * kSlot];
      if (first == 0 || first == 0xe5) {
        if (run == 0) start = i;
        if (++run == need) {
          found = true;
          break;
        }
        if (first == 0) {
          // Everything after an end marker is free.
          if (slots - start >= need) {
            found = true;
            break;
          }
        }
      } else {
        run = 0;
      }
    }
    if (!found) {
      if (dir.fixed_root) return fail(ENOSPC, "the FAT root directory is full");
      while (!found) {
        if (raw.size() + g_.cluster_size > kMaxDirBytes) return fail(ENOSPC, "directory is full");
        uint32_t c = TRY(allocate_cluster(clusters.back()));
        TRY(zero_cluster(c));
        clusters.push_back(c);
        size_t old_slots = slots;
        raw.resize(raw.size() + g_.cluster_size, 0);
        slots = raw.size() / kSlot;
        // Find the run again, from the start of the trailing free space.
        size_t s = old_slots;
        while (s > 0 && (raw[(s - 1) * kSlot] == 0 || raw[(s - 1) * kSlot] == 0xe5)) s--;
        if (slots - s >= need) {
          start = s;
          found = true;
        }
      }
    }
    // Free slots after an end marker must stay free: clear any 0x00 run we use into real entries.
    uint16_t d, t;
    unix_to_fat_time(time(nullptr), d, t);
    e.attr = copy_from ? copy_from->attr : uint8_t(attr | (attr & kAttrDirectory ? 0 : kAttrArchive));
    if (!copy_from && !(mode & 0200) && mode != 0) e.attr |= kAttrReadOnly;
    e.cluster = cluster;
    e.size = copy_from ? copy_from->size : 0;
    e.wdate = copy_from ? copy_from->wdate : d;
    e.wtime = copy_from ? copy_from->wtime : t;
    e.cdate = copy_from ? copy_from->cdate : d;
    e.ctime = copy_from ? copy_from->ctime : t;
    e.adate = copy_from ? copy_from->adate : d;
    e.name = name;
    e.first_slot = start;
    e.short_slot = start + lfn_slots;
    uint8_t checksum = short_name_checksum(e.short_name);
    for (size_t k = 0; k < lfn_slots; k++) {
      // Slots run from the last piece of the name to the first.
      size_t piece = lfn_slots - 1 - k;
      uint8_t* s = &raw[(start + k) * kSlot];
      std::memset(s, 0, kSlot);
      s[0] = uint8_t((piece + 1) | (k == 0 ? 0x40 : 0));
      s[11] = kAttrLongName;
      s[13] = checksum;
      static const int offsets[13] = {1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30};
      for (int c = 0; c < 13; c++) {
        size_t idx = piece * 13 + size_t(c);
        uint16_t ch = idx < lfn.size() ? lfn[idx] : idx == lfn.size() ? 0x0000 : 0xffff;
        store_le16(s + offsets[c], ch);
      }
    }
    encode_short(e, &raw[e.short_slot * kSlot]);
    TRY(write_dir_slots(dir, raw, clusters, start, need));
    Located loc;
    loc.parent = dir;
    loc.entry = e;
    return loc;
  }

  void encode_short(const FatEntry& e, uint8_t* s) {
    std::memset(s, 0, kSlot);
    std::memcpy(s, e.short_name, 11);
    s[11] = e.attr;
    s[12] = 0;
    store_le16(s + 14, e.ctime);
    store_le16(s + 16, e.cdate);
    store_le16(s + 18, e.adate);
    store_le16(s + 20, g_.fat_bits == 32 ? uint16_t(e.cluster >> 16) : 0);
    store_le16(s + 22, e.wtime);
    store_le16(s + 24, e.wdate);
    store_le16(s + 26, uint16_t(e.cluster));
    store_le32(s + 28, e.is_dir() ? 0 : e.size);
  }

  Result<void> update_entry(const Located& loc) {
    std::vector<uint32_t> clusters;
    auto raw = TRY(read_dir(loc.parent, &clusters));
    size_t at = loc.entry.short_slot * kSlot;
    if (at + kSlot > raw.size() || std::memcmp(&raw[at], loc.entry.short_name, 11) != 0)
      return fail(EIO, "directory changed under an update");
    uint8_t nt = raw[at + 12];
    encode_short(loc.entry, &raw[at]);
    raw[at + 12] = nt;
    return write_dir_slots(loc.parent, raw, clusters, loc.entry.short_slot, 1);
  }

  Result<void> remove_entry(const Located& loc) {
    std::vector<uint32_t> clusters;
    auto raw = TRY(read_dir(loc.parent, &clusters));
    size_t first = loc.entry.first_slot, last = loc.entry.short_slot;
    if ((last + 1) * kSlot > raw.size() || first > last) return fail(EIO, "directory changed under a removal");
    for (size_t s = first; s <= last; s++) raw[s * kSlot] = 0xe5;
    return write_dir_slots(loc.parent, raw, clusters, first, last - first + 1);
  }

  disk::BlockDevice& device_;
  Geometry g_;
  bool read_only_;
  std::vector<uint8_t> fat_;
  std::vector<bool> fat_dirty_;
  uint32_t next_free_ = 0;
  bool chains_checked_ = false;
};

}  // namespace

Result<std::optional<FsProbe>> probe_fat(disk::BlockDevice& device) {
  if (device.size() < 512) return std::optional<FsProbe>();
  std::vector<uint8_t> boot(512);
  TRY(device.read(0, boot));
  if (boot[510] != 0x55 || boot[511] != 0xaa) {
    // Some FAT12 floppies lack the signature; insist on it otherwise (MBRs look alike).
    return std::optional<FsProbe>();
  }
  auto g = parse_boot_sector(boot.data(), device.size());
  if (!g) return std::optional<FsProbe>();
  // An MBR can pass the checks above; a FAT boot sector names its type.
  bool named = std::memcmp(&boot[54], "FAT", 3) == 0 || std::memcmp(&boot[82], "FAT32", 5) == 0;
  if (!named) return std::optional<FsProbe>();
  FsProbe probe;
  probe.type = "vfat";
  probe.version = g->fat_bits == 12 ? "FAT12" : g->fat_bits == 16 ? "FAT16" : "FAT32";
  probe.uuid = fmt::format("{:04X}-{:04X}", g->volume_id >> 16, g->volume_id & 0xffff);
  FatFilesystem fs(device, *g, true);
  if (fs.load()) {
    auto label = fs.root_label();
    if (label && !label->empty()) probe.label = *label;
  }
  if (probe.label.empty()) {
    std::string l = trim_right(g->boot_label);
    if (l != "NO NAME") probe.label = l;
  }
  return std::optional<FsProbe>(probe);
}

Result<std::unique_ptr<Filesystem>> open_fat_filesystem(disk::BlockDevice& device, bool read_only) {
  if (device.read_only()) read_only = true;
  std::vector<uint8_t> boot(512);
  TRY(device.read(0, boot));
  auto g = TRY_CTX(parse_boot_sector(boot.data(), device.size()), "open FAT filesystem");
  auto fs = std::make_unique<FatFilesystem>(device, std::move(g), read_only);
  TRY(fs->load());
  return std::unique_ptr<Filesystem>(std::move(fs));
}

}  // namespace keel::guestfs
