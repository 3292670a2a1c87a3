// FlowKey: the header fields a flow table matches on, extracted from a frame; Match: a FlowKey value
// with a mask of the same shape. Every multi-byte field is kept in network byte order, exactly as it
// appears on the wire and in OXM TLVs, so OXM encoding, decoding and packet extraction are plain copies
// and classifier masking and hashing work on whole 64-bit words.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

namespace keel::sw {

struct FlowKey {
  uint64_t metadata;   // OXM METADATA
  uint32_t in_port;    // OpenFlow 1.3 port number
  uint32_t ipv4_src;
  uint32_t ipv4_dst;
  uint32_t arp_spa;
  uint32_t arp_tpa;
  uint16_t eth_type;
  uint16_t vlan_vid;   // OFPVID_PRESENT (0x1000) | VID; 0 when the frame is untagged
  uint16_t tp_src;     // TCP, UDP or SCTP source port
  uint16_t tp_dst;
  uint16_t arp_op;
  uint16_t pad0;
  uint8_t eth_dst[6];
  uint8_t eth_src[6];
  uint8_t arp_sha[6];
  uint8_t arp_tha[6];
  uint8_t vlan_pcp;
  uint8_t ip_proto;
  uint8_t ip_dscp;     // 6 bits, OXM style (not shifted)
  uint8_t ip_ecn;
  uint8_t icmp_type;   // ICMPv4 or ICMPv6
  uint8_t icmp_code;
  uint8_t pad1[2];
  uint8_t ipv6_src[16];
  uint8_t ipv6_dst[16];

  static constexpr size_t kWords = 13;
  const uint64_t* words() const { return reinterpret_cast<const uint64_t*>(this); }
  uint64_t* words() { return reinterpret_cast<uint64_t*>(this); }
};
static_assert(sizeof(FlowKey) == FlowKey::kWords * 8, "FlowKey must be whole words without padding");

inline bool operator==(const FlowKey& a, const FlowKey& b) { return std::memcmp(&a, &b, sizeof a) == 0; }

uint64_t hash_words(const uint64_t* w, size_t n, uint64_t basis = 0);
inline uint64_t hash_key(const FlowKey& k) { return hash_words(k.words(), FlowKey::kWords); }

// Host-order helpers for the network-order fields.
inline uint16_t be16(uint16_t v) { return __builtin_bswap16(v); }
inline uint32_t be32(uint32_t v) { return __builtin_bswap32(v); }
inline uint64_t be64(uint64_t v) { return __builtin_bswap64(v); }

constexpr uint16_t kEthTypeIpv4 = 0x0800;
constexpr uint16_t kEthTypeArp = 0x0806;
constexpr uint16_t kEthTypeVlan = 0x8100;
constexpr uint16_t kEthTypeIpv6 = 0x86dd;
constexpr uint16_t kVidPresent = 0x1000;

// Where the layers of a parsed frame start (offsets into the frame; 0 = absent).
struct FrameLayout {
  uint16_t vlan = 0;   // offset of the 802.1Q tag (TPID), 0 if untagged
  uint16_t l3 = 0;
  uint16_t l4 = 0;
};

// Extracts the key of a frame. Always succeeds: fields of truncated or unknown headers stay zero.
void extract_flow(const uint8_t* frame, size_t len, uint32_t in_port, FlowKey& key, FrameLayout& layout);

// OXM fields (class OPENFLOW_BASIC) this switch understands.
enum class Oxm : uint8_t {
  InPort = 0, InPhyPort = 1, Metadata = 2, EthDst = 3, EthSrc = 4, EthType = 5, VlanVid = 6, VlanPcp = 7,
  IpDscp = 8, IpEcn = 9, IpProto = 10, Ipv4Src = 11, Ipv4Dst = 12, TcpSrc = 13, TcpDst = 14, UdpSrc = 15,
  UdpDst = 16, SctpSrc = 17, SctpDst = 18, Icmpv4Type = 19, Icmpv4Code = 20, ArpOp = 21, ArpSpa = 22,
  ArpTpa = 23, ArpSha = 24, ArpTha = 25, Ipv6Src = 26, Ipv6Dst = 27, Icmpv6Type = 29, Icmpv6Code = 30,
};

enum class Prereq : uint8_t { None, Vlan, Ip, Ipv4, Ipv6, Arp, Tcp, Udp, Sctp, Icmpv4, Icmpv6 };

struct OxmFieldInfo {
  bool known = false;
  const char* name = "";
  uint16_t offset = 0;  // in FlowKey
  uint8_t length = 0;   // on the wire (and in FlowKey)
  bool maskable = false;
  Prereq prereq = Prereq::None;
};
const OxmFieldInfo& oxm_field_info(uint8_t field);

struct Match {
  FlowKey key{};   // always key & mask
  FlowKey mask{};

  // Sets an exact or masked value of `field` from wire bytes; key is masked.
  void set_field(uint8_t field, const uint8_t* value, const uint8_t* mask_or_null);
  bool field_present(uint8_t field) const;
  // True when every packet matching `*this` also matches `other` ... i.e. other is as wide or wider.
  bool covered_by(const Match& wider) const;
  bool matches(const FlowKey& packet) const;
  bool overlaps(const Match& other) const;
  bool same_mask(const Match& other) const { return mask == other.mask; }
  void normalize();  // key &= mask
  // Which prerequisite of a present field is missing, if any.
  std::optional<std::string> missing_prereq() const;
  bool prereq_satisfied(Prereq p) const;
};
inline bool operator==(const Match& a, const Match& b) { return a.key == b.key && a.mask == b.mask; }

}  // namespace keel::sw
