#include "hostd/network.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <functional>
#include <set>
#include <thread>

#include <fmt/format.h>

#include "base/log.h"
#include "base/process.h"
#include "base/unique_fd.h"
#include "qemu/domain_def.h"
#include "qemu/launcher.h"

namespace keel::hostd {

using nlohmann::json;

namespace {

bool valid_ipv4(const std::string& s) {
  in_addr a;
  return ::inet_pton(AF_INET, s.c_str(), &a) == 1;
}

bool valid_ifname(const std::string& s) {
  if (s.empty() || s.size() > 15) return false;
  for (char c : s)
    if (!isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
  return true;
}

Result<void> run_ip(const std::vector<std::string>& args) {
  std::vector<std::string> argv{"ip"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto out = TRY(run_command(argv));
  if (out.exit_code != 0) {
    std::string cmd;
    for (auto& a : argv) cmd += a + " ";
    while (!out.err.empty() && out.err.back() == '\n') out.err.pop_back();
    return fail(EIO, fmt::format("{}: {}", cmd, out.err));
  }
  return ok();
}

bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

}  // namespace

Result<PortCounters> parse_port_stats(std::string_view text, std::string_view port) {
  // Lines: "PORT (OFPORT): rx_packets=N rx_bytes=N rx_dropped=N tx_packets=N tx_bytes=N tx_dropped=N".
  std::string prefix = std::string(port) + " (";
  while (!text.empty()) {
    size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    if (line.substr(0, prefix.size()) != prefix) continue;
    PortCounters c;
    for (auto [key, out] : {std::pair<std::string_view, uint64_t*>{"rx_bytes", &c.rx_bytes},
                            {"rx_packets", &c.rx_packets}, {"tx_bytes", &c.tx_bytes}, {"tx_packets", &c.tx_packets}}) {
      std::string k = " " + std::string(key) + "=";
      auto at = line.find(k);
      if (at == std::string_view::npos) return fail(EIO, fmt::format("port-stats of {}: no {}", port, key));
      auto digits = line.substr(at + k.size());
      auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), *out);
      if (ec != std::errc() || ptr == digits.data()) return fail(EIO, fmt::format("port-stats of {}: bad {}", port, key));
    }
    return c;
  }
  return fail(ENOENT, fmt::format("port-stats: no port {}", port));
}

Result<NetworkDef> network_from_json(const json& j) {
  if (!j.is_object()) return fail_invalid("network: expected an object");
  NetworkDef d;
  static const std::set<std::string> allowed{"name", "bridge", "mode", "address", "prefix", "dhcp_start", "dhcp_end"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!allowed.count(it.key()))
      return fail_invalid("{}: unknown field (allowed: name, bridge, mode, address, prefix, dhcp_start, dhcp_end)", it.key());
  auto str = [&](const char* k, std::string& out) -> Result<void> {
    if (!j.contains(k)) return ok();
    if (!j[k].is_string()) return fail_invalid("{}: expected a string", k);
    out = j[k].get<std::string>();
    return ok();
  };
  TRY(str("name", d.name));
  TRY(str("bridge", d.bridge));
  TRY(str("mode", d.mode));
  TRY(str("address", d.address));
  TRY(str("dhcp_start", d.dhcp_start));
  TRY(str("dhcp_end", d.dhcp_end));
  if (j.contains("prefix")) {
    if (!j["prefix"].is_number_integer()) return fail_invalid("prefix: expected an integer");
    d.prefix = j["prefix"].get<int>();
  }
  TRY(qemu::validate_name("name", d.name));
  if (d.bridge.empty()) d.bridge = ("kbr-" + d.name).substr(0, 15);
  if (!valid_ifname(d.bridge)) return fail_invalid("bridge: '{}' is not an interface name (1-15 of [A-Za-z0-9_-])", d.bridge);
  if (d.mode != "isolated" && d.mode != "routed" && d.mode != "nat")
    return fail_invalid("mode: '{}' is not one of isolated, routed, nat", d.mode);
  if (!valid_ipv4(d.address)) return fail_invalid("address: '{}' is not an IPv4 address", d.address);
  if (d.prefix < 8 || d.prefix > 30) return fail_invalid("prefix: {} is not allowed (8 to 30)", d.prefix);
  if (d.dhcp_start.empty() != d.dhcp_end.empty()) return fail_invalid("dhcp_start/dhcp_end: give both or neither");
  if (!d.dhcp_start.empty() && (!valid_ipv4(d.dhcp_start) || !valid_ipv4(d.dhcp_end)))
    return fail_invalid("dhcp_start/dhcp_end: not IPv4 addresses");
  return d;
}

json network_to_json(const NetworkDef& d) {
  json j = {{"name", d.name}, {"bridge", d.bridge}, {"mode", d.mode}, {"address", d.address}, {"prefix", d.prefix}};
  if (!d.dhcp_start.empty()) {
    j["dhcp_start"] = d.dhcp_start;
    j["dhcp_end"] = d.dhcp_end;
  }
  return j;
}

Networks::Networks(StateStore& store, std::string run_dir) : store_(store), run_dir_(std::move(run_dir)) {}

Result<void> Networks::ensure_default() {
  for (auto& n : TRY(store_.list_networks()))
    if (n.name == "default") return ok();
  // libvirt's default is 192.168.122.0/24 with NAT; ours is isolated until a guest needs more,
  // on a range libvirt does not use so both can run on one host.
  NetworkDef d{"default", "keelbr0", "isolated", "10.77.0.1", 24, "10.77.0.10", "10.77.0.250"};
  return store_.upsert_network(NetworkRecord{d.name, network_to_json(d), false});
}

Result<NetworkRecord> Networks::get(const std::string& name) {
  for (auto& n : TRY(store_.list_networks()))
    if (n.name == name) return n;
  return fail(ENOENT, fmt::format("network '{}' not found", name));
}

bool Networks::link_exists(const std::string& ifname) const {
  // Not /sys/class/net: sysfs shows the namespace it was mounted in, and keeld may run in another.
  return ::if_nametoindex(ifname.c_str()) != 0;
}

bool Networks::switch_reachable() const {
  sockaddr_un addr{};
  if (switch_.ctl_socket.size() >= sizeof(addr.sun_path)) return false;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return false;
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, switch_.ctl_socket.c_str(), switch_.ctl_socket.size());
  return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
}

Result<void> Networks::ensure_switch() {
  if (switch_reachable()) return ok();
  // Detached like QEMU and dnsmasq: guests' NICs keep working while keeld restarts, and the next
  // keeld finds the daemon by its control socket.
  ::mkdir(run_dir_.c_str(), 0711);
  if (::mkdir(switch_.state_dir.c_str(), 0700) < 0 && errno != EEXIST)
    return fail_errno("mkdir " + switch_.state_dir);
  ::unlink(switch_.ctl_socket.c_str());
  pid_t pid = TRY(qemu::launch_detached({switch_.switch_binary, "--state-dir", switch_.state_dir, "--ctl-socket",
                                         switch_.ctl_socket},
                                        switch_.state_dir + "/keel-switch.log", qemu::LaunchIdentity{}));
  (void)write_file(run_dir_ + "/keel-switch.pid", fmt::format("{}\n", pid));
  if (!wait_until([&] { return switch_reachable(); }, std::chrono::seconds(10)))
    return fail(EIO, fmt::format("keel-switch (pid {}) did not open {}; see {}/keel-switch.log", pid,
                                 switch_.ctl_socket, switch_.state_dir));
  KEEL_LOG_INFO("started keel-switch (pid {}, control {})", pid, switch_.ctl_socket);
  return ok();
}

Result<std::string> Networks::run_ctl(const std::vector<std::string>& args) {
  std::vector<std::string> argv{switch_.ctl_binary, "--socket", switch_.ctl_socket};
  argv.insert(argv.end(), args.begin(), args.end());
  auto out = TRY(run_command(argv));
  if (out.exit_code != 0) {
    std::string cmd;
    for (auto& a : args) cmd += " " + a;
    while (!out.err.empty() && out.err.back() == '\n') out.err.pop_back();
    return fail(EIO, fmt::format("keel-switch-ctl{}: {}", cmd, out.err));
  }
  return out.out;
}

Result<bool> Networks::switch_has_bridge(const std::string& bridge) {
  std::string list = TRY(run_ctl({"list-br"}));
  size_t i = 0;
  while (i < list.size()) {
    size_t j = list.find('\n', i);
    if (j == std::string::npos) j = list.size();
    if (list.compare(i, j - i, bridge) == 0) return true;
    i = j + 1;
  }
  return false;
}

Result<json> Networks::list() {
  json out = json::array();
  for (auto& n : TRY(store_.list_networks())) {
    json j = n.definition;
    std::string bridge = j.value("bridge", "");
    j["active"] = !bridge.empty() && link_exists(bridge);
    out.push_back(j);
  }
  return out;
}

Result<void> Networks::define(const NetworkDef& def) {
  std::lock_guard lock(mutex_);
  for (auto& n : TRY(store_.list_networks())) {
    if (n.name == def.name) return fail(EEXIST, fmt::format("network '{}' already exists", def.name));
    if (n.definition.value("bridge", "") == def.bridge)
      return fail(EEXIST, fmt::format("bridge '{}' is already used by network '{}'", def.bridge, n.name));
  }
  return store_.upsert_network(NetworkRecord{def.name, network_to_json(def), false});
}

Result<void> Networks::undefine(const std::string& name) {
  TRY(get(name));
  TRY(stop(name));
  return store_.delete_network(name);
}

Result<void> Networks::start(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto def = TRY(network_from_json(rec.definition));
  std::string d = dir(name);
  ::mkdir(run_dir_.c_str(), 0711);
  ::mkdir(d.c_str(), 0755);
  if (on_switch()) {
    TRY(ensure_switch());
    if (!TRY(switch_has_bridge(def.bridge))) TRY(run_ctl({"add-br", def.bridge}));
    // The bridge's internal port is a tap named like the bridge, left down by keel-switch.
    if (!wait_until([&] { return link_exists(def.bridge); }, std::chrono::seconds(5)))
      return fail(EIO, fmt::format("keel-switch made no internal port '{}'", def.bridge));
    auto addrs = TRY(run_command({"ip", "-o", "-4", "addr", "show", "dev", def.bridge}));
    if (addrs.out.find(fmt::format(" {}/{} ", def.address, def.prefix)) == std::string::npos)
      TRY(run_ip({"addr", "add", fmt::format("{}/{}", def.address, def.prefix), "dev", def.bridge}));
    TRY(run_ip({"link", "set", def.bridge, "up"}));
  } else if (!link_exists(def.bridge)) {
    TRY(run_ip({"link", "add", "name", def.bridge, "type", "bridge"}));
    TRY(run_ip({"addr", "add", fmt::format("{}/{}", def.address, def.prefix), "dev", def.bridge}));
    TRY(run_ip({"link", "set", def.bridge, "up"}));
  }
  if (def.mode != "isolated") (void)write_file("/proc/sys/net/ipv4/ip_forward", "1\n");
  if (def.mode == "nat") {
    if (!find_executable("iptables")) return fail(ENOTSUP, "mode nat needs iptables, which is not installed");
    std::string subnet = fmt::format("{}/{}", def.address, def.prefix);
    auto check = TRY(run_command({"iptables", "-t", "nat", "-C", "POSTROUTING", "-s", subnet, "!", "-d", subnet, "-j", "MASQUERADE"}));
    if (check.exit_code != 0)
      TRY(run_command({"iptables", "-t", "nat", "-A", "POSTROUTING", "-s", subnet, "!", "-d", subnet, "-j", "MASQUERADE"}));
  }
  std::string pidfile = d + "/dnsmasq.pid";
  if (!def.dhcp_start.empty()) {
    auto pid_text = read_file(pidfile);
    pid_t pid = pid_text ? std::atoi(pid_text->c_str()) : 0;
    if (!qemu::process_matches(pid, "--interface=" + def.bridge)) {
      // dnsmasq daemonizes itself (so it outlives keeld) and writes its pid file.
      auto out = TRY(run_command({"dnsmasq", "--conf-file=/dev/null", "--pid-file=" + pidfile,
                                  "--except-interface=lo", "--bind-interfaces", "--interface=" + def.bridge,
                                  "--listen-address=" + def.address,
                                  fmt::format("--dhcp-range={},{},12h", def.dhcp_start, def.dhcp_end),
                                  "--dhcp-leasefile=" + d + "/leases", "--dhcp-no-override", "--dhcp-authoritative",
                                  "--strict-order", "--no-resolv", "--no-hosts", "--user=root", "--group=root"}));
      if (out.exit_code != 0) return fail(EIO, fmt::format("dnsmasq for network '{}': {}", name, out.err));
    }
  }
  rec.active = true;
  return store_.upsert_network(rec);
}

Result<void> Networks::stop(const std::string& name) {
  std::lock_guard lock(mutex_);
  auto rec = TRY(get(name));
  auto def = TRY(network_from_json(rec.definition));
  std::string pidfile = dir(name) + "/dnsmasq.pid";
  if (auto pid_text = read_file(pidfile)) {
    pid_t pid = std::atoi(pid_text->c_str());
    if (qemu::process_matches(pid, "--interface=" + def.bridge)) ::kill(pid, SIGTERM);
    ::unlink(pidfile.c_str());
  }
  if (on_switch()) {
    if (switch_reachable() && TRY(switch_has_bridge(def.bridge))) TRY(run_ctl({"del-br", def.bridge}));
  } else if (link_exists(def.bridge)) {
    TRY(run_ip({"link", "del", def.bridge}));
  }
  rec.active = false;
  return store_.upsert_network(rec);
}

Result<json> Networks::leases(const std::string& name) {
  TRY(get(name));
  json out = json::array();
  auto text = read_file(dir(name) + "/leases");
  if (!text) return out;
  size_t i = 0;
  while (i < text->size()) {
    size_t j = text->find('\n', i);
    if (j == std::string::npos) j = text->size();
    std::string line = text->substr(i, j - i);
    i = j + 1;
    std::vector<std::string> f;
    size_t a = 0;
    while (a < line.size()) {
      size_t b = line.find(' ', a);
      if (b == std::string::npos) b = line.size();
      f.push_back(line.substr(a, b - a));
      a = b + 1;
    }
    if (f.size() < 4) continue;
    out.push_back({{"expiry", std::strtoll(f[0].c_str(), nullptr, 10)}, {"mac", f[1]}, {"ip", f[2]}, {"hostname", f[3]}});
  }
  return out;
}

Result<std::string> Networks::create_bridge_tap(const std::string& bridge, const std::string& tap, int uid) {
  if (!valid_ifname(tap)) return fail_invalid("tap name '{}' is not an interface name", tap);
  if (!link_exists(bridge)) return fail(ENOENT, fmt::format("bridge '{}' does not exist", bridge));
  if (link_exists(tap)) (void)run_ip({"link", "del", tap});
  std::vector<std::string> add{"tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"};
  if (uid >= 0) {
    add.push_back("user");
    add.push_back(std::to_string(uid));
  }
  TRY(run_ip(add));
  auto r = run_ip({"link", "set", tap, "master", bridge, "up"});
  if (!r) {
    (void)run_ip({"link", "del", tap});
    return fail(r.error());
  }
  return tap;
}

Result<std::string> Networks::create_tap(const std::string& network, const std::string& tap, int uid) {
  TRY(start(network));
  auto rec = TRY(get(network));
  auto def = TRY(network_from_json(rec.definition));
  if (!on_switch()) return create_bridge_tap(def.bridge, tap, uid);
  if (!valid_ifname(tap)) return fail_invalid("tap name '{}' is not an interface name", tap);
  if (link_exists(tap)) (void)run_ip({"link", "del", tap});
  (void)run_ctl({"del-port", tap});  // a port left by a guest that went away without keeld
  std::vector<std::string> add{"tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"};
  if (uid >= 0) {
    add.push_back("user");
    add.push_back(std::to_string(uid));
  }
  TRY(run_ip(add));
  auto r = run_ip({"link", "set", tap, "up"});
  // QEMU holds the tap's queue, so keel-switch reads and writes it as an interface (AF_PACKET).
  auto port = r ? run_ctl({"add-port", def.bridge, tap, "--", "set", "interface", tap, "type=system"})
                : Result<std::string>(fail(r.error()));
  if (!port) {
    (void)run_ip({"link", "del", tap});
    return fail(port.error());
  }
  return tap;
}

Result<void> Networks::add_vhost_user_port(const std::string& network, const std::string& port,
                                           const std::string& socket) {
  if (!on_switch()) return fail_invalid("vhost-user NICs need the keel-switch network backend");
  if (!valid_ifname(port)) return fail_invalid("port name '{}' is not an interface name", port);
  TRY(start(network));
  auto rec = TRY(get(network));
  auto def = TRY(network_from_json(rec.definition));
  (void)run_ctl({"del-port", port});  // a port left by a guest that went away without keeld
  // QEMU listens (vhost-server-path, OVS's dpdkvhostuserclient): the socket lives in the VM's runtime
  // dir, owned by QEMU's user, and either side can restart while the other reconnects.
  TRY(run_ctl({"add-port", def.bridge, port, "--", "set", "interface", port, "type=vhostuser",
               "options:vhost-server-path=" + socket}));
  return ok();
}

Result<PortCounters> Networks::port_counters(const std::string& network, const std::string& port) {
  if (!on_switch() || !switch_reachable()) return fail(ENOENT, "no keel-switch");
  auto rec = TRY(get(network));
  auto def = TRY(network_from_json(rec.definition));
  return parse_port_stats(TRY(run_ctl({"port-stats", def.bridge})), port);
}

void Networks::delete_tap(const std::string& tap) {
  if (on_switch() && valid_ifname(tap) && switch_reachable()) (void)run_ctl({"del-port", tap});
  if (valid_ifname(tap) && link_exists(tap)) (void)run_ip({"link", "del", tap});
}

}  // namespace keel::hostd
