#include "hostd/http.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <random>

#include <fmt/format.h>

#include "base/log.h"

namespace keel::hostd {

using nlohmann::json;

namespace {

class PlainStream : public Stream {
public:
  explicit PlainStream(UniqueFd fd) : fd_(std::move(fd)) {}
  Result<size_t> read_some(void* buf, size_t len) override {
    for (;;) {
      ssize_t n = ::read(fd_.get(), buf, len);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail_errno("read");
      return static_cast<size_t>(n);
    }
  }
  Result<void> write_all(const void* buf, size_t len) override {
    const char* p = static_cast<const char*>(buf);
    while (len > 0) {
      ssize_t n = ::send(fd_.get(), p, len, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail_errno("write");
      p += n;
      len -= static_cast<size_t>(n);
    }
    return ok();
  }
  int fd() const override { return fd_.get(); }

private:
  UniqueFd fd_;
};

std::string ssl_error() {
  unsigned long e = ERR_get_error();
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

class TlsStream : public Stream {
public:
  TlsStream(UniqueFd fd, SSL* ssl) : fd_(std::move(fd)), ssl_(ssl) {}
  ~TlsStream() override {
    SSL_shutdown(ssl_);
    SSL_free(ssl_);
  }
  Result<size_t> read_some(void* buf, size_t len) override {
    int n = SSL_read(ssl_, buf, static_cast<int>(std::min<size_t>(len, 1 << 30)));
    if (n > 0) return static_cast<size_t>(n);
    int err = SSL_get_error(ssl_, n);
    if (err == SSL_ERROR_ZERO_RETURN || err == SSL_ERROR_SYSCALL) return size_t{0};
    return fail(EIO, "TLS read: " + ssl_error());
  }
  Result<void> write_all(const void* buf, size_t len) override {
    const char* p = static_cast<const char*>(buf);
    while (len > 0) {
      int n = SSL_write(ssl_, p, static_cast<int>(std::min<size_t>(len, 1 << 30)));
      if (n <= 0) return fail(EIO, "TLS write: " + ssl_error());
      p += n;
      len -= static_cast<size_t>(n);
    }
    return ok();
  }
  int fd() const override { return fd_.get(); }

private:
  UniqueFd fd_;
  SSL* ssl_;
};

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  size_t e = s.find_last_not_of(" \t");
  return std::string(s.substr(b, e - b + 1));
}

std::vector<std::string> split_path(std::string_view path) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string_view::npos) j = path.size();
    if (j > i) out.emplace_back(path.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

std::string base64(const unsigned char* data, size_t len) {
  std::string out(4 * ((len + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data, static_cast<int>(len));
  out.resize(static_cast<size_t>(n));
  return out;
}

}  // namespace

std::unique_ptr<Stream> make_plain_stream(UniqueFd fd) { return std::make_unique<PlainStream>(std::move(fd)); }

std::string_view status_text(int status) {
  switch (status) {
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 426: return "Upgrade Required";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Unknown";
  }
}

HttpResponse HttpResponse::json(int status, const nlohmann::json& j) {
  HttpResponse r;
  r.status = status;
  r.body = j.dump();
  return r;
}

HttpResponse HttpResponse::error(int status, std::string_view message) {
  return json(status, {{"error", {{"code", status}, {"kind", status_text(status)}, {"message", message}}}});
}

std::string url_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else if (s[i] == '+') {
      out += ' ';
    } else {
      out += s[i];
    }
  }
  return out;
}

std::string url_encode(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || c == '/') out += static_cast<char>(c);
    else out += fmt::format("%{:02X}", c);
  }
  return out;
}

Result<HttpRequest> parse_request_head(std::string_view head) {
  HttpRequest req;
  size_t eol = head.find("\r\n");
  std::string_view line = head.substr(0, eol);
  size_t sp1 = line.find(' ');
  size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp1 == std::string_view::npos || sp2 == std::string_view::npos) return fail_invalid("malformed request line");
  req.method = std::string(line.substr(0, sp1));
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string_view version = line.substr(sp2 + 1);
  if (version != "HTTP/1.1" && version != "HTTP/1.0") return fail_invalid("unsupported HTTP version");
  if (req.method.empty() || target.empty() || target[0] != '/') return fail_invalid("malformed request target");
  for (char c : req.method)
    if (!isupper(static_cast<unsigned char>(c))) return fail_invalid("malformed method");
  size_t q = target.find('?');
  req.path = url_decode(target.substr(0, q));
  if (q != std::string_view::npos) {
    std::string_view qs = target.substr(q + 1);
    size_t i = 0;
    while (i <= qs.size()) {
      size_t amp = qs.find('&', i);
      if (amp == std::string_view::npos) amp = qs.size();
      std::string_view kv = qs.substr(i, amp - i);
      if (!kv.empty()) {
        size_t eq = kv.find('=');
        if (eq == std::string_view::npos) req.query[url_decode(kv)] = "";
        else req.query[url_decode(kv.substr(0, eq))] = url_decode(kv.substr(eq + 1));
      }
      i = amp + 1;
    }
  }
  while (eol != std::string_view::npos) {
    size_t start = eol + 2;
    eol = head.find("\r\n", start);
    std::string_view h = head.substr(start, eol == std::string_view::npos ? std::string_view::npos : eol - start);
    if (h.empty()) continue;
    size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) return fail_invalid("malformed header line");
    req.headers[lower(std::string(h.substr(0, colon)))] = trim(h.substr(colon + 1));
  }
  return req;
}

Result<std::optional<HttpRequest>> read_request_head(Stream& s, std::string& carry) {
  size_t head_end;
  while ((head_end = carry.find("\r\n\r\n")) == std::string::npos) {
    if (carry.size() > kMaxHead) return fail_invalid("request head larger than {} bytes", kMaxHead);
    char buf[4096];
    size_t n = TRY(s.read_some(buf, sizeof buf));
    if (n == 0) {
      if (carry.empty()) return std::optional<HttpRequest>();
      return fail_invalid("connection closed in the middle of a request");
    }
    carry.append(buf, n);
  }
  if (head_end > kMaxHead) return fail_invalid("request head larger than {} bytes", kMaxHead);
  HttpRequest req = TRY(parse_request_head(std::string_view(carry).substr(0, head_end)));
  carry.erase(0, head_end + 4);
  if (!req.header("transfer-encoding").empty()) return fail_invalid("chunked request bodies are not supported");
  return std::optional<HttpRequest>(std::move(req));
}

Result<uint64_t> content_length(const HttpRequest& req) {
  std::string cl = req.header("content-length");
  if (cl.empty()) return uint64_t{0};
  if (cl.size() > 15 || cl.find_first_not_of("0123456789") != std::string::npos) return fail_invalid("bad Content-Length");
  return std::stoull(cl);
}

Result<void> read_request_body(Stream& s, std::string& carry, HttpRequest& req) {
  uint64_t len = TRY(content_length(req));
  if (len > kMaxBody) return fail(E2BIG, fmt::format("request body larger than {} bytes", kMaxBody));
  while (carry.size() < len) {
    char buf[16384];
    size_t n = TRY(s.read_some(buf, std::min<size_t>(sizeof buf, len - carry.size())));
    if (n == 0) return fail_invalid("connection closed in the middle of a request body");
    carry.append(buf, n);
  }
  req.body = carry.substr(0, len);
  carry.erase(0, len);
  return ok();
}

Result<std::optional<HttpRequest>> read_request(Stream& s, std::string& carry) {
  auto req = TRY(read_request_head(s, carry));
  if (!req) return req;
  TRY(read_request_body(s, carry, *req));
  return req;
}

std::string websocket_accept_key(const std::string& client_key) {
  std::string s = client_key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(s.data()), s.size(), digest);
  return base64(digest, sizeof digest);
}

Result<void> ws_write(Stream& s, WsOpcode op, std::string_view payload, bool mask) {
  std::string f;
  f += static_cast<char>(0x80 | static_cast<uint8_t>(op));
  uint8_t mask_bit = mask ? 0x80 : 0;
  if (payload.size() < 126) {
    f += static_cast<char>(mask_bit | payload.size());
  } else if (payload.size() <= 0xffff) {
    f += static_cast<char>(mask_bit | 126);
    f += static_cast<char>(payload.size() >> 8);
    f += static_cast<char>(payload.size() & 0xff);
  } else {
    f += static_cast<char>(mask_bit | 127);
    for (int i = 7; i >= 0; --i) f += static_cast<char>((static_cast<uint64_t>(payload.size()) >> (8 * i)) & 0xff);
  }
  if (mask) {
    static thread_local std::mt19937 rng(std::random_device{}());
    uint8_t key[4];
    for (auto& k : key) k = static_cast<uint8_t>(rng());
    f.append(reinterpret_cast<char*>(key), 4);
    size_t start = f.size();
    f.append(payload);
    for (size_t i = 0; i < payload.size(); ++i) f[start + i] = static_cast<char>(f[start + i] ^ key[i % 4]);
  } else {
    f.append(payload);
  }
  return s.write_all(f);
}

Result<std::optional<WsFrame>> ws_read(Stream& s, std::string& carry, size_t max_payload) {
  auto need = [&](size_t n) -> Result<bool> {
    while (carry.size() < n) {
      char buf[16384];
      size_t got = TRY(s.read_some(buf, sizeof buf));
      if (got == 0) return false;
      carry.append(buf, got);
    }
    return true;
  };
  if (!TRY(need(2))) return std::optional<WsFrame>();
  uint8_t b0 = static_cast<uint8_t>(carry[0]), b1 = static_cast<uint8_t>(carry[1]);
  bool masked = b1 & 0x80;
  uint64_t len = b1 & 0x7f;
  size_t header = 2;
  if (len == 126) {
    if (!TRY(need(4))) return std::optional<WsFrame>();
    len = (static_cast<uint8_t>(carry[2]) << 8) | static_cast<uint8_t>(carry[3]);
    header = 4;
  } else if (len == 127) {
    if (!TRY(need(10))) return std::optional<WsFrame>();
    len = 0;
    for (int i = 0; i < 8; ++i) len = (len << 8) | static_cast<uint8_t>(carry[2 + i]);
    header = 10;
  }
  if (len > max_payload) return fail_invalid("WebSocket frame of {} bytes is larger than {}", len, max_payload);
  size_t mask_at = header;
  if (masked) header += 4;
  if (!TRY(need(header + len))) return std::optional<WsFrame>();
  WsFrame f;
  f.opcode = static_cast<WsOpcode>(b0 & 0x0f);
  f.payload = carry.substr(header, len);
  if (masked)
    for (size_t i = 0; i < len; ++i) f.payload[i] = static_cast<char>(f.payload[i] ^ carry[mask_at + i % 4]);
  carry.erase(0, header + len);
  return std::optional<WsFrame>(std::move(f));
}

HttpServer::~HttpServer() { stop(); }

void write_response(Stream& s, const HttpResponse& resp, bool close) {
  std::string out = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n", resp.status,
                                status_text(resp.status), resp.content_type, resp.body.size());
  for (auto& [k, v] : resp.headers) out += fmt::format("{}: {}\r\n", k, v);
  if (close) out += "Connection: close\r\n";
  out += "\r\n";
  out += resp.body;
  (void)s.write_all(out);
}

void HttpServer::streaming(const std::string& method, const std::string& pattern, UpgradeHandler h) {
  Route r{method, split_path(pattern), {}, {}, {}, {}};
  r.stream = std::move(h);
  routes_.push_back(std::move(r));
}

void HttpServer::route(const std::string& method, const std::string& pattern, Handler h) {
  routes_.push_back(Route{method, split_path(pattern), std::move(h), {}, {}, {}});
}

void HttpServer::websocket(const std::string& pattern, UpgradeHandler h, Handler fallback, UpgradeHandler raw) {
  routes_.push_back(Route{"GET", split_path(pattern), std::move(fallback), std::move(h), std::move(raw), {}});
}

const HttpServer::Route* HttpServer::match(const HttpRequest& req, std::map<std::string, std::string>& params,
                                           bool& path_matched) const {
  // The route with the most literal segments wins: /v1/domains/{name}/disks before
  // /v1/domains/{name}/{action}.
  auto segs = split_path(req.path);
  const Route* best = nullptr;
  int best_literals = -1;
  for (auto& r : routes_) {
    if (r.segments.size() != segs.size()) continue;
    std::map<std::string, std::string> p;
    bool good = true;
    int literals = 0;
    for (size_t i = 0; i < segs.size() && good; ++i) {
      auto& pat = r.segments[i];
      if (pat.size() > 2 && pat.front() == '{' && pat.back() == '}') {
        p[pat.substr(1, pat.size() - 2)] = segs[i];
      } else {
        good = pat == segs[i];
        ++literals;
      }
    }
    if (!good) continue;
    path_matched = true;
    if (r.method != req.method || literals <= best_literals) continue;
    best = &r;
    best_literals = literals;
    params = std::move(p);
  }
  return best;
}

HttpResponse HttpServer::dispatch(HttpRequest& req, bool over_tcp) {
  if (filter_) {
    if (auto rejected = filter_(req, over_tcp)) return *rejected;
  }
  bool path_matched = false;
  const Route* r = match(req, req.params, path_matched);
  if (!r) {
    if (path_matched) return HttpResponse::error(405, fmt::format("{} is not allowed on {}", req.method, req.path));
    return HttpResponse::error(404, fmt::format("no such endpoint: {} {}", req.method, req.path));
  }
  if (!r->handler) return HttpResponse::error(400, "this endpoint needs a WebSocket upgrade");
  try {
    return r->handler(req);
  } catch (const std::exception& e) {
    KEEL_LOG_ERROR("handler {} {}: {}", req.method, req.path, e.what());
    return HttpResponse::error(500, fmt::format("internal error: {}", e.what()));
  }
}

Result<void> HttpServer::listen_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return fail_invalid("socket path too long: {}", path);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  ::unlink(path.c_str());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) return fail_errno("bind " + path);
  ::chmod(path.c_str(), 0600);  // the unix socket is root's: file permissions are its access control
  if (::listen(fd.get(), 128) < 0) return fail_errno("listen " + path);
  listeners_.push_back(std::make_unique<Listener>(Listener{std::move(fd), false}));
  return ok();
}

Result<void> HttpServer::listen_tls(const std::string& host_port, const std::string& cert, const std::string& key) {
  auto colon = host_port.rfind(':');
  if (colon == std::string::npos) return fail_invalid("--listen: '{}' must be HOST:PORT", host_port);
  std::string host = host_port.substr(0, colon);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  std::string port = host_port.substr(colon + 1);
  if (!ssl_ctx_) {
    ssl_ctx_ = SSL_CTX_new(TLS_server_method());
    if (!ssl_ctx_) return fail(EIO, "SSL_CTX_new: " + ssl_error());
    SSL_CTX_set_min_proto_version(ssl_ctx_, TLS1_2_VERSION);
    if (SSL_CTX_use_certificate_chain_file(ssl_ctx_, cert.c_str()) != 1)
      return fail_invalid("--tls-cert {}: {}", cert, ssl_error());
    if (SSL_CTX_use_PrivateKey_file(ssl_ctx_, key.c_str(), SSL_FILETYPE_PEM) != 1)
      return fail_invalid("--tls-key {}: {}", key, ssl_error());
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return fail_invalid("--listen {}: {}", host_port, gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(res, freeaddrinfo);
  UniqueFd fd(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd.get(), res->ai_addr, res->ai_addrlen) < 0) return fail_errno("bind " + host_port);
  if (::listen(fd.get(), 128) < 0) return fail_errno("listen " + host_port);
  listeners_.push_back(std::make_unique<Listener>(Listener{std::move(fd), true}));
  return ok();
}

void HttpServer::start() {
  for (auto& l : listeners_) accept_threads_.emplace_back([this, lp = l.get()] { accept_loop(*lp); });
}

void HttpServer::stop() {
  stopping_ = true;
  for (auto& l : listeners_) ::shutdown(l->fd.get(), SHUT_RDWR);
  for (auto& t : accept_threads_)
    if (t.joinable()) t.join();
  accept_threads_.clear();
  if (ssl_ctx_) {
    SSL_CTX_free(ssl_ctx_);
    ssl_ctx_ = nullptr;
  }
}

void HttpServer::accept_loop(Listener& l) {
  while (!stopping_) {
    int c = ::accept4(l.fd.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopping_) return;
      if (errno == EMFILE || errno == ENFILE) {
        ::usleep(10000);
        continue;
      }
      return;
    }
    UniqueFd fd(c);
    bool tls = l.tls;
    // Bounded: a flood of connections cannot exhaust keeld's threads.
    if (connections_.fetch_add(1) >= kMaxConnections) {
      connections_.fetch_sub(1);
      continue;
    }
    // A client that goes quiet in the middle of a request is dropped (cleared for WebSockets).
    timeval idle{kIdleSeconds, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
    std::thread([this, f = std::move(fd), tls]() mutable {
      struct Release {
        std::atomic<int>& n;
        ~Release() { n.fetch_sub(1); }
      } release{connections_};
      std::unique_ptr<Stream> s;
      if (tls) {
        // Bound the handshake so a silent client cannot hold a thread forever.
        timeval tv{10, 0};
        ::setsockopt(f.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        SSL* ssl = SSL_new(ssl_ctx_);
        SSL_set_fd(ssl, f.get());
        if (SSL_accept(ssl) != 1) {
          SSL_free(ssl);
          return;
        }
        timeval idle{kIdleSeconds, 0};
        ::setsockopt(f.get(), SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
        s = std::make_unique<TlsStream>(std::move(f), ssl);
      } else {
        s = make_plain_stream(std::move(f));
      }
      serve(std::move(s), tls);
    }).detach();
  }
}

void HttpServer::serve(std::unique_ptr<Stream> s, bool over_tcp) {
  std::string carry;
  for (;;) {
    auto req = read_request_head(*s, carry);
    if (!req && (req.error().code() == EAGAIN || req.error().code() == EWOULDBLOCK)) return;  // idle
    if (req && *req) {
      // Streaming routes read the body themselves (volume uploads larger than kMaxBody).
      bool path_matched = false;
      std::map<std::string, std::string> params;
      const Route* r = match(**req, params, path_matched);
      if (r && r->stream) {
        if (auto rejected = filter_ ? filter_(**req, over_tcp) : std::nullopt) {
          write_response(*s, *rejected, true);
          return;
        }
        (*req)->params = std::move(params);
        (*req)->headers["x-keel-carry"] = std::move(carry);
        r->stream(**req, *s);
        return;
      }
      if (auto b = read_request_body(*s, carry, **req); !b) req = fail(b.error());
    }
    if (!req) {
      int status = req.error().code() == E2BIG ? 413 : 400;
      HttpResponse r = HttpResponse::error(status, req.error().message());
      std::string out = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n"
                                    "Connection: close\r\n\r\n{}",
                                    r.status, status_text(r.status), r.body.size(), r.body);
      (void)s->write_all(out);
      return;
    }
    if (!*req) return;
    HttpRequest& rq = **req;
    bool close = lower(rq.header("connection")) == "close";
    // WebSocket upgrade.
    if (lower(rq.header("upgrade")) == "websocket") {
      std::optional<HttpResponse> rejected;
      if (filter_) rejected = filter_(rq, over_tcp);
      bool path_matched = false;
      const Route* r = rejected ? nullptr : match(rq, rq.params, path_matched);
      if (!rejected && (!r || !r->upgrade)) rejected = HttpResponse::error(404, "no WebSocket endpoint here");
      // The route's plain handler vets the upgrade first: 426 means "go ahead", anything else is
      // the answer (e.g. 409 for the console of a domain that is not running).
      if (!rejected && r->handler) {
        HttpResponse check = r->handler(rq);
        if (check.status != 426) rejected = check;
      }
      if (!rejected && rq.header("sec-websocket-key").empty())
        rejected = HttpResponse::error(400, "missing Sec-WebSocket-Key");
      if (rejected) {
        std::string out = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n"
                                      "Connection: close\r\n\r\n{}",
                                      rejected->status, status_text(rejected->status), rejected->body.size(),
                                      rejected->body);
        (void)s->write_all(out);
        return;
      }
      std::string out = fmt::format("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                    "Sec-WebSocket-Accept: {}\r\n\r\n",
                                    websocket_accept_key(rq.header("sec-websocket-key")));
      if (!s->write_all(out)) return;
      // Bytes the client sent after its request belong to the WebSocket; handlers read frames with
      // their own carry buffer, so hand these over through the request.
      rq.headers["x-keel-carry"] = carry;
      timeval none{0, 0};
      ::setsockopt(s->fd(), SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
      r->upgrade(rq, *s);
      return;
    }
    {
      bool path_matched = false;
      std::map<std::string, std::string> params;
      const Route* r = match(rq, params, path_matched);
      if (r && r->raw && !(filter_ && filter_(rq, over_tcp))) {
        rq.params = std::move(params);
        timeval none{0, 0};
        ::setsockopt(s->fd(), SOL_SOCKET, SO_RCVTIMEO, &none, sizeof none);
        r->raw(rq, *s);
        return;
      }
    }
    HttpResponse resp = dispatch(rq, over_tcp);
    std::string out = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n", resp.status,
                                  status_text(resp.status), resp.content_type, resp.body.size());
    for (auto& [k, v] : resp.headers) out += fmt::format("{}: {}\r\n", k, v);
    if (close) out += "Connection: close\r\n";
    out += "\r\n";
    out += resp.body;
    if (!s->write_all(out) || close) return;
  }
}

// ---- client ----

Result<ConnectTarget> parse_connect_uri(const std::string& uri) {
  ConnectTarget t;
  if (uri.rfind("unix:", 0) == 0) {
    t.unix_path = uri.substr(5);
    if (t.unix_path.rfind("//", 0) == 0) t.unix_path = t.unix_path.substr(2);
    if (t.unix_path.empty()) return fail_invalid("--connect: 'unix:' needs a socket path");
    return t;
  }
  if (uri.rfind("https://", 0) == 0) {
    std::string rest = uri.substr(8);
    auto slash = rest.find('/');
    if (slash != std::string::npos) rest = rest.substr(0, slash);
    auto colon = rest.rfind(':');
    if (colon == std::string::npos) {
      t.host = rest;
      t.port = 443;
    } else {
      t.host = rest.substr(0, colon);
      std::string port = rest.substr(colon + 1);
      if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos)
        return fail_invalid("--connect: bad port in '{}'", uri);
      t.port = std::stoi(port);
    }
    if (t.host.size() > 2 && t.host.front() == '[') t.host = t.host.substr(1, t.host.size() - 2);
    return t;
  }
  return fail_invalid("--connect: '{}' is not unix:PATH or https://HOST:PORT", uri);
}

Result<std::unique_ptr<Stream>> connect_stream(const ConnectTarget& t) {
  if (!t.unix_path.empty()) {
    sockaddr_un addr{};
    if (t.unix_path.size() >= sizeof addr.sun_path) return fail_invalid("socket path too long: {}", t.unix_path);
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, t.unix_path.data(), t.unix_path.size());
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return fail_errno("socket");
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0)
      return fail(Error::from_errno("connect to keeld at " + t.unix_path));
    return make_plain_stream(std::move(fd));
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string port = std::to_string(t.port);
  int rc = ::getaddrinfo(t.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return fail_invalid("{}: {}", t.host, gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> guard(res, freeaddrinfo);
  UniqueFd fd(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  if (::connect(fd.get(), res->ai_addr, res->ai_addrlen) < 0)
    return fail(Error::from_errno(fmt::format("connect to keeld at {}:{}", t.host, t.port)));
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  static SSL_CTX* ctx = [] {
    SSL_CTX* c = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    return c;
  }();
  SSL* ssl = SSL_new(ctx);
  if (t.insecure) {
    SSL_set_verify(ssl, SSL_VERIFY_NONE, nullptr);
  } else {
    SSL_set_verify(ssl, SSL_VERIFY_PEER, nullptr);
    X509_STORE* store = SSL_CTX_get_cert_store(ctx);
    if (!t.ca_file.empty()) X509_STORE_load_file(store, t.ca_file.c_str());
    else SSL_CTX_set_default_verify_paths(ctx);
    SSL_set1_host(ssl, t.host.c_str());
  }
  SSL_set_tlsext_host_name(ssl, t.host.c_str());
  SSL_set_fd(ssl, fd.get());
  if (SSL_connect(ssl) != 1) {
    std::string e = ssl_error();
    SSL_free(ssl);
    return fail(EIO, fmt::format("TLS handshake with {}:{}: {}", t.host, t.port, e));
  }
  return std::unique_ptr<Stream>(new TlsStream(std::move(fd), ssl));
}

namespace {
Result<HttpClientResponse> read_response(Stream& s, std::string& carry, bool head_only) {
  size_t head_end;
  while ((head_end = carry.find("\r\n\r\n")) == std::string::npos) {
    if (carry.size() > kMaxHead) return fail_invalid("response head too large");
    char buf[8192];
    size_t n = TRY(s.read_some(buf, sizeof buf));
    if (n == 0) return fail(ECONNRESET, "keeld closed the connection");
    carry.append(buf, n);
  }
  std::string_view head(carry.data(), head_end);
  HttpClientResponse r;
  if (head.size() < 12 || head.substr(0, 5) != "HTTP/") return fail_invalid("malformed HTTP response");
  r.status = std::atoi(std::string(head.substr(9, 3)).c_str());
  size_t eol = head.find("\r\n");
  while (eol != std::string_view::npos) {
    size_t start = eol + 2;
    eol = head.find("\r\n", start);
    std::string_view h = head.substr(start, eol == std::string_view::npos ? std::string_view::npos : eol - start);
    size_t colon = h.find(':');
    if (colon != std::string_view::npos) r.headers[lower(std::string(h.substr(0, colon)))] = trim(h.substr(colon + 1));
  }
  carry.erase(0, head_end + 4);
  if (head_only) return r;
  auto it = r.headers.find("content-length");
  if (it != r.headers.end()) {
    size_t len = std::strtoull(it->second.c_str(), nullptr, 10);
    if (len > (size_t{1} << 31)) return fail_invalid("response too large");
    while (carry.size() < len) {
      char buf[65536];
      size_t n = TRY(s.read_some(buf, sizeof buf));
      if (n == 0) return fail(ECONNRESET, "keeld closed the connection mid-response");
      carry.append(buf, n);
    }
    r.body = carry.substr(0, len);
    carry.erase(0, len);
  } else {
    for (;;) {
      char buf[65536];
      size_t n = TRY(s.read_some(buf, sizeof buf));
      if (n == 0) break;
      carry.append(buf, n);
    }
    r.body = std::move(carry);
  }
  return r;
}

std::string request_head(const ConnectTarget& t, const std::string& method, const std::string& path) {
  std::string head = fmt::format("{} {} HTTP/1.1\r\nHost: {}\r\n", method, path, t.unix_path.empty() ? t.host : "keeld");
  if (!t.token.empty()) head += fmt::format("Authorization: Bearer {}\r\n", t.token);
  return head;
}
}  // namespace

Result<HttpClientResponse> http_request(const ConnectTarget& t, const std::string& method, const std::string& path,
                                        const std::string& body) {
  auto s = TRY(connect_stream(t));
  std::string req = request_head(t, method, path);
  req += fmt::format("Content-Length: {}\r\nConnection: close\r\n", body.size());
  if (!body.empty()) req += "Content-Type: application/json\r\n";
  req += "\r\n";
  req += body;
  TRY(s->write_all(req));
  std::string carry;
  return read_response(*s, carry, false);
}

Result<HttpClientResponse> http_upload(const ConnectTarget& t, const std::string& method, const std::string& path,
                                       int fd, uint64_t size) {
  auto s = TRY(connect_stream(t));
  std::string req = request_head(t, method, path);
  req += fmt::format("Content-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n", size);
  TRY(s->write_all(req));
  std::vector<char> buf(1 << 20);
  uint64_t sent = 0;
  while (sent < size) {
    ssize_t n = ::read(fd, buf.data(), static_cast<size_t>(std::min<uint64_t>(buf.size(), size - sent)));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno("read");
    if (n == 0) return fail_invalid("file shrank while uploading");
    // keeld may answer early (an error) and close: its reply says why.
    if (!s->write_all(buf.data(), static_cast<size_t>(n))) break;
    sent += static_cast<uint64_t>(n);
  }
  std::string carry;
  return read_response(*s, carry, false);
}

Result<HttpClientResponse> http_download(const ConnectTarget& t, const std::string& path, int out_fd) {
  auto s = TRY(connect_stream(t));
  std::string req = request_head(t, "GET", path) + "Content-Length: 0\r\nConnection: close\r\n\r\n";
  TRY(s->write_all(req));
  std::string carry;
  auto r = TRY(read_response(*s, carry, true));
  if (r.status < 200 || r.status >= 300) {
    for (;;) {
      char buf[4096];
      size_t n = TRY(s->read_some(buf, sizeof buf));
      if (n == 0 || carry.size() > 65536) break;
      carry.append(buf, n);
    }
    r.body = std::move(carry);
    return r;
  }
  uint64_t want = std::strtoull(r.headers["content-length"].c_str(), nullptr, 10);
  uint64_t got = carry.size();
  TRY(write_all(out_fd, carry.data(), carry.size()));
  std::vector<char> buf(1 << 20);
  while (got < want) {
    size_t n = TRY(s->read_some(buf.data(), buf.size()));
    if (n == 0) return fail(ECONNRESET, fmt::format("download ended after {} of {} bytes", got, want));
    TRY(write_all(out_fd, buf.data(), n));
    got += n;
  }
  return r;
}

Result<std::unique_ptr<Stream>> websocket_connect(const ConnectTarget& t, const std::string& path, std::string& carry) {
  auto connected = connect_stream(t);
  // ECONNREFUSED for every failure to reach keeld, so callers can tell it from a refusal.
  if (!connected) return fail(ECONNREFUSED, connected.error().message());
  auto s = std::move(*connected);
  unsigned char key_bytes[16];
  std::random_device rd;
  for (auto& b : key_bytes) b = static_cast<unsigned char>(rd());
  std::string key = base64(key_bytes, sizeof key_bytes);
  std::string req = request_head(t, "GET", path);
  req += fmt::format("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: {}\r\n\r\n",
                     key);
  TRY(s->write_all(req));
  auto r = TRY(read_response(*s, carry, true));
  if (r.status != 101) {
    // The error body follows; read it for the message.
    auto it = r.headers.find("content-length");
    size_t len = it == r.headers.end() ? 0 : std::strtoull(it->second.c_str(), nullptr, 10);
    while (carry.size() < len && len < 65536) {
      char buf[4096];
      size_t n = TRY(s->read_some(buf, sizeof buf));
      if (n == 0) break;
      carry.append(buf, n);
    }
    std::string msg = carry;
    json j = json::parse(carry, nullptr, false);
    if (!j.is_discarded() && j.contains("error") && j["error"].contains("message"))
      msg = j["error"]["message"].get<std::string>();
    return fail(r.status == 404 ? ENOENT : r.status == 409 ? EBUSY : EINVAL, msg);
  }
  if (r.headers["sec-websocket-accept"] != websocket_accept_key(key))
    return fail_invalid("WebSocket handshake: wrong Sec-WebSocket-Accept");
  return s;
}

}  // namespace keel::hostd
