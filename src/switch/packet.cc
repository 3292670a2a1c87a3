#include "switch/packet.h"

#include <netinet/in.h>

#include <bit>
#include <cstring>

namespace keel::sw {

namespace {

uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
void wr16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v >> 8); p[1] = uint8_t(v); }

// RFC 1624 incremental update: checksum field at `csum` for a 16-bit word changing old -> new.
void csum_replace16(uint8_t* csum, uint16_t old_word, uint16_t new_word) {
  uint32_t sum = uint16_t(~rd16(csum)) + uint16_t(~old_word) + new_word;
  sum = (sum & 0xffff) + (sum >> 16);
  sum = (sum & 0xffff) + (sum >> 16);
  wr16(csum, uint16_t(~sum));
}
void csum_replace_bytes(uint8_t* csum, const uint8_t* old_bytes, const uint8_t* new_bytes, size_t n) {
  // n is even (2, 4 or 16) and the bytes are 16-bit aligned within their header.
  for (size_t i = 0; i + 1 < n; i += 2) csum_replace16(csum, rd16(old_bytes + i), rd16(new_bytes + i));
}

bool is_vlan_tpid(uint16_t t) { return t == 0x8100 || t == 0x88a8; }

// Offsets of L3 and L4 of the frame as it is now (it may have been re-tagged).
FrameLayout layout_of(const Frame& f) {
  FlowKey k;
  FrameLayout l;
  extract_flow(f.data, f.len, 0, k, l);
  return l;
}

}  // namespace

void Frame::copy_from(const Frame& o) {
  std::memcpy(data, o.data, o.len);
  len = o.len;
  payload = o.payload;
  payload_len = o.payload_len;
  offload = o.offload;
}

// The bulk is summed as native 32-bit words into 64 bits (the ones-complement sum commutes with byte
// order, so it is swapped once at the end): segmentation checksums every byte it forwards.
uint32_t ones_sum(const uint8_t* p, size_t n, uint32_t sum) {
  uint64_t wide = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    uint32_t w;
    std::memcpy(&w, p + i, 4);
    wide += w;
  }
  wide = (wide & 0xffffffff) + (wide >> 32);
  wide = (wide & 0xffffffff) + (wide >> 32);
  uint32_t native = uint32_t(wide & 0xffff) + uint32_t(wide >> 16);
  native = (native & 0xffff) + (native >> 16);
  native = (native & 0xffff) + (native >> 16);
  if constexpr (std::endian::native == std::endian::little) native = uint32_t(__builtin_bswap16(uint16_t(native)));
  sum += native;
  for (; i + 1 < n; i += 2) sum += uint32_t(p[i] << 8 | p[i + 1]);
  if (n & 1) sum += uint32_t(p[n - 1] << 8);
  return sum;
}

uint16_t ones_finish(uint32_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return uint16_t(~sum);
}

bool finish_partial_checksum(uint8_t* d, size_t len, size_t start, size_t offset) {
  size_t field = start + offset;
  if (start >= len || field + 2 > len) return false;
  uint16_t sum = ones_finish(ones_sum(d + start, len - start));
  d[field] = uint8_t(sum >> 8);
  d[field + 1] = uint8_t(sum);
  return true;
}

size_t super_frame_headers(const uint8_t* frame, size_t len, const vhost::VirtioNetHdr& h) {
  uint8_t type = h.gso_type & ~vhost::kVirtioNetHdrGsoEcn;
  if (type != vhost::kVirtioNetHdrGsoTcpv4 && type != vhost::kVirtioNetHdrGsoTcpv6) return 0;
  if (!(h.flags & vhost::kVirtioNetHdrFNeedsCsum) || h.gso_size == 0) return 0;
  size_t hdr = tcp_headers_end(frame, std::min(len, kSuperHeadersMax));
  if (hdr == 0 || hdr >= len || hdr + h.gso_size > Frame::kBufferSize - Frame::kHeadroom) return 0;
  return hdr;
}

bool take_offloaded_frame(Frame& out, const uint8_t* frame, size_t len, const vhost::VirtioNetHdr& h, uint8_t* slot) {
  if (h.gso_type == vhost::kVirtioNetHdrGsoNone) {
    if (len > out.capacity_after_data()) return false;
    std::memcpy(out.data, frame, len);
    out.len = uint32_t(len);
    return !(h.flags & vhost::kVirtioNetHdrFNeedsCsum) ||
           finish_partial_checksum(out.data, out.len, h.csum_start, h.csum_offset);
  }
  size_t hdr = super_frame_headers(frame, len, h);
  if (hdr == 0 || len - hdr > kSuperPayloadMax) return false;
  // The TCP checksum field keeps the pseudo-header sum the sender left.
  std::memcpy(out.data, frame, hdr);
  std::memcpy(slot, frame + hdr, len - hdr);
  out.len = uint32_t(hdr);
  out.payload = slot;
  out.payload_len = uint32_t(len - hdr);
  out.offload.gso_type = h.gso_type;
  out.offload.gso_size = h.gso_size;
  return true;
}

vhost::VirtioNetHdr super_frame_vnet_header(const Frame& f) {
  FlowKey key;
  FrameLayout l;
  extract_flow(f.data, f.len, 0, key, l);
  return {vhost::kVirtioNetHdrFNeedsCsum, f.offload.gso_type, uint16_t(f.len), f.offload.gso_size, uint16_t(l.l4),
          16 /* offsetof(tcphdr, check) */, 0};
}

size_t tcp_headers_end(const uint8_t* d, size_t len) {
  FlowKey key;
  FrameLayout l;
  extract_flow(d, len, 0, key, l);
  bool ip = key.eth_type == be16(kEthTypeIpv4) || key.eth_type == be16(0x86dd);
  if (!ip || !l.l3 || !l.l4 || key.ip_proto != IPPROTO_TCP || len < l.l4 + 20u) return 0;
  size_t thl = size_t(d[l.l4 + 12] >> 4) * 4;
  if (thl < 20 || l.l4 + thl > len) return 0;
  return l.l4 + thl;
}

bool cut_super_frame_prepare(const uint8_t* hdr, size_t hdr_len, size_t mss, size_t scratch_size,
                             FrameLayout& layout) {
  if (mss == 0 || hdr_len + mss > scratch_size || tcp_headers_end(hdr, hdr_len) != hdr_len) return false;
  FlowKey key;
  extract_flow(hdr, hdr_len, 0, key, layout);
  return true;
}

void cut_super_frame_fix(uint8_t* s, const FrameLayout& l, size_t hdr_len, size_t n, size_t off, size_t k,
                         bool last) {
  uint8_t* ip = s + l.l3;
  uint8_t* tcp = s + l.l4;
  bool v4 = (ip[0] >> 4) == 4;
  size_t tcp_len = hdr_len - l.l4 + n;
  uint32_t pseudo;
  if (v4) {
    wr16(ip + 2, uint16_t(hdr_len + n - l.l3));
    wr16(ip + 4, uint16_t(rd16(ip + 4) + k));
    wr16(ip + 10, 0);
    wr16(ip + 10, ones_finish(ones_sum(ip, size_t(ip[0] & 0xf) * 4)));
    pseudo = ones_sum(ip + 12, 8);
  } else {
    wr16(ip + 4, uint16_t(hdr_len + n - l.l3 - 40));
    pseudo = ones_sum(ip + 8, 32);
  }
  uint32_t seq = (uint32_t(rd16(tcp + 4)) << 16 | rd16(tcp + 6)) + uint32_t(off);
  wr16(tcp + 4, uint16_t(seq >> 16));
  wr16(tcp + 6, uint16_t(seq));
  if (!last) tcp[13] &= uint8_t(~(0x01 | 0x08));  // FIN, PSH only on the last segment
  if (k > 0) tcp[13] &= uint8_t(~0x80);          // CWR only on the first
  wr16(tcp + 16, 0);
  pseudo += IPPROTO_TCP + uint32_t(tcp_len);
  wr16(tcp + 16, ones_finish(ones_sum(tcp, tcp_len, pseudo)));
}

int frame_vlan_tci(const Frame& f) {
  if (f.len < 18 || !is_vlan_tpid(rd16(f.data + 12))) return -1;
  return rd16(f.data + 14);
}

void frame_push_vlan(Frame& f, uint16_t tpid, uint16_t tci) {
  if (f.len < 14 || f.data - f.buffer < 4) return;
  uint8_t* d = f.data - 4;
  std::memmove(d, f.data, 12);
  wr16(d + 12, tpid);
  wr16(d + 14, tci);
  f.data = d;
  f.len += 4;
}

void frame_pop_vlan(Frame& f) {
  if (f.len < 18 || !is_vlan_tpid(rd16(f.data + 12))) return;
  std::memmove(f.data + 4, f.data, 12);
  f.data += 4;
  f.len -= 4;
}

void frame_set_field(Frame& f, uint8_t field, const uint8_t* v) {
  if (f.len < 14) return;
  switch (Oxm(field)) {
    case Oxm::EthDst: std::memcpy(f.data, v, 6); return;
    case Oxm::EthSrc: std::memcpy(f.data + 6, v, 6); return;
    case Oxm::VlanVid: {
      uint16_t vid = rd16(v) & 0x0fff;
      int tci = frame_vlan_tci(f);
      if (tci < 0) frame_push_vlan(f, 0x8100, vid);
      else wr16(f.data + 14, uint16_t((tci & 0xf000) | vid));
      return;
    }
    case Oxm::VlanPcp: {
      int tci = frame_vlan_tci(f);
      if (tci >= 0) wr16(f.data + 14, uint16_t((tci & 0x1fff) | (v[0] & 7) << 13));
      return;
    }
    default: break;
  }
  FrameLayout l = layout_of(f);
  if (!l.l3) return;
  uint8_t* ip = f.data + l.l3;
  uint16_t eth_type = rd16(ip - 2);
  uint8_t* l4 = l.l4 && l.l4 < f.len ? f.data + l.l4 : nullptr;
  size_t l4len = l4 ? f.len - l.l4 : 0;
  uint8_t proto = eth_type == kEthTypeIpv4 ? ip[9] : eth_type == kEthTypeIpv6 ? ip[6] : 0;
  // Where the L4 checksum lives, if the pseudo-header covers addresses.
  uint8_t* l4csum = nullptr;
  if (l4 && proto == IPPROTO_TCP && l4len >= 18) l4csum = l4 + 16;
  if (l4 && proto == IPPROTO_UDP && l4len >= 8 && rd16(l4 + 6) != 0) l4csum = l4 + 6;
  switch (Oxm(field)) {
    case Oxm::Ipv4Src:
    case Oxm::Ipv4Dst: {
      if (eth_type != kEthTypeIpv4) return;
      uint8_t* addr = ip + (Oxm(field) == Oxm::Ipv4Src ? 12 : 16);
      csum_replace_bytes(ip + 10, addr, v, 4);
      if (l4csum) csum_replace_bytes(l4csum, addr, v, 4);
      std::memcpy(addr, v, 4);
      return;
    }
    case Oxm::Ipv6Src:
    case Oxm::Ipv6Dst: {
      if (eth_type != kEthTypeIpv6) return;
      uint8_t* addr = ip + (Oxm(field) == Oxm::Ipv6Src ? 8 : 24);
      if (l4 && proto == IPPROTO_ICMPV6 && l4len >= 4) csum_replace_bytes(l4 + 2, addr, v, 16);
      if (l4csum) csum_replace_bytes(l4csum, addr, v, 16);
      std::memcpy(addr, v, 16);
      return;
    }
    case Oxm::IpDscp: case Oxm::IpEcn: {
      bool dscp = Oxm(field) == Oxm::IpDscp;
      if (eth_type == kEthTypeIpv4) {
        uint16_t old = rd16(ip);
        ip[1] = dscp ? uint8_t((v[0] << 2) | (ip[1] & 3)) : uint8_t((ip[1] & 0xfc) | (v[0] & 3));
        csum_replace16(ip + 10, old, rd16(ip));
      } else if (eth_type == kEthTypeIpv6) {
        uint32_t w = uint32_t(rd16(ip)) << 16 | rd16(ip + 2);
        uint32_t tc = (w >> 20) & 0xff;
        tc = dscp ? ((v[0] & 0x3f) << 2) | (tc & 3) : (tc & 0xfc) | (v[0] & 3);
        w = (w & ~(0xffu << 20)) | tc << 20;
        wr16(ip, uint16_t(w >> 16));
        wr16(ip + 2, uint16_t(w));
      }
      return;
    }
    case Oxm::TcpSrc: case Oxm::TcpDst: case Oxm::UdpSrc: case Oxm::UdpDst: case Oxm::SctpSrc:
    case Oxm::SctpDst: {
      if (!l4 || l4len < 4) return;
      bool src = Oxm(field) == Oxm::TcpSrc || Oxm(field) == Oxm::UdpSrc || Oxm(field) == Oxm::SctpSrc;
      uint8_t* port = l4 + (src ? 0 : 2);
      if (l4csum) csum_replace_bytes(l4csum, port, v, 2);
      std::memcpy(port, v, 2);
      return;
    }
    default:
      return;  // the rest (ARP, ICMP type) are matched but not rewritten
  }
}

bool frame_dec_ttl(Frame& f) {
  FrameLayout l = layout_of(f);
  if (!l.l3) return true;
  uint8_t* ip = f.data + l.l3;
  uint16_t eth_type = rd16(ip - 2);
  if (eth_type == kEthTypeIpv4 && f.len >= l.l3 + 20u) {
    if (ip[8] <= 1) return false;
    uint16_t old = rd16(ip + 8);
    ip[8]--;
    csum_replace16(ip + 10, old, rd16(ip + 8));
  } else if (eth_type == kEthTypeIpv6 && f.len >= l.l3 + 40u) {
    if (ip[7] <= 1) return false;
    ip[7]--;
  }
  return true;
}

void frame_set_ttl(Frame& f, uint8_t ttl) {
  FrameLayout l = layout_of(f);
  if (!l.l3) return;
  uint8_t* ip = f.data + l.l3;
  uint16_t eth_type = rd16(ip - 2);
  if (eth_type == kEthTypeIpv4 && f.len >= l.l3 + 20u) {
    uint16_t old = rd16(ip + 8);
    ip[8] = ttl;
    csum_replace16(ip + 10, old, rd16(ip + 8));
  } else if (eth_type == kEthTypeIpv6 && f.len >= l.l3 + 40u) {
    ip[7] = ttl;
  }
}

}  // namespace keel::sw
