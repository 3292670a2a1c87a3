// Fuzz target: the split-virtqueue walker over guest memory the fuzzer writes.
//
// Input: 1 byte queue size (power of two from it), 1 byte features (bit 0 indirect, bit 1
// EVENT_IDX), 3 x 4 bytes ring offsets into guest memory, 2 bytes starting index, then the guest
// memory image itself (up to 64 KiB). The queue is set up as the back-end would after the
// handshake, then popped until empty or broken, with used entries pushed and published, gives back
// (unpop) mixed in.
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "base/log.h"
#include "vhost/guest_memory.h"
#include "vhost/virtqueue.h"

using namespace keel::vhost;

// Keeps the reads of guest buffers from being optimised away.
volatile uint64_t g_sink;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool quiet = [] {
    spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)quiet;
  constexpr size_t kConfig = 1 + 1 + 12 + 2;
  constexpr size_t kMemory = 64 * 1024;
  constexpr uint64_t kGpaBase = 0x100000;
  constexpr uint64_t kUvaBase = 0x7f5500000000;
  if (size < kConfig) return 0;

  uint32_t queue_size = 1u << (data[0] % 9);  // 1..256
  uint8_t features = data[1];
  uint32_t offsets[3];
  std::memcpy(offsets, data + 2, sizeof offsets);
  uint16_t start;
  std::memcpy(&start, data + 14, 2);

  keel::UniqueFd memfd(memfd_create("fuzz-chain", MFD_CLOEXEC));
  if (!memfd.valid() || ftruncate(memfd.get(), kMemory) != 0) return 0;
  size_t image = std::min(size - kConfig, kMemory);
  if (image && pwrite(memfd.get(), data + kConfig, image, 0) != static_cast<ssize_t>(image)) return 0;

  GuestMemory memory;
  if (!memory.add_region(memfd.get(), {kGpaBase, kMemory, kUvaBase, 0})) return 0;

  VirtQueue q;
  if (!q.set_size(queue_size)) return 0;
  uint64_t desc = kUvaBase + (offsets[0] % kMemory);
  uint64_t avail = kUvaBase + (offsets[1] % kMemory);
  uint64_t used = kUvaBase + (offsets[2] % kMemory);
  q.set_addresses(VringAddr{0, 0, desc, used, avail, 0});
  q.set_base(start);
  uint64_t f = 0;
  if (features & 1) f |= feature_bit(kVirtioFRingIndirectDesc);
  if (features & 2) f |= feature_bit(kVirtioFRingEventIdx);
  q.set_features(f);
  if (!q.map(memory)) return 0;
  q.start_without_kick();
  q.set_enabled(true);

  DescChain chain;
  uint64_t checksum = 0;
  for (uint32_t i = 0; i < 2 * queue_size + 2; ++i) {
    auto status = q.pop(memory, chain);
    if (status != VirtQueue::PopStatus::Chain) break;
    // Touch every byte the chain granted, as a device would.
    for (const auto& seg : chain.readable())
      for (uint32_t b = 0; b < seg.len; b += 512) checksum += seg.data[b];
    for (const auto& seg : chain.writable())
      if (seg.len) seg.data[0] = static_cast<uint8_t>(checksum);
    if ((features & 4) && i % 3 == 2) {
      q.unpop(1);
      if (q.pop(memory, chain) != VirtQueue::PopStatus::Chain) break;
    }
    q.push_used(chain.head, static_cast<uint32_t>(chain.writable_bytes));
    if (i % 4 == 3) {
      q.publish_used();
      q.notify_if_needed();
    }
  }
  q.publish_used();
  q.notify_if_needed();
  (void)q.available();
  g_sink = checksum;
  return 0;
}
