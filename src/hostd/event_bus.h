// EventBus: lifecycle, device and job events fanned out to every subscriber (SSE / WebSocket
// streams). A slow subscriber loses its oldest events rather than slowing keeld down.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

namespace keel::hostd {

class EventSubscription {
public:
  static constexpr size_t kMaxQueued = 1024;
  // The next event, or nullopt after `timeout`.
  std::optional<nlohmann::json> next(std::chrono::milliseconds timeout);
  void push(const nlohmann::json& ev);
  uint64_t dropped() const { return dropped_; }

private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<nlohmann::json> queue_;
  uint64_t dropped_ = 0;
};

class EventBus {
public:
  // kind: "lifecycle" | "device" | "job"; domain may be empty for host-level events.
  void publish(const std::string& kind, const std::string& domain, const std::string& event,
               nlohmann::json detail = nlohmann::json::object());
  std::shared_ptr<EventSubscription> subscribe();

private:
  std::mutex mutex_;
  std::vector<std::weak_ptr<EventSubscription>> subscribers_;
  uint64_t sequence_ = 0;
};

}  // namespace keel::hostd
