// DirectFile: unaligned reads and writes on an O_DIRECT file, at the end of the file, and several
// threads read-modify-writing bytes of the same 4 KiB blocks without losing each other's.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "disk/direct_file.h"

using namespace keel;
using namespace keel::disk;

namespace {

struct TempFile {
  // /var/tmp: on the root file system here, which takes O_DIRECT.
  std::string path = "/var/tmp/keel-direct-file-" + std::to_string(::getpid());
  ~TempFile() { ::unlink(path.c_str()); }
};

TEST(DirectFile, UnalignedRequestsMatchAShadow) {
  TempFile tmp;
  auto fd = DirectFile::open(tmp.path, O_RDWR | O_CREAT);
  ASSERT_TRUE(fd) << fd.error().message() << " (these tests need /var/tmp on a file system that takes O_DIRECT)";
  DirectFile file;
  std::vector<uint8_t> shadow;
  std::mt19937_64 rng(3);
  std::vector<uint8_t> buf(20000);
  for (int i = 0; i < 300; ++i) {
    uint64_t off = rng() % 100000;
    size_t len = 1 + rng() % buf.size();
    for (size_t k = 0; k < len; ++k) buf[k] = static_cast<uint8_t>(rng());
    // Offsets into the buffer too: the memory is as unaligned as the file range.
    size_t skew = rng() % 7;
    std::vector<uint8_t> src(skew + len);
    std::memcpy(src.data() + skew, buf.data(), len);
    ASSERT_TRUE(file.write(fd->get(), src.data() + skew, len, off));
    if (shadow.size() < off + len) shadow.resize(off + len, 0);
    std::memcpy(shadow.data() + off, buf.data(), len);
  }
  std::vector<uint8_t> back(shadow.size() + 5000, 0xee);
  ASSERT_TRUE(file.read(fd->get(), back.data() + 1, shadow.size() + 3000, 0));
  EXPECT_EQ(0, std::memcmp(back.data() + 1, shadow.data(), shadow.size()));
  for (size_t k = 0; k < 3000; ++k) ASSERT_EQ(back[1 + shadow.size() + k], 0) << "past the end reads zeros";
  // The same bytes through the page cache.
  std::vector<uint8_t> plain(shadow.size());
  UniqueFd buffered = *UniqueFd::open(tmp.path, O_RDONLY);
  ASSERT_TRUE(pread_all(buffered.get(), plain.data(), plain.size(), 0));
  EXPECT_EQ(plain, shadow);
}

TEST(DirectFile, ConcurrentWritersInOneBlockKeepEachOthersBytes) {
  TempFile tmp;
  auto fd = DirectFile::open(tmp.path, O_RDWR | O_CREAT);
  ASSERT_TRUE(fd) << fd.error().message() << " (these tests need /var/tmp on a file system that takes O_DIRECT)";
  DirectFile file;
  // Four threads, each owning every fourth 100-byte slot of two 4 KiB blocks.
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 50; ++round)
        for (int slot = t; slot < 80; slot += 4) {
          std::vector<uint8_t> bytes(100, static_cast<uint8_t>(slot + round));
          if (!file.write(fd->get(), bytes.data(), bytes.size(), 100 * static_cast<uint64_t>(slot))) ++errors;
        }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors, 0);
  std::vector<uint8_t> back(8000);
  ASSERT_TRUE(file.read(fd->get(), back.data(), back.size(), 0));
  for (int slot = 0; slot < 80; ++slot)
    for (int k = 0; k < 100; ++k) ASSERT_EQ(back[slot * 100 + k], static_cast<uint8_t>(slot + 49)) << slot;
}

TEST(DirectFile, FileSystemWithoutODirectSaysSo) {
  // ramfs has no O_DIRECT; mounting one needs root (CI runs as root).
  char dir[] = "/tmp/keel-ramfs-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  std::string mount = std::string("mount -t ramfs keel-unit-ramfs ") + dir;
  if (::geteuid() != 0 || std::system(mount.c_str()) != 0) {
    ::rmdir(dir);
    FAIL() << "cannot mount ramfs on " << dir << " (this test needs root, as CI has)";
  }
  auto fd = DirectFile::open(std::string(dir) + "/x", O_RDWR | O_CREAT);
  ASSERT_FALSE(fd);
  EXPECT_NE(fd.error().message().find("does not support O_DIRECT"), std::string::npos) << fd.error().message();
  EXPECT_EQ(std::system((std::string("umount ") + dir).c_str()), 0);
  ::rmdir(dir);
}

}  // namespace
