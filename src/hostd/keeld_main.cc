// keeld: the per-host daemon. Serves the REST API on a unix socket (and on TCP with TLS and a
// token), keeps state in SQLite under --state-dir, and supervises QEMU processes that outlive it.
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "base/log.h"
#include "base/process.h"
#include "base/signals.h"
#include "hostd/api.h"
#include "hostd/domain_manager.h"
#include "hostd/http.h"
#include "qemu/accel.h"

using namespace keel;
using namespace keel::hostd;

namespace {

Result<void> mkdirs(const std::string& path, mode_t mode) {
  std::string cur;
  size_t i = 0;
  while (i <= path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string::npos) j = path.size();
    cur = path.substr(0, j);
    if (!cur.empty() && ::mkdir(cur.c_str(), mode) < 0 && errno != EEXIST) return fail_errno("mkdir " + cur);
    i = j + 1;
  }
  return ok();
}

Result<std::string> load_or_make_token(const std::string& path) {
  if (auto t = read_file(path)) {
    std::string s = *t;
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    if (s.size() < 16) return fail_invalid("token file {}: token shorter than 16 characters", path);
    return s;
  }
  unsigned char raw[24];
  auto fd = TRY(UniqueFd::open("/dev/urandom", O_RDONLY));
  TRY(read_full(fd.get(), raw, sizeof raw));
  std::string token;
  for (unsigned char c : raw) token += fmt::format("{:02x}", c);
  auto out = TRY(UniqueFd::open(path, O_WRONLY | O_CREAT | O_EXCL, 0600));
  TRY(write_all(out.get(), token.data(), token.size()));
  return token;
}

// keel-switch and keel-switch-ctl: next to keeld's build (build/src/hostd/keeld ->
// build/src/switch/), then next to keeld (an install), then PATH. Empty binaries if not found.
SwitchBackend find_switch(const std::string& state_dir) {
  SwitchBackend sw;
  sw.state_dir = state_dir + "/switch";
  sw.ctl_socket = state_dir + "/run/keel-switch.sock";
  std::string self_dir;
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n > 0) {
    std::string self(buf, static_cast<size_t>(n));
    self_dir = self.substr(0, self.rfind('/'));
  }
  auto usable = [](const std::string& p) { return ::access(p.c_str(), X_OK) == 0; };
  for (const std::string& dir : {self_dir + "/../switch", self_dir}) {
    if (self_dir.empty()) break;
    if (usable(dir + "/keel-switch") && usable(dir + "/keel-switch-ctl")) {
      sw.switch_binary = dir + "/keel-switch";
      sw.ctl_binary = dir + "/keel-switch-ctl";
      return sw;
    }
  }
  auto a = find_executable("keel-switch");
  auto b = find_executable("keel-switch-ctl");
  if (a && b) {
    sw.switch_binary = *a;
    sw.ctl_binary = *b;
  }
  return sw;
}

int run(int argc, char** argv) {
  CLI::App app{"keeld: Keel's per-host VM daemon"};
  std::string state_dir = "/var/lib/keel";
  std::string socket_path = "/run/keel/keeld.sock";
  std::string listen, tls_cert, tls_key, token_file, qemu_user = "auto", log_level = "info";
  std::string qemu_binary = "qemu-system-x86_64";
  std::string volume_backend = "keel-disk";
  bool no_sandbox = false;
  app.add_option("--state-dir", state_dir, "State directory (database, images, runtime files)");
  app.add_option("--socket", socket_path, "Unix socket for the API");
  app.add_option("--listen", listen, "Also serve HTTPS on HOST:PORT (needs --tls-cert, --tls-key)");
  app.add_option("--tls-cert", tls_cert, "PEM certificate (chain) for --listen");
  app.add_option("--tls-key", tls_key, "PEM private key for --listen");
  app.add_option("--token-file", token_file, "Bearer token for TCP clients (default STATE_DIR/token, made if absent)");
  app.add_option("--qemu-user", qemu_user,
                 "auto (as root: nobody where it can read the kernel/initrd), none (keeld's uid), or a user name");
  app.add_option("--qemu-binary", qemu_binary, "QEMU system emulator");
  app.add_option("--volume-backend", volume_backend,
                 "Image operations through keel-disk (Keel's disk library, default) or qemu-img")
      ->check(CLI::IsMember({"keel-disk", "qemu-img"}));
  std::string network_backend;
  app.add_option("--network-backend", network_backend,
                 "switch (keel-switch) or bridge (Linux bridges); default switch when keel-switch is found")
      ->check(CLI::IsMember({"switch", "bridge"}));
  // Taps stay the default until keel-switch's vhost-user ports offer offloads (checksum, TSO): without
  // them a TCG guest spends more CPU per frame on vhost-user than on a tap and moves less.
  std::string switch_nic = "tap";
  app.add_option("--switch-nic", switch_nic,
                 "Guest NICs on keel-switch networks: tap (default) or vhost-user (shared guest memory, no QEMU "
                 "on the data path)")
      ->check(CLI::IsMember({"vhost-user", "tap"}));
  app.add_flag("--no-sandbox", no_sandbox, "Run QEMU without -sandbox (debugging only)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  init_logging("keeld", log_level);
  if (!listen.empty() && (tls_cert.empty() || tls_key.empty())) {
    KEEL_LOG_ERROR("--listen needs --tls-cert and --tls-key: keeld never serves plain TCP");
    return 2;
  }
  auto fail_out = [](const Error& e) {
    KEEL_LOG_ERROR("{}", e.message());
    return 1;
  };
  if (auto r = mkdirs(state_dir, 0711); !r) return fail_out(r.error());
  auto slash = socket_path.rfind('/');
  if (slash != std::string::npos && slash > 0)
    if (auto r = mkdirs(socket_path.substr(0, slash), 0755); !r) return fail_out(r.error());

  // One keeld per state dir.
  auto lock = UniqueFd::open(state_dir + "/keeld.lock", O_RDWR | O_CREAT, 0600);
  if (!lock) return fail_out(lock.error());
  if (::flock(lock->get(), LOCK_EX | LOCK_NB) < 0) {
    KEEL_LOG_ERROR("another keeld is using {}", state_dir);
    return 1;
  }
  auto signal_fd = block_signals_to_fd({SIGTERM, SIGINT, SIGHUP});
  if (!signal_fd) return fail_out(signal_fd.error());
  ignore_sigpipe();

  auto accel = qemu::detect_accelerator();
  if (!accel) return fail_out(accel.error());
  KEEL_LOG_INFO("accelerator: {} ({})", qemu::accel_name(accel->accel), accel->reason);

  auto store = StateStore::open(state_dir + "/keeld.db");
  if (!store) return fail_out(store.error());
  EventBus events;
  auto backend = make_volume_backend(volume_backend);
  if (!backend) return fail_out(backend.error());
  StoragePools pools(**store, std::move(*backend));
  pools.set_events(&events);
  KEEL_LOG_INFO("volume backend: {}", pools.backend().name());
  if (auto r = pools.ensure_default(state_dir + "/images"); !r) return fail_out(r.error());
  Networks networks(**store, state_dir + "/run");
  if (auto r = networks.ensure_default(); !r) return fail_out(r.error());
  if (network_backend != "bridge") {
    auto sw = find_switch(state_dir);
    if (!sw.switch_binary.empty()) {
      sw.vhost_user_nics = switch_nic == "vhost-user";
      networks.use_switch(sw);
    } else if (network_backend == "switch") {
      KEEL_LOG_ERROR("--network-backend switch: keel-switch and keel-switch-ctl not found (next to keeld or in PATH)");
      return 1;
    }
  }
  KEEL_LOG_INFO("network backend: {}{}", networks.backend_name(),
                networks.on_switch() ? fmt::format(" (keel-switch control {}/run/keel-switch.sock, guest NICs: {})",
                                                   state_dir, switch_nic)
                                     : "");
  DomainManagerConfig cfg;
  cfg.state_dir = state_dir;
  cfg.qemu_binary = qemu_binary;
  cfg.accel = accel->accel;
  cfg.sandbox = !no_sandbox;
  cfg.qemu_user = qemu_user;
  DomainManager domains(cfg, **store, events, pools, networks);
  if (auto r = domains.init(); !r) return fail_out(r.error());

  std::string token;
  if (!listen.empty()) {
    auto t = load_or_make_token(token_file.empty() ? state_dir + "/token" : token_file);
    if (!t) return fail_out(t.error());
    token = *t;
  }
  ApiContext ctx{domains, pools, networks, events, token};
  HttpServer server;
  install_api(server, ctx);
  if (auto r = server.listen_unix(socket_path); !r) return fail_out(r.error());
  if (!listen.empty())
    if (auto r = server.listen_tls(listen, tls_cert, tls_key); !r) return fail_out(r.error());
  server.start();
  KEEL_LOG_INFO("keeld ready on unix:{}{}", socket_path, listen.empty() ? "" : " and https://" + listen);

  for (;;) {
    pollfd p{signal_fd->get(), POLLIN, 0};
    if (::poll(&p, 1, -1) < 0 && errno != EINTR) return fail_out(Error::from_errno("poll"));
    auto sig = read_signal(signal_fd->get());
    if (!sig) return fail_out(sig.error());
    if (*sig == SIGTERM || *sig == SIGINT) break;
  }
  KEEL_LOG_INFO("keeld stopping; running VMs keep running");
  server.stop();
  ::unlink(socket_path.c_str());
  // Connection threads may still be inside handlers: leave without running destructors that would
  // pull the managers from under them.
  std::fflush(nullptr);
  ::_exit(0);
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
