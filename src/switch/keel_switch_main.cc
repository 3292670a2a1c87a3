// keel-switch: the userspace virtual switch daemon.
#include <sched.h>
#include <signal.h>

#include <chrono>

#include <CLI/CLI.hpp>

#include "base/event_loop.h"
#include "base/log.h"
#include "base/signals.h"
#include "switch/of_connection.h"
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
  unsigned control_poll_us = 100;
  app.add_option("--control-poll-us", control_poll_us,
                 "after OpenFlow input, poll (yielding the CPU) instead of sleeping for this long; 0: never")
      ->capture_default_str();
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
  // A controller streaming flow-mods waits for each barrier reply and sends the next request within
  // tens of microseconds. Polling for that long after OpenFlow input, instead of sleeping in epoll,
  // saves a sleep and a wake-up per request (on a VM, waking an idle vCPU alone costs tens of
  // microseconds); sched_yield between polls leaves the CPU to anything else that wants it.
  const auto poll_window = std::chrono::microseconds(control_poll_us);
  while (!stopping) {
    bool hot = poll_window.count() > 0 &&
               std::chrono::steady_clock::now() - keel::sw::last_openflow_input() < poll_window;
    if (auto r = l->run_once(std::chrono::milliseconds(hot ? 0 : -1)); !r) {
      KEEL_LOG_ERROR("{}", r.error().message());
      return 1;
    }
    if (hot) sched_yield();
  }
  return 0;
}
