#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost/guest_memory.h"

namespace keel::vhost {
namespace {

UniqueFd memfd(size_t size) {
  int fd = memfd_create("guest-memory-test", MFD_CLOEXEC);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
  return UniqueFd(fd);
}

TEST(GuestMemory, TranslatesBothAddressSpacesHonouringOffsets) {
  UniqueFd fd = memfd(0x20000);
  // The file: "A" at 0x1000 (region 0), "B" at 0x11000 (region 1's start + 0x1000).
  ASSERT_EQ(pwrite(fd.get(), "A", 1, 0x1000), 1);
  ASSERT_EQ(pwrite(fd.get(), "B", 1, 0x11000), 1);
  GuestMemory mem;
  ASSERT_TRUE(mem.add_region(fd.get(), {0x0, 0x10000, 0x7f0000000000, 0}));
  ASSERT_TRUE(mem.add_region(fd.get(), {0x100000000, 0x10000, 0x7f0000010000, 0x10000}));
  ASSERT_EQ(mem.region_count(), 2u);

  uint8_t* a = mem.gpa_to_host(0x1000, 1);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(*a, 'A');
  uint8_t* b = mem.gpa_to_host(0x100001000, 1);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(*b, 'B');
  EXPECT_EQ(mem.uva_to_host(0x7f0000011000, 1), b);
  EXPECT_EQ(mem.uva_to_host(0x7f0000001000, 1), a);

  // Whole region, and one byte past it.
  EXPECT_NE(mem.gpa_to_host(0, 0x10000), nullptr);
  EXPECT_EQ(mem.gpa_to_host(0, 0x10001), nullptr);
  EXPECT_EQ(mem.gpa_to_host(0x10000, 1), nullptr);  // in the hole
  EXPECT_EQ(mem.gpa_to_host(0xffff, 2), nullptr);   // straddles the end
  // Huge lengths and wrapping addresses never translate.
  EXPECT_EQ(mem.gpa_to_host(0x1000, ~0ull), nullptr);
  EXPECT_EQ(mem.gpa_to_host(~0ull, 2), nullptr);
  EXPECT_EQ(mem.uva_to_host(0x7f000000ffff, 0x10), nullptr);
}

TEST(GuestMemory, RefusesRegionsPastTheFileOrNotAFile) {
  UniqueFd fd = memfd(0x10000);
  GuestMemory mem;
  EXPECT_FALSE(mem.add_region(fd.get(), {0, 0x20000, 0x1000000, 0}));  // larger than the file
  EXPECT_FALSE(mem.add_region(fd.get(), {0, 0x10000, 0x1000000, 0x1000}));  // offset pushes it past
  EXPECT_FALSE(mem.add_region(fd.get(), {0, 0, 0x1000000, 0}));
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  UniqueFd r(pipefd[0]), w(pipefd[1]);
  EXPECT_FALSE(mem.add_region(r.get(), {0, 0x1000, 0x1000000, 0}));
  EXPECT_TRUE(mem.add_region(fd.get(), {0, 0x10000, 0x1000000, 0}));
  EXPECT_FALSE(mem.add_region(fd.get(), {0x8000, 0x1000, 0x2000000, 0}));  // overlaps
}

}  // namespace
}  // namespace keel::vhost
