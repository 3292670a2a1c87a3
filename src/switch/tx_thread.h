// TransmitThread: sends a port's frames from a thread of its own.
//
// Sending on a veth (or a tap) runs the receiving side's network stack inside our send call: for a
// host behind the port, its whole TCP receive path (or, for ACKs, the sender's ACK processing and its
// next transmissions) runs on the thread that calls sendmmsg. With one datapath thread doing that
// for every port, that thread is the bottleneck while the other cores sit idle. A transmit thread
// per port moves that work off the datapath thread, so the receive path of one host, the ACK path of
// the other and the datapath itself run in parallel.
//
// The datapath thread (the only producer) copies frames into a single-producer single-consumer byte
// ring and publishes them at flush(); the transmit thread (the only consumer) sends them in batches
// with sendmmsg straight from the ring, and sleeps on a futex when the ring is empty. When the
// sleeping transmit thread last ran on the datapath's own CPU (no CPU to spare), the datapath sends
// the batch itself instead of waking it (see publish()). The frames'
// order is kept. A full socket buffer makes the transmit thread wait; a full ring drops the frame
// (counted), as a full NIC queue would: the datapath never blocks on a slow receiver.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

namespace keel::sw {

class TransmitThread {
public:
  // Sends with sendmmsg(fd, ...); every message is `prefix` (prefix_len bytes, e.g. a virtio-net
  // header) followed by the frame. `name` names the thread (shortened to 15 characters).
  TransmitThread(int fd, size_t prefix_len, const std::string& name, size_t ring_bytes = 4u << 20);
  ~TransmitThread();
  TransmitThread(const TransmitThread&) = delete;
  TransmitThread& operator=(const TransmitThread&) = delete;

  // Datapath thread: queues one message (prefix, then the frame in up to two pieces). False when the
  // ring is full (the caller counts the drop). Not visible to the transmit thread until publish().
  bool push(const void* prefix, const uint8_t* a, size_t a_len, const uint8_t* b = nullptr, size_t b_len = 0);
  // Datapath thread: hands everything pushed so far to the transmit thread, waking it if it sleeps.
  void publish();

  // Datapath thread: true when everything pushed has been sent (the transmit thread is idle).
  bool drained() const { return consumed_.load(std::memory_order_acquire) == write_pos_; }

  // Any thread: what the transmit thread has sent or failed to send so far.
  uint64_t sent_packets() const { return sent_packets_.load(std::memory_order_relaxed); }
  uint64_t sent_bytes() const { return sent_bytes_.load(std::memory_order_relaxed); }
  uint64_t send_failures() const { return failed_.load(std::memory_order_relaxed); }

  // Whether ports should use transmit threads: set once at start-up (keel-switch --tx-threads).
  static void set_enabled(bool on);
  static bool enabled();

private:
  // A record in the ring: this header, the prefix, the frame; padded to a cache line. A record with
  // len == kWrap says "continue at the start of the ring".
  struct Record {
    uint32_t len;  // prefix + frame bytes that follow
    uint32_t pad;
  };
  static constexpr uint32_t kWrap = 0xffffffffu;
  static constexpr size_t kAlign = 64, kBatch = 64;
  static constexpr unsigned kWakeEvery = 4;

  void run();
  // Sleeps until the producer publishes past `head` or stop() is asked.
  void wait_for_frames(uint64_t head);
  bool wait_writable();
  uint64_t send_records(uint64_t from, uint64_t to, bool may_wait);
  static size_t record_size(size_t payload) { return (sizeof(Record) + payload + kAlign - 1) & ~(kAlign - 1); }

  int fd_;
  size_t prefix_len_;
  size_t size_, mask_;
  std::unique_ptr<uint8_t[], void (*)(void*)> ring_;

  // Producer-side state (datapath thread only).
  uint64_t write_pos_ = 0;    // end of pushed records
  uint64_t head_cache_ = 0;   // the consumer's position when we last looked
  unsigned publishes_ = 0;    // counts publish() calls, for kWakeEvery

  // Shared. Each on its own cache line: the two threads write different ones.
  alignas(64) std::atomic<uint64_t> published_{0};  // end of records the consumer may send
  alignas(64) std::atomic<uint64_t> consumed_{0};   // end of records sent (their space is free)
  alignas(64) std::atomic<uint32_t> sleeping_{0};   // futex word: 1 while the consumer waits
  std::atomic<int> last_cpu_{-1};                   // where the consumer went to sleep
  std::atomic<bool> stop_{false};
  alignas(64) std::atomic<uint64_t> sent_packets_{0}, sent_bytes_{0}, failed_{0};

  std::thread thread_;
};

}  // namespace keel::sw
