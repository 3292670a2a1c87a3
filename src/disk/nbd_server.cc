// NBD server: one thread per client reads requests; a small pool of workers per client runs them
// against the BlockDevice (which is thread-safe) and sends replies under a per-client send lock.
#include "disk/nbd_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include "base/log.h"
#include "base/signals.h"
#include "base/unique_fd.h"
#include "disk/endian.h"

namespace keel::disk {

namespace {

constexpr uint64_t kNbdMagic = 0x4e42444d41474943ULL;       // "NBDMAGIC"
constexpr uint64_t kOptMagic = 0x49484156454F5054ULL;       // "IHAVEOPT"
constexpr uint64_t kReplyMagic = 0x3e889045565a9ULL;
constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

constexpr uint16_t kFlagFixedNewstyle = 1, kFlagNoZeroes = 2;
constexpr uint32_t kOptExportName = 1, kOptAbort = 2, kOptList = 3, kOptInfo = 6, kOptGo = 7,
                   kOptStructuredReply = 8, kOptListMetaContext = 9, kOptSetMetaContext = 10;
constexpr uint32_t kRepAck = 1, kRepServer = 2, kRepInfo = 3, kRepMetaContext = 4;
constexpr uint32_t kRepErrUnsup = 0x80000001, kRepErrPolicy = 0x80000002, kRepErrInvalid = 0x80000003,
                   kRepErrUnknown = 0x80000006;
constexpr uint16_t kInfoExport = 0, kInfoBlockSize = 3;
constexpr uint16_t kTxHasFlags = 1, kTxReadOnly = 2, kTxSendFlush = 4, kTxSendFua = 8, kTxSendTrim = 32,
                   kTxSendWriteZeroes = 64, kTxSendDf = 128, kTxCanMultiConn = 256;
constexpr uint16_t kCmdRead = 0, kCmdWrite = 1, kCmdDisc = 2, kCmdFlush = 3, kCmdTrim = 4, kCmdCache = 5,
                   kCmdWriteZeroes = 6, kCmdBlockStatus = 7;
constexpr uint16_t kCmdFlagFua = 1, kCmdFlagReqOne = 8;
constexpr uint16_t kReplyFlagDone = 1;
constexpr uint16_t kReplyOffsetData = 1, kReplyOffsetHole = 2, kReplyBlockStatus = 5, kReplyError = 32769;
constexpr uint32_t kMetaBaseAllocation = 1;
constexpr uint32_t kStateHole = 1, kStateZero = 2;
constexpr uint32_t kMaxRequest = 32 << 20;  // as qemu-nbd

uint32_t nbd_errno(int err) {
  switch (err) {
    case EPERM: case EROFS: return 1;
    case ENOMEM: return 12;
    case EINVAL: return 22;
    case ENOSPC: case EFBIG: return 28;
    case EOVERFLOW: return 75;
    case ENOTSUP: return 95;
    default: return 5;  // EIO
  }
}

class Connection {
public:
  Connection(BlockDevice& device, const NbdServerOptions& options, UniqueFd fd)
      : device_(device), options_(options), fd_(std::move(fd)) {}

  void run() {
    auto r = handshake();
    if (!r) {
      KEEL_LOG_DEBUG("nbd handshake: {}", r.error().message());
      return;
    }
    if (!*r) return;  // aborted in negotiation
    transmission();
  }

private:
  struct Request {
    uint16_t flags;
    uint16_t type;
    uint64_t handle;
    uint64_t offset;
    uint32_t length;
    std::vector<uint8_t> data;
  };

  Result<void> recv(void* buf, size_t len) {
    size_t got = TRY(read_full(fd_.get(), buf, len));
    if (got != len) return fail(ECONNRESET, "client closed the connection");
    return ok();
  }
  Result<void> send(const void* buf, size_t len) { return write_all(fd_.get(), buf, len); }

  Result<void> send_opt_reply(uint32_t option, uint32_t type, const void* data, uint32_t len) {
    uint8_t h[20];
    store_be64(h, kReplyMagic);
    store_be32(h + 8, option);
    store_be32(h + 12, type);
    store_be32(h + 16, len);
    TRY(send(h, sizeof(h)));
    if (len) TRY(send(data, len));
    return ok();
  }

  uint16_t transmission_flags() const {
    uint16_t f = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendDf;
    if (options_.read_only || device_.read_only()) f |= kTxReadOnly;
    else f |= kTxSendTrim | kTxSendWriteZeroes;
    if (options_.max_clients > 1) f |= kTxCanMultiConn;
    return f;
  }

  bool name_ok(const std::string& name) const {
    return options_.export_name.empty() || name == options_.export_name;
  }

  // Returns false when the client aborted.
  Result<bool> handshake() {
    uint8_t hello[18];
    store_be64(hello, kNbdMagic);
    store_be64(hello + 8, kOptMagic);
    store_be16(hello + 16, kFlagFixedNewstyle | kFlagNoZeroes);
    TRY(send(hello, sizeof(hello)));
    uint8_t cf[4];
    TRY(recv(cf, 4));
    uint32_t client_flags = load_be32(cf);
    bool no_zeroes = client_flags & kFlagNoZeroes;
    while (true) {
      uint8_t oh[16];
      TRY(recv(oh, 16));
      if (load_be64(oh) != kOptMagic) return fail_invalid("bad option magic");
      uint32_t option = load_be32(oh + 8);
      uint32_t len = load_be32(oh + 12);
      if (len > 64 * 1024) return fail_invalid("option of {} bytes is too long", len);
      std::vector<uint8_t> data(len);
      if (len) TRY(recv(data.data(), len));
      switch (option) {
        case kOptExportName: {
          std::string name(data.begin(), data.end());
          if (!name_ok(name)) return fail_invalid("unknown export '{}'", name);
          uint8_t r[10 + 124] = {};
          store_be64(r, device_.size());
          store_be16(r + 8, transmission_flags());
          TRY(send(r, no_zeroes ? 10 : sizeof(r)));
          return true;
        }
        case kOptAbort:
          (void)send_opt_reply(option, kRepAck, nullptr, 0);
          return false;
        case kOptList: {
          std::string name = options_.export_name;
          std::vector<uint8_t> r(4 + name.size());
          store_be32(r.data(), static_cast<uint32_t>(name.size()));
          std::memcpy(r.data() + 4, name.data(), name.size());
          TRY(send_opt_reply(option, kRepServer, r.data(), static_cast<uint32_t>(r.size())));
          TRY(send_opt_reply(option, kRepAck, nullptr, 0));
          break;
        }
        case kOptStructuredReply:
          if (len) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          structured_ = true;
          TRY(send_opt_reply(option, kRepAck, nullptr, 0));
          break;
        case kOptListMetaContext:
        case kOptSetMetaContext: {
          if (!structured_ && option == kOptSetMetaContext) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          // export name, then queries
          if (len < 8) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          uint32_t nlen = load_be32(data.data());
          if (nlen > len - 8) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          size_t p = 4 + nlen;
          uint32_t nq = load_be32(data.data() + p);
          p += 4;
          bool want_alloc = option == kOptListMetaContext && nq == 0;
          bool bad = false;
          for (uint32_t i = 0; i < nq; ++i) {
            if (p + 4 > len) { bad = true; break; }
            uint32_t ql = load_be32(data.data() + p);
            p += 4;
            if (ql > len - p) { bad = true; break; }
            std::string q(data.begin() + static_cast<long>(p), data.begin() + static_cast<long>(p + ql));
            p += ql;
            if (q == "base:allocation" || (option == kOptListMetaContext && q == "base:")) want_alloc = true;
          }
          if (bad) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          if (option == kOptSetMetaContext) base_allocation_ = want_alloc;
          if (want_alloc) {
            const char ctx[] = "base:allocation";
            uint8_t r[4 + sizeof(ctx) - 1];
            store_be32(r, kMetaBaseAllocation);
            std::memcpy(r + 4, ctx, sizeof(ctx) - 1);
            TRY(send_opt_reply(option, kRepMetaContext, r, sizeof(r)));
          }
          TRY(send_opt_reply(option, kRepAck, nullptr, 0));
          break;
        }
        case kOptInfo:
        case kOptGo: {
          if (len < 6) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          uint32_t nlen = load_be32(data.data());
          if (nlen > len - 6) {
            TRY(send_opt_reply(option, kRepErrInvalid, nullptr, 0));
            break;
          }
          std::string name(data.begin() + 4, data.begin() + 4 + nlen);
          if (!name_ok(name)) {
            TRY(send_opt_reply(option, kRepErrUnknown, nullptr, 0));
            break;
          }
          uint8_t info[12];
          store_be16(info, kInfoExport);
          store_be64(info + 2, device_.size());
          store_be16(info + 10, transmission_flags());
          TRY(send_opt_reply(option, kRepInfo, info, sizeof(info)));
          uint8_t bs[14];
          store_be16(bs, kInfoBlockSize);
          store_be32(bs + 2, 1);
          store_be32(bs + 6, 4096);
          store_be32(bs + 10, kMaxRequest);
          TRY(send_opt_reply(option, kRepInfo, bs, sizeof(bs)));
          TRY(send_opt_reply(option, kRepAck, nullptr, 0));
          if (option == kOptGo) return true;
          break;
        }
        default:
          TRY(send_opt_reply(option, option == 5 ? kRepErrPolicy : kRepErrUnsup, nullptr, 0));
          break;
      }
    }
  }

  Result<void> send_simple(uint64_t handle, uint32_t error, const uint8_t* data, size_t len) {
    uint8_t h[16];
    store_be32(h, kSimpleReplyMagic);
    store_be32(h + 4, error);
    store_be64(h + 8, handle);
    iovec iov[2] = {{h, sizeof(h)}, {const_cast<uint8_t*>(data), len}};
    return writev_all(iov, data && len ? 2 : 1);
  }

  Result<void> send_chunk(uint64_t handle, uint16_t flags, uint16_t type, const uint8_t* payload_head,
                          size_t head_len, const uint8_t* data, size_t len) {
    uint8_t h[20];
    store_be32(h, kStructuredReplyMagic);
    store_be16(h + 4, flags);
    store_be16(h + 6, type);
    store_be64(h + 8, handle);
    store_be32(h + 16, static_cast<uint32_t>(head_len + len));
    iovec iov[3] = {{h, sizeof(h)}, {const_cast<uint8_t*>(payload_head), head_len}, {const_cast<uint8_t*>(data), len}};
    return writev_all(iov, len ? 3 : 2);
  }

  Result<void> send_error(uint64_t handle, int err) {
    if (!structured_) return send_simple(handle, nbd_errno(err), nullptr, 0);
    uint8_t p[6];
    store_be32(p, nbd_errno(err));
    store_be16(p + 4, 0);
    return send_chunk(handle, kReplyFlagDone, kReplyError, p, sizeof(p), nullptr, 0);
  }

  Result<void> writev_all(iovec* iov, int count) {
    std::lock_guard lock(send_mutex_);
    while (count > 0) {
      ssize_t n = ::writev(fd_.get(), iov, count);
      if (n < 0) {
        if (errno == EINTR) continue;
        return fail_errno("nbd send");
      }
      size_t left = static_cast<size_t>(n);
      while (count > 0 && left >= iov->iov_len) {
        left -= iov->iov_len;
        ++iov;
        --count;
      }
      if (count > 0) {
        iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
        iov->iov_len -= left;
      }
    }
    return ok();
  }

  Result<void> execute(Request& req, std::vector<uint8_t>& buf) {
    bool ro = options_.read_only || device_.read_only();
    uint64_t end = req.offset + req.length;
    bool in_range = end >= req.offset && end <= device_.size();
    switch (req.type) {
      case kCmdRead: {
        if (!in_range) return send_error(req.handle, EINVAL);
        if (buf.size() < req.length) buf.resize(req.length);
        if (structured_) {
          // Holes become OFFSET_HOLE chunks, so the client learns about them without data.
          auto ex = device_.block_status(req.offset, req.length);
          if (ex && !ex->empty() && std::all_of(ex->begin(), ex->end(), [](const Extent& e) { return e.zero; }) &&
              req.length > 0) {
            uint8_t p[12];
            store_be64(p, req.offset);
            store_be32(p + 8, req.length);
            return send_chunk(req.handle, kReplyFlagDone, kReplyOffsetHole, p, sizeof(p), nullptr, 0);
          }
          auto r = device_.read(req.offset, std::span<uint8_t>(buf.data(), req.length));
          if (!r) return send_error(req.handle, r.error().code());
          uint8_t p[8];
          store_be64(p, req.offset);
          return send_chunk(req.handle, kReplyFlagDone, kReplyOffsetData, p, sizeof(p), buf.data(), req.length);
        }
        auto r = device_.read(req.offset, std::span<uint8_t>(buf.data(), req.length));
        if (!r) return send_error(req.handle, r.error().code());
        return send_simple(req.handle, 0, buf.data(), req.length);
      }
      case kCmdWrite: {
        if (ro) return send_error(req.handle, EPERM);
        if (!in_range) return send_error(req.handle, ENOSPC);
        auto r = device_.write(req.offset, req.data);
        if (r && (req.flags & kCmdFlagFua)) r = device_.flush();
        if (!r) return send_error(req.handle, r.error().code());
        return reply_ok(req.handle);
      }
      case kCmdFlush: {
        auto r = device_.flush();
        if (!r) return send_error(req.handle, r.error().code());
        return reply_ok(req.handle);
      }
      case kCmdTrim: {
        if (ro) return send_error(req.handle, EPERM);
        if (!in_range) return send_error(req.handle, EINVAL);
        auto r = device_.discard(req.offset, req.length);
        if (!r) return send_error(req.handle, r.error().code());
        return reply_ok(req.handle);
      }
      case kCmdWriteZeroes: {
        if (ro) return send_error(req.handle, EPERM);
        if (!in_range) return send_error(req.handle, ENOSPC);
        auto r = device_.write_zeroes(req.offset, req.length);
        if (r && (req.flags & kCmdFlagFua)) r = device_.flush();
        if (!r) return send_error(req.handle, r.error().code());
        return reply_ok(req.handle);
      }
      case kCmdCache:
        return reply_ok(req.handle);
      case kCmdBlockStatus: {
        if (!structured_ || !base_allocation_) return send_error(req.handle, EINVAL);
        if (!in_range || req.length == 0) return send_error(req.handle, EINVAL);
        auto ex = device_.block_status(req.offset, req.length);
        if (!ex) return send_error(req.handle, ex.error().code());
        std::vector<uint8_t> p(4);
        store_be32(p.data(), kMetaBaseAllocation);
        for (auto& e : *ex) {
          uint32_t flags = (e.data ? 0 : kStateHole) | (e.zero ? kStateZero : 0);
          uint64_t len = e.length;
          while (len > 0) {
            uint32_t piece = static_cast<uint32_t>(std::min<uint64_t>(len, 0x80000000u));
            size_t at = p.size();
            p.resize(at + 8);
            // Merge with the previous descriptor when the flags match.
            if (at > 4 && load_be32(p.data() + at - 4) == flags) {
              p.resize(at);
              store_be32(p.data() + at - 8, load_be32(p.data() + at - 8) + piece);
            } else {
              store_be32(p.data() + at, piece);
              store_be32(p.data() + at + 4, flags);
            }
            len -= piece;
          }
          if (req.flags & kCmdFlagReqOne) break;
        }
        if (req.flags & kCmdFlagReqOne) p.resize(12);
        return send_chunk(req.handle, kReplyFlagDone, kReplyBlockStatus, p.data(), p.size(), nullptr, 0);
      }
      default:
        return send_error(req.handle, EINVAL);
    }
  }

  Result<void> reply_ok(uint64_t handle) {
    if (!structured_) return send_simple(handle, 0, nullptr, 0);
    return send_simple(handle, 0, nullptr, 0);  // simple replies are valid for non-read commands
  }

  void transmission() {
    // Workers: run requests concurrently (the device is thread-safe); replies may be out of order.
    const int workers = 4;
    std::mutex mu;
    std::condition_variable cv_work, cv_space;
    std::deque<Request> queue;
    std::vector<std::vector<uint8_t>> pool;
    bool stopping = false;
    std::atomic<bool> broken{false};
    std::vector<std::thread> threads;
    for (int i = 0; i < workers; ++i) {
      threads.emplace_back([&] {
        std::vector<uint8_t> buf;
        while (true) {
          Request req;
          {
            std::unique_lock lk(mu);
            cv_work.wait(lk, [&] { return stopping || !queue.empty(); });
            if (queue.empty()) return;
            req = std::move(queue.front());
            queue.pop_front();
            cv_space.notify_one();
          }
          auto r = execute(req, buf);
          if (!r) broken = true;
          std::lock_guard lk(mu);
          if (req.data.capacity() && pool.size() < 16) {
            req.data.clear();
            pool.push_back(std::move(req.data));
          }
        }
      });
    }
    while (!broken) {
      uint8_t h[28];
      if (!recv(h, sizeof(h))) break;
      if (load_be32(h) != kRequestMagic) break;
      Request req;
      req.flags = load_be16(h + 4);
      req.type = load_be16(h + 6);
      req.handle = load_be64(h + 8);
      req.offset = load_be64(h + 16);
      req.length = load_be32(h + 24);
      if (req.type == kCmdDisc) break;
      if ((req.type == kCmdRead || req.type == kCmdWrite) && req.length > kMaxRequest) break;
      if (req.type == kCmdWrite) {
        {
          std::lock_guard lk(mu);
          if (!pool.empty()) {
            req.data = std::move(pool.back());
            pool.pop_back();
          }
        }
        req.data.resize(req.length);
        if (!recv(req.data.data(), req.length)) break;
      }
      std::unique_lock lk(mu);
      cv_space.wait(lk, [&] { return queue.size() < 64; });
      queue.push_back(std::move(req));
      cv_work.notify_one();
    }
    {
      std::lock_guard lk(mu);
      stopping = true;
    }
    cv_work.notify_all();
    for (auto& t : threads) t.join();
    (void)device_.flush();
  }

  BlockDevice& device_;
  const NbdServerOptions& options_;
  UniqueFd fd_;
  std::mutex send_mutex_;
  bool structured_ = false;
  bool base_allocation_ = false;
};

}  // namespace

Result<void> serve_nbd(BlockDevice& device, const NbdServerOptions& options) {
  ignore_sigpipe();
  UniqueFd sigfd = TRY(block_signals_to_fd({SIGINT, SIGTERM}));
  UniqueFd listener;
  if (!options.socket_path.empty()) {
    int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return fail_errno("socket");
    listener.reset(s);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (options.socket_path.size() >= sizeof(addr.sun_path))
      return fail_invalid("socket path {} is too long", options.socket_path);
    std::strcpy(addr.sun_path, options.socket_path.c_str());
    ::unlink(options.socket_path.c_str());
    if (::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0)
      return fail_errno("bind " + options.socket_path);
  } else {
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return fail_errno("socket");
    listener.reset(s);
    int one = 1;
    ::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(options.port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0)
      return fail_errno(fmt::format("bind 127.0.0.1:{}", options.port));
  }
  if (::listen(listener.get(), 16) < 0) return fail_errno("listen");

  std::mutex mu;
  std::condition_variable cv;
  int active = 0;
  int served = 0;
  std::list<std::thread> threads;
  std::vector<int> client_fds;
  bool stop = false;
  while (!stop) {
    pollfd fds[2] = {{listener.get(), POLLIN, 0}, {sigfd.get(), POLLIN, 0}};
    int n = ::poll(fds, 2, 200);
    if (n < 0 && errno != EINTR) return fail_errno("poll");
    if (fds[1].revents & POLLIN) {
      (void)read_signal(sigfd.get());
      std::lock_guard lk(mu);
      for (int fd : client_fds) ::shutdown(fd, SHUT_RDWR);  // wakes their reader threads
      break;
    }
    {
      std::lock_guard lk(mu);
      if (!options.persistent && served > 0 && active == 0) break;
    }
    if (!(fds[0].revents & POLLIN)) continue;
    int c = ::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    UniqueFd client(c);
    {
      std::lock_guard lk(mu);
      if (active >= options.max_clients) continue;  // closes the connection
      ++active;
      ++served;
      client_fds.push_back(c);
    }
    int one = 1;
    ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    threads.emplace_back([&, fd = std::move(client)]() mutable {
      int raw_fd = fd.get();
      Connection conn(device, options, std::move(fd));
      conn.run();
      {
        // Forget the fd before the connection closes it, so a signal never shuts down a reused fd.
        std::lock_guard lk(mu);
        --active;
        std::erase(client_fds, raw_fd);
      }
      cv.notify_all();
    });
  }
  // Wait for clients still connected (on a signal: they are cut off when their sockets close).
  for (auto& t : threads) t.join();
  if (!options.socket_path.empty()) ::unlink(options.socket_path.c_str());
  return device.flush();
}

}  // namespace keel::disk
