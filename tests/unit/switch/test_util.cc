#include "test_util.h"

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

}  // namespace keel::sw::test
