// keel-switch-ctl: ovs-vsctl-like client for keel-switch. Sends its command line to the daemon's
// control socket and prints the answer.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/unique_fd.h"

int main(int argc, char** argv) {
  std::string socket_path = "/var/lib/keel-switch/ctl.sock";
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--socket" && i + 1 < argc) {
      socket_path = argv[++i];
    } else if (a.rfind("--socket=", 0) == 0) {
      socket_path = a.substr(9);
    } else if (a == "-h" || a == "--help") {
      std::puts(
          "usage: keel-switch-ctl [--socket PATH] COMMAND [ARGS...] [-- COMMAND ...]\n"
          "commands: add-br BR | del-br BR | list-br | add-port BR PORT [col=val...] | del-port [BR] PORT\n"
          "          list-ports BR | set-controller BR TARGET... | del-controller BR | get-controller BR\n"
          "          set port|interface|bridge NAME key=value... (type=, options:path=, tag=, trunks=,\n"
          "              ofport_request=, ingress_policing_rate= (kbit/s), ingress_policing_burst= (kbit),\n"
          "              other_config:mac-table-size=, other_config:mac-aging-time=)\n"
          "          show | fdb/show BR | fdb/flush BR | port-stats BR");
      return 0;
    } else {
      args.push_back(a);
    }
  }
  if (args.empty()) {
    std::fprintf(stderr, "keel-switch-ctl: no command (try --help)\n");
    return 2;
  }
  sockaddr_un sun{};
  if (socket_path.size() >= sizeof sun.sun_path) {
    std::fprintf(stderr, "keel-switch-ctl: socket path too long\n");
    return 2;
  }
  keel::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sun.sun_family = AF_UNIX;
  std::memcpy(sun.sun_path, socket_path.c_str(), socket_path.size());
  if (!fd.valid() || connect(fd.get(), reinterpret_cast<sockaddr*>(&sun), sizeof sun) < 0) {
    std::fprintf(stderr, "keel-switch-ctl: cannot connect to %s: %s\n", socket_path.c_str(), std::strerror(errno));
    return 1;
  }
  std::string req = nlohmann::json{{"argv", args}}.dump() + "\n";
  if (!keel::write_all(fd.get(), req.data(), req.size())) {
    std::fprintf(stderr, "keel-switch-ctl: write failed\n");
    return 1;
  }
  std::string resp;
  char buf[65536];
  for (;;) {
    ssize_t n = read(fd.get(), buf, sizeof buf);
    if (n <= 0) break;
    resp.append(buf, size_t(n));
  }
  auto j = nlohmann::json::parse(resp, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    std::fprintf(stderr, "keel-switch-ctl: malformed reply from daemon\n");
    return 1;
  }
  if (!j.value("ok", false)) {
    std::fprintf(stderr, "keel-switch-ctl: %s\n", j.value("error", std::string("failed")).c_str());
    return 1;
  }
  std::string out = j.value("output", std::string());
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}
