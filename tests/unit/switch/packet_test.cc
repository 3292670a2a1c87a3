#include "switch/packet.h"

#include <gtest/gtest.h>

#include "switch/port.h"
#include "test_util.h"

namespace keel::sw {
namespace {

const uint8_t kA[6] = {2, 0, 0, 0, 0, 1}, kB[6] = {2, 0, 0, 0, 0, 2};

Frame load(PacketBatch& batch, const std::vector<uint8_t>& bytes) {
  Frame& f = batch[0];
  f.reset_to_headroom();
  std::copy(bytes.begin(), bytes.end(), f.data);
  f.len = uint32_t(bytes.size());
  return f;
}

TEST(Packet, ExtractsFields) {
  auto bytes = test::ipv4_frame(kB, kA, 0x0a000001, 0x0a000002, 6, 1234, 80, 0x2000 | 7);
  FlowKey k;
  FrameLayout l;
  extract_flow(bytes.data(), bytes.size(), 3, k, l);
  EXPECT_EQ(be32(k.in_port), 3u);
  EXPECT_EQ(be16(k.vlan_vid), 0x1000 | 7);
  EXPECT_EQ(k.vlan_pcp, 1);
  EXPECT_EQ(be16(k.eth_type), 0x0800);
  EXPECT_EQ(k.ip_proto, 6);
  EXPECT_EQ(be32(k.ipv4_dst), 0x0a000002u);
  EXPECT_EQ(be16(k.tp_dst), 80);
  EXPECT_EQ(l.vlan, 12);
  EXPECT_EQ(l.l3, 18);
  // Truncated frames extract what is there and never read past the end.
  for (size_t n = 0; n < bytes.size(); ++n) extract_flow(bytes.data(), n, 1, k, l);
}

TEST(Packet, PushPopVlan) {
  PacketBatch batch;
  auto bytes = test::ipv4_frame(kB, kA, 1, 2, 17, 1, 2);
  Frame f = load(batch, bytes);
  frame_push_vlan(f, 0x8100, 0x0064);
  EXPECT_EQ(f.len, bytes.size() + 4);
  EXPECT_EQ(frame_vlan_tci(f), 0x64);
  EXPECT_TRUE(std::equal(kB, kB + 6, f.data));
  frame_pop_vlan(f);
  EXPECT_EQ(std::vector<uint8_t>(f.data, f.data + f.len), bytes);
  frame_pop_vlan(f);  // untagged: no-op
  EXPECT_EQ(f.len, bytes.size());
}

TEST(Packet, RewritesKeepChecksumsValid) {
  for (uint8_t proto : {6, 17, 1}) {
    PacketBatch batch;
    auto bytes = test::ipv4_frame(kB, kA, 0xc0a80001, 0xc0a80002, proto, 1111, 2222);
    Frame f = load(batch, bytes);
    uint8_t ip[4] = {172, 16, 5, 9};
    frame_set_field(f, uint8_t(Oxm::Ipv4Src), ip);
    uint8_t dscp = 46;
    frame_set_field(f, uint8_t(Oxm::IpDscp), &dscp);
    if (proto != 1) {
      uint8_t port[2] = {0x12, 0x34};
      frame_set_field(f, uint8_t(proto == 6 ? Oxm::TcpDst : Oxm::UdpDst), port);
    }
    EXPECT_TRUE(frame_dec_ttl(f));
    std::vector<uint8_t> out(f.data, f.data + f.len);
    EXPECT_EQ(test::ipv4_header_checksum(&out[14]), 0) << int(proto);
    EXPECT_TRUE(test::l4_checksum_ok(out, 14)) << int(proto);
    EXPECT_EQ(out[14 + 12], 172);
    EXPECT_EQ(out[15] >> 2, 46);
  }
}

TEST(Packet, TtlExpires) {
  PacketBatch batch;
  auto bytes = test::ipv4_frame(kB, kA, 1, 2, 17, 1, 2);
  bytes[14 + 8] = 1;
  Frame f = load(batch, bytes);
  EXPECT_FALSE(frame_dec_ttl(f));
}

}  // namespace
}  // namespace keel::sw
