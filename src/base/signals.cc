#include "base/signals.h"

#include <pthread.h>
#include <sys/signalfd.h>
#include <unistd.h>

namespace keel {

Result<UniqueFd> block_signals_to_fd(std::initializer_list<int> signals) {
  sigset_t set;
  sigemptyset(&set);
  for (int s : signals) sigaddset(&set, s);
  if (int err = ::pthread_sigmask(SIG_BLOCK, &set, nullptr); err != 0)
    return fail(Error::from_errno(err, "pthread_sigmask"));
  int fd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd < 0) return fail_errno("signalfd");
  return UniqueFd(fd);
}

Result<int> read_signal(int signal_fd) {
  signalfd_siginfo info;
  ssize_t n = ::read(signal_fd, &info, sizeof info);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return 0;
    return fail_errno("read(signalfd)");
  }
  if (n != sizeof info) return fail_invalid("signalfd: short read of {} bytes", n);
  return static_cast<int>(info.ssi_signo);
}

Result<void> watch_signals(EventLoop& loop, int signal_fd, std::function<void(int)> handler) {
  return loop.add_fd(signal_fd, EPOLLIN, [signal_fd, handler = std::move(handler)](uint32_t) {
    for (;;) {
      auto signo = read_signal(signal_fd);
      if (!signo || *signo == 0) return;
      handler(*signo);
    }
  });
}

void ignore_sigpipe() { ::signal(SIGPIPE, SIG_IGN); }

}  // namespace keel
