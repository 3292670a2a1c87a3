#include "base/unique_fd.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace keel {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) {
    // close() must not be retried on EINTR on Linux: the fd is gone either way.
    ::close(fd_);
  }
  fd_ = fd;
}

Result<UniqueFd> UniqueFd::open(const std::string& path, int flags, int mode) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) return fail_errno("open " + path);
  return UniqueFd(fd);
}

Result<UniqueFd> UniqueFd::dup() const {
  int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return fail_errno("dup");
  return UniqueFd(fd);
}

Result<FdPair> make_pipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) < 0) return fail_errno("pipe2");
  return FdPair{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<FdPair> make_socketpair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0) return fail_errno("socketpair");
  return FdPair{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<void> write_all(int fd, const void* data, size_t len) {
  auto* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("write");
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return ok();
}

Result<size_t> read_full(int fd, void* data, size_t len) {
  auto* p = static_cast<char*>(data);
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::read(fd, p + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("read");
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Result<void> pread_all(int fd, void* data, size_t len, off_t offset) {
  auto* p = static_cast<char*>(data);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("pread");
    }
    if (n == 0) return fail(EIO, fmt::format("pread: unexpected end of file at offset {}", offset));
    p += n;
    len -= static_cast<size_t>(n);
    offset += n;
  }
  return ok();
}

Result<void> pwrite_all(int fd, const void* data, size_t len, off_t offset) {
  auto* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("pwrite");
    }
    p += n;
    len -= static_cast<size_t>(n);
    offset += n;
  }
  return ok();
}

Result<std::string> read_file(const std::string& path) {
  UniqueFd fd = TRY(UniqueFd::open(path, O_RDONLY));
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("read " + path);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

Result<void> write_file(const std::string& path, std::string_view contents) {
  UniqueFd fd = TRY(UniqueFd::open(path, O_WRONLY | O_CREAT | O_TRUNC));
  TRY_CTX(write_all(fd.get(), contents.data(), contents.size()), "write " + path);
  return ok();
}

}  // namespace keel
