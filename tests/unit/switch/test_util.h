#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "switch/flow.h"
#include "switch/openflow.h"

namespace keel::sw::test {

inline void be_bytes(uint64_t v, uint8_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = uint8_t(v >> (8 * (n - 1 - i)));
}
inline void set(Match& m, Oxm f, uint64_t v) {
  uint8_t b[16] = {};
  be_bytes(v, b, oxm_field_info(uint8_t(f)).length);
  m.set_field(uint8_t(f), b, nullptr);
}
inline void set_masked(Match& m, Oxm f, uint64_t v, uint64_t mask) {
  uint8_t b[16] = {}, mb[16] = {};
  size_t n = oxm_field_info(uint8_t(f)).length;
  be_bytes(v, b, n);
  be_bytes(mask, mb, n);
  m.set_field(uint8_t(f), b, mb);
}

// An Ethernet + IPv4 + UDP/TCP/ICMP frame with valid checksums.
std::vector<uint8_t> ipv4_frame(const uint8_t dst[6], const uint8_t src[6], uint32_t ip_src, uint32_t ip_dst,
                                uint8_t proto, uint16_t sport, uint16_t dport, int vlan = -1);
uint16_t ipv4_header_checksum(const uint8_t* ip);
bool l4_checksum_ok(const std::vector<uint8_t>& frame, size_t l3);

// A TCP/IPv4 super-frame (02:00:00:00:00:01 -> :02, 10.0.0.1 -> 10.0.0.2) as a host with segmentation
// offload sends it: `payload` bytes behind the headers (802.1Q-tagged when tci >= 0), the TCP
// checksum field holding the pseudo-header sum.
std::vector<uint8_t> super_frame(size_t payload, uint32_t seq0, int tci = -1);
// Checks the segments of `sent` (a super_frame) as a NIC would have cut it at `mss`: checksums,
// lengths, sequence numbers, PSH only on the last, the payload intact (gtest assertions).
void check_segments(const std::vector<std::vector<uint8_t>>& segs, const std::vector<uint8_t>& sent, size_t mss,
                    uint32_t seq0, bool tagged);

}  // namespace keel::sw::test
