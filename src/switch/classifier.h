// Classifier: tuple space search over masked flow keys, as Open vSwitch does.
//
// Rules with the same mask live in one subtable, a hash map keyed by the masked key. A lookup masks the
// packet's key once per subtable and probes its map. Subtables are kept sorted by the highest priority
// they hold, so a lookup stops at the first subtable whose best rule cannot beat what it already found.
//
// Flow table operations are O(1)-ish per rule too, so a controller can program tens of thousands of
// flows one flow-mod at a time: subtables are found by mask through a hash map, each subtable counts its
// rules per priority (its best priority never needs a scan), and the rules a non-strict modify or delete
// selects ("every rule this wider match covers") come from a hash probe per subtable: on the subtable's
// own map when the request has the subtable's mask, otherwise on a projection index (rules keyed by their
// key under the request's mask) built once the same request mask comes back, kept up to date on every
// insert and removal, a few per subtable.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
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
  // Appends every rule whose match `wider` covers (Match::covered_by), each once, in no particular
  // order: what a non-strict flow modify or delete selects. Not const: it may build an index.
  void collect_covered(const Match& wider, std::vector<ClsRule*>& out);
  // Every rule, in no particular order.
  void for_each(const std::function<void(ClsRule*)>& fn) const;
  size_t size() const { return count_; }
  size_t subtable_count() const { return subtables_.size(); }
  // Projection indexes currently kept, over all subtables (tests).
  size_t projection_count() const;

  // A subtable keeps at most this many projection indexes (least recently used goes first).
  static constexpr size_t kMaxProjections = 4;
  // Subtables smaller than this are scanned rather than indexed.
  static constexpr size_t kProjectionMinRules = 32;

private:
  struct KeyHash {
    size_t operator()(const FlowKey& k) const { return hash_key(k); }
  };
  using RuleMap = std::unordered_map<FlowKey, std::vector<ClsRule*>, KeyHash>;
  // The subtable's rules keyed by their key under a narrower mask (a request's mask).
  struct Projection {
    FlowKey mask;
    std::vector<uint8_t> words;
    RuleMap rules;
    uint64_t last_used = 0;
  };
  struct Subtable {
    FlowKey mask;
    // Indexes of the mask's non-zero words: masking and hashing touch only those.
    std::vector<uint8_t> words;
    // Masked key -> rules with that exact match, highest priority first.
    RuleMap rules;
    // Rules per priority, highest first: the front is max_priority.
    std::map<uint16_t, uint32_t, std::greater<>> priorities;
    uint16_t max_priority = 0;
    size_t count = 0;
    std::vector<std::unique_ptr<Projection>> projections;
    // Request masks this subtable was recently scanned for: one coming back gets an index.
    std::vector<FlowKey> recent_scans;
  };
  Subtable* find_subtable(const FlowKey& mask) const;
  // Moves `st` (whose max_priority just changed) to its place in subtables_, keeping the order a
  // stable sort would give.
  void reposition(Subtable* st);
  Projection* projection_for(Subtable& st, const Match& wider);

  std::vector<std::unique_ptr<Subtable>> subtables_;  // by max_priority, descending
  std::unordered_map<FlowKey, Subtable*, KeyHash> by_mask_;
  size_t count_ = 0;
  uint64_t projection_clock_ = 0;
};

}  // namespace keel::sw
