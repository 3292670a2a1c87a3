// UniqueFd: the one owner of a file descriptor. Move-only; closes on destruction.
#pragma once

#include <string>
#include <utility>

#include "base/result.h"

namespace keel {

class UniqueFd {
public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }

  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

  // open(2) with O_CLOEXEC added; the error names the path.
  static Result<UniqueFd> open(const std::string& path, int flags, int mode = 0644);
  // dup with O_CLOEXEC.
  Result<UniqueFd> dup() const;

private:
  int fd_ = -1;
};

// A pair of connected fds: pipe2(O_CLOEXEC) or socketpair(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC).
struct FdPair {
  UniqueFd first;
  UniqueFd second;
};
Result<FdPair> make_pipe();
Result<FdPair> make_socketpair();

// Reads/writes all of a buffer, retrying on EINTR and short transfers.
Result<void> write_all(int fd, const void* data, size_t len);
Result<size_t> read_full(int fd, void* data, size_t len);  // stops early only at EOF
Result<void> pread_all(int fd, void* data, size_t len, off_t offset);
Result<void> pwrite_all(int fd, const void* data, size_t len, off_t offset);

// Whole-file helpers for small files (config, /proc, sysfs).
Result<std::string> read_file(const std::string& path);
Result<void> write_file(const std::string& path, std::string_view contents);

}  // namespace keel
