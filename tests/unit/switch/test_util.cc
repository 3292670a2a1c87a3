#include "test_util.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace keel::sw::test {

namespace {
uint32_t sum16(const uint8_t* p, size_t n, uint32_t s = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) s += uint32_t(p[i] << 8 | p[i + 1]);
  if (n & 1) s += uint32_t(p[n - 1] << 8);
  return s;
}
uint16_t fold(uint32_t s) {
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return uint16_t(~s);
}
}  // namespace

uint16_t ipv4_header_checksum(const uint8_t* ip) { return fold(sum16(ip, size_t(ip[0] & 0xf) * 4)); }

std::vector<uint8_t> ipv4_frame(const uint8_t dst[6], const uint8_t src[6], uint32_t ip_src, uint32_t ip_dst,
                                uint8_t proto, uint16_t sport, uint16_t dport, int vlan) {
  std::vector<uint8_t> f;
  f.reserve(128);
  for (int i = 0; i < 6; ++i) f.push_back(dst[i]);
  for (int i = 0; i < 6; ++i) f.push_back(src[i]);
  if (vlan >= 0) {
    f.push_back(0x81); f.push_back(0x00);
    f.push_back(uint8_t(vlan >> 8)); f.push_back(uint8_t(vlan));
  }
  f.push_back(0x08); f.push_back(0x00);
  size_t l3 = f.size();
  size_t l4len = proto == 6 ? 20 : 8;
  size_t payload = 18;
  uint16_t total = uint16_t(20 + l4len + payload);
  uint8_t ip[20] = {0x45, 0, uint8_t(total >> 8), uint8_t(total), 0, 1, 0x40, 0, 64, proto, 0, 0};
  be_bytes(ip_src, ip + 12, 4);
  be_bytes(ip_dst, ip + 16, 4);
  uint16_t c = ipv4_header_checksum(ip);
  ip[10] = uint8_t(c >> 8);
  ip[11] = uint8_t(c);
  f.insert(f.end(), ip, ip + 20);
  size_t l4 = f.size();
  f.resize(l4 + l4len + payload, 0x5a);
  if (proto == 1) {
    f[l4] = uint8_t(sport); f[l4 + 1] = uint8_t(dport);
    f[l4 + 2] = f[l4 + 3] = 0;
    uint16_t ck = fold(sum16(&f[l4], l4len + payload));
    f[l4 + 2] = uint8_t(ck >> 8); f[l4 + 3] = uint8_t(ck);
    return f;
  }
  f[l4] = uint8_t(sport >> 8); f[l4 + 1] = uint8_t(sport);
  f[l4 + 2] = uint8_t(dport >> 8); f[l4 + 3] = uint8_t(dport);
  size_t ckoff = proto == 6 ? 16 : 6;
  if (proto == 6) {
    std::fill(f.begin() + long(l4) + 4, f.begin() + long(l4) + 20, 0);
    f[l4 + 12] = 0x50;
  } else {
    f[l4 + 4] = uint8_t((l4len + payload) >> 8); f[l4 + 5] = uint8_t(l4len + payload);
  }
  f[l4 + ckoff] = f[l4 + ckoff + 1] = 0;
  uint32_t s = sum16(&f[l3 + 12], 8);
  s += proto;
  s += uint32_t(l4len + payload);
  uint16_t ck = fold(sum16(&f[l4], l4len + payload, s));
  f[l4 + ckoff] = uint8_t(ck >> 8); f[l4 + ckoff + 1] = uint8_t(ck);
  return f;
}

bool l4_checksum_ok(const std::vector<uint8_t>& f, size_t l3) {
  const uint8_t* ip = &f[l3];
  size_t ihl = size_t(ip[0] & 0xf) * 4;
  size_t total = size_t(ip[2] << 8 | ip[3]);
  size_t l4len = total - ihl;
  uint8_t proto = ip[9];
  if (proto == 1) return fold(sum16(ip + ihl, l4len)) == 0;
  uint32_t s = sum16(ip + 12, 8) + proto + uint32_t(l4len);
  return fold(sum16(ip + ihl, l4len, s)) == 0;
}

namespace {
const uint8_t kSuperDst[6] = {2, 0, 0, 0, 0, 2}, kSuperSrc[6] = {2, 0, 0, 0, 0, 1};
}  // namespace

// A TCP/IPv4 super-frame as a host with segmentation offload sends it: `payload` bytes behind the
// headers (a VLAN tag when tci >= 0), the TCP checksum field holding the pseudo-header sum.
std::vector<uint8_t> super_frame(size_t payload, uint32_t seq0, int tci) {
  auto f = ipv4_frame(kSuperDst, kSuperSrc, 0x0a000001, 0x0a000002, 6, 1000, 2000, tci);
  const size_t l3 = tci >= 0 ? 18 : 14, l4 = l3 + 20, hdr = l4 + 20;
  f.resize(hdr + payload);
  for (size_t i = 0; i < payload; ++i) f[hdr + i] = uint8_t(i * 7 + i / 251);
  uint16_t total = uint16_t(f.size() - l3);
  f[l3 + 2] = uint8_t(total >> 8);
  f[l3 + 3] = uint8_t(total);
  f[l3 + 10] = f[l3 + 11] = 0;
  uint16_t ipsum = ipv4_header_checksum(&f[l3]);
  f[l3 + 10] = uint8_t(ipsum >> 8);
  f[l3 + 11] = uint8_t(ipsum);
  f[l4 + 4] = uint8_t(seq0 >> 24), f[l4 + 5] = uint8_t(seq0 >> 16), f[l4 + 6] = uint8_t(seq0 >> 8),
  f[l4 + 7] = uint8_t(seq0);
  f[l4 + 13] = 0x18;  // PSH|ACK
  uint32_t pseudo = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 6 + uint32_t(f.size() - l4);
  while (pseudo >> 16) pseudo = (pseudo & 0xffff) + (pseudo >> 16);
  f[l4 + 16] = uint8_t(pseudo >> 8);
  f[l4 + 17] = uint8_t(pseudo);
  return f;
}

// Checks segments of super_frame(payload, seq0, tci): valid checksums, lengths, sequence numbers,
// PSH on the last only, the payload intact.
void check_segments(const std::vector<std::vector<uint8_t>>& segs, const std::vector<uint8_t>& sent, size_t mss,
                    uint32_t seq0, bool tagged) {
  const size_t l3 = tagged ? 18 : 14, l4 = l3 + 20, hdr = l4 + 20;
  size_t payload_len = sent.size() - hdr;
  ASSERT_EQ(segs.size(), (payload_len + mss - 1) / mss);
  std::vector<uint8_t> payload;
  for (size_t k = 0; k < segs.size(); ++k) {
    const auto& s = segs[k];
    ASSERT_GT(s.size(), hdr);
    EXPECT_LE(s.size() - hdr, mss);
    EXPECT_TRUE(std::equal(sent.begin(), sent.begin() + l3, s.begin())) << "MACs/tag of segment " << k;
    EXPECT_EQ(size_t(s[l3 + 2] << 8 | s[l3 + 3]), s.size() - l3) << "IP length of segment " << k;
    EXPECT_EQ(ipv4_header_checksum(&s[l3]), 0) << "IP checksum of segment " << k;
    EXPECT_TRUE(l4_checksum_ok(s, l3)) << "TCP checksum of segment " << k;
    uint32_t seq = uint32_t(s[l4 + 4]) << 24 | uint32_t(s[l4 + 5]) << 16 | uint32_t(s[l4 + 6]) << 8 | s[l4 + 7];
    EXPECT_EQ(seq, seq0 + uint32_t(payload.size())) << "sequence number of segment " << k;
    EXPECT_EQ(bool(s[l4 + 13] & 0x08), k + 1 == segs.size()) << "PSH only on the last segment";
    payload.insert(payload.end(), s.begin() + hdr, s.end());
  }
  EXPECT_EQ(payload.size(), payload_len);
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), sent.begin() + hdr, sent.end()));
}

}  // namespace keel::sw::test
