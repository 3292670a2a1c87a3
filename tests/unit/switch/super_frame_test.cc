// TCP super-frames (segmentation offload) through a Bridge: they stay whole to ports that take them
// (with VLAN tags pushed onto their headers), are cut into valid segments for ports that do not,
// and are cut before decisions that rewrite checksummed headers.
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <cstring>

#include "switch/bridge.h"
#include "switch/memory_port.h"
#include "test_util.h"

namespace keel::sw {
namespace {

constexpr size_t kMss = 1448;
constexpr uint8_t kGsoTcpv4 = vhost::kVirtioNetHdrGsoTcpv4;

// A port that receives one queued super-frame per receive() and records super-frames sent to it.
class SuperFramePort final : public Port {
public:
  std::string_view type() const override { return "super"; }
  int poll_fd() const override { return -1; }
  size_t receive(PacketBatch& batch) override {
    if (pending_.empty()) return 0;
    held_ = std::move(pending_);
    pending_.clear();
    size_t hdr = tcp_headers_end(held_.data(), held_.size());
    Frame& f = batch[batch.size()];
    f.reset_to_headroom();
    std::memcpy(f.data, held_.data(), hdr);
    f.len = uint32_t(hdr);
    f.payload = held_.data() + hdr;
    f.payload_len = uint32_t(held_.size() - hdr);
    f.offload = {kGsoTcpv4, uint16_t(kMss)};
    batch.set_size(batch.size() + 1);
    return 1;
  }
  void send(const uint8_t* frame, size_t len) override { plain.emplace_back(frame, frame + len); }
  void send_frame(const Frame& f) override {
    if (!f.is_super()) return send(f.data, f.len);
    std::vector<uint8_t> whole(f.data, f.data + f.len);
    whole.insert(whole.end(), f.payload, f.payload + f.payload_len);
    supers.push_back(std::move(whole));
  }
  std::vector<uint8_t> pending_, held_;
  std::vector<std::vector<uint8_t>> plain, supers;
};

class SuperFrameTest : public ::testing::Test {
protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    loop_ = std::move(*EventLoop::create());
    bridge_ = std::make_unique<Bridge>(*loop_, "br0", 1);
    auto a = std::make_unique<SuperFramePort>();
    auto b = std::make_unique<SuperFramePort>();
    auto c = std::make_unique<MemoryPort>();
    src_ = a.get();
    super_out_ = b.get();
    plain_out_ = c.get();
    ASSERT_TRUE(bridge_->add_port("src", "super", std::move(a)));
    ASSERT_TRUE(bridge_->add_port("super", "super", std::move(b)));
    ASSERT_TRUE(bridge_->add_port("plain", "memory", std::move(c)));
  }
  void inject(std::vector<uint8_t> frame) {
    src_->pending_ = std::move(frame);
    bridge_->poll_ports_once();
  }

  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Bridge> bridge_;
  SuperFramePort* src_;
  SuperFramePort* super_out_;
  MemoryPort* plain_out_;
};

TEST_F(SuperFrameTest, NormalFloodsWholeOrCutAndPushesVlanTags) {
  FlowMod fm;
  Action normal;
  normal.arg = OFPP_NORMAL;
  fm.instructions.has_apply = true;
  fm.instructions.apply = {normal};
  ASSERT_TRUE(bridge_->apply_flow_mod(fm));
  // src is an access port in VLAN 10; both outputs are trunks: copies leave tagged with 10.
  bridge_->set_port_vlan(*bridge_->port_by_name("src"), PortVlan{10, {}});
  bridge_->set_port_vlan(*bridge_->port_by_name("super"), PortVlan{std::nullopt, {10}});
  bridge_->set_port_vlan(*bridge_->port_by_name("plain"), PortVlan{std::nullopt, {10}});
  auto f = test::super_frame(30000, 1000);
  inject(f);
  // The port that takes super-frames gets it whole, tagged; its payload untouched.
  auto tagged = test::super_frame(30000, 1000, 10);
  ASSERT_EQ(super_out_->supers.size(), 1u);
  EXPECT_EQ(super_out_->supers[0], tagged);
  EXPECT_TRUE(super_out_->plain.empty());
  // The one that does not gets valid tagged segments.
  test::check_segments(plain_out_->sent(), tagged, kMss, 1000, true);
  auto* in = bridge_->port_by_name("src");
  EXPECT_EQ(in->port->counters.rx_bytes, f.size());
}

TEST_F(SuperFrameTest, RewritesCutTheSuperFrameFirst) {
  // nw_dst rewritten, out to the port that takes super-frames: it gets segments instead (a partial
  // checksum cannot be updated like a complete one), each rewritten with valid checksums.
  Action set_dst;
  set_dst.type = ActionType::SetField;
  set_dst.field = uint8_t(Oxm::Ipv4Dst);
  uint8_t ip[4] = {10, 9, 9, 9};
  std::memcpy(set_dst.value, ip, 4);
  Action out;
  out.arg = bridge_->port_by_name("super")->ofport;
  FlowMod fm;
  fm.instructions.has_apply = true;
  fm.instructions.apply = {set_dst, out};
  ASSERT_TRUE(bridge_->apply_flow_mod(fm));
  auto f = test::super_frame(10000, 5);
  inject(f);
  EXPECT_TRUE(super_out_->supers.empty());
  auto& segs = super_out_->plain;
  ASSERT_EQ(segs.size(), (10000 + kMss - 1) / kMss);
  for (auto& s : segs) {
    EXPECT_EQ(s[14 + 16], 10);
    EXPECT_EQ(s[14 + 19], 9);
  }
  // Checksums (valid for the new address), lengths, sequence numbers and payload, as cut from f.
  test::check_segments(segs, f, kMss, 5, false);
}

}  // namespace
}  // namespace keel::sw
