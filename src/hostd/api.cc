#include "hostd/api.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <set>
#include <thread>

#include <fmt/format.h>

#include "base/log.h"
#include "base/size.h"
#include "qemu/libvirt_xml.h"
#include "qemu/xl_cfg.h"

namespace keel::hostd {

using nlohmann::json;
using namespace std::chrono_literals;

HttpResponse error_response(const Error& e) {
  int status = 500;
  switch (e.code()) {
    case ENOENT: status = 404; break;
    case EEXIST:
    case EBUSY: status = 409; break;
    case EINVAL: status = 400; break;
    case E2BIG: status = 413; break;
    default: status = 500;
  }
  return HttpResponse::error(status, e.message());
}

namespace {

constexpr const char* kApiVersion = "v1";

template <typename T>
HttpResponse reply(const Result<T>& r, int status = 200) {
  if (!r) return error_response(r.error());
  if constexpr (std::is_void_v<T>) return HttpResponse::json(status, {{"ok", true}});
  else return HttpResponse::json(status, *r);
}

Result<json> parse_body(const HttpRequest& req) {
  if (req.body.empty()) return fail_invalid("request body: expected a JSON object");
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded()) {
    try {
      json again = json::parse(req.body);
      (void)again;
    } catch (const json::exception& e) {
      return fail_invalid("malformed JSON: {}", e.what());
    }
    return fail_invalid("malformed JSON");
  }
  if (!j.is_object()) return fail_invalid("request body: expected a JSON object, got {}", j.type_name());
  return j;
}

// Reads the fields of an operation body, rejecting unknown ones.
Result<void> only_fields(const json& j, std::initializer_list<const char*> allowed) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    bool known = false;
    for (auto a : allowed) known |= it.key() == a;
    if (!known) {
      std::string list;
      for (auto a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
      if (list.empty()) return fail_invalid("{}: unknown field (this operation takes no fields)", it.key());
      return fail_invalid("{}: unknown field (allowed: {})", it.key(), list);
    }
  }
  return ok();
}

Result<std::string> string_field(const json& j, const char* key, bool required = true) {
  if (!j.contains(key)) {
    if (required) return fail_invalid("{}: required", key);
    return std::string();
  }
  if (!j[key].is_string()) return fail_invalid("{}: expected a string", key);
  return j[key].get<std::string>();
}

Result<uint64_t> size_field(const json& j, const char* key) {
  if (!j.contains(key)) return fail_invalid("{}: required (e.g. \"1G\")", key);
  if (j[key].is_number_unsigned()) return j[key].get<uint64_t>();
  if (j[key].is_string()) {
    auto s = parse_size(j[key].get<std::string>());
    if (!s) return fail_invalid("{}: '{}' is not a size", key, j[key].get<std::string>());
    return *s;
  }
  return fail_invalid("{}: expected a size such as \"1G\" or a number of bytes", key);
}

Result<qemu::NicDef> nic_from_body(const json& j) {
  json wrapped = {{"name", "x"}, {"memory", "64M"}, {"nics", json::array({j})}};
  auto def = TRY(qemu::domain_from_json(wrapped));
  return def.nics.at(0);
}

Result<qemu::DiskDef> disk_from_body(const json& j) {
  json wrapped = {{"name", "x"}, {"memory", "64M"}, {"disks", json::array({j})}};
  auto def = TRY(qemu::domain_from_json(wrapped));
  return def.disks.at(0);
}

Result<UniqueFd> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return fail_invalid("socket path too long");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) return fail_errno("connect " + path);
  return fd;
}

bool constant_time_equal(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// Which consoles have a client: QEMU's serial socket takes one at a time.
std::mutex g_console_mutex;
std::set<std::string> g_console_busy;

void console_session(ApiContext& ctx, HttpRequest& req, Stream& ws) {
  std::string name = req.params["name"];
  std::string carry = req.headers["x-keel-carry"];
  auto path = ctx.domains.console_socket(name);
  if (!path) {
    (void)ws_write(ws, WsOpcode::Close, "", false);
    return;
  }
  {
    std::lock_guard lock(g_console_mutex);
    if (!g_console_busy.insert(name).second) {
      (void)ws_write(ws, WsOpcode::Text, "keel: console is in use by another client\r\n", false);
      (void)ws_write(ws, WsOpcode::Close, "", false);
      return;
    }
  }
  auto release = [&] {
    std::lock_guard lock(g_console_mutex);
    g_console_busy.erase(name);
  };
  auto sock = connect_unix(*path);
  if (!sock) {
    (void)ws_write(ws, WsOpcode::Close, "", false);
    release();
    return;
  }
  int sfd = sock->get();
  std::mutex write_mutex;
  // Guest -> client on this thread's helper; client -> guest here.
  std::thread out([&] {
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(sfd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      std::lock_guard lock(write_mutex);
      if (!ws_write(ws, WsOpcode::Binary, std::string_view(buf, static_cast<size_t>(n)), false)) break;
    }
    ::shutdown(ws.fd(), SHUT_RDWR);
  });
  for (;;) {
    auto f = ws_read(ws, carry);
    if (!f || !*f) break;
    if ((*f)->opcode == WsOpcode::Close) break;
    if ((*f)->opcode == WsOpcode::Ping) {
      std::lock_guard lock(write_mutex);
      (void)ws_write(ws, WsOpcode::Pong, (*f)->payload, false);
      continue;
    }
    if ((*f)->opcode == WsOpcode::Text || (*f)->opcode == WsOpcode::Binary)
      if (!write_all(sfd, (*f)->payload.data(), (*f)->payload.size())) break;
  }
  ::shutdown(sfd, SHUT_RDWR);
  out.join();
  release();
}

void events_ws(ApiContext& ctx, HttpRequest& req, Stream& ws) {
  auto sub = ctx.events.subscribe();
  std::string filter = req.query.count("domain") ? req.query["domain"] : "";
  std::atomic<bool> closed{false};
  std::string carry = req.headers["x-keel-carry"];
  std::mutex write_mutex;  // the reader answers pings while the loop below sends events
  std::thread reader([&] {
    for (;;) {
      auto f = ws_read(ws, carry);
      if (!f || !*f || (*f)->opcode == WsOpcode::Close) break;
      if ((*f)->opcode == WsOpcode::Ping) {
        std::lock_guard lock(write_mutex);
        (void)ws_write(ws, WsOpcode::Pong, (*f)->payload, false);
      }
    }
    closed = true;
  });
  while (!closed) {
    auto ev = sub->next(1s);
    std::lock_guard lock(write_mutex);
    if (!ev) {
      if (!ws_write(ws, WsOpcode::Ping, "", false)) break;
      continue;
    }
    if (!filter.empty() && ev->value("domain", "") != filter) continue;
    if (!ws_write(ws, WsOpcode::Text, ev->dump(), false)) break;
  }
  ::shutdown(ws.fd(), SHUT_RDWR);
  reader.join();
}

void events_sse(ApiContext& ctx, HttpRequest& req, Stream& s) {
  auto sub = ctx.events.subscribe();
  std::string filter = req.query.count("domain") ? req.query["domain"] : "";
  if (!s.write_all(std::string_view("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                                    "Connection: close\r\n\r\n")))
    return;
  for (;;) {
    auto ev = sub->next(15s);
    if (!ev) {
      if (!s.write_all(std::string_view(": keep-alive\n\n"))) return;
      continue;
    }
    if (!filter.empty() && ev->value("domain", "") != filter) continue;
    if (!s.write_all(fmt::format("event: {}\ndata: {}\n\n", ev->value("event", ""), ev->dump()))) return;
  }
}

}  // namespace

void install_api(HttpServer& server, ApiContext& ctx) {
  server.set_filter([&ctx](const HttpRequest& req, bool over_tcp) -> std::optional<HttpResponse> {
    if (!over_tcp) return std::nullopt;
    std::string auth = req.header("authorization");
    const std::string prefix = "Bearer ";
    if (ctx.token.empty() || auth.rfind(prefix, 0) != 0 || !constant_time_equal(auth.substr(prefix.size()), ctx.token)) {
      HttpResponse r = HttpResponse::error(401, "missing or wrong token (send Authorization: Bearer TOKEN)");
      r.headers.emplace_back("WWW-Authenticate", "Bearer");
      return r;
    }
    return std::nullopt;
  });

  server.route("GET", "/v1/version", [](HttpRequest&) {
    return HttpResponse::json(200, {{"api", kApiVersion}, {"keeld", "0.1.0"}});
  });
  server.route("GET", "/v1/openapi.json", [](HttpRequest&) { return HttpResponse::json(200, openapi_document()); });

  // ---- domains ----
  server.route("GET", "/v1/domains", [&ctx](HttpRequest&) { return reply(ctx.domains.list()); });
  server.route("POST", "/v1/domains", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    auto def = qemu::domain_from_json(*body);
    if (!def) return error_response(def.error());
    auto r = ctx.domains.define(std::move(*def));
    if (!r) return error_response(r.error());
    return HttpResponse::json(201, qemu::domain_to_json(*r));
  });
  // Converts libvirt XML or xl.cfg to Keel's JSON; with ?define=1 also defines it.
  server.route("POST", "/v1/domains/import", [&ctx](HttpRequest& req) {
    std::string format = req.query.count("format") ? req.query["format"] : "libvirt";
    Result<qemu::ImportResult> imported = fail_invalid("format: '{}' is not one of libvirt, xl", format);
    if (format == "libvirt") imported = qemu::import_libvirt_xml(req.body);
    else if (format == "xl") imported = qemu::import_xl_cfg(req.body);
    if (!imported) return error_response(imported.error());
    json out = {{"ignored", imported->ignored}};
    if (req.query.count("define") && req.query["define"] != "0") {
      auto r = ctx.domains.define(imported->def);
      if (!r) return error_response(r.error());
      out["definition"] = qemu::domain_to_json(*r);
      return HttpResponse::json(201, out);
    }
    out["definition"] = qemu::domain_to_json(imported->def);
    return HttpResponse::json(200, out);
  });
  server.route("POST", "/v1/restore", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    if (auto c = only_fields(*body, {"file"}); !c) return error_response(c.error());
    auto file = string_field(*body, "file");
    if (!file) return error_response(file.error());
    auto r = ctx.domains.restore(*file);
    if (!r) return error_response(r.error());
    return HttpResponse::json(200, {{"name", *r}});
  });
  server.route("GET", "/v1/domains/{name}", [&ctx](HttpRequest& req) { return reply(ctx.domains.info(req.params["name"])); });
  server.route("DELETE", "/v1/domains/{name}", [&ctx](HttpRequest& req) { return reply(ctx.domains.undefine(req.params["name"])); });
  server.route("GET", "/v1/domains/{name}/definition", [&ctx](HttpRequest& req) {
    auto def = ctx.domains.definition(req.params["name"]);
    if (!def) return error_response(def.error());
    std::string format = req.query.count("format") ? req.query["format"] : "json";
    if (format == "libvirt") {
      HttpResponse r;
      r.content_type = "application/xml";
      r.body = qemu::export_libvirt_xml(*def);
      return r;
    }
    if (format != "json") return HttpResponse::error(400, "format: must be json or libvirt");
    return HttpResponse::json(200, qemu::domain_to_json(*def));
  });
  server.route("GET", "/v1/domains/{name}/stats", [&ctx](HttpRequest& req) { return reply(ctx.domains.stats(req.params["name"])); });
  server.route("POST", "/v1/domains/{name}/{action}", [&ctx](HttpRequest& req) {
    const std::string& name = req.params["name"];
    const std::string& action = req.params["action"];
    json body = json::object();
    if (!req.body.empty()) {
      auto b = parse_body(req);
      if (!b) return error_response(b.error());
      body = *b;
    }
    if (action == "start") {
      if (auto c = only_fields(body, {"paused"}); !c) return error_response(c.error());
      bool paused = body.contains("paused") && body["paused"].is_boolean() && body["paused"].get<bool>();
      return reply(ctx.domains.start(name, paused));
    }
    if (auto c = only_fields(body, action == "save" ? std::initializer_list<const char*>{"file"}
                                                    : std::initializer_list<const char*>{});
        !c)
      return error_response(c.error());
    if (action == "shutdown") return reply(ctx.domains.shutdown(name));
    if (action == "destroy") return reply(ctx.domains.destroy(name));
    if (action == "reboot") return reply(ctx.domains.reboot(name));
    if (action == "suspend") return reply(ctx.domains.suspend(name));
    if (action == "resume") return reply(ctx.domains.resume(name));
    if (action == "save") {
      auto file = string_field(body, "file");
      if (!file) return error_response(file.error());
      return reply(ctx.domains.save(name, *file));
    }
    return HttpResponse::error(404, fmt::format("no such action: {} (start, shutdown, destroy, reboot, suspend, resume, save)", action));
  });
  server.route("POST", "/v1/domains/{name}/nics", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    auto nic = nic_from_body(*body);
    if (!nic) return error_response(nic.error());
    auto r = ctx.domains.attach_nic(req.params["name"], *nic);
    if (!r) return error_response(r.error());
    return HttpResponse::json(201, {{"id", r->id}, {"mac", r->mac}});
  });
  server.route("DELETE", "/v1/domains/{name}/nics/{id}",
               [&ctx](HttpRequest& req) { return reply(ctx.domains.detach_nic(req.params["name"], req.params["id"])); });
  server.route("POST", "/v1/domains/{name}/disks", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    auto disk = disk_from_body(*body);
    if (!disk) return error_response(disk.error());
    auto r = ctx.domains.attach_disk(req.params["name"], *disk);
    if (!r) return error_response(r.error());
    return HttpResponse::json(201, {{"id", r->id}});
  });
  server.route("DELETE", "/v1/domains/{name}/disks/{id}",
               [&ctx](HttpRequest& req) { return reply(ctx.domains.detach_disk(req.params["name"], req.params["id"])); });
  server.route("GET", "/v1/domains/{name}/console/log", [&ctx](HttpRequest& req) {
    auto log = ctx.domains.console_log(req.params["name"]);
    if (!log) return error_response(log.error());
    HttpResponse r;
    r.content_type = "text/plain; charset=utf-8";
    r.body = std::move(*log);
    return r;
  });
  server.websocket(
      "/v1/domains/{name}/console", [&ctx](HttpRequest& req, Stream& s) { console_session(ctx, req, s); },
      [&ctx](HttpRequest& req) {
        // Vets the upgrade (and answers plain GETs): only a running domain has a console.
        auto path = ctx.domains.console_socket(req.params["name"]);
        if (!path) return error_response(path.error());
        {
          std::lock_guard lock(g_console_mutex);
          if (g_console_busy.count(req.params["name"]))
            return HttpResponse::error(409, fmt::format("the console of '{}' is in use by another client", req.params["name"]));
        }
        return HttpResponse::error(426, "the console is a WebSocket: send Upgrade: websocket");
      });

  // ---- storage ----
  server.route("GET", "/v1/pools", [&ctx](HttpRequest&) { return reply(ctx.pools.list_pools()); });
  server.route("POST", "/v1/pools", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    if (auto c = only_fields(*body, {"name", "path", "type"}); !c) return error_response(c.error());
    auto name = string_field(*body, "name");
    auto path = string_field(*body, "path");
    auto type = string_field(*body, "type", false);
    if (!name) return error_response(name.error());
    if (!path) return error_response(path.error());
    if (type && !type->empty() && *type != "dir") return HttpResponse::error(400, "type: only \"dir\" pools exist");
    return reply(ctx.pools.define_pool(*name, *path), 201);
  });
  server.route("DELETE", "/v1/pools/{pool}", [&ctx](HttpRequest& req) { return reply(ctx.pools.undefine_pool(req.params["pool"])); });
  server.route("GET", "/v1/pools/{pool}/volumes", [&ctx](HttpRequest& req) { return reply(ctx.pools.list_volumes(req.params["pool"])); });
  server.route("POST", "/v1/pools/{pool}/volumes", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    if (auto c = only_fields(*body, {"name", "capacity", "format", "clone_of", "mode"}); !c) return error_response(c.error());
    auto name = string_field(*body, "name");
    if (!name) return error_response(name.error());
    if (body->contains("clone_of")) {
      auto from = string_field(*body, "clone_of");
      auto mode = string_field(*body, "mode", false);
      if (!from) return error_response(from.error());
      return reply(ctx.pools.clone_volume(req.params["pool"], *from, *name, mode && !mode->empty() ? *mode : "overlay"), 201);
    }
    auto size = size_field(*body, "capacity");
    if (!size) return error_response(size.error());
    auto format = string_field(*body, "format", false);
    return reply(ctx.pools.create_volume(req.params["pool"], *name, format && !format->empty() ? *format : "qcow2", *size), 201);
  });
  server.route("GET", "/v1/pools/{pool}/volumes/{vol}",
               [&ctx](HttpRequest& req) { return reply(ctx.pools.volume_info(req.params["pool"], req.params["vol"])); });
  server.route("DELETE", "/v1/pools/{pool}/volumes/{vol}",
               [&ctx](HttpRequest& req) { return reply(ctx.pools.delete_volume(req.params["pool"], req.params["vol"])); });
  server.route("POST", "/v1/pools/{pool}/volumes/{vol}/resize", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    if (auto c = only_fields(*body, {"capacity", "shrink"}); !c) return error_response(c.error());
    auto size = size_field(*body, "capacity");
    if (!size) return error_response(size.error());
    auto shrink = ShrinkPolicy::Refuse;
    if (body->contains("shrink")) {
      const auto& v = (*body)["shrink"];
      if (!v.is_boolean()) return HttpResponse::error(400, "shrink: must be true or false");
      if (v.get<bool>()) shrink = ShrinkPolicy::Allow;
    }
    return reply(ctx.pools.resize_volume(req.params["pool"], req.params["vol"], *size, shrink));
  });
  // Volume data streams both ways, so images larger than a request body can be moved.
  server.streaming("PUT", "/v1/pools/{pool}/volumes/{vol}/data", [&ctx](HttpRequest& req, Stream& s) {
    std::string carry = std::move(req.headers["x-keel-carry"]);
    auto size = content_length(req);
    if (!size) {
      write_response(s, error_response(size.error()), true);
      return;
    }
    auto r = ctx.pools.upload_from(req.params["pool"], req.params["vol"], *size, [&](char* buf, size_t len) -> Result<size_t> {
      if (!carry.empty()) {
        size_t n = std::min(len, carry.size());
        std::memcpy(buf, carry.data(), n);
        carry.erase(0, n);
        return n;
      }
      return s.read_some(buf, len);
    });
    write_response(s, r ? HttpResponse::json(200, {{"ok", true}, {"bytes", *size}}) : error_response(r.error()), true);
  });
  server.streaming("GET", "/v1/pools/{pool}/volumes/{vol}/data", [&ctx](HttpRequest& req, Stream& s) {
    auto path = ctx.pools.data_path(req.params["pool"], req.params["vol"]);
    if (!path) {
      write_response(s, error_response(path.error()), true);
      return;
    }
    auto fd = UniqueFd::open(*path, O_RDONLY);
    struct stat st;
    if (!fd || ::fstat(fd->get(), &st) < 0) {
      write_response(s, HttpResponse::error(500, "cannot open " + *path), true);
      return;
    }
    std::string head = fmt::format("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n"
                                   "Connection: close\r\n\r\n",
                                   st.st_size);
    if (!s.write_all(head)) return;
    std::vector<char> buf(1 << 20);
    for (;;) {
      ssize_t n = ::read(fd->get(), buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;
      if (!s.write_all(buf.data(), static_cast<size_t>(n))) return;
    }
  });

  // ---- networks ----
  server.route("GET", "/v1/networks", [&ctx](HttpRequest&) { return reply(ctx.networks.list()); });
  server.route("POST", "/v1/networks", [&ctx](HttpRequest& req) {
    auto body = parse_body(req);
    if (!body) return error_response(body.error());
    auto def = network_from_json(*body);
    if (!def) return error_response(def.error());
    return reply(ctx.networks.define(*def), 201);
  });
  server.route("DELETE", "/v1/networks/{net}", [&ctx](HttpRequest& req) { return reply(ctx.networks.undefine(req.params["net"])); });
  server.route("GET", "/v1/networks/{net}/leases", [&ctx](HttpRequest& req) { return reply(ctx.networks.leases(req.params["net"])); });
  server.route("POST", "/v1/networks/{net}/{action}", [&ctx](HttpRequest& req) {
    if (req.params["action"] == "start") return reply(ctx.networks.start(req.params["net"]));
    if (req.params["action"] == "stop") return reply(ctx.networks.stop(req.params["net"]));
    return HttpResponse::error(404, "no such action (start, stop)");
  });

  // ---- events and metrics ----
  server.websocket("/v1/events", [&ctx](HttpRequest& req, Stream& s) { events_ws(ctx, req, s); }, {},
                   [&ctx](HttpRequest& req, Stream& s) { events_sse(ctx, req, s); });
  server.route("GET", "/metrics", [&ctx](HttpRequest&) {
    HttpResponse r;
    r.content_type = "text/plain; version=0.0.4";
    r.body = ctx.domains.metrics();
    return r;
  });
}

json openapi_document() {
  auto op = [](const std::string& summary) { return json{{"summary", summary}, {"responses", {{"200", {{"description", "OK"}}}}}}; };
  json paths = {
      {"/v1/version", {{"get", op("API and keeld version")}}},
      {"/v1/domains", {{"get", op("List domains")}, {"post", op("Define a domain from Keel JSON (schemas/domain.schema.json)")}}},
      {"/v1/domains/import", {{"post", op("Convert libvirt XML (?format=libvirt) or xl.cfg (?format=xl); ?define=1 defines it")}}},
      {"/v1/domains/{name}", {{"get", op("Domain info")}, {"delete", op("Undefine")}}},
      {"/v1/domains/{name}/definition", {{"get", op("Definition as Keel JSON, or libvirt XML with ?format=libvirt")}}},
      {"/v1/domains/{name}/stats", {{"get", op("CPU, memory, disk and NIC counters")}}},
      {"/v1/domains/{name}/{action}", {{"post", op("start {paused}, shutdown, destroy, reboot, suspend, resume, save {file}")}}},
      {"/v1/domains/{name}/nics", {{"post", op("Attach a NIC (hot-plug when running)")}}},
      {"/v1/domains/{name}/nics/{id}", {{"delete", op("Detach a NIC by id or MAC")}}},
      {"/v1/domains/{name}/disks", {{"post", op("Attach a disk (hot-plug when running)")}}},
      {"/v1/domains/{name}/disks/{id}", {{"delete", op("Detach a disk")}}},
      {"/v1/domains/{name}/console", {{"get", op("Serial console over WebSocket (binary frames both ways)")}}},
      {"/v1/domains/{name}/console/log", {{"get", op("Everything the serial console printed")}}},
      {"/v1/restore", {{"post", op("Restore a domain from a save file {file}")}}},
      {"/v1/pools", {{"get", op("List pools")}, {"post", op("Define a directory pool {name, path}")}}},
      {"/v1/pools/{pool}", {{"delete", op("Undefine a pool (files stay)")}}},
      {"/v1/pools/{pool}/volumes", {{"get", op("List volumes")}, {"post", op("Create {name, capacity, format} or clone {name, clone_of, mode: overlay|copy}")}}},
      {"/v1/pools/{pool}/volumes/{vol}", {{"get", op("Volume info")}, {"delete", op("Delete a volume")}}},
      {"/v1/pools/{pool}/volumes/{vol}/resize", {{"post", op("Resize {capacity}")}}},
      {"/v1/pools/{pool}/volumes/{vol}/data", {{"get", op("Download")}, {"put", op("Upload (replaces the content)")}}},
      {"/v1/networks", {{"get", op("List networks")}, {"post", op("Define {name, bridge, mode, address, prefix, dhcp_start, dhcp_end}")}}},
      {"/v1/networks/{net}", {{"delete", op("Undefine (stops it first)")}}},
      {"/v1/networks/{net}/{action}", {{"post", op("start, stop")}}},
      {"/v1/networks/{net}/leases", {{"get", op("DHCP leases")}}},
      {"/v1/events", {{"get", op("Event stream: WebSocket (text frames) or server-sent events; ?domain= filters")}}},
      {"/metrics", {{"get", op("Prometheus metrics")}}},
  };
  return {{"openapi", "3.0.3"},
          {"info", {{"title", "keeld API"}, {"version", "1"}}},
          {"components", {{"securitySchemes", {{"bearer", {{"type", "http"}, {"scheme", "bearer"}}}}}}},
          {"security", json::array({{{"bearer", json::array()}}})},
          {"paths", paths}};
}

}  // namespace keel::hostd
