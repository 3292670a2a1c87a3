// Split virtqueues (virtio 1.x, 2.7) living in the front-end's shared memory.
//
// The guest owns the descriptor table and the avail ring and may change them at any moment, so each
// descriptor is copied out before it is checked, every address goes through GuestMemory, chains are
// bounded by the table they live in (which catches loops) and indexes are reduced modulo the ring
// size. A chain that breaks the rules puts the queue in the "broken" state: it stops being
// processed until the front-end configures it again, and the error eventfd is signalled. Nothing the
// guest writes can make us read or write outside its memory or loop forever.
//
// One thread owns a VirtQueue. The data path is pop() / push_used() / publish_used() and
// notify_if_needed(); none of them allocates.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"
#include "vhost/dirty_log.h"
#include "vhost/guest_memory.h"
#include "vhost/message.h"

namespace keel::vhost {

// Virtio feature bits shared by every device type.
inline constexpr int kVirtioFNotifyOnEmpty = 24;
inline constexpr int kVirtioFAnyLayout = 27;
inline constexpr int kVirtioFRingIndirectDesc = 28;
inline constexpr int kVirtioFRingEventIdx = 29;
inline constexpr int kVirtioFVersion1 = 32;
inline constexpr int kVirtioFAccessPlatform = 33;
inline constexpr int kVirtioFRingPacked = 34;

inline constexpr uint64_t feature_bit(int bit) { return 1ull << bit; }

// Descriptor flags.
inline constexpr uint16_t kDescFNext = 1;
inline constexpr uint16_t kDescFWrite = 2;
inline constexpr uint16_t kDescFIndirect = 4;
// Ring flags.
inline constexpr uint16_t kAvailFNoInterrupt = 1;
inline constexpr uint16_t kUsedFNoNotify = 1;

struct VringDesc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(VringDesc) == 16);

struct VringUsedElem {
  uint32_t id;
  uint32_t len;
};

// One buffer of a chain, already translated to our address space.
struct BufferSegment {
  uint8_t* data;
  uint32_t len;
};

// A descriptor chain taken from the avail ring: its readable segments first, then its writable ones
// (the spec requires that order; a chain that breaks it is refused).
struct DescChain {
  // Longer chains are refused. Linux sends at most MAX_SKB_FRAGS + 2 segments per packet and
  // virtio-blk at most seg_max + 2; 256 leaves room for either.
  static constexpr size_t kMaxSegments = 256;

  uint16_t head = 0;
  uint16_t num_readable = 0;
  uint16_t num_writable = 0;
  uint64_t readable_bytes = 0;
  uint64_t writable_bytes = 0;
  std::array<BufferSegment, kMaxSegments> segments;

  std::span<const BufferSegment> readable() const { return {segments.data(), num_readable}; }
  std::span<const BufferSegment> writable() const {
    return {segments.data() + num_readable, num_writable};
  }
};

// Ring memory sizes for a queue of `size` entries.
inline constexpr uint64_t desc_table_bytes(uint32_t size) { return 16ull * size; }
inline constexpr uint64_t avail_ring_bytes(uint32_t size) { return 6 + 2ull * size; }
inline constexpr uint64_t used_ring_bytes(uint32_t size) { return 6 + 8ull * size; }

class VirtQueue {
public:
  enum class PopStatus { Empty, Chain, Broken };

  VirtQueue() = default;
  VirtQueue(const VirtQueue&) = delete;
  VirtQueue& operator=(const VirtQueue&) = delete;
  VirtQueue(VirtQueue&&) noexcept = default;
  VirtQueue& operator=(VirtQueue&&) noexcept = default;

  // --- configuration (from vhost-user messages) ---
  Result<void> set_size(uint32_t size);
  void set_addresses(const VringAddr& addr) { addr_ = addr; has_addr_ = true; }
  // Translates the ring addresses through `memory`. Called after SET_VRING_ADDR and after every
  // SET_MEM_TABLE. Leaves the queue unmapped (not ready) on failure.
  Result<void> map(const GuestMemory& memory);
  void unmap();
  void set_base(uint16_t last_avail_idx) { last_avail_idx_ = last_avail_idx; shadow_avail_idx_ = last_avail_idx; }
  uint16_t last_avail_idx() const { return last_avail_idx_; }
  void set_features(uint64_t features);
  void set_kick_fd(UniqueFd fd) { kick_ = std::move(fd); started_ = true; broken_ = false; }
  // Front-end asked for polling mode (no kick fd): the queue still starts.
  void start_without_kick() { kick_.reset(); started_ = true; broken_ = false; }
  void set_call_fd(UniqueFd fd) { call_ = std::move(fd); signalled_valid_ = false; }
  void set_err_fd(UniqueFd fd) { err_ = std::move(fd); }
  void set_enabled(bool enabled) { enabled_ = enabled; }
  // GET_VRING_BASE: the ring stops; the kick fd is dropped.
  void stop() { started_ = false; kick_.reset(); }
  // Back to the state of a fresh connection.
  void reset();

  // --- state ---
  bool ready() const { return mapped_ && started_ && enabled_ && !broken_; }
  bool started() const { return started_; }
  bool enabled() const { return enabled_; }
  bool mapped() const { return mapped_; }
  bool broken() const { return broken_; }
  uint32_t size() const { return size_; }
  int kick_fd() const { return kick_.get(); }
  int call_fd() const { return call_.get(); }
  // The reason the queue broke, for logs and tests.
  const std::string& broken_reason() const { return broken_reason_; }

  // --- data path (only while ready()) ---
  // Takes the next chain from the avail ring into `chain`. Broken means the guest gave a malformed
  // ring or chain; the queue is now broken and the error fd was signalled.
  PopStatus pop(const GuestMemory& memory, DescChain& chain);
  // Gives back the last `count` popped chains that were not pushed as used (e.g. not enough buffers
  // for a whole frame).
  void unpop(uint16_t count) { last_avail_idx_ = static_cast<uint16_t>(last_avail_idx_ - count); }
  // Number of chains the guest has made available that we have not popped (reads the avail index).
  uint16_t available() ;
  // Records a used element; the guest sees it after publish_used().
  void push_used(uint16_t head, uint32_t written_len);
  // Makes every pushed element visible to the guest.
  void publish_used();
  // After publish_used(): signals the call eventfd if the guest asked to be interrupted (EVENT_IDX
  // or the NO_INTERRUPT flag). Returns whether it signalled.
  bool notify_if_needed();
  // Drains the kick eventfd (non-blocking); returns true if a kick was pending.
  bool drain_kick();

  // Whether we want kicks for this queue (default yes). A device that only consumes buffers when
  // it has something to deliver (virtio-net's receive queue) turns them off, so refilling buffers
  // costs the guest no notification. Applied through EVENT_IDX or the NO_NOTIFY flag.
  void set_kicks_wanted(bool wanted);

  // Live migration: while `log` is set (VHOST_F_LOG_ALL negotiated and a log mapped), every write
  // to the used ring marks its pages in `log`, at the guest-physical address SET_VRING_ADDR gave
  // (log_guest_addr, when its VHOST_VRING_F_LOG flag is set). nullptr turns logging off.
  void set_dirty_log(DirtyLog* log) { log_ = (log != nullptr && (addr_.flags & kVringFLog)) ? log : nullptr; }
  bool logging() const { return log_ != nullptr; }

  // Marks the queue broken (a device error) and signals the error fd.
  void mark_broken(std::string reason);

private:
  PopStatus walk_chain(const GuestMemory& memory, uint16_t head, DescChain& chain);
  // Called after every write to the used ring: [offset, offset + len) of it changed.
  void log_used(uint64_t offset, uint64_t len) {
    if (log_ != nullptr) [[unlikely]]
      log_->mark_gpa(addr_.log_guest_addr + offset, len);
  }
  void store_avail_event(uint16_t value);

  uint32_t size_ = 0;
  VringAddr addr_{};
  bool has_addr_ = false;
  bool mapped_ = false;
  bool started_ = false;
  bool enabled_ = false;
  bool broken_ = false;
  bool event_idx_ = false;
  bool indirect_ = false;
  bool kicks_wanted_ = true;
  std::string broken_reason_;

  VringDesc* desc_ = nullptr;
  uint16_t* avail_ = nullptr;  // flags, idx, ring[size], used_event
  uint8_t* used_ = nullptr;    // flags, idx, ring[size] of VringUsedElem, avail_event

  uint16_t last_avail_idx_ = 0;
  uint16_t shadow_avail_idx_ = 0;  // the guest's avail idx as last read
  uint16_t used_idx_ = 0;          // ours, published to the guest by publish_used()
  uint16_t published_used_idx_ = 0;
  uint16_t signalled_used_ = 0;
  bool signalled_valid_ = false;

  DirtyLog* log_ = nullptr;  // owned by the backend; set only while logging
  UniqueFd kick_;
  UniqueFd call_;
  UniqueFd err_;
};

}  // namespace keel::vhost
