// Networks: a bridge per network with dnsmasq (Debian's dnsmasq-base, as libvirt uses) for DHCP
// and DNS, and tap devices for guest NICs. Two backends:
//  - switch (default when keel-switch is found): one keel-switch daemon per host; a network is a
//    keel-switch bridge whose internal port (a tap named like the bridge) carries the host address.
//    A guest NIC is a vhost-user port (the default, `keeld --switch-nic vhost-user`: QEMU listens on
//    a socket in the VM's runtime dir, keel-switch connects and copies frames straight between guest
//    memories) or a tap that keel-switch reads with AF_PACKET (`--switch-nic tap`; port type=system:
//    QEMU holds the tap's only queue, so the switch cannot open it as type=tap).
//  - bridge: a Linux bridge per network, guest taps enslaved to it.
//
// Modes: "isolated" (guests and host only), "routed" (the host forwards, no NAT), "nat" (routed and
// masqueraded with iptables, when iptables exists). Networks start lazily, when a guest needs one.
// Bridge, taps and dnsmasq outlive keeld, like the guests that use them.
#pragma once

#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "hostd/state_store.h"

namespace keel::hostd {

struct NetworkDef {
  std::string name;
  std::string bridge;         // Linux interface name, at most 15 characters
  std::string mode = "isolated";
  std::string address;        // host address on the bridge, e.g. 10.77.0.1
  int prefix = 24;
  std::string dhcp_start;     // empty: no DHCP
  std::string dhcp_end;
};

Result<NetworkDef> network_from_json(const nlohmann::json& j);
nlohmann::json network_to_json(const NetworkDef& d);

// Where keeld finds and keeps its keel-switch daemon.
struct SwitchBackend {
  std::string switch_binary;   // keel-switch
  std::string ctl_binary;      // keel-switch-ctl
  std::string state_dir;       // keel-switch --state-dir
  std::string ctl_socket;      // keel-switch --ctl-socket
  bool vhost_user_nics = true; // guest NICs as vhost-user ports (else taps)
};

// A switch port's frame counters, as the switch sees them (rx = from the guest).
struct PortCounters {
  uint64_t rx_bytes = 0, rx_packets = 0, tx_bytes = 0, tx_packets = 0;
};

// `port`'s counters from `keel-switch-ctl port-stats BRIDGE` output; ENOENT when it is not listed.
Result<PortCounters> parse_port_stats(std::string_view text, std::string_view port);

class Networks {
public:
  Networks(StateStore& store, std::string run_dir);

  // Puts networks on keel-switch instead of Linux bridges (call before any network starts).
  void use_switch(SwitchBackend sw) { switch_ = std::move(sw); }
  bool on_switch() const { return !switch_.switch_binary.empty(); }
  std::string backend_name() const { return on_switch() ? "switch" : "bridge"; }
  // Guest NICs on networks become vhost-user ports (keel-switch with --switch-nic vhost-user).
  bool vhost_user_nics() const { return on_switch() && switch_.vhost_user_nics; }

  Result<void> ensure_default();
  Result<nlohmann::json> list();
  Result<void> define(const NetworkDef& def);
  Result<void> undefine(const std::string& name);
  Result<void> start(const std::string& name);   // idempotent
  Result<void> stop(const std::string& name);
  Result<nlohmann::json> leases(const std::string& name);

  // A tap on the network's bridge (the network is started if needed), owned by `uid` so an
  // unprivileged QEMU can open it.
  Result<std::string> create_tap(const std::string& network, const std::string& tap_name, int uid);
  Result<std::string> create_bridge_tap(const std::string& bridge, const std::string& tap_name, int uid);
  // A vhost-user port named `port` on the network's keel-switch bridge (the network is started if
  // needed); the switch connects to `socket`, where QEMU listens, and reconnects while it is away.
  Result<void> add_vhost_user_port(const std::string& network, const std::string& port, const std::string& socket);
  // Deletes a guest NIC's switch port and tap (whichever exist).
  void delete_tap(const std::string& tap_name);
  // Counters of a guest NIC's port on the network's keel-switch bridge.
  Result<PortCounters> port_counters(const std::string& network, const std::string& port);

private:
  Result<NetworkRecord> get(const std::string& name);
  bool link_exists(const std::string& ifname) const;
  std::string dir(const std::string& name) const { return run_dir_ + "/net-" + name; }
  bool switch_reachable() const;
  Result<void> ensure_switch();
  Result<std::string> run_ctl(const std::vector<std::string>& args);
  Result<bool> switch_has_bridge(const std::string& bridge);

  StateStore& store_;
  std::string run_dir_;
  std::mutex mutex_;
  SwitchBackend switch_;
};

}  // namespace keel::hostd
