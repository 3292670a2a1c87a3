// Bridge: one switch instance. It owns its ports, its OpenFlow flow tables and groups (the ofproto
// side: flow-mod semantics, statistics, timeouts, PACKET_IN/FLOW_REMOVED/PORT_STATUS), the NORMAL
// learning switch, and the datapath that moves frames between ports.
//
// Datapath: ports are polled on the bridge's EventLoop; each readiness event pulls one batch. Each
// frame's key is looked up in an exact-match cache of pipeline decisions; only misses walk the flow
// tables (tuple space search) and compile a decision: a flat list of datapath operations plus the
// rules and groups whose counters the frame bumps. Any change to flows, groups or ports bumps a
// generation number that invalidates the cache. NORMAL stays an operation executed per frame (MAC
// table lookup), so learning never needs to invalidate cached decisions.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "base/event_loop.h"
#include "base/result.h"
#include "switch/classifier.h"
#include "switch/meter.h"
#include "switch/netflow.h"
#include "switch/openflow.h"
#include "switch/port.h"

namespace keel::sw {

class OfConnection;

using Clock = std::chrono::steady_clock;

// 802.1Q behaviour of a port, as ovs-vsctl's tag/trunks: tag only = access port; trunks only (or
// neither) = trunk carrying the listed VLANs (all when empty) and untagged frames as VLAN 0; both =
// trunk whose native VLAN `tag` travels untagged.
struct PortVlan {
  std::optional<uint16_t> tag;
  std::vector<uint16_t> trunks;
};

struct Policer {
  uint64_t rate_kbps = 0;   // 0 = no policing
  uint64_t burst_kb = 0;
  double tokens_bits = 0;
  Clock::time_point last{};
};

struct BridgePort {
  uint32_t ofport = 0;
  std::string name;
  std::string type;
  std::unique_ptr<Port> port;
  PortVlan vlan;
  Policer policer;
  uint32_t config = 0;  // OFPPC_* (1.3 numbering)
  bool live = true;
  Clock::time_point created = Clock::now();
  int registered_fd = -1;
};

// Port mirroring: copies of frames received on select_src ports and/or sent on select_dst ports (or
// all ports) go to output_port (SPAN) or, tagged with output_vlan, to every port carrying that VLAN
// (RSPAN). Mirror output ports take no part in normal switching.
struct Mirror {
  std::string name;
  bool select_all = false;
  std::vector<uint32_t> select_src, select_dst;  // OpenFlow port numbers
  uint32_t output_port = 0;                     // 0: none
  std::optional<uint16_t> output_vlan;
  uint64_t packets = 0, bytes = 0;
};

struct Rule : ClsRule {
  uint8_t table_id = 0;
  uint64_t cookie = 0;
  uint16_t idle_timeout = 0, hard_timeout = 0, flags = 0;
  Instructions instructions;
  Clock::time_point created{}, last_used{};
  uint64_t packets = 0, bytes = 0;
};

struct Group {
  uint32_t id = 0;
  uint8_t type = 0;
  std::vector<Bucket> buckets;
  std::vector<std::pair<uint64_t, uint64_t>> bucket_counts;  // packets, bytes
  uint64_t packets = 0, bytes = 0;
  Clock::time_point created{};
};

struct FlowTableStats {
  uint64_t lookups = 0, matched = 0;
};

// MAC learning for NORMAL: (VLAN, MAC) -> port, with ageing and a size limit.
class MacTable {
public:
  struct Entry {
    uint32_t ofport;
    Clock::time_point seen;
  };
  void learn(uint16_t vlan, const uint8_t* mac, uint32_t ofport, Clock::time_point now);
  std::optional<uint32_t> lookup(uint16_t vlan, const uint8_t* mac) const;
  void expire(Clock::time_point now);
  void flush_port(uint32_t ofport);
  void clear() { entries_.clear(); }
  size_t size() const { return entries_.size(); }
  void set_limits(size_t max_entries, std::chrono::seconds ageing) {
    max_entries_ = max_entries;
    ageing_ = ageing;
  }
  std::chrono::seconds ageing() const { return ageing_; }
  // (vlan, mac, port, age) rows for fdb/show.
  void for_each(const std::function<void(uint16_t, const MacAddress&, uint32_t, Clock::time_point)>& fn) const;

private:
  static uint64_t key(uint16_t vlan, const uint8_t* mac);
  std::unordered_map<uint64_t, Entry> entries_;
  size_t max_entries_ = 8192;
  std::chrono::seconds ageing_{300};
};

// When any bridge of this process last received a batch of frames. The daemon's main loop polls
// rather than sleeps for a short while after it (see keel_switch_main.cc).
std::chrono::steady_clock::time_point last_datapath_input();

class Bridge {
public:
  Bridge(EventLoop& loop, std::string name, uint64_t datapath_id);
  ~Bridge();
  Bridge(const Bridge&) = delete;
  Bridge& operator=(const Bridge&) = delete;

  const std::string& name() const { return name_; }
  uint64_t datapath_id() const { return datapath_id_; }
  EventLoop& loop() { return loop_; }

  // Ports. ofport_request 0 picks the lowest free number; OFPP_LOCAL is the bridge's internal port.
  Result<uint32_t> add_port(const std::string& name, const std::string& type, std::unique_ptr<Port> port,
                            uint32_t ofport_request = 0);
  Result<void> remove_port(const std::string& name);
  BridgePort* port_by_name(const std::string& name);
  BridgePort* port_by_ofport(uint32_t ofport);
  std::vector<BridgePort*> ports();  // sorted by ofport
  void set_port_vlan(BridgePort& port, PortVlan vlan);
  void set_port_policer(BridgePort& port, uint64_t rate_kbps, uint64_t burst_kb);

  MacTable& mac_table() { return mac_table_; }

  // Operator features.
  void set_mirrors(std::vector<Mirror> mirrors);
  const std::vector<Mirror>& mirrors() const { return mirrors_; }
  void set_netflow(std::unique_ptr<NetFlowExporter> exporter);  // null disables
  NetFlowExporter* netflow() { return netflow_.get(); }

  // Datapath entry points (also used by tests): process one batch received on `in`.
  void process_batch(BridgePort& in, PacketBatch& batch);
  // Poll every port once (busy-poll mode and tests).
  void poll_ports_once();

  // OpenFlow.
  void attach(OfConnection* conn);
  void detach(OfConnection* conn);
  void handle_message(OfConnection& conn, std::span<const uint8_t> msg);
  // Direct flow programming (tests, the daemon's default flow). Returns the error an agent would send.
  OfResult<void> apply_flow_mod(const FlowMod& fm, uint8_t version = kOf13);
  OfResult<void> apply_group_mod(const GroupMod& gm);
  OfResult<void> apply_meter_mod(const MeterMod& mm);
  const MeterTable& meters() const { return meters_; }
  size_t flow_count() const;
  uint64_t generation() const { return generation_; }
  void expire_flows(Clock::time_point now);

  struct CacheStats {
    uint64_t hits = 0, misses = 0;
  };
  const CacheStats& cache_stats() const { return cache_stats_; }

private:
  enum class DpOp : uint8_t { Output, Normal, Flood, All, InPort, Controller, SetField, PushVlan, PopVlan,
                              DecTtl, SetTtl, CloneBegin, CloneEnd, Meter };
  struct DpAction {
    DpOp op;
    uint8_t field = 0;
    uint16_t u16 = 0;
    uint32_t u32 = 0;
    uint64_t u64 = 0;
    BridgePort* port = nullptr;
    uint8_t value[16] = {};
    Meter* meter = nullptr;
  };
  struct Decision {
    std::vector<DpAction> actions;
    std::vector<Rule*> rules;
    std::vector<std::pair<Group*, uint32_t>> groups;  // group, bucket index (UINT32_MAX: none)
    bool needs_plain_frames = false;  // rewrites checksummed headers or sends to a controller
    void clear() {
      actions.clear();
      rules.clear();
      groups.clear();
      needs_plain_frames = false;
    }
  };
  struct CacheEntry {
    uint64_t generation = 0;
    FlowKey key{};
    Decision decision;
  };
  struct Xlate {
    FlowKey key;
    uint32_t in_port;
    Decision* out;
    std::vector<Action> action_set;
    int depth = 0;
    uint8_t table = 0;
    uint64_t cookie = 0;
  };

  // Pipeline translation.
  void translate(const FlowKey& key, uint32_t in_port, Decision& out);
  void run_tables(Xlate& x, uint8_t first_table);
  void translate_actions(Xlate& x, const std::vector<Action>& actions, bool in_action_set);
  void translate_group(Xlate& x, uint32_t group_id);
  void write_action_set(std::vector<Action>& set, const std::vector<Action>& actions);
  void execute(const Decision& d, BridgePort* in, Frame& frame, const FlowKey& key);
  void output(BridgePort* out, BridgePort* in, const Frame& frame);
  void do_normal(BridgePort* in, Frame& frame);
  void send_packet_in(const Frame& frame, uint32_t in_port, uint8_t reason, uint8_t table, uint64_t cookie,
                      uint16_t max_len);
  bool police(BridgePort& port, size_t bytes, Clock::time_point now);
  void invalidate() { ++generation_; }
  void mirror_frame(const Frame& frame, BridgePort* port, bool ingress);
  bool is_mirror_output(const BridgePort* p) const;
  void register_port_fd(BridgePort& bp);
  void on_port_readable(BridgePort& bp);
  void flush_ports();

  // Flow table operations.
  OfResult<void> add_flow(const FlowMod& fm);
  OfResult<void> modify_flows(const FlowMod& fm, bool strict, uint8_t version);
  OfResult<void> delete_flows(const FlowMod& fm, bool strict);
  void remove_rule(Rule* rule, uint8_t reason);
  // Keeps timed_rules_ in step with the rule's timeouts.
  void track_timeouts(Rule* rule);
  OfResult<void> validate_instructions(const FlowMod& fm);
  std::vector<Rule*> select_rules(uint8_t table_id, const Match& match, bool strict, uint16_t priority,
                                  uint64_t cookie, uint64_t cookie_mask, uint32_t out_port, uint32_t out_group);
  static bool rule_outputs_to(const Rule& r, uint32_t port);
  static bool rule_uses_group(const Rule& r, uint32_t group);

  // OpenFlow message handlers.
  void handle_multipart(OfConnection& conn, std::span<const uint8_t> msg);
  void handle_nx_stats(OfConnection& conn, std::span<const uint8_t> msg, ByteReader body);
  void send_features(OfConnection& conn, uint32_t xid);
  void encode_port(uint8_t version, ByteWriter& w, const BridgePort& p);
  void broadcast_port_status(const BridgePort& p, uint8_t reason);
  void send_flow_removed(const Rule& r, uint8_t reason);

  EventLoop& loop_;
  std::string name_;
  uint64_t datapath_id_;
  std::map<uint32_t, std::unique_ptr<BridgePort>> ports_;
  std::array<std::unique_ptr<Classifier>, kNumTables> tables_;
  std::array<FlowTableStats, kNumTables> table_stats_{};
  std::unordered_map<Rule*, std::unique_ptr<Rule>> rules_;
  // Rules with an idle or hard timeout: the once-a-second expiry walks only these.
  std::unordered_set<Rule*> timed_rules_;
  std::vector<ClsRule*> covered_scratch_;  // select_rules' buffer, kept to avoid reallocating
  std::map<uint32_t, std::unique_ptr<Group>> groups_;
  MeterTable meters_;
  MacTable mac_table_;
  std::vector<OfConnection*> connections_;
  uint64_t generation_ = 1;
  uint64_t role_generation_ = 0;
  bool role_generation_set_ = false;

  static constexpr size_t kCacheSize = 8192;
  std::vector<CacheEntry> cache_;
  CacheStats cache_stats_;
  Decision scratch_decision_;
  PacketBatch batch_;
  PacketBatch scratch_frames_;  // clones for group buckets and VLAN re-tagging in NORMAL
  PacketBatch plain_segment_;   // [0]: a super-frame's segment, when its decision needs plain frames
  size_t scratch_used_ = 0;
  std::vector<BridgePort*> dirty_ports_;
  Clock::time_point now_{};
  EventLoop::TimerId timer_ = 0;
  std::vector<Mirror> mirrors_;
  std::vector<uint32_t> mirror_outputs_;
  bool mirroring_ = false;
  std::unique_ptr<NetFlowExporter> netflow_;
  uint32_t last_output_ = 0;  // for NetFlow's output interface
};

}  // namespace keel::sw
