#include "switch/vhost_user_port.h"

#include <sys/un.h>

#include <array>
#include <cstring>
#include <span>
#include <utility>

#include "base/log.h"
#include "vhost/net_port.h"

namespace keel::sw {

namespace {

class VhostUserPort final : public Port {
public:
  explicit VhostUserPort(std::unique_ptr<vhost::VhostNetPort> net)
      : net_(std::move(net)), tx_buf_(new uint8_t[kTxSlots * kTxSlotSize]) {
    // Called from handle_events(), i.e. from inside receive(); the bridge asks right after.
    net_->set_link_callback([this](bool) { link_changed_ = true; });
  }

  std::string_view type() const override { return "vhostuser"; }
  // An epoll set of the connection, kick and timer fds; constant for the port's life.
  int poll_fd() const override { return net_->poll_fd(); }

  size_t receive(PacketBatch& batch) override {
    if (next_ >= rx_.size()) {
      // Frames of the previous batch are all copied out, so the ring may move on.
      if (auto r = net_->handle_events(); !r) {
        counters.rx_errors++;
        if (!reported_error_) KEEL_LOG_ERROR("vhost-user port: {}", r.error().message());
        reported_error_ = true;
      }
      net_->receive_batch(rx_);
      next_ = 0;
      sync_error_counters();
    }
    size_t added = 0;
    if (next_ == 0) super_used_ = 0;  // the bridge is done with the frames of the last batch
    // Copied, not referenced: the datapath rewrites frames in place (VLAN push, set-field) and the
    // guest may rewrite its buffers at any time.
    while (next_ < rx_.size() && batch.size() < PacketBatch::kCapacity) {
      size_t i = next_++;
      std::span<const uint8_t> frame = rx_.frame(i);
      const vhost::VirtioNetHdr& vh = rx_.header(i);
      Frame& out = batch[batch.size()];
      out.reset_to_headroom();
      // A partial checksum is finished here, since every port past this one expects complete
      // frames; a TCP super-frame's payload goes in one of our slots until the bridge asks for the
      // next batch.
      if (vh.gso_type != vhost::kVirtioNetHdrGsoNone && !super_slots_)
        super_slots_.reset(new uint8_t[PacketBatch::kCapacity * kSuperPayloadMax]);
      uint8_t* slot = super_slots_ ? super_slots_.get() + super_used_ * kSuperPayloadMax : nullptr;
      if (!take_offloaded_frame(out, frame.data(), frame.size(), vh, slot)) {
        counters.rx_errors++;
        continue;
      }
      if (out.is_super()) ++super_used_;
      batch.set_size(batch.size() + 1);
      ++added;
    }
    // Give the guest its transmit buffers back as soon as the frames are ours.
    if (next_ >= rx_.size()) net_->release();
    return added;
  }

  // Frames to the guest are staged (a copy: the datapath may rewrite the frame after this output)
  // and delivered by flush() with one ring update and at most one guest notification per batch.
  void send(const uint8_t* frame, size_t len) override {
    if (!net_->link_up() || len > kTxSlotSize) {
      counters.tx_dropped++;
      return;
    }
    if (staged_ == kTxSlots) flush();
    uint8_t* slot = tx_buf_.get() + staged_ * kTxSlotSize;
    std::memcpy(slot, frame, len);
    staged_frames_[staged_++] = std::span<const uint8_t>(slot, len);
  }

  void flush() override {
    if (staged_ == 0) return;
    uint64_t bytes_before = net_->counters().tx_bytes;
    size_t delivered = net_->send_batch(std::span<const std::span<const uint8_t>>(staged_frames_.data(), staged_));
    counters.tx_packets += delivered;
    counters.tx_bytes += net_->counters().tx_bytes - bytes_before;
    counters.tx_dropped += staged_ - delivered;
    staged_ = 0;
  }

  // A TCP super-frame goes to a guest that negotiated segmentation offload whole, behind a header
  // that describes it (its checksum field holds the pseudo-header sum: a partial checksum); other
  // guests get it cut into segments (Port::send_frame).
  void send_frame(const Frame& f) override {
    if (!f.is_super() || !net_->guest_accepts(f.offload.gso_type)) {
      Port::send_frame(f);
      return;
    }
    if (!net_->link_up()) {
      counters.tx_dropped++;
      return;
    }
    flush();  // frames staged before it reach the guest before it
    if (net_->send_offloaded(super_frame_vnet_header(f), {f.data, f.len}, {f.payload, f.payload_len})) {
      counters.tx_packets++;
      counters.tx_bytes += f.wire_len();
    } else {
      counters.tx_dropped++;
    }
  }

  bool link_up() const override { return net_->link_up(); }
  bool has_pending() const override { return next_ < rx_.size(); }
  bool take_link_changed() override { return std::exchange(link_changed_, false); }

private:
  static constexpr size_t kTxSlots = PacketBatch::kCapacity;
  static constexpr size_t kTxSlotSize = Frame::kBufferSize;

  // Frames the guest sent that were too short or too long, and rings the guest broke, are receive
  // errors of this port.
  void sync_error_counters() {
    const vhost::NetCounters& k = net_->counters();
    counters.rx_errors += (k.rx_dropped - seen_rx_dropped_) + (k.device_errors - seen_device_errors_);
    seen_rx_dropped_ = k.rx_dropped;
    seen_device_errors_ = k.device_errors;
  }

  std::unique_ptr<vhost::VhostNetPort> net_;
  vhost::RxBatch rx_;
  size_t next_ = 0;  // first frame of rx_ not yet copied into a PacketBatch
  std::unique_ptr<uint8_t[]> tx_buf_;
  // Payloads of the super-frames of the current batch (allocated at the first one: 2 MB).
  std::unique_ptr<uint8_t[]> super_slots_;
  size_t super_used_ = 0;
  std::array<std::span<const uint8_t>, kTxSlots> staged_frames_{};
  size_t staged_ = 0;
  bool link_changed_ = false;
  bool reported_error_ = false;
  uint64_t seen_rx_dropped_ = 0;
  uint64_t seen_device_errors_ = 0;
};

static_assert(vhost::RxBatch::kMaxFrames <= PacketBatch::kCapacity,
              "one vhost batch fits one PacketBatch, so a readiness event rarely leaves frames behind");

}  // namespace

Result<std::unique_ptr<Port>> open_vhost_user_port(const VhostUserPortOptions& options) {
  sockaddr_un addr{};
  if (options.socket_path.empty() || options.socket_path.size() >= sizeof addr.sun_path)
    return fail_invalid("vhost-user socket path '{}' must be 1-{} bytes", options.socket_path,
                        sizeof addr.sun_path - 1);
  vhost::VhostNetOptions net_options;
  net_options.socket_path = options.socket_path;
  net_options.mode = options.mode == VhostSocketMode::Server ? vhost::SocketMode::Server : vhost::SocketMode::Client;
  net_options.queue_pairs = options.queue_pairs;
  net_options.offloads = options.offloads;
  auto net = TRY_CTX(vhost::VhostNetPort::create(std::move(net_options)), "vhost-user " + options.socket_path);
  return std::unique_ptr<Port>(new VhostUserPort(std::move(net)));
}

}  // namespace keel::sw
