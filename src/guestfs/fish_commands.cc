#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>

#include "base/size.h"
#include "base/unique_fd.h"
#include "guestfs/fish.h"
#include "guestfs/tar.h"
#include "guestfs/util.h"

namespace keel::guestfs {

namespace {

void out(std::string_view s) { fwrite(s.data(), 1, s.size(), stdout); }
void outln(std::string_view s) {
  out(s);
  fputc('\n', stdout);
}

std::span<const uint8_t> bytes_of(const std::string& s) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

Result<int64_t> parse_number(const std::string& s) {
  if (s.empty()) return fail_invalid("expected a number, got an empty string");
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 0);  // 0755 is octal, 0x1f hex, as in guestfish
  if (errno || *end) return fail_invalid("'{}' is not a number", s);
  return int64_t(v);
}

Result<const OsInfo*> find_root(FishState& st, const std::string& root) {
  if (!st.inspected_done) return fail_invalid("call inspect-os first");
  for (const auto& os : st.inspected)
    if (os.root == root) return &os;
  // Accept the root under any of its names.
  auto dev = st.guest.find_device(root);
  if (dev)
    for (const auto& os : st.inspected)
      if (os.root == (*dev)->name) return &os;
  return fail_invalid("{}: not an inspected root (see inspect-os)", root);
}

// ---- commands -------------------------------------------------------------------------------------

Result<void> cmd_ls(FishState& st, const std::vector<std::string>& a) {
  for (const auto& e : TRY(st.guest.readdir(a[0]))) outln(e.name);
  return ok();
}

Result<void> cmd_ll(FishState& st, const std::vector<std::string>& a) {
  auto dir = TRY(st.guest.resolve(a[0], Follow::Last));
  auto self = TRY(st.guest.stat(a[0]));
  print_ll_line(".", self, "");
  auto parent = st.guest.stat(parent_path(dir.guest_path));
  if (parent) print_ll_line("..", *parent, "");
  for (const auto& e : TRY(st.guest.readdir(a[0]))) {
    std::string path = join_path(dir.guest_path, e.name);
    auto s = TRY(st.guest.lstat(path));
    std::string link = s.type() == FileType::Symlink ? TRY(st.guest.readlink(path)) : "";
    print_ll_line(e.name, s, link);
  }
  return ok();
}

Result<void> cmd_find(FishState& st, const std::vector<std::string>& a) {
  // guestfs_find strips the directory's own name from each path: "/" gives "etc/motd",
  // "/etc" gives "/motd".
  std::string prefix = !a[0].empty() && a[0].back() == '/' ? "" : "/";
  std::vector<std::string> names;
  TRY(st.guest.walk(a[0], [&](const std::string& rel, const FileStat&) -> Result<void> {
    names.push_back(prefix + rel);
    return ok();
  }));
  std::sort(names.begin(), names.end());
  for (const auto& n : names) outln(n);
  return ok();
}

Result<void> cmd_cat(FishState& st, const std::vector<std::string>& a) {
  return st.guest.read_stream(a[0], 0, UINT64_MAX, [](std::span<const uint8_t> chunk) -> Result<void> {
    fwrite(chunk.data(), 1, chunk.size(), stdout);
    return ok();
  });
}

Result<void> print_lines(FishState& st, const std::string& path, int64_t n, bool from_end) {
  std::string data = TRY(st.guest.read_file(path));
  std::vector<std::string_view> lines;
  size_t pos = 0;
  while (pos < data.size()) {
    size_t end = data.find('\n', pos);
    if (end == std::string::npos) end = data.size();
    lines.emplace_back(data.data() + pos, end - pos);
    pos = end + 1;
  }
  size_t count = lines.size();
  size_t first = 0, last = count;
  if (!from_end) {
    // head-n: a negative count means "all but the last -n lines".
    last = n >= 0 ? std::min<size_t>(count, size_t(n)) : (size_t(-n) >= count ? 0 : count - size_t(-n));
  } else {
    // tail-n: a "+N" style count (given here as negative) means "from line N on".
    first = n >= 0 ? (size_t(n) >= count ? 0 : count - size_t(n)) : std::min<size_t>(count, size_t(-n) - 1);
  }
  for (size_t i = first; i < last; i++) outln(lines[i]);
  return ok();
}

Result<void> cmd_head(FishState& st, const std::vector<std::string>& a) { return print_lines(st, a[0], 10, false); }
Result<void> cmd_tail(FishState& st, const std::vector<std::string>& a) { return print_lines(st, a[0], 10, true); }
Result<void> cmd_head_n(FishState& st, const std::vector<std::string>& a) {
  return print_lines(st, a[1], TRY(parse_number(a[0])), false);
}
Result<void> cmd_tail_n(FishState& st, const std::vector<std::string>& a) {
  std::string n = a[0];
  if (!n.empty() && n[0] == '+') return print_lines(st, a[1], -TRY(parse_number(n.substr(1))), true);
  return print_lines(st, a[1], TRY(parse_number(n)), true);
}

Result<void> cmd_download(FishState& st, const std::vector<std::string>& a) {
  UniqueFd owned;
  int fd = STDOUT_FILENO;
  if (a[1] != "-") {
    owned = TRY(UniqueFd::open(a[1], O_WRONLY | O_CREAT | O_TRUNC, 0644));
    fd = owned.get();
  } else {
    fflush(stdout);
  }
  return st.guest.read_stream(a[0], 0, UINT64_MAX,
                              [&](std::span<const uint8_t> c) { return write_all(fd, c.data(), c.size()); });
}

Result<std::string> read_local(const std::string& path) {
  if (path == "-") {
    std::string data;
    char buf[65536];
    while (true) {
      size_t n = TRY(read_full(STDIN_FILENO, buf, sizeof buf));
      data.append(buf, n);
      if (n < sizeof buf) break;
    }
    return data;
  }
  return read_file(path);
}

Result<void> cmd_upload(FishState& st, const std::vector<std::string>& a) {
  std::string data = TRY(read_local(a[0]));
  TRY(st.guest.write_file(a[1], bytes_of(data), WriteMode::Truncate));
  return st.guest.sync();
}

Result<void> cmd_copy_out(FishState& st, const std::vector<std::string>& a) {
  const std::string& local = a.back();
  struct stat ls;
  if (::stat(local.c_str(), &ls) != 0 || !S_ISDIR(ls.st_mode)) return fail_invalid("copy-out: {}: not a local directory", local);
  for (size_t i = 0; i + 1 < a.size(); i++) TRY(copy_out(st.guest, a[i], local));
  return ok();
}

Result<void> cmd_copy_in(FishState& st, const std::vector<std::string>& a) {
  const std::string& remote = a.back();
  for (size_t i = 0; i + 1 < a.size(); i++) TRY(copy_in(st.guest, a[i], remote));
  return st.guest.sync();
}

Result<void> cmd_tar_out(FishState& st, const std::vector<std::string>& a) {
  UniqueFd owned;
  int fd = STDOUT_FILENO;
  if (a[1] != "-") {
    owned = TRY(UniqueFd::open(a[1], O_WRONLY | O_CREAT | O_TRUNC, 0644));
    fd = owned.get();
  } else {
    fflush(stdout);
  }
  return tar_out(st.guest, a[0], fd);
}

Result<void> cmd_tar_in(FishState& st, const std::vector<std::string>& a) {
  UniqueFd owned;
  int fd = STDIN_FILENO;
  if (a[0] != "-") {
    owned = TRY(UniqueFd::open(a[0], O_RDONLY));
    fd = owned.get();
  }
  return tar_in(st.guest, fd, a[1]);
}

Result<void> cmd_mkdir(FishState& st, const std::vector<std::string>& a) { return st.guest.mkdir(a[0]); }
Result<void> cmd_mkdir_p(FishState& st, const std::vector<std::string>& a) { return st.guest.mkdir_p(a[0]); }
Result<void> cmd_mkdir_mode(FishState& st, const std::vector<std::string>& a) {
  return st.guest.mkdir(a[0], uint32_t(TRY(parse_number(a[1]))));
}
Result<void> cmd_rm(FishState& st, const std::vector<std::string>& a) { return st.guest.rm(a[0]); }
Result<void> cmd_rm_f(FishState& st, const std::vector<std::string>& a) {
  auto r = st.guest.rm(a[0]);
  if (!r && r.error().code() == ENOENT) return ok();
  return r;
}
Result<void> cmd_rmdir(FishState& st, const std::vector<std::string>& a) { return st.guest.rmdir(a[0]); }
Result<void> cmd_rm_rf(FishState& st, const std::vector<std::string>& a) { return st.guest.rm_rf(a[0]); }
Result<void> cmd_mv(FishState& st, const std::vector<std::string>& a) { return st.guest.mv(a[0], a[1]); }
Result<void> cmd_cp(FishState& st, const std::vector<std::string>& a) { return st.guest.cp(a[0], a[1]); }
Result<void> cmd_cp_a(FishState& st, const std::vector<std::string>& a) { return st.guest.cp_a(a[0], a[1]); }
Result<void> cmd_write(FishState& st, const std::vector<std::string>& a) {
  return st.guest.write_file(a[0], bytes_of(a[1]), WriteMode::Truncate);
}
Result<void> cmd_write_append(FishState& st, const std::vector<std::string>& a) {
  return st.guest.write_file(a[0], bytes_of(a[1]), WriteMode::Append);
}
Result<void> cmd_touch(FishState& st, const std::vector<std::string>& a) { return st.guest.touch(a[0]); }
Result<void> cmd_chmod(FishState& st, const std::vector<std::string>& a) {
  return st.guest.chmod(a[1], uint32_t(TRY(parse_number(a[0]))));
}
Result<void> cmd_chown(FishState& st, const std::vector<std::string>& a) {
  return st.guest.chown(a[2], uint32_t(TRY(parse_number(a[0]))), uint32_t(TRY(parse_number(a[1]))));
}
Result<void> cmd_ln_s(FishState& st, const std::vector<std::string>& a) { return st.guest.ln_s(a[0], a[1]); }
Result<void> cmd_ln_sf(FishState& st, const std::vector<std::string>& a) {
  (void)st.guest.rm(a[1]);
  return st.guest.ln_s(a[0], a[1]);
}
Result<void> cmd_readlink(FishState& st, const std::vector<std::string>& a) {
  outln(TRY(st.guest.readlink(a[0])));
  return ok();
}

void print_stat(const FileStat& s) {
  out(fmt::format("dev: 0\nino: {}\nmode: {}\nnlink: {}\nuid: {}\ngid: {}\nrdev: {}\nsize: {}\nblksize: {}\n"
                  "blocks: {}\natime: {}\nmtime: {}\nctime: {}\n",
                  s.ino, s.mode, s.nlink, s.uid, s.gid, s.rdev, s.size, s.blksize, s.blocks, s.atime, s.mtime,
                  s.ctime));
}
Result<void> cmd_stat(FishState& st, const std::vector<std::string>& a) {
  print_stat(TRY(st.guest.stat(a[0])));
  return ok();
}
Result<void> cmd_lstat(FishState& st, const std::vector<std::string>& a) {
  print_stat(TRY(st.guest.lstat(a[0])));
  return ok();
}
Result<void> cmd_filesize(FishState& st, const std::vector<std::string>& a) {
  outln(std::to_string(TRY(st.guest.stat(a[0])).size));
  return ok();
}
Result<void> cmd_statvfs(FishState& st, const std::vector<std::string>& a) {
  auto s = TRY(st.guest.statvfs(a[0]));
  out(fmt::format("bsize: {0}\nfrsize: {0}\nblocks: {1}\nbfree: {2}\nbavail: {3}\nfiles: {4}\nffree: {5}\n"
                  "favail: {5}\nfsid: 0\nflag: {6}\nnamemax: {7}\n",
                  s.block_size, s.blocks, s.blocks_free, s.blocks_available, s.files, s.files_free,
                  st.guest.resolve(a[0], Follow::Last)->fs->read_only() ? 1 : 0, s.name_max));
  return ok();
}

std::string human(uint64_t bytes) {
  // df -h style: one decimal below 10, powers of 1024, rounded up.
  const char* units = "KMGTPE";
  double v = double(bytes);
  if (v < 1024) return fmt::format("{}", bytes);
  int u = -1;
  while (v >= 1024 && u < 5) {
    v /= 1024;
    u++;
  }
  if (v < 10) return fmt::format("{:.1f}{}", std::ceil(v * 10) / 10, units[u]);
  return fmt::format("{:.0f}{}", std::ceil(v), units[u]);
}

Result<void> print_df(FishState& st, bool human_sizes) {
  if (human_sizes)
    outln("Filesystem                                Size  Used Avail Use% Mounted on");
  else
    outln("Filesystem                           1K-blocks      Used Available Use% Mounted on");
  for (const auto& [dev, mp] : st.guest.mounts()) {
    auto s = TRY(st.guest.statvfs(mp));
    uint64_t size = s.blocks * s.block_size, avail = s.blocks_available * s.block_size;
    uint64_t used = (s.blocks - std::min(s.blocks, s.blocks_free)) * s.block_size;
    int pct = (used + avail) ? int((used * 100 + (used + avail) - 1) / (used + avail)) : 0;
    if (human_sizes)
      outln(fmt::format("{:<40} {:>5} {:>5} {:>5} {:>3}% {}", dev, human(size), human(used), human(avail), pct, mp));
    else
      outln(fmt::format("{:<36} {:>9} {:>9} {:>9} {:>3}% {}", dev, size / 1024, used / 1024, avail / 1024, pct, mp));
  }
  return ok();
}
Result<void> cmd_df(FishState& st, const std::vector<std::string>&) { return print_df(st, false); }
Result<void> cmd_df_h(FishState& st, const std::vector<std::string>&) { return print_df(st, true); }

Result<void> cmd_list_devices(FishState& st, const std::vector<std::string>&) {
  for (const auto& d : st.guest.list_devices()) outln(d);
  return ok();
}
Result<void> cmd_list_partitions(FishState& st, const std::vector<std::string>&) {
  for (const auto& d : st.guest.list_partitions()) outln(d);
  return ok();
}
Result<void> cmd_list_filesystems(FishState& st, const std::vector<std::string>&) {
  for (const auto& [d, t] : st.guest.list_filesystems()) outln(d + ": " + t);
  return ok();
}
Result<void> cmd_lvs(FishState& st, const std::vector<std::string>&) {
  for (const auto& d : st.guest.devices())
    if (d.kind == DeviceKind::LogicalVolume) outln(d.name);
  return ok();
}
Result<void> cmd_vgs(FishState& st, const std::vector<std::string>&) {
  for (const auto& v : st.guest.list_volume_groups()) outln(v);
  return ok();
}
Result<void> cmd_pvs(FishState& st, const std::vector<std::string>&) {
  for (const auto& d : st.guest.devices())
    if (d.probe.type == "LVM2_member") outln(d.name);
  return ok();
}
Result<void> cmd_vfs_type(FishState& st, const std::vector<std::string>& a) {
  outln(TRY(st.guest.find_device(a[0]))->probe.type);
  return ok();
}
Result<void> cmd_vfs_label(FishState& st, const std::vector<std::string>& a) {
  outln(TRY(st.guest.find_device(a[0]))->probe.label);
  return ok();
}
Result<void> cmd_vfs_uuid(FishState& st, const std::vector<std::string>& a) {
  outln(TRY(st.guest.find_device(a[0]))->probe.uuid);
  return ok();
}
Result<void> cmd_blockdev_getsize64(FishState& st, const std::vector<std::string>& a) {
  outln(std::to_string(TRY(st.guest.find_device(a[0]))->device->size()));
  return ok();
}
Result<void> cmd_part_get_parttype(FishState& st, const std::vector<std::string>& a) {
  const GuestDevice* d = TRY(st.guest.find_device(a[0]));
  if (d->kind != DeviceKind::Disk) return fail_invalid("{}: not a whole disk", a[0]);
  auto table = TRY(read_partition_table(*d->device));
  if (table.type == PartitionTableType::None) return fail_invalid("{}: no partition table", a[0]);
  outln(to_string(table.type));
  return ok();
}
Result<void> cmd_part_list(FishState& st, const std::vector<std::string>& a) {
  const GuestDevice* d = TRY(st.guest.find_device(a[0]));
  auto table = TRY(read_partition_table(*d->device));
  int i = 0;
  for (const auto& p : table.partitions) {
    outln(fmt::format("[{}] = {{\n  part_num: {}\n  part_start: {}\n  part_end: {}\n  part_size: {}\n}}", i++, p.number,
                      p.offset, p.offset + p.length - 1, p.length));
  }
  return ok();
}

Result<void> cmd_mount(FishState& st, const std::vector<std::string>& a) {
  return st.guest.mount(a[0], a[1], st.guest.read_only());
}
Result<void> cmd_mount_ro(FishState& st, const std::vector<std::string>& a) { return st.guest.mount(a[0], a[1], true); }
Result<void> cmd_umount(FishState& st, const std::vector<std::string>& a) { return st.guest.umount(a[0]); }
Result<void> cmd_umount_all(FishState& st, const std::vector<std::string>&) {
  TRY(st.guest.sync());
  st.guest.umount_all();
  return ok();
}
Result<void> cmd_mounts(FishState& st, const std::vector<std::string>&) {
  for (const auto& [dev, mp] : st.guest.mounts()) outln(dev);
  return ok();
}
Result<void> cmd_mountpoints(FishState& st, const std::vector<std::string>&) {
  for (const auto& [dev, mp] : st.guest.mounts()) outln(dev + ": " + mp);
  return ok();
}
Result<void> cmd_sync(FishState& st, const std::vector<std::string>&) { return st.guest.sync(); }
Result<void> print_bool(Result<bool> r) {
  outln(TRY(std::move(r)) ? "true" : "false");
  return ok();
}
Result<void> cmd_is_file(FishState& st, const std::vector<std::string>& a) { return print_bool(st.guest.is_file(a[0])); }
Result<void> cmd_is_dir(FishState& st, const std::vector<std::string>& a) { return print_bool(st.guest.is_dir(a[0])); }
Result<void> cmd_exists(FishState& st, const std::vector<std::string>& a) { return print_bool(st.guest.exists(a[0])); }
Result<void> cmd_is_symlink(FishState& st, const std::vector<std::string>& a) {
  auto s = st.guest.lstat(a[0]);
  outln(s && s->type() == FileType::Symlink ? "true" : "false");
  return ok();
}
Result<void> cmd_echo(FishState&, const std::vector<std::string>& a) {
  std::string line;
  for (size_t i = 0; i < a.size(); i++) line += (i ? " " : "") + a[i];
  outln(line);
  return ok();
}

Result<void> cmd_inspect_os(FishState& st, const std::vector<std::string>&) {
  // Inspection mounts and unmounts; keep what the user had mounted.
  auto saved = st.guest.mounts();
  TRY(st.guest.sync());
  st.guest.umount_all();
  st.inspected = TRY(inspect_os(st.guest));
  st.inspected_done = true;
  for (const auto& [dev, mp] : saved) (void)st.guest.mount(dev, mp, st.guest.read_only());
  for (const auto& os : st.inspected) outln(os.root);
  return ok();
}
Result<void> cmd_inspect_get_roots(FishState& st, const std::vector<std::string>&) {
  for (const auto& os : st.inspected) outln(os.root);
  return ok();
}
#define KEEL_INSPECT_GETTER(fn, expr)                                            \
  Result<void> fn(FishState& st, const std::vector<std::string>& a) {           \
    const OsInfo* os = TRY(find_root(st, a[0]));                                \
    outln(expr);                                                                \
    return ok();                                                                \
  }
KEEL_INSPECT_GETTER(cmd_inspect_get_type, os->type)
KEEL_INSPECT_GETTER(cmd_inspect_get_distro, os->distro)
KEEL_INSPECT_GETTER(cmd_inspect_get_hostname, os->hostname.empty() ? std::string("unknown") : os->hostname)
KEEL_INSPECT_GETTER(cmd_inspect_get_arch, os->arch)
KEEL_INSPECT_GETTER(cmd_inspect_get_product_name, os->product_name.empty() ? std::string("unknown") : os->product_name)
KEEL_INSPECT_GETTER(cmd_inspect_get_major_version, std::to_string(os->major_version))
KEEL_INSPECT_GETTER(cmd_inspect_get_minor_version, std::to_string(os->minor_version))
KEEL_INSPECT_GETTER(cmd_inspect_get_package_format, os->package_format)
KEEL_INSPECT_GETTER(cmd_inspect_get_package_management, os->package_management)
KEEL_INSPECT_GETTER(cmd_inspect_get_osinfo, os->osinfo.empty() ? std::string("unknown") : os->osinfo)
#undef KEEL_INSPECT_GETTER

Result<void> cmd_inspect_get_mountpoints(FishState& st, const std::vector<std::string>& a) {
  const OsInfo* os = TRY(find_root(st, a[0]));
  outln("/: " + os->root);
  for (const auto& [mp, dev] : os->fstab)
    if (mp != "/") outln(mp + ": " + dev);
  return ok();
}

Result<void> cmd_inspect_list_applications(FishState& st, const std::vector<std::string>& a) {
  const OsInfo* os = TRY(find_root(st, a[0]));
  // Applications live in the whole tree: mount it read-only, then put back what was mounted.
  auto saved = st.guest.mounts();
  TRY(st.guest.sync());
  TRY(mount_os(st.guest, *os, true));
  auto apps = list_applications(st.guest, *os);
  st.guest.umount_all();
  for (const auto& [dev, mp] : saved) (void)st.guest.mount(dev, mp, st.guest.read_only());
  if (!apps) return tl::unexpected(apps.error());
  int i = 0;
  for (const auto& app : *apps) {
    outln(fmt::format("[{}] = {{\n  app2_name: {}\n  app2_display_name: \n  app2_epoch: {}\n  app2_version: {}\n"
                      "  app2_release: {}\n  app2_arch: {}\n  app2_summary: {}\n}}",
                      i++, app.name, app.epoch, app.version, app.release, app.arch, app.summary));
  }
  return ok();
}

Result<void> cmd_help(FishState&, const std::vector<std::string>& a) {
  if (!a.empty()) {
    const FishCommand* c = find_fish_command(a[0]);
    if (!c) return fail_invalid("{}: no such command", a[0]);
    outln(fmt::format("{} - {}\n\n  {}", c->name, c->help, c->usage));
    return ok();
  }
  outln("Commands (see 'help COMMAND'):");
  for (const auto& c : fish_commands()) outln(fmt::format("  {:<28} {}", c.name, c.help));
  return ok();
}

}  // namespace

void print_ll_line(const std::string& name, const FileStat& s, const std::string& link_target) {
  char date[32] = {};
  time_t t = time_t(s.mtime);
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(date, sizeof date, "%b %e %H:%M", &tm);
  std::string line = fmt::format("{} {:>3} {:>4} {:>4} {:>10} {} {}", mode_string(s.mode), s.nlink, s.uid, s.gid,
                                 s.size, date, name);
  if (!link_target.empty()) line += " -> " + link_target;
  outln(line);
}

Result<void> print_ls_recursive(Guest& guest, const std::string& dir, bool long_format) {
  // As virt-ls -R prints them (guestfs_find's output): each path with `dir` stripped off, so
  // "/" gives "etc/motd" and "/etc" gives "/motd".
  auto root = TRY(guest.resolve(dir, Follow::Last));
  std::string prefix = !dir.empty() && dir.back() == '/' ? "" : "/";
  std::vector<std::pair<std::string, FileStat>> entries;
  TRY(guest.walk(dir, [&](const std::string& rel, const FileStat& s) -> Result<void> {
    entries.emplace_back(prefix + rel, s);
    return ok();
  }));
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string buffer;
  for (const auto& [path, s] : entries) {
    if (long_format) {
      std::string link = s.type() == FileType::Symlink ? TRY(guest.readlink(join_path(root.guest_path, path))) : "";
      print_ll_line(path, s, link);
    } else {
      buffer += path;
      buffer += '\n';
    }
  }
  out(buffer);
  return ok();
}

Result<void> copy_out(Guest& guest, const std::string& remote, const std::string& local_dir) {
  auto st = TRY(guest.stat(remote));
  std::string name = base_name(TRY(guest.resolve(remote, Follow::Last)).guest_path);
  auto copy_file = [&](const std::string& from, const std::string& to, const FileStat& s) -> Result<void> {
    auto fd = TRY(UniqueFd::open(to, O_WRONLY | O_CREAT | O_TRUNC, s.mode & 07777));
    TRY(guest.read_stream(from, 0, UINT64_MAX,
                          [&](std::span<const uint8_t> c) { return write_all(fd.get(), c.data(), c.size()); }));
    fchmod(fd.get(), s.mode & 07777);
    struct timeval tv[2] = {{s.atime, 0}, {s.mtime, 0}};
    futimes(fd.get(), tv);
    return ok();
  };
  if (st.type() != FileType::Directory) {
    if (st.type() != FileType::Regular) return fail_invalid("copy-out: {}: not a regular file or directory", remote);
    return copy_file(remote, local_dir + "/" + name, st);
  }
  std::string top = name == "/" ? local_dir : local_dir + "/" + name;
  if (top != local_dir && ::mkdir(top.c_str(), st.mode & 07777) != 0 && errno != EEXIST)
    return fail_errno("mkdir " + top);
  std::vector<std::pair<std::string, FileStat>> dirs;
  TRY(guest.walk(remote, [&](const std::string& rel, const FileStat& s) -> Result<void> {
    std::string from = join_path(remote, rel), to = top + "/" + rel;
    switch (s.type()) {
      case FileType::Directory:
        if (::mkdir(to.c_str(), 0700) != 0 && errno != EEXIST) return fail_errno("mkdir " + to);
        dirs.emplace_back(to, s);
        break;
      case FileType::Regular: TRY(copy_file(from, to, s)); break;
      case FileType::Symlink: {
        std::string target = TRY(guest.readlink(from));
        ::unlink(to.c_str());
        if (::symlink(target.c_str(), to.c_str()) != 0) return fail_errno("symlink " + to);
        break;
      }
      default: break;  // devices and fifos are not copied out
    }
    return ok();
  }));
  // Directory modes and times last, so a read-only directory can still be filled.
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    ::chmod(it->first.c_str(), it->second.mode & 07777);
    struct timeval tv[2] = {{it->second.atime, 0}, {it->second.mtime, 0}};
    utimes(it->first.c_str(), tv);
  }
  if (top != local_dir) ::chmod(top.c_str(), st.mode & 07777);
  return ok();
}

Result<void> copy_in(Guest& guest, const std::string& local, const std::string& remote_dir) {
  if (!TRY(guest.is_dir(remote_dir))) return fail_invalid("copy-in: {}: not a directory in the guest", remote_dir);
  std::function<Result<void>(const std::string&, const std::string&, int)> copy =
      [&](const std::string& from, const std::string& to, int depth) -> Result<void> {
    if (depth > 256) return fail(ELOOP, from + ": directories nest too deeply");
    struct stat ls;
    if (::lstat(from.c_str(), &ls) != 0) return fail_errno("stat " + from);
    if (S_ISDIR(ls.st_mode)) {
      auto existing = guest.lstat(to);
      if (!existing) TRY(guest.mkdir(to, ls.st_mode & 07777));
      DIR* d = opendir(from.c_str());
      if (!d) return fail_errno("opendir " + from);
      std::vector<std::string> names;
      while (struct dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
      }
      closedir(d);
      std::sort(names.begin(), names.end());
      for (const auto& n : names) TRY(copy(from + "/" + n, join_path(to, n), depth + 1));
      TRY(guest.chmod(to, ls.st_mode & 07777));
    } else if (S_ISREG(ls.st_mode)) {
      std::string data = TRY(read_file(from));
      TRY(guest.write_file(to, bytes_of(data), WriteMode::Truncate, ls.st_mode & 07777));
      TRY(guest.chmod(to, ls.st_mode & 07777));
    } else if (S_ISLNK(ls.st_mode)) {
      std::string target(4096, '\0');
      ssize_t n = ::readlink(from.c_str(), target.data(), target.size());
      if (n < 0) return fail_errno("readlink " + from);
      target.resize(size_t(n));
      (void)guest.rm(to);
      TRY(guest.ln_s(target, to));
      return ok();
    } else {
      return ok();
    }
    (void)guest.chown(to, ls.st_uid, ls.st_gid);
    (void)guest.set_times(to, ls.st_atime, ls.st_mtime);
    return ok();
  };
  std::string name = base_name(local);
  return copy(local, join_path(remote_dir, name), 0);
}

const std::vector<FishCommand>& fish_commands() {
  static const std::vector<FishCommand> commands = {
      {"blockdev-getsize64", 1, 1, "blockdev-getsize64 DEVICE", "size of a device in bytes", cmd_blockdev_getsize64},
      {"cat", 1, 1, "cat PATH", "print a file", cmd_cat},
      {"chmod", 2, 2, "chmod MODE PATH", "change file mode (octal with a leading 0)", cmd_chmod},
      {"chown", 3, 3, "chown UID GID PATH", "change file owner and group", cmd_chown},
      {"copy-in", 2, -1, "copy-in LOCAL [LOCAL...] REMOTEDIR", "copy local files or trees into the guest", cmd_copy_in},
      {"copy-out", 2, -1, "copy-out REMOTE [REMOTE...] LOCALDIR", "copy guest files or trees out", cmd_copy_out},
      {"cp", 2, 2, "cp SRC DEST", "copy a file", cmd_cp},
      {"cp-a", 2, 2, "cp-a SRC DEST", "copy a file or tree, keeping modes and owners", cmd_cp_a},
      {"cp-r", 2, 2, "cp-r SRC DEST", "copy a file or tree", cmd_cp_a},
      {"df", 0, 0, "df", "free space of mounted filesystems", cmd_df},
      {"df-h", 0, 0, "df-h", "free space of mounted filesystems, human-readable", cmd_df_h},
      {"download", 2, 2, "download REMOTE LOCAL", "copy a guest file out ('-' for stdout)", cmd_download},
      {"echo", 0, -1, "echo WORDS...", "print the words", cmd_echo},
      {"exists", 1, 1, "exists PATH", "does a path exist", cmd_exists},
      {"filesize", 1, 1, "filesize PATH", "size of a file", cmd_filesize},
      {"find", 1, 1, "find DIRECTORY", "list all files below a directory, recursively", cmd_find},
      {"head", 1, 1, "head PATH", "first 10 lines of a file", cmd_head},
      {"head-n", 2, 2, "head-n NR PATH", "first NR lines of a file", cmd_head_n},
      {"help", 0, 1, "help [COMMAND]", "list commands or describe one", cmd_help},
      {"inspect-get-arch", 1, 1, "inspect-get-arch ROOT", "architecture of an inspected OS", cmd_inspect_get_arch},
      {"inspect-get-distro", 1, 1, "inspect-get-distro ROOT", "distribution of an inspected OS", cmd_inspect_get_distro},
      {"inspect-get-hostname", 1, 1, "inspect-get-hostname ROOT", "hostname of an inspected OS", cmd_inspect_get_hostname},
      {"inspect-get-major-version", 1, 1, "inspect-get-major-version ROOT", "major version", cmd_inspect_get_major_version},
      {"inspect-get-minor-version", 1, 1, "inspect-get-minor-version ROOT", "minor version", cmd_inspect_get_minor_version},
      {"inspect-get-mountpoints", 1, 1, "inspect-get-mountpoints ROOT", "the OS's mountpoints", cmd_inspect_get_mountpoints},
      {"inspect-get-osinfo", 1, 1, "inspect-get-osinfo ROOT", "libosinfo short ID", cmd_inspect_get_osinfo},
      {"inspect-get-package-format", 1, 1, "inspect-get-package-format ROOT", "package format", cmd_inspect_get_package_format},
      {"inspect-get-package-management", 1, 1, "inspect-get-package-management ROOT", "package manager", cmd_inspect_get_package_management},
      {"inspect-get-product-name", 1, 1, "inspect-get-product-name ROOT", "product name", cmd_inspect_get_product_name},
      {"inspect-get-roots", 0, 0, "inspect-get-roots", "roots found by inspect-os", cmd_inspect_get_roots},
      {"inspect-get-type", 1, 1, "inspect-get-type ROOT", "OS type", cmd_inspect_get_type},
      {"inspect-list-applications", 1, 1, "inspect-list-applications ROOT", "installed packages", cmd_inspect_list_applications},
      {"inspect-list-applications2", 1, 1, "inspect-list-applications2 ROOT", "installed packages", cmd_inspect_list_applications},
      {"inspect-os", 0, 0, "inspect-os", "find operating systems", cmd_inspect_os},
      {"is-dir", 1, 1, "is-dir PATH", "is it a directory", cmd_is_dir},
      {"is-file", 1, 1, "is-file PATH", "is it a regular file", cmd_is_file},
      {"is-symlink", 1, 1, "is-symlink PATH", "is it a symbolic link", cmd_is_symlink},
      {"list-devices", 0, 0, "list-devices", "list the disks", cmd_list_devices},
      {"list-filesystems", 0, 0, "list-filesystems", "list filesystems and their types", cmd_list_filesystems},
      {"list-partitions", 0, 0, "list-partitions", "list partitions", cmd_list_partitions},
      {"ll", 1, 1, "ll DIRECTORY", "long directory listing", cmd_ll},
      {"ln-s", 2, 2, "ln-s TARGET LINKNAME", "make a symbolic link", cmd_ln_s},
      {"ln-sf", 2, 2, "ln-sf TARGET LINKNAME", "make a symbolic link, replacing what is there", cmd_ln_sf},
      {"ls", 1, 1, "ls DIRECTORY", "list a directory", cmd_ls},
      {"lstat", 1, 1, "lstat PATH", "file status, not following links", cmd_lstat},
      {"lvs", 0, 0, "lvs", "list LVM logical volumes", cmd_lvs},
      {"mkdir", 1, 1, "mkdir PATH", "make a directory", cmd_mkdir},
      {"mkdir-mode", 2, 2, "mkdir-mode PATH MODE", "make a directory with a mode", cmd_mkdir_mode},
      {"mkdir-p", 1, 1, "mkdir-p PATH", "make a directory and its parents", cmd_mkdir_p},
      {"mount", 2, 2, "mount DEVICE MOUNTPOINT", "mount a filesystem", cmd_mount},
      {"mount-ro", 2, 2, "mount-ro DEVICE MOUNTPOINT", "mount a filesystem read-only", cmd_mount_ro},
      {"mountpoints", 0, 0, "mountpoints", "mounted devices and where", cmd_mountpoints},
      {"mounts", 0, 0, "mounts", "mounted devices", cmd_mounts},
      {"mv", 2, 2, "mv SRC DEST", "move or rename", cmd_mv},
      {"part-get-parttype", 1, 1, "part-get-parttype DEVICE", "partition table type (msdos, gpt)", cmd_part_get_parttype},
      {"part-list", 1, 1, "part-list DEVICE", "list partitions of a disk", cmd_part_list},
      {"pvs", 0, 0, "pvs", "list LVM physical volumes", cmd_pvs},
      {"readlink", 1, 1, "readlink PATH", "target of a symbolic link", cmd_readlink},
      {"rm", 1, 1, "rm PATH", "remove a file", cmd_rm},
      {"rm-f", 1, 1, "rm-f PATH", "remove a file, ignoring a missing one", cmd_rm_f},
      {"rm-rf", 1, 1, "rm-rf PATH", "remove a tree", cmd_rm_rf},
      {"rmdir", 1, 1, "rmdir PATH", "remove an empty directory", cmd_rmdir},
      {"stat", 1, 1, "stat PATH", "file status", cmd_stat},
      {"statvfs", 1, 1, "statvfs PATH", "filesystem statistics", cmd_statvfs},
      {"sync", 0, 0, "sync", "write everything to the disks", cmd_sync},
      {"tail", 1, 1, "tail PATH", "last 10 lines of a file", cmd_tail},
      {"tail-n", 2, 2, "tail-n NR PATH", "last NR lines of a file", cmd_tail_n},
      {"tar-in", 2, 2, "tar-in TARFILE DIRECTORY", "unpack a tar file into the guest ('-' for stdin)", cmd_tar_in},
      {"tar-out", 2, 2, "tar-out DIRECTORY TARFILE", "pack a guest directory into a tar file ('-' for stdout)", cmd_tar_out},
      {"touch", 1, 1, "touch PATH", "create a file or update its times", cmd_touch},
      {"umount", 1, 1, "umount MOUNTPOINT", "unmount a filesystem", cmd_umount},
      {"umount-all", 0, 0, "umount-all", "unmount everything", cmd_umount_all},
      {"upload", 2, 2, "upload LOCAL REMOTE", "copy a local file in ('-' for stdin)", cmd_upload},
      {"vfs-label", 1, 1, "vfs-label DEVICE", "filesystem label", cmd_vfs_label},
      {"vfs-type", 1, 1, "vfs-type DEVICE", "filesystem type", cmd_vfs_type},
      {"vfs-uuid", 1, 1, "vfs-uuid DEVICE", "filesystem UUID", cmd_vfs_uuid},
      {"vgs", 0, 0, "vgs", "list LVM volume groups", cmd_vgs},
      {"write", 2, 2, "write PATH CONTENT", "write a file", cmd_write},
      {"write-append", 2, 2, "write-append PATH CONTENT", "append to a file", cmd_write_append},
  };
  return commands;
}

const FishCommand* find_fish_command(const std::string& name) {
  std::string n = name;
  std::replace(n.begin(), n.end(), '_', '-');
  for (const auto& c : fish_commands())
    if (n == c.name) return &c;
  return nullptr;
}

bool run_fish_command(FishState& state, const std::vector<std::string>& words_in) {
  if (words_in.empty()) return true;
  std::vector<std::string> words = words_in;
  bool ignore_errors = false;
  if (!words[0].empty() && words[0][0] == '-') {  // "-cmd": errors do not stop a script
    ignore_errors = true;
    words[0] = words[0].substr(1);
  }
  if (state.trace) {
    std::string line;
    for (const auto& w : words) line += (line.empty() ? "" : " ") + w;
    fprintf(stderr, "%s\n", line.c_str());
  }
  const FishCommand* cmd = find_fish_command(words[0]);
  if (!cmd) {
    fflush(stdout);
    fprintf(stderr, "keel-fish: %s: unknown command (try 'help')\n", words[0].c_str());
    return ignore_errors;
  }
  std::vector<std::string> args(words.begin() + 1, words.end());
  if (int(args.size()) < cmd->min_args || (cmd->max_args >= 0 && int(args.size()) > cmd->max_args)) {
    fflush(stdout);
    fprintf(stderr, "keel-fish: %s: wrong number of arguments\nusage: %s\n", cmd->name, cmd->usage);
    return ignore_errors;
  }
  auto r = cmd->run(state, args);
  if (!r) {
    fflush(stdout);
    fprintf(stderr, "keel-fish: %s: %s\n", cmd->name, r.error().message().c_str());
    return ignore_errors;
  }
  return true;
}

Result<std::vector<std::string>> split_fish_line(const std::string& line) {
  std::vector<std::string> words;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && std::isspace(uint8_t(line[i]))) i++;
    if (i >= line.size() || line[i] == '#') break;
    std::string word;
    bool have_word = false;
    while (i < line.size() && !std::isspace(uint8_t(line[i]))) {
      char c = line[i];
      if (c == '"') {
        have_word = true;
        i++;
        while (true) {
          if (i >= line.size()) return fail_invalid("unterminated double quote");
          char d = line[i++];
          if (d == '"') break;
          if (d == '\\' && i < line.size()) {
            char e = line[i++];
            switch (e) {
              case 'n': word.push_back('\n'); break;
              case 't': word.push_back('\t'); break;
              case 'r': word.push_back('\r'); break;
              case 'a': word.push_back('\a'); break;
              case '0': word.push_back('\0'); break;
              case 'x': {
                if (i + 2 > line.size()) return fail_invalid("bad \\x escape");
                word.push_back(char(std::stoi(line.substr(i, 2), nullptr, 16)));
                i += 2;
                break;
              }
              default: word.push_back(e);
            }
            continue;
          }
          word.push_back(d);
        }
      } else if (c == '\'') {
        have_word = true;
        i++;
        size_t end = line.find('\'', i);
        if (end == std::string::npos) return fail_invalid("unterminated single quote");
        word += line.substr(i, end - i);
        i = end + 1;
      } else {
        word.push_back(c);
        i++;
      }
    }
    if (have_word || !word.empty()) words.push_back(word);
  }
  return words;
}

}  // namespace keel::guestfs
