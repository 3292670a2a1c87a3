#include "base/process.h"

#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace keel {
namespace {

using namespace std::chrono_literals;

TEST(Process, RunCommandCollectsOutputAndExitCode) {
  auto r = run_command({"sh", "-c", "echo out; echo err >&2; exit 3"}).value();
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(r.out, "out\n");
  EXPECT_EQ(r.err, "err\n");
}

TEST(Process, RunCommandFeedsStdinWithoutDeadlock) {
  std::string big(1 << 20, 'z');
  auto r = run_command({"cat"}, big).value();
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.size(), big.size());
}

TEST(Process, MissingExecutableIsAnErrorNotAChild) {
  auto r = spawn({"/nonexistent/keel-binary"});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ENOENT);
  EXPECT_NE(r.error().message().find("exec /nonexistent/keel-binary"), std::string::npos);
}

TEST(Process, SignalledChildReportsShellStyleCode) {
  auto child = spawn({"sleep", "30"}).value();
  ASSERT_TRUE(child.signal(SIGTERM));
  EXPECT_EQ(child.wait().value(), 128 + SIGTERM);
}

TEST(Process, WaitForKillsAfterTimeout) {
  auto child = spawn({"sleep", "30"}).value();
  EXPECT_EQ(child.wait_for(50ms).value(), 128 + SIGKILL);
}

TEST(Process, DestructorKillsAndReaps) {
  pid_t pid;
  {
    auto child = spawn({"sleep", "30"}).value();
    pid = child.pid();
  }
  EXPECT_EQ(::kill(pid, 0), -1);  // gone and reaped
}

TEST(Process, ExtraEnvironmentReachesTheChild) {
  SpawnOptions options;
  options.extra_env = {"KEEL_TEST_VALUE=42"};
  auto pipe = make_pipe().value();
  options.stdout_fd = pipe.second.get();
  auto child = spawn({"sh", "-c", "echo $KEEL_TEST_VALUE"}, options).value();
  pipe.second.reset();
  char buf[8] = {};
  ASSERT_TRUE(read_full(pipe.first.get(), buf, sizeof buf - 1));
  EXPECT_EQ(child.wait().value(), 0);
  EXPECT_STREQ(buf, "42\n");
}

TEST(Process, FindExecutable) {
  EXPECT_TRUE(find_executable("sh"));
  EXPECT_FALSE(find_executable("keel-no-such-tool"));
}

}  // namespace
}  // namespace keel
