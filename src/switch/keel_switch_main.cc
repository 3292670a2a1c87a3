// keel-switch: the userspace virtual switch daemon.
#include <signal.h>

#include <CLI/CLI.hpp>

#include "base/event_loop.h"
#include "base/log.h"
#include "base/signals.h"
#include "switch/switch_daemon.h"

int main(int argc, char** argv) {
  CLI::App app{"keel-switch: userspace virtual switch with OpenFlow 1.0/1.3"};
  std::string state_dir = "/var/lib/keel-switch";
  std::string ctl_socket;
  std::string log_level = "info";
  bool busy_poll = false;
  app.add_option("--state-dir", state_dir, "directory holding config.json");
  app.add_option("--ctl-socket", ctl_socket, "unix socket for keel-switch-ctl (default STATE_DIR/ctl.sock)");
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error");
  app.add_flag("--busy-poll", busy_poll,
               "never sleep: poll ports continuously (lower latency, burns a core; default: sleep in epoll)");
  CLI11_PARSE(app, argc, argv);
  if (ctl_socket.empty()) ctl_socket = state_dir + "/ctl.sock";
  keel::init_logging("keel-switch", log_level);
  signal(SIGPIPE, SIG_IGN);

  auto loop = keel::EventLoop::create();
  if (!loop) {
    KEEL_LOG_ERROR("{}", loop.error().message());
    return 1;
  }
  auto sigfd = keel::block_signals_to_fd({SIGINT, SIGTERM});
  if (!sigfd) {
    KEEL_LOG_ERROR("{}", sigfd.error().message());
    return 1;
  }
  keel::sw::SwitchDaemon daemon(**loop, state_dir);
  if (auto r = daemon.load(); !r) {
    KEEL_LOG_ERROR("loading configuration: {}", r.error().message());
    return 1;
  }
  if (auto r = daemon.listen_control(ctl_socket); !r) {
    KEEL_LOG_ERROR("{}", r.error().message());
    return 1;
  }
  auto* l = loop->get();
  bool stopping = false;
  if (auto r = keel::watch_signals(*l, sigfd->get(), [l, &stopping](int) {
        stopping = true;
        l->stop();
      });
      !r) {
    KEEL_LOG_ERROR("{}", r.error().message());
    return 1;
  }
  KEEL_LOG_INFO("keel-switch running (state {}, control {}{})", state_dir, ctl_socket,
                busy_poll ? ", busy-polling" : "");
  if (busy_poll) {
    while (!stopping) {
      if (auto r = l->run_once(std::chrono::milliseconds(0)); !r) {
        KEEL_LOG_ERROR("{}", r.error().message());
        return 1;
      }
    }
    return 0;
  }
  if (auto r = l->run(); !r) {
    KEEL_LOG_ERROR("{}", r.error().message());
    return 1;
  }
  return 0;
}
