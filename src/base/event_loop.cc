#include "base/event_loop.h"

#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <atomic>

namespace keel {

Result<std::unique_ptr<EventLoop>> EventLoop::create() {
  int ep = ::epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return fail_errno("epoll_create1");
  UniqueFd epoll(ep);
  int ev = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (ev < 0) return fail_errno("eventfd");
  UniqueFd wake(ev);
  std::unique_ptr<EventLoop> loop(new EventLoop(std::move(epoll), std::move(wake)));
  epoll_event e{};
  e.events = EPOLLIN;
  e.data.fd = loop->wake_.get();
  if (::epoll_ctl(loop->epoll_.get(), EPOLL_CTL_ADD, loop->wake_.get(), &e) < 0)
    return fail_errno("epoll_ctl(eventfd)");
  return loop;
}

EventLoop::EventLoop(UniqueFd epoll, UniqueFd wake) : epoll_(std::move(epoll)), wake_(std::move(wake)) {}

EventLoop::~EventLoop() = default;

Result<void> EventLoop::add_fd(int fd, uint32_t events, FdCallback callback) {
  if (watches_.count(fd)) return fail_invalid("event loop: fd {} is already watched", fd);
  epoll_event e{};
  e.events = events;
  e.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &e) < 0) return fail_errno("epoll_ctl(ADD)");
  watches_[fd] = Watch{std::move(callback), next_generation_++};
  return ok();
}

Result<void> EventLoop::modify_fd(int fd, uint32_t events) {
  epoll_event e{};
  e.events = events;
  e.data.fd = fd;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &e) < 0) return fail_errno("epoll_ctl(MOD)");
  return ok();
}

void EventLoop::remove_fd(int fd) {
  if (watches_.erase(fd)) ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

Result<EventLoop::TimerId> EventLoop::add_timer(std::chrono::nanoseconds delay,
                                                std::function<void()> callback, bool repeat) {
  int tfd = ::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  if (tfd < 0) return fail_errno("timerfd_create");
  UniqueFd fd(tfd);
  // A zero it_value disarms a timerfd, so the shortest delay is one nanosecond.
  auto ns = std::max<int64_t>(delay.count(), 1);
  itimerspec spec{};
  spec.it_value.tv_sec = ns / 1'000'000'000;
  spec.it_value.tv_nsec = ns % 1'000'000'000;
  if (repeat) spec.it_interval = spec.it_value;
  if (::timerfd_settime(tfd, 0, &spec, nullptr) < 0) return fail_errno("timerfd_settime");

  TimerId id = next_timer_++;
  TRY(add_fd(tfd, EPOLLIN, [this, id](uint32_t) {
    auto it = timers_.find(id);
    if (it == timers_.end()) return;
    uint64_t expirations;
    [[maybe_unused]] ssize_t n = ::read(it->second.fd.get(), &expirations, sizeof expirations);
    // Copy the callback out: it may cancel its own timer, which destroys the stored one.
    auto callback = it->second.callback;
    if (!it->second.repeat) cancel_timer(id);
    callback();
  }));
  timers_[id] = Timer{std::move(fd), std::move(callback), repeat};
  return id;
}

void EventLoop::cancel_timer(TimerId id) {
  auto it = timers_.find(id);
  if (it == timers_.end()) return;
  remove_fd(it->second.fd.get());
  timers_.erase(it);
}

void EventLoop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(posted_mutex_);
    posted_.push_back(std::move(fn));
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
}

void EventLoop::stop() {
  stopping_ = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wake_.get(), &one, sizeof one);
}

void EventLoop::drain_posted() {
  uint64_t count;
  [[maybe_unused]] ssize_t n = ::read(wake_.get(), &count, sizeof count);
  std::vector<std::function<void()>> batch;
  {
    std::lock_guard lock(posted_mutex_);
    batch.swap(posted_);
  }
  for (auto& fn : batch) fn();
}

Result<void> EventLoop::run_once(std::chrono::milliseconds timeout) {
  epoll_event events[64];
  int n = ::epoll_wait(epoll_.get(), events, 64, static_cast<int>(timeout.count()));
  if (n < 0) {
    if (errno == EINTR) return ok();
    return fail_errno("epoll_wait");
  }
  // Snapshot generations first so a callback that removes (or replaces) another fd's watch
  // stops that fd's pending event from being dispatched to the wrong callback.
  uint64_t generations[64];
  for (int i = 0; i < n; ++i) {
    auto it = watches_.find(events[i].data.fd);
    generations[i] = it == watches_.end() ? 0 : it->second.generation;
  }
  for (int i = 0; i < n; ++i) {
    int fd = events[i].data.fd;
    if (fd == wake_.get()) {
      drain_posted();
      continue;
    }
    auto it = watches_.find(fd);
    if (it == watches_.end() || it->second.generation != generations[i]) continue;
    // Copy: the callback may remove its own watch.
    FdCallback callback = it->second.callback;
    callback(events[i].events);
  }
  return ok();
}

Result<void> EventLoop::run() {
  stopping_ = false;
  while (!stopping_) TRY(run_once(std::chrono::milliseconds(-1)));
  return ok();
}

}  // namespace keel
