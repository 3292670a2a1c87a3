// VhostUserBackend: the back-end side of a vhost-user connection, for any virtio device type.
//
// It owns the unix socket (listening as a server, or connecting to the front-end's socket as a
// client and reconnecting when the front-end goes away), decodes and answers the control messages,
// maps the guest memory table and keeps the virtqueues configured. A device (virtio-net, a block
// device...) supplies its feature bits and queue count through VhostDevice and runs the data path
// on the queues.
//
// Threading: one thread owns a backend; nothing here locks. Everything is non-blocking: poll_fd()
// is an epoll fd (usable inside another epoll or EventLoop) that becomes readable when handle_events()
// has work: a connection, a control message, a kick.
//
// A control message that breaks the protocol (bad size, bad index, unmappable memory...) closes the
// connection: the device resets, the guest sees its NIC/disk go away until the front-end reconnects.
// Guest mistakes in the rings only break the queue concerned (see VirtQueue).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "vhost/dirty_log.h"
#include "vhost/guest_memory.h"
#include "vhost/message.h"
#include "vhost/virtqueue.h"

namespace keel::vhost {

enum class SocketMode {
  Server,  // we listen on the path; QEMU connects (-chardev socket,path=...)
  Client,  // QEMU listens (-chardev socket,path=...,server=on); we connect and reconnect
};

struct BackendOptions {
  // Empty (server mode only): no socket of our own; connections come through attach_connection().
  std::string socket_path;
  SocketMode mode = SocketMode::Server;
  // Client mode: how often to retry connecting while disconnected.
  std::chrono::milliseconds reconnect_interval{100};
};

// What a device type tells the backend, and what it hears back.
class VhostDevice {
public:
  virtual ~VhostDevice() = default;
  // Virtio feature bits the device offers (the backend adds VHOST_USER_F_PROTOCOL_FEATURES).
  virtual uint64_t device_features() const = 0;
  // Number of virtqueues the device can drive.
  virtual uint32_t max_queues() const = 0;
  // The front-end acknowledged these features.
  virtual void on_features(uint64_t /*features*/) {}
  // Queue `index` became ready to run (true) or stopped (false).
  virtual void on_queue_ready(uint32_t /*index*/, bool /*ready*/) {}
  // Called before the backend changes memory or queue state from a control message, so the device
  // can finish any chains it holds (their buffers may be unmapped right after).
  virtual void quiesce() {}
  // The connection went away (the device's queues are already reset).
  virtual void on_disconnect() {}
  // Devices that mark every buffer they write for the guest in the backend's dirty_log() say so;
  // the backend then offers VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD, which QEMU needs
  // to migrate (or save) the guest. The used rings are logged by the backend's queues.
  virtual bool supports_dirty_log() const { return false; }
  // Devices whose config space lives in the back-end (vhost-user-blk: capacity, geometry...) say so
  // here; the backend then offers VHOST_USER_PROTOCOL_F_CONFIG. virtio-net leaves it to QEMU.
  virtual bool has_config() const { return false; }
  // Fills `out` with config bytes [offset, offset + out.size()) (the range is within 256 bytes).
  virtual Result<void> read_config(uint32_t /*offset*/, std::span<uint8_t> /*out*/) {
    return fail(EOPNOTSUPP, "no config space");
  }
  // The driver wrote config bytes at `offset`.
  virtual Result<void> write_config(uint32_t /*offset*/, std::span<const uint8_t> /*data*/) {
    return fail(EOPNOTSUPP, "config space is read-only");
  }
};

struct BackendCounters {
  uint64_t connections = 0;
  uint64_t disconnects = 0;
  uint64_t messages = 0;
  uint64_t protocol_errors = 0;  // connections closed because of a bad message
  uint64_t refused_requests = 0;  // unsupported requests answered with a failure
};

class VhostUserBackend {
public:
  static Result<std::unique_ptr<VhostUserBackend>> create(VhostDevice& device, BackendOptions options);
  ~VhostUserBackend();
  VhostUserBackend(const VhostUserBackend&) = delete;
  VhostUserBackend& operator=(const VhostUserBackend&) = delete;

  // Readable (EPOLLIN) when handle_events() has something to do.
  int poll_fd() const { return epoll_.get(); }
  // Does everything pending without blocking: accepts/reconnects, reads and answers control
  // messages, drains kicks. Kicked queue indexes are reported through kicked(). Fails only if epoll
  // itself fails; connection problems are handled (and logged) here.
  Result<void> handle_events();
  // Waits up to `timeout` for events, then handles them (for simple loops and tests).
  Result<void> wait_and_handle(std::chrono::milliseconds timeout);

  bool connected() const { return conn_.valid(); }
  uint64_t features() const { return features_; }
  uint64_t protocol_features() const { return protocol_features_; }
  const GuestMemory& memory() const { return memory_; }
  // The dirty-page log while the front-end has VHOST_F_LOG_ALL on (it is migrating the guest) and
  // has given one; nullptr otherwise. A device marks every guest buffer it writes in it.
  DirtyLog* dirty_log() { return active_log_; }
  VirtQueue& queue(uint32_t index) { return queues_[index]; }
  uint32_t queue_count() const { return static_cast<uint32_t>(queues_.size()); }
  const BackendCounters& counters() const { return counters_; }
  const std::string& socket_path() const { return options_.socket_path; }
  // Makes poll_fd() readable until the next handle_events(): a device that stopped early (a full
  // batch) asks to be called again even if no new kick comes.
  void wake();
  // Bitmap of queues kicked since the last call (queue i -> bit i, first 64 queues).
  uint64_t take_kicked() { return std::exchange(kicked_, 0); }

  // Drops the current connection (as if the front-end had gone away).
  void disconnect(std::string_view why);
  // Serves an already connected socket (handed over by a supervisor, or one end of a socketpair in
  // tests), replacing any current connection.
  Result<void> attach_connection(UniqueFd socket);

private:
  VhostUserBackend(VhostDevice& device, BackendOptions options);
  Result<void> start();
  Result<void> listen_socket();
  void try_connect();
  void accept_connection();
  void adopt_connection(UniqueFd fd);
  void read_messages();
  // Reads what is there of the current message; true when a whole message has arrived.
  Result<bool> read_some();
  Result<void> dispatch(const DecodedMessage& message);
  Result<void> send_reply(uint32_t request, std::span<const uint8_t> payload);
  Result<void> send_u64_reply(uint32_t request, uint64_t value);
  Result<VirtQueue*> queue_for(uint32_t index, std::string_view what);
  void reset_device();
  void update_ready_states();
  void watch_kick(uint32_t index);
  Result<void> arm_reconnect_timer(bool armed);
  // Turns logging on or off everywhere after LOG_ALL, the log or a ring's log flag changed.
  void apply_dirty_log();

  VhostDevice& device_;
  BackendOptions options_;
  UniqueFd epoll_;
  UniqueFd listen_;
  UniqueFd conn_;
  UniqueFd timer_;  // client mode reconnect timer
  UniqueFd wake_;   // eventfd behind wake()

  GuestMemory memory_;
  DirtyLog log_;
  DirtyLog* active_log_ = nullptr;  // &log_ while logging
  std::vector<VirtQueue> queues_;
  std::vector<bool> ready_;
  uint64_t features_ = 0;
  uint64_t protocol_features_ = 0;
  bool features_set_ = false;
  uint64_t kicked_ = 0;
  BackendCounters counters_;

  // Partial message being read.
  uint8_t header_bytes_[kHeaderSize];
  size_t header_got_ = 0;
  MessageHeader header_{};
  uint8_t payload_[kMaxPayloadSize];
  size_t payload_got_ = 0;
  UniqueFd fds_[kMaxFds];
  size_t num_fds_ = 0;
};

}  // namespace keel::vhost
