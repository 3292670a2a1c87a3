#include "guestfs/inspect.h"

#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/unique_fd.h"
#include "guestfs/util.h"

namespace keel::guestfs {

namespace {

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(uint8_t(s[b]))) b++;
  while (e > b && std::isspace(uint8_t(s[e - 1]))) e--;
  return std::string(s.substr(b, e - b));
}

std::string lookup(const std::vector<std::pair<std::string, std::string>>& kv, std::string_view key) {
  for (const auto& [k, v] : kv)
    if (k == key) return v;
  return "";
}

int parse_int_prefix(std::string_view s, size_t& pos) {
  int v = 0;
  while (pos < s.size() && std::isdigit(uint8_t(s[pos])) && v < 100000) v = v * 10 + (s[pos++] - '0');
  return v;
}

void parse_version(std::string_view version, int& major, int& minor) {
  size_t pos = 0;
  major = parse_int_prefix(version, pos);
  minor = 0;
  if (pos < version.size() && version[pos] == '.') {
    pos++;
    minor = parse_int_prefix(version, pos);
  }
}

Result<std::optional<std::string>> read_optional(Guest& guest, const std::string& path, uint64_t limit = 1 << 20) {
  auto file = TRY(guest.is_file(path));
  if (!file) return std::optional<std::string>();
  return std::optional<std::string>(TRY(guest.read_file(path, limit)));
}

// Reads what the root filesystem (mounted at /) says about the OS.
Result<bool> inspect_root(Guest& guest, OsInfo& os) {
  if (!TRY(guest.is_dir("/etc"))) return false;
  auto os_release = TRY(read_optional(guest, "/etc/os-release"));
  if (!os_release) os_release = TRY(read_optional(guest, "/usr/lib/os-release"));
  bool has_fstab = TRY(guest.is_file("/etc/fstab"));
  bool has_bin = TRY(guest.is_dir("/bin")) || TRY(guest.is_dir("/usr/bin"));
  if (!os_release && !(has_fstab && has_bin)) return false;
  if (os_release) {
    auto kv = parse_key_values(*os_release);
    std::string id = lookup(kv, "ID");
    if (!id.empty()) os.distro = id == "rhel" ? "rhel" : id;
    if (id == "opensuse-leap" || id == "opensuse-tumbleweed") os.distro = "opensuse";
    if (id == "sles") os.distro = "sles";
    os.product_name = lookup(kv, "PRETTY_NAME");
    os.version_id = lookup(kv, "VERSION_ID");
    parse_version(os.version_id, os.major_version, os.minor_version);
  }
  if (os.distro == "debian") {
    // Debian's os-release gives only the major version; debian_version has the point release,
    // and libguestfs reports it as the product name too.
    if (auto dv = TRY(read_optional(guest, "/etc/debian_version"))) {
      std::string v = trim(*dv);
      v = v.substr(0, v.find('\n'));
      int major = 0, minor = 0;
      parse_version(v, major, minor);
      if (major > 0) {
        os.product_name = v;
        os.major_version = major;
        os.minor_version = minor;
      }
    }
  }
  if (auto hostname = TRY(read_optional(guest, "/etc/hostname"))) {
    std::string h = trim(*hostname);
    os.hostname = h.substr(0, h.find('\n'));
  } else if (auto network = TRY(read_optional(guest, "/etc/sysconfig/network"))) {
    std::string h = lookup(parse_key_values(*network), "HOSTNAME");
    os.hostname = h;
  }
  const std::string& d = os.distro;
  if (d == "debian" || d == "ubuntu" || d == "linuxmint" || d == "kali" || d == "pop") {
    os.package_format = "deb";
    os.package_management = "apt";
  } else if (d == "fedora" || d == "rhel" || d == "centos" || d == "rocky" || d == "almalinux" || d == "ol") {
    os.package_format = "rpm";
    os.package_management = (d == "fedora" || os.major_version >= 8) ? "dnf" : "yum";
  } else if (d == "opensuse" || d == "sles") {
    os.package_format = "rpm";
    os.package_management = "zypper";
  } else if (d == "arch") {
    os.package_format = "pacman";
    os.package_management = "pacman";
  } else if (d == "alpine") {
    os.package_format = "apk";
    os.package_management = "apk";
  }
  if (d != "unknown" && os.major_version > 0) {
    os.osinfo = d == "debian" || d == "fedora" ? fmt::format("{}{}", d, os.major_version)
                                               : fmt::format("{}{}.{}", d, os.major_version, os.minor_version);
  }
  if (auto fstab = TRY(read_optional(guest, "/etc/fstab"))) {
    for (const auto& e : parse_fstab(*fstab)) {
      if (e.mountpoint.empty() || e.mountpoint[0] != '/') continue;
      if (e.type == "swap" || e.type == "proc" || e.type == "sysfs" || e.type == "tmpfs" || e.type == "devpts" ||
          e.type == "nfs" || e.type == "cifs" || e.spec == "none")
        continue;
      auto dev = guest.find_device(e.spec);
      if (!dev) continue;
      os.fstab.emplace_back(e.mountpoint, (*dev)->name);
    }
  }
  return true;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_key_values(std::string_view text) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string line = trim(text.substr(pos, end - pos));
    pos = end + 1;
    if (line.empty() || line[0] == '#') continue;
    size_t eq = line.find('=');
    if (eq == std::string::npos) continue;
    std::string key = trim(line.substr(0, eq));
    std::string value = trim(line.substr(eq + 1));
    if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') && value.back() == value.front()) {
      std::string unq;
      for (size_t i = 1; i + 1 < value.size(); i++) {
        if (value[i] == '\\' && i + 2 < value.size()) i++;
        unq.push_back(value[i]);
      }
      value = unq;
    }
    out.emplace_back(key, value);
  }
  return out;
}

std::vector<FstabEntry> parse_fstab(std::string_view text) {
  std::vector<FstabEntry> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string line = trim(text.substr(pos, end - pos));
    pos = end + 1;
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> fields;
    size_t i = 0;
    while (i < line.size() && fields.size() < 6) {
      while (i < line.size() && std::isspace(uint8_t(line[i]))) i++;
      size_t start = i;
      while (i < line.size() && !std::isspace(uint8_t(line[i]))) i++;
      if (i > start) fields.push_back(line.substr(start, i - start));
    }
    if (fields.size() < 3) continue;
    // fstab escapes spaces as \040.
    auto unescape = [](std::string s) {
      size_t at;
      while ((at = s.find("\\040")) != std::string::npos) s.replace(at, 4, " ");
      return s;
    };
    out.push_back(FstabEntry{fields[0], unescape(fields[1]), fields[2], fields.size() > 3 ? fields[3] : ""});
  }
  return out;
}

std::vector<Application> parse_dpkg_status(std::string_view text) {
  std::vector<Application> apps;
  Application current;
  std::string status;
  std::string last_key;
  auto finish = [&] {
    if (!current.name.empty() && status.find("installed") != std::string::npos &&
        status.rfind("install ok installed", 0) == 0)
      apps.push_back(current);
    current = Application{};
    status.clear();
    last_key.clear();
  };
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty()) {
      finish();
      if (end >= text.size()) break;
      continue;
    }
    if (line[0] == ' ' || line[0] == '\t') {
      // Continuation lines of the long description lose their first space (" ." stays ".").
      if (last_key == "Description") {
        std::string cont(line.substr(1));
        current.description += current.description.empty() ? cont : "\n" + cont;
      }
      continue;
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::string key(line.substr(0, colon));
    std::string value = trim(line.substr(colon + 1));
    last_key = key;
    if (key == "Package") {
      current.name = value;
    } else if (key == "Status") {
      status = value;
    } else if (key == "Architecture") {
      current.arch = value;
    } else if (key == "Version") {
      std::string v = value;
      size_t c = v.find(':');
      if (c != std::string::npos) {
        size_t p = 0;
        current.epoch = parse_int_prefix(v, p);
        v = v.substr(c + 1);
      }
      size_t dash = v.rfind('-');
      if (dash != std::string::npos) {
        current.version = v.substr(0, dash);
        current.release = v.substr(dash + 1);
      } else {
        current.version = v;
      }
    } else if (key == "Description") {
      current.summary = value;
      current.description.clear();
    } else if (key == "Homepage") {
      current.url = value;
    } else if (key == "Source") {
      current.source_package = value.substr(0, value.find(' '));
    }
  }
  finish();
  std::sort(apps.begin(), apps.end(), [](const Application& a, const Application& b) { return a.name < b.name; });
  return apps;
}

Result<Application> parse_rpm_header(std::span<const uint8_t> blob) {
  auto be32 = [&](size_t at) -> uint32_t {
    return (uint32_t(blob[at]) << 24) | (uint32_t(blob[at + 1]) << 16) | (uint32_t(blob[at + 2]) << 8) | blob[at + 3];
  };
  if (blob.size() < 8) return fail_invalid("rpm header is too short");
  uint32_t index_count = be32(0), data_size = be32(4);
  if (index_count > 100000 || data_size > (64u << 20)) return fail_invalid("rpm header counts are implausible");
  size_t data_start = 8 + size_t(index_count) * 16;
  if (data_start + data_size > blob.size()) return fail_invalid("rpm header is truncated");
  Application app;
  auto string_at = [&](uint32_t offset) -> std::string {
    if (offset >= data_size) return "";
    const char* p = reinterpret_cast<const char*>(blob.data() + data_start + offset);
    return std::string(p, strnlen(p, data_size - offset));
  };
  for (uint32_t i = 0; i < index_count; i++) {
    size_t e = 8 + size_t(i) * 16;
    uint32_t tag = be32(e), type = be32(e + 4), offset = be32(e + 8);
    switch (tag) {
      case 1000: app.name = string_at(offset); break;
      case 1001: app.version = string_at(offset); break;
      case 1002: app.release = string_at(offset); break;
      case 1004: app.summary = string_at(offset); break;
      case 1005: app.description = string_at(offset); break;
      case 1022: app.arch = string_at(offset); break;
      case 1003:
        if (type == 4 && offset < data_size && data_size - offset >= 4) app.epoch = int(be32(data_start + offset));
        break;
      default: break;
    }
  }
  if (app.name.empty()) return fail_invalid("rpm header has no name");
  return app;
}

Result<std::string> elf_architecture(std::span<const uint8_t> h) {
  if (h.size() < 20 || std::memcmp(h.data(), "\x7f" "ELF", 4) != 0) return fail_invalid("not an ELF file");
  bool little = h[5] == 1;
  uint16_t machine = little ? load_le16(&h[18]) : uint16_t((h[18] << 8) | h[19]);
  switch (machine) {
    case 3: return std::string("i386");
    case 62: return std::string("x86_64");
    case 183: return std::string("aarch64");
    case 40: return std::string("arm");
    case 8: return std::string(h[4] == 2 ? "mips64" : "mips");
    case 20: return std::string("ppc");
    case 21: return std::string(little ? "ppc64le" : "ppc64");
    case 22: return std::string("s390x");
    case 243: return std::string(h[4] == 2 ? "riscv64" : "riscv32");
    default: return fmt::format("unknown-{}", machine);
  }
}

Result<std::vector<OsInfo>> inspect_os(Guest& guest) {
  std::vector<OsInfo> found;
  auto filesystems = guest.list_filesystems();
  guest.umount_all();
  for (const auto& [device, type] : filesystems) {
    if (type.rfind("ext", 0) != 0 && type != "vfat") continue;
    if (!guest.mount(device, "/", true)) continue;
    OsInfo os;
    os.root = device;
    auto is_root = inspect_root(guest, os);
    guest.umount_all();
    if (!is_root || !*is_root) continue;
    std::vector<std::string> devices = {os.root};
    for (const auto& [mp, dev] : os.fstab) devices.push_back(dev);
    std::sort(devices.begin(), devices.end());
    devices.erase(std::unique(devices.begin(), devices.end()), devices.end());
    for (const auto& dev : devices) {
      auto d = guest.find_device(dev);
      if (!d) continue;
      os.filesystems.push_back(OsFilesystem{dev, (*d)->probe.type, (*d)->probe.label, (*d)->probe.uuid});
    }
    found.push_back(std::move(os));
  }
  for (auto& os : found) {
    if (mount_os(guest, os, true)) (void)inspect_mounted(guest, os);
    guest.umount_all();
  }
  return found;
}

Result<void> mount_os(Guest& guest, const OsInfo& os, bool read_only) {
  guest.umount_all();
  TRY(guest.mount(os.root, "/", read_only));
  auto entries = os.fstab;
  std::stable_sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return split_path(a.first).size() < split_path(b.first).size();
  });
  for (const auto& [mountpoint, device] : entries) {
    if (mountpoint == "/" || device == os.root) continue;
    (void)guest.mount(device, mountpoint, read_only);  // a missing mountpoint or odd fs is not fatal
  }
  return ok();
}

namespace {

// Where virt-inspector looks for each distribution's logo.
std::vector<std::string> icon_paths(const std::string& distro) {
  if (distro == "debian") return {"/usr/share/pixmaps/debian-logo.png"};
  if (distro == "ubuntu") return {"/usr/share/icons/hicolor/48x48/apps/ubuntu-logo-icon.png"};
  if (distro == "fedora") return {"/usr/share/icons/hicolor/32x32/apps/fedora-logo-icon.png"};
  if (distro == "rhel" || distro == "centos" || distro == "rocky" || distro == "almalinux")
    return {"/usr/share/pixmaps/redhat-logo.png", "/usr/share/icons/hicolor/32x32/apps/fedora-logo-icon.png"};
  if (distro == "opensuse" || distro == "sles") return {"/usr/share/icons/hicolor/24x24/apps/distributor.png"};
  if (distro == "alpine") return {"/etc/alpine-release.png"};
  return {};
}

std::string base64_lines(std::string_view data) {
  // As virt-inspector writes it: 72 characters a line, lines ending in CR LF.
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string flat;
  size_t i = 0;
  for (; i + 2 < data.size(); i += 3) {
    uint32_t v = (uint32_t(uint8_t(data[i])) << 16) | (uint32_t(uint8_t(data[i + 1])) << 8) | uint8_t(data[i + 2]);
    for (int k = 3; k >= 0; k--) flat.push_back(alphabet[(v >> (6 * k)) & 63]);
  }
  if (i < data.size()) {
    uint32_t v = uint32_t(uint8_t(data[i])) << 16;
    if (i + 1 < data.size()) v |= uint32_t(uint8_t(data[i + 1])) << 8;
    flat.push_back(alphabet[(v >> 18) & 63]);
    flat.push_back(alphabet[(v >> 12) & 63]);
    flat.push_back(i + 1 < data.size() ? alphabet[(v >> 6) & 63] : '=');
    flat.push_back('=');
  }
  std::string out;
  for (size_t at = 0; at < flat.size(); at += 72) {
    if (at) out += "\r\n";
    out += flat.substr(at, 72);
  }
  return out;
}

}  // namespace

Result<void> inspect_mounted(Guest& guest, OsInfo& os) {
  for (const auto& path : icon_paths(os.distro)) {
    auto st = guest.stat(path);
    if (!st || st->type() != FileType::Regular || st->size > (1 << 20)) continue;
    auto png = guest.read_file(path, 1 << 20);
    if (png && png->size() > 8 && png->compare(0, 8, "\x89PNG\r\n\x1a\n") == 0) {
      os.icon = std::move(*png);
      break;
    }
  }
  for (const char* binary : {"/bin/bash", "/bin/ls", "/bin/echo", "/bin/rm", "/bin/sh", "/usr/bin/bash", "/usr/bin/ls"}) {
    std::vector<uint8_t> header;
    auto r = guest.read_stream(binary, 0, 64, [&](std::span<const uint8_t> chunk) -> Result<void> {
      header.insert(header.end(), chunk.begin(), chunk.end());
      return ok();
    });
    if (!r) continue;
    auto arch = elf_architecture(header);
    if (arch) {
      os.arch = *arch;
      break;
    }
  }
  return ok();
}

namespace {

Result<std::vector<Application>> rpm_sqlite_applications(Guest& guest, const std::string& path) {
  // SQLite needs a file: copy the database out to a private temporary file.
  std::string data = TRY(guest.read_file(path, 2ull << 30));
  char tmpl[] = "/tmp/keel-rpmdb-XXXXXX";
  int fd = mkstemp(tmpl);
  if (fd < 0) return fail_errno("mkstemp");
  UniqueFd owner(fd);
  std::string tmp_path = tmpl;
  auto cleanup = [&] { ::unlink(tmp_path.c_str()); };
  auto written = write_all(fd, data.data(), data.size());
  if (!written) {
    cleanup();
    return tl::unexpected(written.error());
  }
  sqlite3* db = nullptr;
  std::vector<Application> apps;
  if (sqlite3_open_v2(tmp_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    sqlite3_close(db);
    cleanup();
    return fail_invalid("{}: not an SQLite database", path);
  }
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db, "SELECT blob FROM Packages", -1, &stmt, nullptr) == SQLITE_OK) {
    while (sqlite3_step(stmt) == SQLITE_ROW) {
      const void* blob = sqlite3_column_blob(stmt, 0);
      int size = sqlite3_column_bytes(stmt, 0);
      if (!blob || size <= 0) continue;
      auto app = parse_rpm_header(std::span<const uint8_t>(static_cast<const uint8_t*>(blob), size_t(size)));
      if (app && app->name != "gpg-pubkey") apps.push_back(std::move(*app));
    }
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  cleanup();
  std::sort(apps.begin(), apps.end(), [](const Application& a, const Application& b) { return a.name < b.name; });
  return apps;
}

}  // namespace

Result<std::vector<Application>> list_applications(Guest& guest, const OsInfo& os) {
  if (os.package_format == "deb") {
    auto status = TRY(read_optional(guest, "/var/lib/dpkg/status", 1ull << 30));
    if (!status) return std::vector<Application>{};
    return parse_dpkg_status(*status);
  }
  if (os.package_format == "rpm") {
    for (const char* p : {"/var/lib/rpm/rpmdb.sqlite", "/usr/lib/sysimage/rpm/rpmdb.sqlite"}) {
      if (TRY(guest.is_file(p))) return rpm_sqlite_applications(guest, p);
    }
    if (TRY(guest.is_file("/var/lib/rpm/Packages")))
      return fail(ENOTSUP, "this guest's rpm database is Berkeley DB (/var/lib/rpm/Packages), which is not supported");
    return std::vector<Application>{};
  }
  return std::vector<Application>{};
}

Result<std::vector<std::string>> list_kernels(Guest& guest) {
  std::vector<std::string> kernels;
  if (!TRY(guest.is_dir("/boot"))) return kernels;
  for (const auto& e : TRY(guest.readdir("/boot"))) {
    if (e.name.rfind("vmlinuz-", 0) == 0 || e.name.rfind("vmlinux-", 0) == 0) kernels.push_back("/boot/" + e.name);
  }
  std::sort(kernels.rbegin(), kernels.rend());
  return kernels;
}

nlohmann::json os_to_json(const OsInfo& os, const std::vector<Application>* apps,
                          const std::vector<std::string>* kernels) {
  nlohmann::json j;
  j["root"] = os.root;
  j["type"] = os.type;
  j["distro"] = os.distro;
  j["product_name"] = os.product_name;
  j["major_version"] = os.major_version;
  j["minor_version"] = os.minor_version;
  j["hostname"] = os.hostname;
  j["arch"] = os.arch;
  j["package_format"] = os.package_format;
  j["package_management"] = os.package_management;
  j["osinfo"] = os.osinfo;
  j["mountpoints"] = nlohmann::json::object();
  for (const auto& [mp, dev] : os.fstab) j["mountpoints"][mp] = dev;
  j["filesystems"] = nlohmann::json::array();
  for (const auto& f : os.filesystems)
    j["filesystems"].push_back({{"device", f.device}, {"type", f.type}, {"label", f.label}, {"uuid", f.uuid}});
  if (apps) {
    j["applications"] = nlohmann::json::array();
    for (const auto& a : *apps)
      j["applications"].push_back({{"name", a.name},
                                   {"epoch", a.epoch},
                                   {"version", a.version},
                                   {"release", a.release},
                                   {"arch", a.arch},
                                   {"summary", a.summary},
                                   {"url", a.url}});
  }
  if (kernels) j["kernels"] = *kernels;
  if (!os.icon.empty()) {
    std::string b = base64_lines(os.icon);
    b.erase(std::remove_if(b.begin(), b.end(), [](char c) { return c == '\r' || c == '\n'; }), b.end());
    j["icon"] = b;
  }
  return j;
}

namespace {
std::string xml_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out.push_back(c);
    }
  }
  return out;
}
}  // namespace

std::string os_to_xml(const OsInfo& os, const std::vector<Application>* apps) {
  std::string x = "<?xml version=\"1.0\"?>\n<operatingsystems>\n  <operatingsystem>\n";
  auto field = [&](const char* name, const std::string& value) {
    if (!value.empty()) x += fmt::format("    <{0}>{1}</{0}>\n", name, xml_escape(value));
  };
  field("root", os.root);
  field("name", os.type);
  field("arch", os.arch);
  field("distro", os.distro);
  field("product_name", os.product_name);
  field("major_version", std::to_string(os.major_version));
  field("minor_version", std::to_string(os.minor_version));
  field("package_format", os.package_format);
  field("package_management", os.package_management);
  field("hostname", os.hostname);
  field("osinfo", os.osinfo);
  x += "    <mountpoints>\n";
  for (const auto& [mp, dev] : os.fstab)
    x += fmt::format("      <mountpoint dev=\"{}\">{}</mountpoint>\n", xml_escape(dev), xml_escape(mp));
  x += "    </mountpoints>\n";
  x += "    <filesystems>\n";
  for (const auto& f : os.filesystems) {
    x += fmt::format("      <filesystem dev=\"{}\">\n", xml_escape(f.device));
    if (!f.type.empty()) x += fmt::format("        <type>{}</type>\n", xml_escape(f.type));
    if (!f.label.empty()) x += fmt::format("        <label>{}</label>\n", xml_escape(f.label));
    if (!f.uuid.empty()) x += fmt::format("        <uuid>{}</uuid>\n", xml_escape(f.uuid));
    x += "      </filesystem>\n";
  }
  x += "    </filesystems>\n";
  if (apps) {
    x += "    <applications>\n";
    for (const auto& a : *apps) {
      x += "      <application>\n";
      x += fmt::format("        <name>{}</name>\n", xml_escape(a.name));
      if (a.epoch) x += fmt::format("        <epoch>{}</epoch>\n", a.epoch);
      x += fmt::format("        <version>{}</version>\n", xml_escape(a.version));
      if (!a.release.empty()) x += fmt::format("        <release>{}</release>\n", xml_escape(a.release));
      if (!a.arch.empty()) x += fmt::format("        <arch>{}</arch>\n", xml_escape(a.arch));
      if (!a.url.empty()) x += fmt::format("        <url>{}</url>\n", xml_escape(a.url));
      if (!a.source_package.empty())
        x += fmt::format("        <source_package>{}</source_package>\n", xml_escape(a.source_package));
      if (!a.summary.empty()) x += fmt::format("        <summary>{}</summary>\n", xml_escape(a.summary));
      if (!a.description.empty())
        x += fmt::format("        <description>{}</description>\n", xml_escape(a.description));
      x += "      </application>\n";
    }
    x += "    </applications>\n";
  }
  if (!os.icon.empty()) x += "    <icon>" + base64_lines(os.icon) + "</icon>\n";
  x += "  </operatingsystem>\n</operatingsystems>\n";
  return x;
}

}  // namespace keel::guestfs
