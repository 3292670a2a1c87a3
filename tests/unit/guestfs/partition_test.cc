#include <zlib.h>

#include <cstring>

#include <gtest/gtest.h>

#include "guestfs/devices.h"
#include "guestfs/partition.h"
#include "guestfs/util.h"

using namespace keel::guestfs;

namespace {

constexpr size_t kSector = 512;

void put_mbr_entry(uint8_t* sector, int index, uint8_t status, uint8_t type, uint32_t lba, uint32_t count) {
  uint8_t* e = sector + 446 + 16 * index;
  e[0] = status;
  e[4] = type;
  store_le32(e + 8, lba);
  store_le32(e + 12, count);
  sector[510] = 0x55;
  sector[511] = 0xaa;
}

// A disk with primaries 1 (83), 2 (extended, holding logicals 5 and 6), as fdisk writes them.
std::vector<uint8_t> mbr_disk() {
  std::vector<uint8_t> d(2048 * kSector, 0);
  put_mbr_entry(d.data(), 0, 0x80, 0x83, 2, 100);
  put_mbr_entry(d.data(), 1, 0, 0x05, 200, 1000);
  // EBR 1 at 200: logical at +2, next EBR at extended+300
  uint8_t* ebr1 = d.data() + 200 * kSector;
  put_mbr_entry(ebr1, 0, 0, 0x83, 2, 50);
  put_mbr_entry(ebr1, 1, 0, 0x05, 300, 100);
  uint8_t* ebr2 = d.data() + 500 * kSector;
  put_mbr_entry(ebr2, 0, 0, 0x0c, 2, 60);
  return d;
}

struct GptPart {
  uint64_t first, last;
  const char* name;
};

// Writes a protective MBR, both GPT headers and both entry arrays, with correct CRCs.
std::vector<uint8_t> gpt_disk(size_t sectors, const std::vector<GptPart>& parts) {
  std::vector<uint8_t> d(sectors * kSector, 0);
  put_mbr_entry(d.data(), 0, 0, 0xee, 1, uint32_t(sectors - 1));
  std::vector<uint8_t> entries(128 * 128, 0);
  for (size_t i = 0; i < parts.size(); i++) {
    uint8_t* e = entries.data() + i * 128;
    for (int k = 0; k < 16; k++) e[k] = uint8_t(0x10 + k);   // type GUID
    for (int k = 0; k < 16; k++) e[16 + k] = uint8_t(i + k);  // unique GUID
    store_le32(e + 32, uint32_t(parts[i].first));
    store_le32(e + 40, uint32_t(parts[i].last));
    for (size_t c = 0; parts[i].name[c]; c++) store_le16(e + 56 + 2 * c, uint16_t(parts[i].name[c]));
  }
  uint32_t entries_crc = crc32(0, entries.data(), uInt(entries.size()));
  auto header = [&](uint64_t my_lba, uint64_t alt_lba, uint64_t entries_lba) {
    uint8_t* h = d.data() + my_lba * kSector;
    std::memcpy(h, "EFI PART", 8);
    store_le32(h + 8, 0x00010000);
    store_le32(h + 12, 92);
    store_le32(h + 24, uint32_t(my_lba));
    store_le32(h + 32, uint32_t(alt_lba));
    store_le32(h + 40, 34);
    store_le32(h + 48, uint32_t(sectors - 34));
    store_le32(h + 72, uint32_t(entries_lba));
    store_le32(h + 80, 128);
    store_le32(h + 84, 128);
    store_le32(h + 88, entries_crc);
    store_le32(h + 16, crc32(0, h, 92));
    std::memcpy(d.data() + entries_lba * kSector, entries.data(), entries.size());
  };
  header(1, sectors - 1, 2);
  header(sectors - 1, 1, sectors - 33);
  return d;
}

}  // namespace

TEST(Partition, MbrWithLogicalPartitions) {
  MemoryDevice disk(mbr_disk());
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_EQ(t->type, PartitionTableType::Mbr);
  ASSERT_EQ(t->partitions.size(), 4u);
  EXPECT_EQ(t->partitions[0].number, 1);
  EXPECT_TRUE(t->partitions[0].bootable);
  EXPECT_EQ(t->partitions[0].offset, 2 * kSector);
  EXPECT_TRUE(t->partitions[1].extended);
  EXPECT_EQ(t->partitions[2].number, 5);
  EXPECT_EQ(t->partitions[2].offset, 202 * kSector);
  EXPECT_EQ(t->partitions[2].length, 50 * kSector);
  EXPECT_EQ(t->partitions[3].number, 6);
  EXPECT_EQ(t->partitions[3].offset, 502 * kSector);
  EXPECT_EQ(t->partitions[3].mbr_type, 0x0c);
}

TEST(Partition, EbrLoopStops) {
  auto d = mbr_disk();
  put_mbr_entry(d.data() + 500 * kSector, 1, 0, 0x05, 300, 100);  // EBR 2 links to itself
  MemoryDevice disk(std::move(d));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->partitions.size(), 4u);
  ASSERT_FALSE(t->warnings.empty());
  EXPECT_NE(t->warnings[0].find("loops"), std::string::npos);
}

TEST(Partition, MbrPartitionBeyondDiskSkipped) {
  std::vector<uint8_t> d(100 * kSector, 0);
  put_mbr_entry(d.data(), 0, 0, 0x83, 2, 50);
  put_mbr_entry(d.data(), 1, 0, 0x83, 60, 5000);
  MemoryDevice disk(std::move(d));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->partitions.size(), 1u);
  EXPECT_EQ(t->warnings.size(), 1u);
}

TEST(Partition, NoTableOnFatBootSector) {
  std::vector<uint8_t> d(100 * kSector, 0);
  d[0] = 0xeb;
  d[446] = 0x3c;  // boot code where the table would be: not 0x00/0x80
  d[510] = 0x55;
  d[511] = 0xaa;
  MemoryDevice disk(std::move(d));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->type, PartitionTableType::None);
}

TEST(Partition, Gpt) {
  MemoryDevice disk(gpt_disk(4096, {{40, 1000, "root"}, {1001, 2000, "efi"}}));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_EQ(t->type, PartitionTableType::Gpt);
  ASSERT_EQ(t->partitions.size(), 2u);
  EXPECT_EQ(t->partitions[0].name, "root");
  EXPECT_EQ(t->partitions[0].offset, 40 * kSector);
  EXPECT_EQ(t->partitions[0].length, 961 * kSector);
  EXPECT_EQ(t->partitions[1].number, 2);
  EXPECT_EQ(t->partitions[0].gpt_type, "13121110-1514-1716-1819-1A1B1C1D1E1F");
  EXPECT_TRUE(t->warnings.empty());
}

TEST(Partition, GptCorruptPrimaryUsesBackup) {
  auto d = gpt_disk(4096, {{40, 1000, "root"}});
  d[kSector + 30] ^= 1;  // inside the primary header: its CRC no longer matches
  MemoryDevice disk(std::move(d));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  ASSERT_EQ(t->partitions.size(), 1u);
  ASSERT_FALSE(t->warnings.empty());
}

TEST(Partition, GptCorruptEntriesUseBackup) {
  auto d = gpt_disk(4096, {{40, 1000, "root"}});
  d[2 * kSector + 60] ^= 1;  // primary entry array
  MemoryDevice disk(std::move(d));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  ASSERT_EQ(t->partitions.size(), 1u);
  EXPECT_EQ(t->partitions[0].name, "root");
}

TEST(Partition, GptBothCorruptIsAnError) {
  auto d = gpt_disk(4096, {{40, 1000, "root"}});
  d[kSector + 30] ^= 1;
  d[4095 * kSector + 30] ^= 1;
  MemoryDevice disk(std::move(d));
  auto t = read_partition_table(disk);
  ASSERT_FALSE(t);
  EXPECT_NE(t.error().message().find("neither GPT header"), std::string::npos);
}

TEST(Partition, GptEntryBeyondDiskSkipped) {
  MemoryDevice disk(gpt_disk(4096, {{40, 1000, "ok"}, {3000, 900000, "bad"}}));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->partitions.size(), 1u);
}

TEST(Partition, TinyDiskHasNoTable) {
  MemoryDevice disk(std::vector<uint8_t>(100, 0));
  auto t = read_partition_table(disk);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->type, PartitionTableType::None);
}
