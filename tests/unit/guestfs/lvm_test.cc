#include <gtest/gtest.h>

#include "guestfs/devices.h"
#include "guestfs/lvm.h"

using namespace keel::guestfs;

namespace {
const char* kMetadata = R"(testvg {
id = "nwGciD-l01J-WeFC-Snof-0dKc-Q2c9-13l1O9"
seqno = 5
format = "lvm2" # a comment
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8
physical_volumes {
pv0 {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-gggggg"
device = "/dev/loop0"
pe_start = 8
pe_count = 100
}
}
logical_volumes {
root {
id = "x"
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 2
type = "striped"
stripe_count = 1
stripes = [
"pv0", 5
]
}
segment2 {
start_extent = 2
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 1]
}
}
thin {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 1
type = "thin"
}
}
}
}
contents = "Text Format Volume Group"
version = 1
)";
}  // namespace

TEST(Lvm, ParsesText) {
  auto doc = parse_lvm_text(kMetadata);
  ASSERT_TRUE(doc) << doc.error().message();
  const LvmSection* vg = doc->section("testvg");
  ASSERT_NE(vg, nullptr);
  EXPECT_EQ(vg->integer("seqno"), 5);
  EXPECT_EQ(vg->string("format"), "lvm2");
  EXPECT_EQ(doc->integer("version"), 1);
  EXPECT_NE(vg->section("logical_volumes")->section("root"), nullptr);
}

TEST(Lvm, ErrorsSayWhere) {
  auto doc = parse_lvm_text("vg {\n a = 1\n b = \n}");
  ASSERT_FALSE(doc);
  EXPECT_NE(doc.error().message().find("line 4"), std::string::npos) << doc.error().message();
  EXPECT_FALSE(parse_lvm_text("vg { a = \"unterminated"));
  EXPECT_FALSE(parse_lvm_text(std::string(200, '{')));
  EXPECT_FALSE(parse_lvm_text("a = 99999999999999999999999"));
  std::string deep;
  for (int i = 0; i < 100; i++) deep += "s" + std::to_string(i) + " {";
  EXPECT_FALSE(parse_lvm_text(deep));
}

TEST(Lvm, MapsLinearVolumesAndRefusesOthers) {
  std::vector<uint8_t> bytes(1 << 20);
  for (size_t i = 0; i < bytes.size(); i++) bytes[i] = uint8_t(i / 4096);  // each extent (4 KiB) distinct
  MemoryDevice disk(bytes, true);
  LvmPhysicalVolume pv;
  pv.uuid = "aaaaaabbbbccccddddeeeeffffgggggg";
  pv.metadata = kMetadata;
  pv.device = &disk;
  pv.device_name = "/dev/sda1";
  auto a = assemble_volume_groups({pv});
  ASSERT_EQ(a.volumes.size(), 1u);
  EXPECT_EQ(a.volumes[0].name, "root");
  ASSERT_EQ(a.warnings.size(), 1u);
  EXPECT_NE(a.warnings[0].find("thin"), std::string::npos);
  MappedDevice lv(a.volumes[0].segments, true);
  EXPECT_EQ(lv.size(), 3u * 4096);
  // pe_start = 8 sectors = 4096 bytes; extent = 8 sectors = 4096 bytes.
  uint8_t b = 0;
  ASSERT_TRUE(lv.read(0, std::span<uint8_t>(&b, 1)));
  EXPECT_EQ(b, 1 + 5);  // PV extent 5
  ASSERT_TRUE(lv.read(2 * 4096, std::span<uint8_t>(&b, 1)));
  EXPECT_EQ(b, 1 + 1);  // second segment: PV extent 1
  EXPECT_FALSE(lv.read(3 * 4096, std::span<uint8_t>(&b, 1)));
}

TEST(Lvm, MissingPvIsAWarning) {
  MemoryDevice disk(std::vector<uint8_t>(1 << 20), true);
  LvmPhysicalVolume pv;
  pv.uuid = "someoneelse000000000000000000000";
  pv.metadata = kMetadata;
  pv.device = &disk;
  auto a = assemble_volume_groups({pv});
  EXPECT_TRUE(a.volumes.empty());
  EXPECT_EQ(a.names, std::vector<std::string>{"testvg"});
}

TEST(Lvm, NoLabel) {
  MemoryDevice disk(std::vector<uint8_t>(1 << 16), true);
  EXPECT_FALSE(read_lvm_physical_volume(disk));
}
