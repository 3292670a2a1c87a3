// OpenFlow 1.0 and 1.3 wire codec: headers, matches (ofp10 match, OXM), actions, instructions and the
// modification messages. Everything decoded here comes from the network and is treated as hostile:
// decoders never read outside the message and report problems as OpenFlow errors (type/code), which
// the agent sends back echoing the request.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <tl/expected.hpp>

#include "switch/bytes.h"
#include "switch/flow.h"

namespace keel::sw {

constexpr uint8_t kOf10 = 0x01;
constexpr uint8_t kOf13 = 0x04;
constexpr size_t kOfHeaderLen = 8;
constexpr size_t kOfMaxMessage = 65535;

// Message types shared by both versions (values equal in 1.0 and 1.3).
enum OfType : uint8_t {
  OFPT_HELLO = 0, OFPT_ERROR = 1, OFPT_ECHO_REQUEST = 2, OFPT_ECHO_REPLY = 3, OFPT_EXPERIMENTER = 4,
  OFPT_FEATURES_REQUEST = 5, OFPT_FEATURES_REPLY = 6, OFPT_GET_CONFIG_REQUEST = 7, OFPT_GET_CONFIG_REPLY = 8,
  OFPT_SET_CONFIG = 9, OFPT_PACKET_IN = 10, OFPT_FLOW_REMOVED = 11, OFPT_PORT_STATUS = 12,
  OFPT_PACKET_OUT = 13, OFPT_FLOW_MOD = 14,
};
// 1.0-only numbering.
constexpr uint8_t OFPT10_PORT_MOD = 15;
constexpr uint8_t OFPT10_STATS_REQUEST = 16;
constexpr uint8_t OFPT10_STATS_REPLY = 17;
constexpr uint8_t OFPT10_BARRIER_REQUEST = 18;
constexpr uint8_t OFPT10_BARRIER_REPLY = 19;
constexpr uint8_t OFPT10_QUEUE_GET_CONFIG_REQUEST = 20;
// 1.3-only numbering.
constexpr uint8_t OFPT13_GROUP_MOD = 15;
constexpr uint8_t OFPT13_PORT_MOD = 16;
constexpr uint8_t OFPT13_TABLE_MOD = 17;
constexpr uint8_t OFPT13_MULTIPART_REQUEST = 18;
constexpr uint8_t OFPT13_MULTIPART_REPLY = 19;
constexpr uint8_t OFPT13_BARRIER_REQUEST = 20;
constexpr uint8_t OFPT13_BARRIER_REPLY = 21;
constexpr uint8_t OFPT13_QUEUE_GET_CONFIG_REQUEST = 22;
constexpr uint8_t OFPT13_ROLE_REQUEST = 24;
constexpr uint8_t OFPT13_ROLE_REPLY = 25;
constexpr uint8_t OFPT13_GET_ASYNC_REQUEST = 26;
constexpr uint8_t OFPT13_GET_ASYNC_REPLY = 27;
constexpr uint8_t OFPT13_SET_ASYNC = 28;
constexpr uint8_t OFPT13_METER_MOD = 29;
// Nicira vendor extensions that ovs-ofctl -O OpenFlow10 uses for what 1.0 cannot say (cookie masks).
constexpr uint32_t kNxVendorId = 0x00002320;
constexpr uint32_t NXT_SET_FLOW_FORMAT = 12;
constexpr uint32_t NXT_FLOW_MOD = 13;
constexpr uint32_t NXT_FLOW_REMOVED = 14;
constexpr uint32_t NXFF_OPENFLOW10 = 0, NXFF_NXM = 2;
constexpr uint32_t NXST_FLOW = 0, NXST_AGGREGATE = 1;
constexpr uint16_t OFPST10_VENDOR = 0xffff;

enum MultipartType : uint16_t {
  OFPMP_DESC = 0, OFPMP_FLOW = 1, OFPMP_AGGREGATE = 2, OFPMP_TABLE = 3, OFPMP_PORT_STATS = 4,
  OFPMP_QUEUE = 5, OFPMP_GROUP = 6, OFPMP_GROUP_DESC = 7, OFPMP_GROUP_FEATURES = 8, OFPMP_METER = 9,
  OFPMP_METER_CONFIG = 10, OFPMP_METER_FEATURES = 11, OFPMP_TABLE_FEATURES = 12, OFPMP_PORT_DESC = 13,
  OFPMP_EXPERIMENTER = 0xffff,
};

// Reserved port numbers, in OpenFlow 1.3's 32-bit space (the internal representation).
constexpr uint32_t OFPP_MAX = 0xffffff00;
constexpr uint32_t OFPP_IN_PORT = 0xfffffff8;
constexpr uint32_t OFPP_TABLE = 0xfffffff9;
constexpr uint32_t OFPP_NORMAL = 0xfffffffa;
constexpr uint32_t OFPP_FLOOD = 0xfffffffb;
constexpr uint32_t OFPP_ALL = 0xfffffffc;
constexpr uint32_t OFPP_CONTROLLER = 0xfffffffd;
constexpr uint32_t OFPP_LOCAL = 0xfffffffe;
constexpr uint32_t OFPP_ANY = 0xffffffff;
uint32_t port_from_of10(uint16_t p);
uint16_t port_to_of10(uint32_t p);

constexpr uint32_t OFPG_MAX = 0xffffff00;
constexpr uint32_t OFPG_ALL = 0xfffffffc;
constexpr uint32_t OFPG_ANY = 0xffffffff;
constexpr uint32_t OFP_NO_BUFFER = 0xffffffff;
constexpr uint8_t OFPTT_ALL = 0xff;
constexpr uint8_t kNumTables = 254;  // 0..253, as Open vSwitch exposes

// An OpenFlow error, in 1.3 numbering; to_of10() maps it for 1.0 peers.
struct OfError {
  uint16_t type;
  uint16_t code;
  std::string detail;  // for logs only
};
enum OfErrType : uint16_t {
  OFPET_HELLO_FAILED = 0, OFPET_BAD_REQUEST = 1, OFPET_BAD_ACTION = 2, OFPET_BAD_INSTRUCTION = 3,
  OFPET_BAD_MATCH = 4, OFPET_FLOW_MOD_FAILED = 5, OFPET_GROUP_MOD_FAILED = 6, OFPET_PORT_MOD_FAILED = 7,
  OFPET_TABLE_MOD_FAILED = 8, OFPET_SWITCH_CONFIG_FAILED = 10, OFPET_ROLE_REQUEST_FAILED = 11,
  OFPET_METER_MOD_FAILED = 12,
};
// Maps a 1.3 error to what a 1.0 peer understands (1.0 lacks several types).
OfError error_to_of10(const OfError& e);
OfError of_error(uint16_t type, uint16_t code, std::string detail = {});

template <typename T>
using OfResult = tl::expected<T, OfError>;
inline tl::unexpected<OfError> of_fail(uint16_t type, uint16_t code, std::string detail = {}) {
  return tl::unexpected<OfError>(of_error(type, code, std::move(detail)));
}

struct OfHeader {
  uint8_t version = 0;
  uint8_t type = 0;
  uint16_t length = 0;
  uint32_t xid = 0;
};
OfHeader decode_header(const uint8_t* p);
// Starts a message; finish_message() patches its length.
void begin_message(std::vector<uint8_t>& out, uint8_t version, uint8_t type, uint32_t xid);
void finish_message(std::vector<uint8_t>& out, size_t start = 0);

enum class ActionType : uint8_t { Output, Group, PushVlan, PopVlan, SetField, DecNwTtl, SetNwTtl, SetQueue };

struct Action {
  ActionType type = ActionType::Output;
  uint8_t field = 0;      // SetField: OXM field
  uint16_t max_len = 0;   // Output: bytes to send to the controller
  uint16_t ethertype = 0; // PushVlan
  uint32_t arg = 0;       // Output port, group id, queue id, TTL
  uint8_t value[16] = {}; // SetField: wire bytes of the field
};
bool operator==(const Action& a, const Action& b);

struct Instructions {
  bool has_apply = false;
  std::vector<Action> apply;
  bool clear_actions = false;
  bool has_write = false;
  std::vector<Action> write;
  bool has_metadata = false;
  uint64_t metadata = 0, metadata_mask = 0;
  std::optional<uint8_t> goto_table;
  std::optional<uint32_t> meter;  // OpenFlow 1.3 meter instruction: runs first
};
bool operator==(const Instructions& a, const Instructions& b);

// Decoding. `match` gives context for 1.0 actions whose meaning depends on it (mod_tp_src on UDP).
OfResult<Match> decode_match_of10(ByteReader& r);
OfResult<Match> decode_match_oxm(ByteReader& r);  // struct ofp_match incl. its padding
OfResult<std::vector<Action>> decode_actions(uint8_t version, ByteReader r, const Match* match);
OfResult<Instructions> decode_instructions(ByteReader r, const Match& match);

// Nicira Extended Match: `fields` is exactly the match's bytes (match_len, no padding). The cookie is a
// field there; cookie/cookie_mask receive it (null: a cookie is an error).
OfResult<Match> decode_match_nxm(ByteReader fields, uint64_t* cookie, uint64_t* cookie_mask);
// Writes the NXM fields (no padding); returns match_len.
size_t encode_match_nxm(ByteWriter& w, const Match& m);
void encode_match_of10(ByteWriter& w, const Match& m);
void encode_match_oxm(ByteWriter& w, const Match& m);  // struct ofp_match incl. padding
void encode_actions(uint8_t version, ByteWriter& w, const std::vector<Action>& actions);
void encode_instructions(ByteWriter& w, const Instructions& ins);
// A 1.0 flow's actions: its apply list (1.0 has no other instructions).
const std::vector<Action>& of10_actions(const Instructions& ins);

enum FlowModCommand : uint8_t { OFPFC_ADD = 0, OFPFC_MODIFY = 1, OFPFC_MODIFY_STRICT = 2, OFPFC_DELETE = 3,
                                OFPFC_DELETE_STRICT = 4 };
enum FlowModFlags : uint16_t { OFPFF_SEND_FLOW_REM = 1, OFPFF_CHECK_OVERLAP = 2, OFPFF_RESET_COUNTS = 4,
                               OFPFF_NO_PKT_COUNTS = 8, OFPFF_NO_BYT_COUNTS = 16 };

struct FlowMod {
  uint64_t cookie = 0, cookie_mask = 0;
  uint8_t table_id = 0;
  uint8_t command = 0;
  uint16_t idle_timeout = 0, hard_timeout = 0, priority = 0;
  uint32_t buffer_id = OFP_NO_BUFFER;
  uint32_t out_port = OFPP_ANY, out_group = OFPG_ANY;
  uint16_t flags = 0;  // 1.3 numbering
  Match match;
  Instructions instructions;
};
OfResult<FlowMod> decode_flow_mod(uint8_t version, std::span<const uint8_t> msg);
// Nicira's NXT_FLOW_MOD (OpenFlow 1.0 with an NXM match; the whole vendor message).
OfResult<FlowMod> decode_nx_flow_mod(std::span<const uint8_t> msg);

// OpenFlow 1.3 meters. Only drop bands (what Open vSwitch's userspace datapath offers too).
enum MeterFlags : uint16_t { OFPMF_KBPS = 1, OFPMF_PKTPS = 2, OFPMF_BURST = 4, OFPMF_STATS = 8 };
constexpr uint16_t OFPMBT_DROP = 1;
constexpr uint32_t OFPM_MAX = 0xffff0000;
constexpr uint32_t OFPM_ALL = 0xffffffff;
constexpr size_t kMaxMeterBands = 8;
struct MeterBand {
  uint16_t type = OFPMBT_DROP;
  uint32_t rate = 0;        // kbit/s or packets/s (the meter's flags say which)
  uint32_t burst_size = 0;  // kbits or packets
};
struct MeterMod {
  uint16_t command = 0;  // 0 add, 1 modify, 2 delete
  uint16_t flags = 0;
  uint32_t meter_id = 0;
  std::vector<MeterBand> bands;
};
OfResult<MeterMod> decode_meter_mod(std::span<const uint8_t> msg);
void encode_meter_bands(ByteWriter& w, const std::vector<MeterBand>& bands);
void encode_meter_mod(std::vector<uint8_t>& out, const MeterMod& mm, uint32_t xid);
void encode_flow_mod(uint8_t version, std::vector<uint8_t>& out, const FlowMod& fm, uint32_t xid);

enum GroupType : uint8_t { OFPGT_ALL = 0, OFPGT_SELECT = 1, OFPGT_INDIRECT = 2, OFPGT_FF = 3 };
struct Bucket {
  uint16_t weight = 0;
  uint32_t watch_port = OFPP_ANY, watch_group = OFPG_ANY;
  std::vector<Action> actions;
};
struct GroupMod {
  uint16_t command = 0;  // OFPGC_ADD 0, MODIFY 1, DELETE 2
  uint8_t type = 0;
  uint32_t group_id = 0;
  std::vector<Bucket> buckets;
};
OfResult<GroupMod> decode_group_mod(std::span<const uint8_t> msg);
void encode_buckets(ByteWriter& w, const std::vector<Bucket>& buckets);

struct PacketOut {
  uint32_t buffer_id = OFP_NO_BUFFER;
  uint32_t in_port = OFPP_CONTROLLER;
  std::vector<Action> actions;
  std::span<const uint8_t> data;
};
OfResult<PacketOut> decode_packet_out(uint8_t version, std::span<const uint8_t> msg);

// Builds an ERROR message echoing (up to 64 bytes of) the request.
std::vector<uint8_t> make_error(uint8_t version, uint32_t xid, const OfError& e, std::span<const uint8_t> request);

}  // namespace keel::sw
