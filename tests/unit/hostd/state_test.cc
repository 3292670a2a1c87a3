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
using StorageTest = TempDir;

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

TEST_F(StorageTest, VolumesThroughQemuImg) {
  auto s = StateStore::open(dir_ + "/db");
  ASSERT_TRUE(s);
  StoragePools pools(**s, make_qemu_img_backend());
  ASSERT_TRUE(pools.ensure_default(dir_ + "/images"));
  ASSERT_TRUE(pools.ensure_default(dir_ + "/images"));  // idempotent
  ASSERT_TRUE(pools.create_volume("default", "base", "qcow2", 64 << 20));
  EXPECT_EQ(pools.create_volume("default", "base", "qcow2", 1 << 20).error().code(), EEXIST);
  EXPECT_FALSE(pools.create_volume("default", "x", "vmdk", 1 << 20));
  EXPECT_FALSE(pools.create_volume("default", "../escape", "raw", 1 << 20));
  EXPECT_EQ(pools.create_volume("nopool", "x", "raw", 1 << 20).error().code(), ENOENT);
  auto info = pools.volume_info("default", "base");
  ASSERT_TRUE(info) << info.error().message();
  EXPECT_EQ((*info)["format"], "qcow2");
  EXPECT_EQ((*info)["capacity"], 64u << 20);

  ASSERT_TRUE(pools.clone_volume("default", "base", "overlay", "overlay"));
  auto ov = pools.volume_info("default", "overlay");
  ASSERT_TRUE(ov);
  EXPECT_EQ((*ov)["backing"], dir_ + "/images/base");
  ASSERT_TRUE(pools.clone_volume("default", "base", "copy", "copy"));
  EXPECT_FALSE((*pools.volume_info("default", "copy")).contains("backing"));
  EXPECT_FALSE(pools.clone_volume("default", "base", "other", "sideways"));

  ASSERT_TRUE(pools.resize_volume("default", "copy", 128 << 20));
  EXPECT_EQ((*pools.volume_info("default", "copy"))["capacity"], 128u << 20);

  ASSERT_TRUE(pools.create_volume("default", "blob", "raw", 4096));
  std::string data(4096, 'k');
  ASSERT_TRUE(pools.upload("default", "blob", data));
  EXPECT_EQ(*pools.download("default", "blob"), data);

  auto list = pools.list_volumes("default");
  ASSERT_TRUE(list);
  EXPECT_EQ(list->size(), 4u);
  auto resolved = pools.resolve("default/overlay");
  ASSERT_TRUE(resolved);
  EXPECT_EQ(resolved->second, "qcow2");
  ASSERT_TRUE(pools.delete_volume("default", "blob"));
  EXPECT_EQ(pools.delete_volume("default", "blob").error().code(), ENOENT);

  ASSERT_TRUE(pools.define_pool("second", dir_ + "/second"));
  EXPECT_EQ(pools.define_pool("second", dir_ + "/third").error().code(), EEXIST);
  EXPECT_FALSE(pools.define_pool("rel", "relative/path"));
  EXPECT_EQ((*pools.list_pools()).size(), 2u);
  ASSERT_TRUE(pools.undefine_pool("second"));
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
