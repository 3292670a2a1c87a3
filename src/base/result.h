// Result<T>: a value or an Error, with a TRY macro for early returns.
//
// Errors carry an errno-style code (0 when the failure has no errno meaning) and a human message
// that already says what failed and where ("open /tmp/x.qcow2: No such file or directory").
// Callers add context as the error travels up with Error::with_context().
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <fmt/format.h>
#include <tl/expected.hpp>

namespace keel {

class [[nodiscard]] Error {
public:
  Error() = default;
  Error(int code, std::string message) : code_(code), message_(std::move(message)) {}

  // An error with no errno meaning (bad input, protocol violation...).
  static Error invalid(std::string message) { return Error(EINVAL, std::move(message)); }
  // An error from the current value of errno, e.g. Error::from_errno("open " + path).
  static Error from_errno(std::string_view what);
  static Error from_errno(int err, std::string_view what);

  int code() const { return code_; }
  const std::string& message() const { return message_; }

  // Prefixes the message: "context: message".
  Error with_context(std::string_view context) const&;
  Error with_context(std::string_view context) &&;

private:
  int code_ = 0;
  std::string message_;
};

template <typename T>
using Result = tl::expected<T, Error>;

// A Result<void> success value: `return keel::ok();`
inline Result<void> ok() { return {}; }

inline tl::unexpected<Error> fail(Error e) { return tl::unexpected<Error>(std::move(e)); }
inline tl::unexpected<Error> fail(int code, std::string message) {
  return tl::unexpected<Error>(Error(code, std::move(message)));
}
template <typename... Args>
tl::unexpected<Error> fail_invalid(fmt::format_string<Args...> f, Args&&... args) {
  return tl::unexpected<Error>(Error::invalid(fmt::format(f, std::forward<Args>(args)...)));
}
inline tl::unexpected<Error> fail_errno(std::string_view what) {
  return tl::unexpected<Error>(Error::from_errno(what));
}

}  // namespace keel

// TRY(expr): evaluates a Result; on error returns it from the enclosing function, otherwise yields
// the value. Uses a statement expression (GCC and clang both support it).
#define KEEL_TRY_CONCAT2(a, b) a##b
#define KEEL_TRY_CONCAT(a, b) KEEL_TRY_CONCAT2(a, b)
#define TRY(...)                                                          \
  ({                                                                      \
    auto&& KEEL_TRY_CONCAT(keel_try_, __LINE__) = (__VA_ARGS__);          \
    if (!KEEL_TRY_CONCAT(keel_try_, __LINE__))                            \
      return ::tl::unexpected<::keel::Error>(                             \
          std::move(KEEL_TRY_CONCAT(keel_try_, __LINE__)).error());       \
    ::keel::detail::take_value(std::move(KEEL_TRY_CONCAT(keel_try_, __LINE__))); \
  })

// TRY_CTX(expr, "context"): as TRY, but prefixes the error's message with the context.
#define TRY_CTX(expr, context)                                            \
  ({                                                                      \
    auto&& KEEL_TRY_CONCAT(keel_try_, __LINE__) = (expr);                 \
    if (!KEEL_TRY_CONCAT(keel_try_, __LINE__))                            \
      return ::tl::unexpected<::keel::Error>(                             \
          std::move(KEEL_TRY_CONCAT(keel_try_, __LINE__)).error().with_context(context)); \
    ::keel::detail::take_value(std::move(KEEL_TRY_CONCAT(keel_try_, __LINE__))); \
  })

// Aborts with a message when an invariant does not hold. For programming errors only, never for
// bad input.
#define KEEL_CHECK(cond)                                                              \
  do {                                                                                \
    if (!(cond)) ::keel::detail::check_failed(#cond, __FILE__, __LINE__);             \
  } while (0)

namespace keel::detail {
// The value of a successful Result, moved out (by value, so it outlives the TRY's temporaries).
template <typename R>
auto take_value(R&& result) -> typename std::remove_cvref_t<R>::value_type {
  if constexpr (!std::is_void_v<typename std::remove_cvref_t<R>::value_type>) return std::move(*result);
}
[[noreturn]] void check_failed(const char* cond, const char* file, int line);
}
