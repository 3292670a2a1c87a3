#include <gtest/gtest.h>

#include "guestfs/fish.h"
#include "guestfs/inspect.h"
#include "guestfs/sysprep.h"
#include "guestfs/util.h"

using namespace keel::guestfs;

TEST(Parsers, DpkgStatus) {
  auto apps = parse_dpkg_status(
      "Package: zed\nStatus: install ok installed\nVersion: 1:2.3-4+b1\nArchitecture: amd64\n"
      "Description: the last\n first line\n .\n  indented\nHomepage: https://z\nSource: zsrc (1)\n\n"
      "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
      "Package: abc\nStatus: install ok installed\nVersion: 0.1\n");
  ASSERT_EQ(apps.size(), 2u);
  EXPECT_EQ(apps[0].name, "abc");
  EXPECT_EQ(apps[0].version, "0.1");
  EXPECT_EQ(apps[1].name, "zed");
  EXPECT_EQ(apps[1].epoch, 1);
  EXPECT_EQ(apps[1].version, "2.3");
  EXPECT_EQ(apps[1].release, "4+b1");
  EXPECT_EQ(apps[1].summary, "the last");
  EXPECT_EQ(apps[1].description, "first line\n.\n indented");
  EXPECT_EQ(apps[1].url, "https://z");
  EXPECT_EQ(apps[1].source_package, "zsrc");
}

TEST(Parsers, OsReleaseAndFstab) {
  auto kv = parse_key_values("# c\nID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nX='q'\nbad line\n");
  ASSERT_EQ(kv.size(), 3u);
  EXPECT_EQ(kv[1].second, "Debian GNU/Linux 12 (bookworm)");
  EXPECT_EQ(kv[2].second, "q");
  auto fstab = parse_fstab("UUID=1 / ext4 defaults 0 1\n\n# x\n/dev/sda1\t/my\\040dir vfat rw\nshort line\n");
  ASSERT_EQ(fstab.size(), 2u);
  EXPECT_EQ(fstab[1].mountpoint, "/my dir");
  EXPECT_EQ(fstab[1].type, "vfat");
}

TEST(Parsers, RpmHeader) {
  std::vector<uint8_t> blob;
  auto be32 = [&](uint32_t v) {
    for (int i = 3; i >= 0; i--) blob.push_back(uint8_t(v >> (8 * i)));
  };
  be32(3);
  be32(16);
  be32(1000), be32(6), be32(0), be32(1);
  be32(1001), be32(6), be32(5), be32(1);
  be32(1003), be32(4), be32(12), be32(1);
  for (char c : std::string("bash\0" "5.2\0\0\0\0", 12)) blob.push_back(uint8_t(c));
  be32(2);
  auto app = parse_rpm_header(blob);
  ASSERT_TRUE(app) << app.error().message();
  EXPECT_EQ(app->name, "bash");
  EXPECT_EQ(app->version, "5.2");
  EXPECT_EQ(app->epoch, 2);
  blob.resize(20);
  EXPECT_FALSE(parse_rpm_header(blob));
}

TEST(Parsers, ElfArchitecture) {
  std::vector<uint8_t> h(64, 0);
  h[0] = 0x7f, h[1] = 'E', h[2] = 'L', h[3] = 'F', h[4] = 2, h[5] = 1, h[18] = 62;
  EXPECT_EQ(*elf_architecture(h), "x86_64");
  h[18] = 183;
  EXPECT_EQ(*elf_architecture(h), "aarch64");
  h[0] = 0;
  EXPECT_FALSE(elf_architecture(h));
}

TEST(Parsers, FishLineSplitting) {
  auto w = split_fish_line(R"(write /a "hello \"world\"\n" 'single $x' plain # comment)");
  ASSERT_TRUE(w);
  ASSERT_EQ(w->size(), 5u);
  EXPECT_EQ((*w)[2], "hello \"world\"\n");
  EXPECT_EQ((*w)[3], "single $x");
  EXPECT_EQ((*w)[4], "plain");
  EXPECT_FALSE(split_fish_line("write \"unterminated"));
  EXPECT_TRUE(split_fish_line("   ")->empty());
  auto empty = split_fish_line("write /a \"\"");
  ASSERT_EQ(empty->size(), 3u);
  EXPECT_EQ((*empty)[2], "");
}

TEST(Parsers, Utf16RoundTrip) {
  std::string s = "café – 𝄞 end";
  EXPECT_EQ(utf16_to_utf8(utf8_to_utf16(s)), s);
  EXPECT_EQ(utf16_to_utf8(std::u16string(1, char16_t(0xd800))), "\xef\xbf\xbd");
  EXPECT_EQ(utf8_to_utf16("\xff").size(), 1u);
}

TEST(Parsers, Paths) {
  EXPECT_EQ(split_path("//a/./b/"), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(parent_path("/a/b"), "/a");
  EXPECT_EQ(parent_path("/a"), "/");
  EXPECT_EQ(base_name("/a/b"), "b");
  EXPECT_EQ(join_path("/", "x"), "/x");
  EXPECT_EQ(mode_string(0100644), "-rw-r--r--");
  EXPECT_EQ(mode_string(041777), "drwxrwxrwt");
  EXPECT_EQ(mode_string(0104755), "-rwsr-xr-x");
}

TEST(Parsers, PasswordHash) {
  auto h = hash_password("secret");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->rfind("$6$", 0), 0u);
  EXPECT_NE(*h, *hash_password("secret"));  // fresh salt each time
}
