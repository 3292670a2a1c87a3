#include "vhost/message.h"

#include <algorithm>

namespace keel::vhost {

std::string_view request_name(uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::None: return "NONE";
    case Request::GetFeatures: return "GET_FEATURES";
    case Request::SetFeatures: return "SET_FEATURES";
    case Request::SetOwner: return "SET_OWNER";
    case Request::ResetOwner: return "RESET_OWNER";
    case Request::SetMemTable: return "SET_MEM_TABLE";
    case Request::SetLogBase: return "SET_LOG_BASE";
    case Request::SetLogFd: return "SET_LOG_FD";
    case Request::SetVringNum: return "SET_VRING_NUM";
    case Request::SetVringAddr: return "SET_VRING_ADDR";
    case Request::SetVringBase: return "SET_VRING_BASE";
    case Request::GetVringBase: return "GET_VRING_BASE";
    case Request::SetVringKick: return "SET_VRING_KICK";
    case Request::SetVringCall: return "SET_VRING_CALL";
    case Request::SetVringErr: return "SET_VRING_ERR";
    case Request::GetProtocolFeatures: return "GET_PROTOCOL_FEATURES";
    case Request::SetProtocolFeatures: return "SET_PROTOCOL_FEATURES";
    case Request::GetQueueNum: return "GET_QUEUE_NUM";
    case Request::SetVringEnable: return "SET_VRING_ENABLE";
    case Request::SendRarp: return "SEND_RARP";
    case Request::NetSetMtu: return "NET_SET_MTU";
    case Request::SetBackendReqFd: return "SET_BACKEND_REQ_FD";
    case Request::IotlbMsg: return "IOTLB_MSG";
    case Request::SetVringEndian: return "SET_VRING_ENDIAN";
    case Request::GetConfig: return "GET_CONFIG";
    case Request::SetConfig: return "SET_CONFIG";
    case Request::ResetDevice: return "RESET_DEVICE";
    case Request::GetMaxMemSlots: return "GET_MAX_MEM_SLOTS";
    case Request::AddMemReg: return "ADD_MEM_REG";
    case Request::RemMemReg: return "REM_MEM_REG";
    case Request::SetStatus: return "SET_STATUS";
    case Request::GetStatus: return "GET_STATUS";
  }
  return "UNKNOWN";
}

Result<MessageHeader> decode_header(std::span<const uint8_t, kHeaderSize> bytes) {
  MessageHeader header;
  std::memcpy(&header, bytes.data(), sizeof header);
  if ((header.flags & kVersionMask) != kVersion)
    return fail_invalid("vhost-user message {} has protocol version {}, expected {}",
                        request_name(header.request), header.flags & kVersionMask, kVersion);
  if (header.flags & kFlagReply)
    return fail_invalid("vhost-user message {} from the front-end has the reply flag set",
                        request_name(header.request));
  if (header.size > kMaxPayloadSize)
    return fail_invalid("vhost-user message {} has a {}-byte payload (limit {})",
                        request_name(header.request), header.size, kMaxPayloadSize);
  return header;
}

namespace {

template <typename T>
T load(std::span<const uint8_t> payload, size_t offset = 0) {
  T value;
  std::memcpy(&value, payload.data() + offset, sizeof value);
  return value;
}

Result<void> need_size(const DecodedMessage& m, size_t size) {
  if (m.header.size != size)
    return fail_invalid("vhost-user {}: payload is {} bytes, expected {}",
                        request_name(m.header.request), m.header.size, size);
  return ok();
}

// Requests without a payload: QEMU sends none, some front-ends send a zero u64.
Result<void> need_empty(const DecodedMessage& m) {
  if (m.header.size != 0 && m.header.size != sizeof(uint64_t))
    return fail_invalid("vhost-user {}: unexpected {}-byte payload", request_name(m.header.request),
                        m.header.size);
  return ok();
}

Result<void> need_fds(const DecodedMessage& m, size_t got, size_t want) {
  if (got != want)
    return fail_invalid("vhost-user {}: came with {} fds, expected {}", request_name(m.header.request),
                        got, want);
  return ok();
}

bool add_overflows(uint64_t a, uint64_t b) { return a + b < a; }

Result<void> check_regions(DecodedMessage& m) {
  for (uint32_t i = 0; i < m.nregions; ++i) {
    const MemRegionDesc& r = m.regions[i];
    if (r.memory_size == 0) return fail_invalid("vhost-user SET_MEM_TABLE: region {} is empty", i);
    if (add_overflows(r.guest_phys_addr, r.memory_size) ||
        add_overflows(r.userspace_addr, r.memory_size) ||
        add_overflows(r.mmap_offset, r.memory_size))
      return fail_invalid("vhost-user SET_MEM_TABLE: region {} (size {:#x}) wraps the address space",
                          i, r.memory_size);
    for (uint32_t j = 0; j < i; ++j) {
      const MemRegionDesc& o = m.regions[j];
      bool gpa_overlap = r.guest_phys_addr < o.guest_phys_addr + o.memory_size &&
                         o.guest_phys_addr < r.guest_phys_addr + r.memory_size;
      bool uva_overlap = r.userspace_addr < o.userspace_addr + o.memory_size &&
                         o.userspace_addr < r.userspace_addr + r.memory_size;
      if (gpa_overlap || uva_overlap)
        return fail_invalid("vhost-user SET_MEM_TABLE: regions {} and {} overlap", j, i);
    }
  }
  return ok();
}

}  // namespace

Result<DecodedMessage> decode_message(const MessageHeader& header, std::span<const uint8_t> payload,
                                      size_t num_fds) {
  DecodedMessage m;
  m.header = header;
  if (payload.size() != header.size)
    return fail_invalid("vhost-user {}: payload is {} bytes, header says {}",
                        request_name(header.request), payload.size(), header.size);
  if (header.size > kMaxPayloadSize || num_fds > kMaxFds)
    return fail_invalid("vhost-user {}: message too large", request_name(header.request));

  switch (m.request()) {
    case Request::GetFeatures:
    case Request::GetProtocolFeatures:
    case Request::GetQueueNum:
    case Request::GetMaxMemSlots:
    case Request::SetOwner:
    case Request::ResetOwner:
    case Request::ResetDevice:
      TRY(need_empty(m));
      TRY(need_fds(m, num_fds, 0));
      return m;

    case Request::SetFeatures:
    case Request::SetProtocolFeatures:
      TRY(need_size(m, sizeof(uint64_t)));
      TRY(need_fds(m, num_fds, 0));
      m.u64 = load<uint64_t>(payload);
      return m;

    case Request::SetVringNum:
    case Request::SetVringBase:
    case Request::GetVringBase:
    case Request::SetVringEnable:
      TRY(need_size(m, sizeof(VringState)));
      TRY(need_fds(m, num_fds, 0));
      m.state = load<VringState>(payload);
      if (m.state.index >= kMaxQueues)
        return fail_invalid("vhost-user {}: ring index {} out of range", request_name(header.request),
                            m.state.index);
      return m;

    case Request::SetVringAddr:
      TRY(need_size(m, sizeof(VringAddr)));
      TRY(need_fds(m, num_fds, 0));
      m.addr = load<VringAddr>(payload);
      if (m.addr.index >= kMaxQueues)
        return fail_invalid("vhost-user SET_VRING_ADDR: ring index {} out of range", m.addr.index);
      return m;

    case Request::SetVringKick:
    case Request::SetVringCall:
    case Request::SetVringErr: {
      TRY(need_size(m, sizeof(uint64_t)));
      m.u64 = load<uint64_t>(payload);
      if (m.u64 & ~(kVringIndexMask | kVringNoFdFlag))
        return fail_invalid("vhost-user {}: unknown bits in {:#x}", request_name(header.request), m.u64);
      m.vring_index = static_cast<uint32_t>(m.u64 & kVringIndexMask);
      m.vring_has_fd = (m.u64 & kVringNoFdFlag) == 0;
      TRY(need_fds(m, num_fds, m.vring_has_fd ? 1 : 0));
      return m;
    }

    case Request::SetMemTable: {
      if (header.size < sizeof(MemTableHeader))
        return fail_invalid("vhost-user SET_MEM_TABLE: {}-byte payload is too short", header.size);
      auto table = load<MemTableHeader>(payload);
      if (table.nregions == 0 || table.nregions > kMaxMemRegions)
        return fail_invalid("vhost-user SET_MEM_TABLE: {} regions (must be 1..{})", table.nregions,
                            kMaxMemRegions);
      TRY(need_size(m, sizeof(MemTableHeader) + table.nregions * sizeof(MemRegionDesc)));
      TRY(need_fds(m, num_fds, table.nregions));
      m.nregions = table.nregions;
      for (uint32_t i = 0; i < m.nregions; ++i)
        m.regions[i] = load<MemRegionDesc>(payload, sizeof(MemTableHeader) + i * sizeof(MemRegionDesc));
      TRY(check_regions(m));
      return m;
    }

    case Request::GetConfig:
    case Request::SetConfig: {
      if (header.size < sizeof(ConfigHeader))
        return fail_invalid("vhost-user {}: {}-byte payload is too short", request_name(header.request),
                            header.size);
      TRY(need_fds(m, num_fds, 0));
      m.config = load<ConfigHeader>(payload);
      if (m.config.size > kMaxConfigSize || m.config.offset > kMaxConfigSize ||
          m.config.offset + m.config.size > kMaxConfigSize)
        return fail_invalid("vhost-user {}: config window {}+{} is beyond {} bytes",
                            request_name(header.request), m.config.offset, m.config.size, kMaxConfigSize);
      TRY(need_size(m, sizeof(ConfigHeader) + m.config.size));
      m.config_data = payload.subspan(sizeof(ConfigHeader), m.config.size);
      return m;
    }

    case Request::SetLogBase:
      TRY(need_size(m, sizeof(LogDesc)));
      TRY(need_fds(m, num_fds, 1));
      m.log = load<LogDesc>(payload);
      if (m.log.mmap_size == 0) return fail_invalid("vhost-user SET_LOG_BASE: empty log");
      if (m.log.mmap_offset + m.log.mmap_size < m.log.mmap_offset)
        return fail_invalid("vhost-user SET_LOG_BASE: offset {:#x} + size {:#x} wraps", m.log.mmap_offset,
                            m.log.mmap_size);
      return m;

    case Request::SetLogFd:
    case Request::SetBackendReqFd:
      // Carry at most one fd; we refuse them, the caller closes what came.
      if (num_fds > 1) return fail_invalid("vhost-user {}: {} fds", request_name(header.request), num_fds);
      if (header.size >= sizeof(uint64_t)) m.u64 = load<uint64_t>(payload);
      return m;

    default:
      // Unknown or unsupported request: only the header is meaningful.
      return m;
  }
}

size_t encode_reply(uint32_t request, std::span<const uint8_t> payload, std::span<uint8_t> out) {
  KEEL_CHECK(out.size() >= kHeaderSize + payload.size());
  MessageHeader header{request, kVersion | kFlagReply, static_cast<uint32_t>(payload.size())};
  std::memcpy(out.data(), &header, sizeof header);
  if (!payload.empty()) std::memcpy(out.data() + kHeaderSize, payload.data(), payload.size());
  return kHeaderSize + payload.size();
}

}  // namespace keel::vhost
