// vhost-user wire format (QEMU docs/interop/vhost-user.rst): the message header, the payloads the
// back-end understands, and a decoder that validates a received message before anything acts on it.
//
// Every message comes from the front-end (QEMU) and is hostile: the decoder checks the version, the
// payload size against what the request needs, region counts and index ranges, and how many fds came
// with it. It never touches memory or fds itself; the caller acts on a DecodedMessage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>

#include "base/result.h"

namespace keel::vhost {

// Front-end -> back-end requests.
enum class Request : uint32_t {
  None = 0,
  GetFeatures = 1,
  SetFeatures = 2,
  SetOwner = 3,
  ResetOwner = 4,
  SetMemTable = 5,
  SetLogBase = 6,
  SetLogFd = 7,
  SetVringNum = 8,
  SetVringAddr = 9,
  SetVringBase = 10,
  GetVringBase = 11,
  SetVringKick = 12,
  SetVringCall = 13,
  SetVringErr = 14,
  GetProtocolFeatures = 15,
  SetProtocolFeatures = 16,
  GetQueueNum = 17,
  SetVringEnable = 18,
  SendRarp = 19,
  NetSetMtu = 20,
  SetBackendReqFd = 21,
  IotlbMsg = 22,
  SetVringEndian = 23,
  GetConfig = 24,
  SetConfig = 25,
  ResetDevice = 34,
  GetMaxMemSlots = 36,
  AddMemReg = 37,
  RemMemReg = 38,
  SetStatus = 39,
  GetStatus = 40,
};
std::string_view request_name(uint32_t request);

// Header flags.
inline constexpr uint32_t kVersionMask = 0x3;
inline constexpr uint32_t kVersion = 0x1;
inline constexpr uint32_t kFlagReply = 1u << 2;
inline constexpr uint32_t kFlagNeedReply = 1u << 3;

// Feature bit in GET/SET_FEATURES that says protocol features exist.
inline constexpr int kFeatureProtocolFeatures = 30;

// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
enum ProtocolFeature : int {
  kProtocolMq = 0,
  kProtocolLogShmfd = 1,
  kProtocolRarp = 2,
  kProtocolReplyAck = 3,
  kProtocolNetMtu = 4,
  kProtocolBackendReq = 5,
  kProtocolCrossEndian = 6,
  kProtocolConfig = 9,
  kProtocolResetDevice = 13,
  kProtocolConfigureMemSlots = 15,
};

// Payload of SET_VRING_KICK/CALL/ERR: low byte the ring index; this bit set means "no fd, poll".
inline constexpr uint64_t kVringIndexMask = 0xff;
inline constexpr uint64_t kVringNoFdFlag = 1ull << 8;

inline constexpr size_t kHeaderSize = 12;
// The largest payload we accept: a memory table is 8 + 8*32 bytes, a config space 12 + 256. Anything
// near this limit from a front-end is already a protocol error, so we stop reading there.
inline constexpr size_t kMaxPayloadSize = 4096;
// At most this many regions in SET_MEM_TABLE (and fds in any one message).
inline constexpr size_t kMaxMemRegions = 8;
inline constexpr size_t kMaxFds = kMaxMemRegions;
// Virtqueue indexes the protocol can address (the payload keeps 8 bits for it).
inline constexpr uint32_t kMaxQueues = 256;
// Split virtqueues are at most this long.
inline constexpr uint32_t kMaxQueueSize = 32768;

struct MessageHeader {
  uint32_t request;
  uint32_t flags;
  uint32_t size;
};
static_assert(sizeof(MessageHeader) == kHeaderSize);

struct VringState {
  uint32_t index;
  uint32_t num;
};

struct VringAddr {
  uint32_t index;
  uint32_t flags;
  uint64_t desc_user_addr;
  uint64_t used_user_addr;
  uint64_t avail_user_addr;
  uint64_t log_guest_addr;
};
static_assert(sizeof(VringAddr) == 40);

// GET_CONFIG / SET_CONFIG: a window of the device's config space.
struct ConfigHeader {
  uint32_t offset;
  uint32_t size;
  uint32_t flags;
};
inline constexpr uint32_t kMaxConfigSize = 256;

struct MemRegionDesc {
  uint64_t guest_phys_addr;
  uint64_t memory_size;
  uint64_t userspace_addr;
  uint64_t mmap_offset;
};
static_assert(sizeof(MemRegionDesc) == 32);

// SET_LOG_BASE payload: where in the fd that comes with it the dirty log lives.
struct LogDesc {
  uint64_t mmap_size;
  uint64_t mmap_offset;
};
static_assert(sizeof(LogDesc) == 16);

// SET_VRING_ADDR flags: log_guest_addr is valid and writes to the used ring are to be logged.
inline constexpr uint32_t kVringFLog = 1u << 0;

// Feature bit in GET/SET_FEATURES: log every write to guest memory (set while migrating).
inline constexpr int kFeatureLogAll = 26;

struct MemTableHeader {
  uint32_t nregions;
  uint32_t padding;
};

// A message whose header and payload have passed validation. Fields that a request does not use are
// zero. For SetMemTable, regions[0..nregions) are filled and each is known to be non-empty, not to
// wrap the 64-bit address space, and not to overlap the others in guest-physical space.
struct DecodedMessage {
  MessageHeader header{};
  uint64_t u64 = 0;              // features, protocol features, log base...
  VringState state{};            // SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE
  VringAddr addr{};              // SET_VRING_ADDR
  uint32_t vring_index = 0;      // SET_VRING_KICK/CALL/ERR
  bool vring_has_fd = false;     // SET_VRING_KICK/CALL/ERR: false when the no-fd flag was set
  uint32_t nregions = 0;         // SET_MEM_TABLE
  MemRegionDesc regions[kMaxMemRegions]{};
  LogDesc log{};                 // SET_LOG_BASE (size non-zero, offset + size does not wrap)
  ConfigHeader config{};         // GET_CONFIG / SET_CONFIG
  std::span<const uint8_t> config_data;  // SET_CONFIG: points into the decoded payload

  Request request() const { return static_cast<Request>(header.request); }
  bool need_reply() const { return (header.flags & kFlagNeedReply) != 0; }
};

// Checks a header alone (version bits, the reply flag must be clear, payload size within limits).
Result<MessageHeader> decode_header(std::span<const uint8_t, kHeaderSize> bytes);

// Decodes and validates one message: `payload` is exactly header.size bytes, `num_fds` the number of
// fds that arrived with it. Requests this back-end does not know decode with only the header set;
// the caller decides how to answer them.
Result<DecodedMessage> decode_message(const MessageHeader& header, std::span<const uint8_t> payload,
                                      size_t num_fds);


// Encodes a reply: header (with the reply flag and version) followed by `payload`.
size_t encode_reply(uint32_t request, std::span<const uint8_t> payload, std::span<uint8_t> out);

template <typename T>
std::span<const uint8_t> as_bytes_of(const T& value) {
  return {reinterpret_cast<const uint8_t*>(&value), sizeof(T)};
}

}  // namespace keel::vhost
