#include "switch/openflow.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace keel::sw {
namespace {

using test::set;
using test::set_masked;

std::vector<uint8_t> oxm_match_bytes(const Match& m) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  encode_match_oxm(w, m);
  return out;
}

// A match with exact and masked fields of every width: port, Ethernet, VLAN, IPv6 prefix, UDP, metadata.
Match rich_match() {
  Match m;
  set(m, Oxm::InPort, 3);
  set_masked(m, Oxm::EthDst, 0x010000000000, 0x010000000000);
  set(m, Oxm::EthType, 0x86dd);
  set(m, Oxm::VlanVid, 0x1000 | 42);
  set(m, Oxm::VlanPcp, 5);
  set(m, Oxm::IpProto, 17);
  set(m, Oxm::UdpDst, 53);
  set_masked(m, Oxm::Metadata, 0x12, 0xff);
  uint8_t v6[16] = {0x20, 0x01, 0x0d, 0xb8}, v6m[16] = {0xff, 0xff, 0xff, 0xff};
  m.set_field(uint8_t(Oxm::Ipv6Src), v6, v6m);
  return m;
}

TEST(Oxm, RoundTripsEveryKindOfField) {
  Match m = rich_match();
  auto bytes = oxm_match_bytes(m);
  EXPECT_EQ(bytes.size() % 8, 0u);
  ByteReader r(bytes);
  auto back = decode_match_oxm(r);
  ASSERT_TRUE(back) << back.error().detail;
  EXPECT_TRUE(*back == m);
  EXPECT_EQ(r.remaining(), 0u);
}

TEST(Oxm, RejectsBadMatches) {
  auto decode = [](std::vector<uint8_t> fields) {
    std::vector<uint8_t> b = {0, 1, 0, uint8_t(4 + fields.size())};
    b.insert(b.end(), fields.begin(), fields.end());
    while (b.size() % 8) b.push_back(0);
    ByteReader r(b);
    return decode_match_oxm(r);
  };
  // TCP_DST without eth_type/ip_proto.
  auto e = decode({0x80, 0x00, 14 << 1, 2, 0, 80});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().type, OFPET_BAD_MATCH);
  EXPECT_EQ(e.error().code, 9);  // BAD_PREREQ
  // Duplicate ETH_TYPE.
  e = decode({0x80, 0x00, 5 << 1, 2, 0x08, 0x00, 0x80, 0x00, 5 << 1, 2, 0x08, 0x00});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 10);  // DUP_FIELD
  // Wrong length for IN_PORT.
  e = decode({0x80, 0x00, 0 << 1, 2, 0, 1});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 1);  // BAD_LEN
  // Masked ETH_TYPE (not maskable).
  e = decode({0x80, 0x00, 5 << 1 | 1, 4, 0x08, 0x00, 0xff, 0xff});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 8);  // BAD_MASK
  // Value bits outside the mask.
  e = decode({0x80, 0x00, 4 << 1 | 1, 12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 5);  // BAD_WILDCARDS
  // Nicira class.
  e = decode({0x00, 0x01, 0, 4, 0, 0, 0, 1});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 6);  // BAD_FIELD
  // Field running past the match.
  e = decode({0x80, 0x00, 0, 40});
  ASSERT_FALSE(e);
}

TEST(Of10Match, RoundTrip) {
  Match m;
  set(m, Oxm::InPort, 2);
  set(m, Oxm::EthType, 0x0800);
  set_masked(m, Oxm::Ipv4Src, 0x0a000000, 0xffff0000);
  set(m, Oxm::IpProto, 6);
  set(m, Oxm::TcpDst, 22);
  set(m, Oxm::VlanVid, 0x1000 | 7);
  set(m, Oxm::VlanPcp, 2);
  std::vector<uint8_t> out;
  ByteWriter w(out);
  encode_match_of10(w, m);
  ASSERT_EQ(out.size(), 40u);
  ByteReader r(out);
  auto back = decode_match_of10(r);
  ASSERT_TRUE(back);
  EXPECT_TRUE(*back == m);
}

Match nxm_round_trip(const Match& m) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  size_t len = encode_match_nxm(w, m);
  EXPECT_EQ(len, out.size());
  auto back = decode_match_nxm(ByteReader(out), nullptr, nullptr);
  EXPECT_TRUE(back) << (back ? "" : back.error().detail);
  return back ? *back : Match{};
}

TEST(Nxm, RoundTripsEveryKindOfField) {
  Match v6udp = rich_match();
  set(v6udp, Oxm::IpDscp, 10);
  set(v6udp, Oxm::IpEcn, 1);
  v6udp.normalize();
  EXPECT_EQ(nxm_round_trip(v6udp), v6udp);

  Match tcp;
  set(tcp, Oxm::EthType, 0x0800);
  set(tcp, Oxm::IpProto, 6);
  set_masked(tcp, Oxm::Ipv4Src, 0x0a000000, 0xffff0000);
  set(tcp, Oxm::TcpDst, 22);
  set(tcp, Oxm::VlanVid, 0);  // no 802.1Q header: the whole TCI zero on the NXM side
  tcp.normalize();
  EXPECT_EQ(nxm_round_trip(tcp), tcp);

  Match arp;
  set(arp, Oxm::EthType, 0x0806);
  set(arp, Oxm::ArpOp, 1);
  set(arp, Oxm::ArpSpa, 0x0a000001);
  set(arp, Oxm::ArpSha, 0x020000000001);
  arp.normalize();
  EXPECT_EQ(nxm_round_trip(arp), arp);

  Match icmp6;
  set(icmp6, Oxm::EthType, 0x86dd);
  set(icmp6, Oxm::IpProto, 58);
  set(icmp6, Oxm::Icmpv6Type, 135);
  icmp6.normalize();
  EXPECT_EQ(nxm_round_trip(icmp6), icmp6);
}

TEST(Nxm, CookieAndErrors) {
  // NXM_NX_COOKIE_W (class 1, field 30, masked, 16 bytes) then NXM_OF_ETH_TYPE.
  std::vector<uint8_t> bytes = {0x00, 0x01, 0x3d, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x15, 0, 0, 0, 0, 0, 0, 0, 0xf0,
                                0x00, 0x00, 0x06, 0x02, 0x08, 0x00};
  uint64_t cookie = 0, mask = 0;
  auto m = decode_match_nxm(ByteReader(bytes), &cookie, &mask);
  ASSERT_TRUE(m);
  EXPECT_EQ(cookie, 0x10u);  // masked
  EXPECT_EQ(mask, 0xf0u);
  EXPECT_EQ(m->key.eth_type, be16(0x0800));
  // Where a cookie is no match field, it is an error.
  EXPECT_FALSE(decode_match_nxm(ByteReader(bytes), nullptr, nullptr));
  // Truncated field, unknown field, missing prerequisite, duplicate.
  std::vector<uint8_t> truncated = {0x00, 0x00, 0x06, 0x02, 0x08};
  EXPECT_EQ(decode_match_nxm(ByteReader(truncated), nullptr, nullptr).error().code, 1);
  std::vector<uint8_t> unknown = {0x00, 0x01, 0x7e, 0x01, 0x00};
  EXPECT_EQ(decode_match_nxm(ByteReader(unknown), nullptr, nullptr).error().code, 6);
  std::vector<uint8_t> no_prereq = {0x00, 0x00, 0x14, 0x02, 0x00, 0x16};  // TCP_DST without tcp
  EXPECT_EQ(decode_match_nxm(ByteReader(no_prereq), nullptr, nullptr).error().code, 9);
  std::vector<uint8_t> dup = {0x00, 0x00, 0x06, 0x02, 0x08, 0x00, 0x00, 0x00, 0x06, 0x02, 0x08, 0x00};
  EXPECT_EQ(decode_match_nxm(ByteReader(dup), nullptr, nullptr).error().code, 10);
}

// NXT_FLOW_MOD: an OpenFlow 1.0 flow-mod with an NXM match; adds take the message's cookie, modify and
// delete select by the match's cookie field and act on every table.
TEST(Nxm, FlowMod) {
  auto message = [](uint16_t command, std::vector<uint8_t> match) {
    std::vector<uint8_t> msg;
    begin_message(msg, kOf10, OFPT_EXPERIMENTER, 1);
    ByteWriter w(msg);
    w.u32(kNxVendorId);
    w.u32(NXT_FLOW_MOD);
    w.u64(0x77);  // cookie
    w.u16(command);
    w.u16(0); w.u16(0); w.u16(9);  // idle, hard, priority
    w.u32(0xffffffff);
    w.u16(0xffff);  // out_port: none
    w.u16(0);
    w.u16(uint16_t(match.size()));
    w.zeros(6);
    w.bytes(match.data(), match.size());
    w.pad_to(8, kOfHeaderLen);
    w.u16(0); w.u16(8); w.u16(2); w.u16(0);  // output:2
    finish_message(msg);
    return msg;
  };
  // ETH_TYPE=0x86dd, NX_IPV6_SRC/W 2001:db8::/32.
  std::vector<uint8_t> v6 = {0x00, 0x00, 0x06, 0x02, 0x86, 0xdd, 0x00, 0x01, 0x27, 0x20, 0x20, 0x01, 0x0d, 0xb8};
  v6.resize(v6.size() + 12);
  std::vector<uint8_t> v6_mask = {0xff, 0xff, 0xff, 0xff};
  v6_mask.resize(16);
  v6.insert(v6.end(), v6_mask.begin(), v6_mask.end());
  auto add = decode_nx_flow_mod(message(OFPFC_ADD, v6));
  ASSERT_TRUE(add) << add.error().detail;
  EXPECT_EQ(add->cookie, 0x77u);
  EXPECT_EQ(add->table_id, 0);
  EXPECT_EQ(add->priority, 9);
  EXPECT_EQ(add->match.key.eth_type, be16(0x86dd));
  ASSERT_EQ(add->instructions.apply.size(), 1u);
  EXPECT_EQ(add->instructions.apply[0].arg, 2u);
  // NXM_NX_COOKIE (exact) selects in a delete; in an add it is an error.
  std::vector<uint8_t> cookie = {0x00, 0x01, 0x3c, 0x08, 0, 0, 0, 0, 0, 0, 0, 0x05};
  auto del = decode_nx_flow_mod(message(OFPFC_DELETE, cookie));
  ASSERT_TRUE(del);
  EXPECT_EQ(del->cookie, 5u);
  EXPECT_EQ(del->cookie_mask, ~0ull);
  EXPECT_EQ(del->table_id, OFPTT_ALL);
  EXPECT_FALSE(decode_nx_flow_mod(message(OFPFC_ADD, cookie)));
  auto short_msg = message(OFPFC_ADD, {});
  short_msg.resize(30);
  EXPECT_FALSE(decode_nx_flow_mod(short_msg));
}

TEST(Actions, DecodeErrors) {
  auto decode13 = [](std::vector<uint8_t> b) { return decode_actions(kOf13, ByteReader(b), nullptr); };
  // Output to port 0.
  auto e = decode13({0, 0, 0, 16, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 4);  // BAD_OUT_PORT
  // Length not a multiple of 8.
  e = decode13({0, 0, 0, 12, 0, 0, 0, 1, 0xff, 0xff, 0, 0});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 1);
  // Unknown action type.
  e = decode13({0, 99, 0, 8, 0, 0, 0, 0});
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 0);
  // set_field ipv4_dst without an IPv4 match is inconsistent.
  Match none;
  std::vector<uint8_t> sf = {0, 25, 0, 16, 0x80, 0, 12 << 1, 4, 10, 0, 0, 1, 0, 0, 0, 0};
  e = decode_actions(kOf13, ByteReader(sf), &none);
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error().code, 10);  // MATCH_INCONSISTENT
  Match ip;
  set(ip, Oxm::EthType, 0x0800);
  auto ok = decode_actions(kOf13, ByteReader(sf), &ip);
  ASSERT_TRUE(ok);
  ASSERT_EQ(ok->size(), 1u);
  EXPECT_EQ((*ok)[0].type, ActionType::SetField);
  std::vector<uint8_t> again;
  ByteWriter w(again);
  encode_actions(kOf13, w, *ok);
  EXPECT_EQ(again, sf);
}

TEST(FlowMod, EncodeDecodeBothVersions) {
  for (uint8_t v : {kOf10, kOf13}) {
    FlowMod fm;
    fm.command = OFPFC_MODIFY_STRICT;
    fm.priority = 77;
    fm.cookie = 0xabc;
    fm.idle_timeout = 5;
    fm.hard_timeout = 9;
    fm.flags = OFPFF_SEND_FLOW_REM;
    set(fm.match, Oxm::InPort, 4);
    set(fm.match, Oxm::EthType, 0x0806);
    set(fm.match, Oxm::ArpOp, 1);
    Action out;
    out.type = ActionType::Output;
    out.arg = OFPP_CONTROLLER;
    out.max_len = 128;
    fm.instructions.has_apply = true;
    fm.instructions.apply = {out};
    if (v == kOf13) fm.instructions.goto_table = 3;
    std::vector<uint8_t> bytes;
    encode_flow_mod(v, bytes, fm, 99);
    auto back = decode_flow_mod(v, bytes);
    ASSERT_TRUE(back) << back.error().detail;
    EXPECT_EQ(back->priority, 77);
    EXPECT_EQ(back->cookie, 0xabcu);
    EXPECT_EQ(back->command, OFPFC_MODIFY_STRICT);
    EXPECT_TRUE(back->match == fm.match);
    EXPECT_TRUE(back->instructions == fm.instructions);
  }
}

TEST(Errors, EchoTheRequestAndMapTo10) {
  std::vector<uint8_t> req(100, 0xee);
  auto msg = make_error(kOf13, 5, of_error(OFPET_BAD_MATCH, 9), req);
  ASSERT_EQ(msg.size(), 8u + 4 + 100);  // the whole request, as OVS echoes it
  EXPECT_EQ(msg[2] << 8 | msg[3], int(msg.size()));
  EXPECT_TRUE(std::equal(req.begin(), req.end(), msg.begin() + 12));
  // A request too large to echo whole in one message is cut to fit.
  std::vector<uint8_t> big(70000, 0xaa);
  auto capped = make_error(kOf13, 6, of_error(OFPET_BAD_REQUEST, 1), big);
  ASSERT_EQ(capped.size(), 0xffffu);
  EXPECT_EQ(capped[2] << 8 | capped[3], 0xffff);
  EXPECT_EQ(msg[1], OFPT_ERROR);
  EXPECT_EQ(msg[9], OFPET_BAD_MATCH);
  auto msg10 = make_error(kOf10, 5, of_error(OFPET_FLOW_MOD_FAILED, 3), req);
  EXPECT_EQ(msg10[9], 3);   // 1.0 FLOW_MOD_FAILED
  EXPECT_EQ(msg10[11], 1);  // 1.0 OVERLAP
}

}  // namespace
}  // namespace keel::sw
