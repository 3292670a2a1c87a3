#include <gtest/gtest.h>

#include "guestfs/ext_fs.h"
#include "test_util.h"

using namespace keel::guestfs;
using keel::guestfs::testing::bytes_of;
using keel::guestfs::testing::make_image;

TEST(Ext, WriteReadRemove) {
  MemoryDevice disk(make_image("mke2fs -q -F -t ext4 -L UNIT %s", 16 << 20));
  auto probe = probe_filesystem(disk);
  ASSERT_TRUE(probe);
  EXPECT_EQ(probe->type, "ext4");
  EXPECT_EQ(probe->label, "UNIT");
  {
    auto fs = open_ext_filesystem(disk, false);
    ASSERT_TRUE(fs) << fs.error().message();
    Filesystem& f = **fs;
    ASSERT_TRUE(f.mkdir("/d", 0700));
    std::string data(100000, 'q');
    ASSERT_TRUE(f.write("/d/file", bytes_of(data), WriteMode::Truncate, 0640));
    ASSERT_TRUE(f.write("/d/file", bytes_of("tail"), WriteMode::Append, 0));
    ASSERT_TRUE(f.symlink("file", "/d/link"));
    auto st = f.lstat("/d/file");
    ASSERT_TRUE(st);
    EXPECT_EQ(st->size, 100004u);
    EXPECT_EQ(st->mode, 0100640u);
    EXPECT_EQ(f.lstat("/d")->mode, 040700u);
    EXPECT_EQ(*f.readlink("/d/link"), "file");
    EXPECT_EQ(f.rmdir("/d").error().code(), ENOTEMPTY);
    EXPECT_EQ(f.mkdir("/d", 0755).error().code(), EEXIST);
    ASSERT_TRUE(f.rename("/d/file", "/moved"));
    ASSERT_TRUE(f.chown("/moved", 1000, 100));
    EXPECT_EQ(f.lstat("/moved")->uid, 1000u);
    ASSERT_TRUE(f.unlink("/d/link"));
    ASSERT_TRUE(f.rmdir("/d"));
    ASSERT_TRUE(f.sync());
  }
  auto fs = open_ext_filesystem(disk, true);
  ASSERT_TRUE(fs);
  std::string got;
  ASSERT_TRUE((*fs)->read("/moved", 99998, 100, [&](std::span<const uint8_t> c) -> keel::Result<void> {
    got.append(reinterpret_cast<const char*>(c.data()), c.size());
    return keel::ok();
  }));
  EXPECT_EQ(got, "qqtail");
  EXPECT_EQ((*fs)->lstat("/d").error().code(), ENOENT);
  EXPECT_EQ((*fs)->write("/x", bytes_of("x"), WriteMode::Truncate, 0644).error().code(), EROFS);
}

TEST(Ext, GarbageIsAnError) {
  MemoryDevice disk(std::vector<uint8_t>(1 << 20, 0x5a));
  auto fs = open_ext_filesystem(disk, true);
  ASSERT_FALSE(fs);
}
