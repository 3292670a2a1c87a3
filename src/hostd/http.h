// A small HTTP/1.1 server and client for keeld's API, over a unix socket or TCP+TLS, with WebSocket
// upgrade for the console and event stream.
//
// Why not cpp-httplib (Debian has 0.11.4, which does listen on unix sockets): it has no WebSocket
// support and no way to take over a connection after an upgrade, and keeld needs both for the
// console and events. This server is thread-per-connection (keeld has few clients), strict and
// bounded: request head at most 16 KiB, body at most kMaxBody, no chunked request bodies.
#pragma once

#include <openssl/ssl.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "base/unique_fd.h"

namespace keel::hostd {

// A byte stream: a plain socket or a TLS session over one.
class Stream {
public:
  virtual ~Stream() = default;
  // Returns 0 at EOF.
  virtual Result<size_t> read_some(void* buf, size_t len) = 0;
  virtual Result<void> write_all(const void* buf, size_t len) = 0;
  virtual int fd() const = 0;
  Result<void> write_all(std::string_view s) { return write_all(s.data(), s.size()); }
};

std::unique_ptr<Stream> make_plain_stream(UniqueFd fd);

struct HttpRequest {
  std::string method;
  std::string path;                              // without the query
  std::map<std::string, std::string> query;      // decoded
  std::map<std::string, std::string> headers;    // names lower-cased
  std::string body;
  std::map<std::string, std::string> params;     // from the route pattern ("{name}")
  std::string header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? std::string() : it->second;
  }
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;

  static HttpResponse json(int status, const nlohmann::json& j);
  // {"error": {"code": status, "kind": ..., "message": ...}}
  static HttpResponse error(int status, std::string_view message);
};

std::string_view status_text(int status);

// Reads one request from a stream with a carry-over buffer (keep-alive). nullopt on clean EOF.
constexpr size_t kMaxHead = 16 << 10;
constexpr size_t kMaxBody = 8 << 20;
Result<std::optional<HttpRequest>> read_request(Stream& s, std::string& carry);
// The same in two steps: the head, then (Content-Length bounded by kMaxBody) the body.
Result<std::optional<HttpRequest>> read_request_head(Stream& s, std::string& carry);
Result<void> read_request_body(Stream& s, std::string& carry, HttpRequest& req);
Result<uint64_t> content_length(const HttpRequest& req);
void write_response(Stream& s, const HttpResponse& resp, bool close);
// Parses the head (request line + headers, without the final blank line). Exposed for fuzzing.
Result<HttpRequest> parse_request_head(std::string_view head);
std::string url_decode(std::string_view s);
std::string url_encode(std::string_view s);

// WebSocket (RFC 6455): the accept key, and frames.
std::string websocket_accept_key(const std::string& client_key);
enum class WsOpcode : uint8_t { Continuation = 0, Text = 1, Binary = 2, Close = 8, Ping = 9, Pong = 10 };
struct WsFrame {
  WsOpcode opcode;
  std::string payload;
};
// Masked frames come from clients; servers send unmasked.
Result<void> ws_write(Stream& s, WsOpcode op, std::string_view payload, bool mask);
// Reads one frame (reassembles nothing: keeld and keel send unfragmented frames). nullopt at EOF.
Result<std::optional<WsFrame>> ws_read(Stream& s, std::string& carry, size_t max_payload = 1 << 20);

class HttpServer {
public:
  using Handler = std::function<HttpResponse(HttpRequest&)>;
  // Takes over the connection after the 101 response: the handler owns the stream until it returns.
  using UpgradeHandler = std::function<void(HttpRequest&, Stream&)>;
  // Runs before routing; a response means "reject with this".
  using Filter = std::function<std::optional<HttpResponse>(const HttpRequest&, bool over_tcp)>;

  HttpServer() = default;
  ~HttpServer();

  void route(const std::string& method, const std::string& pattern, Handler h);
  // A GET route that accepts a WebSocket upgrade; `fallback` answers plain GETs (may be null), or
  // `raw` takes the connection for a plain GET and writes its own response (server-sent events).
  void websocket(const std::string& pattern, UpgradeHandler h, Handler fallback = {}, UpgradeHandler raw = {});
  void set_filter(Filter f) { filter_ = std::move(f); }
  // A route whose handler reads the request body from the stream itself (after the bytes in
  // req.headers["x-keel-carry"]) and writes the whole response; the connection closes after it.
  void streaming(const std::string& method, const std::string& pattern, UpgradeHandler h);

  Result<void> listen_unix(const std::string& path);
  // TCP always with TLS: cert and key are PEM files.
  Result<void> listen_tls(const std::string& host_port, const std::string& cert, const std::string& key);
  // Starts the accept threads.
  void start();
  void stop();

  // Dispatch without a socket (unit tests).
  HttpResponse dispatch(HttpRequest& req, bool over_tcp = false);

private:
  struct Route {
    std::string method;
    std::vector<std::string> segments;
    Handler handler;
    UpgradeHandler upgrade;
    UpgradeHandler raw;
    UpgradeHandler stream;
  };
  struct Listener {
    UniqueFd fd;
    bool tls;
  };
  const Route* match(const HttpRequest& req, std::map<std::string, std::string>& params,
                     bool& path_matched) const;
  void accept_loop(Listener& l);
  void serve(std::unique_ptr<Stream> s, bool over_tcp);

  std::vector<Route> routes_;
  Filter filter_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<std::thread> accept_threads_;
  SSL_CTX* ssl_ctx_ = nullptr;
  std::atomic<bool> stopping_{false};
  static constexpr int kMaxConnections = 256;
  static constexpr int kIdleSeconds = 60;
  std::atomic<int> connections_{0};
};

// keel's side: one request per call, over unix:PATH or https://HOST:PORT.
struct ConnectTarget {
  std::string unix_path;  // when unix
  std::string host;       // when https
  int port = 0;
  std::string token;      // Bearer token for TCP
  bool insecure = false;  // skip certificate verification (self-signed test certs)
  std::string ca_file;
};
Result<ConnectTarget> parse_connect_uri(const std::string& uri);

struct HttpClientResponse {
  int status = 0;
  std::map<std::string, std::string> headers;
  std::string body;
};
Result<std::unique_ptr<Stream>> connect_stream(const ConnectTarget& t);
Result<HttpClientResponse> http_request(const ConnectTarget& t, const std::string& method,
                                        const std::string& path, const std::string& body = {});
// Sends `size` bytes from `fd` as the body (volume uploads).
Result<HttpClientResponse> http_upload(const ConnectTarget& t, const std::string& method, const std::string& path,
                                       int fd, uint64_t size);
// GETs `path`; a 2xx body goes to `out_fd` (not kept in memory), anything else into the response.
Result<HttpClientResponse> http_download(const ConnectTarget& t, const std::string& path, int out_fd);
// Opens a WebSocket; the returned stream is past the 101 response (and `carry` holds any bytes
// already read beyond it).
Result<std::unique_ptr<Stream>> websocket_connect(const ConnectTarget& t, const std::string& path,
                                                  std::string& carry);

}  // namespace keel::hostd
