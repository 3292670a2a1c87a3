#include "switch/classifier.h"

#include <algorithm>

namespace keel::sw {

Classifier::Subtable* Classifier::find_subtable(const FlowKey& mask) const {
  for (auto& st : subtables_)
    if (st->mask == mask) return st.get();
  return nullptr;
}

void Classifier::resort() {
  std::stable_sort(subtables_.begin(), subtables_.end(),
                   [](const auto& a, const auto& b) { return a->max_priority > b->max_priority; });
}

void Classifier::recompute_max(Subtable& st) {
  st.max_priority = 0;
  for (auto& [k, v] : st.rules)
    if (!v.empty()) st.max_priority = std::max(st.max_priority, v.front()->priority);
}

void Classifier::insert(ClsRule* rule) {
  rule->match.normalize();
  Subtable* st = find_subtable(rule->match.mask);
  if (!st) {
    auto fresh = std::make_unique<Subtable>();
    fresh->mask = rule->match.mask;
    for (size_t i = 0; i < FlowKey::kWords; ++i)
      if (fresh->mask.words()[i]) fresh->words.push_back(uint8_t(i));
    st = fresh.get();
    subtables_.push_back(std::move(fresh));
  }
  auto& bucket = st->rules[rule->match.key];
  auto pos = std::find_if(bucket.begin(), bucket.end(),
                          [&](ClsRule* r) { return r->priority < rule->priority; });
  bucket.insert(pos, rule);
  ++st->count;
  ++count_;
  if (rule->priority >= st->max_priority || st->count == 1) {
    st->max_priority = std::max(st->max_priority, rule->priority);
    resort();
  }
}

void Classifier::remove(ClsRule* rule) {
  Subtable* st = find_subtable(rule->match.mask);
  if (!st) return;
  auto it = st->rules.find(rule->match.key);
  if (it == st->rules.end()) return;
  auto& bucket = it->second;
  auto pos = std::find(bucket.begin(), bucket.end(), rule);
  if (pos == bucket.end()) return;
  bucket.erase(pos);
  if (bucket.empty()) st->rules.erase(it);
  --st->count;
  --count_;
  if (st->count == 0) {
    subtables_.erase(std::find_if(subtables_.begin(), subtables_.end(),
                                  [&](const auto& p) { return p.get() == st; }));
    return;
  }
  if (rule->priority == st->max_priority) {
    recompute_max(*st);
    resort();
  }
}

ClsRule* Classifier::lookup(const FlowKey& packet) const {
  ClsRule* best = nullptr;
  FlowKey masked{};
  for (const auto& st : subtables_) {
    if (best && st->max_priority <= best->priority) break;
    masked = FlowKey{};
    const uint64_t* p = packet.words();
    const uint64_t* m = st->mask.words();
    uint64_t* out = masked.words();
    for (uint8_t w : st->words) out[w] = p[w] & m[w];
    auto it = st->rules.find(masked);
    if (it == st->rules.end()) continue;
    ClsRule* r = it->second.front();
    if (!best || r->priority > best->priority) best = r;
  }
  return best;
}

ClsRule* Classifier::find_exact(const Match& match, uint16_t priority) const {
  Subtable* st = find_subtable(match.mask);
  if (!st) return nullptr;
  FlowKey k = match.key;
  for (size_t i = 0; i < FlowKey::kWords; ++i) k.words()[i] &= match.mask.words()[i];
  auto it = st->rules.find(k);
  if (it == st->rules.end()) return nullptr;
  for (ClsRule* r : it->second)
    if (r->priority == priority) return r;
  return nullptr;
}

void Classifier::for_each(const std::function<void(ClsRule*)>& fn) const {
  // Collect first so fn may remove rules.
  std::vector<ClsRule*> all;
  all.reserve(count_);
  for (const auto& st : subtables_)
    for (const auto& [k, v] : st->rules) all.insert(all.end(), v.begin(), v.end());
  for (ClsRule* r : all) fn(r);
}

}  // namespace keel::sw
