#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

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
