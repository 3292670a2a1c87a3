#include "switch/tx_thread.h"

#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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
  uint64_t published = published_.load(std::memory_order_relaxed);
  if (published == write_pos_) return;
  // The transmit thread sleeps, with nothing left to send, and last ran on this CPU: waking it
  // would only make the two threads take turns on one CPU, each wake-up a context switch (a 64-byte
  // flood, which leaves no CPU idle, measured ~15% slower that way, and at times half as fast).
  // Send here instead. The sleeping thread touches neither the ring nor consumed_ until published_
  // moves, and it moves last. Every kWakeEvery-th publish wakes the thread all the same, so the
  // scheduler can place it on a CPU that has become idle (TCP, which leaves CPU idle, measured
  // ~2.1 Gb/s without these wake-ups, ~2.6 with one in four).
  if (++publishes_ % kWakeEvery != 0 && sleeping_.load(std::memory_order_seq_cst) &&
      consumed_.load(std::memory_order_acquire) == published &&
      sched_getcpu() == last_cpu_.load(std::memory_order_relaxed)) {
    uint64_t sent = send_records(published, write_pos_, false);
    consumed_.store(sent, std::memory_order_release);
    if (sent == write_pos_) {
      published_.store(write_pos_, std::memory_order_release);
      return;
    }
    // The socket buffer is full: the transmit thread waits for room and sends the rest.
  }
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
  last_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
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

// Sends the records in [from, to) in batches of up to kBatch; returns how far it got. On the
// transmit thread (`may_wait`), a full socket buffer is waited for, and it gets to `to`. On the
// datapath's (not `may_wait`), it stops at a full socket buffer and returns where, so the transmit
// thread takes over the rest: the datapath never blocks.
uint64_t TransmitThread::send_records(uint64_t from, uint64_t to, bool may_wait) {
  mmsghdr msgs[kBatch]{};
  iovec iovs[kBatch];
  uint64_t ends[kBatch];  // where each message's record ends in the ring
  uint64_t pos = from;
  while (pos != to) {
    const uint64_t batch_start = pos;
    size_t n = 0;
    while (pos != to && n < kBatch) {
      size_t offset = pos & mask_;
      const auto* rec = reinterpret_cast<const Record*>(ring_.get() + offset);
      if (rec->len == kWrap) {
        pos += size_ - offset;
        continue;
      }
      iovs[n] = {const_cast<uint8_t*>(ring_.get() + offset + sizeof(Record)), rec->len};
      msgs[n].msg_hdr.msg_iov = &iovs[n];
      msgs[n].msg_hdr.msg_iovlen = 1;
      pos += record_size(rec->len);
      ends[n++] = pos;
    }
    size_t done = 0, dropped = 0;
    while (done + dropped < n) {
      int sent = sendmmsg(fd_, msgs + done, unsigned(n - done), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (sent > 0) {
        done += size_t(sent);
        continue;
      }
      bool full = sent < 0 && (errno == EAGAIN || errno == ENOBUFS);
      if (full && !may_wait) {
        pos = done ? ends[done - 1] : batch_start;
        break;
      }
      if (full && wait_writable()) continue;
      // Link down, or the socket buffer stayed full: drop the rest of the batch, not stall the port.
      dropped = n - done;
    }
    uint64_t bytes = 0;
    for (size_t i = 0; i < done; ++i) bytes += iovs[i].iov_len - prefix_len_;
    sent_packets_.fetch_add(done, std::memory_order_relaxed);
    sent_bytes_.fetch_add(bytes, std::memory_order_relaxed);
    failed_.fetch_add(dropped, std::memory_order_relaxed);
    if (done + dropped < n) break;  // stopped at a full socket buffer
  }
  return pos;
}

void TransmitThread::run() {
  while (!stop_.load(std::memory_order_relaxed)) {
    // published_ before consumed_: the datapath, when it sent frames itself, moved consumed_ first.
    uint64_t tail = published_.load(std::memory_order_acquire);
    uint64_t head = consumed_.load(std::memory_order_acquire);
    if (tail == head) {
      wait_for_frames(head);
      continue;
    }
    consumed_.store(send_records(head, tail, true), std::memory_order_release);
  }
}

}  // namespace keel::sw
