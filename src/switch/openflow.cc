#include "switch/openflow.h"

#include <netinet/in.h>

#include <algorithm>
#include <bit>
#include <bitset>

namespace keel::sw {

namespace {

enum BadRequest : uint16_t { BRC_BAD_VERSION = 0, BRC_BAD_TYPE = 1, BRC_BAD_LEN = 6 };
enum BadAction : uint16_t {
  BAC_BAD_TYPE = 0, BAC_BAD_LEN = 1, BAC_BAD_EXPERIMENTER = 2, BAC_BAD_OUT_PORT = 4, BAC_BAD_ARGUMENT = 5,
  BAC_MATCH_INCONSISTENT = 10, BAC_BAD_SET_TYPE = 13, BAC_BAD_SET_LEN = 14, BAC_BAD_SET_ARGUMENT = 15,
};
enum BadInstruction : uint16_t { BIC_UNKNOWN_INST = 0, BIC_UNSUP_INST = 1, BIC_BAD_TABLE_ID = 2, BIC_BAD_LEN = 7 };
enum BadMatch : uint16_t {
  BMC_BAD_TYPE = 0, BMC_BAD_LEN = 1, BMC_BAD_WILDCARDS = 5, BMC_BAD_FIELD = 6, BMC_BAD_VALUE = 7,
  BMC_BAD_MASK = 8, BMC_BAD_PREREQ = 9, BMC_DUP_FIELD = 10,
};
enum FlowModFailed : uint16_t { FMFC_BAD_COMMAND = 6 };
enum GroupModFailed : uint16_t { GMFC_BAD_TYPE = 10, GMFC_BAD_COMMAND = 11, GMFC_BAD_BUCKET = 12 };

constexpr uint16_t kOxmClassBasic = 0x8000;

}  // namespace

uint32_t port_from_of10(uint16_t p) { return p >= 0xff00 ? 0xffff0000u | p : p; }
uint16_t port_to_of10(uint32_t p) { return p >= 0xffffff00u ? uint16_t(p & 0xffff) : uint16_t(p); }

OfError of_error(uint16_t type, uint16_t code, std::string detail) { return OfError{type, code, std::move(detail)}; }

OfError error_to_of10(const OfError& e) {
  OfError o = e;
  switch (e.type) {
    case OFPET_HELLO_FAILED:
      return o;
    case OFPET_BAD_REQUEST:
      if (e.code > 8) o.code = 5;  // EPERM
      return o;
    case OFPET_BAD_ACTION:
      if (e.code > 8) o.code = BAC_BAD_ARGUMENT;
      return o;
    case OFPET_BAD_INSTRUCTION:
      return OfError{2, BAC_BAD_TYPE, e.detail};
    case OFPET_BAD_MATCH:
      return OfError{1, 5, e.detail};
    case OFPET_FLOW_MOD_FAILED: {
      // 1.3: UNKNOWN 0, TABLE_FULL 1, BAD_TABLE_ID 2, OVERLAP 3, EPERM 4, BAD_TIMEOUT 5, BAD_COMMAND 6
      static const uint16_t map[] = {5, 0, 5, 1, 2, 3, 4, 5};
      return OfError{3, e.code < 8 ? map[e.code] : uint16_t(5), e.detail};
    }
    case OFPET_PORT_MOD_FAILED:
      return OfError{4, e.code == 0 ? uint16_t(0) : uint16_t(1), e.detail};
    default:
      return OfError{1, 5, e.detail};
  }
}

OfHeader decode_header(const uint8_t* p) {
  return OfHeader{p[0], p[1], uint16_t(p[2] << 8 | p[3]),
                  uint32_t(p[4]) << 24 | uint32_t(p[5]) << 16 | uint32_t(p[6]) << 8 | p[7]};
}

void begin_message(std::vector<uint8_t>& out, uint8_t version, uint8_t type, uint32_t xid) {
  ByteWriter w(out);
  w.u8(version);
  w.u8(type);
  w.u16(0);
  w.u32(xid);
}

void finish_message(std::vector<uint8_t>& out, size_t start) {
  ByteWriter(out).patch_u16(start + 2, uint16_t(out.size() - start));
}

std::vector<uint8_t> make_error(uint8_t version, uint32_t xid, const OfError& err,
                                std::span<const uint8_t> request) {
  OfError e = version == kOf10 ? error_to_of10(err) : err;
  std::vector<uint8_t> out;
  begin_message(out, version, OFPT_ERROR, xid);
  ByteWriter w(out);
  w.u16(e.type);
  w.u16(e.code);
  if (e.type == OFPET_HELLO_FAILED)
    w.bytes(e.detail.data(), std::min<size_t>(e.detail.size(), 256));
  else  // the whole request, as Open vSwitch does (the spec asks for at least 64 bytes of it)
    w.bytes(request.data(), std::min<size_t>(request.size(), 0xffff - out.size()));
  finish_message(out);
  return out;
}

bool operator==(const Action& a, const Action& b) {
  return a.type == b.type && a.field == b.field && a.max_len == b.max_len && a.ethertype == b.ethertype &&
         a.arg == b.arg && std::equal(std::begin(a.value), std::end(a.value), std::begin(b.value));
}

bool operator==(const Instructions& a, const Instructions& b) {
  return a.has_apply == b.has_apply && a.apply == b.apply && a.clear_actions == b.clear_actions &&
         a.has_write == b.has_write && a.write == b.write && a.has_metadata == b.has_metadata &&
         a.metadata == b.metadata && a.metadata_mask == b.metadata_mask && a.goto_table == b.goto_table &&
         a.meter == b.meter;
}

// ---------------------------------------------------------------------------------------------------
// Matches

namespace {

constexpr uint32_t OFPFW_IN_PORT = 1 << 0, OFPFW_DL_VLAN = 1 << 1, OFPFW_DL_SRC = 1 << 2,
                   OFPFW_DL_DST = 1 << 3, OFPFW_DL_TYPE = 1 << 4, OFPFW_NW_PROTO = 1 << 5,
                   OFPFW_TP_SRC = 1 << 6, OFPFW_TP_DST = 1 << 7, OFPFW_NW_SRC_SHIFT = 8,
                   OFPFW_NW_DST_SHIFT = 14, OFPFW_DL_VLAN_PCP = 1 << 20, OFPFW_NW_TOS = 1 << 21,
                   OFPFW_ALL = (1 << 22) - 1;

uint32_t prefix_mask(uint32_t wild_bits) {
  if (wild_bits >= 32) return 0;
  return wild_bits == 0 ? 0xffffffffu : ~((1u << wild_bits) - 1);
}

void set_u8(Match& m, Oxm f, uint8_t v) { m.set_field(uint8_t(f), &v, nullptr); }
void set_u16(Match& m, Oxm f, uint16_t v) {
  uint8_t b[2] = {uint8_t(v >> 8), uint8_t(v)};
  m.set_field(uint8_t(f), b, nullptr);
}
void set_u32(Match& m, Oxm f, uint32_t v, uint32_t mask) {
  uint8_t b[4] = {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
  uint8_t mb[4] = {uint8_t(mask >> 24), uint8_t(mask >> 16), uint8_t(mask >> 8), uint8_t(mask)};
  m.set_field(uint8_t(f), b, mb);
}

}  // namespace

OfResult<Match> decode_match_of10(ByteReader& r) {
  if (!r.has(40)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short 1.0 match");
  uint32_t wc = r.u32();
  uint16_t in_port = r.u16();
  uint8_t dl_src[6], dl_dst[6];
  r.bytes(dl_src, 6);
  r.bytes(dl_dst, 6);
  uint16_t dl_vlan = r.u16();
  uint8_t pcp = r.u8();
  r.skip(1);
  uint16_t dl_type = r.u16();
  uint8_t tos = r.u8();
  uint8_t proto = r.u8();
  r.skip(2);
  uint32_t nw_src = r.u32(), nw_dst = r.u32();
  uint16_t tp_src = r.u16(), tp_dst = r.u16();

  Match m;
  if (!(wc & OFPFW_IN_PORT)) set_u32(m, Oxm::InPort, port_from_of10(in_port), 0xffffffff);
  if (!(wc & OFPFW_DL_SRC)) m.set_field(uint8_t(Oxm::EthSrc), dl_src, nullptr);
  if (!(wc & OFPFW_DL_DST)) m.set_field(uint8_t(Oxm::EthDst), dl_dst, nullptr);
  if (!(wc & OFPFW_DL_VLAN)) {
    if (dl_vlan == 0xffff) {
      set_u16(m, Oxm::VlanVid, 0);
    } else {
      set_u16(m, Oxm::VlanVid, uint16_t(kVidPresent | (dl_vlan & 0x0fff)));
      if (!(wc & OFPFW_DL_VLAN_PCP)) set_u8(m, Oxm::VlanPcp, pcp & 7);
    }
  }
  if (!(wc & OFPFW_DL_TYPE)) {
    set_u16(m, Oxm::EthType, dl_type);
    // 1.0 ignores fields whose protocol is absent rather than rejecting them.
    uint32_t src_mask = prefix_mask((wc >> OFPFW_NW_SRC_SHIFT) & 0x3f);
    uint32_t dst_mask = prefix_mask((wc >> OFPFW_NW_DST_SHIFT) & 0x3f);
    if (dl_type == kEthTypeIpv4) {
      if (!(wc & OFPFW_NW_TOS)) set_u8(m, Oxm::IpDscp, tos >> 2);
      if (src_mask) set_u32(m, Oxm::Ipv4Src, nw_src, src_mask);
      if (dst_mask) set_u32(m, Oxm::Ipv4Dst, nw_dst, dst_mask);
      if (!(wc & OFPFW_NW_PROTO)) {
        set_u8(m, Oxm::IpProto, proto);
        if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
          Oxm s = proto == IPPROTO_TCP ? Oxm::TcpSrc : proto == IPPROTO_UDP ? Oxm::UdpSrc : Oxm::SctpSrc;
          Oxm d = Oxm(uint8_t(s) + 1);
          if (!(wc & OFPFW_TP_SRC)) set_u16(m, s, tp_src);
          if (!(wc & OFPFW_TP_DST)) set_u16(m, d, tp_dst);
        } else if (proto == IPPROTO_ICMP) {
          if (!(wc & OFPFW_TP_SRC)) set_u8(m, Oxm::Icmpv4Type, uint8_t(tp_src));
          if (!(wc & OFPFW_TP_DST)) set_u8(m, Oxm::Icmpv4Code, uint8_t(tp_dst));
        }
      }
    } else if (dl_type == kEthTypeArp) {
      if (!(wc & OFPFW_NW_PROTO)) set_u16(m, Oxm::ArpOp, proto);
      if (src_mask) set_u32(m, Oxm::ArpSpa, nw_src, src_mask);
      if (dst_mask) set_u32(m, Oxm::ArpTpa, nw_dst, dst_mask);
    }
  }
  m.normalize();
  return m;
}

void encode_match_of10(ByteWriter& w, const Match& m) {
  const FlowKey& k = m.key;
  const FlowKey& mk = m.mask;
  uint32_t wc = OFPFW_ALL;
  uint16_t in_port = 0, dl_vlan = 0, dl_type = 0, tp_src = 0, tp_dst = 0;
  uint8_t pcp = 0, tos = 0, proto = 0;
  uint32_t nw_src = 0, nw_dst = 0;
  uint8_t zero[6] = {};
  if (mk.in_port) { wc &= ~OFPFW_IN_PORT; in_port = port_to_of10(be32(k.in_port)); }
  bool src = std::any_of(std::begin(mk.eth_src), std::end(mk.eth_src), [](uint8_t b) { return b; });
  bool dst = std::any_of(std::begin(mk.eth_dst), std::end(mk.eth_dst), [](uint8_t b) { return b; });
  if (src) wc &= ~OFPFW_DL_SRC;
  if (dst) wc &= ~OFPFW_DL_DST;
  if (be16(mk.vlan_vid) == 0x1fff) {
    wc &= ~OFPFW_DL_VLAN;
    dl_vlan = k.vlan_vid ? be16(k.vlan_vid) & 0x0fff : 0xffff;
  }
  if (mk.vlan_pcp) { wc &= ~OFPFW_DL_VLAN_PCP; pcp = k.vlan_pcp; }
  if (mk.eth_type) { wc &= ~OFPFW_DL_TYPE; dl_type = be16(k.eth_type); }
  auto prefix_wild = [](uint32_t mask_be) { return uint32_t(32 - std::popcount(mask_be)); };
  if (dl_type == kEthTypeArp) {
    if (mk.arp_op) { wc &= ~OFPFW_NW_PROTO; proto = uint8_t(be16(k.arp_op)); }
    wc = (wc & ~(0x3fu << OFPFW_NW_SRC_SHIFT)) | prefix_wild(mk.arp_spa) << OFPFW_NW_SRC_SHIFT;
    wc = (wc & ~(0x3fu << OFPFW_NW_DST_SHIFT)) | prefix_wild(mk.arp_tpa) << OFPFW_NW_DST_SHIFT;
    nw_src = be32(k.arp_spa);
    nw_dst = be32(k.arp_tpa);
  } else {
    if (mk.ip_dscp) { wc &= ~OFPFW_NW_TOS; tos = uint8_t(k.ip_dscp << 2); }
    if (mk.ip_proto) { wc &= ~OFPFW_NW_PROTO; proto = k.ip_proto; }
    wc = (wc & ~(0x3fu << OFPFW_NW_SRC_SHIFT)) | prefix_wild(mk.ipv4_src) << OFPFW_NW_SRC_SHIFT;
    wc = (wc & ~(0x3fu << OFPFW_NW_DST_SHIFT)) | prefix_wild(mk.ipv4_dst) << OFPFW_NW_DST_SHIFT;
    nw_src = be32(k.ipv4_src);
    nw_dst = be32(k.ipv4_dst);
    if (k.ip_proto == IPPROTO_ICMP) {
      if (mk.icmp_type) { wc &= ~OFPFW_TP_SRC; tp_src = k.icmp_type; }
      if (mk.icmp_code) { wc &= ~OFPFW_TP_DST; tp_dst = k.icmp_code; }
    } else {
      if (mk.tp_src) { wc &= ~OFPFW_TP_SRC; tp_src = be16(k.tp_src); }
      if (mk.tp_dst) { wc &= ~OFPFW_TP_DST; tp_dst = be16(k.tp_dst); }
    }
  }
  w.u32(wc);
  w.u16(in_port);
  w.bytes(src ? k.eth_src : zero, 6);
  w.bytes(dst ? k.eth_dst : zero, 6);
  w.u16(dl_vlan);
  w.u8(pcp);
  w.u8(0);
  w.u16(dl_type);
  w.u8(tos);
  w.u8(proto);
  w.u16(0);
  w.u32(nw_src);
  w.u32(nw_dst);
  w.u16(tp_src);
  w.u16(tp_dst);
}

namespace {

// The parts of an OXM (or NXM) TLV header.
struct TlvHeader {
  uint16_t cls;
  uint8_t field;
  bool hasmask;
  uint8_t len;  // of the body
};
TlvHeader split_tlv_header(uint32_t header) {
  return {uint16_t(header >> 16), uint8_t((header >> 9) & 0x7f), bool(header & 0x100), uint8_t(header & 0xff)};
}

// One OXM TLV (header already read) into the match. `seen` tracks duplicate fields.
OfResult<void> apply_oxm(Match& m, uint32_t header, ByteReader& r, uint64_t& seen) {
  auto [cls, field, hasmask, len] = split_tlv_header(header);
  if (!r.has(len)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "OXM runs past the match");
  auto body = r.span(len);
  if (cls != kOxmClassBasic) return of_fail(OFPET_BAD_MATCH, BMC_BAD_FIELD, "unsupported OXM class");
  const auto& fi = oxm_field_info(field);
  if (!fi.known) return of_fail(OFPET_BAD_MATCH, BMC_BAD_FIELD, "unsupported OXM field");
  if (len != fi.length * (hasmask ? 2 : 1)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "bad OXM length");
  if (hasmask && !fi.maskable) return of_fail(OFPET_BAD_MATCH, BMC_BAD_MASK, "field is not maskable");
  if (seen & (1ull << field)) return of_fail(OFPET_BAD_MATCH, BMC_DUP_FIELD, "duplicate OXM field");
  seen |= 1ull << field;
  const uint8_t* value = body.data();
  const uint8_t* mask = hasmask ? body.data() + fi.length : nullptr;
  if (mask) {
    for (size_t i = 0; i < fi.length; ++i)
      if (value[i] & ~mask[i]) return of_fail(OFPET_BAD_MATCH, BMC_BAD_WILDCARDS, "value has bits outside mask");
  }
  auto u16v = [&] { return uint16_t(value[0] << 8 | value[1]); };
  switch (Oxm(field)) {
    case Oxm::VlanVid:
      if (u16v() > 0x1fff) return of_fail(OFPET_BAD_MATCH, BMC_BAD_VALUE, "vlan_vid out of range");
      break;
    case Oxm::VlanPcp:
      if (value[0] > 7) return of_fail(OFPET_BAD_MATCH, BMC_BAD_VALUE, "vlan_pcp out of range");
      break;
    case Oxm::IpDscp:
      if (value[0] > 63) return of_fail(OFPET_BAD_MATCH, BMC_BAD_VALUE, "ip_dscp out of range");
      break;
    case Oxm::IpEcn:
      if (value[0] > 3) return of_fail(OFPET_BAD_MATCH, BMC_BAD_VALUE, "ip_ecn out of range");
      break;
    case Oxm::ArpOp:
      if (u16v() > 0xff) return of_fail(OFPET_BAD_MATCH, BMC_BAD_VALUE, "arp_op out of range");
      break;
    default:
      break;
  }
  m.set_field(field, value, mask);
  return {};
}

}  // namespace

OfResult<Match> decode_match_oxm(ByteReader& r) {
  if (!r.has(4)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "short match");
  uint16_t type = r.u16();
  uint16_t length = r.u16();
  if (type != 1) return of_fail(OFPET_BAD_MATCH, BMC_BAD_TYPE, "match is not OXM");
  if (length < 4) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "match length below 4");
  size_t padded = (size_t(length) + 7) / 8 * 8;
  if (!r.has(padded - 4)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "match runs past the message");
  ByteReader fields = r.sub(length - 4);
  r.skip(padded - length);
  Match m;
  uint64_t seen = 0;
  while (fields.remaining() > 0) {
    if (!fields.has(4)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "truncated OXM header");
    uint32_t header = fields.u32();
    auto res = apply_oxm(m, header, fields, seen);
    if (!res) return tl::unexpected(res.error());
  }
  if (auto missing = m.missing_prereq())
    return of_fail(OFPET_BAD_MATCH, BMC_BAD_PREREQ, "prerequisite missing for " + *missing);
  m.normalize();
  return m;
}

namespace {

// The OXM field to use on the wire for a field region shared by several OXM fields.
uint8_t wire_field(const Match& m, uint8_t f) {
  Oxm o = Oxm(f);
  bool v6 = m.key.eth_type == be16(kEthTypeIpv6);
  switch (o) {
    case Oxm::TcpSrc: case Oxm::UdpSrc: case Oxm::SctpSrc:
      return uint8_t(m.key.ip_proto == IPPROTO_UDP ? Oxm::UdpSrc
                     : m.key.ip_proto == IPPROTO_SCTP ? Oxm::SctpSrc : Oxm::TcpSrc);
    case Oxm::TcpDst: case Oxm::UdpDst: case Oxm::SctpDst:
      return uint8_t(m.key.ip_proto == IPPROTO_UDP ? Oxm::UdpDst
                     : m.key.ip_proto == IPPROTO_SCTP ? Oxm::SctpDst : Oxm::TcpDst);
    case Oxm::Icmpv4Type: case Oxm::Icmpv6Type:
      return uint8_t(v6 ? Oxm::Icmpv6Type : Oxm::Icmpv4Type);
    case Oxm::Icmpv4Code: case Oxm::Icmpv6Code:
      return uint8_t(v6 ? Oxm::Icmpv6Code : Oxm::Icmpv4Code);
    default:
      return f;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Nicira Extended Match (NXM): OpenFlow 1.0's way to matches 1.0 cannot express (cookie masks, IPv6,
// ARP hardware addresses, metadata). TLVs shaped like OXM; most fields have an OXM twin of the same
// width, a few differ (16-bit in_port, the whole VLAN TCI, the IP TOS byte) and the cookie is a field.

namespace {

constexpr uint16_t kNxmClass0 = 0x0000;  // NXM_OF_*
constexpr uint16_t kNxmClass1 = 0x0001;  // NXM_NX_*

struct NxmTwin {
  uint16_t cls;
  uint8_t field;
  Oxm oxm;
};
// NXM fields that are their OXM twin under another name (same width, same meaning).
constexpr NxmTwin kNxmTwins[] = {
    {kNxmClass0, 1, Oxm::EthDst},      {kNxmClass0, 2, Oxm::EthSrc},      {kNxmClass0, 3, Oxm::EthType},
    {kNxmClass0, 6, Oxm::IpProto},     {kNxmClass0, 7, Oxm::Ipv4Src},     {kNxmClass0, 8, Oxm::Ipv4Dst},
    {kNxmClass0, 9, Oxm::TcpSrc},      {kNxmClass0, 10, Oxm::TcpDst},     {kNxmClass0, 11, Oxm::UdpSrc},
    {kNxmClass0, 12, Oxm::UdpDst},     {kNxmClass0, 13, Oxm::Icmpv4Type}, {kNxmClass0, 14, Oxm::Icmpv4Code},
    {kNxmClass0, 15, Oxm::ArpOp},      {kNxmClass0, 16, Oxm::ArpSpa},     {kNxmClass0, 17, Oxm::ArpTpa},
    {kNxmClass1, 17, Oxm::ArpSha},     {kNxmClass1, 18, Oxm::ArpTha},     {kNxmClass1, 19, Oxm::Ipv6Src},
    {kNxmClass1, 20, Oxm::Ipv6Dst},    {kNxmClass1, 21, Oxm::Icmpv6Type}, {kNxmClass1, 22, Oxm::Icmpv6Code},
    {kNxmClass1, 28, Oxm::IpEcn},
};
constexpr uint8_t kNxmInPort = 0, kNxmVlanTci = 4, kNxmIpTos = 5;  // class 0
constexpr uint8_t kNxmCookie = 30;                                 // class 1

uint32_t oxm_header(Oxm f, bool hasmask, uint8_t len) {
  return uint32_t(kOxmClassBasic) << 16 | uint32_t(f) << 9 | (hasmask ? 0x100u : 0u) | len;
}

// Applies one OXM TLV given as header + bytes (NXM fields translated to their OXM form).
OfResult<void> apply_oxm_bytes(Match& m, uint32_t header, const uint8_t* body, uint64_t& seen) {
  ByteReader r(body, header & 0xff);
  return apply_oxm(m, header, r, seen);
}

void put_nxm(ByteWriter& w, uint16_t cls, uint8_t field, const uint8_t* value, const uint8_t* mask, size_t len,
             bool maskable) {
  bool any = false, full = true;
  for (size_t i = 0; i < len; ++i) {
    any |= mask[i] != 0;
    full &= mask[i] == 0xff;
  }
  if (!any) return;
  bool masked = !full && maskable;
  w.u16(cls);
  w.u8(uint8_t(field << 1 | (masked ? 1 : 0)));
  w.u8(uint8_t(len * (masked ? 2 : 1)));
  w.bytes(value, len);
  if (masked) w.bytes(mask, len);
}

void put_nxm_field(ByteWriter& w, uint16_t cls, uint8_t nxm_field, const Match& m, Oxm f) {
  const auto& fi = oxm_field_info(uint8_t(f));
  const auto* kb = reinterpret_cast<const uint8_t*>(&m.key) + fi.offset;
  const auto* mb = reinterpret_cast<const uint8_t*>(&m.mask) + fi.offset;
  put_nxm(w, cls, nxm_field, kb, mb, fi.length, fi.maskable);
}

}  // namespace

OfResult<Match> decode_match_nxm(ByteReader fields, uint64_t* cookie, uint64_t* cookie_mask) {
  Match m;
  uint64_t seen = 0;
  bool seen_cookie = false;
  while (fields.remaining() > 0) {
    if (!fields.has(4)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "truncated NXM header");
    uint32_t header = fields.u32();
    auto [cls, field, hasmask, len] = split_tlv_header(header);
    if (!fields.has(len)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "NXM field runs past the match");
    auto body = fields.span(len);
    if (cls == kOxmClassBasic) {  // OXM fields are allowed in NXM (metadata, SCTP ports, ...)
      ByteReader r(body);
      if (auto res = apply_oxm(m, header, r, seen); !res) return tl::unexpected(res.error());
      continue;
    }
    size_t width = hasmask ? len / 2u : len;
    if (hasmask && len % 2) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "bad NXM length");
    const uint8_t* value = body.data();
    const uint8_t* mask = hasmask ? body.data() + width : nullptr;
    auto be = [](const uint8_t* p, size_t n) {
      uint64_t v = 0;
      for (size_t i = 0; i < n; ++i) v = v << 8 | p[i];
      return v;
    };
    if (cls == kNxmClass1 && field == kNxmCookie) {
      if (width != 8) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "bad NXM cookie length");
      if (seen_cookie) return of_fail(OFPET_BAD_MATCH, BMC_DUP_FIELD, "duplicate NXM cookie");
      if (!cookie) return of_fail(OFPET_BAD_MATCH, BMC_BAD_FIELD, "cookie is not a match field here");
      seen_cookie = true;
      *cookie = be(value, 8);
      *cookie_mask = mask ? be(mask, 8) : ~0ull;
      *cookie &= *cookie_mask;
      continue;
    }
    if (cls == kNxmClass0 && field == kNxmInPort) {
      if (hasmask || width != 2) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "bad NXM in_port");
      uint8_t port[4];
      uint32_t p = port_from_of10(uint16_t(be(value, 2)));
      for (int i = 0; i < 4; ++i) port[i] = uint8_t(p >> (24 - 8 * i));
      if (auto res = apply_oxm_bytes(m, oxm_header(Oxm::InPort, false, 4), port, seen); !res)
        return tl::unexpected(res.error());
      continue;
    }
    if (cls == kNxmClass0 && field == kNxmVlanTci) {
      if (width != 2) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "bad NXM vlan_tci");
      uint16_t tci = uint16_t(be(value, 2)), tci_mask = mask ? uint16_t(be(mask, 2)) : 0xffff;
      if (tci & ~tci_mask) return of_fail(OFPET_BAD_MATCH, BMC_BAD_WILDCARDS, "value has bits outside mask");
      uint16_t pcp_bits = tci_mask & 0xe000;
      if (pcp_bits != 0 && pcp_bits != 0xe000)
        return of_fail(OFPET_BAD_MATCH, BMC_BAD_MASK, "partial vlan_pcp masks are not supported");
      // TCI 0 with the CFI bit matched: no 802.1Q header, which OXM says as vlan_vid=OFPVID_NONE.
      uint16_t vid = tci & 0x1fff, vid_mask = tci_mask & 0x1fff;
      if (vid_mask) {
        uint8_t v[4] = {uint8_t(vid >> 8), uint8_t(vid), uint8_t(vid_mask >> 8), uint8_t(vid_mask)};
        bool full = vid_mask == 0x1fff;
        if (auto res = apply_oxm_bytes(m, oxm_header(Oxm::VlanVid, !full, full ? 2 : 4), v, seen); !res)
          return tl::unexpected(res.error());
      }
      if (pcp_bits && (tci & 0x1000)) {
        uint8_t pcp = uint8_t(tci >> 13);
        if (auto res = apply_oxm_bytes(m, oxm_header(Oxm::VlanPcp, false, 1), &pcp, seen); !res)
          return tl::unexpected(res.error());
      }
      continue;
    }
    if (cls == kNxmClass0 && field == kNxmIpTos) {
      if (hasmask || width != 1) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "bad NXM ip_tos");
      uint8_t dscp = uint8_t(value[0] >> 2);
      if (auto res = apply_oxm_bytes(m, oxm_header(Oxm::IpDscp, false, 1), &dscp, seen); !res)
        return tl::unexpected(res.error());
      continue;
    }
    const NxmTwin* twin = nullptr;
    for (const auto& t : kNxmTwins)
      if (t.cls == cls && t.field == field) twin = &t;
    if (!twin) return of_fail(OFPET_BAD_MATCH, BMC_BAD_FIELD, "unsupported NXM field");
    if (auto res = apply_oxm_bytes(m, oxm_header(twin->oxm, hasmask, len), body.data(), seen); !res)
      return tl::unexpected(res.error());
  }
  if (auto missing = m.missing_prereq())
    return of_fail(OFPET_BAD_MATCH, BMC_BAD_PREREQ, "prerequisite missing for " + *missing);
  m.normalize();
  return m;
}

size_t encode_match_nxm(ByteWriter& w, const Match& m) {
  size_t start = w.size();
  // Prerequisites first: Open vSwitch checks each field against the fields before it.
  if (m.mask.in_port) {
    uint16_t port = port_to_of10(be32(m.key.in_port));
    uint8_t v[2] = {uint8_t(port >> 8), uint8_t(port)}, full[2] = {0xff, 0xff};
    put_nxm(w, kNxmClass0, kNxmInPort, v, full, 2, false);
  }
  put_nxm_field(w, kNxmClass0, 1, m, Oxm::EthDst);
  put_nxm_field(w, kNxmClass0, 2, m, Oxm::EthSrc);
  put_nxm_field(w, kNxmClass0, 3, m, Oxm::EthType);
  uint16_t vid = be16(m.key.vlan_vid), vid_mask = be16(m.mask.vlan_vid);
  if (vid_mask || m.mask.vlan_pcp) {
    uint16_t tci = vid & 0x1fff, tci_mask = vid_mask & 0x1fff;
    if ((tci_mask & 0x1000) && !(tci & 0x1000)) {
      tci_mask = 0xffff;  // no 802.1Q header: the whole TCI is zero
    } else if (m.mask.vlan_pcp) {
      tci |= uint16_t(m.key.vlan_pcp << 13);
      tci_mask |= 0xe000;
    }
    uint8_t v[2] = {uint8_t(tci >> 8), uint8_t(tci)}, mk[2] = {uint8_t(tci_mask >> 8), uint8_t(tci_mask)};
    put_nxm(w, kNxmClass0, kNxmVlanTci, v, mk, 2, true);
  }
  put_nxm_field(w, kNxmClass0, 6, m, Oxm::IpProto);
  if (m.mask.ip_dscp) {
    uint8_t tos = uint8_t(m.key.ip_dscp << 2), full = 0xff;
    put_nxm(w, kNxmClass0, kNxmIpTos, &tos, &full, 1, false);
  }
  put_nxm_field(w, kNxmClass1, 28, m, Oxm::IpEcn);
  put_nxm_field(w, kNxmClass0, 7, m, Oxm::Ipv4Src);
  put_nxm_field(w, kNxmClass0, 8, m, Oxm::Ipv4Dst);
  put_nxm_field(w, kNxmClass1, 19, m, Oxm::Ipv6Src);
  put_nxm_field(w, kNxmClass1, 20, m, Oxm::Ipv6Dst);
  uint8_t proto = m.mask.ip_proto ? m.key.ip_proto : 0;
  bool v6 = m.key.eth_type == be16(kEthTypeIpv6);
  if (proto == IPPROTO_SCTP) {
    // NXM has no SCTP ports: Open vSwitch sends their OXM form.
    for (Oxm f : {Oxm::SctpSrc, Oxm::SctpDst}) {
      const auto& fi = oxm_field_info(uint8_t(f));
      put_nxm(w, kOxmClassBasic, uint8_t(f), reinterpret_cast<const uint8_t*>(&m.key) + fi.offset,
              reinterpret_cast<const uint8_t*>(&m.mask) + fi.offset, fi.length, fi.maskable);
    }
  } else if (proto == IPPROTO_UDP) {
    put_nxm_field(w, kNxmClass0, 11, m, Oxm::UdpSrc);
    put_nxm_field(w, kNxmClass0, 12, m, Oxm::UdpDst);
  } else if (proto == IPPROTO_TCP) {
    put_nxm_field(w, kNxmClass0, 9, m, Oxm::TcpSrc);
    put_nxm_field(w, kNxmClass0, 10, m, Oxm::TcpDst);
  } else if (v6) {
    put_nxm_field(w, kNxmClass1, 21, m, Oxm::Icmpv6Type);
    put_nxm_field(w, kNxmClass1, 22, m, Oxm::Icmpv6Code);
  } else {
    put_nxm_field(w, kNxmClass0, 13, m, Oxm::Icmpv4Type);
    put_nxm_field(w, kNxmClass0, 14, m, Oxm::Icmpv4Code);
  }
  put_nxm_field(w, kNxmClass0, 15, m, Oxm::ArpOp);
  put_nxm_field(w, kNxmClass0, 16, m, Oxm::ArpSpa);
  put_nxm_field(w, kNxmClass0, 17, m, Oxm::ArpTpa);
  put_nxm_field(w, kNxmClass1, 17, m, Oxm::ArpSha);
  put_nxm_field(w, kNxmClass1, 18, m, Oxm::ArpTha);
  const auto& md = oxm_field_info(uint8_t(Oxm::Metadata));
  put_nxm(w, kOxmClassBasic, uint8_t(Oxm::Metadata), reinterpret_cast<const uint8_t*>(&m.key) + md.offset,
          reinterpret_cast<const uint8_t*>(&m.mask) + md.offset, md.length, md.maskable);
  return w.size() - start;
}

void encode_match_oxm(ByteWriter& w, const Match& m) {
  size_t start = w.size();
  w.u16(1);
  w.u16(0);  // patched
  std::bitset<sizeof(FlowKey)> emitted;  // FlowKey offsets already written (shared regions emit once)
  for (uint8_t f = 0; f < 64; ++f) {
    const auto& fi = oxm_field_info(f);
    if (!fi.known) continue;
    const auto* kb = reinterpret_cast<const uint8_t*>(&m.key) + fi.offset;
    const auto* mb = reinterpret_cast<const uint8_t*>(&m.mask) + fi.offset;
    bool any = false, full = true;
    for (size_t i = 0; i < fi.length; ++i) {
      any |= mb[i] != 0;
      full &= mb[i] == 0xff;
    }
    if (f == uint8_t(Oxm::VlanVid)) full = m.mask.vlan_vid == be16(0x1fff);
    if (!any) continue;
    if (emitted[fi.offset]) continue;
    uint8_t wf = wire_field(m, f);
    if (wf != f) continue;  // emitted under its proper name (which comes later or earlier)
    emitted[fi.offset] = true;
    bool masked = !full && fi.maskable;
    w.u16(kOxmClassBasic);
    w.u8(uint8_t(wf << 1 | (masked ? 1 : 0)));
    w.u8(uint8_t(fi.length * (masked ? 2 : 1)));
    w.bytes(kb, fi.length);
    if (masked) w.bytes(mb, fi.length);
  }
  size_t len = w.size() - start;
  w.patch_u16(start + 2, uint16_t(len));
  w.pad_to(8, start);
}

// ---------------------------------------------------------------------------------------------------
// Actions

namespace {

enum Of13Action : uint16_t {
  AT_OUTPUT = 0, AT_SET_QUEUE = 21, AT_GROUP = 22, AT_SET_NW_TTL = 23, AT_DEC_NW_TTL = 24, AT_SET_FIELD = 25,
  AT_PUSH_VLAN = 17, AT_POP_VLAN = 18, AT_EXPERIMENTER = 0xffff,
};
enum Of10Action : uint16_t {
  AT10_OUTPUT = 0, AT10_SET_VLAN_VID = 1, AT10_SET_VLAN_PCP = 2, AT10_STRIP_VLAN = 3, AT10_SET_DL_SRC = 4,
  AT10_SET_DL_DST = 5, AT10_SET_NW_SRC = 6, AT10_SET_NW_DST = 7, AT10_SET_NW_TOS = 8, AT10_SET_TP_SRC = 9,
  AT10_SET_TP_DST = 10, AT10_ENQUEUE = 11, AT10_VENDOR = 0xffff,
};

bool valid_output_port(uint32_t p) {
  if (p == 0 || p == OFPP_ANY) return false;
  if (p < OFPP_MAX) return true;
  return p >= OFPP_IN_PORT && p <= OFPP_LOCAL;
}

Action set_field_action(Oxm f, const uint8_t* v) {
  Action a;
  a.type = ActionType::SetField;
  a.field = uint8_t(f);
  std::memcpy(a.value, v, oxm_field_info(uint8_t(f)).length);
  return a;
}

OfResult<Action> decode_action13(uint16_t type, ByteReader& body, const Match* match) {
  Action a;
  switch (type) {
    case AT_OUTPUT: {
      if (body.remaining() != 12) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "output length");
      a.type = ActionType::Output;
      a.arg = body.u32();
      a.max_len = body.u16();
      if (!valid_output_port(a.arg)) return of_fail(OFPET_BAD_ACTION, BAC_BAD_OUT_PORT, "bad output port");
      return a;
    }
    case AT_GROUP:
      if (body.remaining() != 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "group length");
      a.type = ActionType::Group;
      a.arg = body.u32();
      if (a.arg > OFPG_MAX) return of_fail(OFPET_BAD_ACTION, 9, "bad group id");
      return a;
    case AT_SET_QUEUE:
      if (body.remaining() != 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "set_queue length");
      a.type = ActionType::SetQueue;
      a.arg = body.u32();
      return a;
    case AT_PUSH_VLAN:
      if (body.remaining() != 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "push_vlan length");
      a.type = ActionType::PushVlan;
      a.ethertype = body.u16();
      if (a.ethertype != 0x8100 && a.ethertype != 0x88a8)
        return of_fail(OFPET_BAD_ACTION, BAC_BAD_ARGUMENT, "push_vlan ethertype");
      return a;
    case AT_POP_VLAN:
      if (body.remaining() != 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "pop_vlan length");
      a.type = ActionType::PopVlan;
      return a;
    case AT_DEC_NW_TTL:
      if (body.remaining() != 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "dec_nw_ttl length");
      a.type = ActionType::DecNwTtl;
      return a;
    case AT_SET_NW_TTL:
      if (body.remaining() != 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "set_nw_ttl length");
      a.type = ActionType::SetNwTtl;
      a.arg = body.u8();
      return a;
    case AT_SET_FIELD: {
      if (body.remaining() < 4) return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_LEN, "set_field length");
      uint32_t h = body.u32();
      uint8_t field = uint8_t((h >> 9) & 0x7f);
      uint8_t len = uint8_t(h & 0xff);
      if ((h >> 16) != kOxmClassBasic) return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_TYPE, "set_field class");
      const auto& fi = oxm_field_info(field);
      if (!fi.known || field == uint8_t(Oxm::InPort) || field == uint8_t(Oxm::Metadata))
        return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_TYPE, "set_field of an unsupported field");
      if (h & 0x100) return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_ARGUMENT, "masked set_field");
      if (len != fi.length || body.remaining() < len)
        return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_LEN, "set_field value length");
      // The TLV is padded to 8 bytes: the padding must be exactly what rounds 4+4+len up.
      if (body.remaining() - len >= 8) return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_LEN, "set_field padding");
      uint8_t v[16];
      body.bytes(v, len);
      if (field == uint8_t(Oxm::VlanVid)) {
        uint16_t vid = uint16_t(v[0] << 8 | v[1]);
        if ((vid & ~0x1000) > 0xfff) return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_ARGUMENT, "vlan_vid value");
        v[0] |= 0x10;  // set_field of vlan_vid always sets a present tag
      }
      if (field == uint8_t(Oxm::VlanPcp) && v[0] > 7)
        return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_ARGUMENT, "vlan_pcp value");
      if (field == uint8_t(Oxm::IpDscp) && v[0] > 63)
        return of_fail(OFPET_BAD_ACTION, BAC_BAD_SET_ARGUMENT, "ip_dscp value");
      if (match && fi.prereq != Prereq::None && fi.prereq != Prereq::Vlan && !match->prereq_satisfied(fi.prereq))
        return of_fail(OFPET_BAD_ACTION, BAC_MATCH_INCONSISTENT, std::string("set_field ") + fi.name +
                                                                      " without its prerequisite in the match");
      return set_field_action(Oxm(field), v);
    }
    case AT_EXPERIMENTER:
      return of_fail(OFPET_BAD_ACTION, BAC_BAD_EXPERIMENTER, "experimenter action");
    default:
      return of_fail(OFPET_BAD_ACTION, BAC_BAD_TYPE, "unsupported action type");
  }
}

OfResult<Action> decode_action10(uint16_t type, ByteReader& body, const Match* match) {
  Action a;
  auto want = [&](size_t n) { return body.remaining() == n; };
  switch (type) {
    case AT10_OUTPUT:
      if (!want(4)) break;
      a.type = ActionType::Output;
      a.arg = port_from_of10(body.u16());
      a.max_len = body.u16();
      if (!valid_output_port(a.arg)) return of_fail(OFPET_BAD_ACTION, BAC_BAD_OUT_PORT, "bad output port");
      return a;
    case AT10_SET_VLAN_VID: {
      if (!want(4)) break;
      uint16_t vid = body.u16();
      if (vid > 0xfff) return of_fail(OFPET_BAD_ACTION, BAC_BAD_ARGUMENT, "vlan id");
      uint8_t v[2] = {uint8_t((vid | kVidPresent) >> 8), uint8_t(vid)};
      return set_field_action(Oxm::VlanVid, v);
    }
    case AT10_SET_VLAN_PCP: {
      if (!want(4)) break;
      uint8_t pcp = body.u8();
      if (pcp > 7) return of_fail(OFPET_BAD_ACTION, BAC_BAD_ARGUMENT, "vlan pcp");
      return set_field_action(Oxm::VlanPcp, &pcp);
    }
    case AT10_STRIP_VLAN:
      if (!want(4)) break;
      a.type = ActionType::PopVlan;
      return a;
    case AT10_SET_DL_SRC:
    case AT10_SET_DL_DST: {
      if (!want(12)) break;
      uint8_t mac[6];
      body.bytes(mac, 6);
      return set_field_action(type == AT10_SET_DL_SRC ? Oxm::EthSrc : Oxm::EthDst, mac);
    }
    case AT10_SET_NW_SRC:
    case AT10_SET_NW_DST: {
      if (!want(4)) break;
      uint8_t ip[4];
      body.bytes(ip, 4);
      return set_field_action(type == AT10_SET_NW_SRC ? Oxm::Ipv4Src : Oxm::Ipv4Dst, ip);
    }
    case AT10_SET_NW_TOS: {
      if (!want(4)) break;
      uint8_t tos = body.u8();
      if (tos & 3) return of_fail(OFPET_BAD_ACTION, BAC_BAD_ARGUMENT, "nw_tos has ECN bits");
      uint8_t dscp = tos >> 2;
      return set_field_action(Oxm::IpDscp, &dscp);
    }
    case AT10_SET_TP_SRC:
    case AT10_SET_TP_DST: {
      if (!want(4)) break;
      uint8_t port[2];
      body.bytes(port, 2);
      bool udp = match && match->key.ip_proto == IPPROTO_UDP;
      Oxm f = type == AT10_SET_TP_SRC ? (udp ? Oxm::UdpSrc : Oxm::TcpSrc) : (udp ? Oxm::UdpDst : Oxm::TcpDst);
      return set_field_action(f, port);
    }
    case AT10_VENDOR:
      return of_fail(OFPET_BAD_ACTION, BAC_BAD_EXPERIMENTER, "vendor action");
    default:
      return of_fail(OFPET_BAD_ACTION, BAC_BAD_TYPE, "unsupported action type");
  }
  return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "action length");
}

}  // namespace

OfResult<std::vector<Action>> decode_actions(uint8_t version, ByteReader r, const Match* match) {
  std::vector<Action> out;
  while (r.remaining() > 0) {
    if (!r.has(4)) return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "truncated action header");
    uint16_t type = r.u16();
    uint16_t len = r.u16();
    if (len < 8 || len % 8 != 0 || !r.has(len - 4))
      return of_fail(OFPET_BAD_ACTION, BAC_BAD_LEN, "bad action length");
    ByteReader body = r.sub(len - 4);
    auto a = version == kOf10 ? decode_action10(type, body, match) : decode_action13(type, body, match);
    if (!a) return tl::unexpected(a.error());
    out.push_back(*a);
    if (out.size() > 1024) return of_fail(OFPET_BAD_ACTION, 7, "too many actions");
  }
  return out;
}

void encode_actions(uint8_t version, ByteWriter& w, const std::vector<Action>& actions) {
  for (const Action& a : actions) {
    if (version == kOf10) {
      switch (a.type) {
        case ActionType::Output:
          w.u16(AT10_OUTPUT); w.u16(8); w.u16(port_to_of10(a.arg)); w.u16(a.max_len);
          break;
        case ActionType::PopVlan:
          w.u16(AT10_STRIP_VLAN); w.u16(8); w.u32(0);
          break;
        case ActionType::SetField:
          switch (Oxm(a.field)) {
            case Oxm::VlanVid:
              w.u16(AT10_SET_VLAN_VID); w.u16(8); w.u16(uint16_t((a.value[0] << 8 | a.value[1]) & 0xfff)); w.u16(0);
              break;
            case Oxm::VlanPcp:
              w.u16(AT10_SET_VLAN_PCP); w.u16(8); w.u8(a.value[0]); w.zeros(3);
              break;
            case Oxm::EthSrc: case Oxm::EthDst:
              w.u16(Oxm(a.field) == Oxm::EthSrc ? AT10_SET_DL_SRC : AT10_SET_DL_DST); w.u16(16);
              w.bytes(a.value, 6); w.zeros(6);
              break;
            case Oxm::Ipv4Src: case Oxm::Ipv4Dst:
              w.u16(Oxm(a.field) == Oxm::Ipv4Src ? AT10_SET_NW_SRC : AT10_SET_NW_DST); w.u16(8);
              w.bytes(a.value, 4);
              break;
            case Oxm::IpDscp:
              w.u16(AT10_SET_NW_TOS); w.u16(8); w.u8(uint8_t(a.value[0] << 2)); w.zeros(3);
              break;
            case Oxm::TcpSrc: case Oxm::UdpSrc:
              w.u16(AT10_SET_TP_SRC); w.u16(8); w.bytes(a.value, 2); w.u16(0);
              break;
            case Oxm::TcpDst: case Oxm::UdpDst:
              w.u16(AT10_SET_TP_DST); w.u16(8); w.bytes(a.value, 2); w.u16(0);
              break;
            default:
              break;  // not expressible in 1.0
          }
          break;
        default:
          break;  // not expressible in 1.0
      }
      continue;
    }
    switch (a.type) {
      case ActionType::Output:
        w.u16(AT_OUTPUT); w.u16(16); w.u32(a.arg); w.u16(a.max_len); w.zeros(6);
        break;
      case ActionType::Group:
        w.u16(AT_GROUP); w.u16(8); w.u32(a.arg);
        break;
      case ActionType::SetQueue:
        w.u16(AT_SET_QUEUE); w.u16(8); w.u32(a.arg);
        break;
      case ActionType::PushVlan:
        w.u16(AT_PUSH_VLAN); w.u16(8); w.u16(a.ethertype); w.u16(0);
        break;
      case ActionType::PopVlan:
        w.u16(AT_POP_VLAN); w.u16(8); w.u32(0);
        break;
      case ActionType::DecNwTtl:
        w.u16(AT_DEC_NW_TTL); w.u16(8); w.u32(0);
        break;
      case ActionType::SetNwTtl:
        w.u16(AT_SET_NW_TTL); w.u16(8); w.u8(uint8_t(a.arg)); w.zeros(3);
        break;
      case ActionType::SetField: {
        const auto& fi = oxm_field_info(a.field);
        size_t start = w.size();
        w.u16(AT_SET_FIELD);
        w.u16(uint16_t((8 + fi.length + 7) / 8 * 8));
        w.u16(kOxmClassBasic);
        w.u8(uint8_t(a.field << 1));
        w.u8(fi.length);
        w.bytes(a.value, fi.length);
        w.pad_to(8, start);
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Instructions

namespace {
enum InstructionType : uint16_t { IT_GOTO_TABLE = 1, IT_WRITE_METADATA = 2, IT_WRITE_ACTIONS = 3,
                                  IT_APPLY_ACTIONS = 4, IT_CLEAR_ACTIONS = 5, IT_METER = 6 };
}

OfResult<Instructions> decode_instructions(ByteReader r, const Match& match) {
  Instructions ins;
  uint32_t seen = 0;
  while (r.remaining() > 0) {
    if (!r.has(4)) return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_LEN, "truncated instruction");
    uint16_t type = r.u16();
    uint16_t len = r.u16();
    if (len < 8 || len % 8 != 0 || !r.has(len - 4))
      return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_LEN, "bad instruction length");
    ByteReader body = r.sub(len - 4);
    if (type < 32) {
      if (seen & (1u << type)) return of_fail(OFPET_BAD_INSTRUCTION, BIC_UNSUP_INST, "duplicate instruction");
      seen |= 1u << type;
    }
    switch (type) {
      case IT_GOTO_TABLE:
        if (len != 8) return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_LEN, "goto_table length");
        ins.goto_table = body.u8();
        if (*ins.goto_table >= kNumTables) return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_TABLE_ID, "goto_table");
        break;
      case IT_WRITE_METADATA:
        if (len != 24) return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_LEN, "write_metadata length");
        body.skip(4);
        ins.has_metadata = true;
        ins.metadata = body.u64();
        ins.metadata_mask = body.u64();
        break;
      case IT_WRITE_ACTIONS:
      case IT_APPLY_ACTIONS: {
        body.skip(4);
        auto acts = decode_actions(kOf13, body.sub(body.remaining()), &match);
        if (!acts) return tl::unexpected(acts.error());
        if (type == IT_APPLY_ACTIONS) {
          ins.has_apply = true;
          ins.apply = std::move(*acts);
        } else {
          ins.has_write = true;
          ins.write = std::move(*acts);
        }
        break;
      }
      case IT_CLEAR_ACTIONS:
        if (len != 8) return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_LEN, "clear_actions length");
        ins.clear_actions = true;
        break;
      case IT_METER:
        if (len != 8) return of_fail(OFPET_BAD_INSTRUCTION, BIC_BAD_LEN, "meter length");
        ins.meter = body.u32();
        break;
      default:
        return of_fail(OFPET_BAD_INSTRUCTION, BIC_UNKNOWN_INST, "unknown instruction");
    }
  }
  return ins;
}

void encode_instructions(ByteWriter& w, const Instructions& ins) {
  // Pipeline order, which is also the order Open vSwitch reports them in.
  if (ins.meter) { w.u16(IT_METER); w.u16(8); w.u32(*ins.meter); }
  if (ins.has_apply) {
    size_t start = w.size();
    w.u16(IT_APPLY_ACTIONS); w.u16(0); w.u32(0);
    encode_actions(kOf13, w, ins.apply);
    w.patch_u16(start + 2, uint16_t(w.size() - start));
  }
  if (ins.clear_actions) { w.u16(IT_CLEAR_ACTIONS); w.u16(8); w.u32(0); }
  if (ins.has_write) {
    size_t start = w.size();
    w.u16(IT_WRITE_ACTIONS); w.u16(0); w.u32(0);
    encode_actions(kOf13, w, ins.write);
    w.patch_u16(start + 2, uint16_t(w.size() - start));
  }
  if (ins.has_metadata) {
    w.u16(IT_WRITE_METADATA); w.u16(24); w.u32(0); w.u64(ins.metadata); w.u64(ins.metadata_mask);
  }
  if (ins.goto_table) { w.u16(IT_GOTO_TABLE); w.u16(8); w.u8(*ins.goto_table); w.zeros(3); }
}

const std::vector<Action>& of10_actions(const Instructions& ins) { return ins.apply; }

OfResult<MeterMod> decode_meter_mod(std::span<const uint8_t> msg) {
  constexpr uint16_t BAD_BAND = 8, BAD_RATE = 6, BAD_FLAGS = 5, BAD_COMMAND = 4, OUT_OF_BANDS = 11;
  ByteReader r(msg.subspan(kOfHeaderLen));
  MeterMod mm;
  mm.command = r.u16();
  mm.flags = r.u16();
  mm.meter_id = r.u32();
  if (!r.ok()) return of_fail(OFPET_BAD_REQUEST, 6, "short meter_mod");
  if (mm.command > 2) return of_fail(OFPET_METER_MOD_FAILED, BAD_COMMAND, "bad meter command");
  if (mm.command == 2) return mm;  // delete: bands do not matter
  if (mm.flags & ~uint16_t(OFPMF_KBPS | OFPMF_PKTPS | OFPMF_BURST | OFPMF_STATS) ||
      bool(mm.flags & OFPMF_KBPS) == bool(mm.flags & OFPMF_PKTPS))
    return of_fail(OFPET_METER_MOD_FAILED, BAD_FLAGS, "meter flags need exactly one of kbps, pktps");
  while (r.remaining() > 0) {
    if (!r.has(16)) return of_fail(OFPET_BAD_REQUEST, 6, "truncated meter band");
    MeterBand b;
    b.type = r.u16();
    uint16_t len = r.u16();
    if (len < 16 || !r.has(size_t(len) - 4)) return of_fail(OFPET_BAD_REQUEST, 6, "bad meter band length");
    b.rate = r.u32();
    b.burst_size = r.u32();
    r.skip(size_t(len) - 12);
    if (b.type != OFPMBT_DROP) return of_fail(OFPET_METER_MOD_FAILED, BAD_BAND, "only drop bands are supported");
    if (b.rate == 0) return of_fail(OFPET_METER_MOD_FAILED, BAD_RATE, "meter band rate 0");
    if (mm.bands.size() >= kMaxMeterBands) return of_fail(OFPET_METER_MOD_FAILED, OUT_OF_BANDS, "too many bands");
    mm.bands.push_back(b);
  }
  return mm;
}

void encode_meter_bands(ByteWriter& w, const std::vector<MeterBand>& bands) {
  for (const MeterBand& b : bands) {
    w.u16(b.type);
    w.u16(16);
    w.u32(b.rate);
    w.u32(b.burst_size);
    w.zeros(4);
  }
}

void encode_meter_mod(std::vector<uint8_t>& out, const MeterMod& mm, uint32_t xid) {
  size_t start = out.size();
  begin_message(out, kOf13, OFPT13_METER_MOD, xid);
  ByteWriter w(out);
  w.u16(mm.command);
  w.u16(mm.flags);
  w.u32(mm.meter_id);
  encode_meter_bands(w, mm.bands);
  finish_message(out, start);
}

// ---------------------------------------------------------------------------------------------------
// Messages

OfResult<FlowMod> decode_flow_mod(uint8_t version, std::span<const uint8_t> msg) {
  ByteReader r(msg);
  r.skip(kOfHeaderLen);
  FlowMod fm;
  if (version == kOf10) {
    if (!r.has(40 + 24)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short flow_mod");
    auto m = decode_match_of10(r);
    if (!m) return tl::unexpected(m.error());
    fm.match = *m;
    fm.cookie = r.u64();
    uint16_t command = r.u16();
    if (command > OFPFC_DELETE_STRICT) return of_fail(OFPET_FLOW_MOD_FAILED, FMFC_BAD_COMMAND, "command");
    fm.command = uint8_t(command);
    fm.idle_timeout = r.u16();
    fm.hard_timeout = r.u16();
    fm.priority = r.u16();
    fm.buffer_id = r.u32();
    fm.out_port = port_from_of10(r.u16());
    if (fm.out_port == 0xffffffff) fm.out_port = OFPP_ANY;
    fm.flags = r.u16() & (OFPFF_SEND_FLOW_REM | OFPFF_CHECK_OVERLAP);
    // 1.0 modifications and deletions ignore cookies (there is no cookie mask).
    fm.cookie_mask = 0;
    auto acts = decode_actions(kOf10, r.sub(r.remaining()), &fm.match);
    if (!acts) return tl::unexpected(acts.error());
    fm.instructions.has_apply = true;
    fm.instructions.apply = std::move(*acts);
    return fm;
  }
  if (!r.has(40 + 4)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short flow_mod");
  fm.cookie = r.u64();
  fm.cookie_mask = r.u64();
  fm.table_id = r.u8();
  fm.command = r.u8();
  if (fm.command > OFPFC_DELETE_STRICT) return of_fail(OFPET_FLOW_MOD_FAILED, FMFC_BAD_COMMAND, "command");
  fm.idle_timeout = r.u16();
  fm.hard_timeout = r.u16();
  fm.priority = r.u16();
  fm.buffer_id = r.u32();
  fm.out_port = r.u32();
  fm.out_group = r.u32();
  fm.flags = r.u16();
  r.skip(2);
  if (fm.flags & ~uint16_t(0x1f)) return of_fail(OFPET_FLOW_MOD_FAILED, 7, "unknown flags");
  auto m = decode_match_oxm(r);
  if (!m) return tl::unexpected(m.error());
  fm.match = *m;
  auto ins = decode_instructions(r.sub(r.remaining()), fm.match);
  if (!ins) return tl::unexpected(ins.error());
  fm.instructions = std::move(*ins);
  return fm;
}

OfResult<FlowMod> decode_nx_flow_mod(std::span<const uint8_t> msg) {
  ByteReader r(msg);
  r.skip(kOfHeaderLen + 8);  // vendor, subtype
  if (!r.has(32)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short nx_flow_mod");
  FlowMod fm;
  uint64_t new_cookie = r.u64();
  uint16_t command = r.u16();
  // The high byte would be a table id had the peer enabled NXT_FLOW_MOD_TABLE_ID (refused here): as in
  // Open vSwitch, an add goes to table 0 and the rest act on every table.
  fm.command = uint8_t(command);
  if (fm.command > OFPFC_DELETE_STRICT) return of_fail(OFPET_FLOW_MOD_FAILED, FMFC_BAD_COMMAND, "command");
  fm.table_id = fm.command == OFPFC_ADD ? 0 : OFPTT_ALL;
  fm.idle_timeout = r.u16();
  fm.hard_timeout = r.u16();
  fm.priority = r.u16();
  fm.buffer_id = r.u32();
  fm.out_port = port_from_of10(r.u16());
  fm.flags = r.u16() & (OFPFF_SEND_FLOW_REM | OFPFF_CHECK_OVERLAP);
  uint16_t match_len = r.u16();
  r.skip(6);
  size_t padded = (size_t(match_len) + 7) / 8 * 8;
  if (!r.has(padded)) return of_fail(OFPET_BAD_MATCH, BMC_BAD_LEN, "nx_match runs past the message");
  uint64_t cookie = 0, cookie_mask = 0;
  auto m = decode_match_nxm(r.sub(match_len), &cookie, &cookie_mask);
  if (!m) return tl::unexpected(m.error());
  r.skip(padded - match_len);
  fm.match = *m;
  // An add sets the flow's cookie; modify and delete select by the match's cookie field.
  if (fm.command == OFPFC_ADD) {
    if (cookie_mask) return of_fail(OFPET_BAD_MATCH, BMC_BAD_FIELD, "cookie match in an add");
    fm.cookie = new_cookie;
  } else {
    fm.cookie = cookie;
    fm.cookie_mask = cookie_mask;
  }
  auto acts = decode_actions(kOf10, r.sub(r.remaining()), &fm.match);
  if (!acts) return tl::unexpected(acts.error());
  fm.instructions.has_apply = true;
  fm.instructions.apply = std::move(*acts);
  return fm;
}

void encode_flow_mod(uint8_t version, std::vector<uint8_t>& out, const FlowMod& fm, uint32_t xid) {
  size_t start = out.size();
  begin_message(out, version, OFPT_FLOW_MOD, xid);
  ByteWriter w(out);
  if (version == kOf10) {
    encode_match_of10(w, fm.match);
    w.u64(fm.cookie);
    w.u16(fm.command);
    w.u16(fm.idle_timeout);
    w.u16(fm.hard_timeout);
    w.u16(fm.priority);
    w.u32(fm.buffer_id);
    w.u16(port_to_of10(fm.out_port));
    w.u16(fm.flags & 3);
    encode_actions(kOf10, w, fm.instructions.apply);
  } else {
    w.u64(fm.cookie);
    w.u64(fm.cookie_mask);
    w.u8(fm.table_id);
    w.u8(fm.command);
    w.u16(fm.idle_timeout);
    w.u16(fm.hard_timeout);
    w.u16(fm.priority);
    w.u32(fm.buffer_id);
    w.u32(fm.out_port);
    w.u32(fm.out_group);
    w.u16(fm.flags);
    w.u16(0);
    encode_match_oxm(w, fm.match);
    encode_instructions(w, fm.instructions);
  }
  finish_message(out, start);
}

OfResult<GroupMod> decode_group_mod(std::span<const uint8_t> msg) {
  ByteReader r(msg);
  r.skip(kOfHeaderLen);
  if (!r.has(8)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short group_mod");
  GroupMod gm;
  gm.command = r.u16();
  gm.type = r.u8();
  r.skip(1);
  gm.group_id = r.u32();
  if (gm.command > 2) return of_fail(OFPET_GROUP_MOD_FAILED, GMFC_BAD_COMMAND, "group command");
  if (gm.type > OFPGT_FF) return of_fail(OFPET_GROUP_MOD_FAILED, GMFC_BAD_TYPE, "group type");
  while (r.remaining() > 0) {
    if (!r.has(16)) return of_fail(OFPET_GROUP_MOD_FAILED, GMFC_BAD_BUCKET, "truncated bucket");
    uint16_t len = r.u16();
    if (len < 16 || len % 8 != 0 || !r.has(len - 2))
      return of_fail(OFPET_GROUP_MOD_FAILED, GMFC_BAD_BUCKET, "bad bucket length");
    ByteReader b = r.sub(len - 2);
    Bucket bucket;
    bucket.weight = b.u16();
    bucket.watch_port = b.u32();
    bucket.watch_group = b.u32();
    b.skip(4);
    auto acts = decode_actions(kOf13, b.sub(b.remaining()), nullptr);
    if (!acts) return tl::unexpected(acts.error());
    bucket.actions = std::move(*acts);
    gm.buckets.push_back(std::move(bucket));
    if (gm.buckets.size() > 1024) return of_fail(OFPET_GROUP_MOD_FAILED, 4, "too many buckets");
  }
  return gm;
}

void encode_buckets(ByteWriter& w, const std::vector<Bucket>& buckets) {
  for (const Bucket& b : buckets) {
    size_t start = w.size();
    w.u16(0);
    w.u16(b.weight);
    w.u32(b.watch_port);
    w.u32(b.watch_group);
    w.u32(0);
    encode_actions(kOf13, w, b.actions);
    w.patch_u16(start, uint16_t(w.size() - start));
  }
}

OfResult<PacketOut> decode_packet_out(uint8_t version, std::span<const uint8_t> msg) {
  ByteReader r(msg);
  r.skip(kOfHeaderLen);
  PacketOut po;
  uint16_t actions_len = 0;
  if (version == kOf10) {
    if (!r.has(8)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short packet_out");
    po.buffer_id = r.u32();
    po.in_port = port_from_of10(r.u16());
    actions_len = r.u16();
  } else {
    if (!r.has(16)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "short packet_out");
    po.buffer_id = r.u32();
    po.in_port = r.u32();
    actions_len = r.u16();
    r.skip(6);
  }
  if (!r.has(actions_len)) return of_fail(OFPET_BAD_REQUEST, BRC_BAD_LEN, "actions run past packet_out");
  auto acts = decode_actions(version, r.sub(actions_len), nullptr);
  if (!acts) return tl::unexpected(acts.error());
  po.actions = std::move(*acts);
  po.data = r.rest();
  return po;
}

}  // namespace keel::sw
