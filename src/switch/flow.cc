#include "switch/flow.h"

#include <netinet/in.h>

#include <cstddef>

namespace keel::sw {

uint64_t hash_words(const uint64_t* w, size_t n, uint64_t basis) {
  // A multiply-xorshift mix per word: cheap, and good enough to spread masked keys over buckets.
  uint64_t h = basis ^ 0x9e3779b97f4a7c15ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= w[i] + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 32;
  }
  return h;
}

namespace {

uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
uint32_t rd32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

}  // namespace

void extract_flow(const uint8_t* f, size_t len, uint32_t in_port, FlowKey& k, FrameLayout& layout) {
  std::memset(&k, 0, sizeof k);
  layout = {};
  k.in_port = be32(in_port);
  if (len < 14) return;
  std::memcpy(k.eth_dst, f, 6);
  std::memcpy(k.eth_src, f + 6, 6);
  size_t off = 12;
  uint16_t type = rd16(f + off);
  if (type == be16(kEthTypeVlan) || type == be16(0x88a8)) {
    if (len < 18) return;
    layout.vlan = 12;
    uint16_t tci = be16(rd16(f + 14));
    k.vlan_vid = be16(uint16_t(kVidPresent | (tci & 0x0fff)));
    k.vlan_pcp = uint8_t(tci >> 13);
    off += 4;
    type = rd16(f + off);
  }
  off += 2;
  k.eth_type = type;
  layout.l3 = uint16_t(off);
  const uint8_t* p = f + off;
  size_t rem = len - off;
  uint8_t proto = 0;
  size_t l4 = 0;
  if (type == be16(kEthTypeIpv4)) {
    if (rem < 20) return;
    size_t ihl = size_t(p[0] & 0x0f) * 4;
    if (ihl < 20 || rem < ihl) return;
    k.ip_dscp = p[1] >> 2;
    k.ip_ecn = p[1] & 3;
    proto = k.ip_proto = p[9];
    k.ipv4_src = rd32(p + 12);
    k.ipv4_dst = rd32(p + 16);
    // Only the first fragment carries the L4 header.
    if ((be16(rd16(p + 6)) & 0x1fff) != 0) return;
    l4 = off + ihl;
  } else if (type == be16(kEthTypeIpv6)) {
    if (rem < 40) return;
    uint32_t vtc = be32(rd32(p));
    k.ip_dscp = uint8_t((vtc >> 22) & 0x3f);
    k.ip_ecn = uint8_t((vtc >> 20) & 3);
    proto = k.ip_proto = p[6];
    std::memcpy(k.ipv6_src, p + 8, 16);
    std::memcpy(k.ipv6_dst, p + 24, 16);
    l4 = off + 40;
  } else if (type == be16(kEthTypeArp)) {
    // Ethernet/IPv4 ARP only.
    if (rem < 28 || rd16(p) != be16(1) || rd16(p + 2) != be16(kEthTypeIpv4) || p[4] != 6 || p[5] != 4) return;
    uint16_t op = be16(rd16(p + 6));
    if (op <= 0xff) k.arp_op = be16(op);
    std::memcpy(k.arp_sha, p + 8, 6);
    k.arp_spa = rd32(p + 14);
    std::memcpy(k.arp_tha, p + 18, 6);
    k.arp_tpa = rd32(p + 24);
    return;
  } else {
    return;
  }
  layout.l4 = uint16_t(l4);
  if (l4 > len) return;
  const uint8_t* q = f + l4;
  size_t qrem = len - l4;
  if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
    if (qrem < 4) return;
    k.tp_src = rd16(q);
    k.tp_dst = rd16(q + 2);
  } else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
    if (qrem < 2) return;
    k.icmp_type = q[0];
    k.icmp_code = q[1];
  }
}

namespace {

#define KF(member) uint16_t(offsetof(FlowKey, member))

struct FieldTable {
  OxmFieldInfo f[64];
  FieldTable() {
    auto set = [&](Oxm id, const char* name, uint16_t off, uint8_t len, bool maskable, Prereq p) {
      f[uint8_t(id)] = OxmFieldInfo{true, name, off, len, maskable, p};
    };
    set(Oxm::InPort, "in_port", KF(in_port), 4, false, Prereq::None);
    set(Oxm::Metadata, "metadata", KF(metadata), 8, true, Prereq::None);
    set(Oxm::EthDst, "eth_dst", KF(eth_dst), 6, true, Prereq::None);
    set(Oxm::EthSrc, "eth_src", KF(eth_src), 6, true, Prereq::None);
    set(Oxm::EthType, "eth_type", KF(eth_type), 2, false, Prereq::None);
    set(Oxm::VlanVid, "vlan_vid", KF(vlan_vid), 2, true, Prereq::None);
    set(Oxm::VlanPcp, "vlan_pcp", KF(vlan_pcp), 1, false, Prereq::Vlan);
    set(Oxm::IpDscp, "ip_dscp", KF(ip_dscp), 1, false, Prereq::Ip);
    set(Oxm::IpEcn, "ip_ecn", KF(ip_ecn), 1, false, Prereq::Ip);
    set(Oxm::IpProto, "ip_proto", KF(ip_proto), 1, false, Prereq::Ip);
    set(Oxm::Ipv4Src, "ipv4_src", KF(ipv4_src), 4, true, Prereq::Ipv4);
    set(Oxm::Ipv4Dst, "ipv4_dst", KF(ipv4_dst), 4, true, Prereq::Ipv4);
    set(Oxm::TcpSrc, "tcp_src", KF(tp_src), 2, true, Prereq::Tcp);
    set(Oxm::TcpDst, "tcp_dst", KF(tp_dst), 2, true, Prereq::Tcp);
    set(Oxm::UdpSrc, "udp_src", KF(tp_src), 2, true, Prereq::Udp);
    set(Oxm::UdpDst, "udp_dst", KF(tp_dst), 2, true, Prereq::Udp);
    set(Oxm::SctpSrc, "sctp_src", KF(tp_src), 2, true, Prereq::Sctp);
    set(Oxm::SctpDst, "sctp_dst", KF(tp_dst), 2, true, Prereq::Sctp);
    set(Oxm::Icmpv4Type, "icmpv4_type", KF(icmp_type), 1, false, Prereq::Icmpv4);
    set(Oxm::Icmpv4Code, "icmpv4_code", KF(icmp_code), 1, false, Prereq::Icmpv4);
    set(Oxm::ArpOp, "arp_op", KF(arp_op), 2, false, Prereq::Arp);
    set(Oxm::ArpSpa, "arp_spa", KF(arp_spa), 4, true, Prereq::Arp);
    set(Oxm::ArpTpa, "arp_tpa", KF(arp_tpa), 4, true, Prereq::Arp);
    set(Oxm::ArpSha, "arp_sha", KF(arp_sha), 6, true, Prereq::Arp);
    set(Oxm::ArpTha, "arp_tha", KF(arp_tha), 6, true, Prereq::Arp);
    set(Oxm::Ipv6Src, "ipv6_src", KF(ipv6_src), 16, true, Prereq::Ipv6);
    set(Oxm::Ipv6Dst, "ipv6_dst", KF(ipv6_dst), 16, true, Prereq::Ipv6);
    set(Oxm::Icmpv6Type, "icmpv6_type", KF(icmp_type), 1, false, Prereq::Icmpv6);
    set(Oxm::Icmpv6Code, "icmpv6_code", KF(icmp_code), 1, false, Prereq::Icmpv6);
  }
};
#undef KF

const FieldTable& fields() {
  static const FieldTable table;
  return table;
}

bool any_set(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i]) return true;
  return false;
}

}  // namespace

const OxmFieldInfo& oxm_field_info(uint8_t field) {
  static const OxmFieldInfo unknown{};
  return field < 64 ? fields().f[field] : unknown;
}

void Match::set_field(uint8_t field, const uint8_t* value, const uint8_t* m) {
  const auto& fi = oxm_field_info(field);
  if (!fi.known) return;
  auto* kb = reinterpret_cast<uint8_t*>(&key) + fi.offset;
  auto* mb = reinterpret_cast<uint8_t*>(&mask) + fi.offset;
  for (size_t i = 0; i < fi.length; ++i) {
    uint8_t mm = m ? m[i] : 0xff;
    // VLAN_VID is 13 bits and DSCP 6 bits and so on: the wire width is wider than the field, so mask
    // off the bits the field does not have.
    mb[i] = mm;
    kb[i] = value[i] & mm;
  }
  if (field == uint8_t(Oxm::VlanVid)) {
    mask.vlan_vid &= be16(0x1fff);
    key.vlan_vid &= mask.vlan_vid;
  }
}

bool Match::field_present(uint8_t field) const {
  const auto& fi = oxm_field_info(field);
  if (!fi.known) return false;
  const auto* mb = reinterpret_cast<const uint8_t*>(&mask) + fi.offset;
  if (!any_set(mb, fi.length)) return false;
  // Fields that share storage are present only under their own prerequisite.
  switch (fi.prereq) {
    case Prereq::Tcp: case Prereq::Udp: case Prereq::Sctp: case Prereq::Icmpv4: case Prereq::Icmpv6:
      return prereq_satisfied(fi.prereq);
    default:
      return true;
  }
}

bool Match::prereq_satisfied(Prereq p) const {
  auto eth_is = [&](uint16_t t) { return mask.eth_type == 0xffff && key.eth_type == be16(t); };
  auto proto_is = [&](uint8_t pr) { return mask.ip_proto == 0xff && key.ip_proto == pr; };
  switch (p) {
    case Prereq::None: return true;
    case Prereq::Vlan:
      return (mask.vlan_vid & be16(kVidPresent)) && (key.vlan_vid & be16(kVidPresent));
    case Prereq::Ip: return eth_is(kEthTypeIpv4) || eth_is(kEthTypeIpv6);
    case Prereq::Ipv4: return eth_is(kEthTypeIpv4);
    case Prereq::Ipv6: return eth_is(kEthTypeIpv6);
    case Prereq::Arp: return eth_is(kEthTypeArp);
    case Prereq::Tcp: return (eth_is(kEthTypeIpv4) || eth_is(kEthTypeIpv6)) && proto_is(IPPROTO_TCP);
    case Prereq::Udp: return (eth_is(kEthTypeIpv4) || eth_is(kEthTypeIpv6)) && proto_is(IPPROTO_UDP);
    case Prereq::Sctp: return (eth_is(kEthTypeIpv4) || eth_is(kEthTypeIpv6)) && proto_is(IPPROTO_SCTP);
    case Prereq::Icmpv4: return eth_is(kEthTypeIpv4) && proto_is(IPPROTO_ICMP);
    case Prereq::Icmpv6: return eth_is(kEthTypeIpv6) && proto_is(IPPROTO_ICMPV6);
  }
  return false;
}

std::optional<std::string> Match::missing_prereq() const {
  // Check each stored field region by its canonical owner: shared regions (tp_src, icmp) are checked
  // by whether any of their OXM users is satisfied.
  for (uint8_t f = 0; f < 64; ++f) {
    const auto& fi = oxm_field_info(f);
    if (!fi.known) continue;
    const auto* mb = reinterpret_cast<const uint8_t*>(&mask) + fi.offset;
    if (!any_set(mb, fi.length)) continue;
    if (fi.offset == offsetof(FlowKey, tp_src) || fi.offset == offsetof(FlowKey, tp_dst)) {
      if (!prereq_satisfied(Prereq::Tcp) && !prereq_satisfied(Prereq::Udp) && !prereq_satisfied(Prereq::Sctp))
        return std::string(fi.name);
      continue;
    }
    if (fi.offset == offsetof(FlowKey, icmp_type) || fi.offset == offsetof(FlowKey, icmp_code)) {
      if (!prereq_satisfied(Prereq::Icmpv4) && !prereq_satisfied(Prereq::Icmpv6)) return std::string(fi.name);
      continue;
    }
    if (!prereq_satisfied(fi.prereq)) return std::string(fi.name);
  }
  return std::nullopt;
}

bool Match::covered_by(const Match& wider) const {
  const uint64_t* mk = key.words();
  const uint64_t* mm = mask.words();
  const uint64_t* wk = wider.key.words();
  const uint64_t* wm = wider.mask.words();
  for (size_t i = 0; i < FlowKey::kWords; ++i) {
    // wider may only care about bits we also fix, and must agree on them.
    if ((wm[i] & ~mm[i]) != 0) return false;
    if (((mk[i] ^ wk[i]) & wm[i]) != 0) return false;
  }
  return true;
}

bool Match::matches(const FlowKey& pkt) const {
  const uint64_t* k = key.words();
  const uint64_t* m = mask.words();
  const uint64_t* p = pkt.words();
  for (size_t i = 0; i < FlowKey::kWords; ++i)
    if (((p[i] & m[i]) ^ k[i]) != 0) return false;
  return true;
}

bool Match::overlaps(const Match& o) const {
  for (size_t i = 0; i < FlowKey::kWords; ++i)
    if (((key.words()[i] ^ o.key.words()[i]) & mask.words()[i] & o.mask.words()[i]) != 0) return false;
  return true;
}

void Match::normalize() {
  for (size_t i = 0; i < FlowKey::kWords; ++i) key.words()[i] &= mask.words()[i];
}

}  // namespace keel::sw
