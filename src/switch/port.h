// Port: what the datapath needs from anything that carries frames (a tap, an AF_PACKET socket on a
// veth or uplink, a QEMU stream/dgram socket, a vhost-user virtio-net device). The datapath polls
// poll_fd(), pulls frames in batches with receive() and pushes frames with send(); flush() ends a
// batch so ports that queue transmissions (sendmmsg, a virtqueue kick) can send them at once.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "switch/packet.h"

namespace keel::sw {

struct PortCounters {
  uint64_t rx_packets = 0, rx_bytes = 0, rx_dropped = 0, rx_errors = 0;
  uint64_t tx_packets = 0, tx_bytes = 0, tx_dropped = 0, tx_errors = 0;
};

// A batch of frames with preallocated buffers: the datapath reuses one per thread, so receiving
// never allocates.
class PacketBatch {
public:
  static constexpr size_t kCapacity = 32;
  PacketBatch();
  Frame& operator[](size_t i) { return frames_[i]; }
  size_t size() const { return count_; }
  void set_size(size_t n) { count_ = n; }
  void reset() {
    count_ = 0;
    for (auto& f : frames_) f.reset_to_headroom();
  }

private:
  std::unique_ptr<uint8_t[]> storage_;
  std::array<Frame, kCapacity> frames_;
  size_t count_ = 0;
};

using MacAddress = std::array<uint8_t, 6>;
std::string format_mac(const MacAddress& mac);

class Port {
public:
  virtual ~Port() = default;
  virtual std::string_view type() const = 0;
  // The fd to wait on for received frames, or -1 for ports that must be polled.
  virtual int poll_fd() const = 0;
  // Appends received frames to the batch (up to its capacity); returns how many it added.
  virtual size_t receive(PacketBatch& batch) = 0;
  virtual void send(const uint8_t* frame, size_t len) = 0;
  // Sends a frame as the datapath holds it: ports that take TCP super-frames (segmentation offload)
  // override this; the default cuts them into ordinary frames for send().
  virtual void send_frame(const Frame& frame);
  virtual void flush() {}
  virtual bool link_up() const { return true; }
  virtual MacAddress mac() const { return {}; }
  // True when the port holds received frames beyond what the last receive() returned (it cut a
  // large frame into several): the datapath calls receive() again without waiting for poll_fd().
  virtual bool has_pending() const { return false; }
  // True (once) when poll_fd() changed since the last call, e.g. a socket port accepted its peer.
  virtual bool take_poll_fd_changed() { return false; }
  // True (once) when link_up() changed during the last receive() (a vhost-user guest connected or
  // went away), so the bridge reports it at once instead of at its next once-a-second check.
  virtual bool take_link_changed() { return false; }
  // Brings `counters` up to date where another thread counts (a transmit thread); call before reading.
  virtual void sync_counters() {}

  PortCounters counters;
};

// A tap device (created if absent). `internal` ports are taps brought up as the host's view of the
// bridge (OpenFlow LOCAL).
enum class LinkState { Up, LeaveDown };
// A Persistent tap outlives keel-switch (a crash, a restart), as Open vSwitch's internal ports outlive
// ovs-vswitchd: the host's addresses and routes on it, and a dnsmasq bound to it, stay while the
// switch restarts, and the restarted switch attaches to the same device. delete_persistent_tap()
// removes it when its port is deleted for good.
enum class TapLifetime { WithPort, Persistent };
Result<std::unique_ptr<Port>> open_tap_port(const std::string& ifname, LinkState state = LinkState::Up,
                                            TapLifetime lifetime = TapLifetime::WithPort);
// Call after the port that held the tap is closed.
Result<void> delete_persistent_tap(const std::string& ifname);
// AF_PACKET on an existing interface (a veth end, an uplink NIC), in promiscuous mode.
Result<std::unique_ptr<Port>> open_afpacket_port(const std::string& ifname);
// A unix socket carrying QEMU's `-netdev stream` (4-byte big-endian length + frame) or `-netdev dgram`
// (one frame per datagram) framing. Listens on `path`; a stream port accepts one peer at a time.
enum class SocketFraming { Stream, Dgram };
Result<std::unique_ptr<Port>> open_socket_port(const std::string& path, SocketFraming framing);

// Interface helpers (ioctl based).
Result<MacAddress> interface_mac(const std::string& ifname);
Result<void> set_interface_up(const std::string& ifname);
Result<void> set_interface_mac(const std::string& ifname, const MacAddress& mac);
// IFF_UP and IFF_RUNNING both set.
bool interface_running(const std::string& ifname);

}  // namespace keel::sw
