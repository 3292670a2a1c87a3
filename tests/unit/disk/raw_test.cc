#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "disk/image.h"
#include "disk/raw_image.h"

using namespace keel;
using namespace keel::disk;

namespace {
std::string temp_path(const char* name) {
  return (std::filesystem::temp_directory_path() / (std::string("keel-raw-") + std::to_string(getpid()) + name)).string();
}
}  // namespace

TEST(RawImage, SparseAwareBlockStatus) {
  std::string path = temp_path("sparse.raw");
  ASSERT_TRUE(RawImage::create(path, 4 << 20));
  auto dev = open_image(path, OpenMode::ReadWrite);
  ASSERT_TRUE(dev) << dev.error().message();
  EXPECT_EQ((*dev)->format(), "raw");
  std::vector<uint8_t> data(65536, 0xab);
  ASSERT_TRUE((*dev)->write(1 << 20, data));
  auto ex = (*dev)->block_status(0, 4 << 20);
  ASSERT_TRUE(ex);
  bool saw_data = false, saw_hole = false;
  for (auto& e : *ex) {
    if (e.data) {
      saw_data = true;
      EXPECT_LE(e.offset, 1u << 20);
      EXPECT_GE(e.offset + e.length, (1u << 20) + 65536);
    } else {
      saw_hole = true;
      EXPECT_TRUE(e.zero);
    }
  }
  EXPECT_TRUE(saw_data);
  EXPECT_TRUE(saw_hole);
  std::vector<uint8_t> back(65536);
  ASSERT_TRUE((*dev)->read(1 << 20, back));
  EXPECT_EQ(back, data);
  EXPECT_FALSE((*dev)->read(4 << 20, back));  // past the end: an error, not a short read
  ::unlink(path.c_str());
}

TEST(RawImage, DirectIoAlignedAndUnaligned) {
  // /var/tmp: on the root filesystem, which supports O_DIRECT (tmpfs does not).
  std::string path = "/var/tmp/keel-raw-direct-" + std::to_string(getpid()) + ".raw";
  const uint64_t size = (1 << 20) + 1000;  // a partial last block too
  ASSERT_TRUE(RawImage::create(path, size));
  auto dev = RawImage::open_direct(path, OpenMode::ReadWrite);
  ASSERT_TRUE(dev) << dev.error().message() << " (this test needs /var/tmp on a file system that takes O_DIRECT)";
  EXPECT_TRUE((*dev)->direct());
  std::vector<uint8_t> shadow(size, 0);
  std::vector<uint8_t> buf(300000);
  uint64_t offsets[] = {0, 4096, 123, 65536 + 7, size - 5000, size - 1};
  for (size_t i = 0; i < sizeof(offsets) / sizeof(offsets[0]); ++i) {
    uint64_t off = offsets[i];
    uint64_t len = std::min<uint64_t>(buf.size() - i * 1000, size - off);
    for (uint64_t k = 0; k < len; ++k) buf[k] = static_cast<uint8_t>(i * 31 + k);
    ASSERT_TRUE((*dev)->write(off, std::span<const uint8_t>(buf.data(), len))) << off;
    std::memcpy(shadow.data() + off, buf.data(), len);
  }
  std::vector<uint8_t> back(size);
  ASSERT_TRUE((*dev)->read(0, back));
  EXPECT_EQ(back, shadow);
  dev->reset();
  // The same bytes through the page cache.
  auto plain = RawImage::open(path, OpenMode::ReadOnly);
  ASSERT_TRUE(plain);
  ASSERT_TRUE((*plain)->read(0, back));
  EXPECT_EQ(back, shadow);
  ::unlink(path.c_str());
}
