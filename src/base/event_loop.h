// EventLoop: one thread's epoll loop. Watches fds for readiness, runs timers (timerfd), and runs
// closures posted from other threads (eventfd wake-up). Callbacks run on the loop's thread.
//
// Not thread-safe except for post() and stop(), which any thread may call.
#pragma once

#include <sys/epoll.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace keel {

class EventLoop {
public:
  // Events is a mask of EPOLLIN / EPOLLOUT / ...; the callback gets the events that fired.
  using FdCallback = std::function<void(uint32_t events)>;
  using TimerId = uint64_t;

  static Result<std::unique_ptr<EventLoop>> create();
  ~EventLoop();

  // Starts watching fd (which the caller keeps owning). One watch per fd.
  Result<void> add_fd(int fd, uint32_t events, FdCallback callback);
  Result<void> modify_fd(int fd, uint32_t events);
  // Safe to call from inside any callback, including the fd's own.
  void remove_fd(int fd);

  // Runs `callback` once after `delay`, or every `delay` if `repeat`. Returns an id for cancel_timer.
  Result<TimerId> add_timer(std::chrono::nanoseconds delay, std::function<void()> callback,
                            bool repeat = false);
  void cancel_timer(TimerId id);

  // From any thread: runs `fn` on the loop's thread soon.
  void post(std::function<void()> fn);

  // Runs until stop(). Returns an error only if epoll itself fails.
  Result<void> run();
  // Runs one round: waits up to `timeout` for events and dispatches them.
  Result<void> run_once(std::chrono::milliseconds timeout);
  // From any thread: makes run() return after the current round.
  void stop();

private:
  EventLoop(UniqueFd epoll, UniqueFd wake);
  void drain_posted();

  struct Watch {
    FdCallback callback;
    uint64_t generation;
  };
  struct Timer {
    UniqueFd fd;
    std::function<void()> callback;
    bool repeat;
  };

  UniqueFd epoll_;
  UniqueFd wake_;  // eventfd
  // Keyed by fd. The generation lets dispatch skip events for an fd removed (and maybe re-added)
  // during the same round.
  std::unordered_map<int, Watch> watches_;
  uint64_t next_generation_ = 1;
  std::unordered_map<TimerId, Timer> timers_;
  TimerId next_timer_ = 1;

  std::mutex posted_mutex_;
  std::vector<std::function<void()>> posted_;
  std::atomic<bool> stopping_{false};
};

}  // namespace keel
