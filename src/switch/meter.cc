#include "switch/meter.h"

#include <algorithm>

namespace keel::sw {

Meter::Meter(uint32_t id, uint16_t flags, std::vector<MeterBand> bands, Clock::time_point now)
    : id_(id), created_(now) {
  configure(flags, std::move(bands), now);
}

void Meter::configure(uint16_t flags, std::vector<MeterBand> bands, Clock::time_point now) {
  flags_ = flags;
  bands_ = std::move(bands);
  tokens_.assign(bands_.size(), 0);
  capacity_.assign(bands_.size(), 0);
  counters_.resize(bands_.size());
  for (size_t i = 0; i < bands_.size(); ++i) {
    // Without the burst flag a band may burst one second's worth (as Open vSwitch's datapath does).
    double burst = (flags_ & OFPMF_BURST) && bands_[i].burst_size ? bands_[i].burst_size : bands_[i].rate;
    capacity_[i] = burst * 1000;  // kbits -> bits, or packets -> thousandths
    tokens_[i] = capacity_[i];
  }
  last_ = now;
}

bool Meter::admit(size_t bytes, Clock::time_point now) {
  ++packets_in_;
  bytes_in_ += bytes;
  double elapsed = std::max(0.0, std::chrono::duration<double>(now - last_).count());
  last_ = now;
  bool pktps = flags_ & OFPMF_PKTPS;
  double cost = pktps ? 1000.0 : double(bytes) * 8;
  // The band that applies is the exceeded one with the highest rate.
  int exceeded = -1;
  for (size_t i = 0; i < bands_.size(); ++i) {
    // rate is kbit/s (1000 bits) or packets/s (1000 thousandths): the same factor either way.
    tokens_[i] = std::min(capacity_[i], tokens_[i] + elapsed * double(bands_[i].rate) * 1000);
    if (tokens_[i] >= cost) {
      tokens_[i] -= cost;
    } else if (exceeded < 0 || bands_[i].rate > bands_[size_t(exceeded)].rate) {
      exceeded = int(i);
    }
  }
  if (exceeded < 0) return true;
  counters_[size_t(exceeded)].packets++;
  counters_[size_t(exceeded)].bytes += bytes;
  return false;
}

OfResult<void> MeterTable::apply(const MeterMod& mm, Meter::Clock::time_point now) {
  constexpr uint16_t METER_EXISTS = 1, INVALID_METER = 2, UNKNOWN_METER = 3, OUT_OF_METERS = 10;
  if (mm.command == 2) {
    if (mm.meter_id == OFPM_ALL)
      meters_.clear();
    else
      meters_.erase(mm.meter_id);
    return {};
  }
  if (mm.meter_id == 0 || mm.meter_id > OFPM_MAX)
    return of_fail(OFPET_METER_MOD_FAILED, INVALID_METER, "meter id out of range");
  auto it = meters_.find(mm.meter_id);
  if (mm.command == 0) {
    if (it != meters_.end()) return of_fail(OFPET_METER_MOD_FAILED, METER_EXISTS, "meter exists");
    if (meters_.size() >= kMaxMeters) return of_fail(OFPET_METER_MOD_FAILED, OUT_OF_METERS, "too many meters");
    meters_.emplace(mm.meter_id, std::make_unique<Meter>(mm.meter_id, mm.flags, mm.bands, now));
    return {};
  }
  if (it == meters_.end()) return of_fail(OFPET_METER_MOD_FAILED, UNKNOWN_METER, "no such meter");
  it->second->configure(mm.flags, mm.bands, now);
  return {};
}

Meter* MeterTable::find(uint32_t id) const {
  auto it = meters_.find(id);
  return it == meters_.end() ? nullptr : it->second.get();
}

}  // namespace keel::sw
