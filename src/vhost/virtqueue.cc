#include "vhost/virtqueue.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "base/log.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "virtio 1.x rings are little-endian; this code reads them natively");

namespace keel::vhost {

namespace {

uint16_t load_acquire(const uint16_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
uint16_t load_relaxed(const uint16_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
void store_relaxed(uint16_t* p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
void store_release(uint16_t* p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// virtio spec 2.7.10: should the side that moved its index from `old_idx` to `new_idx` notify, given
// the other side's event index?
bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event_idx - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

void signal_eventfd(int fd) {
  if (fd < 0) return;
  uint64_t one = 1;
  // An eventfd write fails only if the counter would overflow, in which case the reader has
  // plenty of pending wake-ups already.
  [[maybe_unused]] ssize_t n = ::write(fd, &one, sizeof one);
}

}  // namespace

Result<void> VirtQueue::set_size(uint32_t size) {
  if (size == 0 || size > kMaxQueueSize || (size & (size - 1)) != 0)
    return fail_invalid("virtqueue size {} is not a power of two in 1..{}", size, kMaxQueueSize);
  size_ = size;
  mapped_ = false;
  return ok();
}

void VirtQueue::set_features(uint64_t features) {
  event_idx_ = (features & feature_bit(kVirtioFRingEventIdx)) != 0;
  indirect_ = (features & feature_bit(kVirtioFRingIndirectDesc)) != 0;
}

Result<void> VirtQueue::map(const GuestMemory& memory) {
  mapped_ = false;
  desc_ = nullptr;
  avail_ = nullptr;
  used_ = nullptr;
  if (!has_addr_) return ok();  // nothing to map yet
  if (size_ == 0) return fail_invalid("virtqueue {}: addresses set before its size", addr_.index);
  if (addr_.desc_user_addr % 16 || addr_.avail_user_addr % 2 || addr_.used_user_addr % 4)
    return fail_invalid("virtqueue {}: misaligned ring addresses", addr_.index);
  auto* desc = memory.uva_to_host(addr_.desc_user_addr, desc_table_bytes(size_));
  auto* avail = memory.uva_to_host(addr_.avail_user_addr, avail_ring_bytes(size_));
  auto* used = memory.uva_to_host(addr_.used_user_addr, used_ring_bytes(size_));
  if (!desc || !avail || !used)
    return fail_invalid("virtqueue {}: ring addresses {:#x}/{:#x}/{:#x} are outside guest memory",
                        addr_.index, addr_.desc_user_addr, addr_.avail_user_addr, addr_.used_user_addr);
  desc_ = reinterpret_cast<VringDesc*>(desc);
  avail_ = reinterpret_cast<uint16_t*>(avail);
  used_ = used;
  mapped_ = true;

  // We complete chains in order, so after a reconnect everything the guest made available beyond
  // what it has seen used is still to be done: resume from the used index it has.
  used_idx_ = load_acquire(reinterpret_cast<uint16_t*>(used_ + 2));
  published_used_idx_ = used_idx_;
  if (last_avail_idx_ != used_idx_) {
    KEEL_LOG_DEBUG("virtqueue {}: last avail {} != used {}, resuming from used", addr_.index,
                   last_avail_idx_, used_idx_);
    last_avail_idx_ = used_idx_;
  }
  shadow_avail_idx_ = last_avail_idx_;
  signalled_valid_ = false;
  set_kicks_wanted(kicks_wanted_);
  return ok();
}

void VirtQueue::set_kicks_wanted(bool wanted) {
  kicks_wanted_ = wanted;
  if (!mapped_) return;
  auto* used_flags = reinterpret_cast<uint16_t*>(used_);
  if (event_idx_) {
    // The guest kicks when its index passes avail_event; pointing it at what we have consumed asks
    // for the next one, leaving it behind asks for none (until the index wraps around).
    if (wanted) store_avail_event(last_avail_idx_);
    store_relaxed(used_flags, 0);
  } else {
    store_relaxed(used_flags, wanted ? 0 : kUsedFNoNotify);
  }
  log_used(0, sizeof(uint16_t));
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void VirtQueue::unmap() {
  mapped_ = false;
  desc_ = nullptr;
  avail_ = nullptr;
  used_ = nullptr;
}

void VirtQueue::reset() {
  *this = VirtQueue();
}

void VirtQueue::mark_broken(std::string reason) {
  if (!broken_) KEEL_LOG_WARN("virtqueue {}: device error: {}", addr_.index, reason);
  broken_ = true;
  broken_reason_ = std::move(reason);
  signal_eventfd(err_.get());
}

uint16_t VirtQueue::available() {
  if (!ready()) return 0;
  shadow_avail_idx_ = load_acquire(&avail_[1]);
  return static_cast<uint16_t>(shadow_avail_idx_ - last_avail_idx_);
}

VirtQueue::PopStatus VirtQueue::pop(const GuestMemory& memory, DescChain& chain) {
  if (!ready()) return PopStatus::Empty;
  if (shadow_avail_idx_ == last_avail_idx_) {
    shadow_avail_idx_ = load_acquire(&avail_[1]);
    if (shadow_avail_idx_ == last_avail_idx_) {
      if (!event_idx_ || !kicks_wanted_) return PopStatus::Empty;
      // Ask for a kick on the next buffer, then look again: the guest may have added one after our
      // read and before it could see the new avail_event.
      store_avail_event(last_avail_idx_);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      shadow_avail_idx_ = load_acquire(&avail_[1]);
      if (shadow_avail_idx_ == last_avail_idx_) return PopStatus::Empty;
    }
    if (static_cast<uint16_t>(shadow_avail_idx_ - last_avail_idx_) > size_) {
      mark_broken(fmt::format("avail index moved from {} to {}, more than the ring size {}",
                              last_avail_idx_, shadow_avail_idx_, size_));
      return PopStatus::Broken;
    }
  }
  uint16_t head = load_relaxed(&avail_[2 + (last_avail_idx_ & (size_ - 1))]);
  PopStatus status = walk_chain(memory, head, chain);
  if (status != PopStatus::Chain) return status;
  ++last_avail_idx_;
  if (event_idx_ && kicks_wanted_) store_avail_event(last_avail_idx_);
  return PopStatus::Chain;
}

VirtQueue::PopStatus VirtQueue::walk_chain(const GuestMemory& memory, uint16_t head, DescChain& chain) {
  chain.head = head;
  chain.num_readable = 0;
  chain.num_writable = 0;
  chain.readable_bytes = 0;
  chain.writable_bytes = 0;
  if (head >= size_) {
    mark_broken(fmt::format("chain head {} is outside the {}-entry table", head, size_));
    return PopStatus::Broken;
  }

  const uint8_t* table = reinterpret_cast<const uint8_t*>(desc_);
  uint32_t table_size = size_;
  bool in_indirect = false;
  uint32_t index = head;
  uint32_t visited = 0;
  size_t count = 0;
  for (;;) {
    // Copy the descriptor out first: the guest may rewrite it while we look at it.
    VringDesc d;
    std::memcpy(&d, table + 16ull * index, sizeof d);
    std::atomic_signal_fence(std::memory_order_acq_rel);

    if (d.flags & kDescFIndirect) {
      if (!indirect_) {
        mark_broken("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC");
        return PopStatus::Broken;
      }
      if (in_indirect) {
        mark_broken("indirect descriptor inside an indirect table");
        return PopStatus::Broken;
      }
      if (d.flags & kDescFNext) {
        mark_broken("descriptor has both INDIRECT and NEXT");
        return PopStatus::Broken;
      }
      if (d.len == 0 || d.len % sizeof(VringDesc) != 0 || d.len / sizeof(VringDesc) > kMaxQueueSize) {
        mark_broken(fmt::format("indirect table length {} is invalid", d.len));
        return PopStatus::Broken;
      }
      const uint8_t* indirect_table = memory.gpa_to_host(d.addr, d.len);
      if (!indirect_table) {
        mark_broken(fmt::format("indirect table at {:#x}+{} is outside guest memory", d.addr, d.len));
        return PopStatus::Broken;
      }
      table = indirect_table;
      table_size = d.len / sizeof(VringDesc);
      in_indirect = true;
      index = 0;
      visited = 0;
      continue;
    }

    // A chain visits each descriptor of its table at most once; more means a loop.
    if (++visited > table_size) {
      mark_broken(fmt::format("descriptor chain from head {} loops", head));
      return PopStatus::Broken;
    }
    if (count == DescChain::kMaxSegments) {
      mark_broken(fmt::format("descriptor chain from head {} is longer than {}", head,
                              DescChain::kMaxSegments));
      return PopStatus::Broken;
    }
    uint8_t* data = memory.gpa_to_host(d.addr, d.len);
    if (!data) {
      mark_broken(fmt::format("descriptor buffer {:#x}+{} is outside guest memory", d.addr, d.len));
      return PopStatus::Broken;
    }
    if (d.flags & kDescFWrite) {
      ++chain.num_writable;
      chain.writable_bytes += d.len;
    } else {
      if (chain.num_writable != 0) {
        mark_broken("readable descriptor after a writable one");
        return PopStatus::Broken;
      }
      ++chain.num_readable;
      chain.readable_bytes += d.len;
    }
    chain.segments[count++] = BufferSegment{data, d.len};

    if (!(d.flags & kDescFNext)) return PopStatus::Chain;
    index = d.next;
    if (index >= table_size) {
      mark_broken(fmt::format("descriptor next {} is outside the {}-entry table", index, table_size));
      return PopStatus::Broken;
    }
  }
}

void VirtQueue::store_avail_event(uint16_t value) {
  const uint64_t offset = 4 + 8ull * size_;
  store_relaxed(reinterpret_cast<uint16_t*>(used_ + offset), value);
  log_used(offset, sizeof(uint16_t));
}

void VirtQueue::push_used(uint16_t head, uint32_t written_len) {
  const uint64_t offset = 4 + 8ull * (used_idx_ & (size_ - 1));
  VringUsedElem e{head, written_len};
  std::memcpy(used_ + offset, &e, sizeof e);
  log_used(offset, sizeof e);
  ++used_idx_;
}

void VirtQueue::publish_used() {
  if (!mapped_ || used_idx_ == published_used_idx_) return;
  store_release(reinterpret_cast<uint16_t*>(used_ + 2), used_idx_);
  log_used(2, sizeof(uint16_t));
  published_used_idx_ = used_idx_;
}

bool VirtQueue::notify_if_needed() {
  if (!mapped_ || call_.get() < 0) return false;
  // Order our used index store before reading the guest's suppression state.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  uint16_t old_idx = signalled_used_;
  uint16_t new_idx = published_used_idx_;
  bool valid = signalled_valid_;
  signalled_used_ = new_idx;
  signalled_valid_ = true;
  if (valid && old_idx == new_idx) return false;  // nothing new since the last decision
  bool notify;
  if (event_idx_) {
    uint16_t used_event = load_relaxed(&avail_[2 + size_]);
    notify = !valid || need_event(used_event, new_idx, old_idx);
  } else {
    notify = (load_relaxed(&avail_[0]) & kAvailFNoInterrupt) == 0;
  }
  if (notify) signal_eventfd(call_.get());
  return notify;
}

bool VirtQueue::drain_kick() {
  if (kick_.get() < 0) return false;
  uint64_t value;
  return ::read(kick_.get(), &value, sizeof value) == sizeof value;
}

}  // namespace keel::vhost
