#include <gtest/gtest.h>

#include "guestfs/fat_fs.h"
#include "test_util.h"

using namespace keel::guestfs;
using keel::guestfs::testing::bytes_of;
using keel::guestfs::testing::make_image;

namespace {
std::string read_all(Filesystem& fs, const std::string& path) {
  std::string out;
  auto r = fs.read(path, 0, UINT64_MAX, [&](std::span<const uint8_t> c) -> keel::Result<void> {
    out.append(reinterpret_cast<const char*>(c.data()), c.size());
    return keel::ok();
  });
  EXPECT_TRUE(r) << (r ? "" : r.error().message());
  return out;
}

void exercise(const std::string& mkfs, size_t size, const char* version) {
  MemoryDevice disk(make_image(mkfs + " %s", size));
  auto probe = probe_fat(disk);
  ASSERT_TRUE(probe && *probe);
  EXPECT_EQ((*probe)->type, "vfat");
  EXPECT_EQ((*probe)->version, version);
  EXPECT_EQ((*probe)->label, "UNITTEST");
  auto fs = open_fat_filesystem(disk, false);
  ASSERT_TRUE(fs) << fs.error().message();
  Filesystem& f = **fs;
  ASSERT_TRUE(f.mkdir("/Some Directory", 0755));
  // Enough long names to grow the directory past one cluster.
  for (int i = 0; i < 150; i++) {
    std::string name = "/Some Directory/a rather long file name number " + std::to_string(i) + ".txt";
    ASSERT_TRUE(f.write(name, bytes_of(std::string(size_t(i * 37), char('a' + i % 26))), WriteMode::Truncate, 0644));
  }
  auto entries = f.readdir("/Some Directory");
  ASSERT_TRUE(entries);
  EXPECT_EQ(entries->size(), 150u);
  EXPECT_EQ(read_all(f, "/some directory/A RATHER LONG FILE NAME NUMBER 77.txt"), std::string(77 * 37, char('a' + 77 % 26)));
  ASSERT_TRUE(f.write("/Some Directory/a rather long file name number 3.txt", bytes_of("!"), WriteMode::Append, 0));
  EXPECT_EQ(read_all(f, "/Some Directory/a rather long file name number 3.txt"), std::string(111, 'd') + "!");
  ASSERT_TRUE(f.mkdir("/other", 0755));
  ASSERT_TRUE(f.rename("/Some Directory/a rather long file name number 5.txt", "/other/renamed.bin"));
  EXPECT_EQ(read_all(f, "/other/renamed.bin").size(), 5u * 37);
  EXPECT_EQ(f.lstat("/Some Directory/a rather long file name number 5.txt").error().code(), ENOENT);
  ASSERT_TRUE(f.rename("/other", "/Some Directory/other"));
  EXPECT_TRUE(f.lstat("/Some Directory/other/renamed.bin"));
  EXPECT_EQ(f.rmdir("/Some Directory").error().code(), ENOTEMPTY);
  EXPECT_EQ(f.symlink("x", "/link").error().code(), EPERM);
  EXPECT_EQ(f.mkdir("/Some Directory", 0755).error().code(), EEXIST);
  EXPECT_EQ(f.write("/bad:name", bytes_of("x"), WriteMode::Truncate, 0644).error().code(), EINVAL);
  ASSERT_TRUE(f.chmod("/other-file", 0444).error().code() == ENOENT);
  for (int i = 0; i < 150; i++) {
    if (i == 5) continue;
    ASSERT_TRUE(f.unlink("/Some Directory/a rather long file name number " + std::to_string(i) + ".txt"));
  }
  ASSERT_TRUE(f.unlink("/Some Directory/other/renamed.bin"));
  ASSERT_TRUE(f.rmdir("/Some Directory/other"));
  ASSERT_TRUE(f.rmdir("/Some Directory"));
  auto stats = f.statvfs();
  ASSERT_TRUE(stats);
  ASSERT_TRUE(f.sync());
  // A fresh open sees the same (empty) root.
  auto again = open_fat_filesystem(disk, true);
  ASSERT_TRUE(again);
  EXPECT_TRUE((*again)->readdir("/")->empty());
  EXPECT_EQ((*again)->statvfs()->blocks_free, stats->blocks_free);
}
}  // namespace

TEST(Fat, Fat12) { exercise("mkfs.fat -F 12 -n UNITTEST", 2 << 20, "FAT12"); }
TEST(Fat, Fat16) { exercise("mkfs.fat -F 16 -s 1 -n UNITTEST", 16 << 20, "FAT16"); }
TEST(Fat, Fat32) { exercise("mkfs.fat -F 32 -s 1 -n UNITTEST", 40 << 20, "FAT32"); }

TEST(Fat, FullFilesystemIsAnError) {
  MemoryDevice disk(make_image("mkfs.fat -F 12 -n UNITTEST %s", 256 << 10));
  auto fs = open_fat_filesystem(disk, false);
  ASSERT_TRUE(fs);
  std::string big(400 << 10, 'x');
  auto r = (*fs)->write("/big", bytes_of(big), WriteMode::Truncate, 0644);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ENOSPC);
}

TEST(Fat, ReadOnlyRefusesWrites) {
  MemoryDevice disk(make_image("mkfs.fat -F 12 -n UNITTEST %s", 1 << 20));
  auto fs = open_fat_filesystem(disk, true);
  ASSERT_TRUE(fs);
  EXPECT_EQ((*fs)->mkdir("/x", 0755).error().code(), EROFS);
}

TEST(Fat, NotFat) {
  MemoryDevice disk(std::vector<uint8_t>(1 << 20, 0));
  auto probe = probe_fat(disk);
  ASSERT_TRUE(probe);
  EXPECT_FALSE(*probe);
  EXPECT_FALSE(open_fat_filesystem(disk, true));
}
