// SyntheticFrontend: plays QEMU and the guest's virtio-net driver against a vhost-user back-end, so
// tests and benchmarks can drive the back-end without a VM.
//
// It creates the guest memory as a memfd (optionally split in two regions with a gap in
// guest-physical space and a non-zero mmap_offset, as QEMU does around the PCI hole), reports made-up
// front-end virtual addresses (so a back-end that used raw pointers would fail), lays out split
// virtqueues, speaks vhost-user over the socket and posts transmit frames and receive buffers like
// a guest driver. Raw accessors let tests corrupt rings and send malformed messages.
//
// Not thread-safe; one thread drives it. When the back-end runs on the same thread, set_pump() gives
// a callback run while waiting for a reply.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/mapping.h"
#include "base/result.h"
#include "base/unique_fd.h"
#include "vhost/message.h"
#include "vhost/virtqueue.h"

namespace keel::vhost::testing {

struct FrontendOptions {
  size_t memory_size = 16 << 20;
  bool split_memory = false;  // two regions, a gap between them in guest-physical space
  uint64_t guest_phys_base = 0x100000;
  uint64_t user_addr_base = 0x7f1200000000;  // what we claim our mapping's address is
  uint16_t queue_pairs = 1;
  uint16_t queue_size = 256;
  uint32_t buffer_size = 2048;  // per descriptor buffer
  // Features we accept if offered (the handshake acks offered & wanted).
  uint64_t wanted_features = ~0ull;
  bool protocol_features = true;
  bool reply_ack = true;
  bool log_shmfd = true;  // ack VHOST_USER_PROTOCOL_F_LOG_SHMFD if offered
};

enum class TxLayout {
  Single,       // header and frame in one descriptor
  SplitHeader,  // header descriptor, then frame descriptor
  Indirect,     // one indirect descriptor pointing at [header, frame]
  Scattered,    // header, then the frame cut in 3 descriptors
};

class SyntheticFrontend {
public:
  // Connects to a back-end listening at `path` (back-end in server mode).
  static Result<std::unique_ptr<SyntheticFrontend>> connect(const std::string& path, FrontendOptions options);
  // Listens at `path` (back-end in client mode); call accept() once the back-end connects.
  static Result<std::unique_ptr<SyntheticFrontend>> listen(const std::string& path, FrontendOptions options);
  Result<void> accept(int timeout_ms = 5000);
  ~SyntheticFrontend();

  void set_pump(std::function<void()> pump) { pump_ = std::move(pump); }

  // --- vhost-user (the QEMU side) ---
  // The whole start-up sequence QEMU runs: features, protocol features, owner, memory table, rings.
  Result<void> start();
  // Sends one message; waits for the reply if `want_reply`, returning its payload.
  Result<std::vector<uint8_t>> request(Request request, std::span<const uint8_t> payload = {},
                                       std::span<const int> fds = {}, bool want_reply = false,
                                       bool need_reply_flag = false);
  // Sends raw bytes (any header, any payload) with optional fds; for hostile-message tests.
  Result<void> send_raw(std::span<const uint8_t> bytes, std::span<const int> fds = {});
  // Round trip (GET_FEATURES): everything sent before has been handled when it returns.
  Result<void> sync();
  Result<uint64_t> get_features();
  Result<uint16_t> get_vring_base(uint32_t index);
  Result<void> set_vring_enable(uint32_t index, bool enabled);
  // Configures a stopped ring again (as QEMU does when the device restarts): NUM, BASE, ADDR,
  // KICK, CALL, ENABLE.
  Result<void> restart_queue(uint32_t index, uint16_t base);
  // Live migration, as QEMU does it: SET_LOG_BASE with the log's fd (waits for the empty reply)...
  Result<void> set_log_base(int fd, uint64_t size, uint64_t offset = 0);
  // ...then SET_FEATURES with VHOST_F_LOG_ALL (REPLY_ACK'ed) and SET_VRING_ADDR of every ring with
  // VHOST_VRING_F_LOG and the used ring's guest-physical address; `false` undoes both.
  Result<void> set_logging(bool on);
  // True if the back-end closed the connection.
  bool peer_closed();
  uint64_t acked_features() const { return acked_features_; }
  uint64_t acked_protocol_features() const { return acked_protocol_; }
  uint64_t backend_queue_num() const { return backend_queue_num_; }
  size_t header_size() const;

  // --- guest driver ---
  // Posts `count` receive buffers (or as many as free descriptors allow) on pair's RX queue.
  size_t post_rx_buffers(uint16_t pair, size_t count = ~size_t{0});
  // Queues a frame on pair's TX queue; false if the ring is full. Does not kick. `header` (the
  // virtio-net header's wire bytes, header_size() of them) replaces the default empty header.
  bool transmit(uint16_t pair, std::span<const uint8_t> frame, TxLayout layout = TxLayout::Single,
                std::span<const uint8_t> header = {});
  // Kicks the queue (respecting EVENT_IDX suppression unless `force`). Returns whether it kicked.
  bool kick(uint32_t queue, bool force = false);
  // Frees transmit descriptors the back-end has used. Returns how many frames completed.
  size_t reclaim_tx(uint16_t pair);
  // Reads frames the back-end wrote into pair's RX queue, re-posting their buffers.
  size_t receive(uint16_t pair, const std::function<void(std::span<const uint8_t>)>& on_frame);
  // The same, also handing out each frame's virtio-net header (header_size() wire bytes).
  size_t receive_with_header(
      uint16_t pair, const std::function<void(std::span<const uint8_t> header, std::span<const uint8_t> frame)>& on_frame);
  // Free descriptors on a queue.
  size_t free_descriptors(uint32_t queue) const;
  // Reads (and resets) the call eventfd counter of a queue: how often the back-end interrupted us.
  uint64_t take_calls(uint32_t queue);
  uint64_t kicks_sent() const { return kicks_sent_; }

  // --- raw guest memory, for hostile tests ---
  VringDesc* desc_table(uint32_t queue);
  uint16_t* avail_ring(uint32_t queue);  // flags, idx, ring[], used_event
  uint8_t* used_ring(uint32_t queue);
  uint64_t used_ring_gpa(uint32_t queue) const { return queues_[queue].used_gpa; }
  // Puts a descriptor head on the avail ring and publishes it (no kick).
  void publish_avail(uint32_t queue, uint16_t head);
  // A scratch area of guest memory: returns its guest-physical address; host pointer via host().
  uint64_t alloc(size_t size, size_t align = 16);
  uint8_t* host(uint64_t gpa);
  uint64_t memory_end_gpa() const;
  int call_fd(uint32_t queue) const;
  int err_fd(uint32_t queue) const;
  uint32_t queue_size() const { return options_.queue_size; }
  // The memory table as sent (for tests that re-send it altered).
  std::vector<MemRegionDesc> memory_regions() const { return regions_; }
  int memory_fd() const { return memfd_.get(); }
  int socket_fd() const { return sock_.get(); }

private:
  struct Queue {
    uint64_t desc_gpa = 0, avail_gpa = 0, used_gpa = 0;
    uint64_t buffers_gpa = 0;  // buffer of descriptor i at buffers_gpa + i * buffer_size
    uint64_t indirect_gpa = 0; // per-head indirect table (4 entries)
    std::vector<uint16_t> free;  // free descriptor indexes
    std::vector<std::vector<uint16_t>> chain_of;  // per head: descriptors used (direct)
    uint16_t avail_idx = 0;
    uint16_t last_used = 0;
    uint16_t kicked_at = 0;  // avail idx at the last kick
    UniqueFd kick, call, err;
  };

  explicit SyntheticFrontend(FrontendOptions options);
  Result<void> setup_memory();
  void setup_queues();
  Result<std::vector<uint8_t>> read_reply(uint32_t request);
  uint64_t gpa_of(size_t offset) const;
  uint64_t uva_of(uint64_t gpa) const;
  uint64_t buffer_gpa(const Queue& q, uint16_t desc) const {
    return q.buffers_gpa + uint64_t{desc} * options_.buffer_size;
  }
  bool event_idx() const;

  FrontendOptions options_;
  UniqueFd sock_;
  UniqueFd listen_;
  std::string listen_path_;
  UniqueFd memfd_;
  Mapping memory_;
  std::vector<MemRegionDesc> regions_;
  size_t alloc_offset_ = 0;
  std::vector<Queue> queues_;
  std::function<void()> pump_;
  uint64_t acked_features_ = 0;
  uint64_t acked_protocol_ = 0;
  uint64_t backend_queue_num_ = 0;
  uint64_t kicks_sent_ = 0;
};

// A test frame: Ethernet header with the given source byte, then a counter pattern.
std::vector<uint8_t> make_frame(size_t size, uint32_t seed);

// A virtio-net header's wire bytes (12, little-endian; num_buffers 0), for transmit(..., header).
std::vector<uint8_t> virtio_net_header(uint8_t flags, uint8_t gso_type, uint16_t hdr_len, uint16_t gso_size,
                                       uint16_t csum_start, uint16_t csum_offset);

}  // namespace keel::vhost::testing
