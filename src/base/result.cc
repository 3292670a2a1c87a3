#include "base/result.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace keel {

Error Error::from_errno(std::string_view what) { return from_errno(errno, what); }

Error Error::from_errno(int err, std::string_view what) {
  return Error(err, fmt::format("{}: {}", what, std::strerror(err)));
}

Error Error::with_context(std::string_view context) const& {
  return Error(code_, fmt::format("{}: {}", context, message_));
}

Error Error::with_context(std::string_view context) && {
  message_ = fmt::format("{}: {}", context, message_);
  return std::move(*this);
}

namespace detail {
void check_failed(const char* cond, const char* file, int line) {
  std::fprintf(stderr, "keel: invariant broken at %s:%d: %s\n", file, line, cond);
  std::abort();
}
}  // namespace detail

}  // namespace keel
