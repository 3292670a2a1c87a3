// Frames in flight and the header rewrites OpenFlow actions perform on them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "switch/flow.h"

namespace keel::sw {

// One frame in a preallocated buffer with headroom, so pushing a VLAN tag never reallocates.
struct Frame {
  static constexpr size_t kHeadroom = 64;
  static constexpr size_t kBufferSize = 10240;  // headroom + a jumbo frame
  uint8_t* buffer = nullptr;  // kBufferSize bytes
  uint8_t* data = nullptr;    // start of the frame inside buffer
  uint32_t len = 0;

  void reset_to_headroom() { data = buffer + kHeadroom; len = 0; }
  size_t capacity_after_data() const { return size_t(buffer + kBufferSize - data); }
};

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
