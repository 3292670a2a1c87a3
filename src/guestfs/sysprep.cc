#include "guestfs/sysprep.h"

#include <crypt.h>
#include <sys/random.h>

#include <algorithm>

#include "guestfs/util.h"

namespace keel::guestfs {

const std::vector<SysprepOperation>& sysprep_operations() {
  static const std::vector<SysprepOperation> ops = {
      {"bash-history", "Remove the bash history in the guest", true},
      {"dhcp-client-state", "Remove DHCP client leases", true},
      {"hostname", "Change the hostname of the guest (--hostname, default localhost.localdomain)", true},
      {"logfiles", "Remove many log files from the guest", true},
      {"machine-id", "Give the guest a new random machine-id", true},
      {"package-manager-cache", "Remove package manager caches", true},
      {"root-password", "Set the root password (--root-password)", false},
      {"ssh-hostkeys", "Remove the SSH host keys in the guest", true},
      {"tmp-files", "Remove temporary files", true},
      {"udev-persistent-net", "Remove udev persistent net rules", true},
  };
  return ops;
}

namespace {

Result<std::string> random_hex(size_t bytes) {
  std::vector<uint8_t> buf(bytes);
  size_t got = 0;
  while (got < bytes) {
    ssize_t n = getrandom(buf.data() + got, bytes - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("getrandom");
    }
    got += size_t(n);
  }
  std::string out;
  for (uint8_t b : buf) out += fmt::format("{:02x}", b);
  return out;
}

std::span<const uint8_t> bytes_of(const std::string& s) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// Removes every entry in `dir` whose name passes `match` (all when null).
Result<void> remove_in(Guest& g, const std::string& dir, const std::function<bool(const std::string&)>& match,
                       const std::function<void(const std::string&)>& log, bool dry_run) {
  if (!TRY(g.is_dir(dir))) return ok();
  for (const auto& e : TRY(g.readdir(dir))) {
    if (match && !match(e.name)) continue;
    std::string path = join_path(dir, e.name);
    log("remove " + path);
    if (!dry_run) TRY(g.rm_rf(path));
  }
  return ok();
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Result<std::string> hash_password(const std::string& password) {
  // crypt_gensalt_rn reads its own entropy when given none.
  char setting[CRYPT_GENSALT_OUTPUT_SIZE];
  if (!crypt_gensalt_rn("$6$", 0, nullptr, 0, setting, sizeof setting))
    return fail_errno("crypt_gensalt");
  struct crypt_data data;
  std::memset(&data, 0, sizeof data);
  char* hash = crypt_r(password.c_str(), setting, &data);
  if (!hash || hash[0] == '*') return fail_invalid("crypt failed");
  return std::string(hash);
}

Result<void> run_sysprep(Guest& g, const SysprepOptions& options, const std::function<void(const std::string&)>& log) {
  std::vector<std::string> ops = options.operations;
  if (ops.empty()) {
    for (const auto& op : sysprep_operations())
      if (op.enabled_by_default) ops.push_back(op.name);
    if (options.root_password) ops.push_back("root-password");
  }
  for (const auto& name : ops) {
    auto& all = sysprep_operations();
    if (std::none_of(all.begin(), all.end(), [&](const SysprepOperation& o) { return o.name == name; }))
      return fail_invalid("unknown sysprep operation '{}' (see --list-operations)", name);
  }
  bool dry = options.dry_run;
  auto enabled = [&](std::string_view n) { return std::find(ops.begin(), ops.end(), n) != ops.end(); };

  if (enabled("machine-id")) {
    for (const char* path : {"/etc/machine-id", "/var/lib/dbus/machine-id"}) {
      auto st = g.lstat(path);
      if (!st || st->type() != FileType::Regular) continue;
      std::string id = TRY(random_hex(16));
      log(fmt::format("machine-id: {} = {}", path, id));
      if (!dry) TRY(g.write_file(path, bytes_of(id + "\n"), WriteMode::Truncate));
    }
  }
  if (enabled("ssh-hostkeys")) {
    TRY(remove_in(g, "/etc/ssh", [](const std::string& n) { return n.rfind("ssh_host_", 0) == 0; },
                  [&](const std::string& s) { log("ssh-hostkeys: " + s); }, dry));
  }
  if (enabled("hostname")) {
    std::string name = options.hostname.value_or("localhost.localdomain");
    std::string old;
    if (auto h = g.read_file("/etc/hostname", 4096)) old = std::string(h->substr(0, h->find('\n')));
    log("hostname: set to " + name);
    if (!dry) {
      TRY(g.write_file("/etc/hostname", bytes_of(name + "\n"), WriteMode::Truncate));
      // /etc/hosts lines naming the old host now name the new one.
      if (!old.empty()) {
        if (auto hosts = g.read_file("/etc/hosts", 1 << 20)) {
          std::string out;
          size_t pos = 0;
          std::string short_old = old.substr(0, old.find('.')), short_new = name.substr(0, name.find('.'));
          while (pos < hosts->size()) {
            size_t end = hosts->find('\n', pos);
            if (end == std::string::npos) end = hosts->size();
            std::string line = hosts->substr(pos, end - pos);
            std::string rebuilt;
            size_t i = 0;
            while (i < line.size()) {
              size_t j = line.find_first_of(" \t", i);
              if (j == std::string::npos) j = line.size();
              std::string word = line.substr(i, j - i);
              if (word == old) word = name;
              else if (word == short_old && short_old != old) word = short_new;
              rebuilt += word;
              size_t k = line.find_first_not_of(" \t", j);
              if (k == std::string::npos) k = line.size();
              rebuilt += line.substr(j, k - j);
              i = k;
            }
            out += rebuilt;
            if (end < hosts->size()) out += "\n";
            pos = end + 1;
          }
          TRY(g.write_file("/etc/hosts", bytes_of(out), WriteMode::Truncate));
        }
      }
    }
  }
  if (enabled("logfiles")) {
    if (TRY(g.is_dir("/var/log"))) {
      std::vector<std::pair<std::string, FileStat>> files;
      TRY(g.walk("/var/log", [&](const std::string& rel, const FileStat& st) -> Result<void> {
        if (st.type() == FileType::Regular) files.emplace_back("/var/log/" + rel, st);
        return ok();
      }));
      for (const auto& [path, st] : files) {
        bool rotated = ends_with(path, ".gz") || ends_with(path, ".old") || ends_with(path, ".xz") ||
                       (path.size() > 2 && path[path.size() - 2] == '.' && std::isdigit(uint8_t(path.back())));
        bool journal = path.find("/var/log/journal/") == 0;
        if (rotated || journal) {
          log("logfiles: remove " + path);
          if (!dry) TRY(g.rm(path));
        } else if (st.size > 0) {
          log("logfiles: truncate " + path);
          if (!dry) TRY(g.write_file(path, {}, WriteMode::Truncate));
        }
      }
    }
    for (const char* f : {"/root/anaconda-ks.cfg", "/var/log/installer"}) {
      if (TRY(g.exists(f))) {
        log(std::string("logfiles: remove ") + f);
        if (!dry) TRY(g.rm_rf(f));
      }
    }
  }
  if (enabled("dhcp-client-state")) {
    for (const char* dir : {"/var/lib/dhcp", "/var/lib/dhclient", "/var/lib/dhcpcd"})
      TRY(remove_in(g, dir, nullptr, [&](const std::string& s) { log("dhcp-client-state: " + s); }, dry));
    TRY(remove_in(g, "/var/lib/NetworkManager", [](const std::string& n) { return ends_with(n, ".lease"); },
                  [&](const std::string& s) { log("dhcp-client-state: " + s); }, dry));
  }
  if (enabled("bash-history")) {
    std::vector<std::string> homes = {"/root"};
    if (TRY(g.is_dir("/home")))
      for (const auto& e : TRY(g.readdir("/home"))) homes.push_back("/home/" + e.name);
    for (const auto& h : homes) {
      std::string p = h + "/.bash_history";
      auto st = g.lstat(p);
      if (st && st->type() != FileType::Directory) {
        log("bash-history: remove " + p);
        if (!dry) TRY(g.rm(p));
      }
    }
  }
  if (enabled("tmp-files")) {
    for (const char* dir : {"/tmp", "/var/tmp"})
      TRY(remove_in(g, dir, nullptr, [&](const std::string& s) { log("tmp-files: " + s); }, dry));
  }
  if (enabled("package-manager-cache")) {
    TRY(remove_in(g, "/var/cache/apt/archives", [](const std::string& n) { return ends_with(n, ".deb"); },
                  [&](const std::string& s) { log("package-manager-cache: " + s); }, dry));
    for (const char* f : {"/var/cache/apt/pkgcache.bin", "/var/cache/apt/srcpkgcache.bin"}) {
      if (TRY(g.is_file(f))) {
        log(std::string("package-manager-cache: remove ") + f);
        if (!dry) TRY(g.rm(f));
      }
    }
    TRY(remove_in(g, "/var/cache/dnf", nullptr, [&](const std::string& s) { log("package-manager-cache: " + s); }, dry));
    TRY(remove_in(g, "/var/cache/yum", nullptr, [&](const std::string& s) { log("package-manager-cache: " + s); }, dry));
  }
  if (enabled("udev-persistent-net")) {
    const char* rules = "/etc/udev/rules.d/70-persistent-net.rules";
    if (TRY(g.is_file(rules))) {
      log(std::string("udev-persistent-net: remove ") + rules);
      if (!dry) TRY(g.rm(rules));
    }
  }
  if (enabled("root-password")) {
    if (!options.root_password) return fail_invalid("the root-password operation needs --root-password");
    std::string shadow = TRY_CTX(g.read_file("/etc/shadow", 16 << 20), "root-password");
    std::string hash = TRY(hash_password(*options.root_password));
    std::string out;
    bool found = false;
    size_t pos = 0;
    while (pos < shadow.size()) {
      size_t end = shadow.find('\n', pos);
      if (end == std::string::npos) end = shadow.size();
      std::string line = shadow.substr(pos, end - pos);
      if (line.rfind("root:", 0) == 0) {
        size_t second = line.find(':', 5);
        line = "root:" + hash + (second == std::string::npos ? std::string(":") : line.substr(second));
        found = true;
      }
      out += line;
      if (end < shadow.size()) out += "\n";
      pos = end + 1;
    }
    if (!found) return fail_invalid("root-password: /etc/shadow has no root entry");
    log("root-password: set root's password");
    if (!dry) TRY(g.write_file("/etc/shadow", bytes_of(out), WriteMode::Truncate));
  }
  if (!dry) TRY(g.sync());
  return ok();
}

}  // namespace keel::guestfs
