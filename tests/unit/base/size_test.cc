#include "base/size.h"

#include <gtest/gtest.h>

namespace keel {
namespace {

TEST(ParseSize, AcceptsQemuImgStyleSizes) {
  EXPECT_EQ(parse_size("512").value(), 512u);
  EXPECT_EQ(parse_size("512b").value(), 512u);
  EXPECT_EQ(parse_size("64k").value(), 64u << 10);
  EXPECT_EQ(parse_size("64K").value(), 64u << 10);
  EXPECT_EQ(parse_size("512M").value(), 512ull << 20);
  EXPECT_EQ(parse_size("2G").value(), 2ull << 30);
  EXPECT_EQ(parse_size("2GiB").value(), 2ull << 30);
  EXPECT_EQ(parse_size("2GB").value(), 2ull << 30);
  EXPECT_EQ(parse_size("1.5G").value(), 3ull << 29);
  EXPECT_EQ(parse_size("1T").value(), 1ull << 40);
  EXPECT_EQ(parse_size(" 4k ").value(), 4096u);
  EXPECT_EQ(parse_size("15E").value(), 15ull << 60);
}

TEST(ParseSize, RejectsGarbageWithAClearMessage) {
  for (const char* bad : {"", "G", "-1", "12x", "1.2.3", ".5G", "16E", "99999999999999999999", "1.0000001k", "1bB"}) {
    auto r = parse_size(bad);
    EXPECT_FALSE(r) << bad;
    if (!r) {
      EXPECT_NE(r.error().message().find("invalid size"), std::string::npos) << bad;
    }
  }
}

TEST(FormatSize, ThreeSignificantDigits) {
  EXPECT_EQ(format_size(0), "0 B");
  EXPECT_EQ(format_size(512), "512 B");
  EXPECT_EQ(format_size(1024), "1 KiB");
  EXPECT_EQ(format_size(64 << 10), "64 KiB");
  EXPECT_EQ(format_size(3ull << 29), "1.5 GiB");
  EXPECT_EQ(format_size(10ull << 30), "10 GiB");
  EXPECT_EQ(format_size(512ull << 20), "512 MiB");
  EXPECT_EQ(format_size(1234567), "1.18 MiB");
}

}  // namespace
}  // namespace keel
