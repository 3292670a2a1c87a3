// Child processes: spawn with an argv (never a shell), wait, signal. Used to run QEMU, qemu-img,
// dnsmasq and the peers tests compare against.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace keel {

struct SpawnOptions {
  // -1 keeps the parent's; otherwise the fd becomes the child's stdin/stdout/stderr.
  int stdin_fd = -1;
  int stdout_fd = -1;
  int stderr_fd = -1;
  // Environment entries "K=V" added to (or replacing in) the parent's.
  std::vector<std::string> extra_env;
  // Start a new session (setsid) so the child outlives our terminal and our process group.
  bool new_session = false;
  // Deliver SIGKILL to the child when the parent dies (PR_SET_PDEATHSIG).
  bool die_with_parent = false;
  std::string working_dir;
};

class ChildProcess {
public:
  ChildProcess() = default;
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  ChildProcess(ChildProcess&& other) noexcept : pid_(std::exchange(other.pid_, -1)) {}
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  // A child that was never waited for is killed and reaped, so tests never leak processes.
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }

  // Waits for exit. Returns the exit code, or 128+signal if killed by a signal (as shells do).
  Result<int> wait();
  // Non-blocking: the exit code if it has exited.
  Result<std::optional<int>> try_wait();
  // Waits at most `timeout`; kills (SIGKILL) and reaps if it has not exited by then.
  Result<int> wait_for(std::chrono::milliseconds timeout);
  Result<void> signal(int signo);
  // Gives up ownership without waiting (for daemons that must outlive us).
  pid_t release() { return std::exchange(pid_, -1); }

private:
  pid_t pid_ = -1;
};

Result<ChildProcess> spawn(const std::vector<std::string>& argv, const SpawnOptions& options = {});

struct CommandOutput {
  int exit_code;
  std::string out;
  std::string err;
};
// Runs argv to completion and collects stdout and stderr.
Result<CommandOutput> run_command(const std::vector<std::string>& argv,
                                  const std::string& stdin_data = {});

// Finds an executable in PATH (or returns the argument if it contains a slash and exists).
std::optional<std::string> find_executable(const std::string& name);

}  // namespace keel
