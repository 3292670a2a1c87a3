#include "switch/of_connection.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstring>
#include <optional>

#include "base/log.h"
#include "switch/bridge.h"
#include "switch/openflow.h"

namespace keel::sw {

namespace {

constexpr size_t kMaxOutputBacklog = 64 << 20;  // a controller that stops reading gets disconnected

std::vector<uint8_t> make_hello() {
  // Version 1.3 header with a version bitmap announcing 1.0 and 1.3.
  std::vector<uint8_t> out;
  begin_message(out, kOf13, OFPT_HELLO, 0);
  ByteWriter w(out);
  w.u16(1);  // OFPHET_VERSIONBITMAP
  w.u16(8);
  w.u32((1u << kOf10) | (1u << kOf13));
  finish_message(out);
  return out;
}

}  // namespace

OfConnection::OfConnection(Bridge& bridge, UniqueFd fd, std::string peer,
                           std::function<void(OfConnection*)> on_closed)
    : bridge_(bridge), fd_(std::move(fd)), peer_(std::move(peer)), on_closed_(std::move(on_closed)) {}

OfConnection::~OfConnection() {
  if (registered_) bridge_.loop().remove_fd(fd_.get());
  bridge_.detach(this);
}

Result<void> OfConnection::start() {
  bridge_.attach(this);
  if (fd_.valid()) {
    TRY(bridge_.loop().add_fd(fd_.get(), EPOLLIN, [this](uint32_t ev) { on_events(ev); }));
    registered_ = true;
  }
  send(make_hello());
  return ok();
}

void OfConnection::close() {
  if (closed_) return;
  closed_ = true;
  if (registered_) {
    bridge_.loop().remove_fd(fd_.get());
    registered_ = false;
  }
  bridge_.detach(this);
  if (on_closed_) {
    // Destroying ourselves inside our own callback would pull the rug: let the loop do it.
    auto cb = on_closed_;
    auto self = this;
    bridge_.loop().post([cb, self] { cb(self); });
  }
}

void OfConnection::send(std::span<const uint8_t> msg) {
  if (closed_) return;
  if (capture) {
    capture->insert(capture->end(), msg.begin(), msg.end());
    return;
  }
  if (out_.size() - out_sent_ + msg.size() > kMaxOutputBacklog) {
    KEEL_LOG_WARN("OpenFlow peer {} is not reading; disconnecting", peer_);
    close();
    return;
  }
  out_.insert(out_.end(), msg.begin(), msg.end());
  flush_output();
}

void OfConnection::flush_output() {
  while (out_sent_ < out_.size()) {
    ssize_t n = ::send(fd_.get(), out_.data() + out_sent_, out_.size() - out_sent_, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      close();
      return;
    }
    out_sent_ += size_t(n);
  }
  if (out_sent_ == out_.size()) {
    out_.clear();
    out_sent_ = 0;
  } else if (out_sent_ > (1 << 20)) {
    out_.erase(out_.begin(), out_.begin() + long(out_sent_));
    out_sent_ = 0;
  }
  bool want_out = !out_.empty();
  if (want_out != watching_out_ && registered_) {
    watching_out_ = want_out;
    (void)bridge_.loop().modify_fd(fd_.get(), uint32_t(EPOLLIN) | (want_out ? uint32_t(EPOLLOUT) : 0u));
  }
}

namespace {
std::chrono::steady_clock::time_point g_last_input;
}  // namespace

std::chrono::steady_clock::time_point last_openflow_input() { return g_last_input; }

void OfConnection::on_events(uint32_t events) {
  if (events & EPOLLOUT) flush_output();
  if (closed_) return;
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  g_last_input = std::chrono::steady_clock::now();
  uint8_t buf[64 * 1024];
  for (;;) {
    ssize_t n = ::recv(fd_.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) {
      feed(std::span<const uint8_t>(buf, size_t(n)));
      if (closed_) return;
      if (size_t(n) == sizeof buf) continue;
      return;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || errno != EAGAIN) close();
    return;
  }
}

void OfConnection::feed(std::span<const uint8_t> bytes) {
  in_.insert(in_.end(), bytes.begin(), bytes.end());
  process_input();
}

void OfConnection::process_input() {
  size_t off = 0;
  while (!closed_ && in_.size() - off >= kOfHeaderLen) {
    OfHeader h = decode_header(in_.data() + off);
    if (h.length < kOfHeaderLen) {
      // The framing is lost: nothing after this can be trusted.
      KEEL_LOG_WARN("OpenFlow peer {} sent a message of length {}; disconnecting", peer_, h.length);
      send(make_error(negotiated() ? version_ : kOf13, h.xid, of_error(OFPET_BAD_REQUEST, 6, "bad length"),
                      std::span<const uint8_t>(in_.data() + off, kOfHeaderLen)));
      close();
      return;
    }
    if (in_.size() - off < h.length) break;
    std::span<const uint8_t> msg(in_.data() + off, h.length);
    off += h.length;
    if (!negotiated()) {
      if (h.type != OFPT_HELLO) {
        send(make_error(kOf13, h.xid, of_error(OFPET_HELLO_FAILED, 0, "expected HELLO first"), msg));
        close();
        return;
      }
      handle_hello(msg);
      continue;
    }
    if (h.version != version_) {
      send(make_error(version_, h.xid, of_error(OFPET_BAD_REQUEST, 0, "wrong version"), msg));
      continue;
    }
    bridge_.handle_message(*this, msg);
  }
  in_.erase(in_.begin(), in_.begin() + long(off));
}

void OfConnection::handle_hello(std::span<const uint8_t> msg) {
  uint8_t their_version = msg[0];
  uint32_t their_bitmap = 0;
  ByteReader r(msg.subspan(kOfHeaderLen));
  while (r.remaining() >= 4) {
    uint16_t type = r.u16();
    uint16_t len = r.u16();
    if (len < 4 || !r.has(size_t(len) - 4)) break;
    ByteReader body = r.sub(len - 4);
    r.skip(std::min<size_t>((8 - len % 8) % 8, r.remaining()));
    if (type == 1 && body.remaining() >= 4) their_bitmap = body.u32();
  }
  uint32_t ours = (1u << kOf10) | (1u << kOf13);
  uint8_t chosen = 0;
  if (their_bitmap) {
    uint32_t common = ours & their_bitmap;
    for (int v = 31; v >= 0; --v)
      if (common & (1u << v)) {
        chosen = uint8_t(v);
        break;
      }
  } else {
    uint8_t v = std::min<uint8_t>(their_version, kOf13);
    if (v == kOf10 || v == kOf13) chosen = v;
  }
  if (!chosen) {
    std::string why = fmt::format("We support versions 0x01 and 0x04, you support 0x{:02x}", their_version);
    send(make_error(std::min<uint8_t>(their_version ? their_version : kOf10, kOf13), decode_header(msg.data()).xid,
                    of_error(OFPET_HELLO_FAILED, 0, why), msg));
    close();
    return;
  }
  version_ = chosen;
  KEEL_LOG_DEBUG("OpenFlow peer {} negotiated version 0x{:02x}", peer_, version_);
}

// ---------------------------------------------------------------------------------------------------

OfAgent::~OfAgent() { clear(); }

void OfAgent::clear() {
  for (auto& l : listeners_) {
    bridge_.loop().remove_fd(l->fd.get());
    if (!l->unix_path.empty()) unlink(l->unix_path.c_str());
  }
  listeners_.clear();
  for (auto& a : actives_)
    if (a->retry) bridge_.loop().cancel_timer(a->retry);
  actives_.clear();
  for (auto& c : connections_) c->capture = nullptr;
  connections_.clear();
}

namespace {

Result<uint16_t> parse_port(std::string_view s) {
  unsigned v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v > 65535) return fail_invalid("bad TCP port '{}'", s);
  return uint16_t(v);
}

}  // namespace

Result<void> OfAgent::set_targets(const std::vector<std::string>& targets) {
  // Validate everything before tearing down what works.
  for (const auto& t : targets) {
    if (t.rfind("ptcp:", 0) == 0 || t.rfind("punix:", 0) == 0) continue;
    if (t.rfind("tcp:", 0) == 0) {
      auto rest = std::string_view(t).substr(4);
      auto colon = rest.rfind(':');
      if (colon == std::string_view::npos) return fail_invalid("controller '{}' needs tcp:HOST:PORT", t);
      TRY(parse_port(rest.substr(colon + 1)));
      continue;
    }
    return fail_invalid("unknown controller target '{}' (want ptcp:PORT, punix:PATH or tcp:HOST:PORT)", t);
  }
  clear();
  targets_ = targets;
  for (const auto& t : targets) {
    if (t.rfind("tcp:", 0) == 0) {
      auto a = std::make_unique<Active>();
      a->target = t;
      auto rest = std::string_view(t).substr(4);
      auto colon = rest.rfind(':');
      a->host = std::string(rest.substr(0, colon));
      a->port = *parse_port(rest.substr(colon + 1));
      Active* raw = a.get();
      actives_.push_back(std::move(a));
      connect_active(*raw);
    } else {
      TRY(add_listener(t));
    }
  }
  return ok();
}

Result<void> OfAgent::add_listener(const std::string& target) {
  auto l = std::make_unique<Listener>();
  l->target = target;
  if (target.rfind("ptcp:", 0) == 0) {
    auto rest = std::string_view(target).substr(5);
    std::string ip = "0.0.0.0";
    auto colon = rest.find(':');
    uint16_t port = TRY(parse_port(rest.substr(0, colon)));
    if (colon != std::string_view::npos) ip = std::string(rest.substr(colon + 1));
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return fail_errno("socket");
    l->fd.reset(fd);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port);
    if (inet_pton(AF_INET, ip.c_str(), &sin.sin_addr) != 1) return fail_invalid("bad listen address '{}'", ip);
    if (bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof sin) < 0) return fail_errno("bind " + target);
  } else {
    std::string path = target.substr(6);
    sockaddr_un sun{};
    if (path.empty() || path.size() >= sizeof sun.sun_path) return fail_invalid("bad unix path in '{}'", target);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return fail_errno("socket");
    l->fd.reset(fd);
    sun.sun_family = AF_UNIX;
    std::memcpy(sun.sun_path, path.c_str(), path.size());
    unlink(path.c_str());
    if (bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) < 0) return fail_errno("bind " + target);
    l->unix_path = path;
  }
  if (listen(l->fd.get(), 64) < 0) return fail_errno("listen " + target);
  Listener* raw = l.get();
  TRY(bridge_.loop().add_fd(raw->fd.get(), EPOLLIN, [this, raw](uint32_t) { accept_from(*raw); }));
  listeners_.push_back(std::move(l));
  KEEL_LOG_INFO("{}: OpenFlow listening on {}", bridge_.name(), target);
  return ok();
}

void OfAgent::accept_from(Listener& l) {
  for (;;) {
    int fd = accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    adopt(UniqueFd(fd), l.target, nullptr);
  }
}

void OfAgent::adopt(UniqueFd fd, std::string peer, Active* active) {
  auto conn = std::make_unique<OfConnection>(bridge_, std::move(fd), std::move(peer),
                                             [this, alive = std::weak_ptr<bool>(alive_)](OfConnection* c) {
                                               // Runs from the loop later: the agent may be gone by then.
                                               if (alive.lock()) closed(c);
                                             });
  OfConnection* raw = conn.get();
  connections_.push_back(std::move(conn));
  if (active) {
    active->conn = raw;
    raw->miss_send_len = 128;
  }
  if (auto r = raw->start(); !r) {
    KEEL_LOG_WARN("OpenFlow connection failed to start: {}", r.error().message());
    raw->close();
  }
}

void OfAgent::connect_active(Active& a) {
  a.retry = 0;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string port = std::to_string(a.port);
  bool connected = false;
  if (getaddrinfo(a.host.c_str(), port.c_str(), &hints, &res) == 0 && res) {
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
      UniqueFd owned(fd);
      // A blocking connect to a controller is short on loopback/LAN; failure retries later.
      if (connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int flags = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        adopt(std::move(owned), a.target, &a);
        connected = true;
      }
    }
  }
  if (res) freeaddrinfo(res);
  if (!connected) {
    Active* raw = &a;
    auto t = bridge_.loop().add_timer(std::chrono::seconds(2), [this, raw] { connect_active(*raw); });
    if (t) a.retry = *t;
  }
}

void OfAgent::closed(OfConnection* c) {
  for (auto& a : actives_) {
    if (a->conn == c) {
      a->conn = nullptr;
      Active* raw = a.get();
      auto t = bridge_.loop().add_timer(std::chrono::seconds(2), [this, raw] { connect_active(*raw); });
      if (t) a->retry = *t;
    }
  }
  std::erase_if(connections_, [c](const auto& p) { return p.get() == c; });
}

}  // namespace keel::sw
