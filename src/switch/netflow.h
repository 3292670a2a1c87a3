// NetFlow v5 export: per-bridge IPv4 flow records (5-tuple, ToS, input port), exported over UDP to a
// collector when a flow has been idle for the inactive timeout or alive for the active timeout.
#pragma once

#include <netinet/in.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "switch/flow.h"

namespace keel::sw {

class NetFlowExporter {
public:
  using Clock = std::chrono::steady_clock;
  // collector: "IPv4:PORT".
  static Result<std::unique_ptr<NetFlowExporter>> create(const std::string& collector,
                                                         std::chrono::seconds active_timeout,
                                                         std::chrono::seconds inactive_timeout,
                                                         uint8_t engine_type, uint8_t engine_id);
  // Accounts one IPv4 packet (ip_bytes = the IP total length).
  void account(const FlowKey& key, uint32_t in_port, uint32_t out_port, uint32_t ip_bytes, uint8_t tcp_flags,
               Clock::time_point now);
  // Exports expired flows (all flows when `all`).
  void expire(Clock::time_point now, bool all = false);
  const std::string& collector() const { return collector_; }
  uint64_t exported_records() const { return sequence_; }

private:
  struct Key {
    uint32_t src, dst;  // network order
    uint16_t sport, dport;
    uint8_t proto, tos;
    uint16_t in_port;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      uint64_t w[2] = {uint64_t(k.src) << 32 | k.dst,
                       uint64_t(k.sport) << 48 | uint64_t(k.dport) << 32 | uint64_t(k.proto) << 24 |
                           uint64_t(k.tos) << 16 | k.in_port};
      return hash_words(w, 2);
    }
  };
  struct Record {
    uint64_t packets = 0, bytes = 0;
    Clock::time_point first, last;
    uint16_t out_port = 0;
    uint8_t tcp_flags = 0;
  };
  NetFlowExporter() = default;
  void send(const std::vector<std::pair<Key, Record>>& records, Clock::time_point now);

  UniqueFd sock_;
  sockaddr_in to_{};
  std::string collector_;
  std::chrono::seconds active_{60}, inactive_{15};
  uint8_t engine_type_ = 0, engine_id_ = 0;
  std::unordered_map<Key, Record, KeyHash> flows_;
  uint32_t sequence_ = 0;
  Clock::time_point boot_ = Clock::now();
};

}  // namespace keel::sw
