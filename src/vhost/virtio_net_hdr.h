// The virtio-net header (virtio 1.x, 5.1.6): what a virtio-net driver puts in front of every frame,
// and what Linux's packet sockets put in front of theirs with PACKET_VNET_HDR. It says what the
// sender left for the device to do: finish a partial checksum, cut a TCP super-frame.
// Kept apart from net_port.h so that code that only reads headers (the switch's ports) needs no
// vhost-user device.
#pragma once

#include <cstddef>
#include <cstdint>

namespace keel::vhost {

// struct virtio_net_hdr_mrg_rxbuf: little-endian on the wire; used here with fields in host byte
// order (the same bytes on x86). Without MRG_RXBUF or VERSION_1, and on a packet socket, the header
// is the first kVirtioNetHdrLegacySize bytes (no num_buffers).
struct VirtioNetHdr {
  uint8_t flags;
  uint8_t gso_type;
  uint16_t hdr_len;
  uint16_t gso_size;
  uint16_t csum_start;
  uint16_t csum_offset;
  uint16_t num_buffers;
};
static_assert(sizeof(VirtioNetHdr) == 12);
inline constexpr size_t kVirtioNetHdrLegacySize = 10;

inline constexpr uint8_t kVirtioNetHdrFNeedsCsum = 1;  // a partial checksum at csum_start/csum_offset
inline constexpr uint8_t kVirtioNetHdrGsoNone = 0;
inline constexpr uint8_t kVirtioNetHdrGsoTcpv4 = 1;
inline constexpr uint8_t kVirtioNetHdrGsoTcpv6 = 4;
inline constexpr uint8_t kVirtioNetHdrGsoEcn = 0x80;  // or'ed into gso_type

}  // namespace keel::vhost
