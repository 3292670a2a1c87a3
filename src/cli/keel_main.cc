// keel: the command-line client of keeld, with virsh's verbs where they fit.
//
// Exit codes (scripts can rely on them):
//   0 success; 1 the operation failed; 2 bad usage or input rejected by keeld (400);
//   3 cannot reach keeld; 4 no such object (404); 5 conflict or wrong state (409).
#include <filesystem>
#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/size.h"
#include "hostd/http.h"

using nlohmann::json;
using namespace keel;
using namespace keel::hostd;

namespace {

enum Exit { kOk = 0, kFailed = 1, kUsage = 2, kNoConnect = 3, kNotFound = 4, kConflict = 5 };

struct Options {
  std::string connect;
  std::string token;
  bool insecure = false;
  std::string ca_file;
  std::string output = "table";
};

Options g_opts;

[[noreturn]] void die(int code, const std::string& msg) {
  std::fprintf(stderr, "keel: error: %s\n", msg.c_str());
  std::exit(code);
}

ConnectTarget target() {
  std::string uri = g_opts.connect;
  if (uri.empty()) {
    const char* env = std::getenv("KEEL_CONNECT");
    uri = env && *env ? env : "unix:/run/keel/keeld.sock";
  }
  auto t = parse_connect_uri(uri);
  if (!t) die(kUsage, t.error().message());
  t->token = g_opts.token;
  if (t->token.empty())
    if (const char* env = std::getenv("KEEL_TOKEN")) t->token = env;
  t->insecure = g_opts.insecure;
  t->ca_file = g_opts.ca_file;
  return *t;
}

int exit_for_status(int status) {
  if (status == 404) return kNotFound;
  if (status == 409) return kConflict;
  if (status == 400 || status == 413 || status == 405) return kUsage;
  return kFailed;
}

void check_status(const HttpClientResponse& r) {
  if (r.status < 400) return;
  json j = json::parse(r.body, nullptr, false);
  std::string msg = r.body;
  if (!j.is_discarded() && j.contains("error") && j["error"].contains("message")) msg = j["error"]["message"].get<std::string>();
  die(exit_for_status(r.status), msg);
}

// One API call; on an HTTP error prints keeld's message and exits with the matching code.
HttpClientResponse call(const std::string& method, const std::string& path, const std::string& body = {}) {
  auto r = http_request(target(), method, path, body);
  if (!r) die(kNoConnect, r.error().message());
  if (r->status >= 400) {
    json j = json::parse(r->body, nullptr, false);
    std::string msg = r->body;
    if (!j.is_discarded() && j.contains("error") && j["error"].contains("message")) msg = j["error"]["message"].get<std::string>();
    die(exit_for_status(r->status), msg);
  }
  return *r;
}

json call_json(const std::string& method, const std::string& path, const json& body = nullptr) {
  auto r = call(method, path, body.is_null() ? std::string() : body.dump());
  json j = json::parse(r.body, nullptr, false);
  if (j.is_discarded()) die(kFailed, "keeld sent a reply that is not JSON");
  return j;
}

bool json_output() { return g_opts.output == "json"; }

void print_table(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(headers.size());
  for (size_t i = 0; i < headers.size(); ++i) width[i] = headers[i].size();
  for (auto& r : rows)
    for (size_t i = 0; i < r.size() && i < width.size(); ++i) width[i] = std::max(width[i], r[i].size());
  auto line = [&](const std::vector<std::string>& cells) {
    std::string s;
    for (size_t i = 0; i < cells.size(); ++i) {
      s += " " + cells[i];
      if (i + 1 < cells.size()) s += std::string(width[i] - cells[i].size() + 2, ' ');
    }
    std::printf("%s\n", s.c_str());
  };
  line(headers);
  size_t total = 0;
  for (auto w : width) total += w + 3;
  std::printf("%s\n", std::string(total, '-').c_str());
  for (auto& r : rows) line(r);
}

std::string str(const json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "-";
  if (j[key].is_string()) return j[key].get<std::string>();
  return j[key].dump();
}

void print_ok(const std::string& text, const json& j = {{"ok", true}}) {
  if (json_output()) std::printf("%s\n", j.dump(2).c_str());
  else std::printf("%s\n", text.c_str());
}

// A list verb's output: the JSON array as it came with -o json, else a table of one row per item.
int print_list(const json& items, const std::vector<std::string>& headers,
               const std::function<std::vector<std::string>(const json&)>& row) {
  if (json_output()) {
    std::printf("%s\n", items.dump(2).c_str());
    return kOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (auto& item : items) rows.push_back(row(item));
  print_table(headers, rows);
  return kOk;
}

// What a verb sends when it is one request and one line of output.
struct Request {
  std::string method, path, body;
};

std::string read_input_file(const std::string& path) {
  if (path == "-") {
    std::string s((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    return s;
  }
  auto t = read_file(path);
  if (!t) die(kUsage, t.error().message());
  return *t;
}

std::string enc(const std::string& s) { return url_encode(s); }

// ---- console ----

int console(const std::string& name, const std::string& until, double timeout_s) {
  std::string carry;
  auto ws = websocket_connect(target(), "/v1/domains/" + enc(name) + "/console", carry);
  if (!ws) {
    int code = ws.error().code() == ENOENT ? kNotFound
               : ws.error().code() == EBUSY ? kConflict
               : ws.error().code() == EINVAL ? kUsage
                                             : kNoConnect;
    die(code, ws.error().message());
  }
  bool tty = ::isatty(0);
  termios saved{};
  if (tty) {
    ::tcgetattr(0, &saved);
    termios raw = saved;
    cfmakeraw(&raw);
    ::tcsetattr(0, TCSANOW, &raw);
    std::fprintf(stderr, "Connected to domain '%s'\r\nEscape character is ^] (Ctrl + ])\r\n", name.c_str());
  }
  std::atomic<bool> done{false};
  std::atomic<int> result{kOk};
  Stream& s = **ws;
  std::thread input([&] {
    char buf[1024];
    while (!done) {
      pollfd p{0, POLLIN, 0};
      int r = ::poll(&p, 1, 200);
      if (r <= 0) continue;
      ssize_t n = ::read(0, buf, sizeof buf);
      if (n <= 0) break;  // stdin closed: keep showing output (until --until/--timeout or the guest ends)
      std::string data(buf, static_cast<size_t>(n));
      if (tty && data.find('\x1d') != std::string::npos) {
        done = true;
        (void)ws_write(s, WsOpcode::Close, "", true);
        ::shutdown(s.fd(), SHUT_RDWR);
        break;
      }
      if (!ws_write(s, WsOpcode::Binary, data, true)) break;
    }
  });
  std::thread timer;
  if (timeout_s > 0) {
    timer = std::thread([&] {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
      while (!done && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (!done) {
        result = kFailed;
        done = true;
        ::shutdown(s.fd(), SHUT_RDWR);
      }
    });
  }
  std::string seen;
  while (!done) {
    auto f = ws_read(s, carry);
    if (!f || !*f) break;
    if ((*f)->opcode == WsOpcode::Close) break;
    if ((*f)->opcode == WsOpcode::Ping) {
      (void)ws_write(s, WsOpcode::Pong, (*f)->payload, true);
      continue;
    }
    const std::string& p = (*f)->payload;
    if (::write(1, p.data(), p.size()) < 0) break;
    if (!until.empty()) {
      seen += p;
      if (seen.find(until) != std::string::npos) break;
      if (seen.size() > 2 * until.size() + 65536) seen.erase(0, seen.size() - until.size());
    }
  }
  bool timed_out = result == kFailed;
  done = true;
  ::shutdown(s.fd(), SHUT_RDWR);
  input.join();
  if (timer.joinable()) timer.join();
  if (tty) {
    ::tcsetattr(0, TCSANOW, &saved);
    std::fprintf(stderr, "\n");
  }
  if (timed_out) {
    std::fprintf(stderr, "keel: console: timed out%s\n", until.empty() ? "" : (" waiting for '" + until + "'").c_str());
    return kFailed;
  }
  return kOk;
}

int events(const std::string& domain, int count, double timeout_s) {
  std::string carry;
  std::string path = "/v1/events";
  if (!domain.empty()) path += "?domain=" + enc(domain);
  auto ws = websocket_connect(target(), path, carry);
  if (!ws) die(kNoConnect, ws.error().message());
  Stream& s = **ws;
  std::atomic<bool> timed_out{false};
  std::atomic<bool> done{false};
  std::thread timer;
  if (timeout_s > 0) {
    timer = std::thread([&] {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
      while (!done && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (!done) {
        timed_out = true;
        ::shutdown(s.fd(), SHUT_RDWR);
      }
    });
  }
  int seen = 0;
  // Tell the caller the stream is open (tests start the action after this line).
  std::fprintf(stderr, "keel: listening for events\n");
  while (count <= 0 || seen < count) {
    auto f = ws_read(s, carry);
    if (!f || !*f || (*f)->opcode == WsOpcode::Close) break;
    if ((*f)->opcode == WsOpcode::Ping) {
      (void)ws_write(s, WsOpcode::Pong, (*f)->payload, true);
      continue;
    }
    if ((*f)->opcode != WsOpcode::Text) continue;
    json ev = json::parse((*f)->payload, nullptr, false);
    if (ev.is_discarded()) continue;
    ++seen;
    if (json_output()) {
      std::printf("%s\n", ev.dump().c_str());
    } else {
      std::printf("event '%s' (%s) for domain '%s': %s\n", str(ev, "event").c_str(), str(ev, "kind").c_str(),
                  str(ev, "domain").c_str(), ev.value("detail", json::object()).dump().c_str());
    }
    std::fflush(stdout);
  }
  done = true;
  if (timer.joinable()) timer.join();
  return timed_out && count > 0 && seen < count ? kFailed : kOk;
}

std::string human_state(const std::string& s) {
  if (s == "shutoff") return "shut off";
  return s;
}

// keeld resolves paths in its own working directory: send it ours made absolute.
std::string absolute_path(const std::string& file) {
  if (file.empty() || file[0] == '/') return file;
  std::error_code ec;
  auto abs = std::filesystem::absolute(file, ec);
  return ec ? file : abs.string();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"keel: manage VMs through keeld"};
  app.require_subcommand(1);
  app.fallthrough();  // global options (-o json, --connect) may follow the verb, as with virsh
  app.add_option("-c,--connect", g_opts.connect, "unix:PATH or https://HOST:PORT (default $KEEL_CONNECT or unix:/run/keel/keeld.sock)");
  app.add_option("--token", g_opts.token, "API token for https (default $KEEL_TOKEN)");
  app.add_flag("--insecure", g_opts.insecure, "Do not verify keeld's TLS certificate");
  app.add_option("--ca-file", g_opts.ca_file, "CA certificate to verify keeld with");
  app.add_option("-o,--output", g_opts.output, "table or json")->check(CLI::IsMember({"table", "json"}));

  std::string name, file, pool, vol, size, format, mode, network, bridge, mac, id, until, target_id, cache, source;
  bool all = false, from_libvirt = false, from_xl = false, paused = false, readonly = false, user_net = false, shrink = false;
  double timeout = 0;
  int count = 0;
  std::function<int()> action;

  // A verb whose positional arguments make one request and whose output is one line (or {"ok": true}).
  auto one_request = [&](const std::string& verb, const std::string& help,
                         const std::vector<std::pair<std::string, std::string*>>& args,
                         std::function<Request()> request, std::function<std::string()> done) {
    auto* c = app.add_subcommand(verb, help);
    for (const auto& [arg, value] : args) c->add_option(arg, *value)->required();
    c->callback([&action, request, done] {
      action = [request, done] {
        Request r = request();
        call(r.method, r.path, r.body);
        print_ok(done());
        return kOk;
      };
    });
    return c;
  };

  auto* list = app.add_subcommand("list", "List domains");
  list->add_flag("--all", all, "Include domains that are shut off");
  list->callback([&] {
    action = [&] {
      json j = call_json("GET", "/v1/domains");
      json shown = json::array();
      for (auto& d : j)
        if (all || d.value("state", "") != "shutoff") shown.push_back(d);
      return print_list(shown, {"Id", "Name", "State"}, [](const json& d) -> std::vector<std::string> {
        return {str(d, "id"), str(d, "name"), human_state(str(d, "state"))};
      });
    };
  });

  auto* define = app.add_subcommand("define", "Define a domain from Keel JSON, libvirt XML or xl.cfg");
  define->add_option("file", file, "Definition file ('-' for stdin)")->required();
  define->add_flag("--from-libvirt", from_libvirt, "The file is libvirt domain XML");
  define->add_flag("--from-xl", from_xl, "The file is a Xen xl.cfg");
  define->callback([&] {
    action = [&] {
      std::string text = read_input_file(file);
      json j = json::parse(call("POST", "/v1/domains", text).body, nullptr, false);
      print_ok(fmt::format("Domain '{}' defined from {}", j.value("name", "?"), file), j);
      return kOk;
    };
  });

  one_request("undefine", "Remove a domain's definition", {{"domain", &name}},
              [&] { return Request{"DELETE", "/v1/domains/" + enc(name), ""}; },
              [&] { return fmt::format("Domain '{}' has been undefined", name); });

  auto simple = [&](const std::string& verb, const std::string& api, const std::string& help, const std::string& done_text) {
    auto* c = app.add_subcommand(verb, help);
    c->add_option("domain", name)->required();
    if (verb == "start") c->add_flag("--paused", paused, "Start with the CPUs stopped");
    c->callback([&, api, done_text] {
      action = [&, api, done_text] {
        json body = json::object();
        if (api == "start" && paused) body["paused"] = true;
        call("POST", "/v1/domains/" + enc(name) + "/" + api, body.empty() ? std::string() : body.dump());
        print_ok(fmt::format(fmt::runtime(done_text), name));
        return kOk;
      };
    });
  };
  simple("start", "start", "Start a domain", "Domain '{}' started");
  simple("shutdown", "shutdown", "Ask the guest to power off (ACPI)", "Domain '{}' is being shutdown");
  simple("destroy", "destroy", "Stop a domain at once", "Domain '{}' destroyed");
  simple("reboot", "reboot", "Reset a domain", "Domain '{}' is being rebooted");
  simple("suspend", "suspend", "Pause a domain's CPUs", "Domain '{}' suspended");
  simple("resume", "resume", "Resume a paused domain", "Domain '{}' resumed");

  one_request("save", "Save a running domain's state to a file and stop it", {{"domain", &name}, {"file", &file}},
              [&] { return Request{"POST", "/v1/domains/" + enc(name) + "/save", json{{"file", absolute_path(file)}}.dump()}; },
              [&] { return fmt::format("Domain '{}' saved to {}", name, absolute_path(file)); });
  auto* restore = app.add_subcommand("restore", "Restore a domain from a saved state file");
  restore->add_option("file", file)->required();
  restore->callback([&] {
    action = [&] {
      std::string abs = absolute_path(file);
      json j = json::parse(call("POST", "/v1/restore", json{{"file", abs}}.dump()).body, nullptr, false);
      print_ok(fmt::format("Domain '{}' restored from {}", j.value("name", "?"), abs), j);
      return kOk;
    };
  });

  auto* dominfo = app.add_subcommand("dominfo", "Show a domain's state and resources");
  dominfo->add_option("domain", name)->required();
  dominfo->callback([&] {
    action = [&] {
      json j = call_json("GET", "/v1/domains/" + enc(name));
      if (json_output()) {
        std::printf("%s\n", j.dump(2).c_str());
        return kOk;
      }
      auto row = [](const char* k, const std::string& v) { std::printf("%-16s%s\n", k, v.c_str()); };
      row("Id:", str(j, "pid"));
      row("Name:", str(j, "name"));
      row("UUID:", str(j, "uuid"));
      row("State:", human_state(str(j, "state")));
      row("CPU(s):", str(j, "vcpus"));
      if (j.contains("cpu_time_ns")) row("CPU time:", fmt::format("{:.1f}s", j["cpu_time_ns"].get<double>() / 1e9));
      row("Max memory:", fmt::format("{} KiB", j.value("memory", uint64_t{0}) >> 10));
      if (j.contains("rss")) row("Used memory:", fmt::format("{} KiB", j.value("rss", uint64_t{0}) >> 10));
      row("Machine:", str(j, "machine"));
      row("Accelerator:", str(j, "accelerator"));
      row("Persistent:", "yes");
      for (auto& n : j.value("nics", json::array())) {
        if (!n.is_object()) continue;
        // "net0  52:54:00:12:34:56  network default  vhost-user kt1a2b3c4d-0"
        std::string where = n.value("kind", "");
        if (n.contains("network")) where += " " + n.value("network", "");
        if (n.contains("bridge")) where += " " + n.value("bridge", "");
        std::string line = fmt::format("{}  {}  {}", n.value("id", ""), n.value("mac", ""), where);
        if (n.contains("host") && n["host"].is_object())
          line += fmt::format("  {} {}", n["host"].value("type", ""), n["host"].value("port", ""));
        row("NIC:", line);
      }
      return kOk;
    };
  });

  auto* domstats = app.add_subcommand("domstats", "Show a domain's CPU, memory, disk and NIC counters");
  domstats->add_option("domain", name)->required();
  domstats->callback([&] {
    action = [&] {
      json j = call_json("GET", "/v1/domains/" + enc(name) + "/stats");
      if (json_output()) {
        std::printf("%s\n", j.dump(2).c_str());
        return kOk;
      }
      std::printf("Domain: '%s'\n  state=%s\n", name.c_str(), str(j, "state").c_str());
      if (j.contains("cpu_time_ns")) std::printf("  cpu.time=%s\n", str(j, "cpu_time_ns").c_str());
      if (j.contains("rss")) std::printf("  memory.rss=%s\n", str(j, "rss").c_str());
      for (auto& d : j.value("disks", json::array()))
        std::printf("  block.%s.rd.bytes=%s\n  block.%s.wr.bytes=%s\n", str(d, "id").c_str(), str(d, "rd_bytes").c_str(),
                    str(d, "id").c_str(), str(d, "wr_bytes").c_str());
      for (auto& n : j.value("nics", json::array()))
        if (n.contains("rx_bytes"))
          std::printf("  net.%s.rx.bytes=%s\n  net.%s.tx.bytes=%s\n", str(n, "id").c_str(), str(n, "rx_bytes").c_str(),
                      str(n, "id").c_str(), str(n, "tx_bytes").c_str());
      return kOk;
    };
  });

  auto add_export = [&](const std::string& verb, const std::string& default_format) {
    auto* c = app.add_subcommand(verb, verb == "dumpxml" ? "Print a domain's definition as libvirt XML"
                                                         : "Print a domain's definition (--format json|libvirt)");
    c->add_option("domain", name)->required();
    if (verb == "export") c->add_option("--format", format, "json or libvirt")->check(CLI::IsMember({"json", "libvirt"}));
    c->callback([&, default_format] {
      action = [&, default_format] {
        std::string f = format.empty() ? default_format : format;
        auto r = call("GET", "/v1/domains/" + enc(name) + "/definition?format=" + f);
        if (f == "json") std::printf("%s\n", json::parse(r.body, nullptr, false).dump(2).c_str());
        else std::printf("%s", r.body.c_str());
        return kOk;
      };
    });
  };
  add_export("dumpxml", "libvirt");
  add_export("export", "json");

  auto* con = app.add_subcommand("console", "Attach to a domain's serial console (escape: Ctrl+])");
  con->add_option("domain", name)->required();
  con->add_option("--until", until, "Exit 0 once the console has printed this text");
  con->add_option("--timeout", timeout, "Give up after this many seconds (exit 1)");
  con->callback([&] { action = [&] { return console(name, until, timeout); }; });

  auto* conlog = app.add_subcommand("console-log", "Print everything a domain's serial console has printed");
  conlog->add_option("domain", name)->required();
  conlog->callback([&] {
    action = [&] {
      auto r = call("GET", "/v1/domains/" + enc(name) + "/console/log");
      std::fwrite(r.body.data(), 1, r.body.size(), stdout);
      return kOk;
    };
  });

  auto* ai = app.add_subcommand("attach-interface", "Add a NIC (hot-plugged when the domain runs)");
  ai->add_option("domain", name)->required();
  ai->add_option("--network", network, "Keel network to join");
  ai->add_option("--bridge", bridge, "Host bridge to join");
  ai->add_flag("--user", user_net, "QEMU user networking");
  ai->add_option("--mac", mac, "MAC address (generated if absent)");
  ai->add_option("--id", id, "Device id (generated if absent)");
  ai->callback([&] {
    action = [&] {
      json nic = json::object();
      if (!bridge.empty()) {
        nic["type"] = "bridge";
        nic["bridge"] = bridge;
      } else if (user_net) {
        nic["type"] = "user";
      } else {
        nic["type"] = "network";
        nic["network"] = network.empty() ? "default" : network;
      }
      if (!mac.empty()) nic["mac"] = mac;
      if (!id.empty()) nic["id"] = id;
      json j = call_json("POST", "/v1/domains/" + enc(name) + "/nics", nic);
      print_ok(fmt::format("Interface {} ({}) attached to '{}'", str(j, "id"), str(j, "mac"), name), j);
      return kOk;
    };
  });
  one_request("detach-interface", "Remove a NIC by id or MAC", {{"domain", &name}, {"id-or-mac", &id}},
              [&] { return Request{"DELETE", "/v1/domains/" + enc(name) + "/nics/" + enc(id), ""}; },
              [&] { return fmt::format("Interface {} detached from '{}'", id, name); });
  auto* ad = app.add_subcommand("attach-disk", "Add a disk (hot-plugged when the domain runs)");
  ad->add_option("domain", name)->required();
  ad->add_option("source", source, "Image path, or pool/volume")->required();
  ad->add_option("--target", target_id, "Device id, e.g. vdb");
  ad->add_option("--format", format, "qcow2 or raw (for a path)");
  ad->add_option("--cache", cache, "none, writeback, writethrough, directsync, unsafe");
  ad->add_flag("--readonly", readonly, "Read-only disk");
  ad->callback([&] {
    action = [&] {
      json disk = json::object();
      if (!source.empty() && source[0] == '/') disk["path"] = source;
      else disk["volume"] = source;
      if (!target_id.empty()) disk["id"] = target_id;
      if (!format.empty()) disk["format"] = format;
      if (!cache.empty()) disk["cache"] = cache;
      if (readonly) disk["readonly"] = true;
      json j = call_json("POST", "/v1/domains/" + enc(name) + "/disks", disk);
      print_ok(fmt::format("Disk {} attached to '{}'", str(j, "id"), name), j);
      return kOk;
    };
  });
  one_request("detach-disk", "Remove a disk by id", {{"domain", &name}, {"id", &id}},
              [&] { return Request{"DELETE", "/v1/domains/" + enc(name) + "/disks/" + enc(id), ""}; },
              [&] { return fmt::format("Disk {} detached from '{}'", id, name); });

  // ---- pools and volumes ----
  auto* pl = app.add_subcommand("pool-list", "List storage pools");
  pl->callback([&] {
    action = [&] {
      return print_list(call_json("GET", "/v1/pools"), {"Name", "State", "Path", "Available"},
                        [](const json& p) -> std::vector<std::string> {
                          return {str(p, "name"), str(p, "state"), str(p, "path"),
                                  p.contains("available") ? format_size(p["available"].get<uint64_t>()) : "-"};
                        });
    };
  });
  one_request("pool-define", "Define a directory pool", {{"pool", &pool}, {"path", &file}},
              [&] { return Request{"POST", "/v1/pools", json{{"name", pool}, {"path", file}}.dump()}; },
              [&] { return fmt::format("Pool '{}' defined at {}", pool, file); });
  one_request("pool-undefine", "Forget a pool (its files stay)", {{"pool", &pool}},
              [&] { return Request{"DELETE", "/v1/pools/" + enc(pool), ""}; },
              [&] { return fmt::format("Pool '{}' has been undefined", pool); });
  auto* vl = app.add_subcommand("vol-list", "List a pool's volumes");
  vl->add_option("pool", pool)->required();
  vl->callback([&] {
    action = [&] {
      return print_list(call_json("GET", "/v1/pools/" + enc(pool) + "/volumes"), {"Name", "Path"},
                        [](const json& v) -> std::vector<std::string> { return {str(v, "name"), str(v, "path")}; });
    };
  });
  auto* vi = app.add_subcommand("vol-info", "Show a volume's format and sizes");
  vi->add_option("pool", pool)->required();
  vi->add_option("volume", vol)->required();
  vi->callback([&] {
    action = [&] {
      json j = call_json("GET", "/v1/pools/" + enc(pool) + "/volumes/" + enc(vol));
      if (json_output()) {
        std::printf("%s\n", j.dump(2).c_str());
        return kOk;
      }
      std::printf("%-12s%s\n%-12s%s\n%-12s%s\n%-12s%s\n%-12s%s\n", "Name:", str(j, "name").c_str(), "Path:",
                  str(j, "path").c_str(), "Format:", str(j, "format").c_str(), "Capacity:",
                  format_size(j.value("capacity", uint64_t{0})).c_str(), "Allocation:",
                  format_size(j.value("allocation", uint64_t{0})).c_str());
      if (j.contains("backing")) std::printf("%-12s%s\n", "Backing:", str(j, "backing").c_str());
      return kOk;
    };
  });
  one_request("vol-create", "Create a volume", {{"pool", &pool}, {"volume", &vol}, {"capacity", &size}},
              [&] {
                json body = {{"name", vol}, {"capacity", size}};
                if (!format.empty()) body["format"] = format;
                return Request{"POST", "/v1/pools/" + enc(pool) + "/volumes", body.dump()};
              },
              [&] { return fmt::format("Volume '{}' created in pool '{}'", vol, pool); })
      ->add_option("--format", format, "qcow2 (default) or raw");
  one_request("vol-clone", "Clone a volume (qcow2 overlay or full copy)",
              {{"pool", &pool}, {"volume", &vol}, {"new-volume", &id}},
              [&] {
                json body = {{"name", id}, {"clone_of", vol}, {"mode", mode.empty() ? "overlay" : mode}};
                return Request{"POST", "/v1/pools/" + enc(pool) + "/volumes", body.dump()};
              },
              [&] { return fmt::format("Volume '{}' cloned from '{}'", id, vol); })
      ->add_option("--mode", mode, "overlay (default) or copy")
      ->check(CLI::IsMember({"overlay", "copy"}));
  one_request("vol-resize", "Resize a volume", {{"pool", &pool}, {"volume", &vol}, {"capacity", &size}},
              [&] {
                json body = {{"capacity", size}};
                if (shrink) body["shrink"] = true;
                return Request{"POST", "/v1/pools/" + enc(pool) + "/volumes/" + enc(vol) + "/resize", body.dump()};
              },
              [&] { return fmt::format("Volume '{}' resized to {}", vol, size); })
      ->add_flag("--shrink", shrink, "Allow a capacity below the current one (the data past it is lost)");
  one_request("vol-delete", "Delete a volume", {{"pool", &pool}, {"volume", &vol}},
              [&] { return Request{"DELETE", "/v1/pools/" + enc(pool) + "/volumes/" + enc(vol), ""}; },
              [&] { return fmt::format("Volume '{}' deleted", vol); });
  auto* vup = app.add_subcommand("vol-upload", "Replace a volume's content with a local file");
  vup->add_option("pool", pool)->required();
  vup->add_option("volume", vol)->required();
  vup->add_option("file", file)->required();
  vup->callback([&] {
    action = [&] {
      auto fd = UniqueFd::open(file, O_RDONLY);
      if (!fd) die(kUsage, fd.error().message());
      struct stat st;
      if (::fstat(fd->get(), &st) < 0) die(kUsage, "stat " + file);
      auto r = http_upload(target(), "PUT", "/v1/pools/" + enc(pool) + "/volumes/" + enc(vol) + "/data", fd->get(),
                           static_cast<uint64_t>(st.st_size));
      if (!r) die(kNoConnect, r.error().message());
      check_status(*r);
      print_ok(fmt::format("Uploaded {} to volume '{}'", file, vol));
      return kOk;
    };
  });
  auto* vdown = app.add_subcommand("vol-download", "Copy a volume's content to a local file");
  vdown->add_option("pool", pool)->required();
  vdown->add_option("volume", vol)->required();
  vdown->add_option("file", file)->required();
  vdown->callback([&] {
    action = [&] {
      std::string tmp = file + ".part";
      auto fd = UniqueFd::open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (!fd) die(kFailed, fd.error().message());
      auto r = http_download(target(), "/v1/pools/" + enc(pool) + "/volumes/" + enc(vol) + "/data", fd->get());
      if (!r || r->status >= 300) ::unlink(tmp.c_str());
      if (!r) die(kNoConnect, r.error().message());
      check_status(*r);
      if (::rename(tmp.c_str(), file.c_str()) < 0) die(kFailed, "rename " + tmp + ": " + std::strerror(errno));
      print_ok(fmt::format("Downloaded volume '{}' to {}", vol, file));
      return kOk;
    };
  });

  // ---- networks ----
  auto* nl = app.add_subcommand("net-list", "List networks");
  nl->add_flag("--all", all, "(accepted for virsh compatibility; all networks are listed)");
  nl->callback([&] {
    action = [&] {
      return print_list(call_json("GET", "/v1/networks"), {"Name", "State", "Mode", "Bridge", "Address"},
                        [](const json& n) -> std::vector<std::string> {
                          return {str(n, "name"), n.value("active", false) ? "active" : "inactive", str(n, "mode"),
                                  str(n, "bridge"), fmt::format("{}/{}", str(n, "address"), str(n, "prefix"))};
                        });
    };
  });
  one_request("net-define", "Define a network from a JSON file", {{"file", &file}},
              [&] { return Request{"POST", "/v1/networks", read_input_file(file)}; },
              [&] { return fmt::format("Network defined from {}", file); });
  for (auto verb : {"net-start", "net-stop", "net-undefine", "net-destroy"}) {
    auto* c = app.add_subcommand(verb, std::string(verb) + " a network");
    c->add_option("network", network)->required();
    std::string v = verb;
    c->callback([&, v] {
      action = [&, v] {
        if (v == "net-undefine") call("DELETE", "/v1/networks/" + enc(network));
        else call("POST", "/v1/networks/" + enc(network) + (v == "net-start" ? "/start" : "/stop"));
        print_ok(fmt::format("Network '{}': {} done", network, v.substr(4)));
        return kOk;
      };
    });
  }
  auto* leases = app.add_subcommand("net-dhcp-leases", "Show a network's DHCP leases");
  leases->add_option("network", network)->required();
  leases->callback([&] {
    action = [&] {
      return print_list(call_json("GET", "/v1/networks/" + enc(network) + "/leases"),
                        {"MAC address", "IP address", "Hostname"}, [](const json& l) -> std::vector<std::string> {
                          return {str(l, "mac"), str(l, "ip"), str(l, "hostname")};
                        });
    };
  });

  auto* ev = app.add_subcommand("events", "Print lifecycle, device and job events as they happen");
  ev->add_option("--domain", name, "Only this domain's events");
  ev->add_option("--count", count, "Exit after this many events");
  ev->add_option("--timeout", timeout, "Exit after this many seconds");
  ev->callback([&] { action = [&] { return events(name, count, timeout); }; });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : kUsage;
  }
  // Import needs the file's text as the body: handled here so `define` stays one call.
  if (from_libvirt || from_xl) {
    std::string text = read_input_file(file);
    auto r = call("POST", std::string("/v1/domains/import?define=1&format=") + (from_xl ? "xl" : "libvirt"), text);
    json j = json::parse(r.body, nullptr, false);
    if (json_output()) {
      std::printf("%s\n", j.dump(2).c_str());
      return kOk;
    }
    std::printf("Domain '%s' defined from %s\n", j["definition"].value("name", "?").c_str(), file.c_str());
    auto ignored = j.value("ignored", json::array());
    if (!ignored.empty()) {
      std::printf("Not imported (%zu):\n", ignored.size());
      for (auto& i : ignored) std::printf("  - %s\n", i.get<std::string>().c_str());
    }
    return kOk;
  }
  return action ? action() : kUsage;
}
