#include "base/event_loop.h"

#include <unistd.h>

#include <gtest/gtest.h>

#include <thread>

#include "base/signals.h"

namespace keel {
namespace {

using namespace std::chrono_literals;

TEST(EventLoop, DispatchesFdReadiness) {
  auto loop = EventLoop::create().value();
  auto pipe = make_pipe().value();
  std::string got;
  ASSERT_TRUE(loop->add_fd(pipe.first.get(), EPOLLIN, [&](uint32_t events) {
    EXPECT_TRUE(events & EPOLLIN);
    char buf[16];
    ssize_t n = ::read(pipe.first.get(), buf, sizeof buf);
    got.append(buf, static_cast<size_t>(n));
    loop->stop();
  }));
  ASSERT_TRUE(write_all(pipe.second.get(), "ping", 4));
  ASSERT_TRUE(loop->run());
  EXPECT_EQ(got, "ping");
  EXPECT_FALSE(loop->add_fd(pipe.first.get(), EPOLLIN, [](uint32_t) {})) << "double watch must fail";
}

TEST(EventLoop, TimersFireOnceOrRepeatAndCanBeCancelled) {
  auto loop = EventLoop::create().value();
  int once = 0, repeats = 0;
  ASSERT_TRUE(loop->add_timer(1ms, [&] { ++once; }));
  EventLoop::TimerId repeating = 0;
  repeating = loop->add_timer(2ms, [&] {
    if (++repeats == 3) {
      loop->cancel_timer(repeating);
      loop->stop();
    }
  }, /*repeat=*/true).value();
  auto cancelled = loop->add_timer(1ms, [&] { ADD_FAILURE() << "cancelled timer fired"; }).value();
  loop->cancel_timer(cancelled);
  ASSERT_TRUE(loop->run());
  EXPECT_EQ(once, 1);
  EXPECT_EQ(repeats, 3);
}

TEST(EventLoop, PostFromOtherThreadsRunsOnTheLoop) {
  auto loop = EventLoop::create().value();
  std::thread::id loop_thread = std::this_thread::get_id();
  std::atomic<int> ran{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i)
        loop->post([&] {
          EXPECT_EQ(std::this_thread::get_id(), loop_thread);
          if (++ran == 400) loop->stop();
        });
    });
  ASSERT_TRUE(loop->run());
  for (auto& t : threads) t.join();
  EXPECT_EQ(ran.load(), 400);
}

TEST(EventLoop, CallbackMayRemoveAnotherWatchedFd) {
  auto loop = EventLoop::create().value();
  auto a = make_pipe().value();
  auto b = make_pipe().value();
  int calls = 0;
  // Whichever fires first removes the other; the other's pending event must not be dispatched.
  ASSERT_TRUE(loop->add_fd(a.first.get(), EPOLLIN, [&](uint32_t) { ++calls; loop->remove_fd(b.first.get()); loop->remove_fd(a.first.get()); }));
  ASSERT_TRUE(loop->add_fd(b.first.get(), EPOLLIN, [&](uint32_t) { ++calls; loop->remove_fd(a.first.get()); loop->remove_fd(b.first.get()); }));
  ASSERT_TRUE(write_all(a.second.get(), "x", 1));
  ASSERT_TRUE(write_all(b.second.get(), "y", 1));
  ASSERT_TRUE(loop->run_once(100ms));
  ASSERT_TRUE(loop->run_once(10ms));
  EXPECT_EQ(calls, 1);
}

TEST(Signals, ArriveThroughTheLoop) {
  auto loop = EventLoop::create().value();
  auto sigfd = block_signals_to_fd({SIGUSR1}).value();
  int seen = 0;
  ASSERT_TRUE(watch_signals(*loop, sigfd.get(), [&](int signo) {
    seen = signo;
    loop->stop();
  }));
  ASSERT_EQ(::kill(::getpid(), SIGUSR1), 0);
  ASSERT_TRUE(loop->run());
  EXPECT_EQ(seen, SIGUSR1);
}

}  // namespace
}  // namespace keel
