#include <gtest/gtest.h>

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>

#include "base/process.h"
#include "qemu/launcher.h"
#include "qemu/qmp.h"

namespace keel::qemu {
namespace {

using namespace std::chrono_literals;

TEST(QmpMessageBuffer, SplitsLinesAndKeepsPartial) {
  QmpMessageBuffer b;
  ASSERT_TRUE(b.append("{\"return\": {}}\r\n{\"event\": \"STOP\", \"timestamp\""));
  auto m = b.next();
  ASSERT_TRUE(m && *m);
  EXPECT_TRUE((**m).contains("return"));
  m = b.next();
  ASSERT_TRUE(m);
  EXPECT_FALSE(*m);
  ASSERT_TRUE(b.append(": {\"seconds\": 1, \"microseconds\": 2}}\n\n"));
  m = b.next();
  ASSERT_TRUE(m && *m);
  EXPECT_EQ((**m)["event"], "STOP");
}

TEST(QmpMessageBuffer, RejectsGarbageAndHugeMessages) {
  QmpMessageBuffer b;
  ASSERT_TRUE(b.append("not json\n"));
  EXPECT_FALSE(b.next());
  QmpMessageBuffer big;
  std::string chunk(1 << 20, 'x');
  bool failed = false;
  for (int i = 0; i < 20 && !failed; ++i) failed = !big.append(chunk);
  EXPECT_TRUE(failed);
  QmpMessageBuffer arr;
  ASSERT_TRUE(arr.append("[1,2]\n"));
  EXPECT_FALSE(arr.next());  // QMP messages are objects
}

// A real QEMU with no machine: QMP only.
class QmpWithQemu : public ::testing::Test {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/keel-qmp-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/qmp.sock";
    auto pid = launch_detached({"qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults", "-S",
                                "-qmp", "unix:" + socket_ + ",server=on,wait=off"},
                               dir_ + "/qemu.log", LaunchIdentity{});
    ASSERT_TRUE(pid) << pid.error().message();
    pid_ = *pid;
  }
  void TearDown() override {
    if (pid_ > 0 && process_alive(pid_)) ::kill(pid_, SIGKILL);
    (void)run_command({"rm", "-rf", dir_});
  }
  std::string dir_, socket_;
  pid_t pid_ = -1;
};

TEST_F(QmpWithQemu, CommandsEventsAndClose) {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::string> events;
  bool closed = false;
  auto c = QmpClient::connect(
      socket_, 10s,
      [&](const QmpEvent& ev) {
        std::lock_guard l(m);
        events.push_back(ev.name);
        cv.notify_all();
      },
      [&] {
        std::lock_guard l(m);
        closed = true;
        cv.notify_all();
      });
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ((*c)->qemu_version().substr(0, 2), "7.");
  auto st = (*c)->execute("query-status");
  ASSERT_TRUE(st) << st.error().message();
  EXPECT_EQ((*st)["status"], "prelaunch");
  auto bad = (*c)->execute("no-such-command");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message().find("no-such-command"), std::string::npos);
  ASSERT_TRUE((*c)->execute("cont"));
  ASSERT_TRUE((*c)->execute("stop"));
  {
    std::unique_lock l(m);
    ASSERT_TRUE(cv.wait_for(l, 5s, [&] { return std::count(events.begin(), events.end(), "STOP") > 0; }));
  }
  // Concurrent commands are matched to their replies.
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int i = 0; i < 8; ++i)
    threads.emplace_back([&] {
      for (int j = 0; j < 20; ++j)
        if (auto r = (*c)->execute("query-name"); r && r->is_object()) ++good;
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(good, 160);
  (void)(*c)->execute("quit");
  {
    std::unique_lock l(m);
    ASSERT_TRUE(cv.wait_for(l, 5s, [&] { return closed; }));
  }
  EXPECT_FALSE((*c)->connected());
  EXPECT_FALSE((*c)->execute("query-status"));
}

TEST_F(QmpWithQemu, PidIsTheDetachedQemu) {
  auto c = QmpClient::connect(socket_, 10s);  // QEMU is up once its monitor answers
  ASSERT_TRUE(c);
  EXPECT_TRUE(process_alive(pid_));
  EXPECT_TRUE(process_matches(pid_, socket_));
  EXPECT_FALSE(process_matches(pid_, "some-other-uuid"));
  auto usage = process_usage(pid_);
  ASSERT_TRUE(usage);
  EXPECT_GT(usage->rss_bytes, 0u);
  // Not our child: QEMU was double-forked so it outlives its starter.
  EXPECT_NE(::getppid(), pid_);
}

TEST(Launcher, ExecFailureIsReported) {
  auto pid = launch_detached({"/nonexistent/qemu"}, "/dev/null", LaunchIdentity{});
  ASSERT_FALSE(pid);
  EXPECT_EQ(pid.error().code(), ENOENT);
}

TEST(QmpClient, ConnectTimesOutWithoutServer) {
  auto c = QmpClient::connect("/tmp/keel-no-such-qmp.sock", 50ms);
  EXPECT_FALSE(c);
}

}  // namespace
}  // namespace keel::qemu
