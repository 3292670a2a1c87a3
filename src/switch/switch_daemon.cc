#include "switch/switch_daemon.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <set>

#include "base/log.h"
#include "switch/bond.h"
#include "switch/vhost_user_port.h"

namespace keel::sw {

using nlohmann::json;

namespace {

json empty_config() { return json{{"bridges", json::object()}}; }

Result<uint64_t> parse_u64(std::string_view s, std::string_view what, int base = 10) {
  uint64_t v = 0;
  if (base == 16 && s.rfind("0x", 0) == 0) s.remove_prefix(2);
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v, base);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size()) return fail_invalid("bad {} '{}'", what, s);
  return v;
}

Result<std::vector<uint16_t>> parse_vlan_list(std::string_view s) {
  std::vector<uint16_t> out;
  std::string str(s);
  // Accept "10,20", "[10,20]" and "10-12".
  std::erase(str, '['); std::erase(str, ']'); std::erase(str, ' ');
  size_t pos = 0;
  while (pos < str.size()) {
    size_t comma = str.find(',', pos);
    std::string item = str.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    pos = comma == std::string::npos ? str.size() : comma + 1;
    if (item.empty()) continue;
    size_t dash = item.find('-');
    uint64_t lo = TRY(parse_u64(item.substr(0, dash), "VLAN"));
    uint64_t hi = dash == std::string::npos ? lo : TRY(parse_u64(item.substr(dash + 1), "VLAN"));
    if (hi > 4095 || lo > hi) return fail_invalid("bad VLAN range '{}'", item);
    for (uint64_t v = lo; v <= hi; ++v) out.push_back(uint16_t(v));
  }
  return out;
}

Result<MacAddress> parse_mac(const std::string& s) {
  MacAddress mac;
  unsigned b[6];
  char extra;
  if (std::sscanf(s.c_str(), "%x:%x:%x:%x:%x:%x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &extra) != 6)
    return fail_invalid("bad MAC address '{}'", s);
  for (int i = 0; i < 6; ++i) {
    if (b[i] > 255) return fail_invalid("bad MAC address '{}'", s);
    mac[size_t(i)] = uint8_t(b[i]);
  }
  return mac;
}

const std::vector<std::string> kPortTypes = {"system", "tap", "internal", "stream", "dgram", "vhostuser",
                                             "vhostuserclient"};

// type=vhostuser: the switch is the vhost-user server (OVS dpdkvhostuser), listening on
// options:socket-path or STATE_DIR/vhost-user/PORT; with options:vhost-server-path QEMU is the
// server and the switch connects to it (OVS dpdkvhostuserclient, also accepted as
// type=vhostuserclient). options:queue-pairs=N (default 1) is the most the guest may enable.
// options:offloads=false stops offering the guest checksum and TCP segmentation offload (on by
// default; as OVS's userspace-tso-enable, but per port).
Result<VhostUserPortOptions> vhost_user_options(const std::string& name, const std::string& type, const json& opts,
                                                const std::string& state_dir) {
  auto opt = [&](const char* k) { return opts.contains(k) ? opts[k].get<std::string>() : std::string(); };
  for (auto& [k, v] : opts.items())
    if (!v.is_string()) return fail_invalid("port {}: options:{} is not a string", name, k);
  VhostUserPortOptions o;
  std::string server_path = opt("vhost-server-path");
  std::string socket_path = opt("socket-path");
  if (!server_path.empty() && !socket_path.empty())
    return fail_invalid("port {}: options:vhost-server-path (QEMU listens) and options:socket-path (the switch "
                        "listens) exclude each other", name);
  if (type == "vhostuserclient" && server_path.empty())
    return fail_invalid("port {}: type=vhostuserclient needs options:vhost-server-path=SOCKET", name);
  if (!server_path.empty()) {
    o.mode = VhostSocketMode::Client;
    o.socket_path = server_path;
  } else if (!socket_path.empty()) {
    o.socket_path = socket_path;
  } else {
    // The port name becomes a file name.
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
      return fail_invalid("port {}: not usable as a socket name; give options:socket-path=PATH", name);
    o.socket_path = state_dir + "/vhost-user/" + name;
  }
  if (std::string n = opt("queue-pairs"); !n.empty()) {
    uint64_t pairs = TRY(parse_u64(n, "queue-pairs"));
    if (pairs < 1 || pairs > 128) return fail_invalid("port {}: queue-pairs {} out of range (1-128)", name, pairs);
    o.queue_pairs = uint16_t(pairs);
  }
  if (std::string v = opt("offloads"); !v.empty()) {
    if (v != "true" && v != "false") return fail_invalid("port {}: options:offloads={} (true or false)", name, v);
    o.offloads = v == "true";
  }
  return o;
}

}  // namespace

SwitchDaemon::SwitchDaemon(EventLoop& loop, std::string state_dir)
    : loop_(loop), state_dir_(std::move(state_dir)), config_(empty_config()) {}

SwitchDaemon::~SwitchDaemon() {
  if (control_.valid()) {
    loop_.remove_fd(control_.get());
    unlink(control_path_.c_str());
  }
  bridges_.clear();
}

Bridge* SwitchDaemon::bridge(const std::string& name) {
  auto it = bridges_.find(name);
  return it == bridges_.end() ? nullptr : it->second.bridge.get();
}

Result<void> SwitchDaemon::load() {
  mkdir(state_dir_.c_str(), 0755);
  std::string path = state_dir_ + "/config.json";
  if (access(path.c_str(), F_OK) != 0) return ok();
  std::string text = TRY(read_file(path));
  json parsed = json::parse(text, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("bridges") ||
      !parsed["bridges"].is_object())
    return fail_invalid("{}: not a keel-switch configuration", path);
  config_ = parsed;
  return reconcile(config_, nullptr);
}

Result<void> SwitchDaemon::save() {
  std::string path = state_dir_ + "/config.json";
  std::string tmp = path + ".tmp";
  TRY(write_file(tmp, config_.dump(2) + "\n"));
  if (rename(tmp.c_str(), path.c_str()) < 0) return fail_errno("rename " + tmp);
  return ok();
}

Result<std::string> SwitchDaemon::execute(const std::vector<std::string>& argv) {
  // Split on "--" into commands; all of them edit one copy of the configuration, applied at the end.
  std::vector<std::vector<std::string>> cmds(1);
  for (const auto& a : argv) {
    if (a == "--") cmds.emplace_back();
    else cmds.back().push_back(a);
  }
  json next = config_;
  std::string output;
  try {
    for (const auto& cmd : cmds) {
      if (cmd.empty()) continue;
      output += TRY(apply_command(next, cmd));
    }
  } catch (const json::exception& e) {
    return fail_invalid("configuration error: {}", e.what());
  }
  if (next != config_) {
    json previous = config_;
    auto r = reconcile(next, &config_);
    if (!r) {
      // Put the running state back as it was so the configuration and reality agree.
      (void)reconcile(previous, &previous);
      return tl::unexpected(r.error());
    }
    config_ = next;
    TRY(save());
  }
  return output;
}

Result<std::string> SwitchDaemon::apply_command(json& cfg, const std::vector<std::string>& cmd) {
  auto& bridges = cfg["bridges"];
  const std::string& op = cmd[0];
  auto need = [&](size_t n) -> Result<void> {
    if (cmd.size() < n + 1) return fail_invalid("{}: needs {} argument(s)", op, n);
    return ok();
  };
  auto find_port = [&](const std::string& port) -> json* {
    for (auto& [bname, b] : bridges.items())
      if (b["ports"].contains(port)) return &b["ports"][port];
    return nullptr;
  };
  auto need_bridge = [&](const std::string& name) -> Result<json*> {
    if (!bridges.contains(name)) return fail(ENOENT, fmt::format("no bridge named {}", name));
    return &bridges[name];
  };

  if (op == "add-br") {
    TRY(need(1));
    const std::string& name = cmd[1];
    if (bridges.contains(name)) return fail(EEXIST, fmt::format("a bridge named {} already exists", name));
    if (name.empty() || name.size() > 15) return fail_invalid("bridge name '{}' must be 1-15 characters", name);
    uint64_t dpid = 1;
    for (auto& [n, b] : bridges.items()) dpid = std::max<uint64_t>(dpid, b.value("datapath_id", uint64_t(0)) + 1);
    bridges[name] = json{{"datapath_id", dpid}, {"controllers", json::array()}, {"ports", json::object()},
                         {"mac_table_size", 8192}, {"mac_aging_time", 300}};
    return std::string();
  }
  if (op == "del-br") {
    TRY(need(1));
    TRY(need_bridge(cmd[1]));
    bridges.erase(cmd[1]);
    return std::string();
  }
  if (op == "list-br") {
    std::string out;
    for (auto& [n, b] : bridges.items()) out += n + "\n";
    return out;
  }
  if (op == "add-port") {
    TRY(need(2));
    json* b = TRY(need_bridge(cmd[1]));
    const std::string& port = cmd[2];
    if (find_port(port)) return fail(EEXIST, fmt::format("a port named {} already exists", port));
    // OpenFlow port numbers are given out in the order ports are added (the lowest free one), and kept.
    std::set<uint64_t> used;
    for (auto& [n, q] : (*b)["ports"].items()) used.insert(q.value("ofport", uint64_t(0)));
    uint64_t ofport = 1;
    while (used.count(ofport)) ++ofport;
    json p{{"type", "system"}, {"options", json::object()}, {"ofport", ofport}};
    // Trailing column=value pairs apply to the port (as ovs-vsctl allows).
    (*b)["ports"][port] = p;
    for (size_t i = 3; i < cmd.size(); ++i) {
      std::vector<std::string> set_cmd = {"set", "port", port, cmd[i]};
      TRY(apply_command(cfg, set_cmd));
    }
    return std::string();
  }
  if (op == "add-bond") {
    // add-bond BR PORT IFACE IFACE... [bond_mode=active-backup|balance-slb]
    TRY(need(4));
    json* b = TRY(need_bridge(cmd[1]));
    const std::string& port = cmd[2];
    if (find_port(port)) return fail(EEXIST, fmt::format("a port named {} already exists", port));
    json members = json::array();
    std::string mode = "active-backup";
    for (size_t i = 3; i < cmd.size(); ++i) {
      if (cmd[i].rfind("bond_mode=", 0) == 0) {
        mode = cmd[i].substr(10);
        TRY(parse_bond_mode(mode));
      } else {
        if (find_port(cmd[i])) return fail(EEXIST, fmt::format("{} is already a port", cmd[i]));
        members.push_back(cmd[i]);
      }
    }
    if (members.size() < 2) return fail_invalid("add-bond: a bond needs at least two interfaces");
    std::set<uint64_t> used;
    for (auto& [n, q] : (*b)["ports"].items()) used.insert(q.value("ofport", uint64_t(0)));
    uint64_t ofport = 1;
    while (used.count(ofport)) ++ofport;
    (*b)["ports"][port] = json{{"type", "bond"}, {"options", json::object()}, {"ofport", ofport},
                              {"members", members}, {"bond_mode", mode}};
    return std::string();
  }
  if (op == "bond/show") {
    TRY(need(2));
    Bridge* br = bridge(cmd[1]);
    BridgePort* bp = br ? br->port_by_name(cmd[2]) : nullptr;
    auto* bond = bp ? dynamic_cast<BondPort*>(bp->port.get()) : nullptr;
    if (!bond) return fail(ENOENT, fmt::format("no bond {} on {}", cmd[2], cmd[1]));
    bond->monitor();
    std::string out = fmt::format("---- {} ----\nbond_mode: {}\n", cmd[2], bond_mode_name(bond->mode()));
    for (size_t i = 0; i < bond->members().size(); ++i) {
      const auto& m = bond->members()[i];
      out += fmt::format("\nmember {}: {}{}\n", m.name, m.up ? "enabled" : "disabled",
                         int(i) == bond->active() ? "\n  active member" : "");
    }
    return out;
  }
  if (op == "add-mirror") {
    // add-mirror BR NAME [select-src-port=P,..] [select-dst-port=P,..] [select-all=true]
    //                    (output-port=P | output-vlan=N)
    TRY(need(2));
    json* b = TRY(need_bridge(cmd[1]));
    json m{{"select_src_port", json::array()}, {"select_dst_port", json::array()}, {"select_all", false}};
    for (size_t i = 3; i < cmd.size(); ++i) {
      auto eq = cmd[i].find('=');
      if (eq == std::string::npos) return fail_invalid("add-mirror: expected key=value, got '{}'", cmd[i]);
      std::string k = cmd[i].substr(0, eq), v = cmd[i].substr(eq + 1);
      auto names = [&]() -> Result<json> {
        json arr = json::array();
        size_t pos = 0;
        while (pos <= v.size()) {
          size_t comma = v.find(',', pos);
          std::string n = v.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
          if (!n.empty()) {
            if (!(*b)["ports"].contains(n)) return fail(ENOENT, fmt::format("no port named {} on {}", n, cmd[1]));
            arr.push_back(n);
          }
          if (comma == std::string::npos) break;
          pos = comma + 1;
        }
        return arr;
      };
      if (k == "select-src-port" || k == "select_src_port") m["select_src_port"] = TRY(names());
      else if (k == "select-dst-port" || k == "select_dst_port") m["select_dst_port"] = TRY(names());
      else if (k == "select-all" || k == "select_all") m["select_all"] = v == "true";
      else if (k == "output-port" || k == "output_port") {
        json one = TRY(names());
        if (one.size() != 1) return fail_invalid("add-mirror: output-port takes one port");
        m["output_port"] = one[0];
      } else if (k == "output-vlan" || k == "output_vlan") {
        uint64_t vlan = TRY(parse_u64(v, "output-vlan"));
        if (vlan == 0 || vlan > 4095) return fail_invalid("output-vlan {} out of range", vlan);
        m["output_vlan"] = vlan;
      } else {
        return fail_invalid("add-mirror: unknown key '{}'", k);
      }
    }
    if (m.contains("output_port") == m.contains("output_vlan"))
      return fail_invalid("add-mirror: give exactly one of output-port and output-vlan");
    (*b)["mirrors"][cmd[2]] = m;
    return std::string();
  }
  if (op == "del-mirror") {
    TRY(need(2));
    json* b = TRY(need_bridge(cmd[1]));
    if (!b->contains("mirrors") || !(*b)["mirrors"].contains(cmd[2]))
      return fail(ENOENT, fmt::format("no mirror named {}", cmd[2]));
    (*b)["mirrors"].erase(cmd[2]);
    return std::string();
  }
  if (op == "list-mirrors") {
    TRY(need(1));
    TRY(need_bridge(cmd[1]));
    std::string out;
    if (Bridge* br = bridge(cmd[1]))
      for (const Mirror& m : br->mirrors())
        out += fmt::format("{}: tx_packets={} tx_bytes={}\n", m.name, m.packets, m.bytes);
    return out;
  }
  if (op == "set-netflow") {
    // set-netflow BR targets=IP:PORT [active-timeout=S] [inactive-timeout=S] [engine-type=N] [engine-id=N]
    TRY(need(2));
    json* b = TRY(need_bridge(cmd[1]));
    json nf{{"active_timeout", 60}, {"inactive_timeout", 15}, {"engine_type", 0}, {"engine_id", 0}};
    for (size_t i = 2; i < cmd.size(); ++i) {
      auto eq = cmd[i].find('=');
      if (eq == std::string::npos) return fail_invalid("set-netflow: expected key=value, got '{}'", cmd[i]);
      std::string k = cmd[i].substr(0, eq), v = cmd[i].substr(eq + 1);
      std::replace(k.begin(), k.end(), '_', '-');
      if (k == "targets") nf["target"] = v;
      else if (k == "active-timeout") nf["active_timeout"] = TRY(parse_u64(v, k));
      else if (k == "inactive-timeout") nf["inactive_timeout"] = TRY(parse_u64(v, k));
      else if (k == "engine-type") nf["engine_type"] = std::min<uint64_t>(255, TRY(parse_u64(v, k)));
      else if (k == "engine-id") nf["engine_id"] = std::min<uint64_t>(255, TRY(parse_u64(v, k)));
      else return fail_invalid("set-netflow: unknown key '{}'", k);
    }
    if (!nf.contains("target")) return fail_invalid("set-netflow: targets=IP:PORT is required");
    (*b)["netflow"] = nf;
    return std::string();
  }
  if (op == "clear-netflow") {
    TRY(need(1));
    json* b = TRY(need_bridge(cmd[1]));
    b->erase("netflow");
    return std::string();
  }
  if (op == "del-port") {
    TRY(need(1));
    const std::string& port = cmd.size() >= 3 ? cmd[2] : cmd[1];
    for (auto& [n, b] : bridges.items())
      if (b["ports"].contains(port)) {
        b["ports"].erase(port);
        // Mirrors that named the port forget it; one whose output it was goes away.
        if (b.contains("mirrors")) {
          std::vector<std::string> dead;
          for (auto& [mn, m] : b["mirrors"].items()) {
            for (const char* key : {"select_src_port", "select_dst_port"}) {
              json kept = json::array();
              for (auto& x : m[key])
                if (x != port) kept.push_back(x);
              m[key] = kept;
            }
            if (m.value("output_port", std::string()) == port) dead.push_back(mn);
          }
          for (auto& d : dead) b["mirrors"].erase(d);
        }
        return std::string();
      }
    return fail(ENOENT, fmt::format("no port named {}", port));
  }
  if (op == "list-ports") {
    TRY(need(1));
    json* b = TRY(need_bridge(cmd[1]));
    std::string out;
    for (auto& [n, p] : (*b)["ports"].items()) out += n + "\n";
    return out;
  }
  if (op == "set-controller") {
    TRY(need(1));
    json* b = TRY(need_bridge(cmd[1]));
    (*b)["controllers"] = json::array();
    for (size_t i = 2; i < cmd.size(); ++i) (*b)["controllers"].push_back(cmd[i]);
    return std::string();
  }
  if (op == "del-controller") {
    TRY(need(1));
    json* b = TRY(need_bridge(cmd[1]));
    (*b)["controllers"] = json::array();
    return std::string();
  }
  if (op == "get-controller") {
    TRY(need(1));
    json* b = TRY(need_bridge(cmd[1]));
    std::string out;
    for (auto& c : (*b)["controllers"]) out += c.get<std::string>() + "\n";
    return out;
  }
  if (op == "set" || op == "clear" || op == "remove") {
    // set port|interface NAME key=value... ; set bridge NAME key=value...
    TRY(need(2));
    const std::string& table = cmd[1];
    const std::string& name = cmd[2];
    json* target = nullptr;
    if (table == "port" || table == "interface" || table == "Port" || table == "Interface") {
      target = find_port(name);
      if (!target) return fail(ENOENT, fmt::format("no port named {}", name));
    } else if (table == "bridge" || table == "Bridge") {
      target = TRY(need_bridge(name));
    } else {
      return fail_invalid("set: unknown table '{}'", table);
    }
    for (size_t i = 3; i < cmd.size(); ++i) {
      const std::string& kv = cmd[i];
      auto eq = kv.find('=');
      std::string key = op == "set" ? kv.substr(0, eq) : kv;
      std::string value = op == "set" && eq != std::string::npos ? kv.substr(eq + 1) : "";
      if (op == "set" && eq == std::string::npos) return fail_invalid("set: expected key=value, got '{}'", kv);
      if (value.size() >= 2 && value.front() == '"' && value.back() == '"') value = value.substr(1, value.size() - 2);
      bool clear = op != "set";
      if (key.rfind("options:", 0) == 0) {
        if (clear) (*target)["options"].erase(key.substr(8));
        else (*target)["options"][key.substr(8)] = value;
      } else if (key.rfind("other_config:", 0) == 0 || key.rfind("other-config:", 0) == 0) {
        std::string k = key.substr(13);
        if (k == "mac-table-size") (*target)["mac_table_size"] = clear ? 8192 : TRY(parse_u64(value, k));
        else if (k == "mac-aging-time") (*target)["mac_aging_time"] = clear ? 300 : TRY(parse_u64(value, k));
        else if (k == "datapath-id") (*target)["datapath_id"] = TRY(parse_u64(value, k, 16));
        else if (k == "hwaddr") {
          TRY(parse_mac(value));
          (*target)["hwaddr"] = value;
        }
        else return fail_invalid("unsupported other_config key '{}'", k);
      } else if (key == "type") {
        if (std::find(kPortTypes.begin(), kPortTypes.end(), value) == kPortTypes.end() && !clear)
          return fail_invalid("unknown interface type '{}'", value);
        (*target)["type"] = clear || value.empty() ? "system" : value;
      } else if (key == "tag") {
        if (clear || value.empty() || value == "[]") (*target).erase("tag");
        else {
          uint64_t tag = TRY(parse_u64(value, "tag"));
          if (tag > 4095) return fail_invalid("tag {} out of range", tag);
          (*target)["tag"] = tag;
        }
      } else if (key == "trunks") {
        if (clear) (*target).erase("trunks");
        else (*target)["trunks"] = TRY(parse_vlan_list(value));
      } else if (key == "ofport_request") {
        if (!clear) {
          uint64_t req = TRY(parse_u64(value, "ofport_request"));
          if (req == 0 || req >= 0xff00) return fail_invalid("ofport_request {} out of range", req);
          for (auto& [bn, b] : bridges.items())
            for (auto& [pn, q] : b["ports"].items())
              if (&q != target && q.value("ofport", uint64_t(0)) == req)
                return fail(EEXIST, fmt::format("OpenFlow port {} is already used by {}", req, pn));
          (*target)["ofport"] = req;
        }
      } else if (key == "ingress_policing_rate" || key == "ingress_policing_burst") {
        (*target)[key] = clear ? 0 : TRY(parse_u64(value, key));
      } else {
        return fail_invalid("unsupported column '{}'", key);
      }
    }
    return std::string();
  }
  if (op == "show") return show(cfg);
  if (op == "fdb/show" || op == "fdb-show") {
    TRY(need(1));
    TRY(need_bridge(cmd[1]));
    Bridge* br = bridge(cmd[1]);
    std::string out = " port  VLAN  MAC                Age\n";
    if (!br) return out;
    struct Row { uint32_t port; uint16_t vlan; std::string mac; long age; };
    std::vector<Row> rows;
    auto now = Clock::now();
    br->mac_table().for_each([&](uint16_t vlan, const MacAddress& mac, uint32_t port, Clock::time_point seen) {
      rows.push_back({port, vlan, format_mac(mac),
                      long(std::chrono::duration_cast<std::chrono::seconds>(now - seen).count())});
    });
    std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
      return std::tie(a.port, a.vlan, a.mac) < std::tie(b.port, b.vlan, b.mac);
    });
    for (const auto& r : rows) {
      std::string port = r.port == OFPP_LOCAL ? "LOCAL" : std::to_string(r.port);
      out += fmt::format("{:>5}  {:>4}  {}  {:>3}\n", port, r.vlan, r.mac, r.age);
    }
    return out;
  }
  if (op == "fdb/flush") {
    TRY(need(1));
    if (Bridge* br = bridge(cmd[1])) br->mac_table().clear();
    return std::string();
  }
  if (op == "port-stats") {
    TRY(need(1));
    Bridge* br = bridge(cmd[1]);
    if (!br) return fail(ENOENT, fmt::format("no bridge named {}", cmd[1]));
    std::string out;
    for (BridgePort* p : br->ports()) {
      p->port->sync_counters();
      const auto& k = p->port->counters;
      out += fmt::format("{} ({}): rx_packets={} rx_bytes={} rx_dropped={} tx_packets={} tx_bytes={} tx_dropped={}\n",
                         p->name, p->ofport == OFPP_LOCAL ? "LOCAL" : std::to_string(p->ofport), k.rx_packets,
                         k.rx_bytes, k.rx_dropped, k.tx_packets, k.tx_bytes, k.tx_dropped);
    }
    return out;
  }
  return fail_invalid("unknown command '{}'", op);
}

std::string SwitchDaemon::show(const json& cfg) {
  std::string out;
  for (auto& [name, b] : cfg["bridges"].items()) {
    out += fmt::format("    Bridge {}\n", name);
    for (auto& c : b["controllers"]) out += fmt::format("        Controller \"{}\"\n", c.get<std::string>());
    if (b.contains("netflow"))
      out += fmt::format("        NetFlow \"{}\" (active {}s, inactive {}s)\n", b["netflow"]["target"].get<std::string>(),
                         b["netflow"]["active_timeout"].get<int>(), b["netflow"]["inactive_timeout"].get<int>());
    json mirrors = b.value("mirrors", json::object());
    for (auto& [mn, m] : mirrors.items())
      out += fmt::format("        Mirror {}: {}\n", mn, m.dump());
    for (auto& [pname, p] : b["ports"].items()) {
      out += fmt::format("        Port {}\n", pname);
      if (p.contains("tag")) out += fmt::format("            tag: {}\n", p["tag"].get<int>());
      if (p.contains("trunks")) {
        std::vector<std::string> t;
        for (auto& v : p["trunks"]) t.push_back(std::to_string(v.get<int>()));
        out += fmt::format("            trunks: [{}]\n", fmt::join(t, ", "));
      }
      std::string type = p.value("type", "system");
      if (type == "bond") {
        out += fmt::format("            bond_mode: {}\n", p.value("bond_mode", "active-backup"));
        for (auto& m : p["members"]) out += fmt::format("            Interface {}\n", m.get<std::string>());
        continue;
      }
      out += fmt::format("            Interface {}\n", pname);
      if (type != "system") out += fmt::format("                type: {}\n", type);
      if (type == "vhostuser" || type == "vhostuserclient") {
        // Where QEMU's -chardev socket must point (the switch listens) or what the switch connects to.
        auto o = vhost_user_options(pname, type, p["options"], state_dir_);
        if (o) out += fmt::format("                {}: {}\n", o->mode == VhostSocketMode::Server ? "socket" : "vhost-server-path",
                                  o->socket_path);
      }
      if (!p["options"].empty()) {
        std::vector<std::string> opts;
        for (auto& [k, v] : p["options"].items()) opts.push_back(k + "=" + v.get<std::string>());
        out += fmt::format("                options: {{{}}}\n", fmt::join(opts, ", "));
      }
    }
  }
  return out;
}

namespace {

Result<std::unique_ptr<Port>> open_port(const std::string& name, const json& p, const std::string& state_dir) {
  std::string type = p.value("type", "system");
  const json& opts = p["options"];
  auto opt = [&](const char* k) { return opts.contains(k) ? opts[k].get<std::string>() : std::string(); };
  if (type == "system") return open_afpacket_port(name);
  if (type == "tap") return open_tap_port(name, LinkState::Up);
  // Internal ports stay down until the operator brings them up, as Open vSwitch's do.
  if (type == "internal") return open_tap_port(name, LinkState::LeaveDown, TapLifetime::Persistent);
  if (type == "stream" || type == "dgram") {
    std::string path = opt("path");
    if (path.empty()) return fail_invalid("port {}: type={} needs options:path=SOCKET", name, type);
    return open_socket_port(path, type == "stream" ? SocketFraming::Stream : SocketFraming::Dgram);
  }
  if (type == "bond") {
    std::vector<BondPort::Member> members;
    for (auto& m : p["members"]) {
      std::string iface = m.get<std::string>();
      auto port = TRY_CTX(open_afpacket_port(iface), "bond member " + iface);
      members.push_back({iface, std::move(port), false});
    }
    auto bond = TRY(BondPort::create(TRY(parse_bond_mode(p.value("bond_mode", "active-backup"))), std::move(members)));
    return std::unique_ptr<Port>(std::move(bond));
  }
  if (type == "vhostuser" || type == "vhostuserclient") {
    VhostUserPortOptions o = TRY(vhost_user_options(name, type, opts, state_dir));
    if (o.mode == VhostSocketMode::Server) {
      // The default socket directory is made on demand; an explicit path's directory must exist.
      std::string dir = state_dir + "/vhost-user";
      if (o.socket_path.rfind(dir + "/", 0) == 0 && mkdir(dir.c_str(), 0755) < 0 && errno != EEXIST)
        return fail_errno("mkdir " + dir);
    }
    return open_vhost_user_port(o);
  }
  return fail_invalid("port {}: unknown type {}", name, type);
}

// Internal ports' taps persist across keel-switch restarts (see TapLifetime); deleting the port or
// its bridge deletes the tap.
void delete_internal_tap(const std::string& name) {
  if (auto r = delete_persistent_tap(name); !r) KEEL_LOG_WARN("delete internal port {}: {}", name, r.error().message());
}

}  // namespace

Result<void> SwitchDaemon::reconcile(const json& config, const json* known) {
  known_given_ = known != nullptr;
  const auto& want = config["bridges"];
  for (auto it = bridges_.begin(); it != bridges_.end();) {
    if (!want.contains(it->first)) {
      KEEL_LOG_INFO("removing bridge {}", it->first);
      std::vector<std::string> internal_taps = {it->first};
      for (auto& [port, p] : it->second.applied["ports"].items())
        if (p.value("type", "") == "internal") internal_taps.push_back(port);
      it = bridges_.erase(it);  // closes the ports first
      for (const auto& tap : internal_taps) delete_internal_tap(tap);
    } else {
      ++it;
    }
  }
  for (auto& [name, b] : want.items()) {
    auto it = bridges_.find(name);
    if (it == bridges_.end()) {
      LiveBridge lb;
      lb.bridge = std::make_unique<Bridge>(loop_, name, b.value("datapath_id", uint64_t(1)));
      lb.agent = std::make_unique<OfAgent>(*lb.bridge);
      // Like Open vSwitch: a new bridge is a learning switch until someone programs it.
      FlowMod normal;
      normal.priority = 0;
      Action out;
      out.type = ActionType::Output;
      out.arg = OFPP_NORMAL;
      normal.instructions.has_apply = true;
      normal.instructions.apply.push_back(out);
      (void)lb.bridge->apply_flow_mod(normal);
      // The bridge's own internal port (OpenFlow LOCAL), as the host's interface to it.
      auto local = open_tap_port(name, LinkState::LeaveDown, TapLifetime::Persistent);
      if (local && b.contains("hwaddr")) {
        auto mac = parse_mac(b["hwaddr"].get<std::string>());
        if (mac) (void)set_interface_mac(name, *mac);
      }
      if (local) (void)lb.bridge->add_port(name, "internal", std::move(*local), OFPP_LOCAL);
      else KEEL_LOG_WARN("bridge {}: no internal port: {}", name, local.error().message());
      lb.applied = json{{"ports", json::object()}, {"controllers", json::array()}};
      it = bridges_.emplace(name, std::move(lb)).first;
    }
    const json* known_bridge = nullptr;
    if (known && (*known)["bridges"].contains(name)) known_bridge = &(*known)["bridges"][name];
    TRY(reconcile_bridge(it->second, b, known ? known_bridge : nullptr));
  }
  return ok();
}

Result<void> SwitchDaemon::reconcile_bridge(LiveBridge& lb, const json& want, const json* known) {
  Bridge& br = *lb.bridge;
  br.mac_table().set_limits(want.value("mac_table_size", size_t(8192)),
                            std::chrono::seconds(want.value("mac_aging_time", 300)));
  if (want["controllers"] != lb.applied["controllers"]) {
    std::vector<std::string> targets;
    for (auto& c : want["controllers"]) targets.push_back(c.get<std::string>());
    TRY(lb.agent->set_targets(targets));
    lb.applied["controllers"] = want["controllers"];
  }
  auto& applied_ports = lb.applied["ports"];
  std::vector<std::string> gone;
  for (auto& [name, p] : applied_ports.items())
    if (!want["ports"].contains(name)) gone.push_back(name);
  for (const auto& name : gone) {
    (void)br.remove_port(name);
    if (applied_ports[name].value("type", "") == "internal") delete_internal_tap(name);
    applied_ports.erase(name);
  }
  for (auto& [name, p] : want["ports"].items()) {
    bool exists = applied_ports.contains(name);
    if (exists && (applied_ports[name]["type"] != p["type"] || applied_ports[name]["options"] != p["options"] ||
                   applied_ports[name].value("members", json()) != p.value("members", json()) ||
                   applied_ports[name].value("bond_mode", json()) != p.value("bond_mode", json()) ||
                   applied_ports[name].value("ofport", 0) != p.value("ofport", 0))) {
      (void)br.remove_port(name);
      if (applied_ports[name].value("type", "") == "internal" && p.value("type", "") != "internal")
        delete_internal_tap(name);
      applied_ports.erase(name);
      exists = false;
    }
    if (!exists) {
      // At start-up (no `known`) every port is an old one.
      bool old = !known_given_ || (known && (*known)["ports"].contains(name) && (*known)["ports"][name] == p);
      auto port = open_port(name, p, state_dir_);
      if (port) {
        auto added = br.add_port(name, p.value("type", "system"), std::move(*port), p.value("ofport", 0u));
        if (!added && !old) return tl::unexpected(added.error());
        if (!added) KEEL_LOG_WARN("{}: port {}: {}", br.name(), name, added.error().message());
      } else if (!old) {
        return tl::unexpected(port.error().with_context("add port " + name));
      } else {
        KEEL_LOG_WARN("{}: port {} is configured but cannot be opened (will retry on the next change): {}",
                      br.name(), name, port.error().message());
        continue;
      }
    }
    BridgePort* bp = br.port_by_name(name);
    if (!bp) continue;
    PortVlan vlan;
    if (p.contains("tag")) vlan.tag = p["tag"].get<uint16_t>();
    if (p.contains("trunks")) vlan.trunks = p["trunks"].get<std::vector<uint16_t>>();
    if (!exists || applied_ports[name].value("tag", -1) != p.value("tag", -1) ||
        applied_ports[name].value("trunks", json::array()) != p.value("trunks", json::array()))
      br.set_port_vlan(*bp, vlan);
    uint64_t rate = p.value("ingress_policing_rate", uint64_t(0));
    uint64_t burst = p.value("ingress_policing_burst", uint64_t(0));
    if (!exists || applied_ports[name].value("ingress_policing_rate", uint64_t(0)) != rate ||
        applied_ports[name].value("ingress_policing_burst", uint64_t(0)) != burst)
      br.set_port_policer(*bp, rate, burst);
    applied_ports[name] = p;
  }
  json mirrors = want.value("mirrors", json::object());
  if (mirrors != lb.applied.value("mirrors", json::object()) || !gone.empty()) {
    std::vector<Mirror> live;
    auto ofport_of = [&](const json& n) -> uint32_t {
      BridgePort* bp = br.port_by_name(n.get<std::string>());
      return bp ? bp->ofport : 0;
    };
    for (auto& [mname, m] : mirrors.items()) {
      Mirror mm;
      mm.name = mname;
      mm.select_all = m.value("select_all", false);
      for (auto& n : m["select_src_port"]) mm.select_src.push_back(ofport_of(n));
      for (auto& n : m["select_dst_port"]) mm.select_dst.push_back(ofport_of(n));
      if (m.contains("output_port")) mm.output_port = ofport_of(m["output_port"]);
      if (m.contains("output_vlan")) mm.output_vlan = m["output_vlan"].get<uint16_t>();
      live.push_back(std::move(mm));
    }
    br.set_mirrors(std::move(live));
    lb.applied["mirrors"] = mirrors;
  }
  json nf = want.value("netflow", json());
  if (nf != lb.applied.value("netflow", json())) {
    if (nf.is_null()) {
      br.set_netflow(nullptr);
    } else {
      auto exporter = TRY(NetFlowExporter::create(nf["target"].get<std::string>(),
                                                  std::chrono::seconds(nf.value("active_timeout", 60)),
                                                  std::chrono::seconds(nf.value("inactive_timeout", 15)),
                                                  nf.value("engine_type", uint8_t(0)), nf.value("engine_id", uint8_t(0))));
      br.set_netflow(std::move(exporter));
    }
    lb.applied["netflow"] = nf;
  }
  return ok();
}

// ---------------------------------------------------------------------------------------------------
// Control socket: one request per connection. Request: {"argv": [...]}; response:
// {"ok": true, "output": "..."} or {"ok": false, "error": "..."}, each a single JSON line.

Result<void> SwitchDaemon::listen_control(const std::string& path) {
  sockaddr_un sun{};
  if (path.empty() || path.size() >= sizeof sun.sun_path) return fail_invalid("bad control socket path '{}'", path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return fail_errno("socket");
  control_.reset(fd);
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, path.c_str(), path.size());
  unlink(path.c_str());
  if (bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) < 0) return fail_errno("bind " + path);
  chmod(path.c_str(), 0600);
  if (listen(fd, 16) < 0) return fail_errno("listen " + path);
  control_path_ = path;
  TRY(loop_.add_fd(fd, EPOLLIN, [this](uint32_t) {
    for (;;) {
      int c = accept4(control_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) return;
      on_control_client(c);
    }
  }));
  return ok();
}

void SwitchDaemon::on_control_client(int raw) {
  UniqueFd fd(raw);
  // Requests are small; a client gets 2 seconds to send one (blocking reads with a timeout keep this
  // simple, and the control plane is never on the datapath's fast path).
  timeval tv{2, 0};
  setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string req;
  char buf[4096];
  while (req.find('\n') == std::string::npos && req.size() < (1 << 20)) {
    ssize_t n = read(fd.get(), buf, sizeof buf);
    if (n <= 0) break;
    req.append(buf, size_t(n));
  }
  json resp;
  json parsed = json::parse(req, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("argv") || !parsed["argv"].is_array()) {
    resp = {{"ok", false}, {"error", "malformed request"}};
  } else {
    std::vector<std::string> argv;
    bool good = true;
    for (auto& a : parsed["argv"]) {
      if (!a.is_string()) good = false;
      else argv.push_back(a.get<std::string>());
    }
    if (!good) {
      resp = {{"ok", false}, {"error", "argv must be strings"}};
    } else {
      auto r = execute(argv);
      if (r) resp = {{"ok", true}, {"output", *r}};
      else resp = {{"ok", false}, {"error", r.error().message()}};
    }
  }
  std::string out = resp.dump() + "\n";
  (void)write_all(fd.get(), out.data(), out.size());
}

}  // namespace keel::sw
