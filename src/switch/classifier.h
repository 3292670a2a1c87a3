// Classifier: tuple space search over masked flow keys, as Open vSwitch does.
//
// Rules with the same mask live in one subtable, a hash map keyed by the masked key. A lookup masks the
// packet's key once per subtable and probes its map. Subtables are kept sorted by the highest priority
// they hold, so a lookup stops at the first subtable whose best rule cannot beat what it already found.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "switch/flow.h"

namespace keel::sw {

struct ClsRule {
  Match match;
  uint16_t priority = 0;
};

class Classifier {
public:
  Classifier() = default;
  Classifier(const Classifier&) = delete;
  Classifier& operator=(const Classifier&) = delete;

  // The caller keeps ownership of rules; a rule must be removed before it is destroyed.
  void insert(ClsRule* rule);
  void remove(ClsRule* rule);
  // Highest-priority rule matching the packet, or null.
  ClsRule* lookup(const FlowKey& packet) const;
  // The rule with exactly this match and priority, or null.
  ClsRule* find_exact(const Match& match, uint16_t priority) const;
  // Every rule, in no particular order.
  void for_each(const std::function<void(ClsRule*)>& fn) const;
  size_t size() const { return count_; }
  size_t subtable_count() const { return subtables_.size(); }

private:
  struct KeyHash {
    size_t operator()(const FlowKey& k) const { return hash_key(k); }
  };
  struct Subtable {
    FlowKey mask;
    // Indexes of the mask's non-zero words: masking and hashing touch only those.
    std::vector<uint8_t> words;
    // Masked key -> rules with that exact match, highest priority first.
    std::unordered_map<FlowKey, std::vector<ClsRule*>, KeyHash> rules;
    uint16_t max_priority = 0;
    size_t count = 0;
  };
  Subtable* find_subtable(const FlowKey& mask) const;
  void resort();
  static void recompute_max(Subtable& st);

  std::vector<std::unique_ptr<Subtable>> subtables_;  // by max_priority, descending
  size_t count_ = 0;
};

}  // namespace keel::sw
