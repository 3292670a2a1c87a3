#include "base/result.h"

#include <gtest/gtest.h>

#include <memory>

namespace keel {
namespace {

Result<int> parse_digit(char c) {
  if (c < '0' || c > '9') return fail_invalid("'{}' is not a digit", c);
  return c - '0';
}

Result<int> sum_two(char a, char b) {
  int x = TRY(parse_digit(a));
  int y = TRY_CTX(parse_digit(b), "second digit");
  return x + y;
}

Result<void> check_positive(int v) {
  if (v <= 0) return fail(ERANGE, "not positive");
  return ok();
}

Result<int> use_void(int v) {
  TRY(check_positive(v));
  return v * 2;
}

Result<std::unique_ptr<int>> make_owned(int v) { return std::make_unique<int>(v); }

Result<int> unwrap_move_only() {
  std::unique_ptr<int> p = TRY(make_owned(7));
  return *p;
}

TEST(Result, TryPassesValuesThrough) { EXPECT_EQ(sum_two('3', '4').value(), 7); }

TEST(Result, TryReturnsTheFirstError) {
  auto r = sum_two('x', '4');
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), EINVAL);
  EXPECT_EQ(r.error().message(), "'x' is not a digit");
}

TEST(Result, TryCtxPrefixesContext) {
  auto r = sum_two('1', 'y');
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message(), "second digit: 'y' is not a digit");
}

TEST(Result, VoidResults) {
  EXPECT_EQ(use_void(2).value(), 4);
  auto r = use_void(-1);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ERANGE);
}

TEST(Result, MoveOnlyValues) { EXPECT_EQ(unwrap_move_only().value(), 7); }

TEST(Result, FromErrnoNamesTheOperation) {
  Error e = Error::from_errno(ENOENT, "open /nope");
  EXPECT_EQ(e.code(), ENOENT);
  EXPECT_EQ(e.message(), "open /nope: No such file or directory");
}

TEST(ResultDeathTest, CheckAbortsLoudly) {
  EXPECT_DEATH(KEEL_CHECK(1 + 1 == 3), "invariant broken.*1 \\+ 1 == 3");
}

}  // namespace
}  // namespace keel
