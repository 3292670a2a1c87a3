#include "switch/classifier.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <random>

#include "test_util.h"

namespace keel::sw {
namespace {

using test::set;
using test::set_masked;

FlowKey tcp_key(uint32_t in_port, uint32_t src, uint32_t dst, uint16_t dport) {
  Match m;
  set(m, Oxm::InPort, in_port);
  set(m, Oxm::EthType, 0x0800);
  set(m, Oxm::IpProto, 6);
  set(m, Oxm::Ipv4Src, src);
  set(m, Oxm::Ipv4Dst, dst);
  set(m, Oxm::TcpDst, dport);
  return m.key;
}

TEST(Classifier, HighestPriorityWinsAcrossSubtables) {
  Classifier cls;
  ClsRule any, by_port, by_prefix;
  any.priority = 0;
  set(by_port.match, Oxm::InPort, 1);
  by_port.priority = 10;
  set(by_prefix.match, Oxm::EthType, 0x0800);
  set_masked(by_prefix.match, Oxm::Ipv4Dst, 0x0a000000, 0xff000000);
  by_prefix.priority = 20;
  cls.insert(&any);
  cls.insert(&by_port);
  cls.insert(&by_prefix);
  EXPECT_EQ(cls.subtable_count(), 3u);
  EXPECT_EQ(cls.lookup(tcp_key(1, 1, 0x0a010203, 80)), &by_prefix);
  EXPECT_EQ(cls.lookup(tcp_key(1, 1, 0x0b010203, 80)), &by_port);
  EXPECT_EQ(cls.lookup(tcp_key(2, 1, 0x0b010203, 80)), &any);
  cls.remove(&by_prefix);
  EXPECT_EQ(cls.lookup(tcp_key(1, 1, 0x0a010203, 80)), &by_port);
  cls.remove(&any);
  EXPECT_EQ(cls.lookup(tcp_key(2, 1, 0x0b010203, 80)), nullptr);
  EXPECT_EQ(cls.size(), 1u);
}

TEST(Classifier, FindExactNeedsSameMatchAndPriority) {
  Classifier cls;
  ClsRule a, b;
  set(a.match, Oxm::InPort, 3);
  a.priority = 5;
  set(b.match, Oxm::InPort, 3);
  b.priority = 6;
  cls.insert(&a);
  cls.insert(&b);
  Match probe;
  set(probe, Oxm::InPort, 3);
  EXPECT_EQ(cls.find_exact(probe, 5), &a);
  EXPECT_EQ(cls.find_exact(probe, 6), &b);
  EXPECT_EQ(cls.find_exact(probe, 7), nullptr);
  EXPECT_EQ(cls.lookup(tcp_key(3, 0, 0, 0)), &b);
}

// Randomized: the classifier agrees with a linear scan over the same rules.
TEST(Classifier, AgreesWithLinearScan) {
  std::mt19937 rng(42);
  std::vector<std::unique_ptr<ClsRule>> rules;
  Classifier cls;
  for (int i = 0; i < 500; ++i) {
    auto r = std::make_unique<ClsRule>();
    r->priority = uint16_t(rng() % 100);
    if (rng() % 2) set(r->match, Oxm::InPort, rng() % 4 + 1);
    if (rng() % 2) {
      set(r->match, Oxm::EthType, 0x0800);
      int plen = int(rng() % 33);
      uint32_t mask = plen == 0 ? 0 : ~0u << (32 - plen);
      if (mask) set_masked(r->match, Oxm::Ipv4Dst, (rng() % 4) << 24 & mask, mask);
      if (rng() % 2) {
        set(r->match, Oxm::IpProto, 6);
        set(r->match, Oxm::TcpDst, rng() % 3 + 80);
      }
    }
    r->match.normalize();
    cls.insert(r.get());
    rules.push_back(std::move(r));
  }
  for (int i = 0; i < 2000; ++i) {
    FlowKey k = tcp_key(rng() % 4 + 1, rng(), uint32_t((rng() % 4) << 24 | (rng() & 0xffffff)), uint16_t(rng() % 3 + 80));
    const ClsRule* best = nullptr;
    for (auto& r : rules)
      if (r->match.matches(k) && (!best || r->priority > best->priority)) best = r.get();
    const ClsRule* got = cls.lookup(k);
    ASSERT_EQ(got == nullptr, best == nullptr);
    if (best) {
      EXPECT_EQ(got->priority, best->priority);
    }
  }
  for (auto& r : rules) cls.remove(r.get());
  EXPECT_EQ(cls.size(), 0u);
  EXPECT_EQ(cls.subtable_count(), 0u);
}

// A random rule in one of a few shapes (like a controller's flow table: several masks, many rules each).
Match random_match(std::mt19937& rng) {
  Match m;
  switch (rng() % 5) {
    case 0:
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::IpProto, 6);
      set(m, Oxm::Ipv4Dst, 0xac100000 | (rng() % 64));
      set(m, Oxm::TcpDst, rng() % 8 + 1);
      break;
    case 1:
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::IpProto, 17);
      set_masked(m, Oxm::Ipv4Src, 0xac110000 | (rng() % 16) << 8, 0xffffff00);
      set(m, Oxm::UdpDst, rng() % 8 + 1);
      break;
    case 2:
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::Ipv4Dst, 0xac100000 | (rng() % 64));
      break;
    case 3:
      set(m, Oxm::InPort, rng() % 4 + 1);
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::IpProto, 6);
      set(m, Oxm::Ipv4Dst, 0xac100000 | (rng() % 64));
      break;
    default:
      set(m, Oxm::EthSrc, 0x021100000000ull | (rng() % 512));
      break;
  }
  m.normalize();
  return m;
}

// A request match for a non-strict modify/delete: usually narrower shapes' common parts.
Match random_request(std::mt19937& rng) {
  Match m;
  switch (rng() % 7) {
    case 0: set(m, Oxm::EthType, 0x0800); break;
    case 1:
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::Ipv4Dst, 0xac100000 | (rng() % 64));
      break;
    case 2:
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::IpProto, 6);
      set(m, Oxm::Ipv4Dst, 0xac100000 | (rng() % 64));
      set(m, Oxm::TcpDst, rng() % 8 + 1);
      break;
    case 3:
      set(m, Oxm::EthType, 0x0800);
      set(m, Oxm::IpProto, 6);
      break;
    case 4: set(m, Oxm::InPort, rng() % 4 + 1); break;
    case 5: break;  // everything
    default: m = random_match(rng); break;
  }
  m.normalize();
  return m;
}

std::vector<ClsRule*> sorted(std::vector<ClsRule*> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// Non-strict selection (what mod-flows/del-flows use) agrees with covered_by over every rule, at 12,000
// rules, while projection indexes get built and rules come and go under them.
TEST(Classifier, CollectCoveredAgreesWithLinearScanAtScale) {
  std::mt19937 rng(7);
  Classifier cls;
  std::vector<std::unique_ptr<ClsRule>> rules;
  auto add = [&] {
    auto r = std::make_unique<ClsRule>();
    r->match = random_match(rng);
    r->priority = uint16_t(rng() % 8);
    cls.insert(r.get());
    rules.push_back(std::move(r));
  };
  for (int i = 0; i < 12000; ++i) add();
  auto check = [&](const Match& request) {
    std::vector<ClsRule*> want, got;
    for (auto& r : rules)
      if (r->match.covered_by(request)) want.push_back(r.get());
    cls.collect_covered(request, got);
    ASSERT_EQ(sorted(got), sorted(want));
  };
  for (int round = 0; round < 400; ++round) {
    check(random_request(rng));
    // Churn under the indexes: remove a few rules, add a few.
    for (int k = 0; k < 20; ++k) {
      size_t i = rng() % rules.size();
      cls.remove(rules[i].get());
      rules.erase(rules.begin() + long(i));
      add();
    }
  }
  EXPECT_GT(cls.projection_count(), 0u);
  EXPECT_LE(cls.projection_count(), cls.subtable_count() * Classifier::kMaxProjections);
  EXPECT_EQ(cls.size(), rules.size());
  for (auto& r : rules) cls.remove(r.get());
  EXPECT_EQ(cls.size(), 0u);
  EXPECT_EQ(cls.subtable_count(), 0u);
  EXPECT_EQ(cls.projection_count(), 0u);
}

// Lookups stay right while rules (and so subtables' best priorities) come and go one at a time,
// including 10,000 rules sharing one priority removed one by one.
TEST(Classifier, LookupAgreesWithLinearScanUnderChurn) {
  std::mt19937 rng(99);
  Classifier cls;
  std::vector<std::unique_ptr<ClsRule>> rules;
  for (uint32_t i = 0; i < 10000; ++i) {
    auto r = std::make_unique<ClsRule>();
    set(r->match, Oxm::EthType, 0x0800);
    set(r->match, Oxm::Ipv4Dst, 0x0a000000 | i);
    r->priority = 100;
    cls.insert(r.get());
    rules.push_back(std::move(r));
  }
  auto linear_best = [&](const FlowKey& k) {
    const ClsRule* best = nullptr;
    for (auto& r : rules)
      if (r->match.matches(k) && (!best || r->priority > best->priority)) best = r.get();
    return best;
  };
  auto probe = [&] {
    for (int q = 0; q < 20; ++q) {
      FlowKey k = tcp_key(rng() % 4 + 1, rng(), 0x0a000000 | (rng() % 10000), uint16_t(rng() % 3 + 80));
      const ClsRule* want = linear_best(k);
      const ClsRule* got = cls.lookup(k);
      ASSERT_EQ(got == nullptr, want == nullptr);
      if (want) {
        ASSERT_EQ(got->priority, want->priority);
      }
    }
  };
  for (int step = 0; step < 3000; ++step) {
    if (rng() % 3 == 0) {
      auto r = std::make_unique<ClsRule>();
      if (rng() % 2) set(r->match, Oxm::InPort, rng() % 4 + 1);
      set(r->match, Oxm::EthType, 0x0800);
      set_masked(r->match, Oxm::Ipv4Dst, 0x0a000000 | (rng() % 10000), rng() % 2 ? 0xffffffff : 0xffffff00);
      r->priority = uint16_t(rng() % 200);
      cls.insert(r.get());
      rules.push_back(std::move(r));
    } else {
      size_t i = rng() % rules.size();
      cls.remove(rules[i].get());
      rules.erase(rules.begin() + long(i));
    }
    if (step % 50 == 0) probe();
  }
  probe();
  for (auto& r : rules) cls.remove(r.get());
  EXPECT_EQ(cls.subtable_count(), 0u);
}

TEST(Match, CoveredByAndOverlap) {
  Match wide, narrow, other;
  set(wide, Oxm::EthType, 0x0800);
  set_masked(wide, Oxm::Ipv4Src, 0x0a000000, 0xff000000);
  narrow = wide;
  set(narrow, Oxm::Ipv4Src, 0x0a010101);
  set(narrow, Oxm::InPort, 7);
  set(other, Oxm::EthType, 0x0800);
  set_masked(other, Oxm::Ipv4Src, 0x0b000000, 0xff000000);
  EXPECT_TRUE(narrow.covered_by(wide));
  EXPECT_FALSE(wide.covered_by(narrow));
  EXPECT_TRUE(wide.covered_by(Match{}));
  EXPECT_TRUE(narrow.overlaps(wide));
  EXPECT_FALSE(other.overlaps(wide));
  EXPECT_FALSE(other.overlaps(narrow));
}

TEST(Match, Prerequisites) {
  Match m;
  set(m, Oxm::TcpDst, 80);
  EXPECT_TRUE(m.missing_prereq().has_value());
  set(m, Oxm::EthType, 0x0800);
  EXPECT_TRUE(m.missing_prereq().has_value());
  set(m, Oxm::IpProto, 6);
  EXPECT_FALSE(m.missing_prereq().has_value());
  Match pcp;
  set(pcp, Oxm::VlanPcp, 3);
  EXPECT_TRUE(pcp.missing_prereq().has_value());
  set(pcp, Oxm::VlanVid, 0x1000 | 10);
  EXPECT_FALSE(pcp.missing_prereq().has_value());
}

}  // namespace
}  // namespace keel::sw
