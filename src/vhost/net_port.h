// VhostNetPort: a virtio-net device on a vhost-user socket, shaped for a switch datapath.
//
// Queue pair k is virtqueue 2k (the guest's receive queue: we write frames into it) and 2k+1 (the
// guest's transmit queue: we read frames from it). The device offers VERSION_1, MRG_RXBUF,
// EVENT_IDX, INDIRECT_DESC, MQ (when more than one pair) and STATUS. Every frame carries a
// virtio_net_hdr (12 bytes with VERSION_1 or MRG_RXBUF, else 10).
//
// Without `offloads` every frame crossing the port is a plain, complete Ethernet frame: the port
// strips the header on receive and sends an empty one. With `offloads` the device also offers
// checksum and TCP segmentation offload both ways (CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6), as
// QEMU's vhost-net does: the guest may then send frames with a partial checksum (NEEDS_CSUM) and
// TCP super-frames of up to 64 KB (gso_type/gso_size), and a caller may send it the same through
// send_offloaded(). Receivers get each frame's header (RxBatch::header) and must finish or cut
// such frames themselves; the header comes from the guest and is not checked here.
//
// Naming follows the switch: receive = frames *from* the guest, send = frames *to* the guest.
//
// Polling model (single thread, no locks, no allocation per frame):
//   epoll on poll_fd(); when it is readable, or whenever convenient:
//     port.handle_events();                       // control messages, kicks
//     while (port.receive_batch(batch) == RxBatch::kMaxFrames) { forward(batch); }
//     ... port.send(frame) / port.send_batch(frames) from other ports ...
// Frames in an RxBatch point into guest memory (or into the port's scratch space for frames the
// guest scattered over several buffers) and stay valid until the next receive_batch(),
// handle_events() or release() on the same port. The guest may rewrite its buffers at any time:
// copy what you parse before you act on it.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "base/result.h"
#include "vhost/backend.h"
#include "vhost/virtio_net_hdr.h"
#include "vhost/virtqueue.h"

namespace keel::vhost {

// virtio-net feature bits (virtio 1.x, 5.1.3).
inline constexpr int kVirtioNetFCsum = 0;
inline constexpr int kVirtioNetFGuestCsum = 1;
inline constexpr int kVirtioNetFMtu = 3;
inline constexpr int kVirtioNetFMac = 5;
inline constexpr int kVirtioNetFGuestTso4 = 7;
inline constexpr int kVirtioNetFGuestTso6 = 8;
inline constexpr int kVirtioNetFGuestEcn = 9;
inline constexpr int kVirtioNetFHostTso4 = 11;
inline constexpr int kVirtioNetFHostTso6 = 12;
inline constexpr int kVirtioNetFMrgRxbuf = 15;
inline constexpr int kVirtioNetFStatus = 16;
inline constexpr int kVirtioNetFCtrlVq = 17;
inline constexpr int kVirtioNetFMq = 22;

// Largest frame (without the virtio-net header) the port passes either way: a TCP super-frame's
// IP packet is at most 64 KB, and without offloads anything longer is malformed anyway.
inline constexpr size_t kMaxFrameSize = 65535;

struct VhostNetOptions {
  // Empty in server mode: no socket; connections come through backend().attach_connection().
  std::string socket_path;
  SocketMode mode = SocketMode::Server;
  uint16_t queue_pairs = 1;  // 1..128
  bool mergeable_rx_buffers = true;
  // Offer checksum and TCP segmentation offloads (see above).
  bool offloads = false;
  std::chrono::milliseconds reconnect_interval{100};
};

struct NetCounters {
  uint64_t rx_frames = 0;           // received from the guest
  uint64_t rx_bytes = 0;
  uint64_t rx_dropped = 0;          // guest frames too short/long, dropped
  uint64_t tx_frames = 0;           // sent to the guest
  uint64_t tx_bytes = 0;
  uint64_t tx_dropped_no_buffers = 0;  // the guest had not posted enough receive buffers
  uint64_t tx_dropped_link_down = 0;   // no ready receive queue
  uint64_t tx_dropped_too_big = 0;
  uint64_t guest_notifications = 0;  // call eventfd signals
  uint64_t device_errors = 0;        // queues broken by malformed rings
};

class VhostNetPort;

// Frames received from the guest by one receive_batch() call.
class RxBatch {
public:
  static constexpr size_t kMaxFrames = 32;

  size_t size() const { return count_; }
  bool empty() const { return count_ == 0; }
  std::span<const uint8_t> frame(size_t i) const { return frames_[i].data; }
  uint16_t queue_pair(size_t i) const { return frames_[i].queue_pair; }
  // The frame's virtio-net header as the guest wrote it, fields in host byte order (num_buffers 0).
  // With offloads off, whatever the guest wrote is ignored and this is all zeros.
  const VirtioNetHdr& header(size_t i) const { return frames_[i].header; }
  // True when receive_batch() stopped for lack of room rather than because the guest's transmit
  // queues were empty: call it again (kicks stay suppressed until the port catches up). poll_fd()
  // is kept readable meanwhile, so a loop that only runs on readiness does not stall either.
  bool more() const { return more_; }

private:
  friend class VhostNetPort;
  struct Entry {
    std::span<const uint8_t> data;
    uint16_t queue_pair;
    VirtioNetHdr header;
  };
  std::array<Entry, kMaxFrames> frames_{};
  size_t count_ = 0;
  bool more_ = false;
};

class VhostNetPort final : private VhostDevice {
public:
  static Result<std::unique_ptr<VhostNetPort>> create(VhostNetOptions options);
  ~VhostNetPort() override;

  // An epoll fd: readable when handle_events() has work (connection, control message, kick).
  int poll_fd() const { return backend_->poll_fd(); }
  // Completes held frames, then handles pending control messages and kicks. Never blocks.
  Result<void> handle_events();
  // handle_events() after waiting up to `timeout` for poll_fd().
  Result<void> wait_and_handle(std::chrono::milliseconds timeout);

  // Fills `batch` with up to RxBatch::kMaxFrames frames the guest transmitted, across all active
  // queue pairs (round robin); first gives back the frames of the previous batch. Returns the count.
  size_t receive_batch(RxBatch& batch);
  // Gives the frames of the last batch back to the guest now.
  void release();

  // Copies `frame` (an Ethernet frame, no virtio header) into the guest's receive queue of
  // `queue_pair` (modulo the active pairs) and notifies it. Returns false if it was dropped.
  bool send(std::span<const uint8_t> frame, uint16_t queue_pair = 0);
  // The same for many frames with one guest notification; returns how many were delivered.
  size_t send_batch(std::span<const std::span<const uint8_t>> frames, uint16_t queue_pair = 0);
  // Sends one frame, `head` then `payload` (either may be empty), behind `header` (host byte order;
  // num_buffers is filled in): a frame with a partial checksum or a TCP super-frame, for a guest
  // that negotiated the matching offload (see guest_accepts()). Notifies the guest.
  bool send_offloaded(const VirtioNetHdr& header, std::span<const uint8_t> head, std::span<const uint8_t> payload,
                      uint16_t queue_pair = 0);
  // Whether the guest accepts a super-frame of this gso_type (ECN bit included) with a partial
  // checksum: it negotiated GUEST_CSUM and the matching GUEST_TSO4/6 (and GUEST_ECN for the bit).
  bool guest_accepts(uint8_t gso_type) const;
  // Whether the guest may send partial checksums and super-frames (we offered and it acked CSUM).
  bool host_offloads() const { return (negotiated_features() & (1ull << kVirtioNetFCsum)) != 0; }

  // Up when the front-end is connected and queue pair 0 runs in both directions.
  bool link_up() const { return link_up_; }
  // Called (from handle_events) when link_up() changes.
  void set_link_callback(std::function<void(bool up)> callback) { link_callback_ = std::move(callback); }
  // Queue pairs whose two rings both run.
  uint16_t active_queue_pairs() const { return active_pairs_; }
  uint16_t max_queue_pairs() const { return options_.queue_pairs; }
  uint64_t negotiated_features() const { return backend_->features(); }
  const NetCounters& counters() const { return counters_; }
  const BackendCounters& backend_counters() const { return backend_->counters(); }
  bool connected() const { return backend_->connected(); }
  // The generic backend, for tests and diagnostics.
  VhostUserBackend& backend() { return *backend_; }

private:
  explicit VhostNetPort(VhostNetOptions options);

  // VhostDevice
  uint64_t device_features() const override;
  uint32_t max_queues() const override { return 2u * options_.queue_pairs; }
  void on_features(uint64_t features) override;
  bool supports_dirty_log() const override { return true; }
  void on_queue_ready(uint32_t index, bool ready) override;
  void quiesce() override { release(); }
  void on_disconnect() override;

  void update_link();
  bool send_one(VirtQueue& q, const VirtioNetHdr& header, std::span<const uint8_t> head,
                std::span<const uint8_t> payload);
  VirtQueue* send_queue(uint16_t queue_pair, size_t frames);
  void finish_send(VirtQueue& q);
  void count_broken(VirtQueue& q);

  VhostNetOptions options_;
  std::unique_ptr<VhostUserBackend> backend_;
  size_t header_size_ = sizeof(VirtioNetHdr);
  bool mergeable_ = false;
  bool link_up_ = false;
  uint16_t active_pairs_ = 0;
  uint16_t next_rx_pair_ = 0;
  std::function<void(bool)> link_callback_;
  NetCounters counters_;

  // Chains of the current batch, returned to the guest on release().
  struct HeldChain {
    uint16_t queue;
    uint16_t head;
  };
  // Dropped frames are held too so chains complete in order; a batch pops at most this many.
  static constexpr size_t kMaxHeld = 4 * RxBatch::kMaxFrames;
  std::array<HeldChain, kMaxHeld> held_{};
  size_t held_count_ = 0;
  // Where frames scattered over several guest buffers are gathered (allocated once).
  static constexpr size_t kScratchSize = 256 * 1024;
  std::unique_ptr<uint8_t[]> scratch_;
  // One chain being walked; kept here since it is 4 KiB.
  DescChain chain_;
  // Per-send: the chains one merged frame spans. A frame needing more buffers is dropped.
  static constexpr size_t kMaxMergedBuffers = 256;
  std::array<uint16_t, kMaxMergedBuffers> merge_heads_{};
  std::array<uint32_t, kMaxMergedBuffers> merge_lens_{};
};

}  // namespace keel::vhost
