#include "base/mapping.h"

#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "base/unique_fd.h"

namespace keel {
namespace {

TEST(Mapping, AnonymousIsZeroFilledAndWritable) {
  auto m = Mapping::anonymous(8192).value();
  ASSERT_EQ(m.size(), 8192u);
  for (uint8_t b : m.bytes()) ASSERT_EQ(b, 0);
  m.bytes()[100] = 42;
  EXPECT_EQ(m.data()[100], 42);
}

TEST(Mapping, SharedFdMappingsSeeEachOther) {
  int memfd = ::memfd_create("keel-test", MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  UniqueFd fd(memfd);
  ASSERT_EQ(::ftruncate(fd.get(), 4096), 0);
  auto a = Mapping::map_fd(fd.get(), 4096, 0, PROT_READ | PROT_WRITE, MAP_SHARED).value();
  auto b = Mapping::map_fd(fd.get(), 4096, 0, PROT_READ, MAP_SHARED).value();
  a.bytes()[7] = 0x5a;
  EXPECT_EQ(b.bytes()[7], 0x5a);
}

TEST(Mapping, MoveLeavesSourceEmptyAndZeroSizeIsRejected) {
  auto a = Mapping::anonymous(4096).value();
  Mapping b = std::move(a);
  EXPECT_FALSE(a.valid());
  EXPECT_TRUE(b.valid());
  b.reset();
  EXPECT_FALSE(b.valid());
  EXPECT_FALSE(Mapping::anonymous(0));
}

}  // namespace
}  // namespace keel
