// Fuzz target: a frame from a VM's virtio-net driver with the offload header it came with, as
// keel-switch's vhost-user ports take it (take_offloaded_frame), then what the switch does with a
// super-frame for an output without segmentation offload (cut_super_frame into segments).
//
// Input: 8 bytes of header (flags, gso_type, gso_size, csum_start, csum_offset; 16-bit fields
// little-endian, as on the wire), then the frame (up to 64 KB).
#include <cstring>
#include <memory>

#include "switch/packet.h"
#include "switch/port.h"

using namespace keel::sw;

// Keeps the segments' bytes from being optimised away.
volatile uint32_t g_sink;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  auto le16 = [&](size_t at) { return uint16_t(data[at] | data[at + 1] << 8); };
  keel::vhost::VirtioNetHdr h{data[0], data[1], 0, le16(2), le16(4), le16(6), 0};
  const uint8_t* frame = data + 8;
  size_t len = size - 8;

  static PacketBatch batch;
  static std::unique_ptr<uint8_t[]> slot(new uint8_t[kSuperPayloadMax]);
  static std::unique_ptr<uint8_t[]> scratch(new uint8_t[Frame::kBufferSize]);
  batch.reset();
  Frame& f = batch[0];
  if (!take_offloaded_frame(f, frame, len, h, slot.get())) return 0;
  if (f.len > Frame::kBufferSize - Frame::kHeadroom) __builtin_trap();
  if (!f.is_super()) {
    g_sink = ones_sum(f.data, f.len);
    return 0;
  }
  if (f.payload_len > kSuperPayloadMax || f.payload != slot.get()) __builtin_trap();
  uint32_t sum = 0;
  bool cut = cut_super_frame(f.data, f.len, f.payload, f.payload_len, f.offload.gso_size, scratch.get(),
                             Frame::kBufferSize, [&](const uint8_t* seg, size_t n) {
                               if (n > Frame::kBufferSize) __builtin_trap();
                               sum += ones_sum(seg, n);
                             });
  g_sink = sum + cut;
  return 0;
}
