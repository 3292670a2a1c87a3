// VhostUserPort driven by the synthetic front-end (src/vhost's stand-in for QEMU and a guest's
// virtio-net driver on shared memory): frames the guest transmits arrive as PacketBatches, frames
// the switch sends land in the guest's receive queue, link changes are reported, and a guest that
// breaks its rings gets rx_errors, never a crash.
#include "switch/vhost_user_port.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "base/event_loop.h"
#include "base/log.h"
#include "switch/bridge.h"
#include "switch/memory_port.h"
#include "vhost/net_port.h"
#include "synthetic_frontend.h"
#include "test_util.h"

namespace keel::sw {
namespace {

using vhost::testing::FrontendOptions;
using vhost::testing::make_frame;
using vhost::testing::SyntheticFrontend;
using vhost::testing::TxLayout;
using vhost::testing::virtio_net_header;
using Frames = std::vector<std::vector<uint8_t>>;

class TempDir {
public:
  TempDir() {
    char templ[] = "/tmp/keel-swvhost-test-XXXXXX";
    path_ = mkdtemp(templ);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

class VhostUserPortTest : public ::testing::Test {
protected:
  void SetUp() override { spdlog::set_level(spdlog::level::off); }

  void make_port() {
    VhostUserPortOptions options;
    options.socket_path = dir.file("vm.sock");
    auto port_or = open_vhost_user_port(options);
    ASSERT_TRUE(port_or) << port_or.error().message();
    port = std::move(*port_or);
  }
  // A started front-end whose waits for replies run the port's receive(), collecting what arrives.
  void connect_frontend(FrontendOptions options = {}) {
    auto fe_or = SyntheticFrontend::connect(dir.file("vm.sock"), options);
    ASSERT_TRUE(fe_or) << fe_or.error().message();
    fe = std::move(*fe_or);
    fe->set_pump([this] { receive_once(); });
    auto r = fe->start();
    ASSERT_TRUE(r) << r.error().message();
  }
  void setup() {
    make_port();
    connect_frontend();
  }
  // One receive() into a fresh batch, as the bridge does on a readiness event; returns its size.
  size_t receive_once() {
    batch.reset();
    size_t n = port->receive(batch);
    EXPECT_EQ(n, batch.size());
    EXPECT_LE(n, PacketBatch::kCapacity);
    for (size_t i = 0; i < batch.size(); ++i) received.emplace_back(batch[i].data, batch[i].data + batch[i].len);
    return n;
  }
  // Runs receive() until the port has nothing left (pending frames included).
  void drain() {
    for (int i = 0; i < 100; ++i) {
      size_t n = receive_once();
      if (n == 0 && !port->has_pending()) break;
    }
  }
  Frames guest_receive() {
    Frames got;
    fe->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
    return got;
  }

  TempDir dir;
  std::unique_ptr<Port> port;
  std::unique_ptr<SyntheticFrontend> fe;
  PacketBatch batch;
  Frames received;
};

TEST_F(VhostUserPortTest, RejectsBadSocketPaths) {
  VhostUserPortOptions options;
  EXPECT_FALSE(open_vhost_user_port(options));
  options.socket_path = std::string(200, 'x');
  auto r = open_vhost_user_port(options);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("socket path"), std::string::npos) << r.error().message();
}

TEST_F(VhostUserPortTest, ReportsLinkUpOnceTheGuestStartsItsQueues) {
  make_port();
  EXPECT_EQ(port->type(), "vhostuser");
  EXPECT_GE(port->poll_fd(), 0);
  EXPECT_FALSE(port->link_up());
  EXPECT_FALSE(port->take_link_changed());
  connect_frontend();
  drain();
  EXPECT_TRUE(port->link_up());
  EXPECT_TRUE(port->take_link_changed());
  EXPECT_FALSE(port->take_link_changed()) << "reported once";
  EXPECT_TRUE(received.empty());
}

TEST_F(VhostUserPortTest, GuestFramesArriveAsPacketBatches) {
  setup();
  Frames sent;
  const TxLayout layouts[] = {TxLayout::Single, TxLayout::SplitHeader, TxLayout::Indirect, TxLayout::Scattered};
  uint32_t seed = 0;
  // More frames than one PacketBatch holds, in every descriptor layout a driver uses.
  for (int round = 0; round < 3; ++round)
    for (TxLayout layout : layouts)
      for (size_t size : {60, 64, 1500, 1514}) {
        sent.push_back(make_frame(size, seed++));
        ASSERT_TRUE(fe->transmit(0, sent.back(), layout));
      }
  fe->kick(1);
  drain();
  ASSERT_EQ(received.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(received[i], sent[i]) << "frame " << i;
  // Frames are copied out, so the guest got all its buffers back.
  EXPECT_EQ(fe->reclaim_tx(0), sent.size());
  EXPECT_EQ(port->counters.rx_errors, 0u);
}

TEST_F(VhostUserPortTest, ReceivedFramesHaveHeadroomAndAreCopies) {
  setup();
  auto frame = make_frame(128, 3);
  ASSERT_TRUE(fe->transmit(0, frame));
  fe->kick(1);
  batch.reset();
  ASSERT_EQ(port->receive(batch), 1u);
  Frame& f = batch[0];
  // The datapath pushes VLAN tags in place: the frame must start after the headroom.
  EXPECT_EQ(f.data, f.buffer + Frame::kHeadroom);
  EXPECT_EQ(std::vector<uint8_t>(f.data, f.data + f.len), frame);
  f.data[0] = 0;  // rewriting our copy leaves the guest's buffer alone
  EXPECT_EQ(fe->reclaim_tx(0), 1u);
}

TEST_F(VhostUserPortTest, SentFramesReachTheGuestOnFlush) {
  setup();
  drain();
  fe->post_rx_buffers(0);
  Frames sent;
  for (uint32_t i = 0; i < 40; ++i) sent.push_back(make_frame(i % 2 ? 1514 : 64, 100 + i));
  uint64_t bytes = 0;
  for (auto& f : sent) {
    port->send(f.data(), f.size());
    bytes += f.size();
  }
  port->flush();
  Frames got = guest_receive();
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(got[i], sent[i]) << "frame " << i;
  EXPECT_EQ(port->counters.tx_packets, sent.size());
  EXPECT_EQ(port->counters.tx_bytes, bytes);
  EXPECT_EQ(port->counters.tx_dropped, 0u);
  EXPECT_GE(fe->take_calls(0), 1u);
}

TEST_F(VhostUserPortTest, SendCopiesTheFrame) {
  setup();
  drain();
  fe->post_rx_buffers(0);
  auto frame = make_frame(100, 9);
  auto original = frame;
  port->send(frame.data(), frame.size());
  std::memset(frame.data(), 0, frame.size());  // the datapath reuses its buffer before flush()
  port->flush();
  Frames got = guest_receive();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], original);
}

TEST_F(VhostUserPortTest, DropsWhatTheGuestCannotTake) {
  setup();
  drain();
  auto frame = make_frame(64, 1);
  // No receive buffers posted.
  port->send(frame.data(), frame.size());
  port->flush();
  EXPECT_EQ(port->counters.tx_dropped, 1u);
  EXPECT_EQ(port->counters.tx_packets, 0u);
  // Larger than a switch frame buffer.
  fe->post_rx_buffers(0);
  std::vector<uint8_t> huge(Frame::kBufferSize + 1, 0xab);
  port->send(huge.data(), huge.size());
  port->flush();
  EXPECT_EQ(port->counters.tx_dropped, 2u);
  EXPECT_TRUE(guest_receive().empty());
}

TEST_F(VhostUserPortTest, SendBeforeTheGuestConnectsIsDropped) {
  make_port();
  auto frame = make_frame(64, 1);
  port->send(frame.data(), frame.size());
  port->flush();
  EXPECT_EQ(port->counters.tx_dropped, 1u);
}

TEST_F(VhostUserPortTest, ReportsLinkDownWhenTheGuestGoesAway) {
  setup();
  drain();
  ASSERT_TRUE(port->take_link_changed());
  ASSERT_TRUE(port->link_up());
  fe.reset();  // QEMU exits: the socket closes
  drain();
  EXPECT_FALSE(port->link_up());
  EXPECT_TRUE(port->take_link_changed());
  auto frame = make_frame(64, 1);
  port->send(frame.data(), frame.size());
  port->flush();
  EXPECT_EQ(port->counters.tx_dropped, 1u);
  // A new guest on the same socket brings the link back.
  connect_frontend();
  drain();
  EXPECT_TRUE(port->link_up());
  EXPECT_TRUE(port->take_link_changed());
  fe->post_rx_buffers(0);
  port->send(frame.data(), frame.size());
  port->flush();
  EXPECT_EQ(guest_receive().size(), 1u);
}

TEST_F(VhostUserPortTest, GuestFramesTooShortOrTooLongAreReceiveErrors) {
  setup();
  drain();
  auto good = make_frame(64, 1);
  ASSERT_TRUE(fe->transmit(0, make_frame(4, 2)));  // shorter than an Ethernet header
  ASSERT_TRUE(fe->transmit(0, good));
  ASSERT_TRUE(fe->transmit(0, make_frame(Frame::kBufferSize, 3)));  // fits virtio, not a switch buffer
  ASSERT_TRUE(fe->transmit(0, good));
  fe->kick(1);
  drain();
  ASSERT_EQ(received.size(), 2u);
  EXPECT_EQ(received[0], good);
  EXPECT_EQ(received[1], good);
  EXPECT_EQ(port->counters.rx_errors, 2u);
  EXPECT_TRUE(port->link_up());
}

// Rings a guest breaks: each gives rx_errors and a link-down report, and the port keeps working.
class VhostUserPortHostileTest : public VhostUserPortTest {
protected:
  void expect_ring_error(uint16_t head) {
    drain();
    ASSERT_TRUE(port->take_link_changed());
    fe->publish_avail(1, head);
    fe->kick(1, true);
    drain();
    EXPECT_TRUE(received.empty());
    EXPECT_GE(port->counters.rx_errors, 1u);
    EXPECT_FALSE(port->link_up());
    EXPECT_TRUE(port->take_link_changed());
    // Frames to the broken guest are dropped, not written.
    auto frame = make_frame(64, 1);
    port->send(frame.data(), frame.size());
    port->flush();
    EXPECT_EQ(port->counters.tx_dropped, 1u);
    // The connection still answers.
    EXPECT_TRUE(fe->sync());
  }
};

TEST_F(VhostUserPortHostileTest, DescriptorOutsideGuestMemory) {
  setup();
  fe->desc_table(1)[0] = {fe->memory_end_gpa() + 0x1000, 100, 0, 0};
  expect_ring_error(0);
}

TEST_F(VhostUserPortHostileTest, DescriptorRunningPastTheEnd) {
  setup();
  fe->desc_table(1)[0] = {fe->memory_end_gpa() - 16, 64, 0, 0};
  expect_ring_error(0);
}

TEST_F(VhostUserPortHostileTest, DescriptorLoop) {
  setup();
  uint64_t b = fe->alloc(256);
  fe->desc_table(1)[0] = {b, 64, vhost::kDescFNext, 1};
  fe->desc_table(1)[1] = {b, 64, vhost::kDescFNext, 0};
  expect_ring_error(0);
}

TEST_F(VhostUserPortHostileTest, HeadIndexBeyondTheRing) {
  setup();
  expect_ring_error(uint16_t(fe->queue_size() + 5));
}

TEST_F(VhostUserPortHostileTest, AvailIndexJumpsAhead) {
  setup();
  drain();
  ASSERT_TRUE(port->take_link_changed());
  // A guest claiming far more new entries than the ring holds.
  fe->avail_ring(1)[1] = uint16_t(fe->queue_size() * 3);
  fe->kick(1, true);
  drain();
  EXPECT_GE(port->counters.rx_errors, 1u);
  EXPECT_FALSE(port->link_up());
  EXPECT_TRUE(fe->sync());
}

// Ports vm0 and vm1 (type vhostuser, listening in `dir`) on `bridge`, and one flow: NORMAL.
void add_two_vhost_ports_with_normal(Bridge& bridge, const TempDir& dir) {
  for (int i = 0; i < 2; ++i) {
    VhostUserPortOptions options;
    options.socket_path = dir.file("vm" + std::to_string(i) + ".sock");
    auto p = open_vhost_user_port(options);
    ASSERT_TRUE(p) << p.error().message();
    ASSERT_TRUE(bridge.add_port("vm" + std::to_string(i), "vhostuser", std::move(*p)));
  }
  FlowMod fm;
  Action normal;
  normal.arg = OFPP_NORMAL;
  fm.instructions.has_apply = true;
  fm.instructions.apply = {normal};
  ASSERT_TRUE(bridge.apply_flow_mod(fm));
}

// --- Offloads: partial checksums and TCP super-frames from and to guests that negotiated them ---

constexpr uint8_t kNeedsCsum = vhost::kVirtioNetHdrFNeedsCsum;
constexpr uint8_t kTcpv4 = vhost::kVirtioNetHdrGsoTcpv4;

TEST_F(VhostUserPortTest, PartialChecksumsFromTheGuestAreFinished) {
  setup();
  const uint8_t dst[6] = {2, 0, 0, 0, 0, 2}, src[6] = {2, 0, 0, 0, 0, 1};
  Frames sent;
  for (uint8_t proto : {uint8_t(17), uint8_t(6)}) {
    auto f = test::ipv4_frame(dst, src, 0x0a000001, 0x0a000002, proto, 1000, 2000);
    f.resize(f.size() + 300, 0x5a);  // some payload; fix the IP length and checksum
    uint16_t total = uint16_t(f.size() - 14);
    f[16] = uint8_t(total >> 8), f[17] = uint8_t(total);
    f[24] = f[25] = 0;
    uint16_t ipsum = test::ipv4_header_checksum(&f[14]);
    f[24] = uint8_t(ipsum >> 8), f[25] = uint8_t(ipsum);
    if (proto == 17) f[38] = uint8_t((f.size() - 34) >> 8), f[39] = uint8_t(f.size() - 34);
    // What a guest's stack leaves for the NIC: the pseudo-header sum, not complemented.
    size_t field = proto == 17 ? 34 + 6 : 34 + 16;
    uint32_t pseudo = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + proto + uint32_t(f.size() - 34);
    while (pseudo >> 16) pseudo = (pseudo & 0xffff) + (pseudo >> 16);
    f[field] = uint8_t(pseudo >> 8), f[field + 1] = uint8_t(pseudo);
    ASSERT_FALSE(test::l4_checksum_ok(f, 14));
    ASSERT_TRUE(fe->transmit(0, f, TxLayout::Scattered, virtio_net_header(kNeedsCsum, 0, 54, 0, 34, uint16_t(field - 34))));
    sent.push_back(f);
  }
  fe->kick(1);
  drain();
  ASSERT_EQ(received.size(), 2u);
  for (auto& f : received) EXPECT_TRUE(test::l4_checksum_ok(f, 14));
  EXPECT_EQ(port->counters.rx_errors, 0u);
}

TEST_F(VhostUserPortTest, GuestSuperFramesArriveWhole) {
  setup();
  auto sent = test::super_frame(30000, 1000);
  ASSERT_TRUE(fe->transmit(0, sent, TxLayout::Scattered, virtio_net_header(kNeedsCsum, kTcpv4, 54, 1448, 34, 16)));
  fe->kick(1);
  batch.reset();
  ASSERT_EQ(port->receive(batch), 1u);
  const Frame& f = batch[0];
  ASSERT_TRUE(f.is_super());
  EXPECT_EQ(f.len, 54u);
  EXPECT_EQ(f.payload_len, 30000u);
  EXPECT_EQ(f.offload.gso_type, kTcpv4);
  EXPECT_EQ(f.offload.gso_size, 1448);
  std::vector<uint8_t> whole(f.data, f.data + f.len);
  whole.insert(whole.end(), f.payload, f.payload + f.payload_len);
  EXPECT_EQ(whole, sent);
}

TEST_F(VhostUserPortTest, MalformedOffloadHeadersAreReceiveErrors) {
  setup();
  const uint8_t dst[6] = {2, 0, 0, 0, 0, 2}, src[6] = {2, 0, 0, 0, 0, 1};
  auto udp = test::ipv4_frame(dst, src, 0x0a000001, 0x0a000002, 17, 1000, 2000);
  auto tcp = test::super_frame(5000, 1);
  struct Case {
    const char* what;
    std::vector<uint8_t> frame, header;
  } cases[] = {
      {"UDP fragmentation offload", tcp, virtio_net_header(kNeedsCsum, 3, 54, 1448, 34, 16)},
      {"TCP segmentation of a UDP frame", udp, virtio_net_header(kNeedsCsum, kTcpv4, 54, 1448, 34, 6)},
      {"segments of size 0", tcp, virtio_net_header(kNeedsCsum, kTcpv4, 54, 0, 34, 16)},
      {"segments larger than a frame", tcp, virtio_net_header(kNeedsCsum, kTcpv4, 54, 20000, 34, 16)},
      {"segmentation without a partial checksum", tcp, virtio_net_header(0, kTcpv4, 54, 1448, 34, 16)},
      {"checksum start past the frame", udp, virtio_net_header(kNeedsCsum, 0, 54, 0, 4000, 6)},
      {"checksum field past the frame", udp, virtio_net_header(kNeedsCsum, 0, 54, 0, 34, uint16_t(udp.size() - 35))},
      {"headers only", std::vector<uint8_t>(tcp.begin(), tcp.begin() + 54), virtio_net_header(kNeedsCsum, kTcpv4, 54, 1448, 34, 16)},
  };
  for (auto& c : cases) ASSERT_TRUE(fe->transmit(0, c.frame, TxLayout::SplitHeader, c.header)) << c.what;
  fe->kick(1);
  drain();
  EXPECT_EQ(received.size(), 0u);
  EXPECT_EQ(port->counters.rx_errors, std::size(cases));
  // The port goes on: a good frame after them arrives.
  ASSERT_TRUE(fe->transmit(0, udp));
  fe->kick(1);
  drain();
  EXPECT_EQ(received.size(), 1u);
}

// Two guests on one bridge: a super-frame from vm0 crosses NORMAL whole to an offloading vm1, and is
// cut into checksummed segments for a vm1 that did not negotiate TCP segmentation offload.
void super_frame_guest_to_guest(bool receiver_offloads) {
  spdlog::set_level(spdlog::level::off);
  TempDir dir;
  auto loop = std::move(*EventLoop::create());
  Bridge bridge(*loop, "br0", 1);
  add_two_vhost_ports_with_normal(bridge, dir);
  std::unique_ptr<SyntheticFrontend> fes[2];
  for (int i = 0; i < 2; ++i) {
    FrontendOptions o;
    if (i == 1 && !receiver_offloads) o.wanted_features = ~(uint64_t{1} << vhost::kVirtioNetFGuestTso4);
    auto fe = SyntheticFrontend::connect(dir.file("vm" + std::to_string(i) + ".sock"), o);
    ASSERT_TRUE(fe) << fe.error().message();
    fes[i] = std::move(*fe);
    fes[i]->set_pump([&] { bridge.poll_ports_once(); });
    ASSERT_TRUE(fes[i]->start());
  }
  bridge.poll_ports_once();
  fes[1]->post_rx_buffers(0);
  auto sent = test::super_frame(40000, 77);
  ASSERT_TRUE(fes[0]->transmit(0, sent, TxLayout::Scattered, virtio_net_header(kNeedsCsum, kTcpv4, 54, 1448, 34, 16)));
  fes[0]->kick(1);
  Frames got, headers;
  for (int i = 0; i < 10; ++i) {
    bridge.poll_ports_once();
    fes[1]->receive_with_header(0, [&](std::span<const uint8_t> h, std::span<const uint8_t> f) {
      headers.emplace_back(h.begin(), h.end());
      got.emplace_back(f.begin(), f.end());
    });
    fes[1]->post_rx_buffers(0);
  }
  if (receiver_offloads) {
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0], sent);
    EXPECT_EQ(headers[0][0], kNeedsCsum);
    EXPECT_EQ(headers[0][1], kTcpv4);
    EXPECT_EQ(headers[0][4] | headers[0][5] << 8, 1448);  // gso_size
    EXPECT_EQ(headers[0][6] | headers[0][7] << 8, 34);    // csum_start
    EXPECT_EQ(headers[0][8] | headers[0][9] << 8, 16);    // csum_offset
  } else {
    test::check_segments(got, sent, 1448, 77, false);
    for (auto& h : headers) EXPECT_EQ(h[1], 0) << "a plain segment";
  }
  EXPECT_EQ(bridge.port_by_name("vm0")->port->counters.rx_errors, 0u);
}

TEST(VhostUserPortBridge, SuperFramesCrossWholeToAGuestThatOffloads) { super_frame_guest_to_guest(true); }
TEST(VhostUserPortBridge, SuperFramesAreCutForAGuestThatDoesNot) { super_frame_guest_to_guest(false); }

// Two guests on one bridge with NORMAL: a frame from one reaches the other, and the bridge learns
// link state from the port.
TEST(VhostUserPortBridge, GuestToGuestThroughNormal) {
  spdlog::set_level(spdlog::level::off);
  TempDir dir;
  auto loop = std::move(*EventLoop::create());
  Bridge bridge(*loop, "br0", 1);
  std::unique_ptr<SyntheticFrontend> fes[2];
  add_two_vhost_ports_with_normal(bridge, dir);
  EXPECT_FALSE(bridge.port_by_name("vm0")->live);
  for (int i = 0; i < 2; ++i) {
    auto fe = SyntheticFrontend::connect(dir.file("vm" + std::to_string(i) + ".sock"), {});
    ASSERT_TRUE(fe) << fe.error().message();
    fes[i] = std::move(*fe);
    fes[i]->set_pump([&] { bridge.poll_ports_once(); });
    ASSERT_TRUE(fes[i]->start());
  }
  bridge.poll_ports_once();
  EXPECT_TRUE(bridge.port_by_name("vm0")->live);
  EXPECT_TRUE(bridge.port_by_name("vm1")->live);
  fes[1]->post_rx_buffers(0);
  fes[0]->post_rx_buffers(0);
  Frames sent;
  for (uint32_t i = 0; i < 50; ++i) {
    sent.push_back(make_frame(i % 2 ? 1500 : 64, 7));
    ASSERT_TRUE(fes[0]->transmit(0, sent.back()));
  }
  fes[0]->kick(1);
  for (int i = 0; i < 5; ++i) bridge.poll_ports_once();
  Frames got;
  fes[1]->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(got[i], sent[i]) << "frame " << i;
  EXPECT_EQ(fes[0]->reclaim_tx(0), sent.size());
  // Flooded frames do not come back to their sender.
  size_t echoed = fes[0]->receive(0, [](std::span<const uint8_t>) {});
  EXPECT_EQ(echoed, 0u);
  // The sender's MAC was learnt on vm0.
  uint8_t src[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 7};
  EXPECT_EQ(bridge.mac_table().lookup(0, src), bridge.port_by_name("vm0")->ofport);
  // The guest on vm1 goes away: the bridge marks the port down.
  fes[1].reset();
  for (int i = 0; i < 3; ++i) bridge.poll_ports_once();
  EXPECT_FALSE(bridge.port_by_name("vm1")->live);
}

}  // namespace
}  // namespace keel::sw
