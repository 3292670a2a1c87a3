// The AF_PACKET port against a real veth pair in a private network namespace (root needed, as in
// CI): frames sent on one end arrive through the port's receive ring on the other, in order and
// intact, including frames too large for a ring slot (jumbo frames, TCP super-frames the port cuts
// into segments) and VLAN tags the kernel moved into metadata.
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "base/process.h"
#include "base/unique_fd.h"
#include "switch/port.h"
#include "switch/tx_thread.h"
#include "test_util.h"

namespace keel::sw {
namespace {

const uint8_t kA[6] = {2, 0, 0, 0, 0, 1}, kB[6] = {2, 0, 0, 0, 0, 2};  // test::super_frame's MACs

// The virtio-net header a packet socket with PACKET_VNET_HDR takes: its first 10 bytes.
using VnetHeader = vhost::VirtioNetHdr;
constexpr size_t kVnetHeaderSize = vhost::kVirtioNetHdrLegacySize;

void ip(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"ip"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = run_command(argv);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_EQ(r->exit_code, 0) << r->err;
}

class AfPacketPortTest : public ::testing::Test {
protected:
  void SetUp() override {
    // A namespace of our own: the veth names cannot collide with anything, and vanish with it.
    ASSERT_EQ(unshare(CLONE_NEWNET), 0) << "unshare(CLONE_NEWNET) needs root: " << strerror(errno);
    // No IPv6: its neighbour discovery and MLD reports would be frames we did not send.
    for (const char* path : {"/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6"})
      (void)write_file(path, "1\n");
    ip({"link", "add", "ksw-a", "type", "veth", "peer", "name", "ksw-b"});
    ip({"link", "set", "ksw-b", "up"});
    auto port = open_afpacket_port("ksw-a");
    ASSERT_TRUE(port) << port.error().message();
    port_ = std::move(*port);
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    sender_.reset(fd);
    int one = 1;
    ASSERT_EQ(setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one), 0);
    // Straight to the veth: until the kernel's link watcher activates the device's queueing
    // discipline (asynchronously, after link up), frames sent through it are dropped.
    ASSERT_EQ(setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one), 0);
    sockaddr_ll sll{};
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = int(if_nametoindex("ksw-b"));
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll), 0);
  }

  void send(const std::vector<uint8_t>& frame, VnetHeader vh = {}) {
    iovec iov[2] = {{&vh, kVnetHeaderSize}, {const_cast<uint8_t*>(frame.data()), frame.size()}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    ASSERT_EQ(sendmsg(sender_.get(), &msg, 0), ssize_t(kVnetHeaderSize + frame.size())) << strerror(errno);
  }

  // Receives until `count` frames arrived (or a second passes without any).
  std::vector<std::vector<uint8_t>> receive(size_t count) {
    std::vector<std::vector<uint8_t>> out;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (out.size() < count && std::chrono::steady_clock::now() < deadline) {
      PacketBatch batch;
      port_->receive(batch);
      for (size_t i = 0; i < batch.size(); ++i) {
        // Only what the test sent (source MAC kA); anything else is the kernel's own traffic.
        if (batch[i].len >= 12 && std::equal(kA, kA + 6, batch[i].data + 6))
          out.emplace_back(batch[i].data, batch[i].data + batch[i].len);
      }
      if (batch.size() == 0 && !port_->has_pending()) {
        pollfd p{port_->poll_fd(), POLLIN, 0};
        if (poll(&p, 1, 1000) <= 0) break;
      }
    }
    EXPECT_EQ(port_->counters.rx_errors, 0u);
    EXPECT_EQ(port_->counters.rx_dropped, 0u);
    return out;
  }

  std::unique_ptr<Port> port_;
  UniqueFd sender_;
};

// Receives on `port` until a batch starts with a frame the test sent (source MAC kA; the kernel may
// send its own on a fresh link), for up to 5 s.
void receive_ours(Port& port, PacketBatch& batch) {
  for (int i = 0; i < 100 && batch.size() == 0; ++i) {
    port.receive(batch);
    if (batch.size() && !std::equal(kA, kA + 6, batch[0].data + 6)) batch.reset();
    if (batch.size() == 0) {
      pollfd p{port.poll_fd(), POLLIN, 0};
      poll(&p, 1, 50);
    }
  }
}

std::vector<uint8_t> sized_frame(size_t len, uint32_t seq) {
  auto f = test::ipv4_frame(kB, kA, 0x0a000001, 0x0a000002, 17, 1000, 2000);
  f.resize(len);
  for (size_t i = 42; i < len; ++i) f[i] = uint8_t(seq * 31 + i);
  return f;
}

TEST_F(AfPacketPortTest, FramesArriveInOrderAcrossRingWraps) {
  // 3 x 1000 frames through a 2048-slot ring: the ring wraps, every slot is handed back.
  uint32_t seq = 0;
  for (int round = 0; round < 3; ++round) {
    std::vector<std::vector<uint8_t>> sent;
    for (int i = 0; i < 1000; ++i, ++seq) {
      sent.push_back(sized_frame(60 + (seq * 37) % 1455, seq));
      send(sent.back());
    }
    auto got = receive(sent.size());
    ASSERT_EQ(got.size(), sent.size());
    for (size_t i = 0; i < sent.size(); ++i) ASSERT_EQ(got[i], sent[i]) << "frame " << i;
  }
  EXPECT_EQ(port_->counters.rx_errors, 0u);
}

TEST_F(AfPacketPortTest, JumboFramesKeepTheirPlace) {
  // A 9000-byte frame does not fit a 2 KiB slot: it comes whole from the socket queue, in order.
  ip({"link", "set", "ksw-a", "mtu", "9000"});
  ip({"link", "set", "ksw-b", "mtu", "9000"});
  std::vector<std::vector<uint8_t>> sent = {sized_frame(100, 1), sized_frame(9014, 2), sized_frame(1514, 3),
                                            sized_frame(5000, 4), sized_frame(64, 5)};
  for (const auto& f : sent) send(f);
  auto got = receive(sent.size());
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(got[i], sent[i]) << "frame " << i;
}

TEST_F(AfPacketPortTest, VlanTagsComeBackIntoTheFrame) {
  // The receiving veth moves the tag into metadata; the port puts it back where it was.
  auto tagged = test::ipv4_frame(kB, kA, 0x0a000001, 0x0a000002, 17, 1000, 2000, 0x2000 | 42);
  send(tagged);
  auto got = receive(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], tagged);
}

// A port that keeps what it is sent (to see what Port::send_frame's default makes of a super-frame).
struct CollectingPort final : Port {
  std::string_view type() const override { return "collect"; }
  int poll_fd() const override { return -1; }
  size_t receive(PacketBatch&) override { return 0; }
  void send(const uint8_t* frame, size_t len) override { sent.emplace_back(frame, frame + len); }
  std::vector<std::vector<uint8_t>> sent;
};

constexpr uint8_t kNeedsCsum = vhost::kVirtioNetHdrFNeedsCsum, kGsoTcpv4 = vhost::kVirtioNetHdrGsoTcpv4;
constexpr size_t kMss = 1448;

TEST_F(AfPacketPortTest, TcpSuperFramesArriveWholeAndCutIntoValidSegments) {
  // 20,001 payload bytes sent as one GSO frame with a partial checksum; the veth passes it on whole,
  // the port keeps it whole (headers in the frame, payload beside), and a port that takes only
  // ordinary frames gets valid segments from Port::send_frame.
  for (int tci : {-1, 0x2000 | 42}) {
    SCOPED_TRACE(tci < 0 ? "untagged" : "VLAN 42");
    const uint32_t seq0 = 0x12345678;
    auto f = test::super_frame(20001, seq0, tci);
    const size_t l4 = tci >= 0 ? 38 : 34;
    send(f, VnetHeader{kNeedsCsum, kGsoTcpv4, uint16_t(l4 + 20), uint16_t(kMss), uint16_t(l4), 16, 0});
    PacketBatch batch;
    receive_ours(*port_, batch);
    ASSERT_EQ(batch.size(), 1u);
    const Frame& got = batch[0];
    ASSERT_TRUE(got.is_super());
    EXPECT_EQ(got.len, l4 + 20);
    EXPECT_EQ(got.payload_len, 20001u);
    EXPECT_EQ(got.offload.gso_size, kMss);
    EXPECT_EQ(got.offload.gso_type & 0x7f, kGsoTcpv4);
    EXPECT_TRUE(std::equal(got.data, got.data + got.len, f.begin()));
    EXPECT_TRUE(std::equal(got.payload, got.payload + got.payload_len, f.begin() + got.len));
    CollectingPort plain;
    plain.send_frame(got);
    test::check_segments(plain.sent, f, kMss, seq0, tci >= 0);
  }
}

TEST_F(AfPacketPortTest, SuperFramesLeaveWholeThroughAnotherAfPacketPort) {
  // ksw-a's port receives a super-frame and sends it out of ksw-a again: it reaches ksw-b whole
  // (one GSO frame, as a port on ksw-b sees it), with headers and payload unchanged.
  auto f = test::super_frame(30000, 7);
  send(f, VnetHeader{kNeedsCsum, kGsoTcpv4, 54, uint16_t(kMss), 34, 16, 0});
  PacketBatch batch;
  receive_ours(*port_, batch);
  ASSERT_EQ(batch.size(), 1u);
  ASSERT_TRUE(batch[0].is_super());
  auto b = open_afpacket_port("ksw-b");
  ASSERT_TRUE(b) << b.error().message();
  port_->send_frame(batch[0]);
  port_->flush();
  EXPECT_EQ(port_->counters.tx_packets, 1u);
  EXPECT_EQ(port_->counters.tx_bytes, f.size());
  PacketBatch out;
  receive_ours(**b, out);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_TRUE(out[0].is_super()) << "the frame was segmented on the way";
  EXPECT_EQ(out[0].payload_len, 30000u);
  EXPECT_TRUE(std::equal(out[0].data, out[0].data + out[0].len, f.begin()));
  EXPECT_TRUE(std::equal(out[0].payload, out[0].payload + out[0].payload_len, f.begin() + 54));
}

TEST_F(AfPacketPortTest, FramesLeaveInOrderThroughATransmitThread) {
  // A port with a transmit thread (keel-switch --tx-threads) on ksw-b sends 3000 frames in batches,
  // as the datapath does (send..., flush): they arrive at ksw-a in order and intact, and the
  // counters the thread keeps reach the port's.
  TransmitThread::set_enabled(true);
  auto b = open_afpacket_port("ksw-b");
  TransmitThread::set_enabled(false);
  ASSERT_TRUE(b) << b.error().message();
  std::vector<std::vector<uint8_t>> sent;
  uint64_t bytes = 0;
  for (uint32_t seq = 0; seq < 3000; ++seq) {
    sent.push_back(sized_frame(60 + (seq * 37) % 1455, seq));
    bytes += sent.back().size();
  }
  std::vector<std::vector<uint8_t>> got;
  for (size_t i = 0; i < sent.size(); i += 32) {
    for (size_t j = i; j < std::min(sent.size(), i + 32); ++j) (*b)->send(sent[j].data(), sent[j].size());
    (*b)->flush();
    // Keep up with the sender, as a host's stack would: a 2048-slot ring cannot hold all 3000.
    if (i % 512 == 0) {
      auto some = receive(std::min(sent.size(), i + 32) - got.size());
      got.insert(got.end(), some.begin(), some.end());
    }
  }
  auto rest = receive(sent.size() - got.size());
  got.insert(got.end(), rest.begin(), rest.end());
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) ASSERT_EQ(got[i], sent[i]) << "frame " << i;
  for (int i = 0; i < 100 && (*b)->counters.tx_packets < sent.size(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    (*b)->sync_counters();
  }
  EXPECT_EQ((*b)->counters.tx_packets, sent.size());
  EXPECT_EQ((*b)->counters.tx_bytes, bytes);
  EXPECT_EQ((*b)->counters.tx_dropped, 0u);
}

}  // namespace
}  // namespace keel::sw
