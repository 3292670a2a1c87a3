#include "hostd/event_bus.h"

#include <sys/time.h>

namespace keel::hostd {

std::optional<nlohmann::json> EventSubscription::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!cv_.wait_for(lock, timeout, [&] { return !queue_.empty(); })) return std::nullopt;
  nlohmann::json ev = std::move(queue_.front());
  queue_.pop_front();
  return ev;
}

void EventSubscription::push(const nlohmann::json& ev) {
  std::lock_guard lock(mutex_);
  if (queue_.size() >= kMaxQueued) {
    queue_.pop_front();
    ++dropped_;
  }
  queue_.push_back(ev);
  cv_.notify_one();
}

void EventBus::publish(const std::string& kind, const std::string& domain, const std::string& event,
                       nlohmann::json detail) {
  timeval tv{};
  ::gettimeofday(&tv, nullptr);
  std::lock_guard lock(mutex_);
  nlohmann::json ev = {{"seq", ++sequence_},
                       {"time", static_cast<double>(tv.tv_sec) + tv.tv_usec / 1e6},
                       {"kind", kind},
                       {"event", event},
                       {"detail", std::move(detail)}};
  if (!domain.empty()) ev["domain"] = domain;
  std::vector<std::weak_ptr<EventSubscription>> live;
  for (auto& w : subscribers_) {
    if (auto s = w.lock()) {
      s->push(ev);
      live.push_back(w);
    }
  }
  subscribers_ = std::move(live);
}

std::shared_ptr<EventSubscription> EventBus::subscribe() {
  auto s = std::make_shared<EventSubscription>();
  std::lock_guard lock(mutex_);
  subscribers_.push_back(s);
  return s;
}

}  // namespace keel::hostd
