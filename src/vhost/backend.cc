#include "vhost/backend.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/log.h"

namespace keel::vhost {

namespace {

enum class WatchKind : uint32_t { Listen = 1, Connection = 2, Timer = 3, Kick = 4, Wake = 5 };

uint64_t watch_tag(WatchKind kind, uint32_t index = 0) {
  return (static_cast<uint64_t>(kind) << 32) | index;
}

Result<void> epoll_add(int epoll, int fd, uint64_t tag) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = tag;
  if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &ev) != 0) return fail_errno("epoll_ctl add");
  return ok();
}

void epoll_del(int epoll, int fd) {
  if (fd >= 0) epoll_ctl(epoll, EPOLL_CTL_DEL, fd, nullptr);
}

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return fail_invalid("socket path '{}' is empty or longer than {} bytes", path, sizeof addr.sun_path - 1);
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// Requests whose answer is a reply of their own, so REPLY_ACK adds nothing.
bool has_own_reply(Request r) {
  switch (r) {
    case Request::GetFeatures:
    case Request::GetProtocolFeatures:
    case Request::GetVringBase:
    case Request::GetQueueNum:
    case Request::GetConfig:
    case Request::GetMaxMemSlots:
    case Request::SetLogBase:
    case Request::GetStatus:
      return true;
    default:
      return false;
  }
}

// A refusal keeps the connection (the front-end asked for something we do not do); every other
// failure in dispatch is a protocol violation and closes it.
constexpr int kRefused = EOPNOTSUPP;

Result<void> refuse(std::string_view what) {
  return fail(kRefused, fmt::format("{} is not supported", what));
}

}  // namespace

VhostUserBackend::VhostUserBackend(VhostDevice& device, BackendOptions options)
    : device_(device), options_(std::move(options)) {}

VhostUserBackend::~VhostUserBackend() {
  if (listen_.valid() && options_.mode == SocketMode::Server) ::unlink(options_.socket_path.c_str());
}

Result<std::unique_ptr<VhostUserBackend>> VhostUserBackend::create(VhostDevice& device,
                                                                   BackendOptions options) {
  uint32_t queues = device.max_queues();
  if (queues == 0 || queues > kMaxQueues)
    return fail_invalid("device wants {} virtqueues (must be 1..{})", queues, kMaxQueues);
  std::unique_ptr<VhostUserBackend> backend(new VhostUserBackend(device, std::move(options)));
  backend->queues_.resize(queues);
  backend->ready_.assign(queues, false);
  TRY(backend->start());
  return backend;
}

Result<void> VhostUserBackend::start() {
  int epoll = epoll_create1(EPOLL_CLOEXEC);
  if (epoll < 0) return fail_errno("epoll_create1");
  epoll_.reset(epoll);
  int wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake < 0) return fail_errno("eventfd");
  wake_.reset(wake);
  TRY(epoll_add(epoll_.get(), wake_.get(), watch_tag(WatchKind::Wake)));
  if (options_.mode == SocketMode::Server) {
    if (options_.socket_path.empty()) return ok();  // connections are attached
    return listen_socket();
  }

  int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (timer < 0) return fail_errno("timerfd_create");
  timer_.reset(timer);
  TRY(epoll_add(epoll_.get(), timer_.get(), watch_tag(WatchKind::Timer)));
  try_connect();
  return ok();
}

Result<void> VhostUserBackend::listen_socket() {
  sockaddr_un addr = TRY(unix_address(options_.socket_path));
  // A socket left behind by an earlier run would make bind fail; anything else at the path is not
  // ours to remove.
  struct stat st;
  if (lstat(options_.socket_path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return fail_invalid("{} exists and is not a socket", options_.socket_path);
    ::unlink(options_.socket_path.c_str());
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail_errno("socket");
  listen_.reset(fd);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return fail_errno("bind " + options_.socket_path);
  if (listen(fd, 4) != 0) return fail_errno("listen " + options_.socket_path);
  TRY(epoll_add(epoll_.get(), fd, watch_tag(WatchKind::Listen)));
  KEEL_LOG_INFO("vhost-user: listening on {}", options_.socket_path);
  return ok();
}

Result<void> VhostUserBackend::arm_reconnect_timer(bool armed) {
  itimerspec spec{};
  if (armed) {
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(options_.reconnect_interval).count();
    if (ns <= 0) ns = 1;
    spec.it_value.tv_sec = ns / 1000000000;
    spec.it_value.tv_nsec = ns % 1000000000;
    spec.it_interval = spec.it_value;
  }
  if (timerfd_settime(timer_.get(), 0, &spec, nullptr) != 0) return fail_errno("timerfd_settime");
  return ok();
}

void VhostUserBackend::try_connect() {
  if (conn_.valid()) return;
  auto addr = unix_address(options_.socket_path);
  if (!addr) {
    KEEL_LOG_ERROR("vhost-user: {}", addr.error().message());
    return;
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    KEEL_LOG_ERROR("vhost-user: socket: {}", strerror(errno));
    return;
  }
  UniqueFd sock(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&*addr), sizeof *addr) != 0) {
    // Not there yet (or busy): the timer tries again.
    KEEL_LOG_DEBUG("vhost-user: connect {}: {}", options_.socket_path, strerror(errno));
    if (auto r = arm_reconnect_timer(true); !r) KEEL_LOG_ERROR("vhost-user: {}", r.error().message());
    return;
  }
  if (auto r = arm_reconnect_timer(false); !r) KEEL_LOG_ERROR("vhost-user: {}", r.error().message());
  KEEL_LOG_INFO("vhost-user: connected to {}", options_.socket_path);
  adopt_connection(std::move(sock));
}

void VhostUserBackend::accept_connection() {
  int fd = accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) return;  // EAGAIN or the peer gave up already
  UniqueFd sock(fd);
  if (conn_.valid()) {
    // One front-end per device at a time; a second one is turned away.
    KEEL_LOG_WARN("vhost-user {}: refusing a second front-end connection", options_.socket_path);
    return;
  }
  KEEL_LOG_INFO("vhost-user {}: front-end connected", options_.socket_path);
  adopt_connection(std::move(sock));
}

void VhostUserBackend::adopt_connection(UniqueFd fd) {
  reset_device();
  conn_ = std::move(fd);
  header_got_ = 0;
  payload_got_ = 0;
  num_fds_ = 0;
  ++counters_.connections;
  if (auto r = epoll_add(epoll_.get(), conn_.get(), watch_tag(WatchKind::Connection)); !r) {
    KEEL_LOG_ERROR("vhost-user: {}", r.error().message());
    conn_.reset();
  }
}

Result<void> VhostUserBackend::attach_connection(UniqueFd socket) {
  if (!socket.valid()) return fail_invalid("attach_connection: invalid fd");
  int flags = fcntl(socket.get(), F_GETFL);
  if (flags < 0 || fcntl(socket.get(), F_SETFL, flags | O_NONBLOCK) != 0) return fail_errno("fcntl O_NONBLOCK");
  disconnect("replaced by an attached connection");
  adopt_connection(std::move(socket));
  if (!conn_.valid()) return fail_invalid("attach_connection: could not watch the socket");
  return ok();
}

void VhostUserBackend::disconnect(std::string_view why) {
  if (!conn_.valid()) return;
  KEEL_LOG_INFO("vhost-user {}: connection closed: {}", options_.socket_path, why);
  device_.quiesce();
  epoll_del(epoll_.get(), conn_.get());
  conn_.reset();
  for (auto& fd : fds_) fd.reset();
  num_fds_ = 0;
  reset_device();
  ++counters_.disconnects;
  device_.on_disconnect();
  if (options_.mode == SocketMode::Client) {
    if (auto r = arm_reconnect_timer(true); !r) KEEL_LOG_ERROR("vhost-user: {}", r.error().message());
  }
}

void VhostUserBackend::reset_device() {
  for (uint32_t i = 0; i < queues_.size(); ++i) {
    epoll_del(epoll_.get(), queues_[i].kick_fd());
    queues_[i].reset();
  }
  update_ready_states();
  memory_ = GuestMemory();
  log_ = DirtyLog();
  active_log_ = nullptr;
  features_ = 0;
  protocol_features_ = 0;
  features_set_ = false;
  kicked_ = 0;
}

void VhostUserBackend::update_ready_states() {
  for (uint32_t i = 0; i < queues_.size(); ++i) {
    bool ready = queues_[i].ready();
    if (ready != ready_[i]) {
      ready_[i] = ready;
      device_.on_queue_ready(i, ready);
    }
  }
}

void VhostUserBackend::wake() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
}

Result<void> VhostUserBackend::wait_and_handle(std::chrono::milliseconds timeout) {
  epoll_event ev;
  int n = epoll_wait(epoll_.get(), &ev, 1, static_cast<int>(timeout.count()));
  if (n < 0 && errno != EINTR) return fail_errno("epoll_wait");
  return handle_events();
}

Result<void> VhostUserBackend::handle_events() {
  epoll_event events[32];
  int n = epoll_wait(epoll_.get(), events, 32, 0);
  if (n < 0) {
    if (errno == EINTR) return ok();
    return fail_errno("epoll_wait");
  }
  for (int i = 0; i < n; ++i) {
    auto kind = static_cast<WatchKind>(events[i].data.u64 >> 32);
    uint32_t index = static_cast<uint32_t>(events[i].data.u64);
    switch (kind) {
      case WatchKind::Listen:
        accept_connection();
        break;
      case WatchKind::Connection:
        read_messages();
        break;
      case WatchKind::Timer: {
        uint64_t expirations;
        [[maybe_unused]] ssize_t r = ::read(timer_.get(), &expirations, sizeof expirations);
        try_connect();
        break;
      }
      case WatchKind::Wake: {
        uint64_t count;
        [[maybe_unused]] ssize_t r = ::read(wake_.get(), &count, sizeof count);
        break;
      }
      case WatchKind::Kick:
        if (index < queues_.size() && queues_[index].drain_kick() && index < 64)
          kicked_ |= 1ull << index;
        break;
    }
  }
  return ok();
}

void VhostUserBackend::read_messages() {
  // Bounded so a chatty front-end cannot starve the data path.
  for (int budget = 0; budget < 64 && conn_.valid(); ++budget) {
    auto complete = read_some();
    if (!complete) {
      ++counters_.protocol_errors;
      disconnect(complete.error().message());
      return;
    }
    if (!*complete) return;

    size_t nfds = num_fds_;
    header_got_ = 0;
    payload_got_ = 0;
    num_fds_ = 0;
    ++counters_.messages;
    auto decoded = decode_message(header_, {payload_, header_.size}, nfds);
    if (!decoded) {
      for (auto& fd : fds_) fd.reset();
      ++counters_.protocol_errors;
      disconnect(decoded.error().message());
      return;
    }
    KEEL_LOG_DEBUG("vhost-user: {} ({} bytes, {} fds)", request_name(header_.request), header_.size, nfds);
    device_.quiesce();
    auto result = dispatch(*decoded);
    // Whatever the handler did not take is closed here.
    for (auto& fd : fds_) fd.reset();
    bool refused = !result && result.error().code() == kRefused;
    if (!result && !refused) {
      ++counters_.protocol_errors;
      disconnect(fmt::format("{}: {}", request_name(header_.request), result.error().message()));
      return;
    }
    if (refused) {
      ++counters_.refused_requests;
      KEEL_LOG_INFO("vhost-user: refused {}", request_name(header_.request));
    }
    if (decoded->need_reply() && (protocol_features_ & feature_bit(kProtocolReplyAck)) &&
        !has_own_reply(decoded->request())) {
      if (auto r = send_u64_reply(header_.request, refused ? 1 : 0); !r) {
        disconnect(r.error().message());
        return;
      }
    }
    update_ready_states();
  }
}

Result<bool> VhostUserBackend::read_some() {
  if (header_got_ < kHeaderSize) {
    // The header is read alone, so the fds sent with a message (they ride on its first byte) are
    // never mixed up with the next one's.
    iovec iov{header_bytes_ + header_got_, kHeaderSize - header_got_};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(conn_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return false;
      return fail_errno("recvmsg");
    }
    if (n == 0) return fail_invalid("front-end closed the connection");
    // Take ownership of every fd first so none leaks, whatever is wrong with the message.
    size_t received = 0;
    bool too_many = false;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        if (num_fds_ < kMaxFds) {
          fds_[num_fds_++].reset(fd);
        } else {
          ::close(fd);
          too_many = true;
        }
        ++received;
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) return fail_invalid("message came with more than {} fds", kMaxFds);
    if (too_many) return fail_invalid("message came with more than {} fds", kMaxFds);
    if (received && header_got_ != 0) return fail_invalid("fds arrived in the middle of a header");
    header_got_ += static_cast<size_t>(n);
    if (header_got_ < kHeaderSize) return false;
    header_ = TRY(decode_header(std::span<const uint8_t, kHeaderSize>(header_bytes_, kHeaderSize)));
  }
  while (payload_got_ < header_.size) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    iovec iov{payload_ + payload_got_, header_.size - payload_got_};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(conn_.get(), &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return false;
      return fail_errno("recvmsg");
    }
    if (n == 0) return fail_invalid("front-end closed the connection mid-message");
    if (msg.msg_controllen != 0) {
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          ::close(fd);
        }
      }
      return fail_invalid("fds arrived in the middle of a message payload");
    }
    payload_got_ += static_cast<size_t>(n);
  }
  return true;
}

Result<void> VhostUserBackend::send_reply(uint32_t request, std::span<const uint8_t> payload) {
  uint8_t buffer[kHeaderSize + sizeof(ConfigHeader) + kMaxConfigSize];
  KEEL_CHECK(payload.size() <= sizeof buffer - kHeaderSize);
  size_t len = encode_reply(request, payload, buffer);
  ssize_t n = send(conn_.get(), buffer, len, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n < 0) return fail_errno("send reply");
  // Replies are tiny; a socket buffer too full to take one means the front-end stopped reading.
  if (static_cast<size_t>(n) != len) return fail_invalid("short write of a reply");
  return ok();
}

Result<void> VhostUserBackend::send_u64_reply(uint32_t request, uint64_t value) {
  return send_reply(request, as_bytes_of(value));
}

Result<VirtQueue*> VhostUserBackend::queue_for(uint32_t index, std::string_view what) {
  if (index >= queues_.size())
    return fail_invalid("{} for ring {}, but the device has {} rings", what, index, queues_.size());
  return &queues_[index];
}

namespace {
// The data path must never block on a front-end's fd (an eventfd normally, but it could be a pipe
// someone keeps full). QEMU's own eventfds are non-blocking already, so this changes nothing for it.
void make_nonblocking(int fd) {
  if (fd < 0) return;
  int flags = fcntl(fd, F_GETFL);
  if (flags >= 0 && !(flags & O_NONBLOCK)) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}
}  // namespace

void VhostUserBackend::watch_kick(uint32_t index) {
  int fd = queues_[index].kick_fd();
  if (fd < 0) return;
  make_nonblocking(fd);
  if (auto r = epoll_add(epoll_.get(), fd, watch_tag(WatchKind::Kick, index)); !r)
    KEEL_LOG_ERROR("vhost-user: watching kick fd of ring {}: {}", index, r.error().message());
  // Buffers may have been posted before we watched the fd.
  if (index < 64) kicked_ |= 1ull << index;
}

void VhostUserBackend::apply_dirty_log() {
  bool logging = (features_ & feature_bit(kFeatureLogAll)) && log_.mapped();
  if (logging != (active_log_ != nullptr))
    KEEL_LOG_INFO("vhost-user {}: dirty-page logging {}", options_.socket_path, logging ? "on" : "off");
  active_log_ = logging ? &log_ : nullptr;
  for (auto& q : queues_) q.set_dirty_log(active_log_);
}

Result<void> VhostUserBackend::dispatch(const DecodedMessage& m) {
  const bool dirty_log = device_.supports_dirty_log();
  const uint64_t offered = device_.device_features() | feature_bit(kFeatureProtocolFeatures) |
                           (dirty_log ? feature_bit(kFeatureLogAll) : 0);
  const uint64_t offered_protocol = feature_bit(kProtocolMq) | feature_bit(kProtocolReplyAck) |
                                    (device_.has_config() ? feature_bit(kProtocolConfig) : 0) |
                                    (dirty_log ? feature_bit(kProtocolLogShmfd) : 0);

  switch (m.request()) {
    case Request::GetFeatures:
      return send_u64_reply(m.header.request, offered);

    case Request::SetFeatures: {
      if (m.u64 & ~offered)
        return fail_invalid("front-end acked features {:#x} that were not offered", m.u64 & ~offered);
      features_ = m.u64;
      features_set_ = true;
      for (auto& q : queues_) {
        q.set_features(features_);
        // Without protocol features there is no SET_VRING_ENABLE: rings start enabled.
        if (!(features_ & feature_bit(kFeatureProtocolFeatures))) q.set_enabled(true);
      }
      device_.on_features(features_);
      // QEMU turns LOG_ALL on when a migration starts and off when it ends or fails.
      apply_dirty_log();
      return ok();
    }

    case Request::GetProtocolFeatures:
      return send_u64_reply(m.header.request, offered_protocol);

    case Request::SetProtocolFeatures:
      if (m.u64 & ~offered_protocol)
        return fail_invalid("front-end set protocol features {:#x} that were not offered",
                            m.u64 & ~offered_protocol);
      protocol_features_ = m.u64;
      return ok();

    case Request::GetQueueNum:
      return send_u64_reply(m.header.request, queues_.size());

    case Request::SetOwner:
      return ok();

    case Request::ResetOwner:
    case Request::ResetDevice:
      reset_device();
      return ok();

    case Request::SetMemTable: {
      GuestMemory memory = TRY(GuestMemory::map({m.regions, m.nregions}, {fds_, m.nregions}));
      memory_ = std::move(memory);
      for (uint32_t i = 0; i < queues_.size(); ++i) {
        if (auto r = queues_[i].map(memory_); !r) queues_[i].mark_broken(r.error().message());
      }
      KEEL_LOG_DEBUG("vhost-user: memory table with {} regions", m.nregions);
      return ok();
    }

    case Request::SetVringNum: {
      VirtQueue* q = TRY(queue_for(m.state.index, "SET_VRING_NUM"));
      return q->set_size(m.state.num);
    }

    case Request::SetVringAddr: {
      VirtQueue* q = TRY(queue_for(m.addr.index, "SET_VRING_ADDR"));
      q->set_addresses(m.addr);
      // The ring's log flag may have changed (QEMU sets it when migration starts).
      q->set_dirty_log(active_log_);
      return q->map(memory_);
    }

    case Request::SetVringBase: {
      VirtQueue* q = TRY(queue_for(m.state.index, "SET_VRING_BASE"));
      if (m.state.num > 0xffff) return fail_invalid("SET_VRING_BASE: base {} is not 16-bit", m.state.num);
      q->set_base(static_cast<uint16_t>(m.state.num));
      return ok();
    }

    case Request::GetVringBase: {
      VirtQueue* q = TRY(queue_for(m.state.index, "GET_VRING_BASE"));
      int old_kick = q->kick_fd();
      epoll_del(epoll_.get(), old_kick);
      q->publish_used();
      q->stop();
      VringState state{m.state.index, q->last_avail_idx()};
      return send_reply(m.header.request, as_bytes_of(state));
    }

    case Request::SetVringKick: {
      VirtQueue* q = TRY(queue_for(m.vring_index, "SET_VRING_KICK"));
      // Unwatch before the old fd closes: the front-end holds the same eventfd, so closing ours
      // would not drop the registration.
      epoll_del(epoll_.get(), q->kick_fd());
      if (m.vring_has_fd) {
        q->set_kick_fd(std::move(fds_[0]));
      } else {
        q->start_without_kick();
      }
      watch_kick(m.vring_index);
      return ok();
    }

    case Request::SetVringCall: {
      VirtQueue* q = TRY(queue_for(m.vring_index, "SET_VRING_CALL"));
      if (m.vring_has_fd) make_nonblocking(fds_[0].get());
      q->set_call_fd(m.vring_has_fd ? std::move(fds_[0]) : UniqueFd());
      return ok();
    }

    case Request::SetVringErr: {
      VirtQueue* q = TRY(queue_for(m.vring_index, "SET_VRING_ERR"));
      if (m.vring_has_fd) make_nonblocking(fds_[0].get());
      q->set_err_fd(m.vring_has_fd ? std::move(fds_[0]) : UniqueFd());
      return ok();
    }

    case Request::SetVringEnable: {
      VirtQueue* q = TRY(queue_for(m.state.index, "SET_VRING_ENABLE"));
      if (m.state.num > 1) return fail_invalid("SET_VRING_ENABLE: value {} is not 0 or 1", m.state.num);
      q->set_enabled(m.state.num == 1);
      return ok();
    }

    case Request::GetConfig: {
      // The reply echoes the request's header with the bytes filled in; an empty payload tells the
      // front-end the read failed.
      uint8_t reply[sizeof(ConfigHeader) + kMaxConfigSize];
      std::memcpy(reply, &m.config, sizeof m.config);
      std::span<uint8_t> data(reply + sizeof(ConfigHeader), m.config.size);
      std::fill(data.begin(), data.end(), 0);
      if (!(protocol_features_ & feature_bit(kProtocolConfig)) || !device_.read_config(m.config.offset, data)) {
        TRY(send_reply(m.header.request, {}));
        return refuse("GET_CONFIG");
      }
      return send_reply(m.header.request, {reply, sizeof(ConfigHeader) + m.config.size});
    }

    case Request::SetConfig:
      if (!(protocol_features_ & feature_bit(kProtocolConfig))) return refuse("SET_CONFIG");
      if (auto r = device_.write_config(m.config.offset, m.config_data); !r) return refuse("SET_CONFIG");
      return ok();

    case Request::SetLogBase: {
      // Only the shared-memory log exists (the fd comes with the message), and only if we offered it.
      if (!(protocol_features_ & feature_bit(kProtocolLogShmfd)))
        return fail_invalid("SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD");
      // A new log (QEMU resizes it when the memory table grows) replaces the old one at once;
      // queues point at log_, so they follow.
      log_ = TRY(DirtyLog::map(fds_[0].get(), m.log));
      apply_dirty_log();
      KEEL_LOG_DEBUG("vhost-user: dirty log of {} bytes", m.log.mmap_size);
      // The front-end waits for a reply without payload before it relies on the log.
      return send_reply(m.header.request, {});
    }

    default:
      return refuse(request_name(m.header.request));
  }
}

}  // namespace keel::vhost
