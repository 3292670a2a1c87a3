#include "switch/classifier.h"

#include <algorithm>

namespace keel::sw {

namespace {

std::vector<uint8_t> nonzero_words(const FlowKey& mask) {
  std::vector<uint8_t> words;
  for (size_t i = 0; i < FlowKey::kWords; ++i)
    if (mask.words()[i]) words.push_back(uint8_t(i));
  return words;
}

// key & mask, touching only `words` (the mask's non-zero words).
FlowKey masked(const FlowKey& key, const FlowKey& mask, const std::vector<uint8_t>& words) {
  FlowKey out{};
  for (uint8_t w : words) out.words()[w] = key.words()[w] & mask.words()[w];
  return out;
}

// Every bit of `inner` is also set in `outer`.
bool mask_contains(const FlowKey& outer, const FlowKey& inner) {
  for (size_t i = 0; i < FlowKey::kWords; ++i)
    if (inner.words()[i] & ~outer.words()[i]) return false;
  return true;
}

template <typename Map>
void erase_from(Map& map, const FlowKey& key, ClsRule* rule) {
  auto it = map.find(key);
  if (it == map.end()) return;
  auto& bucket = it->second;
  auto pos = std::find(bucket.begin(), bucket.end(), rule);
  if (pos != bucket.end()) bucket.erase(pos);
  if (bucket.empty()) map.erase(it);
}

}  // namespace

Classifier::Subtable* Classifier::find_subtable(const FlowKey& mask) const {
  auto it = by_mask_.find(mask);
  return it == by_mask_.end() ? nullptr : it->second;
}

void Classifier::reposition(Subtable* st) {
  auto it = std::find_if(subtables_.begin(), subtables_.end(), [&](const auto& p) { return p.get() == st; });
  size_t i = size_t(it - subtables_.begin());
  // Up: past every subtable whose best is lower. Down: behind every subtable whose best is higher.
  // Equal ones keep their relative order either way.
  size_t j = i;
  while (j > 0 && subtables_[j - 1]->max_priority < st->max_priority) --j;
  if (j < i) {
    std::rotate(subtables_.begin() + long(j), subtables_.begin() + long(i), subtables_.begin() + long(i) + 1);
    return;
  }
  size_t k = i;
  while (k + 1 < subtables_.size() && subtables_[k + 1]->max_priority > st->max_priority) ++k;
  if (k > i)
    std::rotate(subtables_.begin() + long(i), subtables_.begin() + long(i) + 1, subtables_.begin() + long(k) + 1);
}

void Classifier::insert(ClsRule* rule) {
  rule->match.normalize();
  Subtable* st = find_subtable(rule->match.mask);
  bool fresh_subtable = !st;
  if (!st) {
    auto fresh = std::make_unique<Subtable>();
    fresh->mask = rule->match.mask;
    fresh->words = nonzero_words(fresh->mask);
    st = fresh.get();
    subtables_.push_back(std::move(fresh));
    by_mask_.emplace(st->mask, st);
  }
  auto& bucket = st->rules[rule->match.key];
  auto pos = std::find_if(bucket.begin(), bucket.end(),
                          [&](ClsRule* r) { return r->priority < rule->priority; });
  bucket.insert(pos, rule);
  for (auto& p : st->projections) p->rules[masked(rule->match.key, p->mask, p->words)].push_back(rule);
  ++st->priorities[rule->priority];
  ++st->count;
  ++count_;
  uint16_t best = st->priorities.begin()->first;
  if (fresh_subtable || best != st->max_priority) {
    st->max_priority = best;
    reposition(st);
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
  for (auto& p : st->projections) erase_from(p->rules, masked(rule->match.key, p->mask, p->words), rule);
  auto prio = st->priorities.find(rule->priority);
  if (prio != st->priorities.end() && --prio->second == 0) st->priorities.erase(prio);
  --st->count;
  --count_;
  if (st->count == 0) {
    by_mask_.erase(st->mask);
    subtables_.erase(std::find_if(subtables_.begin(), subtables_.end(),
                                  [&](const auto& p) { return p.get() == st; }));
    return;
  }
  uint16_t best = st->priorities.begin()->first;
  if (best != st->max_priority) {
    st->max_priority = best;
    reposition(st);
  }
}

ClsRule* Classifier::lookup(const FlowKey& packet) const {
  ClsRule* best = nullptr;
  FlowKey masked_key{};
  for (const auto& st : subtables_) {
    if (best && st->max_priority <= best->priority) break;
    masked_key = FlowKey{};
    const uint64_t* p = packet.words();
    const uint64_t* m = st->mask.words();
    uint64_t* out = masked_key.words();
    for (uint8_t w : st->words) out[w] = p[w] & m[w];
    auto it = st->rules.find(masked_key);
    if (it == st->rules.end()) continue;
    ClsRule* r = it->second.front();
    if (!best || r->priority > best->priority) best = r;
  }
  return best;
}

ClsRule* Classifier::find_exact(const Match& match, uint16_t priority) const {
  Subtable* st = find_subtable(match.mask);
  if (!st) return nullptr;
  FlowKey k = masked(match.key, match.mask, st->words);
  auto it = st->rules.find(k);
  if (it == st->rules.end()) return nullptr;
  for (ClsRule* r : it->second)
    if (r->priority == priority) return r;
  return nullptr;
}

Classifier::Projection* Classifier::projection_for(Subtable& st, const Match& wider) {
  for (auto& p : st.projections)
    if (p->mask == wider.mask) {
      p->last_used = ++projection_clock_;
      return p.get();
    }
  if (st.count < kProjectionMinRules) return nullptr;
  // Index only a request mask seen before: a one-off request costs a scan, not an index build.
  auto seen = std::find(st.recent_scans.begin(), st.recent_scans.end(), wider.mask);
  if (seen == st.recent_scans.end()) {
    if (st.recent_scans.size() >= kMaxProjections) st.recent_scans.erase(st.recent_scans.begin());
    st.recent_scans.push_back(wider.mask);
    return nullptr;
  }
  st.recent_scans.erase(seen);
  if (st.projections.size() >= kMaxProjections)
    st.projections.erase(std::min_element(st.projections.begin(), st.projections.end(),
                                          [](const auto& a, const auto& b) { return a->last_used < b->last_used; }));
  auto p = std::make_unique<Projection>();
  p->mask = wider.mask;
  p->words = nonzero_words(p->mask);
  p->rules.reserve(st.rules.size());
  for (const auto& [key, bucket] : st.rules) {
    auto& into = p->rules[masked(key, p->mask, p->words)];
    into.insert(into.end(), bucket.begin(), bucket.end());
  }
  p->last_used = ++projection_clock_;
  st.projections.push_back(std::move(p));
  return st.projections.back().get();
}

void Classifier::collect_covered(const Match& wider, std::vector<ClsRule*>& out) {
  std::vector<uint8_t> words = nonzero_words(wider.mask);
  FlowKey wider_key = masked(wider.key, wider.mask, words);
  auto covers = [&](const FlowKey& key) {
    for (uint8_t w : words)
      if ((key.words()[w] & wider.mask.words()[w]) != wider_key.words()[w]) return false;
    return true;
  };
  auto append = [&](const std::vector<ClsRule*>& bucket) { out.insert(out.end(), bucket.begin(), bucket.end()); };
  for (const auto& stp : subtables_) {
    Subtable& st = *stp;
    // A covered rule fixes every bit the wider match fixes, so its mask contains the wider mask.
    if (!mask_contains(st.mask, wider.mask)) continue;
    if (!words.empty()) {
      if (st.mask == wider.mask) {
        if (auto it = st.rules.find(wider_key); it != st.rules.end()) append(it->second);
        continue;
      }
      if (Projection* p = projection_for(st, wider)) {
        if (auto it = p->rules.find(wider_key); it != p->rules.end()) append(it->second);
        continue;
      }
    }
    for (const auto& [key, bucket] : st.rules)
      if (covers(key)) append(bucket);
  }
}

size_t Classifier::projection_count() const {
  size_t n = 0;
  for (const auto& st : subtables_) n += st->projections.size();
  return n;
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
