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

TEST(Oxm, RoundTripsEveryKindOfField) {
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
  ASSERT_EQ(msg.size(), 8u + 4 + 64);
  EXPECT_EQ(msg[1], OFPT_ERROR);
  EXPECT_EQ(msg[9], OFPET_BAD_MATCH);
  auto msg10 = make_error(kOf10, 5, of_error(OFPET_FLOW_MOD_FAILED, 3), req);
  EXPECT_EQ(msg10[9], 3);   // 1.0 FLOW_MOD_FAILED
  EXPECT_EQ(msg10[11], 1);  // 1.0 OVERLAP
}

}  // namespace
}  // namespace keel::sw
