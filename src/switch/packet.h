// Frames in flight and the header rewrites OpenFlow actions perform on them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "switch/flow.h"
#include "vhost/virtio_net_hdr.h"

namespace keel::sw {

// Segmentation offload of a TCP super-frame (the virtio-net header's gso_type and gso_size).
struct Offload {
  uint8_t gso_type = 0;  // vhost::kVirtioNetHdrGso*: none, or TCPV4 / TCPV6, the ECN bit kept
  uint16_t gso_size = 0;  // payload bytes per segment
};

// One frame in a preallocated buffer with headroom, so pushing a VLAN tag never reallocates.
//
// A TCP super-frame (a sender's segmentation offload, up to 64 KB) travels whole: `data`/`len` hold
// its headers (Ethernet to TCP, rewritten like any frame's), `payload` points at its TCP payload,
// which stays with the port that received it until the batch is done, and `offload` says how to cut
// it. Its TCP checksum field holds the pseudo-header sum (a partial checksum), so header rewrites
// that touch checksummed fields need it cut into ordinary segments first (cut_super_frame).
struct Frame {
  static constexpr size_t kHeadroom = 64;
  static constexpr size_t kBufferSize = 10240;  // headroom + a jumbo frame
  uint8_t* buffer = nullptr;  // kBufferSize bytes
  uint8_t* data = nullptr;    // start of the frame inside buffer
  uint32_t len = 0;
  const uint8_t* payload = nullptr;  // super-frames only
  uint32_t payload_len = 0;
  Offload offload{};

  void reset_to_headroom() {
    data = buffer + kHeadroom;
    len = 0;
    payload = nullptr;
    payload_len = 0;
    offload = {};
  }
  size_t capacity_after_data() const { return size_t(buffer + kBufferSize - data); }
  bool is_super() const { return payload != nullptr; }
  size_t wire_len() const { return len + payload_len; }
  // Copies the frame (headers and the reference to a super-frame's payload) into this one's buffer.
  void copy_from(const Frame& other);
};

// Ones-complement sum of a byte range (16-bit big-endian words), not folded, and its final form.
uint32_t ones_sum(const uint8_t* p, size_t n, uint32_t sum = 0);
uint16_t ones_finish(uint32_t sum);

// Where the TCP header of a TCP/IPv4 or TCP/IPv6 frame ends (0 if it is not one, or truncated).
size_t tcp_headers_end(const uint8_t* frame, size_t len);

// Completes a partial checksum (a sender's checksum offload): the field at csum_start + csum_offset
// holds the pseudo-header sum; the sum runs from csum_start to the end. False when either lies
// outside the frame.
bool finish_partial_checksum(uint8_t* frame, size_t len, size_t csum_start, size_t csum_offset);

// Room a super-frame's payload needs in a slot: the largest IP packet.
inline constexpr size_t kSuperPayloadMax = 65535;
// How far into a super-frame its headers are looked for: two VLAN tags, IPv6 with extension
// headers, TCP with options.
inline constexpr size_t kSuperHeadersMax = 256;

// Where the headers (Ethernet to TCP) of a TCP super-frame of `len` bytes end, if `h` (from the
// sender, so not trusted) describes one the switch can carry: TCP over IPv4/IPv6 as the frame's own
// headers say (looked for in its first kSuperHeadersMax bytes), a partial checksum, a payload, and segments that fit a frame buffer. 0 otherwise.
size_t super_frame_headers(const uint8_t* frame, size_t len, const vhost::VirtioNetHdr& h);

// Takes a frame that arrived behind `h` (from a VM's virtio-net driver) into `out`: an ordinary frame
// is copied, its partial checksum finished; a TCP super-frame (super_frame_headers) keeps its
// headers in `out` and its payload in `slot` (kSuperPayloadMax bytes), which must outlive the frame.
// False (nothing usable in `out`) when the frame is malformed.
bool take_offloaded_frame(Frame& out, const uint8_t* frame, size_t len, const vhost::VirtioNetHdr& h, uint8_t* slot);

// The virtio-net header that sends super-frame `f` whole to a receiver that segments it (a packet
// socket, a guest with TCP segmentation offload): its type and segment size, and the partial TCP
// checksum it carries.
vhost::VirtioNetHdr super_frame_vnet_header(const Frame& f);

// Cuts a TCP super-frame (headers `hdr` of `hdr_len` bytes, exactly up to the end of the TCP header,
// VLAN tags included; `payload` separate) into segments of at most `mss` payload bytes, fixing IP
// lengths and ids, sequence numbers, FIN/PSH/CWR and both checksums, as the sender's NIC would. Each
// segment is built in `scratch` (scratch_size bytes) and handed to `emit`. False when the headers are
// not TCP or the sizes do not fit (nothing emitted then).
template <typename Emit>
bool cut_super_frame(const uint8_t* hdr, size_t hdr_len, const uint8_t* payload, size_t payload_len, size_t mss,
                     uint8_t* scratch, size_t scratch_size, Emit&& emit);
bool cut_super_frame_prepare(const uint8_t* hdr, size_t hdr_len, size_t mss, size_t scratch_size,
                             FrameLayout& layout);
void cut_super_frame_fix(uint8_t* seg, const FrameLayout& layout, size_t hdr_len, size_t n, size_t off,
                         size_t k, bool last);

template <typename Emit>
bool cut_super_frame(const uint8_t* hdr, size_t hdr_len, const uint8_t* payload, size_t payload_len, size_t mss,
                     uint8_t* scratch, size_t scratch_size, Emit&& emit) {
  FrameLayout layout;
  if (!cut_super_frame_prepare(hdr, hdr_len, mss, scratch_size, layout)) return false;
  for (size_t off = 0, k = 0; off < payload_len; off += mss, ++k) {
    size_t n = payload_len - off < mss ? payload_len - off : mss;
    std::memcpy(scratch, hdr, hdr_len);
    std::memcpy(scratch + hdr_len, payload + off, n);
    cut_super_frame_fix(scratch, layout, hdr_len, n, off, k, off + n >= payload_len);
    emit(static_cast<const uint8_t*>(scratch), hdr_len + n);
  }
  return true;
}

// Header rewrites. Each keeps checksums valid (incremental updates) and is a no-op on frames that
// lack the header. Return false when the frame must be dropped (TTL expired).
void frame_push_vlan(Frame& f, uint16_t tpid, uint16_t tci);
void frame_pop_vlan(Frame& f);
void frame_set_field(Frame& f, uint8_t oxm_field, const uint8_t* value);
bool frame_dec_ttl(Frame& f);
void frame_set_ttl(Frame& f, uint8_t ttl);
// The 802.1Q TCI of a tagged frame (host order), or -1 when untagged.
int frame_vlan_tci(const Frame& f);

}  // namespace keel::sw
