#include <gtest/gtest.h>

#include <stdlib.h>
#include <unistd.h>

#include "base/process.h"
#include "hostd/event_bus.h"
#include "hostd/state_store.h"
#include "hostd/storage.h"

namespace keel::hostd {
namespace {

class TempDir : public ::testing::Test {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/keel-hostd-unit-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { (void)run_command({"rm", "-rf", dir_}); }
  std::string dir_;
};

using StateStoreTest = TempDir;

TEST_F(StateStoreTest, DomainsPersistAndStayUnique) {
  {
    auto s = StateStore::open(dir_ + "/db");
    ASSERT_TRUE(s) << s.error().message();
    DomainRecord r{"a", "uuid-a", {{"name", "a"}}, 0, "shutoff", nlohmann::json::object()};
    ASSERT_TRUE((*s)->insert_domain(r));
    auto dup = (*s)->insert_domain(r);
    ASSERT_FALSE(dup);
    EXPECT_EQ(dup.error().code(), EEXIST);
    DomainRecord same_uuid{"b", "uuid-a", {}, 0, "shutoff", nlohmann::json::object()};
    EXPECT_FALSE((*s)->insert_domain(same_uuid));
    r.pid = 1234;
    r.state = "running";
    ASSERT_TRUE((*s)->update_domain(r));
    ASSERT_TRUE((*s)->set_domain_state("a", "paused"));
    DomainRecord missing{"zz", "u", {}, 0, "shutoff", nlohmann::json::object()};
    EXPECT_EQ((*s)->update_domain(missing).error().code(), ENOENT);
  }
  auto s = StateStore::open(dir_ + "/db");
  ASSERT_TRUE(s);
  auto all = (*s)->list_domains();
  ASSERT_TRUE(all);
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].pid, 1234);
  EXPECT_EQ((*all)[0].state, "paused");
  EXPECT_EQ((*all)[0].definition["name"], "a");
  ASSERT_TRUE((*s)->delete_domain("a"));
  EXPECT_FALSE(*(*s)->get_domain("a"));
}

TEST_F(StateStoreTest, StateOnlyUpdatesRunningDomains) {
  auto s = StateStore::open(dir_ + "/db");
  ASSERT_TRUE(s);
  ASSERT_TRUE((*s)->insert_domain(DomainRecord{"a", "u", {}, 0, "shutoff", nlohmann::json::object()}));
  // A late QMP event for a stopped domain must not resurrect it.
  ASSERT_TRUE((*s)->set_domain_state("a", "running"));
  EXPECT_EQ((*(*s)->get_domain("a"))->state, "shutoff");
}

TEST(EventBus, FanOutAndBoundedQueue) {
  EventBus bus;
  auto a = bus.subscribe();
  auto b = bus.subscribe();
  bus.publish("lifecycle", "vm", "started");
  auto ea = a->next(std::chrono::milliseconds(100));
  auto eb = b->next(std::chrono::milliseconds(100));
  ASSERT_TRUE(ea && eb);
  EXPECT_EQ((*ea)["event"], "started");
  EXPECT_EQ((*ea)["seq"], (*eb)["seq"]);
  EXPECT_FALSE(a->next(std::chrono::milliseconds(1)));
  for (size_t i = 0; i < EventSubscription::kMaxQueued + 10; ++i) bus.publish("job", "", "x");
  EXPECT_EQ(a->dropped(), 10u);
  b.reset();  // an ended subscription is dropped by the bus
  bus.publish("job", "", "y");
}

}  // namespace
}  // namespace keel::hostd
