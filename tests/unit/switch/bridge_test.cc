#include "switch/bridge.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>
#include <filesystem>
#include <unistd.h>

#include "base/log.h"
#include "switch/memory_port.h"
#include "switch/of_connection.h"
#include "test_util.h"

namespace keel::sw {
namespace {

using test::set;

const uint8_t kMacA[6] = {2, 0, 0, 0, 0, 0xa};
const uint8_t kMacB[6] = {2, 0, 0, 0, 0, 0xb};
const uint8_t kBcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

class BridgeTest : public ::testing::Test {
protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    loop_ = std::move(*EventLoop::create());
    bridge_ = std::make_unique<Bridge>(*loop_, "br0", 1);
    for (int i = 0; i < 4; ++i) {
      auto p = std::make_unique<MemoryPort>();
      ports_[i] = p.get();
      ASSERT_TRUE(bridge_->add_port("p" + std::to_string(i + 1), "memory", std::move(p)));
    }
  }
  void add_normal() {
    FlowMod fm;
    Action a;
    a.arg = OFPP_NORMAL;
    fm.instructions.has_apply = true;
    fm.instructions.apply = {a};
    ASSERT_TRUE(bridge_->apply_flow_mod(fm));
  }
  void inject(int port, std::vector<uint8_t> frame) {
    ports_[port]->push_rx(std::move(frame));
    bridge_->poll_ports_once();
  }
  size_t sent(int port) { return ports_[port]->sent().size(); }
  void clear_sent() {
    for (auto* p : ports_) p->sent().clear();
  }
  FlowMod flow(uint16_t priority, std::vector<Action> actions, uint8_t command = OFPFC_ADD) {
    FlowMod fm;
    fm.priority = priority;
    fm.command = command;
    fm.instructions.has_apply = true;
    fm.instructions.apply = std::move(actions);
    return fm;
  }
  static Action output(uint32_t port) {
    Action a;
    a.arg = port;
    return a;
  }

  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Bridge> bridge_;
  MemoryPort* ports_[4];
};

TEST_F(BridgeTest, NormalFloodsThenLearns) {
  add_normal();
  inject(0, test::ipv4_frame(kBcast, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(0), 0u);
  EXPECT_EQ(sent(1), 1u);
  EXPECT_EQ(sent(2), 1u);
  EXPECT_EQ(sent(3), 1u);
  clear_sent();
  inject(1, test::ipv4_frame(kMacA, kMacB, 2, 1, 17, 2, 1));  // B answers A: A was learned on port 1
  EXPECT_EQ(sent(0), 1u);
  EXPECT_EQ(sent(2) + sent(3), 0u);
  clear_sent();
  inject(0, test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(1), 1u);
  EXPECT_EQ(sent(2) + sent(3), 0u);
  EXPECT_EQ(bridge_->mac_table().size(), 2u);
}

TEST_F(BridgeTest, NormalVlanAccessAndTrunk) {
  add_normal();
  bridge_->set_port_vlan(*bridge_->port_by_ofport(1), PortVlan{10, {}});
  bridge_->set_port_vlan(*bridge_->port_by_ofport(2), PortVlan{10, {}});
  bridge_->set_port_vlan(*bridge_->port_by_ofport(3), PortVlan{20, {}});
  bridge_->set_port_vlan(*bridge_->port_by_ofport(4), PortVlan{std::nullopt, {10, 20}});
  inject(0, test::ipv4_frame(kBcast, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(1), 1u);
  EXPECT_EQ(sent(2), 0u);  // other VLAN
  ASSERT_EQ(sent(3), 1u);  // trunk: tagged with 10
  auto& tagged = ports_[3]->sent()[0];
  ASSERT_GE(tagged.size(), 18u);
  EXPECT_EQ(tagged[12], 0x81);
  EXPECT_EQ(((tagged[14] << 8 | tagged[15]) & 0xfff), 10);
  EXPECT_EQ(ports_[1]->sent()[0][12], 0x08);  // access port: untagged
  clear_sent();
  // A tagged frame from the trunk in VLAN 20 reaches only port 3, untagged.
  inject(3, test::ipv4_frame(kBcast, kMacB, 1, 2, 17, 1, 2, 20));
  EXPECT_EQ(sent(0) + sent(1), 0u);
  ASSERT_EQ(sent(2), 1u);
  EXPECT_EQ(ports_[2]->sent()[0][12], 0x08);
  clear_sent();
  // A tagged frame on an access port is dropped; a VLAN the trunk does not carry is dropped.
  inject(0, test::ipv4_frame(kBcast, kMacA, 1, 2, 17, 1, 2, 10));
  inject(3, test::ipv4_frame(kBcast, kMacB, 1, 2, 17, 1, 2, 30));
  EXPECT_EQ(sent(0) + sent(1) + sent(2) + sent(3), 0u);
}

TEST_F(BridgeTest, FlowModSemantics) {
  FlowMod a = flow(10, {output(2)});
  set(a.match, Oxm::InPort, 1);
  a.cookie = 0x1;
  FlowMod b = flow(20, {output(3)});
  set(b.match, Oxm::InPort, 1);
  set(b.match, Oxm::EthType, 0x0800);
  b.cookie = 0x2;
  ASSERT_TRUE(bridge_->apply_flow_mod(a));
  ASSERT_TRUE(bridge_->apply_flow_mod(b));
  EXPECT_EQ(bridge_->flow_count(), 2u);
  // Re-adding the same match and priority replaces, not duplicates.
  ASSERT_TRUE(bridge_->apply_flow_mod(a));
  EXPECT_EQ(bridge_->flow_count(), 2u);
  // Overlap check: same priority, overlapping match.
  FlowMod c = flow(10, {output(4)});
  set(c.match, Oxm::EthType, 0x0800);
  c.flags = OFPFF_CHECK_OVERLAP;
  auto r = bridge_->apply_flow_mod(c);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().type, OFPET_FLOW_MOD_FAILED);
  EXPECT_EQ(r.error().code, 3);
  // Non-strict delete with a cookie mask deletes only matching cookies.
  FlowMod del = flow(0, {}, OFPFC_DELETE);
  del.table_id = OFPTT_ALL;
  del.cookie = 0x2;
  del.cookie_mask = 0xff;
  ASSERT_TRUE(bridge_->apply_flow_mod(del));
  EXPECT_EQ(bridge_->flow_count(), 1u);
  // Strict delete needs the exact priority.
  FlowMod sdel = flow(11, {}, OFPFC_DELETE_STRICT);
  set(sdel.match, Oxm::InPort, 1);
  ASSERT_TRUE(bridge_->apply_flow_mod(sdel));
  EXPECT_EQ(bridge_->flow_count(), 1u);
  sdel.priority = 10;
  ASSERT_TRUE(bridge_->apply_flow_mod(sdel));
  EXPECT_EQ(bridge_->flow_count(), 0u);
  // 1.0: modify of nothing adds; 1.3: it does nothing.
  FlowMod mod = flow(5, {output(2)}, OFPFC_MODIFY);
  ASSERT_TRUE(bridge_->apply_flow_mod(mod, kOf13));
  EXPECT_EQ(bridge_->flow_count(), 0u);
  ASSERT_TRUE(bridge_->apply_flow_mod(mod, kOf10));
  EXPECT_EQ(bridge_->flow_count(), 1u);
  // Delete filtered by out_port.
  FlowMod del_out = flow(0, {}, OFPFC_DELETE);
  del_out.out_port = 3;
  ASSERT_TRUE(bridge_->apply_flow_mod(del_out));
  EXPECT_EQ(bridge_->flow_count(), 1u);
  del_out.out_port = 2;
  ASSERT_TRUE(bridge_->apply_flow_mod(del_out));
  EXPECT_EQ(bridge_->flow_count(), 0u);
}

TEST_F(BridgeTest, PipelineGotoTableMetadataAndCache) {
  FlowMod t0 = flow(1, {});
  t0.instructions.has_apply = false;
  t0.instructions.has_metadata = true;
  t0.instructions.metadata = 0x5;
  t0.instructions.metadata_mask = 0xff;
  t0.instructions.goto_table = 2;
  ASSERT_TRUE(bridge_->apply_flow_mod(t0));
  FlowMod t2 = flow(1, {output(4)});
  t2.table_id = 2;
  set(t2.match, Oxm::Metadata, 0x5);
  ASSERT_TRUE(bridge_->apply_flow_mod(t2));
  // Backward goto is refused.
  FlowMod back = flow(1, {});
  back.table_id = 2;
  back.instructions.goto_table = 1;
  EXPECT_FALSE(bridge_->apply_flow_mod(back));
  for (int i = 0; i < 5; ++i) inject(0, test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(3), 5u);
  EXPECT_EQ(bridge_->cache_stats().misses, 1u);
  EXPECT_EQ(bridge_->cache_stats().hits, 4u);
  // A flow change invalidates the cache: the next frame takes the new path.
  FlowMod drop = flow(100, {});
  ASSERT_TRUE(bridge_->apply_flow_mod(drop));
  inject(0, test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(3), 5u);
}

TEST_F(BridgeTest, SetFieldPushVlanAndDecTtl) {
  Action set_dst;
  set_dst.type = ActionType::SetField;
  set_dst.field = uint8_t(Oxm::Ipv4Dst);
  uint8_t ip[4] = {10, 9, 9, 9};
  std::memcpy(set_dst.value, ip, 4);
  Action push;
  push.type = ActionType::PushVlan;
  push.ethertype = 0x8100;
  Action vid;
  vid.type = ActionType::SetField;
  vid.field = uint8_t(Oxm::VlanVid);
  vid.value[0] = 0x10;
  vid.value[1] = 42;
  Action ttl;
  ttl.type = ActionType::DecNwTtl;
  FlowMod fm = flow(1, {set_dst, ttl, push, vid, output(2)});
  set(fm.match, Oxm::EthType, 0x0800);
  ASSERT_TRUE(bridge_->apply_flow_mod(fm));
  inject(0, test::ipv4_frame(kMacB, kMacA, 0x0a000001, 0x0a000002, 6, 1000, 80));
  ASSERT_EQ(sent(1), 1u);
  auto& f = ports_[1]->sent()[0];
  ASSERT_EQ(f[12], 0x81);
  EXPECT_EQ(((f[14] << 8 | f[15]) & 0xfff), 42);
  const uint8_t* iph = &f[18];
  EXPECT_EQ(iph[8], 63);
  EXPECT_EQ(iph[16], 10);
  EXPECT_EQ(iph[19], 9);
  EXPECT_EQ(test::ipv4_header_checksum(iph), 0);
  EXPECT_TRUE(test::l4_checksum_ok(f, 18));
}

TEST_F(BridgeTest, GroupsSelectAndFastFailover) {
  GroupMod ff;
  ff.command = 0;
  ff.type = OFPGT_FF;
  ff.group_id = 1;
  Bucket b1, b2;
  b1.watch_port = 2;
  b1.actions = {output(2)};
  b2.watch_port = 3;
  b2.actions = {output(3)};
  ff.buckets = {b1, b2};
  ASSERT_TRUE(bridge_->apply_group_mod(ff));
  Action g;
  g.type = ActionType::Group;
  g.arg = 1;
  ASSERT_TRUE(bridge_->apply_flow_mod(flow(1, {g})));
  inject(0, test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(1), 1u);
  // Port 2 goes down: the group fails over to port 3 (the link check runs on the bridge timer; emulate).
  ports_[1]->up = false;
  bridge_->port_by_ofport(2)->live = false;
  FlowMod touch = flow(0, {});  // any change invalidates cached decisions
  ASSERT_TRUE(bridge_->apply_flow_mod(touch));
  inject(0, test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  EXPECT_EQ(sent(2), 1u);
  // Deleting the group deletes the flows that use it.
  GroupMod del;
  del.command = 2;
  del.group_id = OFPG_ALL;
  ASSERT_TRUE(bridge_->apply_group_mod(del));
  EXPECT_EQ(bridge_->flow_count(), 1u);
  // Adding a group twice is an error; a flow to an unknown group too.
  ASSERT_TRUE(bridge_->apply_group_mod(ff));
  EXPECT_FALSE(bridge_->apply_group_mod(ff));
  g.arg = 99;
  EXPECT_FALSE(bridge_->apply_flow_mod(flow(2, {g})));
}

TEST_F(BridgeTest, PacketInAndErrorsOverAConnection) {
  std::vector<uint8_t> out;
  OfConnection conn(*bridge_, UniqueFd(), "test", nullptr);
  conn.capture = &out;
  ASSERT_TRUE(conn.start());
  out.clear();
  std::vector<uint8_t> hello = {4, 0, 0, 8, 0, 0, 0, 1};
  conn.feed(hello);
  EXPECT_EQ(conn.version(), kOf13);
  // Echo.
  conn.feed(std::vector<uint8_t>{4, 2, 0, 10, 0, 0, 0, 9, 'h', 'i'});
  ASSERT_EQ(out.size(), 10u);
  EXPECT_EQ(out[1], OFPT_ECHO_REPLY);
  EXPECT_EQ(out[8], 'h');
  out.clear();
  // Unknown message type: BAD_REQUEST/BAD_TYPE echoing the xid.
  conn.feed(std::vector<uint8_t>{4, 99, 0, 8, 0, 0, 0, 42});
  ASSERT_GE(out.size(), 12u);
  EXPECT_EQ(out[1], OFPT_ERROR);
  EXPECT_EQ(out[7], 42);
  EXPECT_EQ(out[9], OFPET_BAD_REQUEST);
  EXPECT_EQ(out[11], 1);
  out.clear();
  // A flow sending to the controller produces a PACKET_IN with the frame.
  Action ctl;
  ctl.arg = OFPP_CONTROLLER;
  ctl.max_len = 0xffff;
  ASSERT_TRUE(bridge_->apply_flow_mod(flow(1, {ctl})));
  auto frame = test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2);
  inject(0, frame);
  ASSERT_GT(out.size(), frame.size());
  EXPECT_EQ(out[1], OFPT_PACKET_IN);
  EXPECT_TRUE(std::equal(frame.begin(), frame.end(), out.end() - long(frame.size())));
}

// A 1.0 peer that chose the NXM flow format gets FLOW_REMOVED as NXT_FLOW_REMOVED with an NXM match.
TEST_F(BridgeTest, FlowRemovedInNxmFormat) {
  std::vector<uint8_t> out;
  OfConnection conn(*bridge_, UniqueFd(), "test", nullptr);
  conn.capture = &out;
  ASSERT_TRUE(conn.start());
  conn.feed(std::vector<uint8_t>{1, 0, 0, 8, 0, 0, 0, 1});
  ASSERT_EQ(conn.version(), kOf10);
  // NXT_SET_FLOW_FORMAT(NXM): no reply.
  out.clear();
  conn.feed(std::vector<uint8_t>{1, 4, 0, 20, 0, 0, 0, 2, 0, 0, 0x23, 0x20, 0, 0, 0, 12, 0, 0, 0, 2});
  EXPECT_TRUE(out.empty());
  EXPECT_TRUE(conn.nxm_flow_format);
  FlowMod fm = flow(3, {output(2)});
  set(fm.match, Oxm::EthType, 0x86dd);
  fm.flags = OFPFF_SEND_FLOW_REM;
  fm.cookie = 0x99;
  fm.hard_timeout = 1;
  ASSERT_TRUE(bridge_->apply_flow_mod(fm, kOf10));
  bridge_->expire_flows(Clock::now() + std::chrono::seconds(2));
  // Nicira header (16), then cookie, priority, reason, table, durations, idle, match_len, counters (40),
  // then NXM_OF_ETH_TYPE (6 bytes) padded to 8.
  ASSERT_EQ(out.size(), 16u + 40u + 8u);
  EXPECT_EQ(out[1], OFPT_EXPERIMENTER);
  EXPECT_EQ(out[15], NXT_FLOW_REMOVED);
  EXPECT_EQ(out[23], 0x99);        // cookie
  EXPECT_EQ(out[26], 1);           // reason: hard timeout
  EXPECT_EQ(out[39], 6);           // match_len
  EXPECT_EQ(out[59], 2);           // NXM_OF_ETH_TYPE header (00 00 06 02), then its value
  EXPECT_EQ(out[60], 0x86);
  EXPECT_EQ(out[61], 0xdd);
}

TEST_F(BridgeTest, IdleAndHardTimeouts) {
  FlowMod idle = flow(1, {output(2)});
  idle.idle_timeout = 5;
  set(idle.match, Oxm::InPort, 1);
  FlowMod hard = flow(1, {output(2)});
  hard.hard_timeout = 10;
  set(hard.match, Oxm::InPort, 2);
  ASSERT_TRUE(bridge_->apply_flow_mod(idle));
  ASSERT_TRUE(bridge_->apply_flow_mod(hard));
  auto now = Clock::now();
  bridge_->expire_flows(now + std::chrono::seconds(3));
  EXPECT_EQ(bridge_->flow_count(), 2u);
  bridge_->expire_flows(now + std::chrono::seconds(6));
  EXPECT_EQ(bridge_->flow_count(), 1u);
  bridge_->expire_flows(now + std::chrono::seconds(11));
  EXPECT_EQ(bridge_->flow_count(), 0u);
}

// Flow table operations at the scale a controller programs them (10,000+ flows, one flow-mod each):
// non-strict modify and delete select exactly the flows their match covers, strict ones exactly one,
// and timeouts apply to the timed flows only.
TEST_F(BridgeTest, FlowTableOperationsAtTenThousandFlows) {
  auto tcp_flow = [&](uint32_t i, uint8_t command = OFPFC_ADD) {
    FlowMod fm = flow(uint16_t(100 + i % 50), {output(1)}, command);
    set(fm.match, Oxm::EthType, 0x0800);
    set(fm.match, Oxm::IpProto, 6);
    set(fm.match, Oxm::Ipv4Dst, 0xac100000 | i);
    set(fm.match, Oxm::TcpDst, i % 1000 + 1);
    return fm;
  };
  auto ip_flow = [&](uint32_t i, uint8_t command = OFPFC_ADD) {
    FlowMod fm = flow(uint16_t(200 + i % 50), {output(2)}, command);
    set(fm.match, Oxm::EthType, 0x0800);
    set(fm.match, Oxm::Ipv4Dst, 0xac100000 | i);
    return fm;
  };
  for (uint32_t i = 0; i < 6000; ++i) {
    ASSERT_TRUE(bridge_->apply_flow_mod(tcp_flow(i)));
    FlowMod ip = ip_flow(i);
    if (i % 10 == 0) ip.hard_timeout = 30;  // 600 timed flows
    ASSERT_TRUE(bridge_->apply_flow_mod(ip));
  }
  EXPECT_EQ(bridge_->flow_count(), 12000u);
  // Re-adding identical flows replaces them.
  for (uint32_t i = 0; i < 100; ++i) ASSERT_TRUE(bridge_->apply_flow_mod(tcp_flow(i)));
  EXPECT_EQ(bridge_->flow_count(), 12000u);

  // Non-strict delete of `ip,nw_dst=X` takes both the ip flow and the tcp flow to X (the wider match
  // covers both); the priority of the request does not matter.
  for (uint32_t i = 0; i < 1000; ++i) {
    FlowMod del = ip_flow(i, OFPFC_DELETE);
    del.table_id = OFPTT_ALL;
    del.priority = 7;
    ASSERT_TRUE(bridge_->apply_flow_mod(del));
  }
  EXPECT_EQ(bridge_->flow_count(), 10000u);
  // Strict delete needs the exact priority: a wrong one deletes nothing.
  FlowMod wrong = tcp_flow(1500, OFPFC_DELETE_STRICT);
  wrong.priority = 99;
  ASSERT_TRUE(bridge_->apply_flow_mod(wrong));
  EXPECT_EQ(bridge_->flow_count(), 10000u);
  for (uint32_t i = 1000; i < 2000; ++i) ASSERT_TRUE(bridge_->apply_flow_mod(tcp_flow(i, OFPFC_DELETE_STRICT)));
  EXPECT_EQ(bridge_->flow_count(), 9000u);

  // Non-strict modify of `ip,nw_dst=X` rewrites both flows to X, leaving the rest alone; a packet to
  // X then follows the new actions.
  for (uint32_t i = 2000; i < 3000; ++i) {
    FlowMod mod = ip_flow(i, OFPFC_MODIFY);
    mod.instructions.apply = {output(4)};
    ASSERT_TRUE(bridge_->apply_flow_mod(mod));
  }
  EXPECT_EQ(bridge_->flow_count(), 9000u);
  inject(0, test::ipv4_frame(kMacB, kMacA, 1, 0xac100000 | 2500, 6, 1234, 2500 % 1000 + 1));
  EXPECT_EQ(sent(3), 1u);
  EXPECT_EQ(sent(0) + sent(1) + sent(2), 0u);
  clear_sent();
  inject(0, test::ipv4_frame(kMacB, kMacA, 1, 0xac100000 | 3500, 6, 1234, 3500 % 1000 + 1));
  EXPECT_EQ(sent(1), 1u);  // tcp flow 3500 (priority 100) loses to ip flow 3500 (priority 200): output 2
  EXPECT_EQ(sent(3), 0u);
  clear_sent();

  // Hard timeouts: the 500 timed ip flows still there (i % 10 == 0 and i >= 1000) go, nothing else.
  size_t before = bridge_->flow_count();
  bridge_->expire_flows(Clock::now() + std::chrono::seconds(31));
  EXPECT_EQ(bridge_->flow_count(), before - 500);

  // Delete everything in one non-strict request.
  FlowMod all = flow(0, {}, OFPFC_DELETE);
  all.table_id = OFPTT_ALL;
  ASSERT_TRUE(bridge_->apply_flow_mod(all));
  EXPECT_EQ(bridge_->flow_count(), 0u);
}

TEST_F(BridgeTest, PolicingCapsRate) {
  add_normal();
  // 80 kbit/s, 8 kbit burst: 1000 bytes of burst; 60-byte frames -> 16 pass at once, then almost none.
  bridge_->set_port_policer(*bridge_->port_by_ofport(1), 80, 8);
  for (int i = 0; i < 50; ++i) ports_[0]->push_rx(test::ipv4_frame(kBcast, kMacA, 1, 2, 17, 1, 2));
  bridge_->poll_ports_once();
  bridge_->poll_ports_once();
  EXPECT_LE(sent(1), 18u);
  EXPECT_GE(sent(1), 16u);
  EXPECT_GE(ports_[0]->counters.rx_dropped, 32u);
}

// A flow's meter drops what exceeds its band (here 10 packets of burst at 1 packet/s) before the flow's
// actions run; the band counts the drops; deleting the meter deletes the flow.
TEST_F(BridgeTest, MeterDropsOverItsBand) {
  MeterMod bad;
  bad.command = 0;
  bad.meter_id = 0;
  bad.flags = OFPMF_PKTPS;
  bad.bands = {MeterBand{OFPMBT_DROP, 1, 0}};
  EXPECT_EQ(bridge_->apply_meter_mod(bad).error().code, 2);  // meter 0 is invalid
  FlowMod unknown = flow(10, {output(2)});
  unknown.instructions.meter = 7;
  EXPECT_EQ(bridge_->apply_flow_mod(unknown).error().type, OFPET_METER_MOD_FAILED);

  MeterMod mm = bad;
  mm.meter_id = 7;
  mm.flags = OFPMF_PKTPS | OFPMF_BURST | OFPMF_STATS;
  mm.bands = {MeterBand{OFPMBT_DROP, 1, 10}};
  ASSERT_TRUE(bridge_->apply_meter_mod(mm));
  EXPECT_EQ(bridge_->apply_meter_mod(mm).error().code, 1);  // exists
  ASSERT_TRUE(bridge_->apply_flow_mod(unknown));
  for (int i = 0; i < 50; ++i) ports_[0]->push_rx(test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  bridge_->poll_ports_once();
  bridge_->poll_ports_once();
  EXPECT_EQ(sent(1), 10u);
  const Meter* m = bridge_->meters().find(7);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->packets_in(), 50u);
  EXPECT_EQ(m->band_counters().at(0).packets, 40u);

  // Modify: a kbps band far above the traffic lets everything through; counters stay.
  mm.command = 1;
  mm.flags = OFPMF_KBPS;
  mm.bands = {MeterBand{OFPMBT_DROP, 1000000, 0}};
  ASSERT_TRUE(bridge_->apply_meter_mod(mm));
  clear_sent();
  for (int i = 0; i < 20; ++i) ports_[0]->push_rx(test::ipv4_frame(kMacB, kMacA, 1, 2, 17, 1, 2));
  bridge_->poll_ports_once();
  EXPECT_EQ(sent(1), 20u);
  EXPECT_EQ(m->packets_in(), 70u);

  MeterMod del;
  del.command = 2;
  del.meter_id = OFPM_ALL;
  ASSERT_TRUE(bridge_->apply_meter_mod(del));
  EXPECT_EQ(bridge_->meters().find(7), nullptr);
  EXPECT_EQ(bridge_->flow_count(), 0u);
}

TEST(MeterMod, DecodeRejectsWhatItCannotDo) {
  auto decode = [](uint16_t flags, uint16_t band_type, uint32_t rate) {
    MeterMod mm;
    mm.meter_id = 1;
    mm.flags = flags;
    mm.bands = {MeterBand{band_type, rate, 0}};
    std::vector<uint8_t> msg;
    encode_meter_mod(msg, mm, 1);
    return decode_meter_mod(msg);
  };
  EXPECT_TRUE(decode(OFPMF_KBPS, OFPMBT_DROP, 100));
  EXPECT_EQ(decode(OFPMF_KBPS, 2, 100).error().code, 8);                   // dscp_remark: bad band
  EXPECT_EQ(decode(OFPMF_KBPS, OFPMBT_DROP, 0).error().code, 6);           // rate 0
  EXPECT_EQ(decode(OFPMF_KBPS | OFPMF_PKTPS, OFPMBT_DROP, 1).error().code, 5);  // both units
  // A band cut short: the message (and its length field) ends 4 bytes into the band.
  std::vector<uint8_t> full;
  encode_meter_mod(full, MeterMod{0, OFPMF_KBPS, 1, {MeterBand{OFPMBT_DROP, 5, 0}}}, 1);
  ASSERT_EQ(full.size(), 32u);
  std::vector<uint8_t> truncated(full.begin(), full.begin() + 20);
  truncated[3] = 20;
  EXPECT_FALSE(decode_meter_mod(truncated));
}

TEST(MacTable, AgesAndLimits) {
  MacTable t;
  t.set_limits(2, std::chrono::seconds(10));
  auto now = Clock::now();
  uint8_t m1[6] = {2, 0, 0, 0, 0, 1}, m2[6] = {2, 0, 0, 0, 0, 2}, m3[6] = {2, 0, 0, 0, 0, 3};
  t.learn(1, m1, 1, now);
  t.learn(1, m2, 2, now + std::chrono::seconds(1));
  t.learn(1, m3, 3, now + std::chrono::seconds(2));  // evicts the oldest (m1)
  EXPECT_EQ(t.size(), 2u);
  EXPECT_FALSE(t.lookup(1, m1));
  EXPECT_EQ(t.lookup(1, m3), 3u);
  EXPECT_FALSE(t.lookup(2, m3));  // per VLAN
  t.expire(now + std::chrono::seconds(11) + std::chrono::milliseconds(500));
  EXPECT_EQ(t.size(), 1u);
}

}  // namespace
}  // namespace keel::sw

namespace keel::sw {
namespace {

// The agent connects out to a controller (tcp:HOST:PORT), negotiates and answers requests.
TEST(OfAgent, ActiveControllerConnection) {
  spdlog::set_level(spdlog::level::warn);
  auto loop = std::move(*EventLoop::create());
  Bridge bridge(*loop, "br0", 0x1234);
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(listener, 0);
  UniqueFd lfd(listener);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&sin), sizeof sin), 0);
  ASSERT_EQ(listen(listener, 1), 0);
  socklen_t len = sizeof sin;
  getsockname(listener, reinterpret_cast<sockaddr*>(&sin), &len);
  OfAgent agent(bridge);
  ASSERT_TRUE(agent.set_targets({"tcp:127.0.0.1:" + std::to_string(ntohs(sin.sin_port))}));
  EXPECT_FALSE(agent.set_targets({"udp:1.2.3.4:5"}));  // rejected, old targets kept
  UniqueFd ctl(accept(listener, nullptr, nullptr));
  ASSERT_TRUE(ctl.valid());
  timeval tv{2, 0};
  setsockopt(ctl.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  uint8_t hello[16];
  ASSERT_EQ(read(ctl.get(), hello, sizeof hello), 16);
  EXPECT_EQ(hello[0], kOf13);
  EXPECT_EQ(hello[1], OFPT_HELLO);
  std::vector<uint8_t> msgs = {1, 0, 0, 8, 0, 0, 0, 1, 1, 5, 0, 8, 0, 0, 0, 2};  // 1.0 HELLO, FEATURES_REQUEST
  ASSERT_TRUE(write_all(ctl.get(), msgs.data(), msgs.size()));
  std::vector<uint8_t> got;
  for (int i = 0; i < 50 && got.size() < 32; ++i) {
    ASSERT_TRUE(loop->run_once(std::chrono::milliseconds(20)));
    uint8_t buf[512];
    ssize_t n = recv(ctl.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) got.insert(got.end(), buf, buf + n);
  }
  ASSERT_GE(got.size(), 32u);
  EXPECT_EQ(got[0], kOf10);
  EXPECT_EQ(got[1], OFPT_FEATURES_REPLY);
  EXPECT_EQ(got[15], 0x34);  // datapath id
  EXPECT_EQ(agent.connection_count(), 1u);
}

}  // namespace
}  // namespace keel::sw

namespace keel::sw {
namespace {

// QEMU's -netdev stream framing (4-byte big-endian length, then the frame) and -netdev dgram (one frame
// per datagram), through a bridge to and from an in-memory port.
TEST(SocketPort, StreamAndDgramFraming) {
  spdlog::set_level(spdlog::level::warn);
  auto loop = std::move(*EventLoop::create());
  Bridge bridge(*loop, "br0", 1);
  auto mem = std::make_unique<MemoryPort>();
  MemoryPort* memp = mem.get();
  ASSERT_TRUE(bridge.add_port("mem", "memory", std::move(mem)));
  char dir[] = "/tmp/ksw-sock.XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  std::string spath = std::string(dir) + "/stream.sock", dpath = std::string(dir) + "/dgram.sock";
  auto sp = open_socket_port(spath, SocketFraming::Stream);
  ASSERT_TRUE(sp) << sp.error().message();
  ASSERT_TRUE(bridge.add_port("vm-stream", "stream", std::move(*sp)));
  auto dp = open_socket_port(dpath, SocketFraming::Dgram);
  ASSERT_TRUE(dp) << dp.error().message();
  ASSERT_TRUE(bridge.add_port("vm-dgram", "dgram", std::move(*dp)));
  FlowMod to_mem;  // everything from the sockets goes to the memory port, and back to the stream
  Action out;
  out.arg = 1;
  to_mem.priority = 1;
  to_mem.instructions.has_apply = true;
  to_mem.instructions.apply = {out};
  ASSERT_TRUE(bridge.apply_flow_mod(to_mem));
  FlowMod from_mem = to_mem;
  from_mem.priority = 2;
  test::set(from_mem.match, Oxm::InPort, 1);
  from_mem.instructions.apply[0].arg = 2;
  ASSERT_TRUE(bridge.apply_flow_mod(from_mem));

  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strcpy(sun.sun_path, spath.c_str());
  UniqueFd client(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(connect(client.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun), 0);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(loop->run_once(std::chrono::milliseconds(10)));  // accept
  const uint8_t a[6] = {2, 0, 0, 0, 0, 1}, b[6] = {2, 0, 0, 0, 0, 2};
  auto frame = test::ipv4_frame(b, a, 1, 2, 17, 1, 2);
  std::vector<uint8_t> wire = {0, 0, uint8_t(frame.size() >> 8), uint8_t(frame.size())};
  wire.insert(wire.end(), frame.begin(), frame.end());
  // Two frames in one write, the second split across two writes.
  std::vector<uint8_t> twice = wire;
  twice.insert(twice.end(), wire.begin(), wire.begin() + 10);
  ASSERT_TRUE(write_all(client.get(), twice.data(), twice.size()));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(loop->run_once(std::chrono::milliseconds(10)));
  ASSERT_TRUE(write_all(client.get(), wire.data() + 10, wire.size() - 10));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(loop->run_once(std::chrono::milliseconds(10)));
  ASSERT_EQ(memp->sent().size(), 2u);
  EXPECT_EQ(memp->sent()[0], frame);
  EXPECT_EQ(memp->sent()[1], frame);
  // Back from the memory port to the stream peer, framed.
  memp->push_rx(frame);
  bridge.poll_ports_once();
  std::vector<uint8_t> got(wire.size());
  timeval tv{2, 0};
  setsockopt(client.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ASSERT_TRUE(read_full(client.get(), got.data(), got.size()));
  EXPECT_EQ(got, wire);

  // Dgram: one datagram in, one frame out.
  UniqueFd dclient(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_un dsun{};
  dsun.sun_family = AF_UNIX;
  std::strcpy(dsun.sun_path, dpath.c_str());
  ASSERT_EQ(sendto(dclient.get(), frame.data(), frame.size(), 0, reinterpret_cast<sockaddr*>(&dsun), sizeof dsun),
            ssize_t(frame.size()));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(loop->run_once(std::chrono::milliseconds(10)));
  ASSERT_EQ(memp->sent().size(), 3u);
  // A stream peer announcing an absurd frame length is disconnected, not trusted.
  uint8_t bogus[4] = {0x7f, 0xff, 0xff, 0xff};
  ASSERT_TRUE(write_all(client.get(), bogus, 4));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(loop->run_once(std::chrono::milliseconds(10)));
  uint8_t c;
  EXPECT_EQ(read(client.get(), &c, 1), 0);  // EOF
  EXPECT_FALSE(bridge.port_by_name("vm-stream")->port->link_up());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace keel::sw

namespace keel::sw {
namespace {

std::vector<uint8_t> role_request(uint32_t role, uint64_t generation, uint32_t xid) {
  std::vector<uint8_t> m;
  begin_message(m, kOf13, OFPT13_ROLE_REQUEST, xid);
  ByteWriter w(m);
  w.u32(role);
  w.u32(0);
  w.u64(generation);
  finish_message(m);
  return m;
}

TEST(Roles, MasterSlaveAndGenerations) {
  spdlog::set_level(spdlog::level::warn);
  auto loop = std::move(*EventLoop::create());
  Bridge bridge(*loop, "br0", 1);
  std::vector<uint8_t> out_a, out_b;
  OfConnection a(bridge, UniqueFd(), "a", nullptr), b(bridge, UniqueFd(), "b", nullptr);
  a.capture = &out_a;
  b.capture = &out_b;
  ASSERT_TRUE(a.start());
  ASSERT_TRUE(b.start());
  std::vector<uint8_t> hello = {4, 0, 0, 8, 0, 0, 0, 1};
  a.feed(hello);
  b.feed(hello);
  out_a.clear();
  out_b.clear();
  a.feed(role_request(2, 10, 7));  // a: master, generation 10
  ASSERT_GE(out_a.size(), 24u);
  EXPECT_EQ(out_a[1], OFPT13_ROLE_REPLY);
  EXPECT_EQ(out_a[11], 2);
  b.feed(role_request(2, 11, 8));  // b takes over: a becomes slave
  EXPECT_EQ(b.role(), OfRole::Master);
  EXPECT_EQ(a.role(), OfRole::Slave);
  out_a.clear();
  // A slave may not modify the flow table.
  FlowMod fm;
  std::vector<uint8_t> msg;
  encode_flow_mod(kOf13, msg, fm, 9);
  a.feed(msg);
  ASSERT_GE(out_a.size(), 12u);
  EXPECT_EQ(out_a[1], OFPT_ERROR);
  EXPECT_EQ(out_a[9], OFPET_BAD_REQUEST);
  EXPECT_EQ(out_a[11], 10);  // IS_SLAVE
  EXPECT_EQ(bridge.flow_count(), 0u);
  // A stale generation is refused.
  out_a.clear();
  a.feed(role_request(2, 5, 10));
  ASSERT_GE(out_a.size(), 12u);
  EXPECT_EQ(out_a[1], OFPT_ERROR);
  EXPECT_EQ(out_a[9], OFPET_ROLE_REQUEST_FAILED);
  // The master may.
  b.feed(msg);
  EXPECT_EQ(bridge.flow_count(), 1u);
}

}  // namespace
}  // namespace keel::sw
