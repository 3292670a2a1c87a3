// MemoryPort: a port whose wire is a pair of queues in memory. Tests inject frames with push_rx() and
// read what the switch sent from sent(); the fuzzer uses it as a harmless sink.
#pragma once

#include <deque>
#include <vector>

#include "switch/port.h"

namespace keel::sw {

class MemoryPort final : public Port {
public:
  explicit MemoryPort(MacAddress mac = {}) : mac_(mac) {}
  std::string_view type() const override { return "memory"; }
  int poll_fd() const override { return -1; }
  size_t receive(PacketBatch& batch) override {
    size_t added = 0;
    while (!rx_.empty() && batch.size() < PacketBatch::kCapacity) {
      Frame& f = batch[batch.size()];
      f.reset_to_headroom();
      const auto& frame = rx_.front();
      size_t n = std::min(frame.size(), f.capacity_after_data());
      std::copy(frame.begin(), frame.begin() + long(n), f.data);
      f.len = uint32_t(n);
      rx_.pop_front();
      batch.set_size(batch.size() + 1);
      ++added;
    }
    return added;
  }
  void send(const uint8_t* frame, size_t len) override {
    sent_.emplace_back(frame, frame + len);
    counters.tx_packets++;
    counters.tx_bytes += len;
  }
  bool link_up() const override { return up; }
  MacAddress mac() const override { return mac_; }

  void push_rx(std::vector<uint8_t> frame) { rx_.push_back(std::move(frame)); }
  std::vector<std::vector<uint8_t>>& sent() { return sent_; }
  bool up = true;

private:
  MacAddress mac_;
  std::deque<std::vector<uint8_t>> rx_;
  std::vector<std::vector<uint8_t>> sent_;
};

}  // namespace keel::sw
