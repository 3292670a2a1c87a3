#include "hostd/domain_manager.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "base/log.h"
#include "base/process.h"
#include "base/size.h"
#include "qemu/command_line.h"

namespace keel::hostd {

using nlohmann::json;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view kSaveMagic = "KEEL-SAVE-1";

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

uint64_t host_memory_bytes() {
  auto meminfo = read_file("/proc/meminfo");
  if (!meminfo) return 0;
  auto pos = meminfo->find("MemTotal:");
  if (pos == std::string::npos) return 0;
  return std::strtoull(meminfo->c_str() + pos + 9, nullptr, 10) * 1024;
}

std::string tail_of_file(const std::string& path, size_t max) {
  auto text = read_file(path);
  if (!text) return {};
  std::string t = text->size() > max ? text->substr(text->size() - max) : *text;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  return t;
}

std::string tap_name(const std::string& uuid, const std::string& nic_id) {
  // Linux interface names are at most 15 characters: "kt" + 8 hex of the uuid + "-" + the NIC's id
  // without "net" ("kt1a2b3c4d-0"). An id too long for that becomes 4 hex of its hash rather than
  // being cut, so ids that only differ at the end ("frontend1", "frontend2") keep apart.
  std::string id = nic_id;
  if (id.rfind("net", 0) == 0) id = id.substr(3);
  std::string prefix = "kt" + uuid.substr(0, 8) + "-";
  if (prefix.size() + id.size() > 15) {
    uint32_t h = 2166136261u;  // FNV-1a
    for (unsigned char c : nic_id) h = (h ^ c) * 16777619u;
    id = fmt::format("{:04x}", (h ^ (h >> 16)) & 0xffff);
  }
  return prefix + id;
}

// Where QEMU listens for keel-switch on a vhost-user NIC: in the VM's runtime dir, which belongs to
// QEMU's user, so an unprivileged QEMU can make the socket and the switch (root) can reach it.
std::string vhost_socket_path(const std::string& run_dir, const std::string& nic_id) {
  return run_dir + "/" + nic_id + ".vhost";
}

// What dominfo shows of how a running guest's NIC reaches the host (kept in the domain's live state).
json nic_host_json(const qemu::NicBackend& b, const std::string& port) {
  if (b.type == qemu::NicBackendType::VhostUser)
    return {{"type", "vhost-user"}, {"port", port}, {"socket", b.socket}};
  return {{"type", "tap"}, {"port", port}};
}

// The socket path for a new vhost-user NIC, with any stale socket file removed.
Result<std::string> fresh_vhost_socket(const std::string& run_dir, const std::string& nic_id) {
  std::string path = vhost_socket_path(run_dir, nic_id);
  if (path.size() >= sizeof(sockaddr_un::sun_path))
    return fail_invalid("nic {}: socket path too long for a unix socket: {}", nic_id, path);
  ::unlink(path.c_str());
  return path;
}

void restore_owners(const json& owners) {
  if (!owners.is_object()) return;
  for (auto it = owners.begin(); it != owners.end(); ++it) {
    const json& v = it.value();
    if (!v.is_array() || v.size() != 2 || !v[0].is_number_unsigned() || !v[1].is_number_unsigned()) continue;
    if (::chown(it.key().c_str(), v[0].get<uid_t>(), v[1].get<gid_t>()) < 0)
      KEEL_LOG_WARN("cannot give {} back to uid {}: {}", it.key(), v[0].get<uid_t>(), std::strerror(errno));
  }
}

struct LinkCounters {
  uint64_t rx_bytes, rx_packets, tx_bytes, tx_packets;
};

std::optional<LinkCounters> tap_counters(const std::string& ifname) {
  auto text = read_file("/proc/net/dev");
  if (!text) return std::nullopt;
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    name.erase(0, name.find_first_not_of(' '));
    if (name != ifname) continue;
    std::istringstream f(line.substr(colon + 1));
    uint64_t v[16] = {};
    for (auto& x : v) f >> x;
    // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
    return LinkCounters{v[0], v[1], v[8], v[9]};
  }
  return std::nullopt;
}

}  // namespace

DomainManager::DomainManager(DomainManagerConfig cfg, StateStore& store, EventBus& events, StoragePools& pools,
                             Networks& networks)
    : cfg_(std::move(cfg)), store_(store), events_(events), pools_(pools), networks_(networks) {}

qemu::LaunchIdentity DomainManager::identity_of(pid_t pid) const {
  int uid = qemu::process_uid(pid);
  if (uid <= 0) return {};
  auto status = read_file(fmt::format("/proc/{}/status", pid));
  gid_t gid = static_cast<gid_t>(uid);
  if (status) {
    auto pos = status->find("\nGid:");
    if (pos != std::string::npos) gid = static_cast<gid_t>(std::strtol(status->c_str() + pos + 5, nullptr, 10));
  }
  return qemu::LaunchIdentity{static_cast<uid_t>(uid), gid};
}

DomainManager::~DomainManager() {
  closing_ = true;
  std::lock_guard lock(mutex_);
  // QMP connections close; the QEMUs keep running (keeld re-attaches when it comes back).
  running_.clear();
}

std::string DomainManager::run_dir(const std::string& name) const { return cfg_.state_dir + "/run/" + name; }

Result<void> DomainManager::init() {
  auto help = TRY(run_command({cfg_.qemu_binary, "-machine", "help"}));
  if (help.exit_code != 0) return fail(EIO, fmt::format("{} -machine help: {}", cfg_.qemu_binary, help.err));
  machine_help_ = help.out;
  if (cfg_.qemu_user == "auto") {
    if (::geteuid() == 0) {
      if (auto nobody = qemu::lookup_user("nobody")) {
        identity_ = *nobody;
        auto_identity_ = true;
      }
    }
  } else if (!cfg_.qemu_user.empty() && cfg_.qemu_user != "none") {
    identity_ = TRY(qemu::lookup_user(cfg_.qemu_user));
  }
  ::mkdir((cfg_.state_dir + "/run").c_str(), 0711);

  std::lock_guard lock(mutex_);
  for (auto& rec : TRY(store_.list_domains())) {
    pid_t pid = static_cast<pid_t>(rec.pid);
    if (pid > 0 && qemu::process_matches(pid, rec.uuid)) {
      auto r = attach(rec.name, pid);
      if (!r) {
        KEEL_LOG_WARN("domain {}: QEMU pid {} runs but its monitor does not answer: {}", rec.name, pid,
                      r.error().message());
        rec.state = "unknown";
        (void)store_.update_domain(rec);
      } else {
        KEEL_LOG_INFO("domain {}: re-attached to QEMU pid {}", rec.name, pid);
      }
      continue;
    }
    if (pid > 0 || rec.state != "shutoff") {
      KEEL_LOG_INFO("domain {}: QEMU (pid {}) exited while keeld was away", rec.name, pid);
      cleanup_after_stop(rec.name, pid, "exited while keeld was not running");
    }
  }
  return ok();
}

Result<DomainRecord> DomainManager::get(const std::string& name) {
  auto rec = TRY(store_.get_domain(name));
  if (!rec) return fail(ENOENT, fmt::format("domain '{}' not found", name));
  return *rec;
}

Result<void> DomainManager::check_host_resources(const qemu::DomainDef& def) {
  uint64_t host = host_memory_bytes();
  if (host && def.memory_bytes > host)
    return fail_invalid("memory: {} is more than this host has ({})", format_size(def.memory_bytes), format_size(host));
  return ok();
}

Result<void> DomainManager::resolve_disks(qemu::DomainDef& def) {
  for (size_t i = 0; i < def.disks.size(); ++i) {
    auto& d = def.disks[i];
    if (!d.volume.empty()) {
      auto resolved = pools_.resolve(d.volume);
      // A definition naming a missing volume is bad input (400), not a missing endpoint.
      if (!resolved) return fail_invalid("disks[{}].volume: {}", i, resolved.error().message());
      auto [path, format] = *resolved;
      d.path = path;
      d.format = format == "raw" ? qemu::DiskFormat::Raw : qemu::DiskFormat::Qcow2;
    } else if (!file_exists(d.path)) {
      return fail_invalid("disks[{}].path: image '{}' does not exist", i, d.path);
    }
  }
  if (!def.boot.kernel.empty() && !file_exists(def.boot.kernel))
    return fail_invalid("boot.kernel: '{}' does not exist", def.boot.kernel);
  if (!def.boot.initrd.empty() && !file_exists(def.boot.initrd))
    return fail_invalid("boot.initrd: '{}' does not exist", def.boot.initrd);
  return ok();
}

Result<qemu::DomainDef> DomainManager::define(qemu::DomainDef def) {
  TRY(qemu::validate_domain(def));
  def.machine = TRY(qemu::resolve_machine_type(def.machine, machine_help_));
  TRY(check_host_resources(def));
  {
    qemu::DomainDef probe = def;
    TRY(resolve_disks(probe));
  }
  for (size_t i = 0; i < def.nics.size(); ++i) {
    auto& n = def.nics[i];
    if (n.kind == qemu::NicKind::Network) {
      auto nets = TRY(networks_.list());
      bool found = false;
      for (auto& net : nets) found |= net.value("name", "") == n.network;
      if (!found) return fail_invalid("nics[{}].network: network '{}' does not exist", i, n.network);
    }
  }
  std::lock_guard lock(mutex_);
  if (TRY(store_.get_domain(def.name))) return fail(EEXIST, fmt::format("domain '{}' already exists", def.name));
  qemu::assign_defaults(def);
  TRY(qemu::validate_domain(def));
  DomainRecord rec{def.name, def.uuid, qemu::domain_to_json(def), 0, "shutoff", json::object()};
  auto r = store_.insert_domain(rec);
  if (!r && r.error().code() == EEXIST)
    return fail(EEXIST, fmt::format("a domain with name '{}' or uuid {} already exists", def.name, def.uuid));
  TRY(std::move(r));
  events_.publish("lifecycle", def.name, "defined");
  return def;
}

Result<void> DomainManager::undefine(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  if (running_.count(name) || rec.pid != 0)
    return fail(EBUSY, fmt::format("domain '{}' is running: destroy or shut it down first", name));
  TRY(store_.delete_domain(name));
  events_.publish("lifecycle", name, "undefined");
  return ok();
}

Result<qemu::DomainDef> DomainManager::definition(const std::string& name) {
  auto rec = TRY(get(name));
  return qemu::domain_from_json(rec.definition);
}

Result<json> DomainManager::list() {
  json out = json::array();
  for (auto& rec : TRY(store_.list_domains())) {
    json j = {{"name", rec.name}, {"uuid", rec.uuid}, {"state", rec.state}};
    j["id"] = rec.pid > 0 ? json(rec.pid) : json(nullptr);
    out.push_back(j);
  }
  return out;
}

Result<json> DomainManager::info(const std::string& name) {
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  json j = {{"name", rec.name},
            {"uuid", rec.uuid},
            {"state", rec.state},
            {"pid", rec.pid > 0 ? json(rec.pid) : json(nullptr)},
            {"memory", def.memory_bytes},
            {"vcpus", def.vcpus},
            {"machine", def.machine},
            {"accelerator", std::string(qemu::accel_name(cfg_.accel))},
            {"persistent", true}};
  if (rec.pid > 0) {
    if (auto u = qemu::process_usage(static_cast<pid_t>(rec.pid))) {
      j["cpu_time_ns"] = u->cpu_ns;
      j["rss"] = u->rss_bytes;
    }
    std::lock_guard lock(mutex_);
    auto it = running_.find(name);
    j["monitor"] = it != running_.end() && it->second->qmp && it->second->qmp->connected();
  }
  json nics = json::array();
  for (auto& n : def.nics) {
    json nj = {{"id", n.id}, {"mac", n.mac}, {"kind", std::string(qemu::to_string(n.kind))}};
    if (n.kind == qemu::NicKind::Network) nj["network"] = n.network;
    if (n.kind == qemu::NicKind::Bridge) nj["bridge"] = n.bridge;
    // While it runs: a vhost-user port or a tap (and its switch port), as started or hot-plugged.
    const json live_nics = rec.live.is_object() ? rec.live.value("nics", json::object()) : json::object();
    if (rec.pid > 0 && live_nics.contains(n.id)) nj["host"] = live_nics[n.id];
    nics.push_back(nj);
  }
  j["nics"] = nics;
  j["security"] = {{"sandbox", cfg_.sandbox}};
  if (rec.pid > 0) j["security"]["user"] = qemu::user_name(qemu::process_uid(static_cast<pid_t>(rec.pid)));
  return j;
}

Result<DomainManager::Running*> DomainManager::running(const std::string& name) {
  auto it = running_.find(name);
  if (it == running_.end()) {
    TRY(get(name));
    return fail(EBUSY, fmt::format("domain '{}' is not running", name));
  }
  if (!it->second->qmp || !it->second->qmp->connected())
    return fail(EIO, fmt::format("domain '{}': QEMU monitor is not connected", name));
  return it->second.get();
}

Result<void> DomainManager::attach(const std::string& name, pid_t pid) {
  std::string qmp_path = run_dir(name) + "/qmp.sock";
  auto deadline = std::chrono::steady_clock::now() + 15s;
  std::unique_ptr<qemu::QmpClient> client;
  for (;;) {
    auto c = qemu::QmpClient::connect(
        qmp_path, 200ms, [this, name](const qemu::QmpEvent& ev) { on_qmp_event(name, ev); },
        [this, name, pid] {
          if (!closing_) std::thread([this, name, pid] { on_qemu_exit(name, pid); }).detach();
        });
    if (c) {
      client = std::move(*c);
      break;
    }
    if (!qemu::process_alive(pid)) {
      std::string log = tail_of_file(run_dir(name) + "/qemu.log", 2000);
      return fail(EIO, fmt::format("QEMU exited during start-up: {}", log.empty() ? c.error().message() : log));
    }
    if (std::chrono::steady_clock::now() > deadline) return fail(c.error());
    std::this_thread::sleep_for(5ms);
  }
  auto status = TRY(client->execute("query-status"));
  std::string st = status.value("status", "running");
  std::string state = st == "running" ? "running" : "paused";
  auto run = std::make_unique<Running>();
  run->pid = pid;
  run->qmp = std::move(client);
  running_[name] = std::move(run);
  auto rec = TRY(get(name));
  rec.pid = pid;
  rec.state = state;
  TRY(store_.update_domain(rec));
  return ok();
}

Result<void> DomainManager::launch(DomainRecord& rec, bool paused, LaunchFrom from) {
  const bool incoming = from != LaunchFrom::Fresh;
  auto def = TRY(qemu::domain_from_json(rec.definition));
  // Devices hot-plugged into the last run are part of the definition already.
  TRY(resolve_disks(def));
  TRY(check_host_resources(def));
  std::string dir = run_dir(rec.name);
  ::mkdir(dir.c_str(), 0750);
  for (auto f : {"/qmp.sock", "/console.sock"}) ::unlink((dir + f).c_str());
  if (dir.size() + 14 > 107) return fail_invalid("state dir path too long for unix sockets: {}", dir);

  qemu::LaunchIdentity identity = identity_;
  if (auto_identity_) {
    // Unprivileged where the host allows: QEMU must be able to read what it opens by path.
    for (auto* f : {&def.boot.kernel, &def.boot.initrd}) {
      if (!f->empty() && !qemu::readable_as(*f, identity)) {
        KEEL_LOG_WARN("domain {}: {} is not readable by uid {}; QEMU runs as root", rec.name, *f, identity.uid);
        identity = qemu::LaunchIdentity{};
        break;
      }
    }
  }
  int uid = identity.uid == static_cast<uid_t>(-1) ? -1 : static_cast<int>(identity.uid);
  json owners = json::object();
  if (uid >= 0) {
    // Hand the runtime dir and images to QEMU's user (libvirt's DAC driver does the same); the
    // images' owners are given back when the VM stops.
    if (::chown(dir.c_str(), identity.uid, identity.gid) < 0) return fail_errno("chown " + dir);
    for (auto& d : def.disks) {
      struct stat st;
      if (::stat(d.path.c_str(), &st) == 0) owners[d.path] = {st.st_uid, st.st_gid};
      if (::chown(d.path.c_str(), identity.uid, identity.gid) < 0) {
        restore_owners(owners);
        return fail_errno("chown " + d.path);
      }
    }
  }

  qemu::LaunchConfig lc;
  lc.qemu_binary = cfg_.qemu_binary;
  lc.accel = cfg_.accel;
  lc.qmp_socket = dir + "/qmp.sock";
  lc.console_socket = dir + "/console.sock";
  lc.console_log = dir + "/console.log";
  lc.pidfile = dir + "/qemu.pid";
  lc.sandbox = cfg_.sandbox;
  lc.start_paused = paused;
  lc.incoming_defer = incoming;
  lc.shared_memory = from == LaunchFrom::SavedSharedRam;
  // Each NIC's switch port or tap is named like the tap (delete_tap removes either).
  std::vector<std::string> ports;
  auto cleanup_taps = [&] {
    for (auto& t : ports) networks_.delete_tap(t);
  };
  bool shared_memory = false;
  json nic_hosts = json::object();
  for (auto& n : def.nics) {
    if (n.kind == qemu::NicKind::User) continue;
    std::string port = tap_name(def.uuid, n.id);
    qemu::NicBackend backend;
    Result<void> made = ok();
    // A guest saved with private RAM is restored on taps: the switch could not map its memory.
    if (n.kind == qemu::NicKind::Network && networks_.vhost_user_nics() && from != LaunchFrom::SavedPrivateRam) {
      backend.type = qemu::NicBackendType::VhostUser;
      auto socket = fresh_vhost_socket(dir, n.id);
      if (socket) {
        backend.socket = *socket;
        // The port first: QEMU waits at start until the switch has connected to its socket.
        made = networks_.add_vhost_user_port(n.network, port, backend.socket);
      } else {
        made = fail(socket.error());
      }
      shared_memory = true;
    } else {
      backend.tap = port;
      auto tap = n.kind == qemu::NicKind::Network ? networks_.create_tap(n.network, port, uid)
                                                  : networks_.create_bridge_tap(n.bridge, port, uid);
      if (!tap) made = fail(tap.error());
    }
    if (!made) {
      cleanup_taps();
      return fail(made.error().with_context(fmt::format("nic {}", n.id)));
    }
    ports.push_back(port);
    lc.nic_backends.push_back(backend);
    nic_hosts[n.id] = nic_host_json(backend, port);
  }
  auto argv = qemu::build_command_line(def, lc);
  if (!argv) {
    cleanup_taps();
    return fail(argv.error());
  }
  // Truncate the previous run's QEMU log; the console log is kept across runs.
  (void)write_file(dir + "/qemu.log", "");
  auto pid = qemu::launch_detached(*argv, dir + "/qemu.log", identity);
  if (!pid) {
    cleanup_taps();
    return fail(pid.error());
  }
  // Record the pid before anything else can fail: a keeld killed from here on finds its QEMU again.
  rec.pid = *pid;
  rec.state = paused || incoming ? "paused" : "running";
  rec.live = json::object();
  rec.live["owners"] = owners;
  // Whether a NIC hot-plugged later can be vhost-user (the switch needs guest memory it can map).
  rec.live["shared_memory"] = shared_memory || lc.shared_memory || def.hugepages;
  rec.live["nics"] = nic_hosts;
  TRY(store_.update_domain(rec));
  auto attached = attach(rec.name, *pid);
  if (!attached) {
    ::kill(*pid, SIGKILL);
    cleanup_after_stop(rec.name, *pid, "failed to start");
    return fail(attached.error().with_context("start " + rec.name));
  }
  return ok();
}

Result<void> DomainManager::start(const std::string& name, bool paused) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  if (running_.count(name) || rec.pid != 0) return fail(EBUSY, fmt::format("domain '{}' is already running", name));
  TRY(launch(rec, paused));
  events_.publish("lifecycle", name, "started", {{"paused", paused}});
  return ok();
}

Result<void> DomainManager::shutdown(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto* r = TRY(running(name));
  TRY(r->qmp->execute("system_powerdown"));
  events_.publish("lifecycle", name, "shutdown-requested");
  return ok();
}

Result<void> DomainManager::wait_gone(const std::string& name, pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (qemu::process_alive(pid)) {
    if (std::chrono::steady_clock::now() > deadline) return fail(ETIMEDOUT, fmt::format("domain '{}': QEMU pid {} did not exit", name, pid));
    std::this_thread::sleep_for(1ms);
  }
  return ok();
}

Result<void> DomainManager::destroy(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto it = running_.find(name);
  if (it == running_.end() && rec.pid == 0) return fail(EBUSY, fmt::format("domain '{}' is not running", name));
  pid_t pid = it != running_.end() ? it->second->pid : static_cast<pid_t>(rec.pid);
  if (it != running_.end()) it->second->destroying = true;
  // SIGTERM lets QEMU close its images cleanly; SIGKILL if it does not go within 3 s.
  if (qemu::process_matches(pid, rec.uuid)) {
    ::kill(pid, SIGTERM);
    if (!wait_gone(name, pid, 3s)) {
      ::kill(pid, SIGKILL);
      TRY(wait_gone(name, pid, 5s));
    }
  }
  cleanup_after_stop(name, pid, "destroyed");
  return ok();
}

void DomainManager::cleanup_after_stop(const std::string& name, pid_t pid, const std::string& reason) {
  std::lock_guard lock(mutex_);
  auto it = running_.find(name);
  if (it != running_.end() && (pid == 0 || it->second->pid == pid)) {
    auto run = std::move(it->second);
    running_.erase(it);
    run.reset();  // joins the QMP reader thread (its close callback only spawns a thread)
  }
  auto rec = store_.get_domain(name);
  if (!rec || !*rec) return;
  DomainRecord r = **rec;
  if (pid != 0 && r.pid != pid && r.pid != 0) return;  // a newer run already
  bool was_running = r.pid != 0;
  if (auto def = qemu::domain_from_json(r.definition)) {
    for (auto& n : def->nics) {
      if (n.kind == qemu::NicKind::User) continue;
      networks_.delete_tap(tap_name(def->uuid, n.id));
      ::unlink(vhost_socket_path(run_dir(name), n.id).c_str());
    }
  }
  std::string dir = run_dir(name);
  for (auto f : {"/qmp.sock", "/console.sock", "/qemu.pid"}) ::unlink((dir + f).c_str());
  if (r.live.contains("owners")) restore_owners(r.live["owners"]);
  r.pid = 0;
  r.state = "shutoff";
  r.live = json::object();
  if (auto u = store_.update_domain(r); !u) KEEL_LOG_ERROR("domain {}: {}", name, u.error().message());
  if (was_running) events_.publish("lifecycle", name, "stopped", {{"reason", reason}});
}

void DomainManager::on_qemu_exit(const std::string& name, pid_t pid) {
  // The monitor closed: QEMU exited (guest poweroff, crash, or our own destroy/save).
  (void)wait_gone(name, pid, 5s);
  std::string reason = "shutdown";
  {
    std::lock_guard lock(mutex_);
    auto it = running_.find(name);
    if (it == running_.end() || it->second->pid != pid) return;  // destroy/save cleaned up already
  }
  cleanup_after_stop(name, pid, reason);
}

void DomainManager::on_qmp_event(const std::string& name, const qemu::QmpEvent& ev) {
  // Runs on the QMP reader thread: never takes mutex_ (an operation holding it may be joining
  // this thread).
  if (ev.name == "STOP") {
    (void)store_.set_domain_state(name, "paused");
    events_.publish("lifecycle", name, "suspended");
  } else if (ev.name == "RESUME") {
    (void)store_.set_domain_state(name, "running");
    events_.publish("lifecycle", name, "resumed");
  } else if (ev.name == "SHUTDOWN") {
    events_.publish("lifecycle", name, "shutdown", {{"guest", ev.data.value("guest", false)}});
  } else if (ev.name == "RESET") {
    events_.publish("lifecycle", name, "reset");
  } else if (ev.name == "DEVICE_DELETED") {
    events_.publish("device", name, "device-deleted", ev.data);
  } else if (ev.name == "MIGRATION") {
    events_.publish("job", name, "migration", ev.data);
  }
}

Result<void> DomainManager::reboot(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto* r = TRY(running(name));
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  if (def.boot.firmware == "qboot") {
    // qboot does not boot the -kernel again after a reset: restart QEMU instead, which the guest
    // sees as a fresh boot all the same.
    pid_t pid = r->pid;
    (void)r->qmp->execute("quit");
    if (!wait_gone(name, pid, 5s)) ::kill(pid, SIGKILL);
    TRY(wait_gone(name, pid, 5s));
    cleanup_after_stop(name, pid, "rebooting");
    rec = TRY(get(name));
    TRY(launch(rec, false));
    events_.publish("lifecycle", name, "rebooted", {{"restarted", true}});
    return ok();
  }
  TRY(r->qmp->execute("system_reset"));
  events_.publish("lifecycle", name, "rebooted");
  return ok();
}

Result<void> DomainManager::suspend(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto* r = TRY(running(name));
  TRY(r->qmp->execute("stop"));
  TRY(store_.set_domain_state(name, "paused"));
  return ok();
}

Result<void> DomainManager::resume(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto* r = TRY(running(name));
  TRY(r->qmp->execute("cont"));
  TRY(store_.set_domain_state(name, "running"));
  return ok();
}

namespace {
Result<void> wait_migration(qemu::QmpClient& qmp, std::chrono::seconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto st = TRY(qmp.execute("query-migrate"));
    std::string status = st.value("status", "");
    if (status == "completed") return ok();
    if (status == "failed" || status == "cancelled")
      return fail(EIO, fmt::format("migration {}: {}", status, st.value("error-desc", "")));
    if (std::chrono::steady_clock::now() > deadline) return fail(ETIMEDOUT, "migration did not finish in time");
    std::this_thread::sleep_for(10ms);
  }
}
}  // namespace

Result<void> DomainManager::save(const std::string& name, const std::string& file) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto* r = TRY(running(name));
  if (file.empty() || file[0] != '/') return fail_invalid("file: '{}' must be an absolute path", file);
  auto fd = UniqueFd::open(file, O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (!fd) return fail(fd.error().code() == EEXIST ? EEXIST : fd.error().code(), fd.error().message());
  auto fail_cleanup = [&](Error e) -> Result<void> {
    ::unlink(file.c_str());
    (void)r->qmp->execute("migrate_cancel");
    if (rec.state == "running") (void)r->qmp->execute("cont");
    return fail(std::move(e));
  };
  // Header: magic, the definition (with what was hot-plugged) and whether it ran; then QEMU's
  // migration stream.
  // shared_memory: the restore must give QEMU the same RAM backend (a memfd for vhost-user NICs).
  json header = {{"definition", rec.definition},
                 {"running", rec.state == "running"},
                 {"shared_memory", rec.live.value("shared_memory", false)}};
  std::string h = fmt::format("{}\n{}\n", kSaveMagic, header.dump());
  if (auto w = write_all(fd->get(), h.data(), h.size()); !w) return fail_cleanup(w.error());
  if (rec.state == "running")
    if (auto s = r->qmp->execute("stop"); !s) return fail_cleanup(s.error());
  // QEMU throttles migration to 32 MiB/s by default: a save to a local file should not wait.
  (void)r->qmp->execute("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}});
  if (auto g = r->qmp->execute("getfd", {{"fdname", "keel-save"}}, 30s, fd->get()); !g) return fail_cleanup(g.error());
  if (auto m = r->qmp->execute("migrate", {{"uri", "fd:keel-save"}}); !m) return fail_cleanup(m.error());
  if (auto w = wait_migration(*r->qmp, 300s); !w) return fail_cleanup(w.error());
  if (::fsync(fd->get()) < 0) return fail_cleanup(Error::from_errno("fsync " + file));
  pid_t pid = r->pid;
  (void)r->qmp->execute("quit");
  if (!wait_gone(name, pid, 5s)) ::kill(pid, SIGKILL);
  cleanup_after_stop(name, pid, "saved");
  events_.publish("job", name, "saved", {{"file", file}});
  return ok();
}

Result<std::string> DomainManager::restore(const std::string& file) {
  std::lock_guard lock(mutex_);
  auto fd = TRY(UniqueFd::open(file, O_RDONLY));
  // Read the two header lines byte by byte so the fd is left exactly at the migration stream.
  std::string lines[2];
  for (auto& line : lines) {
    char c;
    for (;;) {
      ssize_t n = ::read(fd.get(), &c, 1);
      if (n != 1) return fail_invalid("{}: not a Keel save file (truncated header)", file);
      if (c == '\n') break;
      line += c;
      if (line.size() > (1 << 20)) return fail_invalid("{}: not a Keel save file", file);
    }
    if (&line == &lines[0] && line != kSaveMagic) return fail_invalid("{}: not a Keel save file", file);
  }
  json header = json::parse(lines[1], nullptr, false);
  if (header.is_discarded() || !header.contains("definition")) return fail_invalid("{}: corrupt save header", file);
  auto def = TRY_CTX(qemu::domain_from_json(header["definition"]), "saved definition");
  auto existing = TRY(store_.get_domain(def.name));
  DomainRecord rec;
  if (existing) {
    rec = *existing;
    if (rec.uuid != def.uuid) return fail(EEXIST, fmt::format("domain '{}' exists with another uuid", def.name));
    if (running_.count(def.name) || rec.pid != 0) return fail(EBUSY, fmt::format("domain '{}' is running", def.name));
    // The saved definition includes hot-plugged devices: the guest expects them.
    rec.definition = header["definition"];
  } else {
    rec = DomainRecord{def.name, def.uuid, header["definition"], 0, "shutoff", json::object()};
    TRY(store_.insert_domain(rec));
  }
  TRY(store_.update_domain(rec));
  // Saves from before this field existed were all of private RAM (a vhost-user guest could not be
  // saved then).
  TRY(launch(rec, false,
             header.value("shared_memory", false) ? LaunchFrom::SavedSharedRam : LaunchFrom::SavedPrivateRam));
  auto* r = TRY(running(def.name));
  auto incoming = [&]() -> Result<void> {
    TRY(r->qmp->execute("getfd", {{"fdname", "keel-restore"}}, 30s, fd.get()));
    TRY(r->qmp->execute("migrate-incoming", {{"uri", "fd:keel-restore"}}));
    auto deadline = std::chrono::steady_clock::now() + 300s;
    for (;;) {
      auto st = TRY(r->qmp->execute("query-status"));
      std::string s = st.value("status", "");
      if (s != "inmigrate") {
        if (s == "paused" || s == "postmigrate" || s == "prelaunch") break;
        if (s == "running") break;
        return fail(EIO, fmt::format("restore: guest ended in state '{}'", s));
      }
      if (std::chrono::steady_clock::now() > deadline) return fail(ETIMEDOUT, "restore did not finish in time");
      std::this_thread::sleep_for(10ms);
    }
    auto mig = TRY(r->qmp->execute("query-migrate"));
    if (mig.value("status", "") == "failed") return fail(EIO, "restore: " + mig.value("error-desc", "migration failed"));
    if (header.value("running", true)) TRY(r->qmp->execute("cont"));
    return ok();
  };
  if (auto ok_ = incoming(); !ok_) {
    pid_t pid = r->pid;
    ::kill(pid, SIGKILL);
    (void)wait_gone(def.name, pid, 5s);
    cleanup_after_stop(def.name, pid, "restore failed");
    return fail(ok_.error());
  }
  TRY(store_.set_domain_state(def.name, header.value("running", true) ? "running" : "paused"));
  events_.publish("job", def.name, "restored", {{"file", file}});
  return def.name;
}

Result<std::string> DomainManager::free_hotplug_port(const std::string& name, const DomainRecord& rec) {
  json ports = rec.live.value("ports", json::object());
  for (int i = 0; i < 4; ++i) {
    std::string id = qemu::hotplug_port_id(i);
    if (!ports.contains(id)) return id;
  }
  return fail(EBUSY, fmt::format("domain '{}': all 4 hot-plug slots are in use", name));
}

Result<qemu::NicDef> DomainManager::attach_nic(const std::string& name, qemu::NicDef nic) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  def.nics.push_back(nic);
  TRY(qemu::validate_domain(def));
  qemu::assign_defaults(def);
  nic = def.nics.back();
  if (nic.kind == qemu::NicKind::Network) {
    bool found = false;
    for (auto& net : TRY(networks_.list())) found |= net.value("name", "") == nic.network;
    if (!found) return fail_invalid("network: network '{}' does not exist", nic.network);
  }
  if (running_.count(name)) {
    auto* r = TRY(running(name));
    std::string port = TRY(free_hotplug_port(name, rec));
    std::string host_port;  // the switch port or tap, both named like the tap
    qemu::NicBackend backend;
    auto ident = identity_of(r->pid);
    int uid = ident.uid == static_cast<uid_t>(-1) ? -1 : static_cast<int>(ident.uid);
    if (nic.kind != qemu::NicKind::User) host_port = tap_name(def.uuid, nic.id);
    bool vhost_user = nic.kind == qemu::NicKind::Network && networks_.vhost_user_nics();
    if (vhost_user && !rec.live.value("shared_memory", false)) {
      // The switch cannot map this guest's private memory: the NIC stays on a tap until a restart.
      KEEL_LOG_WARN("domain {}: nic {} is a tap (guest memory is not shared; vhost-user after a restart)", name,
                    nic.id);
      vhost_user = false;
    }
    auto undo_host_port = [&] {
      if (!host_port.empty()) networks_.delete_tap(host_port);
      if (vhost_user) {
        (void)r->qmp->execute("chardev-remove", {{"id", qemu::nic_chardev_id(nic)}});
        ::unlink(backend.socket.c_str());
      }
    };
    if (vhost_user) {
      backend.type = qemu::NicBackendType::VhostUser;
      backend.socket = TRY(fresh_vhost_socket(run_dir(name), nic.id));
      // QEMU listens first; then the switch port, which connects; netdev_add waits for that connection.
      TRY(r->qmp->execute("chardev-add", qemu::chardev_add_args(nic, backend.socket)));
      if (auto p = networks_.add_vhost_user_port(nic.network, host_port, backend.socket); !p) {
        host_port.clear();
        undo_host_port();
        return fail(p.error());
      }
    } else if (nic.kind != qemu::NicKind::User) {
      backend.tap = host_port;
      auto made = nic.kind == qemu::NicKind::Network ? networks_.create_tap(nic.network, host_port, uid)
                                                     : networks_.create_bridge_tap(nic.bridge, host_port, uid);
      if (!made) return fail(made.error());
    }
    auto nd = r->qmp->execute("netdev_add", qemu::netdev_add_args(nic, backend));
    if (!nd) {
      undo_host_port();
      return fail(nd.error());
    }
    auto dev = r->qmp->execute("device_add", qemu::nic_device_args(nic, port, backend, cfg_.accel));
    if (!dev) {
      (void)r->qmp->execute("netdev_del", {{"id", qemu::nic_netdev_id(nic)}});
      undo_host_port();
      return fail(dev.error());
    }
    rec.live["ports"][port] = nic.id;
    if (nic.kind != qemu::NicKind::User) rec.live["nics"][nic.id] = nic_host_json(backend, host_port);
  }
  rec.definition = qemu::domain_to_json(def);
  TRY(store_.update_domain(rec));
  events_.publish("device", name, "nic-attached", {{"id", nic.id}, {"mac", nic.mac}});
  return nic;
}

Result<qemu::DiskDef> DomainManager::attach_disk(const std::string& name, qemu::DiskDef disk) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  def.disks.push_back(disk);
  TRY(qemu::validate_domain(def));
  qemu::assign_defaults(def);
  disk = def.disks.back();
  qemu::DomainDef probe = def;
  TRY(resolve_disks(probe));
  qemu::DiskDef resolved = probe.disks.back();
  if (running_.count(name)) {
    auto* r = TRY(running(name));
    std::string port = TRY(free_hotplug_port(name, rec));
    auto ident = identity_of(r->pid);
    if (ident.uid != static_cast<uid_t>(-1)) {
      struct stat st;
      if (::stat(resolved.path.c_str(), &st) == 0 && !rec.live["owners"].contains(resolved.path))
        rec.live["owners"][resolved.path] = {st.st_uid, st.st_gid};
      if (::chown(resolved.path.c_str(), ident.uid, ident.gid) < 0) return fail_errno("chown " + resolved.path);
    }
    TRY(r->qmp->execute("blockdev-add", qemu::blockdev_add_args(resolved)));
    auto dev = r->qmp->execute("device_add", qemu::disk_device_args(resolved, port));
    if (!dev) {
      (void)r->qmp->execute("blockdev-del", {{"node-name", "fmt-" + disk.id}});
      return fail(dev.error());
    }
    rec.live["ports"][port] = disk.id;
  }
  rec.definition = qemu::domain_to_json(def);
  TRY(store_.update_domain(rec));
  events_.publish("device", name, "disk-attached", {{"id", disk.id}});
  return disk;
}

namespace {
// Waits until QEMU no longer lists the device (the guest acknowledged the unplug).
Result<void> wait_device_gone(qemu::QmpClient& qmp, const std::string& id, std::chrono::seconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto r = qmp.execute("qom-get", {{"path", "/machine/peripheral/" + id}, {"property", "type"}});
    if (!r) return ok();  // gone
    if (std::chrono::steady_clock::now() > deadline)
      return fail(ETIMEDOUT, fmt::format("device {}: the guest did not release it in {} s", id, timeout.count()));
    std::this_thread::sleep_for(20ms);
  }
}

// Deletes a block node once QEMU lets go of it. The unplugged device disappears from the QOM tree a
// moment before its block backend is released, so a blockdev-del right after that can find the node
// still in use; left behind, the node would make the next attach of the same disk id fail with
// "Duplicate nodes". Retries until the node is gone (deleted, or never there).
Result<void> delete_block_node(qemu::QmpClient& qmp, const std::string& node, std::chrono::seconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto r = qmp.execute("blockdev-del", {{"node-name", node}});
    if (r) return ok();
    const std::string& message = r.error().message();
    if (message.find("Failed to find node") != std::string::npos ||
        message.find("Cannot find") != std::string::npos)
      return ok();
    if (std::chrono::steady_clock::now() > deadline)
      return fail(r.error().with_context(fmt::format("block node {} still in use after {} s", node, timeout.count())));
    std::this_thread::sleep_for(20ms);
  }
}
}  // namespace

Result<void> DomainManager::detach_nic(const std::string& name, const std::string& id_or_mac) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  auto it = std::find_if(def.nics.begin(), def.nics.end(), [&](auto& n) { return n.id == id_or_mac || n.mac == id_or_mac; });
  if (it == def.nics.end()) return fail(ENOENT, fmt::format("domain '{}' has no NIC '{}'", name, id_or_mac));
  qemu::NicDef nic = *it;
  if (running_.count(name)) {
    auto* r = TRY(running(name));
    TRY(r->qmp->execute("device_del", {{"id", nic.id}}));
    TRY(wait_device_gone(*r->qmp, nic.id, 20s));
    (void)r->qmp->execute("netdev_del", {{"id", qemu::nic_netdev_id(nic)}});
    if (nic.kind != qemu::NicKind::User) {
      // A vhost-user NIC's socket chardev (absent for a tap: the error is expected), its switch
      // port, then the socket file.
      (void)r->qmp->execute("chardev-remove", {{"id", qemu::nic_chardev_id(nic)}});
      networks_.delete_tap(tap_name(def.uuid, nic.id));
      ::unlink(vhost_socket_path(run_dir(name), nic.id).c_str());
      if (rec.live.contains("nics")) rec.live["nics"].erase(nic.id);
    }
    json& ports = rec.live["ports"];
    for (auto p = ports.begin(); p != ports.end(); ++p)
      if (p.value() == nic.id) {
        ports.erase(p);
        break;
      }
  }
  def.nics.erase(it);
  rec.definition = qemu::domain_to_json(def);
  TRY(store_.update_domain(rec));
  events_.publish("device", name, "nic-detached", {{"id", nic.id}});
  return ok();
}

Result<void> DomainManager::detach_disk(const std::string& name, const std::string& id) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  auto it = std::find_if(def.disks.begin(), def.disks.end(), [&](auto& d) { return d.id == id || d.path == id; });
  if (it == def.disks.end()) return fail(ENOENT, fmt::format("domain '{}' has no disk '{}'", name, id));
  qemu::DiskDef disk = *it;
  if (running_.count(name)) {
    auto* r = TRY(running(name));
    TRY(r->qmp->execute("device_del", {{"id", disk.id}}));
    TRY(wait_device_gone(*r->qmp, disk.id, 20s));
    TRY(delete_block_node(*r->qmp, "fmt-" + disk.id, 10s));
    json& ports = rec.live["ports"];
    for (auto p = ports.begin(); p != ports.end(); ++p)
      if (p.value() == disk.id) {
        ports.erase(p);
        break;
      }
  }
  def.disks.erase(it);
  rec.definition = qemu::domain_to_json(def);
  TRY(store_.update_domain(rec));
  events_.publish("device", name, "disk-detached", {{"id", disk.id}});
  return ok();
}

Result<std::string> DomainManager::console_socket(const std::string& name) {
  std::lock_guard lock(mutex_);
  TRY(running(name));
  return run_dir(name) + "/console.sock";
}

Result<std::string> DomainManager::console_log(const std::string& name) {
  TRY(get(name));
  auto text = read_file(run_dir(name) + "/console.log");
  if (!text) return std::string();
  return *text;
}

Result<json> DomainManager::stats(const std::string& name) {
  auto rec = TRY(get(name));
  auto def = TRY(qemu::domain_from_json(rec.definition));
  json j = {{"name", name}, {"state", rec.state}, {"memory", def.memory_bytes}, {"vcpus", def.vcpus}};
  if (rec.pid <= 0) return j;
  if (auto u = qemu::process_usage(static_cast<pid_t>(rec.pid))) {
    j["cpu_time_ns"] = u->cpu_ns;
    j["rss"] = u->rss_bytes;
  }
  json disks = json::array();
  {
    std::lock_guard lock(mutex_);
    auto it = running_.find(name);
    if (it != running_.end() && it->second->qmp && it->second->qmp->connected()) {
      if (auto bs = it->second->qmp->execute("query-blockstats", {{"query-nodes", false}}, 5s)) {
        for (auto& b : *bs) {
          std::string qdev = b.value("qdev", "");
          // qdev is "/machine/peripheral/vda/virtio-backend"; the id is the third component.
          std::string id = qdev;
          auto p = id.find("/peripheral/");
          if (p != std::string::npos) {
            id = id.substr(p + 12);
            id = id.substr(0, id.find('/'));
          }
          auto& s = b["stats"];
          disks.push_back({{"id", id},
                           {"rd_bytes", s.value("rd_bytes", 0)},
                           {"wr_bytes", s.value("wr_bytes", 0)},
                           {"rd_ops", s.value("rd_operations", 0)},
                           {"wr_ops", s.value("wr_operations", 0)}});
        }
      }
    }
  }
  j["disks"] = disks;
  json nics = json::array();
  for (auto& n : def.nics) {
    json nj = {{"id", n.id}, {"mac", n.mac}};
    if (n.kind != qemu::NicKind::User) {
      // The tap's counters from the host side (what the host sends is what the guest receives),
      // from /proc/net/dev, which shows keeld's own network namespace.
      auto c = tap_counters(tap_name(def.uuid, n.id));
      if (!c && n.kind == qemu::NicKind::Network) {
        // A vhost-user NIC has no tap: the switch port's counters, which count the same way.
        if (auto p = networks_.port_counters(n.network, tap_name(def.uuid, n.id)))
          c = LinkCounters{p->rx_bytes, p->rx_packets, p->tx_bytes, p->tx_packets};
      }
      if (c) {
        nj["rx_bytes"] = c->tx_bytes;
        nj["tx_bytes"] = c->rx_bytes;
        nj["rx_packets"] = c->tx_packets;
        nj["tx_packets"] = c->rx_packets;
      }
    }
    nics.push_back(nj);
  }
  j["nics"] = nics;
  return j;
}

std::string DomainManager::metrics() {
  std::string out;
  auto domains = store_.list_domains();
  if (!domains) return "# error: " + domains.error().message() + "\n";
  std::map<std::string, int> by_state;
  out += "# HELP keel_domain_cpu_seconds_total CPU time used by the domain's QEMU process.\n"
         "# TYPE keel_domain_cpu_seconds_total counter\n";
  std::string mem = "# HELP keel_domain_memory_rss_bytes Resident memory of the domain's QEMU process.\n"
                    "# TYPE keel_domain_memory_rss_bytes gauge\n";
  std::string memdef = "# HELP keel_domain_memory_bytes Memory given to the guest.\n# TYPE keel_domain_memory_bytes gauge\n";
  std::string blk = "# HELP keel_domain_block_read_bytes_total Bytes read by the guest from a disk.\n"
                    "# TYPE keel_domain_block_read_bytes_total counter\n";
  std::string blkw = "# HELP keel_domain_block_write_bytes_total Bytes written by the guest to a disk.\n"
                     "# TYPE keel_domain_block_write_bytes_total counter\n";
  std::string rx = "# HELP keel_domain_net_rx_bytes_total Bytes received by the guest on a NIC.\n"
                   "# TYPE keel_domain_net_rx_bytes_total counter\n";
  std::string tx = "# HELP keel_domain_net_tx_bytes_total Bytes sent by the guest on a NIC.\n"
                   "# TYPE keel_domain_net_tx_bytes_total counter\n";
  for (auto& rec : *domains) {
    by_state[rec.state]++;
    if (rec.pid <= 0) continue;
    auto s = stats(rec.name);
    if (!s) continue;
    std::string l = fmt::format("domain=\"{}\"", rec.name);
    out += fmt::format("keel_domain_cpu_seconds_total{{{}}} {:.3f}\n", l, s->value("cpu_time_ns", uint64_t{0}) / 1e9);
    mem += fmt::format("keel_domain_memory_rss_bytes{{{}}} {}\n", l, s->value("rss", uint64_t{0}));
    memdef += fmt::format("keel_domain_memory_bytes{{{}}} {}\n", l, s->value("memory", uint64_t{0}));
    for (auto& d : (*s)["disks"]) {
      blk += fmt::format("keel_domain_block_read_bytes_total{{{},disk=\"{}\"}} {}\n", l, d.value("id", ""), d.value("rd_bytes", uint64_t{0}));
      blkw += fmt::format("keel_domain_block_write_bytes_total{{{},disk=\"{}\"}} {}\n", l, d.value("id", ""), d.value("wr_bytes", uint64_t{0}));
    }
    for (auto& n : (*s)["nics"]) {
      if (!n.contains("rx_bytes")) continue;
      rx += fmt::format("keel_domain_net_rx_bytes_total{{{},nic=\"{}\"}} {}\n", l, n.value("id", ""), n.value("rx_bytes", uint64_t{0}));
      tx += fmt::format("keel_domain_net_tx_bytes_total{{{},nic=\"{}\"}} {}\n", l, n.value("id", ""), n.value("tx_bytes", uint64_t{0}));
    }
  }
  out += mem + memdef + blk + blkw + rx + tx;
  out += "# HELP keel_domains Domains by state.\n# TYPE keel_domains gauge\n";
  for (auto& st : {"running", "paused", "shutoff"}) out += fmt::format("keel_domains{{state=\"{}\"}} {}\n", st, by_state[st]);
  return out;
}

}  // namespace keel::hostd
