#include <gtest/gtest.h>

#include "guestfs/guest.h"
#include "test_util.h"

using namespace keel::guestfs;
using keel::guestfs::testing::bytes_of;
using keel::guestfs::testing::make_image;

namespace {
Guest* make_guest() {
  auto* g = new Guest;
  g->add_drive(std::make_unique<MemoryDevice>(make_image("mke2fs -q -F -t ext4 %s", 8 << 20)), false);
  EXPECT_TRUE(g->launch());
  EXPECT_TRUE(g->mount("/dev/sda", "/", false));
  return g;
}
}  // namespace

TEST(Guest, SymlinksResolveInsideTheGuest) {
  std::unique_ptr<Guest> g(make_guest());
  ASSERT_TRUE(g->mkdir_p("/etc/sub"));
  ASSERT_TRUE(g->write_file("/etc/hostname", bytes_of("guest\n"), WriteMode::Truncate));
  ASSERT_TRUE(g->ln_s("/etc/hostname", "/abs"));
  ASSERT_TRUE(g->ln_s("../../../../etc/hostname", "/etc/sub/rel"));  // ".." above / stays at /
  ASSERT_TRUE(g->ln_s("loop2", "/loop1"));
  ASSERT_TRUE(g->ln_s("loop1", "/loop2"));
  EXPECT_EQ(*g->read_file("/abs"), "guest\n");
  EXPECT_EQ(*g->read_file("/etc/sub/rel"), "guest\n");
  EXPECT_EQ(*g->read_file("/etc/sub/../hostname"), "guest\n");
  EXPECT_EQ(g->read_file("/loop1").error().code(), ELOOP);
  EXPECT_EQ(g->read_file("/etc/hostname/x").error().code(), ENOTDIR);
  EXPECT_EQ(g->read_file("relative").error().code(), EINVAL);
  EXPECT_EQ(*g->readlink("/abs"), "/etc/hostname");
  EXPECT_EQ(g->lstat("/abs")->type(), FileType::Symlink);
  EXPECT_EQ(g->stat("/abs")->type(), FileType::Regular);
}

TEST(Guest, TreeOperations) {
  std::unique_ptr<Guest> g(make_guest());
  ASSERT_TRUE(g->mkdir_p("/a/b/c"));
  ASSERT_TRUE(g->write_file("/a/b/c/f", bytes_of("x"), WriteMode::Truncate));
  ASSERT_TRUE(g->cp_a("/a", "/copy"));
  EXPECT_EQ(*g->read_file("/copy/b/c/f"), "x");
  std::vector<std::string> seen;
  ASSERT_TRUE(g->walk("/copy", [&](const std::string& rel, const FileStat&) -> keel::Result<void> {
    seen.push_back(rel);
    return keel::ok();
  }));
  EXPECT_EQ(seen, (std::vector<std::string>{"b", "b/c", "b/c/f"}));
  ASSERT_TRUE(g->mv("/copy", "/a"));  // into the directory
  EXPECT_TRUE(*g->is_file("/a/copy/b/c/f"));
  ASSERT_TRUE(g->rm_rf("/a"));
  EXPECT_FALSE(*g->exists("/a"));
  ASSERT_TRUE(g->rm_rf("/does/not/exist"));
  EXPECT_EQ(g->rm("/nothing").error().code(), ENOENT);
}

TEST(Guest, DeviceNames) {
  Guest g;
  g.add_drive(std::make_unique<MemoryDevice>(make_image("mkfs.fat -F 12 -n LBL %s", 1 << 20)), true);
  ASSERT_TRUE(g.launch());
  EXPECT_EQ(g.list_devices(), std::vector<std::string>{"/dev/sda"});
  EXPECT_TRUE(g.find_device("/dev/vda"));
  EXPECT_TRUE(g.find_device("LABEL=LBL"));
  EXPECT_FALSE(g.find_device("/dev/sdb"));
  EXPECT_EQ(drive_name(0), "/dev/sda");
  EXPECT_EQ(drive_name(25), "/dev/sdz");
  EXPECT_EQ(drive_name(26), "/dev/sdaa");
  EXPECT_EQ(g.lstat("/").error().code(), ENOENT);  // nothing mounted
}
