#include "base/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

extern char** environ;

namespace keel {

namespace {

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

std::vector<std::string> merged_environment(const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string_view entry(*e);
    auto key = entry.substr(0, entry.find('='));
    bool overridden = false;
    for (auto& x : extra)
      if (std::string_view(x).substr(0, x.find('=')) == key) overridden = true;
    if (!overridden) env.emplace_back(entry);
  }
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

}  // namespace

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    pid_ = std::exchange(other.pid_, -1);
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
}

Result<int> ChildProcess::wait() {
  if (pid_ <= 0) return fail_invalid("wait: no child process");
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid_, &status, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return fail_errno("waitpid");
    break;
  }
  pid_ = -1;
  return decode_status(status);
}

Result<std::optional<int>> ChildProcess::try_wait() {
  if (pid_ <= 0) return fail_invalid("wait: no child process");
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r < 0) return fail_errno("waitpid");
  if (r == 0) return std::optional<int>();
  pid_ = -1;
  return std::optional<int>(decode_status(status));
}

Result<int> ChildProcess::wait_for(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    auto code = TRY(try_wait());
    if (code) return *code;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  TRY(signal(SIGKILL));
  return wait();
}

Result<void> ChildProcess::signal(int signo) {
  if (pid_ <= 0) return fail_invalid("kill: no child process");
  if (::kill(pid_, signo) < 0) return fail_errno("kill");
  return ok();
}

Result<ChildProcess> spawn(const std::vector<std::string>& argv, const SpawnOptions& options) {
  if (argv.empty()) return fail_invalid("spawn: empty command");
  // Everything the child needs is prepared before fork: after fork only async-signal-safe calls.
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<std::string> env_strings = merged_environment(options.extra_env);
  std::vector<char*> env;
  for (auto& e : env_strings) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);

  // The child reports an exec failure's errno through a close-on-exec pipe.
  auto report = TRY(make_pipe());
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) return fail_errno("fork");
  if (pid == 0) {
    if (options.new_session) ::setsid();
    if (options.die_with_parent) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
    }
    if (options.stdin_fd >= 0) ::dup2(options.stdin_fd, 0);
    if (options.stdout_fd >= 0) ::dup2(options.stdout_fd, 1);
    if (options.stderr_fd >= 0) ::dup2(options.stderr_fd, 2);
    // Signals blocked by the parent (signalfd users) would stay blocked across exec.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (!options.working_dir.empty() && ::chdir(options.working_dir.c_str()) < 0) {
      int err = errno;
      [[maybe_unused]] ssize_t n = ::write(report.second.get(), &err, sizeof err);
      ::_exit(127);
    }
    ::execvpe(args[0], args.data(), env.data());
    int err = errno;
    [[maybe_unused]] ssize_t n = ::write(report.second.get(), &err, sizeof err);
    ::_exit(127);
  }
  report.second.reset();
  ChildProcess child(pid);
  int child_errno = 0;
  auto n = TRY(read_full(report.first.get(), &child_errno, sizeof child_errno));
  if (n == sizeof child_errno) {
    (void)child.wait();
    return fail(Error::from_errno(child_errno, "exec " + argv[0]));
  }
  return child;
}

Result<CommandOutput> run_command(const std::vector<std::string>& argv, const std::string& stdin_data) {
  auto in = TRY(make_pipe());
  auto out = TRY(make_pipe());
  auto err = TRY(make_pipe());
  SpawnOptions options;
  options.stdin_fd = in.first.get();
  options.stdout_fd = out.second.get();
  options.stderr_fd = err.second.get();
  auto child = TRY(spawn(argv, options));
  in.first.reset();
  out.second.reset();
  err.second.reset();

  // Feed stdin and drain both outputs together so no pipe fills up and deadlocks the child.
  ::fcntl(in.second.get(), F_SETFL, O_NONBLOCK);
  size_t written = 0;
  if (stdin_data.empty()) in.second.reset();
  CommandOutput result{0, {}, {}};
  char buf[65536];
  while (out.first.valid() || err.first.valid()) {
    pollfd fds[3];
    int nfds = 0;
    int out_i = -1, err_i = -1, in_i = -1;
    if (out.first.valid()) { out_i = nfds; fds[nfds++] = {out.first.get(), POLLIN, 0}; }
    if (err.first.valid()) { err_i = nfds; fds[nfds++] = {err.first.get(), POLLIN, 0}; }
    if (in.second.valid()) { in_i = nfds; fds[nfds++] = {in.second.get(), POLLOUT, 0}; }
    if (::poll(fds, static_cast<nfds_t>(nfds), -1) < 0) {
      if (errno == EINTR) continue;
      return fail_errno("poll");
    }
    auto drain = [&](int index, UniqueFd& fd, std::string& sink) {
      if (index < 0 || !(fds[index].revents & (POLLIN | POLLHUP | POLLERR))) return;
      ssize_t r = ::read(fd.get(), buf, sizeof buf);
      if (r <= 0) fd.reset();
      else sink.append(buf, static_cast<size_t>(r));
    };
    drain(out_i, out.first, result.out);
    drain(err_i, err.first, result.err);
    if (in_i >= 0 && (fds[in_i].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t w = ::write(in.second.get(), stdin_data.data() + written, stdin_data.size() - written);
      if (w < 0) in.second.reset();  // the child closed its stdin
      else if ((written += static_cast<size_t>(w)) == stdin_data.size()) in.second.reset();
    }
  }
  result.exit_code = TRY(child.wait());
  return result;
}

std::optional<std::string> find_executable(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    if (::access(name.c_str(), X_OK) == 0) return name;
    return std::nullopt;
  }
  const char* path = std::getenv("PATH");
  std::string_view rest = path ? path : "/usr/local/bin:/usr/bin:/bin";
  // Tools like mke2fs and sgdisk live in sbin, which a non-root PATH may lack.
  std::string all = std::string(rest) + ":/usr/sbin:/sbin";
  std::string_view view = all;
  while (!view.empty()) {
    auto colon = view.find(':');
    std::string dir(view.substr(0, colon));
    std::string candidate = dir + "/" + name;
    if (!dir.empty() && ::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) break;
    view.remove_prefix(colon + 1);
  }
  return std::nullopt;
}

}  // namespace keel
