#include "qemu/launcher.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/close_range.h>
#include <pwd.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "base/unique_fd.h"

namespace keel::qemu {

Result<LaunchIdentity> lookup_user(const std::string& name) {
  passwd pw{};
  passwd* found = nullptr;
  std::vector<char> buf(16384);
  int rc = ::getpwnam_r(name.c_str(), &pw, buf.data(), buf.size(), &found);
  if (rc != 0 || !found) return fail_invalid("user '{}' does not exist on this host", name);
  return LaunchIdentity{pw.pw_uid, pw.pw_gid};
}

Result<pid_t> launch_detached(const std::vector<std::string>& argv, const std::string& log_path,
                              const LaunchIdentity& identity) {
  if (argv.empty()) return fail_invalid("launch: empty command");
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  auto log = TRY(UniqueFd::open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0640));
  if (identity.uid != static_cast<uid_t>(-1) && ::fchown(log.get(), identity.uid, identity.gid) < 0)
    return fail_errno("chown " + log_path);
  auto devnull = TRY(UniqueFd::open("/dev/null", O_RDONLY));
  // The pipe carries QEMU's pid (from the middle process), then an exec errno if exec fails; it
  // reaches EOF when both have happened.
  auto report = TRY(make_pipe());

  pid_t middle = ::fork();
  if (middle < 0) return fail_errno("fork");
  if (middle == 0) {
    ::setsid();
    pid_t qemu = ::fork();
    if (qemu < 0) ::_exit(1);
    if (qemu > 0) {
      [[maybe_unused]] ssize_t n = ::write(report.second.get(), &qemu, sizeof qemu);
      ::_exit(0);
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int s = 1; s < NSIG; ++s) ::signal(s, SIG_DFL);
    ::dup2(devnull.get(), 0);
    ::dup2(log.get(), 1);
    ::dup2(log.get(), 2);
    // keeld's sockets and database must not leak into the guest's process.
    ::syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC);
    int err = 0;
    if (identity.uid != static_cast<uid_t>(-1)) {
      if (::setgroups(0, nullptr) < 0 || ::setgid(identity.gid) < 0 || ::setuid(identity.uid) < 0) err = errno;
    }
    if (err == 0) {
      ::execvp(args[0], args.data());
      err = errno;
    }
    [[maybe_unused]] ssize_t n = ::write(report.second.get(), &err, sizeof err);
    ::_exit(127);
  }
  report.second.reset();
  int status = 0;
  while (::waitpid(middle, &status, 0) < 0 && errno == EINTR) {
  }
  pid_t qemu = -1;
  auto n = TRY(read_full(report.first.get(), &qemu, sizeof qemu));
  if (n != sizeof qemu) return fail(EIO, "launch: could not fork QEMU");
  int child_errno = 0;
  n = TRY(read_full(report.first.get(), &child_errno, sizeof child_errno));
  if (n == sizeof child_errno) return fail(Error::from_errno(child_errno, "exec " + argv[0]));
  return qemu;
}

namespace {
// The state letter from /proc/PID/stat ('R', 'S', 'Z', ...), or 0.
char process_state(pid_t pid) {
  auto stat = read_file(fmt::format("/proc/{}/stat", pid));
  if (!stat) return 0;
  auto close = stat->rfind(')');
  if (close == std::string::npos || close + 2 >= stat->size()) return 0;
  return (*stat)[close + 2];
}
}  // namespace

bool process_alive(pid_t pid) {
  if (pid <= 0) return false;
  char s = process_state(pid);
  return s != 0 && s != 'Z' && s != 'X';
}

bool process_matches(pid_t pid, const std::string& needle) {
  if (!process_alive(pid)) return false;
  auto cmdline = read_file(fmt::format("/proc/{}/cmdline", pid));
  if (!cmdline) return false;
  return cmdline->find(needle) != std::string::npos;
}

int process_uid(pid_t pid) {
  auto status = read_file(fmt::format("/proc/{}/status", pid));
  if (!status) return -1;
  auto pos = status->find("\nUid:");
  if (pos == std::string::npos) return -1;
  return static_cast<int>(std::strtol(status->c_str() + pos + 5, nullptr, 10));
}

bool readable_as(const std::string& path, const LaunchIdentity& identity) {
  if (identity.uid == static_cast<uid_t>(-1)) return ::access(path.c_str(), R_OK) == 0;
  pid_t child = ::fork();
  if (child < 0) return false;
  if (child == 0) {
    if (::setgroups(0, nullptr) < 0 || ::setgid(identity.gid) < 0 || ::setuid(identity.uid) < 0) ::_exit(2);
    ::_exit(::access(path.c_str(), R_OK) == 0 ? 0 : 1);
  }
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

std::string user_name(int uid) {
  if (uid < 0) return "?";
  passwd pw{};
  passwd* found = nullptr;
  std::vector<char> buf(16384);
  if (::getpwuid_r(static_cast<uid_t>(uid), &pw, buf.data(), buf.size(), &found) == 0 && found) return pw.pw_name;
  return std::to_string(uid);
}

Result<ProcessUsage> process_usage(pid_t pid) {
  auto stat = TRY(read_file(fmt::format("/proc/{}/stat", pid)));
  auto close = stat.rfind(')');
  if (close == std::string::npos) return fail_invalid("/proc/{}/stat: malformed", pid);
  // Fields after the command: state(3) ... utime(14) stime(15) ... rss(24), 1-based.
  std::vector<std::string> fields;
  size_t i = close + 2;
  while (i < stat.size()) {
    size_t j = stat.find(' ', i);
    if (j == std::string::npos) j = stat.size();
    fields.push_back(stat.substr(i, j - i));
    i = j + 1;
  }
  if (fields.size() < 22) return fail_invalid("/proc/{}/stat: too few fields", pid);
  long ticks = ::sysconf(_SC_CLK_TCK);
  ProcessUsage u;
  uint64_t cpu_ticks = std::strtoull(fields[11].c_str(), nullptr, 10) + std::strtoull(fields[12].c_str(), nullptr, 10);
  u.cpu_ns = cpu_ticks * (1000000000ull / static_cast<uint64_t>(ticks));
  u.rss_bytes = std::strtoull(fields[21].c_str(), nullptr, 10) * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return u;
}

}  // namespace keel::qemu
