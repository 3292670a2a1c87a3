// OpenFlow 1.3 meters: per-meter drop bands, each a token bucket (kbit/s or packets/s, with a burst),
// and the statistics ovs-ofctl meter-stats shows. A flow's meter instruction runs a frame through its
// meter before anything else the flow does; a frame that exceeds a band is dropped and counted there.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "switch/openflow.h"

namespace keel::sw {

class Meter {
public:
  using Clock = std::chrono::steady_clock;
  Meter(uint32_t id, uint16_t flags, std::vector<MeterBand> bands, Clock::time_point now);

  // Replaces the configuration (METER_MOD modify): buckets start full again, counters stay.
  void configure(uint16_t flags, std::vector<MeterBand> bands, Clock::time_point now);
  // Meters one frame of `bytes` bytes: false when it exceeds a band (drop it).
  bool admit(size_t bytes, Clock::time_point now);

  uint32_t id() const { return id_; }
  uint16_t flags() const { return flags_; }
  const std::vector<MeterBand>& bands() const { return bands_; }
  Clock::time_point created() const { return created_; }
  uint64_t packets_in() const { return packets_in_; }
  uint64_t bytes_in() const { return bytes_in_; }
  struct BandCounters {
    uint64_t packets = 0, bytes = 0;
  };
  const std::vector<BandCounters>& band_counters() const { return counters_; }

private:
  uint32_t id_;
  uint16_t flags_;
  std::vector<MeterBand> bands_;
  // Per band: tokens in bits (kbps) or thousandths of a packet (pktps), and its capacity.
  std::vector<double> tokens_, capacity_;
  std::vector<BandCounters> counters_;
  Clock::time_point created_, last_;
  uint64_t packets_in_ = 0, bytes_in_ = 0;
};

// The meters of one bridge, by id.
class MeterTable {
public:
  // Add, modify or delete (OFPM_ALL: every meter). Errors are METER_MOD_FAILED codes.
  OfResult<void> apply(const MeterMod& mm, Meter::Clock::time_point now);
  Meter* find(uint32_t id) const;
  const std::map<uint32_t, std::unique_ptr<Meter>>& meters() const { return meters_; }

  static constexpr uint32_t kMaxMeters = 262144;  // what Open vSwitch's userspace datapath reports

private:
  std::map<uint32_t, std::unique_ptr<Meter>> meters_;
};

}  // namespace keel::sw
