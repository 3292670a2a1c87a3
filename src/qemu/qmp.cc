#include "qemu/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "base/log.h"

namespace keel::qemu {

using nlohmann::json;

Result<void> QmpMessageBuffer::append(std::string_view bytes) {
  buffer_.append(bytes);
  if (buffer_.size() > kMaxMessage && buffer_.find('\n') == std::string::npos)
    return fail_invalid("QMP message longer than {} bytes", kMaxMessage);
  return ok();
}

Result<std::optional<json>> QmpMessageBuffer::next() {
  for (;;) {
    auto nl = buffer_.find('\n');
    if (nl == std::string::npos) return std::optional<json>();
    std::string line = buffer_.substr(0, nl);
    buffer_.erase(0, nl + 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return fail_invalid("malformed QMP message: {:.200}", line);
    return std::optional<json>(std::move(j));
  }
}

namespace {

Result<UniqueFd> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return fail_invalid("socket path too long: {}", path);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0)
    return fail_errno("connect " + path);
  return fd;
}

// Reads one message synchronously (greeting and capabilities, before the reader thread runs).
Result<json> read_message(int fd, QmpMessageBuffer& buf, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (auto msg = TRY(buf.next())) return *msg;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return fail(ETIMEDOUT, "QMP: no reply in time");
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return fail_errno("poll");
    if (r == 0) continue;
    char chunk[4096];
    ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("QMP read");
    if (n == 0) return fail(ECONNRESET, "QMP: connection closed");
    TRY(buf.append(std::string_view(chunk, static_cast<size_t>(n))));
  }
}

Result<void> send_with_fd(int sock, const std::string& data, int pass_fd) {
  size_t off = 0;
  bool fd_sent = pass_fd < 0;
  while (off < data.size()) {
    iovec iov{const_cast<char*>(data.data() + off), data.size() - off};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (!fd_sent) {
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
    }
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("QMP write");
    fd_sent = true;
    off += static_cast<size_t>(n);
  }
  return ok();
}

}  // namespace

Result<std::unique_ptr<QmpClient>> QmpClient::connect(const std::string& socket_path,
                                                      std::chrono::milliseconds timeout,
                                                      EventCallback on_event, CloseCallback on_close) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  UniqueFd fd;
  for (;;) {
    auto r = connect_unix(socket_path);
    if (r) {
      fd = std::move(*r);
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline) return fail(r.error().with_context("QMP"));
    ::usleep(5000);
  }
  QmpMessageBuffer buf;
  json greeting = TRY_CTX(read_message(fd.get(), buf, timeout), "QMP greeting");
  if (!greeting.contains("QMP")) return fail_invalid("QMP: unexpected greeting {}", greeting.dump());
  std::string version;
  try {
    auto& q = greeting["QMP"]["version"]["qemu"];
    version = fmt::format("{}.{}.{}", q["major"].get<int>(), q["minor"].get<int>(), q["micro"].get<int>());
  } catch (const json::exception&) {
    version = "unknown";
  }
  TRY(send_with_fd(fd.get(), R"({"execute":"qmp_capabilities"})" "\n", -1));
  for (;;) {
    json reply = TRY_CTX(read_message(fd.get(), buf, timeout), "QMP capabilities");
    if (reply.contains("event")) continue;
    if (reply.contains("error")) return fail_invalid("QMP capabilities: {}", reply["error"].dump());
    break;
  }
  std::unique_ptr<QmpClient> client(new QmpClient(std::move(fd), std::move(on_event), std::move(on_close)));
  client->version_ = version;
  // Anything left in `buf` after the capabilities reply would be an event: QEMU sends none that
  // early, so the reader thread starts with an empty buffer.
  client->reader_ = std::thread([c = client.get()] { c->reader_loop(); });
  return client;
}

QmpClient::QmpClient(UniqueFd fd, EventCallback on_event, CloseCallback on_close)
    : fd_(std::move(fd)), on_event_(std::move(on_event)), on_close_(std::move(on_close)) {}

QmpClient::~QmpClient() {
  ::shutdown(fd_.get(), SHUT_RDWR);
  if (reader_.joinable()) {
    if (reader_.get_id() == std::this_thread::get_id()) reader_.detach();
    else reader_.join();
  }
}

bool QmpClient::connected() const {
  std::lock_guard lock(mutex_);
  return !closed_;
}

void QmpClient::reader_loop() {
  QmpMessageBuffer buf;
  char chunk[8192];
  for (;;) {
    ssize_t n = ::read(fd_.get(), chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    if (!buf.append(std::string_view(chunk, static_cast<size_t>(n)))) break;
    bool bad = false;
    for (;;) {
      auto msg = buf.next();
      if (!msg) {
        KEEL_LOG_WARN("QMP: {}", msg.error().message());
        bad = true;
        break;
      }
      if (!*msg) break;
      json& j = **msg;
      if (j.contains("event") && j["event"].is_string()) {
        QmpEvent ev;
        ev.name = j["event"].get<std::string>();
        if (j.contains("data")) ev.data = j["data"];
        if (j.contains("timestamp") && j["timestamp"].is_object()) {
          auto& t = j["timestamp"];
          if (t.value("seconds", json()).is_number() && t.value("microseconds", json()).is_number())
            ev.timestamp = t["seconds"].get<double>() + t["microseconds"].get<double>() / 1e6;
        }
        if (on_event_) on_event_(ev);
      } else if (j.contains("id") && j["id"].is_number_unsigned()) {
        std::lock_guard lock(mutex_);
        auto it = pending_.find(j["id"].get<uint64_t>());
        if (it != pending_.end()) it->second = std::move(j);
        replied_.notify_all();
      }
    }
    if (bad) break;
  }
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
    replied_.notify_all();
  }
  if (on_close_) on_close_();
}

Result<json> QmpClient::execute(const std::string& command, const json& arguments,
                                std::chrono::milliseconds timeout, int pass_fd) {
  uint64_t id;
  {
    std::lock_guard lock(mutex_);
    if (closed_) return fail(ECONNRESET, "QMP: QEMU has closed the monitor");
    id = next_id_++;
    pending_[id] = std::nullopt;
  }
  json msg = {{"execute", command}, {"id", id}};
  if (!arguments.is_null()) msg["arguments"] = arguments;
  {
    std::lock_guard lock(write_mutex_);
    auto sent = send_with_fd(fd_.get(), msg.dump() + "\n", pass_fd);
    if (!sent) {
      std::lock_guard l2(mutex_);
      pending_.erase(id);
      return fail(sent.error());
    }
  }
  std::unique_lock lock(mutex_);
  bool done = replied_.wait_for(lock, timeout, [&] { return closed_ || pending_[id].has_value(); });
  std::optional<json> reply = std::move(pending_[id]);
  pending_.erase(id);
  if (!reply) {
    if (!done) return fail(ETIMEDOUT, fmt::format("QMP {}: no reply in {} ms", command, timeout.count()));
    return fail(ECONNRESET, fmt::format("QMP {}: QEMU closed the monitor", command));
  }
  if (reply->contains("error")) {
    auto& e = (*reply)["error"];
    std::string desc = e.is_object() && e.contains("desc") && e["desc"].is_string() ? e["desc"].get<std::string>() : e.dump();
    return fail_invalid("QMP {}: {}", command, desc);
  }
  if (reply->contains("return")) return (*reply)["return"];
  return json::object();
}

}  // namespace keel::qemu
