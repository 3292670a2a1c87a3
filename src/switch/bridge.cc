#include "switch/bridge.h"

#include <time.h>

#include <algorithm>

#include "base/log.h"
#include "switch/of_connection.h"

namespace keel::sw {

namespace {

constexpr uint32_t OFPPC_PORT_DOWN = 1, OFPPC_NO_RECV = 4, OFPPC_NO_FWD = 32, OFPPC_NO_PACKET_IN = 64;
constexpr uint32_t OFPPC10_NO_FLOOD = 16;
constexpr uint8_t OFPR_ACTION = 1;  // PACKET_IN reason (table misses drop, as OpenFlow 1.3 defaults)
constexpr uint8_t OFPRR_IDLE_TIMEOUT = 0, OFPRR_HARD_TIMEOUT = 1, OFPRR_DELETE = 2, OFPRR_GROUP_DELETE = 3;
constexpr uint8_t OFPPR_ADD = 0, OFPPR_DELETE = 1, OFPPR_MODIFY = 2;
constexpr uint16_t kMultipartMore = 1;
constexpr size_t kMultipartChunk = 32 * 1024;

Clock::time_point coarse_now() {
  // CLOCK_MONOTONIC_COARSE is a vDSO read; steady_clock is CLOCK_MONOTONIC. The datapath only needs
  // ageing precision, and both clocks share an origin.
  return Clock::now();
}

bool is_multicast(const uint8_t* mac) { return mac[0] & 1; }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// MacTable

uint64_t MacTable::key(uint16_t vlan, const uint8_t* mac) {
  uint64_t k = uint64_t(vlan & 0xfff) << 48;
  for (int i = 0; i < 6; ++i) k |= uint64_t(mac[i]) << (40 - 8 * i);
  return k;
}

void MacTable::learn(uint16_t vlan, const uint8_t* mac, uint32_t ofport, Clock::time_point now) {
  uint64_t k = key(vlan, mac);
  auto it = entries_.find(k);
  if (it != entries_.end()) {
    it->second.ofport = ofport;
    it->second.seen = now;
    return;
  }
  if (entries_.size() >= max_entries_) {
    // Full: evict the stalest entry, as a bridge under MAC flooding must keep learning real hosts.
    auto oldest = std::min_element(entries_.begin(), entries_.end(),
                                   [](const auto& a, const auto& b) { return a.second.seen < b.second.seen; });
    if (oldest == entries_.end()) return;
    entries_.erase(oldest);
  }
  entries_.emplace(k, Entry{ofport, now});
}

std::optional<uint32_t> MacTable::lookup(uint16_t vlan, const uint8_t* mac) const {
  auto it = entries_.find(key(vlan, mac));
  if (it == entries_.end()) return std::nullopt;
  return it->second.ofport;
}

void MacTable::expire(Clock::time_point now) {
  std::erase_if(entries_, [&](const auto& e) { return now - e.second.seen > ageing_; });
}

void MacTable::flush_port(uint32_t ofport) {
  std::erase_if(entries_, [&](const auto& e) { return e.second.ofport == ofport; });
}

void MacTable::for_each(
    const std::function<void(uint16_t, const MacAddress&, uint32_t, Clock::time_point)>& fn) const {
  for (const auto& [k, e] : entries_) {
    MacAddress mac;
    for (int i = 0; i < 6; ++i) mac[size_t(i)] = uint8_t(k >> (40 - 8 * i));
    fn(uint16_t(k >> 48), mac, e.ofport, e.seen);
  }
}

// ---------------------------------------------------------------------------------------------------
// Bridge: ports

Bridge::Bridge(EventLoop& loop, std::string name, uint64_t datapath_id)
    : loop_(loop), name_(std::move(name)), datapath_id_(datapath_id), cache_(kCacheSize) {
  auto t = loop_.add_timer(std::chrono::seconds(1), [this] {
    auto now = Clock::now();
    expire_flows(now);
    mac_table_.expire(now);
    if (netflow_) netflow_->expire(now);
    // Link state changes (veth peer gone, stream peer disconnected) become PORT_STATUS messages.
    for (auto& [no, bp] : ports_) {
      bool live = bp->port->link_up();
      if (live != bp->live) {
        bp->live = live;
        invalidate();
        broadcast_port_status(*bp, OFPPR_MODIFY);
      }
    }
  }, true);
  if (t) timer_ = *t;
}

Bridge::~Bridge() {
  if (timer_) loop_.cancel_timer(timer_);
  for (auto& [no, bp] : ports_)
    if (bp->registered_fd >= 0) loop_.remove_fd(bp->registered_fd);
}

void Bridge::register_port_fd(BridgePort& bp) {
  int fd = bp.port->poll_fd();
  if (bp.registered_fd == fd) return;
  if (bp.registered_fd >= 0) loop_.remove_fd(bp.registered_fd);
  bp.registered_fd = -1;
  if (fd < 0) return;
  uint32_t ofport = bp.ofport;
  auto r = loop_.add_fd(fd, EPOLLIN, [this, ofport](uint32_t) {
    if (BridgePort* p = port_by_ofport(ofport)) on_port_readable(*p);
  });
  if (r) bp.registered_fd = fd;
  else KEEL_LOG_ERROR("{}: cannot poll port {}: {}", name_, bp.name, r.error().message());
}

Result<uint32_t> Bridge::add_port(const std::string& name, const std::string& type, std::unique_ptr<Port> port,
                                  uint32_t ofport_request) {
  if (port_by_name(name)) return fail(EEXIST, fmt::format("port {} already exists on {}", name, name_));
  uint32_t ofport = ofport_request;
  if (ofport == 0) {
    ofport = 1;
    while (ports_.count(ofport)) ++ofport;
  } else if (ports_.count(ofport)) {
    return fail(EEXIST, fmt::format("OpenFlow port {} is taken on {}", ofport, name_));
  } else if (ofport >= OFPP_MAX && ofport != OFPP_LOCAL) {
    return fail_invalid("OpenFlow port number {} is reserved", ofport);
  }
  auto bp = std::make_unique<BridgePort>();
  bp->ofport = ofport;
  bp->name = name;
  bp->type = type;
  bp->port = std::move(port);
  bp->live = bp->port->link_up();
  BridgePort& ref = *bp;
  ports_[ofport] = std::move(bp);
  register_port_fd(ref);
  invalidate();
  broadcast_port_status(ref, OFPPR_ADD);
  KEEL_LOG_INFO("{}: added port {} ({}) as OpenFlow port {}", name_, name, type, ofport);
  return ofport;
}

Result<void> Bridge::remove_port(const std::string& name) {
  BridgePort* bp = port_by_name(name);
  if (!bp) return fail(ENOENT, fmt::format("no port {} on {}", name, name_));
  if (bp->registered_fd >= 0) loop_.remove_fd(bp->registered_fd);
  mac_table_.flush_port(bp->ofport);
  broadcast_port_status(*bp, OFPPR_DELETE);
  std::erase(dirty_ports_, bp);
  ports_.erase(bp->ofport);
  invalidate();
  return ok();
}

BridgePort* Bridge::port_by_name(const std::string& name) {
  for (auto& [no, bp] : ports_)
    if (bp->name == name) return bp.get();
  return nullptr;
}

BridgePort* Bridge::port_by_ofport(uint32_t ofport) {
  auto it = ports_.find(ofport);
  return it == ports_.end() ? nullptr : it->second.get();
}

std::vector<BridgePort*> Bridge::ports() {
  std::vector<BridgePort*> out;
  for (auto& [no, bp] : ports_) out.push_back(bp.get());
  return out;
}

void Bridge::set_port_vlan(BridgePort& port, PortVlan vlan) {
  port.vlan = std::move(vlan);
  mac_table_.flush_port(port.ofport);
  invalidate();
}

void Bridge::set_port_policer(BridgePort& port, uint64_t rate_kbps, uint64_t burst_kb) {
  port.policer = Policer{};
  port.policer.rate_kbps = rate_kbps;
  port.policer.burst_kb = burst_kb ? burst_kb : std::max<uint64_t>(rate_kbps / 10, 8);
  port.policer.tokens_bits = double(port.policer.burst_kb) * 1000;
  port.policer.last = Clock::now();
}

bool Bridge::police(BridgePort& port, size_t bytes, Clock::time_point now) {
  Policer& p = port.policer;
  if (p.rate_kbps == 0) return true;
  double elapsed = std::chrono::duration<double>(now - p.last).count();
  p.last = now;
  double burst_bits = double(p.burst_kb) * 1000;
  p.tokens_bits = std::min(burst_bits, p.tokens_bits + elapsed * double(p.rate_kbps) * 1000);
  double need = double(bytes) * 8;
  if (p.tokens_bits < need) return false;
  p.tokens_bits -= need;
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Datapath

void Bridge::on_port_readable(BridgePort& bp) {
  // Ports that hold more than a batch (segmented super-frames) are drained now; the rest wait for
  // the next readiness event.
  while (bp.port->has_pending()) {
    batch_.reset();
    bp.port->receive(batch_);
    if (batch_.size()) process_batch(bp, batch_);
  }
  batch_.reset();
  bp.port->receive(batch_);
  bool fd_changed = bp.port->take_poll_fd_changed();
  if (fd_changed) register_port_fd(bp);
  if (bp.port->take_link_changed() || fd_changed) {
    bool live = bp.port->link_up();
    if (live != bp.live) {
      bp.live = live;
      invalidate();
      broadcast_port_status(bp, OFPPR_MODIFY);
    }
  }
  if (batch_.size()) process_batch(bp, batch_);
  while (bp.port->has_pending()) {
    batch_.reset();
    bp.port->receive(batch_);
    if (batch_.size()) process_batch(bp, batch_);
  }
}

void Bridge::poll_ports_once() {
  for (auto& [no, bp] : ports_) on_port_readable(*bp);
}

void Bridge::flush_ports() {
  for (BridgePort* p : dirty_ports_) p->port->flush();
  dirty_ports_.clear();
}

namespace {
std::chrono::steady_clock::time_point g_last_datapath_input;
}
std::chrono::steady_clock::time_point last_datapath_input() { return g_last_datapath_input; }

void Bridge::process_batch(BridgePort& in, PacketBatch& batch) {
  g_last_datapath_input = std::chrono::steady_clock::now();
  now_ = coarse_now();
  for (size_t i = 0; i < batch.size(); ++i) {
    Frame& frame = batch[i];
    const size_t bytes = frame.wire_len();
    in.port->counters.rx_packets++;
    in.port->counters.rx_bytes += bytes;
    if (in.config & (OFPPC_NO_RECV | OFPPC_PORT_DOWN)) {
      in.port->counters.rx_dropped++;
      continue;
    }
    if (!police(in, bytes, now_)) {
      in.port->counters.rx_dropped++;
      continue;
    }
    FlowKey key;
    FrameLayout layout;
    extract_flow(frame.data, frame.len, in.ofport, key, layout);
    uint64_t h = hash_key(key);
    CacheEntry& e = cache_[h & (kCacheSize - 1)];
    if (e.generation != generation_ || !(e.key == key)) {
      cache_stats_.misses++;
      e.decision.clear();
      translate(key, in.ofport, e.decision);
      for (const DpAction& a : e.decision.actions) {
        // Ethernet and 802.1Q fields are outside every checksum; anything else rewritten is not.
        bool l2_field = a.op == DpOp::SetField && (a.field == uint8_t(Oxm::EthDst) || a.field == uint8_t(Oxm::EthSrc) ||
                                                   a.field == uint8_t(Oxm::VlanVid) || a.field == uint8_t(Oxm::VlanPcp));
        if ((a.op == DpOp::SetField && !l2_field) || a.op == DpOp::DecTtl || a.op == DpOp::SetTtl ||
            a.op == DpOp::Controller)
          e.decision.needs_plain_frames = true;
      }
      e.key = key;
      e.generation = generation_;
    } else {
      cache_stats_.hits++;
    }
    for (Rule* r : e.decision.rules) {
      r->packets++;
      r->bytes += bytes;
      r->last_used = now_;
    }
    for (auto& [g, bucket] : e.decision.groups) {
      g->packets++;
      g->bytes += bytes;
      if (bucket < g->bucket_counts.size()) {
        g->bucket_counts[bucket].first++;
        g->bucket_counts[bucket].second += bytes;
      }
    }
    scratch_used_ = 0;
    if (mirroring_) mirror_frame(frame, &in, true);
    last_output_ = 0;
    bool is_ipv4 = key.eth_type == be16(kEthTypeIpv4) && layout.l3 && frame.len >= layout.l3 + 20u;
    uint32_t ip_len = 0;
    uint8_t tcp_flags = 0;
    if (netflow_ && is_ipv4) {
      // Before execution: actions may rewrite the frame in place.
      const uint8_t* ip = frame.data + layout.l3;
      ip_len = uint32_t(ip[2] << 8 | ip[3]);
      if (key.ip_proto == IPPROTO_TCP && layout.l4 && frame.len >= layout.l4 + 14u) tcp_flags = frame.data[layout.l4 + 13];
    }
    if (frame.is_super() && e.decision.needs_plain_frames) {
      // Rewrites would break the super-frame's partial checksum, a controller wants real frames:
      // cut it and run the decision on each segment (same headers, so the same decision).
      Frame& seg = plain_segment_[0];
      bool cut = cut_super_frame(frame.data, frame.len, frame.payload, frame.payload_len, frame.offload.gso_size,
                                 seg.buffer + Frame::kHeadroom, Frame::kBufferSize - Frame::kHeadroom,
                                 [&](const uint8_t* p, size_t n) {
                                   seg.reset_to_headroom();
                                   seg.len = uint32_t(n);
                                   (void)p;  // built in place, at seg.data
                                   scratch_used_ = 0;
                                   execute(e.decision, &in, seg, key);
                                 });
      if (!cut) in.port->counters.rx_errors++;
    } else {
      execute(e.decision, &in, frame, key);
    }
    if (netflow_ && is_ipv4) netflow_->account(key, in.ofport, last_output_, ip_len, tcp_flags, now_);
  }
  flush_ports();
}

void Bridge::output(BridgePort* out, BridgePort* in, const Frame& frame) {
  if (!out || out == in) return;
  if (out->config & (OFPPC_NO_FWD | OFPPC_PORT_DOWN)) {
    out->port->counters.tx_dropped++;
    return;
  }
  out->port->send_frame(frame);
  if (std::find(dirty_ports_.begin(), dirty_ports_.end(), out) == dirty_ports_.end()) dirty_ports_.push_back(out);
  last_output_ = out->ofport;
  if (mirroring_) mirror_frame(frame, out, false);
}

void Bridge::set_mirrors(std::vector<Mirror> mirrors) {
  mirrors_ = std::move(mirrors);
  mirror_outputs_.clear();
  for (const Mirror& m : mirrors_)
    if (m.output_port) mirror_outputs_.push_back(m.output_port);
  mirroring_ = !mirrors_.empty();
  for (uint32_t p : mirror_outputs_) mac_table_.flush_port(p);
  invalidate();
}

bool Bridge::is_mirror_output(const BridgePort* p) const {
  return std::find(mirror_outputs_.begin(), mirror_outputs_.end(), p->ofport) != mirror_outputs_.end();
}

void Bridge::mirror_frame(const Frame& frame, BridgePort* port, bool ingress) {
  for (Mirror& m : mirrors_) {
    if (port->ofport == m.output_port) continue;
    const auto& sel = ingress ? m.select_src : m.select_dst;
    if (!m.select_all && std::find(sel.begin(), sel.end(), port->ofport) == sel.end()) continue;
    m.packets++;
    m.bytes += frame.len;
    if (m.output_port) {
      BridgePort* out = port_by_ofport(m.output_port);
      if (!out || !out->live) continue;
      out->port->send_frame(frame);
      if (std::find(dirty_ports_.begin(), dirty_ports_.end(), out) == dirty_ports_.end()) dirty_ports_.push_back(out);
    } else if (m.output_vlan) {
      // RSPAN: the copy travels tagged with the mirror VLAN on every trunk that carries it.
      if (scratch_used_ >= PacketBatch::kCapacity) continue;
      Frame& c = scratch_frames_[scratch_used_++];
      c.reset_to_headroom();
      c.copy_from(frame);
      frame_pop_vlan(c);
      frame_push_vlan(c, 0x8100, *m.output_vlan);
      for (auto& [no, bp] : ports_) {
        if (bp.get() == port || !bp->live) continue;
        const PortVlan& v = bp->vlan;
        bool carries = !(v.tag && v.trunks.empty()) &&
                       (v.trunks.empty() || std::find(v.trunks.begin(), v.trunks.end(), *m.output_vlan) != v.trunks.end());
        if (!carries) continue;
        bp->port->send_frame(c);
        if (std::find(dirty_ports_.begin(), dirty_ports_.end(), bp.get()) == dirty_ports_.end())
          dirty_ports_.push_back(bp.get());
      }
      scratch_used_--;
    }
  }
}

void Bridge::set_netflow(std::unique_ptr<NetFlowExporter> exporter) {
  if (netflow_) netflow_->expire(Clock::now(), true);
  netflow_ = std::move(exporter);
}

void Bridge::execute(const Decision& d, BridgePort* in, Frame& original, const FlowKey& key) {
  Frame* frame = &original;
  Frame* saved[8];
  int depth = 0;
  // A clone whose TTL expired skips its remaining actions up to its CloneEnd.
  int dead_at = -1;
  for (const DpAction& a : d.actions) {
    if (dead_at >= 0) {
      if (a.op == DpOp::CloneBegin) ++depth;
      if (a.op == DpOp::CloneEnd && --depth < dead_at) {
        dead_at = -1;
        frame = saved[depth];
      }
      continue;
    }
    switch (a.op) {
      case DpOp::Output:
        output(a.port, in, *frame);
        break;
      case DpOp::InPort:
        if (in) {
          in->port->send_frame(*frame);
          if (std::find(dirty_ports_.begin(), dirty_ports_.end(), in) == dirty_ports_.end())
            dirty_ports_.push_back(in);
        }
        break;
      case DpOp::Normal:
        do_normal(in, *frame);
        break;
      case DpOp::Flood:
      case DpOp::All:
        for (auto& [no, bp] : ports_) {
          if (bp.get() == in) continue;
          if (a.op == DpOp::Flood && (bp->config & OFPPC10_NO_FLOOD)) continue;
          output(bp.get(), in, *frame);
        }
        break;
      case DpOp::Controller:
        send_packet_in(*frame, in ? in->ofport : OFPP_CONTROLLER, uint8_t(a.u32 >> 16), uint8_t(a.u32),
                       a.u64, a.u16);
        break;
      case DpOp::SetField:
        frame_set_field(*frame, a.field, a.value);
        break;
      case DpOp::PushVlan: {
        int tci = frame_vlan_tci(*frame);
        frame_push_vlan(*frame, a.u16, tci >= 0 ? uint16_t(tci) : 0);
        break;
      }
      case DpOp::PopVlan:
        frame_pop_vlan(*frame);
        break;
      case DpOp::DecTtl:
        if (!frame_dec_ttl(*frame)) {
          if (depth == 0) return;  // the packet itself expired: nothing further happens to it
          dead_at = depth;
        }
        break;
      case DpOp::SetTtl:
        frame_set_ttl(*frame, uint8_t(a.u32));
        break;
      case DpOp::Meter:
        if (!a.meter->admit(frame->len, now_)) {
          if (depth == 0) return;  // over the meter's rate: dropped
          dead_at = depth;
        }
        break;
      case DpOp::CloneBegin: {
        if (depth >= 4 || scratch_used_ >= PacketBatch::kCapacity) {
          dead_at = ++depth;  // no room for a clone: skip this bucket rather than corrupt the packet
          saved[depth - 1] = frame;
          break;
        }
        Frame& c = scratch_frames_[scratch_used_++];
        c.reset_to_headroom();
        c.copy_from(*frame);
        saved[depth++] = frame;
        frame = &c;
        break;
      }
      case DpOp::CloneEnd:
        if (depth > 0) frame = saved[--depth];
        break;
    }
  }
  (void)key;
}

namespace {

bool vlan_allowed(const PortVlan& v, uint16_t vlan) {
  if (v.tag && v.trunks.empty()) return vlan == *v.tag;
  if (v.trunks.empty()) return true;
  if (v.tag && vlan == *v.tag) return true;
  return std::find(v.trunks.begin(), v.trunks.end(), vlan) != v.trunks.end();
}

}  // namespace

void Bridge::do_normal(BridgePort* in, Frame& frame) {
  if (!in || frame.len < 14) return;
  // Which VLAN the frame belongs to, by the input port's mode.
  int tci = frame_vlan_tci(frame);
  uint16_t vlan;
  const PortVlan& iv = in->vlan;
  if (iv.tag && iv.trunks.empty()) {
    if (tci >= 0 && (tci & 0xfff) != 0) return;  // tagged frame on an access port: drop
    vlan = *iv.tag;
  } else if (tci >= 0 && (tci & 0xfff) != 0) {
    vlan = uint16_t(tci & 0xfff);
  } else {
    vlan = iv.tag ? *iv.tag : 0;
  }
  if (!vlan_allowed(iv, vlan)) return;
  const uint8_t* dst = frame.data;
  const uint8_t* src = frame.data + 6;
  if (mirroring_ && is_mirror_output(in)) return;  // a mirror's output port only sends
  if (!is_multicast(src)) mac_table_.learn(vlan, src, in->ofport, now_);

  // The frame in the two shapes egress ports may want, made at most once each.
  Frame* tagged = nullptr;
  Frame* untagged = nullptr;
  auto shape = [&](bool want_tag) -> Frame* {
    bool has_tag = tci >= 0;
    if (want_tag == has_tag && (!has_tag || (tci & 0xfff) == vlan)) return &frame;
    Frame*& slot = want_tag ? tagged : untagged;
    if (slot) return slot;
    if (scratch_used_ >= PacketBatch::kCapacity) return nullptr;
    Frame& c = scratch_frames_[scratch_used_++];
    c.reset_to_headroom();
    c.copy_from(frame);
    if (want_tag) {
      if (has_tag) frame_pop_vlan(c);
      frame_push_vlan(c, 0x8100, uint16_t((tci >= 0 ? tci & 0xe000 : 0) | vlan));
    } else {
      frame_pop_vlan(c);
    }
    slot = &c;
    return slot;
  };
  auto emit = [&](BridgePort* out) {
    if (out == in || !out->live || (mirroring_ && is_mirror_output(out))) return;
    const PortVlan& ov = out->vlan;
    if (!vlan_allowed(ov, vlan)) return;
    bool want_tag = !(ov.tag && *ov.tag == vlan) && vlan != 0;
    if (Frame* f = shape(want_tag)) output(out, in, *f);
  };
  if (!is_multicast(dst)) {
    if (auto port = mac_table_.lookup(vlan, dst)) {
      if (BridgePort* out = port_by_ofport(*port)) emit(out);
      return;
    }
  }
  for (auto& [no, bp] : ports_) {
    if (bp->config & OFPPC10_NO_FLOOD) continue;
    emit(bp.get());
  }
}

// ---------------------------------------------------------------------------------------------------
// Pipeline translation

void Bridge::translate(const FlowKey& key, uint32_t in_port, Decision& out) {
  Xlate x{key, in_port, &out, {}, 0, 0, 0};
  run_tables(x, 0);
}

void Bridge::run_tables(Xlate& x, uint8_t first_table) {
  uint8_t table = first_table;
  for (;;) {
    table_stats_[table].lookups++;
    Classifier* cls = tables_[table].get();
    Rule* rule = cls ? static_cast<Rule*>(cls->lookup(x.key)) : nullptr;
    if (!rule) return;  // table miss: drop
    table_stats_[table].matched++;
    x.out->rules.push_back(rule);
    x.table = table;
    x.cookie = rule->cookie;
    const Instructions& ins = rule->instructions;
    if (ins.meter) {
      // Validated when the flow was added, and deleting a meter deletes its flows.
      if (Meter* m = meters_.find(*ins.meter)) x.out->actions.push_back(DpAction{.op = DpOp::Meter, .meter = m});
    }
    if (ins.has_apply) translate_actions(x, ins.apply, false);
    if (ins.clear_actions) x.action_set.clear();
    if (ins.has_write) write_action_set(x.action_set, ins.write);
    if (ins.has_metadata) {
      uint64_t md = be64(x.key.metadata);
      md = (md & ~ins.metadata_mask) | (ins.metadata & ins.metadata_mask);
      x.key.metadata = be64(md);
    }
    if (ins.goto_table && *ins.goto_table > table) {
      table = *ins.goto_table;
      continue;
    }
    break;
  }
  // End of pipeline: the action set, in the order OpenFlow prescribes.
  std::vector<Action> set = std::move(x.action_set);
  x.action_set.clear();
  std::vector<Action> ordered;
  for (auto type : {ActionType::PopVlan, ActionType::PushVlan, ActionType::DecNwTtl, ActionType::SetNwTtl,
                    ActionType::SetField, ActionType::SetQueue}) {
    for (const Action& a : set)
      if (a.type == type) ordered.push_back(a);
  }
  bool has_group = false;
  for (const Action& a : set)
    if (a.type == ActionType::Group) {
      ordered.push_back(a);
      has_group = true;
    }
  if (!has_group)
    for (const Action& a : set)
      if (a.type == ActionType::Output) ordered.push_back(a);
  translate_actions(x, ordered, true);
}

void Bridge::write_action_set(std::vector<Action>& set, const std::vector<Action>& actions) {
  for (const Action& a : actions) {
    // One action per type (and per field for set-field): a later write replaces an earlier one.
    auto same = std::find_if(set.begin(), set.end(), [&](const Action& b) {
      return b.type == a.type && (a.type != ActionType::SetField || a.field == b.field);
    });
    if (same != set.end()) *same = a;
    else set.push_back(a);
  }
}

void Bridge::translate_actions(Xlate& x, const std::vector<Action>& actions, bool in_action_set) {
  (void)in_action_set;
  auto& out = x.out->actions;
  for (const Action& a : actions) {
    switch (a.type) {
      case ActionType::Output: {
        DpAction d{DpOp::Output};
        switch (a.arg) {
          case OFPP_IN_PORT: d.op = DpOp::InPort; break;
          case OFPP_NORMAL: d.op = DpOp::Normal; break;
          case OFPP_FLOOD: d.op = DpOp::Flood; break;
          case OFPP_ALL: d.op = DpOp::All; break;
          case OFPP_CONTROLLER:
            d.op = DpOp::Controller;
            d.u16 = a.max_len;
            d.u32 = uint32_t(OFPR_ACTION) << 16 | x.table;
            d.u64 = x.cookie;
            break;
          case OFPP_TABLE:
            // Only meaningful in PACKET_OUT: resubmit to table 0.
            if (x.depth < 4 && x.in_port == OFPP_CONTROLLER) {
              ++x.depth;
              run_tables(x, 0);
              --x.depth;
            } else if (x.depth < 4 && x.out->rules.empty()) {
              ++x.depth;
              run_tables(x, 0);
              --x.depth;
            }
            continue;
          default:
            d.port = port_by_ofport(a.arg);
            if (!d.port || a.arg == x.in_port) continue;  // absent port, or output to in_port: drop
            break;
        }
        out.push_back(d);
        break;
      }
      case ActionType::Group:
        translate_group(x, a.arg);
        break;
      case ActionType::PushVlan: {
        DpAction d{DpOp::PushVlan};
        d.u16 = a.ethertype;
        out.push_back(d);
        if (!(x.key.vlan_vid & be16(kVidPresent))) x.key.vlan_vid = be16(kVidPresent);
        break;
      }
      case ActionType::PopVlan:
        out.push_back(DpAction{DpOp::PopVlan});
        x.key.vlan_vid = 0;
        x.key.vlan_pcp = 0;
        break;
      case ActionType::SetField: {
        DpAction d{DpOp::SetField};
        d.field = a.field;
        std::memcpy(d.value, a.value, sizeof d.value);
        out.push_back(d);
        const auto& fi = oxm_field_info(a.field);
        std::memcpy(reinterpret_cast<uint8_t*>(&x.key) + fi.offset, a.value, fi.length);
        break;
      }
      case ActionType::DecNwTtl:
        out.push_back(DpAction{DpOp::DecTtl});
        break;
      case ActionType::SetNwTtl: {
        DpAction d{DpOp::SetTtl};
        d.u32 = a.arg;
        out.push_back(d);
        break;
      }
      case ActionType::SetQueue:
        break;  // no QoS queues: every port has one
    }
  }
}

void Bridge::translate_group(Xlate& x, uint32_t group_id) {
  auto it = groups_.find(group_id);
  if (it == groups_.end() || x.depth >= 4) return;
  Group& g = *it->second;
  auto run_bucket = [&](size_t i, bool clone) {
    x.out->groups.emplace_back(&g, uint32_t(i));
    FlowKey saved = x.key;
    if (clone) x.out->actions.push_back(DpAction{DpOp::CloneBegin});
    ++x.depth;
    translate_actions(x, g.buckets[i].actions, false);
    --x.depth;
    if (clone) x.out->actions.push_back(DpAction{DpOp::CloneEnd});
    if (clone) x.key = saved;
  };
  auto bucket_live = [&](const Bucket& b) {
    if (b.watch_port == OFPP_ANY) return true;
    BridgePort* p = port_by_ofport(b.watch_port);
    return p && p->live && !(p->config & OFPPC_PORT_DOWN);
  };
  switch (g.type) {
    case OFPGT_ALL:
      if (g.buckets.empty()) x.out->groups.emplace_back(&g, UINT32_MAX);
      for (size_t i = 0; i < g.buckets.size(); ++i) run_bucket(i, true);
      break;
    case OFPGT_INDIRECT:
      if (!g.buckets.empty()) run_bucket(0, false);
      break;
    case OFPGT_FF:
      for (size_t i = 0; i < g.buckets.size(); ++i)
        if (bucket_live(g.buckets[i])) {
          run_bucket(i, false);
          break;
        }
      break;
    case OFPGT_SELECT: {
      // Weighted choice by a hash of the L2-L4 addresses, so a flow sticks to one bucket.
      uint64_t total = 0;
      for (const Bucket& b : g.buckets)
        if (bucket_live(b)) total += b.weight ? b.weight : 1;
      if (total == 0) break;
      FlowKey hk{};
      std::memcpy(hk.eth_src, x.key.eth_src, 6);
      std::memcpy(hk.eth_dst, x.key.eth_dst, 6);
      hk.ipv4_src = x.key.ipv4_src;
      hk.ipv4_dst = x.key.ipv4_dst;
      hk.ip_proto = x.key.ip_proto;
      hk.tp_src = x.key.tp_src;
      hk.tp_dst = x.key.tp_dst;
      std::memcpy(hk.ipv6_src, x.key.ipv6_src, 16);
      std::memcpy(hk.ipv6_dst, x.key.ipv6_dst, 16);
      uint64_t pick = hash_key(hk) % total;
      for (size_t i = 0; i < g.buckets.size(); ++i) {
        if (!bucket_live(g.buckets[i])) continue;
        uint64_t w = g.buckets[i].weight ? g.buckets[i].weight : 1;
        if (pick < w) {
          run_bucket(i, false);
          break;
        }
        pick -= w;
      }
      break;
    }
  }
}

void Bridge::send_packet_in(const Frame& frame, uint32_t in_port, uint8_t reason, uint8_t table,
                            uint64_t cookie, uint16_t max_len) {
  if (BridgePort* p = port_by_ofport(in_port); p && (p->config & OFPPC_NO_PACKET_IN)) return;
  size_t data_len = max_len == 0xffff ? frame.len : std::min<size_t>(frame.len, max_len);
  for (OfConnection* c : connections_) {
    if (!c->negotiated() || c->role() == OfRole::Slave) continue;
    std::vector<uint8_t> msg;
    begin_message(msg, c->version(), OFPT_PACKET_IN, 0);
    ByteWriter w(msg);
    w.u32(OFP_NO_BUFFER);
    w.u16(uint16_t(frame.len));
    if (c->version() == kOf10) {
      w.u16(port_to_of10(in_port));
      w.u8(reason);
      w.u8(0);
    } else {
      w.u8(reason);
      w.u8(table);
      w.u64(cookie);
      Match m;
      uint8_t port_be[4] = {uint8_t(in_port >> 24), uint8_t(in_port >> 16), uint8_t(in_port >> 8),
                            uint8_t(in_port)};
      m.set_field(uint8_t(Oxm::InPort), port_be, nullptr);
      encode_match_oxm(w, m);
      w.u16(0);
    }
    w.bytes(frame.data, data_len);
    finish_message(msg);
    c->send(msg);
  }
}

// ---------------------------------------------------------------------------------------------------
// Flow table operations

size_t Bridge::flow_count() const { return rules_.size(); }

bool Bridge::rule_outputs_to(const Rule& r, uint32_t port) {
  if (port == OFPP_ANY) return true;
  auto in = [&](const std::vector<Action>& acts) {
    return std::any_of(acts.begin(), acts.end(),
                       [&](const Action& a) { return a.type == ActionType::Output && a.arg == port; });
  };
  return in(r.instructions.apply) || in(r.instructions.write);
}

bool Bridge::rule_uses_group(const Rule& r, uint32_t group) {
  if (group == OFPG_ANY) return true;
  auto in = [&](const std::vector<Action>& acts) {
    return std::any_of(acts.begin(), acts.end(),
                       [&](const Action& a) { return a.type == ActionType::Group && a.arg == group; });
  };
  return in(r.instructions.apply) || in(r.instructions.write);
}

std::vector<Rule*> Bridge::select_rules(uint8_t table_id, const Match& match, bool strict, uint16_t priority,
                                        uint64_t cookie, uint64_t cookie_mask, uint32_t out_port,
                                        uint32_t out_group) {
  std::vector<Rule*> out;
  auto consider = [&](Rule* r) {
    if ((r->cookie & cookie_mask) != (cookie & cookie_mask)) return;
    if (!rule_outputs_to(*r, out_port) || !rule_uses_group(*r, out_group)) return;
    out.push_back(r);
  };
  for (uint8_t t = 0; t < kNumTables; ++t) {
    if (table_id != OFPTT_ALL && t != table_id) continue;
    Classifier* cls = tables_[t].get();
    if (!cls) continue;
    if (strict) {
      if (ClsRule* r = cls->find_exact(match, priority)) consider(static_cast<Rule*>(r));
    } else {
      covered_scratch_.clear();
      cls->collect_covered(match, covered_scratch_);
      for (ClsRule* cr : covered_scratch_) consider(static_cast<Rule*>(cr));
    }
  }
  return out;
}

OfResult<void> Bridge::validate_instructions(const FlowMod& fm) {
  const Instructions& ins = fm.instructions;
  if (ins.meter && !meters_.find(*ins.meter)) return of_fail(OFPET_METER_MOD_FAILED, 2, "unknown meter");
  if (ins.goto_table && *ins.goto_table <= fm.table_id)
    return of_fail(OFPET_BAD_INSTRUCTION, 2, "goto_table must go forward");
  for (const auto* acts : {&ins.apply, &ins.write})
    for (const Action& a : *acts)
      if (a.type == ActionType::Group && !groups_.count(a.arg))
        return of_fail(OFPET_BAD_ACTION, 9, "unknown group");
  return {};
}

OfResult<void> Bridge::apply_flow_mod(const FlowMod& fm, uint8_t version) {
  switch (fm.command) {
    case OFPFC_ADD: return add_flow(fm);
    case OFPFC_MODIFY: return modify_flows(fm, false, version);
    case OFPFC_MODIFY_STRICT: return modify_flows(fm, true, version);
    case OFPFC_DELETE: return delete_flows(fm, false);
    case OFPFC_DELETE_STRICT: return delete_flows(fm, true);
  }
  return of_fail(OFPET_FLOW_MOD_FAILED, 6, "bad command");
}

OfResult<void> Bridge::add_flow(const FlowMod& fm) {
  if (fm.table_id >= kNumTables) return of_fail(OFPET_FLOW_MOD_FAILED, 2, "bad table id");
  auto valid = validate_instructions(fm);
  if (!valid) return valid;
  auto& cls = tables_[fm.table_id];
  if (!cls) cls = std::make_unique<Classifier>();
  Match match = fm.match;
  match.normalize();
  if (fm.flags & OFPFF_CHECK_OVERLAP) {
    bool overlap = false;
    cls->for_each([&](ClsRule* r) {
      if (r->priority == fm.priority && r->match.overlaps(match) && !(r->match == match)) overlap = true;
    });
    if (overlap) return of_fail(OFPET_FLOW_MOD_FAILED, 3, "overlapping flow");
  }
  auto now = Clock::now();
  if (ClsRule* existing = cls->find_exact(match, fm.priority)) {
    Rule* r = static_cast<Rule*>(existing);
    r->cookie = fm.cookie;
    r->idle_timeout = fm.idle_timeout;
    r->hard_timeout = fm.hard_timeout;
    r->flags = fm.flags;
    r->instructions = fm.instructions;
    r->created = now;
    r->last_used = now;
    if (fm.flags & OFPFF_RESET_COUNTS) r->packets = r->bytes = 0;
    track_timeouts(r);
    invalidate();
    return {};
  }
  auto rule = std::make_unique<Rule>();
  rule->match = match;
  rule->priority = fm.priority;
  rule->table_id = fm.table_id;
  rule->cookie = fm.cookie;
  rule->idle_timeout = fm.idle_timeout;
  rule->hard_timeout = fm.hard_timeout;
  rule->flags = fm.flags;
  rule->instructions = fm.instructions;
  rule->created = rule->last_used = now;
  Rule* raw = rule.get();
  cls->insert(raw);
  rules_.emplace(raw, std::move(rule));
  track_timeouts(raw);
  invalidate();
  return {};
}

OfResult<void> Bridge::modify_flows(const FlowMod& fm, bool strict, uint8_t version) {
  if (fm.table_id == OFPTT_ALL && version != kOf10) return of_fail(OFPET_FLOW_MOD_FAILED, 2, "bad table id");
  auto valid = validate_instructions(fm);
  if (!valid) return valid;
  auto rules = select_rules(fm.table_id, fm.match, strict, fm.priority, fm.cookie, fm.cookie_mask, OFPP_ANY,
                            OFPG_ANY);
  if (rules.empty()) {
    // OpenFlow 1.0: a modification that matches nothing adds the flow.
    if (version == kOf10) return add_flow(fm);
    return {};
  }
  for (Rule* r : rules) {
    r->instructions = fm.instructions;
    if (fm.flags & OFPFF_RESET_COUNTS) r->packets = r->bytes = 0;
  }
  invalidate();
  return {};
}

OfResult<void> Bridge::delete_flows(const FlowMod& fm, bool strict) {
  if (fm.table_id >= kNumTables && fm.table_id != OFPTT_ALL)
    return of_fail(OFPET_FLOW_MOD_FAILED, 2, "bad table id");
  auto rules = select_rules(fm.table_id, fm.match, strict, fm.priority, fm.cookie, fm.cookie_mask, fm.out_port,
                            fm.out_group);
  for (Rule* r : rules) remove_rule(r, OFPRR_DELETE);
  return {};
}

void Bridge::remove_rule(Rule* r, uint8_t reason) {
  if (r->flags & OFPFF_SEND_FLOW_REM) send_flow_removed(*r, reason);
  if (auto& cls = tables_[r->table_id]) cls->remove(r);
  timed_rules_.erase(r);
  rules_.erase(r);
  invalidate();
}

void Bridge::track_timeouts(Rule* r) {
  if (r->idle_timeout || r->hard_timeout)
    timed_rules_.insert(r);
  else
    timed_rules_.erase(r);
}

void Bridge::expire_flows(Clock::time_point now) {
  std::vector<std::pair<Rule*, uint8_t>> expired;
  for (Rule* rule : timed_rules_) {
    if (rule->hard_timeout && now - rule->created >= std::chrono::seconds(rule->hard_timeout))
      expired.emplace_back(rule, OFPRR_HARD_TIMEOUT);
    else if (rule->idle_timeout && now - rule->last_used >= std::chrono::seconds(rule->idle_timeout))
      expired.emplace_back(rule, OFPRR_IDLE_TIMEOUT);
  }
  for (auto& [r, reason] : expired) remove_rule(r, reason);
}

void Bridge::send_flow_removed(const Rule& r, uint8_t reason) {
  auto age = Clock::now() - r.created;
  auto sec = std::chrono::duration_cast<std::chrono::seconds>(age);
  auto nsec = std::chrono::duration_cast<std::chrono::nanoseconds>(age - sec);
  for (OfConnection* c : connections_) {
    if (!c->negotiated() || c->role() == OfRole::Slave) continue;
    std::vector<uint8_t> msg;
    begin_message(msg, c->version(), OFPT_FLOW_REMOVED, 0);
    ByteWriter w(msg);
    // The fields every format shares, in the same order: cookie .. idle_timeout.
    auto common = [&](uint8_t table_id) {
      w.u64(r.cookie);
      w.u16(r.priority);
      w.u8(reason);
      w.u8(table_id);
      w.u32(uint32_t(sec.count()));
      w.u32(uint32_t(nsec.count()));
      w.u16(r.idle_timeout);
    };
    if (c->version() == kOf10 && c->nxm_flow_format) {
      // The peer chose NXM: NXT_FLOW_REMOVED carries matches 1.0 cannot (IPv6, ARP hardware fields).
      msg.clear();
      begin_message(msg, kOf10, OFPT_EXPERIMENTER, 0);
      w.u32(kNxVendorId);
      w.u32(NXT_FLOW_REMOVED);
      common(r.table_id);
      size_t match_len_at = msg.size();
      w.u16(0);  // match_len, patched
      w.u64(r.packets);
      w.u64(r.bytes);
      size_t match_start = msg.size();
      w.patch_u16(match_len_at, uint16_t(encode_match_nxm(w, r.match)));
      w.pad_to(8, match_start);
    } else if (c->version() == kOf10) {
      encode_match_of10(w, r.match);
      common(0);
      w.u16(0);
      w.u64(r.packets);
      w.u64(r.bytes);
    } else {
      common(r.table_id);
      w.u16(r.hard_timeout);
      w.u64(r.packets);
      w.u64(r.bytes);
      encode_match_oxm(w, r.match);
    }
    finish_message(msg);
    c->send(msg);
  }
}

OfResult<void> Bridge::apply_meter_mod(const MeterMod& mm) {
  auto r = meters_.apply(mm, Clock::now());
  if (!r) return r;
  if (mm.command == 2) {
    // Deleting a meter deletes the flows that use it.
    std::vector<Rule*> users;
    for (auto& [raw, rule] : rules_)
      if (rule->instructions.meter && (mm.meter_id == OFPM_ALL || *rule->instructions.meter == mm.meter_id))
        users.push_back(raw);
    for (Rule* rule : users) remove_rule(rule, OFPRR_DELETE);
  }
  invalidate();
  return {};
}

OfResult<void> Bridge::apply_group_mod(const GroupMod& gm) {
  constexpr uint16_t GROUP_EXISTS = 0, INVALID_GROUP = 1, UNKNOWN_GROUP = 8, BAD_WATCH = 13, CHAINING = 5;
  if (gm.command != 2 && gm.group_id > OFPG_MAX)
    return of_fail(OFPET_GROUP_MOD_FAILED, INVALID_GROUP, "reserved group id");
  for (const Bucket& b : gm.buckets) {
    if (gm.type == OFPGT_FF && b.watch_port == OFPP_ANY && b.watch_group == OFPG_ANY)
      return of_fail(OFPET_GROUP_MOD_FAILED, BAD_WATCH, "fast failover bucket needs a watch");
    for (const Action& a : b.actions)
      if (a.type == ActionType::Group) return of_fail(OFPET_GROUP_MOD_FAILED, CHAINING, "group chaining");
  }
  if (gm.type == OFPGT_INDIRECT && gm.buckets.size() != 1 && gm.command != 2)
    return of_fail(OFPET_GROUP_MOD_FAILED, INVALID_GROUP, "indirect group needs one bucket");
  switch (gm.command) {
    case 0: {  // ADD
      if (groups_.count(gm.group_id)) return of_fail(OFPET_GROUP_MOD_FAILED, GROUP_EXISTS, "group exists");
      auto g = std::make_unique<Group>();
      g->id = gm.group_id;
      g->type = gm.type;
      g->buckets = gm.buckets;
      g->bucket_counts.assign(gm.buckets.size(), {0, 0});
      g->created = Clock::now();
      groups_[gm.group_id] = std::move(g);
      break;
    }
    case 1: {  // MODIFY
      auto it = groups_.find(gm.group_id);
      if (it == groups_.end()) return of_fail(OFPET_GROUP_MOD_FAILED, UNKNOWN_GROUP, "no such group");
      it->second->type = gm.type;
      it->second->buckets = gm.buckets;
      it->second->bucket_counts.assign(gm.buckets.size(), {0, 0});
      break;
    }
    case 2: {  // DELETE: also deletes the flows that use the group(s)
      std::vector<uint32_t> ids;
      if (gm.group_id == OFPG_ALL)
        for (auto& [id, g] : groups_) ids.push_back(id);
      else if (groups_.count(gm.group_id))
        ids.push_back(gm.group_id);
      for (uint32_t id : ids) {
        std::vector<Rule*> users;
        for (auto& [raw, r] : rules_)
          if (rule_uses_group(*r, id)) users.push_back(raw);
        for (Rule* r : users) remove_rule(r, OFPRR_GROUP_DELETE);
        groups_.erase(id);
      }
      break;
    }
  }
  invalidate();
  return {};
}

// ---------------------------------------------------------------------------------------------------
// OpenFlow messages

void Bridge::attach(OfConnection* c) { connections_.push_back(c); }
void Bridge::detach(OfConnection* c) { std::erase(connections_, c); }

void Bridge::encode_port(uint8_t version, ByteWriter& w, const BridgePort& p) {
  constexpr uint32_t OFPPS_LINK_DOWN = 1, OFPPS_LIVE = 4;
  constexpr uint32_t OFPPF_10GB_FD = 1 << 6, OFPPF_COPPER = 1 << 11;
  MacAddress mac = p.port->mac();
  uint32_t config = p.config;
  bool up = p.live;
  if (!up) config |= OFPPC_PORT_DOWN;
  uint32_t state = up ? (version == kOf10 ? 0 : OFPPS_LIVE) : OFPPS_LINK_DOWN;
  if (version == kOf10) {
    w.u16(port_to_of10(p.ofport));
    w.bytes(mac.data(), 6);
    w.fixed_string(p.name, 16);
    w.u32(config);
    w.u32(state);
    uint32_t curr10 = (1 << 6) | (1 << 7);  // 1.0: 10GB_FD is bit 6, COPPER bit 7
    w.u32(curr10);
    w.u32(0);
    w.u32(0);
    w.u32(0);
  } else {
    w.u32(p.ofport);
    w.u32(0);
    w.bytes(mac.data(), 6);
    w.u16(0);
    w.fixed_string(p.name, 16);
    w.u32(config);
    w.u32(state);
    w.u32(OFPPF_10GB_FD | OFPPF_COPPER);
    w.u32(0);
    w.u32(0);
    w.u32(0);
    w.u32(10000000);  // kbps
    w.u32(0);
  }
}

void Bridge::broadcast_port_status(const BridgePort& p, uint8_t reason) {
  for (OfConnection* c : connections_) {
    if (!c->negotiated() || c->role() == OfRole::Slave) continue;
    std::vector<uint8_t> msg;
    begin_message(msg, c->version(), OFPT_PORT_STATUS, 0);
    ByteWriter w(msg);
    w.u8(reason);
    w.zeros(7);
    encode_port(c->version(), w, p);
    finish_message(msg);
    c->send(msg);
  }
}

void Bridge::send_features(OfConnection& c, uint32_t xid) {
  std::vector<uint8_t> msg;
  begin_message(msg, c.version(), OFPT_FEATURES_REPLY, xid);
  ByteWriter w(msg);
  w.u64(datapath_id_);
  w.u32(0);  // n_buffers: every PACKET_IN carries its frame
  w.u8(kNumTables);
  if (c.version() == kOf10) {
    w.zeros(3);
    w.u32(0x1 | 0x2 | 0x4 | 0x40 | 0x80);  // FLOW, TABLE, PORT, QUEUE stats, ARP_MATCH_IP
    w.u32(0xfff);                          // every 1.0 action
    for (auto& [no, bp] : ports_) encode_port(kOf10, w, *bp);
  } else {
    w.u8(0);   // auxiliary id
    w.u16(0);
    w.u32(0x1 | 0x2 | 0x4 | 0x8 | 0x40);  // FLOW, TABLE, PORT, GROUP, QUEUE stats
    w.u32(0);
  }
  finish_message(msg);
  c.send(msg);
}

void Bridge::handle_message(OfConnection& c, std::span<const uint8_t> msg) {
  OfHeader h = decode_header(msg.data());
  uint8_t v = c.version();
  auto reply_error = [&](const OfError& e) {
    KEEL_LOG_DEBUG("{}: OpenFlow error to {}: {}", name_, c.peer(), e.detail);
    c.send(make_error(v, h.xid, e, msg));
  };
  auto simple_reply = [&](uint8_t type, std::span<const uint8_t> body) {
    std::vector<uint8_t> out;
    begin_message(out, v, type, h.xid);
    ByteWriter(out).bytes(body.data(), body.size());
    finish_message(out);
    c.send(out);
  };
  bool slave = c.role() == OfRole::Slave;
  const uint8_t barrier_req = v == kOf10 ? OFPT10_BARRIER_REQUEST : OFPT13_BARRIER_REQUEST;
  const uint8_t stats_req = v == kOf10 ? OFPT10_STATS_REQUEST : OFPT13_MULTIPART_REQUEST;
  const uint8_t port_mod = v == kOf10 ? OFPT10_PORT_MOD : OFPT13_PORT_MOD;

  if (h.type == OFPT_ECHO_REQUEST) {
    simple_reply(OFPT_ECHO_REPLY, msg.subspan(kOfHeaderLen));
  } else if (h.type == OFPT_ECHO_REPLY || h.type == OFPT_HELLO) {
    // nothing to do
  } else if (h.type == OFPT_ERROR) {
    KEEL_LOG_WARN("{}: controller {} sent an OpenFlow error", name_, c.peer());
  } else if (h.type == OFPT_FEATURES_REQUEST) {
    send_features(c, h.xid);
  } else if (h.type == OFPT_GET_CONFIG_REQUEST) {
    uint8_t body[4] = {uint8_t(c.config_flags >> 8), uint8_t(c.config_flags), uint8_t(c.miss_send_len >> 8),
                       uint8_t(c.miss_send_len)};
    simple_reply(OFPT_GET_CONFIG_REPLY, body);
  } else if (h.type == OFPT_SET_CONFIG) {
    if (msg.size() < 12) return reply_error(of_error(OFPET_BAD_REQUEST, 6, "short set_config"));
    ByteReader r(msg.subspan(kOfHeaderLen));
    c.config_flags = r.u16() & 3;
    c.miss_send_len = r.u16();
  } else if (h.type == barrier_req) {
    flush_ports();
    simple_reply(v == kOf10 ? OFPT10_BARRIER_REPLY : OFPT13_BARRIER_REPLY, {});
  } else if (h.type == OFPT_FLOW_MOD) {
    if (slave) return reply_error(of_error(OFPET_BAD_REQUEST, 10, "slave"));
    auto fm = decode_flow_mod(v, msg);
    if (!fm) return reply_error(fm.error());
    auto r = apply_flow_mod(*fm, v);
    if (!r) return reply_error(r.error());
  } else if (v == kOf13 && h.type == OFPT13_GROUP_MOD) {
    if (slave) return reply_error(of_error(OFPET_BAD_REQUEST, 10, "slave"));
    auto gm = decode_group_mod(msg);
    if (!gm) return reply_error(gm.error());
    auto r = apply_group_mod(*gm);
    if (!r) return reply_error(r.error());
  } else if (h.type == OFPT_PACKET_OUT) {
    if (slave) return reply_error(of_error(OFPET_BAD_REQUEST, 10, "slave"));
    auto po = decode_packet_out(v, msg);
    if (!po) return reply_error(po.error());
    if (po->buffer_id != OFP_NO_BUFFER) return reply_error(of_error(OFPET_BAD_REQUEST, 8, "no buffers"));
    if (po->data.size() > Frame::kBufferSize - Frame::kHeadroom - 64)
      return reply_error(of_error(OFPET_BAD_REQUEST, 12, "packet too large"));
    BridgePort* in = po->in_port == OFPP_CONTROLLER || po->in_port == OFPP_ANY ? nullptr
                                                                               : port_by_ofport(po->in_port);
    if (!in && po->in_port != OFPP_CONTROLLER && po->in_port != OFPP_ANY && po->in_port != OFPP_LOCAL)
      return reply_error(of_error(OFPET_BAD_REQUEST, 11, "bad in_port"));
    batch_.reset();
    Frame& f = batch_[0];
    std::memcpy(f.data, po->data.data(), po->data.size());
    f.len = uint32_t(po->data.size());
    FlowKey key;
    FrameLayout layout;
    extract_flow(f.data, f.len, po->in_port, key, layout);
    Decision d;
    Xlate x{key, po->in_port, &d, {}, 0, 0, 0};
    now_ = Clock::now();
    translate_actions(x, po->actions, false);
    scratch_used_ = 0;
    execute(d, in, f, key);
    flush_ports();
  } else if (h.type == port_mod) {
    if (slave) return reply_error(of_error(OFPET_BAD_REQUEST, 10, "slave"));
    ByteReader r(msg.subspan(kOfHeaderLen));
    uint32_t port_no;
    if (v == kOf10) {
      port_no = port_from_of10(r.u16());
      r.skip(6);
    } else {
      port_no = r.u32();
      r.skip(4 + 6 + 2);
    }
    uint32_t config = r.u32(), mask = r.u32();
    if (!r.ok()) return reply_error(of_error(OFPET_BAD_REQUEST, 6, "short port_mod"));
    BridgePort* p = port_by_ofport(port_no);
    if (!p) return reply_error(of_error(OFPET_PORT_MOD_FAILED, 0, "no such port"));
    p->config = (p->config & ~mask) | (config & mask);
    invalidate();
    broadcast_port_status(*p, OFPPR_MODIFY);
  } else if (h.type == stats_req) {
    handle_multipart(c, msg);
  } else if (v == kOf13 && h.type == OFPT13_ROLE_REQUEST) {
    ByteReader r(msg.subspan(kOfHeaderLen));
    uint32_t role = r.u32();
    r.skip(4);
    uint64_t gen = r.u64();
    if (!r.ok()) return reply_error(of_error(OFPET_BAD_REQUEST, 6, "short role_request"));
    if (role > 3) return reply_error(of_error(OFPET_ROLE_REQUEST_FAILED, 2, "bad role"));
    if (role == 2 || role == 3) {
      if (role_generation_set_ && int64_t(gen - role_generation_) < 0)
        return reply_error(of_error(OFPET_ROLE_REQUEST_FAILED, 0, "stale generation"));
      role_generation_ = gen;
      role_generation_set_ = true;
    }
    if (role == 2)
      for (OfConnection* other : connections_)
        if (other != &c && other->role() == OfRole::Master) other->set_role(OfRole::Slave);
    if (role != 0) c.set_role(OfRole(role));
    std::vector<uint8_t> out;
    begin_message(out, v, OFPT13_ROLE_REPLY, h.xid);
    ByteWriter w(out);
    w.u32(uint32_t(c.role()));
    w.u32(0);
    w.u64(role_generation_);
    finish_message(out);
    c.send(out);
  } else if (v == kOf13 && h.type == OFPT13_GET_ASYNC_REQUEST) {
    std::vector<uint8_t> out;
    begin_message(out, v, OFPT13_GET_ASYNC_REPLY, h.xid);
    ByteWriter w(out);
    w.u32(0x3); w.u32(0x0); w.u32(0x7); w.u32(0x7); w.u32(0xf); w.u32(0x0);
    finish_message(out);
    c.send(out);
  } else if (v == kOf13 && h.type == OFPT13_SET_ASYNC) {
    // Accepted; every asynchronous message goes to masters and equals.
  } else if (h.type == OFPT_EXPERIMENTER) {
    ByteReader r(msg.subspan(kOfHeaderLen));
    uint32_t vendor = r.u32(), subtype = r.u32();
    if (v == kOf10 && r.ok() && vendor == kNxVendorId && subtype == NXT_SET_FLOW_FORMAT) {
      // NXM flow format: flow stats come as NXST_FLOW with NXM matches (what cookie masks need).
      uint32_t format = r.u32();
      if (!r.ok()) return reply_error(of_error(OFPET_BAD_REQUEST, 6, "short set_flow_format"));
      if (format != NXFF_OPENFLOW10 && format != NXFF_NXM)
        return reply_error(of_error(OFPET_BAD_REQUEST, 5, "unsupported flow format"));
      c.nxm_flow_format = format == NXFF_NXM;
      return;
    }
    if (v == kOf10 && r.ok() && vendor == kNxVendorId && subtype == NXT_FLOW_MOD) {
      if (slave) return reply_error(of_error(OFPET_BAD_REQUEST, 10, "slave"));
      auto fm = decode_nx_flow_mod(msg);
      if (!fm) return reply_error(fm.error());
      auto applied = apply_flow_mod(*fm, v);
      if (!applied) return reply_error(applied.error());
      return;
    }
    reply_error(of_error(OFPET_BAD_REQUEST, 3, "experimenter messages are not supported"));
  } else if (v == kOf13 && h.type == OFPT13_METER_MOD) {
    if (slave) return reply_error(of_error(OFPET_BAD_REQUEST, 10, "slave"));
    auto mm = decode_meter_mod(msg);
    if (!mm) return reply_error(mm.error());
    auto r = apply_meter_mod(*mm);
    if (!r) return reply_error(r.error());
  } else {
    reply_error(of_error(OFPET_BAD_REQUEST, 1, "unsupported message type"));
  }
}

namespace {

// Builds multipart replies, splitting into several messages (REPLY_MORE) when large.
class MultipartReply {
public:
  // `prefix` is repeated at the start of every message's body (a vendor stats header).
  MultipartReply(OfConnection& c, uint32_t xid, uint16_t type, std::vector<uint8_t> prefix = {})
      : c_(c), xid_(xid), type_(type), prefix_(std::move(prefix)) {
    begin();
  }
  ByteWriter writer() { return ByteWriter(cur_); }
  std::vector<uint8_t>& buffer() { return cur_; }
  // Call after each entry: starts a new message when this one is big enough.
  void entry_done() {
    if (cur_.size() >= kMultipartChunk) {
      finish(true);
      begin();
    }
  }
  void done() { finish(false); }

private:
  void begin() {
    cur_.clear();
    uint8_t v = c_.version();
    begin_message(cur_, v, v == kOf10 ? OFPT10_STATS_REPLY : OFPT13_MULTIPART_REPLY, xid_);
    ByteWriter w(cur_);
    w.u16(type_);
    w.u16(0);
    if (v != kOf10) w.u32(0);
    w.bytes(prefix_.data(), prefix_.size());
  }
  void finish(bool more) {
    if (more) ByteWriter(cur_).patch_u16(10, kMultipartMore);
    finish_message(cur_);
    c_.send(cur_);
  }
  OfConnection& c_;
  uint32_t xid_;
  uint16_t type_;
  std::vector<uint8_t> prefix_;
  std::vector<uint8_t> cur_;
};

// Flow statistics list tables in order, each table's flows by descending priority.
void sort_for_dump(std::vector<Rule*>& rules) {
  std::sort(rules.begin(), rules.end(), [](const Rule* a, const Rule* b) {
    if (a->table_id != b->table_id) return a->table_id < b->table_id;
    return a->priority > b->priority;
  });
}

// An aggregate reply's body (the same in OpenFlow 1.0, 1.3 and NXST_AGGREGATE).
void write_aggregate(ByteWriter w, const std::vector<Rule*>& rules) {
  uint64_t packets = 0, bytes = 0;
  for (const Rule* rule : rules) {
    packets += rule->packets;
    bytes += rule->bytes;
  }
  w.u64(packets);
  w.u64(bytes);
  w.u32(uint32_t(rules.size()));
  w.u32(0);
}

void duration(ByteWriter& w, Clock::time_point since) {
  auto age = Clock::now() - since;
  auto sec = std::chrono::duration_cast<std::chrono::seconds>(age);
  w.u32(uint32_t(sec.count()));
  w.u32(uint32_t(std::chrono::duration_cast<std::chrono::nanoseconds>(age - sec).count()));
}

}  // namespace

void Bridge::handle_multipart(OfConnection& c, std::span<const uint8_t> msg) {
  uint8_t v = c.version();
  OfHeader h = decode_header(msg.data());
  ByteReader r(msg.subspan(kOfHeaderLen));
  uint16_t type = r.u16();
  r.u16();  // flags
  if (v != kOf10) r.skip(4);
  auto error = [&](uint16_t t, uint16_t code, const char* what) {
    c.send(make_error(v, h.xid, of_error(t, code, what), msg));
  };
  if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short multipart request");

  switch (type) {
    case OFPMP_DESC: {
      MultipartReply rep(c, h.xid, type);
      ByteWriter w = rep.writer();
      w.fixed_string("Keel", 256);
      w.fixed_string("keel-switch", 256);
      w.fixed_string("0.1.0", 256);
      w.fixed_string("None", 32);
      w.fixed_string(name_, 256);
      rep.done();
      return;
    }
    case OFPMP_FLOW:
    case OFPMP_AGGREGATE: {
      uint8_t table_id;
      uint32_t out_port, out_group = OFPG_ANY;
      uint64_t cookie = 0, cookie_mask = 0;
      Match match;
      if (v == kOf10) {
        auto m = decode_match_of10(r);
        if (!m) return c.send(make_error(v, h.xid, m.error(), msg));
        match = *m;
        table_id = r.u8();
        r.skip(1);
        out_port = port_from_of10(r.u16());
      } else {
        table_id = r.u8();
        r.skip(3);
        out_port = r.u32();
        out_group = r.u32();
        r.skip(4);
        cookie = r.u64();
        cookie_mask = r.u64();
        if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short flow stats request");
        auto m = decode_match_oxm(r);
        if (!m) return c.send(make_error(v, h.xid, m.error(), msg));
        match = *m;
      }
      if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short flow stats request");
      if (table_id != OFPTT_ALL && table_id >= kNumTables) return error(OFPET_BAD_REQUEST, 9, "bad table");
      auto rules = select_rules(table_id, match, false, 0, cookie, cookie_mask, out_port, out_group);
      sort_for_dump(rules);
      MultipartReply rep(c, h.xid, type);
      if (type == OFPMP_AGGREGATE) {
        write_aggregate(rep.writer(), rules);
        rep.done();
        return;
      }
      for (Rule* rule : rules) {
        auto& buf = rep.buffer();
        size_t start = buf.size();
        ByteWriter w = rep.writer();
        w.u16(0);
        w.u8(rule->table_id);
        w.u8(0);
        if (v == kOf10) encode_match_of10(w, rule->match);
        duration(w, rule->created);
        w.u16(rule->priority);
        w.u16(rule->idle_timeout);
        w.u16(rule->hard_timeout);
        if (v == kOf10) {
          w.zeros(6);
        } else {
          w.u16(rule->flags);
          w.zeros(4);
        }
        w.u64(rule->cookie);
        w.u64(rule->packets);
        w.u64(rule->bytes);
        if (v == kOf10) {
          encode_actions(kOf10, w, rule->instructions.apply);
        } else {
          encode_match_oxm(w, rule->match);
          encode_instructions(w, rule->instructions);
        }
        w.patch_u16(start, uint16_t(buf.size() - start));
        rep.entry_done();
      }
      rep.done();
      return;
    }
    case OFPMP_TABLE: {
      MultipartReply rep(c, h.xid, type);
      for (uint8_t t = 0; t < kNumTables; ++t) {
        ByteWriter w = rep.writer();
        uint32_t active = tables_[t] ? uint32_t(tables_[t]->size()) : 0;
        w.u8(t);
        w.zeros(3);
        if (v == kOf10) {
          w.zeros(32);  // unnamed, as Open vSwitch reports its tables
          w.u32(0x3fffff);
          w.u32(1000000);
        }
        w.u32(active);
        w.u64(table_stats_[t].lookups);
        w.u64(table_stats_[t].matched);
        rep.entry_done();
      }
      rep.done();
      return;
    }
    case OFPMP_PORT_STATS: {
      uint32_t port_no = v == kOf10 ? port_from_of10(r.u16()) : r.u32();
      if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short port stats request");
      if (v == kOf10 && port_no == 0xffffffff) port_no = OFPP_ANY;
      if (port_no != OFPP_ANY && !port_by_ofport(port_no)) return error(OFPET_BAD_REQUEST, 11, "no such port");
      MultipartReply rep(c, h.xid, type);
      for (auto& [no, bp] : ports_) {
        if (port_no != OFPP_ANY && no != port_no) continue;
        bp->port->sync_counters();
        const PortCounters& k = bp->port->counters;
        ByteWriter w = rep.writer();
        if (v == kOf10) {
          w.u16(port_to_of10(no));
          w.zeros(6);
        } else {
          w.u32(no);
          w.zeros(4);
        }
        w.u64(k.rx_packets);
        w.u64(k.tx_packets);
        w.u64(k.rx_bytes);
        w.u64(k.tx_bytes);
        w.u64(k.rx_dropped);
        w.u64(k.tx_dropped);
        w.u64(k.rx_errors);
        w.u64(k.tx_errors);
        w.u64(0);
        w.u64(0);
        w.u64(0);
        w.u64(0);
        if (v != kOf10) duration(w, bp->created);
        rep.entry_done();
      }
      rep.done();
      return;
    }
    case OFPMP_QUEUE: {
      MultipartReply rep(c, h.xid, type);
      rep.done();
      return;
    }
    case OFPMP_PORT_DESC: {
      // Also answered for 1.0, where it is an Open vSwitch extension that ovs-ofctl relies on.
      MultipartReply rep(c, h.xid, type);
      for (auto& [no, bp] : ports_) {
        ByteWriter w = rep.writer();
        encode_port(v, w, *bp);
        rep.entry_done();
      }
      rep.done();
      return;
    }
    default:
      break;
  }
  if (v == kOf10) {
    if (type == OFPMP_EXPERIMENTER) return handle_nx_stats(c, msg, r);
    return error(OFPET_BAD_REQUEST, 2, "unsupported stats type");
  }
  switch (type) {
    case OFPMP_GROUP:
    case OFPMP_GROUP_DESC: {
      uint32_t gid = OFPG_ALL;
      if (type == OFPMP_GROUP) {
        gid = r.u32();
        if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short group stats request");
      }
      MultipartReply rep(c, h.xid, type);
      for (auto& [id, g] : groups_) {
        if (gid != OFPG_ALL && gid != id) continue;
        auto& buf = rep.buffer();
        size_t start = buf.size();
        ByteWriter w = rep.writer();
        w.u16(0);
        if (type == OFPMP_GROUP_DESC) {
          w.u8(g->type);
          w.u8(0);
          w.u32(id);
          encode_buckets(w, g->buckets);
        } else {
          w.u16(0);
          w.u32(id);
          uint32_t refs = 0;
          for (auto& [raw, rule] : rules_)
            if (rule_uses_group(*rule, id)) ++refs;
          w.u32(refs);
          w.u32(0);
          w.u64(g->packets);
          w.u64(g->bytes);
          duration(w, g->created);
          for (auto& [p, b] : g->bucket_counts) {
            w.u64(p);
            w.u64(b);
          }
        }
        w.patch_u16(start, uint16_t(buf.size() - start));
        rep.entry_done();
      }
      rep.done();
      return;
    }
    case OFPMP_GROUP_FEATURES: {
      MultipartReply rep(c, h.xid, type);
      ByteWriter w = rep.writer();
      w.u32(0xf);         // all four group types
      w.u32(0x1 | 0x2);   // SELECT_WEIGHT, SELECT_LIVENESS
      for (int i = 0; i < 4; ++i) w.u32(OFPG_MAX);
      // Actions each group type supports: output, group, push/pop vlan, set_field, dec ttl...
      uint32_t acts = 1u << 0 | 1u << 17 | 1u << 18 | 1u << 21 | 1u << 22 | 1u << 23 | 1u << 24 | 1u << 25;
      for (int i = 0; i < 4; ++i) w.u32(acts);
      rep.done();
      return;
    }
    case OFPMP_TABLE_FEATURES: {
      if (r.remaining() > 0) return error(OFPET_BAD_REQUEST, 5, "table features cannot be changed");
      MultipartReply rep(c, h.xid, type);
      for (uint8_t t = 0; t < kNumTables; ++t) {
        auto& buf = rep.buffer();
        size_t start = buf.size();
        ByteWriter w = rep.writer();
        w.u16(0);
        w.u8(t);
        w.zeros(5);
        w.zeros(32);
        w.u64(~0ull);
        w.u64(~0ull);
        w.u32(0);
        w.u32(1000000);
        // The required properties, empty: INSTRUCTIONS, NEXT_TABLES, WRITE_ACTIONS, APPLY_ACTIONS,
        // MATCH, WILDCARDS, WRITE_SETFIELD, APPLY_SETFIELD.
        for (uint16_t prop : {0, 2, 4, 6, 8, 10, 12, 14}) {
          w.u16(prop);
          w.u16(4);
          w.u32(0);
        }
        w.patch_u16(start, uint16_t(buf.size() - start));
        rep.entry_done();
      }
      rep.done();
      return;
    }
    case OFPMP_METER:
    case OFPMP_METER_CONFIG: {
      uint32_t id = r.u32();
      if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short meter request");
      std::vector<const Meter*> selected;
      if (id == OFPM_ALL) {
        for (auto& [mid, m] : meters_.meters()) selected.push_back(m.get());
      } else if (const Meter* m = meters_.find(id)) {
        selected.push_back(m);
      } else {
        return error(OFPET_METER_MOD_FAILED, 3, "no such meter");
      }
      MultipartReply rep(c, h.xid, type);
      for (const Meter* m : selected) {
        auto& buf = rep.buffer();
        size_t start = buf.size();
        ByteWriter w = rep.writer();
        if (type == OFPMP_METER_CONFIG) {
          w.u16(0);  // length, patched
          w.u16(m->flags());
          w.u32(m->id());
          encode_meter_bands(w, m->bands());
          w.patch_u16(start, uint16_t(buf.size() - start));
        } else {
          uint32_t flows = 0;
          for (auto& [raw, rule] : rules_)
            if (rule->instructions.meter == m->id()) ++flows;
          w.u32(m->id());
          w.u16(0);  // length, patched
          w.zeros(6);
          w.u32(flows);
          w.u64(m->packets_in());
          w.u64(m->bytes_in());
          duration(w, m->created());
          for (const auto& band : m->band_counters()) {
            w.u64(band.packets);
            w.u64(band.bytes);
          }
          w.patch_u16(start + 4, uint16_t(buf.size() - start));
        }
        rep.entry_done();
      }
      rep.done();
      return;
    }
    case OFPMP_METER_FEATURES: {
      MultipartReply rep(c, h.xid, type);
      ByteWriter w = rep.writer();
      w.u32(MeterTable::kMaxMeters);
      w.u32(1u << OFPMBT_DROP);  // band types
      w.u32(OFPMF_KBPS | OFPMF_PKTPS | OFPMF_BURST | OFPMF_STATS);
      w.u8(uint8_t(kMaxMeterBands));
      w.u8(0);  // max colour
      w.zeros(2);
      rep.done();
      return;
    }
    case OFPMP_EXPERIMENTER:
      return error(OFPET_BAD_REQUEST, 3, "experimenter multipart");
    default:
      return error(OFPET_BAD_REQUEST, 2, "unsupported multipart type");
  }
}

// Nicira vendor stats (OpenFlow 1.0): NXST_FLOW and NXST_AGGREGATE, flow stats with NXM matches. `r`
// stands after the stats header's type and flags.
void Bridge::handle_nx_stats(OfConnection& c, std::span<const uint8_t> msg, ByteReader r) {
  OfHeader h = decode_header(msg.data());
  auto error = [&](uint16_t t, uint16_t code, const char* what) {
    c.send(make_error(kOf10, h.xid, of_error(t, code, what), msg));
  };
  uint32_t vendor = r.u32(), subtype = r.u32();
  r.skip(4);
  if (!r.ok()) return error(OFPET_BAD_REQUEST, 6, "short vendor stats request");
  if (vendor != kNxVendorId) return error(OFPET_BAD_REQUEST, 3, "unknown vendor");
  if (subtype != NXST_FLOW && subtype != NXST_AGGREGATE) return error(OFPET_BAD_REQUEST, 2, "unsupported subtype");
  uint32_t out_port = port_from_of10(r.u16());
  uint16_t match_len = r.u16();
  uint8_t table_id = r.u8();
  r.skip(3);
  if (!r.ok() || !r.has(match_len)) return error(OFPET_BAD_REQUEST, 6, "short NXST request");
  uint64_t cookie = 0, cookie_mask = 0;
  auto match = decode_match_nxm(r.sub(match_len), &cookie, &cookie_mask);
  if (!match) return c.send(make_error(kOf10, h.xid, match.error(), msg));
  if (table_id != OFPTT_ALL && table_id >= kNumTables) return error(OFPET_BAD_REQUEST, 9, "bad table");
  auto rules = select_rules(table_id, *match, false, 0, cookie, cookie_mask, out_port, OFPG_ANY);
  sort_for_dump(rules);
  std::vector<uint8_t> prefix;
  ByteWriter pw(prefix);
  pw.u32(kNxVendorId);
  pw.u32(subtype);
  pw.zeros(4);
  MultipartReply rep(c, h.xid, OFPST10_VENDOR, std::move(prefix));
  if (subtype == NXST_AGGREGATE) {
    write_aggregate(rep.writer(), rules);
    rep.done();
    return;
  }
  auto now = Clock::now();
  // Ages as Open vSwitch sends them: seconds plus one (0 would mean unknown), capped.
  auto age = [&](Clock::time_point since) {
    auto s = std::chrono::duration_cast<std::chrono::seconds>(now - since).count();
    return uint16_t(std::min<int64_t>(std::max<int64_t>(s, 0), 0xfffe) + 1);
  };
  for (Rule* rule : rules) {
    auto& buf = rep.buffer();
    size_t start = buf.size();
    ByteWriter w = rep.writer();
    w.u16(0);  // length, patched
    w.u8(rule->table_id);
    w.u8(0);
    duration(w, rule->created);
    w.u16(rule->priority);
    w.u16(rule->idle_timeout);
    w.u16(rule->hard_timeout);
    size_t match_len_at = buf.size();
    w.u16(0);  // match_len, patched
    w.u16(age(rule->last_used));
    w.u16(age(rule->created));
    w.u64(rule->cookie);
    w.u64(rule->packets);
    w.u64(rule->bytes);
    size_t len = encode_match_nxm(w, rule->match);
    w.patch_u16(match_len_at, uint16_t(len));
    w.pad_to(8, start);
    encode_actions(kOf10, w, rule->instructions.apply);
    w.patch_u16(start, uint16_t(buf.size() - start));
    rep.entry_done();
  }
  rep.done();
}

}  // namespace keel::sw
