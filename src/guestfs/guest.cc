#include "guestfs/guest.h"

#include <algorithm>
#include <ctime>
#include <cstring>
#include <deque>

#include "guestfs/devices.h"
#include "guestfs/lvm.h"
#include "guestfs/util.h"

namespace keel::guestfs {

namespace {
constexpr int kMaxSymlinkFollows = 40;
constexpr int kMaxWalkDepth = 256;
}  // namespace

std::string drive_name(size_t index) {
  // sda..sdz, sdaa..
  std::string letters;
  size_t n = index;
  do {
    letters.insert(letters.begin(), char('a' + n % 26));
    n = n / 26;
  } while (n-- > 0);
  return "/dev/sd" + letters;
}

Guest::~Guest() { umount_all(); }

void Guest::add_drive(std::unique_ptr<disk::BlockDevice> disk, bool read_only) {
  if (!read_only) read_only_ = false;
  disks_.push_back(std::move(disk));
}

Result<void> Guest::launch() {
  devices_.clear();
  derived_.clear();
  for (size_t i = 0; i < disks_.size(); i++) {
    auto* disk = disks_[i].get();
    std::string name = drive_name(i);
    GuestDevice whole;
    whole.name = name;
    whole.kind = DeviceKind::Disk;
    whole.device = disk;
    devices_.push_back(whole);
    auto table = read_partition_table(*disk);
    if (!table) {
      warnings_.push_back(name + ": " + table.error().message());
      continue;
    }
    for (const auto& w : table->warnings) warnings_.push_back(name + ": " + w);
    for (const auto& p : table->partitions) {
      auto part = std::make_unique<MappedDevice>(std::vector<MappedSegment>{{disk, p.offset, p.length}},
                                                 disk->read_only());
      GuestDevice dev;
      dev.name = name + std::to_string(p.number);
      dev.kind = DeviceKind::Partition;
      dev.device = part.get();
      dev.partition = p;
      derived_.push_back(std::move(part));
      devices_.push_back(dev);
    }
  }
  for (auto& dev : devices_) {
    if (dev.kind == DeviceKind::Partition && dev.partition.extended) continue;
    auto probe = probe_filesystem(*dev.device);
    if (probe) {
      dev.probe = *probe;
    } else {
      dev.probe_error = probe.error().message();
    }
  }
  // A whole disk with a partition table holds no filesystem of its own; drop false positives.
  for (auto& dev : devices_) {
    if (dev.kind != DeviceKind::Disk) continue;
    bool has_parts = std::any_of(devices_.begin(), devices_.end(), [&](const GuestDevice& d) {
      return d.kind == DeviceKind::Partition && d.name.rfind(dev.name, 0) == 0;
    });
    if (has_parts) dev.probe = FsProbe{};
  }

  // LVM: gather each physical volume's metadata, then map every linear logical volume.
  std::vector<LvmPhysicalVolume> pvs;
  for (const auto& dev : devices_) {
    if (dev.probe.type != "LVM2_member") continue;
    auto pv = read_lvm_physical_volume(*dev.device);
    if (!pv) {
      warnings_.push_back(dev.name + ": " + pv.error().message());
      continue;
    }
    pv->device = dev.device;
    pv->device_name = dev.name;
    pvs.push_back(std::move(*pv));
  }
  if (!pvs.empty()) {
    auto vgs = assemble_volume_groups(pvs);
    for (const auto& w : vgs.warnings) warnings_.push_back(w);
    for (auto& lv : vgs.volumes) {
      auto mapped = std::make_unique<MappedDevice>(std::move(lv.segments), lv.read_only);
      GuestDevice dev;
      dev.name = "/dev/" + lv.vg + "/" + lv.name;
      dev.kind = DeviceKind::LogicalVolume;
      dev.device = mapped.get();
      derived_.push_back(std::move(mapped));
      auto probe = probe_filesystem(*dev.device);
      if (probe) dev.probe = *probe; else dev.probe_error = probe.error().message();
      devices_.push_back(dev);
    }
    volume_groups_ = vgs.names;
  }
  return ok();
}

std::vector<std::string> Guest::list_devices() const {
  std::vector<std::string> out;
  for (const auto& d : devices_)
    if (d.kind == DeviceKind::Disk) out.push_back(d.name);
  return out;
}

std::vector<std::string> Guest::list_partitions() const {
  std::vector<std::string> out;
  for (const auto& d : devices_)
    if (d.kind == DeviceKind::Partition) out.push_back(d.name);
  return out;
}

std::vector<std::string> Guest::list_volume_groups() const { return volume_groups_; }

std::vector<std::pair<std::string, std::string>> Guest::list_filesystems() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& d : devices_) {
    if (d.kind == DeviceKind::Partition && d.partition.extended) continue;
    if (d.probe.type.empty()) {
      if (d.kind != DeviceKind::Disk) out.emplace_back(d.name, "unknown");
      continue;
    }
    if (d.probe.type == "LVM2_member") continue;  // as guestfish: PVs are not filesystems
    out.emplace_back(d.name, d.probe.type);
  }
  return out;
}

Result<const GuestDevice*> Guest::find_device(const std::string& name) const {
  std::string wanted = name;
  if (wanted.rfind("UUID=", 0) == 0 || wanted.rfind("LABEL=", 0) == 0) {
    bool by_uuid = wanted[0] == 'U';
    std::string value = wanted.substr(by_uuid ? 5 : 6);
    if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'')) value = value.substr(1, value.size() - 2);
    for (const auto& d : devices_) {
      if (d.probe.type.empty()) continue;
      if (by_uuid ? strcasecmp(d.probe.uuid.c_str(), value.c_str()) == 0 : d.probe.label == value) return &d;
    }
    return fail(ENOENT, name + ": no such device");
  }
  if (wanted.rfind("/dev/mapper/", 0) == 0) {
    // VG-LV with '-' inside names doubled.
    std::string rest = wanted.substr(12);
    for (size_t i = 0; i < rest.size(); i++) {
      if (rest[i] == '-') {
        if (i + 1 < rest.size() && rest[i + 1] == '-') {
          rest.erase(i, 1);
          continue;
        }
        std::string vg = rest.substr(0, i), lv = rest.substr(i + 1);
        auto unescape = [](std::string s) {
          size_t at;
          while ((at = s.find("--")) != std::string::npos) s.erase(at, 1);
          return s;
        };
        wanted = "/dev/" + unescape(vg) + "/" + unescape(lv);
        break;
      }
    }
  }
  // The guest's own names for its disks (/dev/vda, /dev/hda, /dev/xvda) map to ours.
  for (const char* prefix : {"/dev/vd", "/dev/hd", "/dev/xvd"}) {
    if (wanted.rfind(prefix, 0) == 0) wanted = "/dev/sd" + wanted.substr(std::string(prefix).size());
  }
  for (const auto& d : devices_)
    if (d.name == wanted) return &d;
  return fail(ENOENT, name + ": no such device");
}

Result<void> Guest::mount(const std::string& device, const std::string& mountpoint, bool read_only) {
  const GuestDevice* dev = TRY(find_device(device));
  if (mountpoint.empty() || mountpoint[0] != '/') return fail(EINVAL, "mountpoint must be an absolute path");
  std::string canonical = "/";
  for (const auto& p : split_path(mountpoint)) canonical = join_path(canonical, p);
  for (const auto& m : mounts_)
    if (m.mountpoint == canonical) return fail(EBUSY, canonical + ": something is already mounted there");
  if (canonical != "/") {
    if (mounts_.empty()) return fail(EINVAL, "mount the root filesystem (/) first");
    auto dir = is_dir(canonical);
    if (!dir || !*dir) return fail(ENOENT, "mount: mountpoint " + canonical + " is not a directory");
  }
  if (dev->probe.type.empty())
    return fail(EINVAL, fmt::format("mount: {}: {}", dev->name,
                                    dev->probe_error.empty() ? "no filesystem recognised" : dev->probe_error));
  for (const auto& m : mounts_)
    if (m.device == dev->name && (!read_only || !m.fs->read_only()))
      return fail(EBUSY, dev->name + " is already mounted (at " + m.mountpoint + ")");
  auto fs = TRY_CTX(open_filesystem(*dev->device, dev->probe, read_only || read_only_), "mount " + dev->name);
  mounts_.push_back(Mount{canonical, dev->name, std::move(fs)});
  std::stable_sort(mounts_.begin(), mounts_.end(),
                   [](const Mount& a, const Mount& b) { return a.mountpoint.size() < b.mountpoint.size(); });
  return ok();
}

Result<void> Guest::umount(const std::string& mountpoint) {
  for (auto it = mounts_.begin(); it != mounts_.end(); ++it) {
    if (it->mountpoint == mountpoint || it->device == mountpoint) {
      for (const auto& m : mounts_)
        if (m.mountpoint != it->mountpoint && m.mountpoint.rfind(join_path(it->mountpoint, ""), 0) == 0)
          return fail(EBUSY, "umount " + mountpoint + ": a filesystem is mounted below it");
      TRY(it->fs->sync());
      mounts_.erase(it);
      return ok();
    }
  }
  return fail(EINVAL, "umount " + mountpoint + ": not mounted");
}

void Guest::umount_all() {
  // Deepest first, so each filesystem is closed (and flushed) before the one it sits on.
  while (!mounts_.empty()) mounts_.pop_back();
}

std::vector<std::pair<std::string, std::string>> Guest::mounts() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& m : mounts_) out.emplace_back(m.device, m.mountpoint);
  return out;
}

Mount* Guest::mount_for(const std::string& canonical_path, std::string& fs_path) {
  for (auto it = mounts_.rbegin(); it != mounts_.rend(); ++it) {
    const std::string& mp = it->mountpoint;
    if (mp == "/") {
      fs_path = canonical_path;
      return &*it;
    }
    if (canonical_path == mp) {
      fs_path = "/";
      return &*it;
    }
    if (canonical_path.size() > mp.size() && canonical_path.compare(0, mp.size(), mp) == 0 &&
        canonical_path[mp.size()] == '/') {
      fs_path = canonical_path.substr(mp.size());
      return &*it;
    }
  }
  return nullptr;
}

Result<FileStat> Guest::raw_lstat(const std::string& canonical_path) {
  std::string fs_path;
  Mount* m = mount_for(canonical_path, fs_path);
  if (!m) return fail(ENOENT, "no filesystem is mounted (use -m or -i)");
  return m->fs->lstat(fs_path);
}

Result<ResolvedPath> Guest::resolve(const std::string& path, Follow follow) {
  if (path.empty() || path[0] != '/') return fail(EINVAL, path + ": path must start with '/'");
  if (mounts_.empty()) return fail(ENOENT, "no filesystem is mounted (use -m or -i)");
  std::deque<std::string> todo;
  for (auto& p : split_path(path)) todo.push_back(std::move(p));
  std::vector<std::string> done;
  int follows = 0;
  auto current_path = [&](const std::vector<std::string>& parts) {
    std::string out;
    for (const auto& p : parts) out += "/" + p;
    return out.empty() ? std::string("/") : out;
  };
  while (!todo.empty()) {
    std::string part = std::move(todo.front());
    todo.pop_front();
    if (part == "..") {
      if (!done.empty()) done.pop_back();
      continue;
    }
    done.push_back(part);
    bool last = todo.empty();
    if (last && follow == Follow::NotLast) break;
    std::string candidate = current_path(done);
    auto st = raw_lstat(candidate);
    if (!st) {
      if (st.error().code() == ENOENT && last) break;  // a path to create
      if (st.error().code() == ENOENT || st.error().code() == ENOTDIR)
        return fail(st.error().code(), path + ": " + std::strerror(st.error().code()));
      return tl::unexpected(st.error());
    }
    if (st->type() == FileType::Symlink) {
      if (++follows > kMaxSymlinkFollows) return fail(ELOOP, path + ": too many levels of symbolic links");
      std::string fs_path;
      Mount* m = mount_for(candidate, fs_path);
      std::string target = TRY(m->fs->readlink(fs_path));
      done.pop_back();
      if (!target.empty() && target[0] == '/') done.clear();  // absolute links stay inside the guest
      auto parts = split_path(target);
      todo.insert(todo.begin(), parts.begin(), parts.end());
    } else if (!last && st->type() != FileType::Directory) {
      return fail(ENOTDIR, path + ": Not a directory");
    }
  }
  ResolvedPath r;
  r.guest_path = current_path(done);
  Mount* m = mount_for(r.guest_path, r.fs_path);
  if (!m) return fail(ENOENT, "no filesystem is mounted");
  r.fs = m->fs.get();
  return r;
}

Result<FileStat> Guest::lstat(const std::string& path) {
  auto r = TRY(resolve(path, Follow::NotLast));
  return r.fs->lstat(r.fs_path);
}

Result<FileStat> Guest::stat(const std::string& path) {
  auto r = TRY(resolve(path, Follow::Last));
  return r.fs->lstat(r.fs_path);
}

Result<std::vector<DirEntry>> Guest::readdir(const std::string& path) {
  auto r = TRY(resolve(path, Follow::Last));
  auto entries = TRY(r.fs->readdir(r.fs_path));
  std::sort(entries.begin(), entries.end(), [](const DirEntry& a, const DirEntry& b) { return a.name < b.name; });
  return entries;
}

Result<std::string> Guest::readlink(const std::string& path) {
  auto r = TRY(resolve(path, Follow::NotLast));
  return r.fs->readlink(r.fs_path);
}

Result<bool> Guest::exists(const std::string& path) {
  auto st = stat(path);
  if (st) return true;
  if (st.error().code() == ENOENT || st.error().code() == ENOTDIR) return false;
  return tl::unexpected(st.error());
}

Result<bool> Guest::is_dir(const std::string& path) {
  auto st = stat(path);
  if (!st) return false;
  return st->type() == FileType::Directory;
}

Result<bool> Guest::is_file(const std::string& path) {
  auto st = stat(path);
  if (!st) return false;
  return st->type() == FileType::Regular;
}

Result<std::string> Guest::read_file(const std::string& path, uint64_t limit) {
  auto r = TRY(resolve(path, Follow::Last));
  auto st = TRY(r.fs->lstat(r.fs_path));
  if (st.type() == FileType::Directory) return fail(EISDIR, path + ": is a directory");
  if (st.type() != FileType::Regular) return fail(EINVAL, path + ": not a regular file");
  if (st.size > limit) return fail(EFBIG, fmt::format("{}: file is too large ({} bytes)", path, st.size));
  std::string out;
  out.reserve(st.size);
  TRY(r.fs->read(r.fs_path, 0, st.size, [&](std::span<const uint8_t> chunk) -> Result<void> {
    out.append(reinterpret_cast<const char*>(chunk.data()), chunk.size());
    return ok();
  }));
  return out;
}

Result<void> Guest::read_stream(const std::string& path, uint64_t offset, uint64_t length,
                                const std::function<Result<void>(std::span<const uint8_t>)>& sink) {
  auto r = TRY(resolve(path, Follow::Last));
  auto st = TRY(r.fs->lstat(r.fs_path));
  if (st.type() == FileType::Directory) return fail(EISDIR, path + ": is a directory");
  if (st.type() != FileType::Regular) return fail(EINVAL, path + ": not a regular file");
  return r.fs->read(r.fs_path, offset, length, sink);
}

Result<FsStats> Guest::statvfs(const std::string& path) {
  auto r = TRY(resolve(path, Follow::Last));
  return r.fs->statvfs();
}

Result<void> Guest::walk(const std::string& dir,
                         const std::function<Result<void>(const std::string&, const FileStat&)>& visit) {
  auto root = TRY(resolve(dir, Follow::Last));
  std::function<Result<void>(const std::string&, const std::string&, int)> recurse =
      [&](const std::string& guest_dir, const std::string& relative, int depth) -> Result<void> {
    if (depth > kMaxWalkDepth) return fail(ELOOP, guest_dir + ": directories nest too deeply");
    std::string fs_path;
    Mount* m = mount_for(guest_dir, fs_path);
    if (!m) return fail(ENOENT, guest_dir + ": not mounted");
    auto entries = TRY(m->fs->readdir(fs_path));
    std::sort(entries.begin(), entries.end(), [](const DirEntry& a, const DirEntry& b) { return a.name < b.name; });
    for (const auto& e : entries) {
      std::string child = join_path(guest_dir, e.name);
      std::string child_rel = relative.empty() ? e.name : relative + "/" + e.name;
      std::string child_fs;
      Mount* cm = mount_for(child, child_fs);
      auto st = TRY(cm->fs->lstat(child_fs));
      TRY(visit(child_rel, st));
      if (st.type() == FileType::Directory) TRY(recurse(child, child_rel, depth + 1));
    }
    return ok();
  };
  return recurse(root.guest_path, "", 0);
}

Result<void> Guest::check_writable(const ResolvedPath& r, const std::string& path) {
  if (r.fs->read_only()) return fail(EROFS, path + ": filesystem is mounted read-only");
  return ok();
}

Result<ResolvedPath> Guest::resolve_for_create(const std::string& path) {
  // Resolve the parent fully and keep the last name as given.
  auto parts = split_path(path);
  if (parts.empty()) return fail(EINVAL, path + ": cannot create /");
  if (parts.back() == "..") return fail(EINVAL, path + ": bad name");
  auto parent = TRY(resolve(parent_path(path), Follow::Last));
  auto st = TRY_CTX(parent.fs->lstat(parent.fs_path), parent_path(path));
  if (st.type() != FileType::Directory) return fail(ENOTDIR, parent_path(path) + ": Not a directory");
  ResolvedPath r;
  r.guest_path = join_path(parent.guest_path, parts.back());
  Mount* m = mount_for(r.guest_path, r.fs_path);
  r.fs = m->fs.get();
  return r;
}

Result<void> Guest::write_file(const std::string& path, std::span<const uint8_t> data, WriteMode mode,
                               uint32_t create_mode) {
  auto r = TRY(resolve(path, Follow::Last));
  if (!r.fs->lstat(r.fs_path)) r = TRY(resolve_for_create(path));
  TRY(check_writable(r, path));
  return r.fs->write(r.fs_path, data, mode, create_mode);
}

Result<void> Guest::mkdir(const std::string& path, uint32_t mode) {
  auto r = TRY(resolve_for_create(path));
  TRY(check_writable(r, path));
  return r.fs->mkdir(r.fs_path, mode);
}

Result<void> Guest::mkdir_p(const std::string& path, uint32_t mode) {
  std::string current = "/";
  for (const auto& part : split_path(path)) {
    current = join_path(current, part);
    auto st = stat(current);
    if (st) {
      if (st->type() != FileType::Directory) return fail(ENOTDIR, current + ": Not a directory");
      continue;
    }
    if (st.error().code() != ENOENT) return tl::unexpected(st.error());
    TRY(mkdir(current, mode));
  }
  return ok();
}

Result<void> Guest::rm(const std::string& path) {
  auto r = TRY(resolve(path, Follow::NotLast));
  TRY(check_writable(r, path));
  return r.fs->unlink(r.fs_path);
}

Result<void> Guest::rmdir(const std::string& path) {
  auto r = TRY(resolve(path, Follow::NotLast));
  TRY(check_writable(r, path));
  for (const auto& m : mounts_)
    if (m.mountpoint == r.guest_path) return fail(EBUSY, path + ": is a mountpoint");
  return r.fs->rmdir(r.fs_path);
}

Result<void> Guest::rm_rf(const std::string& path) {
  auto r = resolve(path, Follow::NotLast);
  if (!r) return r.error().code() == ENOENT ? ok() : Result<void>(tl::unexpected(r.error()));
  auto st = r->fs->lstat(r->fs_path);
  if (!st) return st.error().code() == ENOENT ? ok() : Result<void>(tl::unexpected(st.error()));
  TRY(check_writable(*r, path));
  if (st->type() != FileType::Directory) return r->fs->unlink(r->fs_path);
  for (const auto& m : mounts_)
    if (m.mountpoint == r->guest_path || (r->guest_path != "/" && m.mountpoint.rfind(r->guest_path + "/", 0) == 0))
      return fail(EBUSY, path + ": a filesystem is mounted at or below it");
  std::function<Result<void>(const std::string&, int)> remove_tree = [&](const std::string& fs_dir,
                                                                         int depth) -> Result<void> {
    if (depth > kMaxWalkDepth) return fail(ELOOP, fs_dir + ": directories nest too deeply");
    auto entries = TRY(r->fs->readdir(fs_dir));
    for (const auto& e : entries) {
      std::string child = join_path(fs_dir, e.name);
      auto cst = TRY(r->fs->lstat(child));
      if (cst.type() == FileType::Directory) {
        TRY(remove_tree(child, depth + 1));
      } else {
        TRY(r->fs->unlink(child));
      }
    }
    if (split_path(fs_dir).empty()) return ok();  // keep a filesystem's root directory
    return r->fs->rmdir(fs_dir);
  };
  return remove_tree(r->fs_path, 0);
}

Result<void> Guest::mv(const std::string& from, const std::string& to) {
  auto src = TRY(resolve(from, Follow::NotLast));
  std::string dest_path = to;
  if (auto d = is_dir(to); d && *d) dest_path = join_path(to, base_name(src.guest_path));
  auto dst = TRY(resolve_for_create(dest_path));
  TRY(check_writable(src, from));
  if (src.fs == dst.fs) return src.fs->rename(src.fs_path, dst.fs_path);
  // Across filesystems: copy, then remove.
  TRY(cp_a(from, dest_path));
  return rm_rf(from);
}

Result<void> Guest::cp(const std::string& from, const std::string& to) {
  std::string dest = to;
  if (auto d = is_dir(to); d && *d) dest = join_path(to, base_name(from));
  std::string data = TRY(read_file(from));
  auto st = TRY(stat(from));
  return write_file(dest, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size()),
                    WriteMode::Truncate, st.mode & 07777);
}

Result<void> Guest::cp_a(const std::string& from, const std::string& to) {
  std::string dest = to;
  if (auto d = is_dir(to); d && *d) dest = join_path(to, base_name(from));
  auto st = TRY(lstat(from));
  auto copy_one = [&](const std::string& src, const std::string& dst, const FileStat& s) -> Result<void> {
    switch (s.type()) {
      case FileType::Directory: TRY(mkdir(dst, s.mode & 07777)); break;
      case FileType::Symlink: TRY(ln_s(TRY(readlink(src)), dst)); return ok();
      case FileType::Regular: {
        std::string data = TRY(read_file(src));
        TRY(write_file(dst, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size()),
                       WriteMode::Truncate, s.mode & 07777));
        break;
      }
      default: return ok();  // device nodes, fifos and sockets are not copied
    }
    TRY(chown(dst, s.uid, s.gid));
    TRY(chmod(dst, s.mode & 07777));
    return ok();
  };
  TRY(copy_one(from, dest, st));
  if (st.type() != FileType::Directory) return ok();
  return walk(from, [&](const std::string& rel, const FileStat& s) -> Result<void> {
    return copy_one(join_path(from, rel), join_path(dest, rel), s);
  });
}

Result<void> Guest::chmod(const std::string& path, uint32_t mode) {
  auto r = TRY(resolve(path, Follow::Last));
  TRY(check_writable(r, path));
  return r.fs->chmod(r.fs_path, mode);
}

Result<void> Guest::chown(const std::string& path, uint32_t uid, uint32_t gid) {
  auto r = TRY(resolve(path, Follow::NotLast));
  TRY(check_writable(r, path));
  return r.fs->chown(r.fs_path, uid, gid);
}

Result<void> Guest::ln_s(const std::string& target, const std::string& linkname) {
  auto r = TRY(resolve_for_create(linkname));
  TRY(check_writable(r, linkname));
  return r.fs->symlink(target, r.fs_path);
}

Result<void> Guest::touch(const std::string& path) {
  auto r = TRY(resolve(path, Follow::Last));
  if (!r.fs->lstat(r.fs_path)) return write_file(path, {}, WriteMode::Append, 0644);
  TRY(check_writable(r, path));
  int64_t now = time(nullptr);
  return r.fs->set_times(r.fs_path, now, now);
}

Result<void> Guest::set_times(const std::string& path, int64_t atime, int64_t mtime) {
  auto r = TRY(resolve(path, Follow::Last));
  TRY(check_writable(r, path));
  return r.fs->set_times(r.fs_path, atime, mtime);
}

Result<void> Guest::sync() {
  for (auto& m : mounts_) TRY_CTX(m.fs->sync(), "sync " + m.device);
  return ok();
}

}  // namespace keel::guestfs
