#include "switch/tx_thread.h"

#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace keel::sw {

namespace {

std::atomic<bool> g_enabled{false};

long futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

}  // namespace

void TransmitThread::set_enabled(bool on) { g_enabled.store(on); }
bool TransmitThread::enabled() { return g_enabled.load(); }

TransmitThread::TransmitThread(int fd, size_t prefix_len, const std::string& name, size_t ring_bytes)
    : fd_(fd),
      prefix_len_(prefix_len),
      size_(std::bit_ceil(ring_bytes)),
      mask_(size_ - 1),
      ring_(static_cast<uint8_t*>(std::aligned_alloc(kAlign, size_)), std::free) {
  thread_ = std::thread([this, name] {
    std::string short_name = name.substr(0, 15);
    pthread_setname_np(pthread_self(), short_name.c_str());
    run();
  });
}

TransmitThread::~TransmitThread() {
  stop_.store(true, std::memory_order_seq_cst);
  sleeping_.store(0, std::memory_order_seq_cst);
  futex(&sleeping_, FUTEX_WAKE_PRIVATE, 1);
  thread_.join();
}

bool TransmitThread::push(const void* prefix, const uint8_t* a, size_t a_len, const uint8_t* b, size_t b_len) {
  size_t payload = prefix_len_ + a_len + b_len;
  size_t need = record_size(payload);
  size_t offset = write_pos_ & mask_;
  // A record never wraps: when it does not fit before the ring's end, the rest of the ring is skipped.
  size_t skip = offset + need > size_ ? size_ - offset : 0;
  if (need + skip > size_) return false;
  if (write_pos_ + skip + need - head_cache_ > size_) {
    head_cache_ = consumed_.load(std::memory_order_acquire);
    if (write_pos_ + skip + need - head_cache_ > size_) return false;
  }
  if (skip) {
    reinterpret_cast<Record*>(ring_.get() + offset)->len = kWrap;
    write_pos_ += skip;
    offset = 0;
  }
  uint8_t* p = ring_.get() + offset;
  reinterpret_cast<Record*>(p)->len = uint32_t(payload);
  p += sizeof(Record);
  if (prefix_len_) std::memcpy(p, prefix, prefix_len_);
  std::memcpy(p + prefix_len_, a, a_len);
  if (b_len) std::memcpy(p + prefix_len_ + a_len, b, b_len);
  write_pos_ += need;
  return true;
}

void TransmitThread::publish() {
  if (published_.load(std::memory_order_relaxed) == write_pos_) return;
  // seq_cst store then load, against the consumer's store of sleeping_ then load of published_:
  // either we see it asleep and wake it, or it sees the new frames before it sleeps.
  published_.store(write_pos_, std::memory_order_seq_cst);
  if (sleeping_.load(std::memory_order_seq_cst)) {
    sleeping_.store(0, std::memory_order_seq_cst);
    futex(&sleeping_, FUTEX_WAKE_PRIVATE, 1);
  }
}

// No polling here: spinning, even yielding, for the next batch measured slower (it takes the CPU
// from the receiving host's stack and the datapath); the datapath thread polls instead (see
// keel_switch_main.cc), and wakes us only when a flush finds us asleep.
void TransmitThread::wait_for_frames(uint64_t head) {
  sleeping_.store(1, std::memory_order_seq_cst);
  while (published_.load(std::memory_order_seq_cst) == head && !stop_.load(std::memory_order_seq_cst))
    futex(&sleeping_, FUTEX_WAIT_PRIVATE, 1);  // returns at once if the producer already cleared it
  sleeping_.store(0, std::memory_order_relaxed);
}

// The socket buffer is full of frames still on their way: wait (here, not on the datapath) until
// there is room, for a while. The ring keeps filling meanwhile, and drops only when it is full.
bool TransmitThread::wait_writable() {
  pollfd p{fd_, POLLOUT, 0};
  return !stop_.load(std::memory_order_relaxed) && poll(&p, 1, 100) == 1 && (p.revents & POLLOUT);
}

void TransmitThread::run() {
  mmsghdr msgs[kBatch]{};
  iovec iovs[kBatch];
  uint64_t head = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    uint64_t tail = published_.load(std::memory_order_acquire);
    if (tail == head) {
      wait_for_frames(head);
      continue;
    }
    // Gather up to kBatch records, each sent straight from the ring.
    size_t n = 0, bytes = 0;
    uint64_t pos = head;
    while (pos != tail && n < kBatch) {
      size_t offset = pos & mask_;
      const auto* rec = reinterpret_cast<const Record*>(ring_.get() + offset);
      if (rec->len == kWrap) {
        pos += size_ - offset;
        continue;
      }
      iovs[n] = {const_cast<uint8_t*>(ring_.get() + offset + sizeof(Record)), rec->len};
      msgs[n].msg_hdr.msg_iov = &iovs[n];
      msgs[n].msg_hdr.msg_iovlen = 1;
      bytes += rec->len - prefix_len_;
      pos += record_size(rec->len);
      ++n;
    }
    size_t done = 0;
    while (done < n) {
      int sent = sendmmsg(fd_, msgs + done, unsigned(n - done), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (sent < 0 && (errno == EAGAIN || errno == ENOBUFS) && wait_writable()) continue;
      if (sent <= 0) {
        // Link down, or the socket buffer stayed full: drop the rest of the batch, not stall the port.
        failed_.fetch_add(n - done, std::memory_order_relaxed);
        for (size_t i = done; i < n; ++i) bytes -= iovs[i].iov_len - prefix_len_;
        break;
      }
      done += size_t(sent);
    }
    sent_packets_.fetch_add(done, std::memory_order_relaxed);
    sent_bytes_.fetch_add(bytes, std::memory_order_relaxed);
    head = pos;
    consumed_.store(head, std::memory_order_release);
  }
}

}  // namespace keel::sw
