#include "guestfs/partition.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <set>

#include <zlib.h>

#include "guestfs/util.h"

namespace keel::guestfs {

namespace {

constexpr uint64_t kSector = 512;
constexpr int kMaxLogicalPartitions = 256;
constexpr uint32_t kMaxGptEntries = 4096;

bool is_extended_type(uint8_t type) { return type == 0x05 || type == 0x0f || type == 0x85; }

struct MbrEntry {
  uint8_t status;
  uint8_t type;
  uint32_t lba_start;
  uint32_t sectors;
};

MbrEntry parse_mbr_entry(const uint8_t* p) {
  return MbrEntry{p[0], p[4], load_le32(p + 8), load_le32(p + 12)};
}

Result<std::array<uint8_t, kSector>> read_sector(disk::BlockDevice& disk, uint64_t lba) {
  std::array<uint8_t, kSector> sector{};
  if (lba >= disk.size() / kSector) return fail_invalid("sector {} is beyond the end of the disk", lba);
  TRY(disk.read(lba * kSector, sector));
  return sector;
}

bool has_boot_signature(const std::array<uint8_t, kSector>& s) { return s[510] == 0x55 && s[511] == 0xaa; }

// Follows the chain of extended boot records from an extended partition.
void read_logical_partitions(disk::BlockDevice& disk, uint64_t ext_start, uint64_t ext_sectors,
                             PartitionTable& table) {
  uint64_t disk_sectors = disk.size() / kSector;
  uint64_t ebr_lba = ext_start;
  std::set<uint64_t> seen;
  int number = 5;
  while (true) {
    if (number - 5 >= kMaxLogicalPartitions) {
      table.warnings.push_back("too many logical partitions; stopped reading the EBR chain");
      return;
    }
    if (!seen.insert(ebr_lba).second) {
      table.warnings.push_back(fmt::format("EBR chain loops back to sector {}; stopped", ebr_lba));
      return;
    }
    auto sector = read_sector(disk, ebr_lba);
    if (!sector || !has_boot_signature(*sector)) {
      table.warnings.push_back(fmt::format("no valid EBR at sector {}; stopped", ebr_lba));
      return;
    }
    MbrEntry logical = parse_mbr_entry(sector->data() + 446);
    MbrEntry next = parse_mbr_entry(sector->data() + 446 + 16);
    if (logical.type != 0 && logical.sectors != 0) {
      uint64_t start = ebr_lba + logical.lba_start;
      if (start + logical.sectors > disk_sectors) {
        table.warnings.push_back(fmt::format("logical partition {} extends beyond the disk; skipped", number));
      } else {
        PartitionInfo info;
        info.number = number;
        info.offset = start * kSector;
        info.length = uint64_t(logical.sectors) * kSector;
        info.mbr_type = logical.type;
        info.bootable = logical.status == 0x80;
        table.partitions.push_back(info);
      }
    }
    number++;
    if (next.type == 0 || next.lba_start == 0 || !is_extended_type(next.type)) return;
    if (next.lba_start >= ext_sectors) {
      table.warnings.push_back("EBR link points outside the extended partition; stopped");
      return;
    }
    ebr_lba = ext_start + next.lba_start;
  }
}

struct GptHeader {
  uint64_t my_lba = 0;
  uint64_t alternate_lba = 0;
  uint64_t first_usable = 0;
  uint64_t last_usable = 0;
  std::string disk_guid;
  uint64_t entries_lba = 0;
  uint32_t entry_count = 0;
  uint32_t entry_size = 0;
  uint32_t entries_crc = 0;
};

Result<GptHeader> read_gpt_header(disk::BlockDevice& disk, uint64_t lba) {
  auto sector = TRY(read_sector(disk, lba));
  if (std::memcmp(sector.data(), "EFI PART", 8) != 0) return fail_invalid("no GPT signature at sector {}", lba);
  uint32_t header_size = load_le32(&sector[12]);
  if (header_size < 92 || header_size > kSector)
    return fail_invalid("GPT header at sector {} has a bad size {}", lba, header_size);
  uint32_t stored_crc = load_le32(&sector[16]);
  std::memset(&sector[16], 0, 4);
  uint32_t crc = crc32(0, sector.data(), header_size);
  if (crc != stored_crc) return fail_invalid("GPT header at sector {} has a bad CRC", lba);
  GptHeader h;
  h.my_lba = load_le64(&sector[24]);
  h.alternate_lba = load_le64(&sector[32]);
  h.first_usable = load_le64(&sector[40]);
  h.last_usable = load_le64(&sector[48]);
  h.disk_guid = format_guid(&sector[56]);
  h.entries_lba = load_le64(&sector[72]);
  h.entry_count = load_le32(&sector[80]);
  h.entry_size = load_le32(&sector[84]);
  h.entries_crc = load_le32(&sector[88]);
  if (h.my_lba != lba) return fail_invalid("GPT header at sector {} says it is at sector {}", lba, h.my_lba);
  if (h.entry_size < 128 || h.entry_size % 8 != 0 || h.entry_size > 4096)
    return fail_invalid("GPT header has a bad entry size {}", h.entry_size);
  if (h.entry_count > kMaxGptEntries) return fail_invalid("GPT header claims {} entries", h.entry_count);
  uint64_t disk_sectors = disk.size() / kSector;
  uint64_t table_bytes = uint64_t(h.entry_count) * h.entry_size;
  if (h.entries_lba >= disk_sectors || table_bytes > (disk_sectors - h.entries_lba) * kSector)
    return fail_invalid("GPT entry array lies beyond the end of the disk");
  return h;
}

Result<std::vector<uint8_t>> read_gpt_entries(disk::BlockDevice& disk, const GptHeader& h) {
  std::vector<uint8_t> entries(size_t(h.entry_count) * h.entry_size);
  TRY(disk.read(h.entries_lba * kSector, entries));
  if (crc32(0, entries.data(), entries.size()) != h.entries_crc)
    return fail_invalid("GPT entry array at sector {} has a bad CRC", h.entries_lba);
  return entries;
}

Result<void> read_gpt(disk::BlockDevice& disk, PartitionTable& table) {
  uint64_t disk_sectors = disk.size() / kSector;
  GptHeader header;
  std::vector<uint8_t> entries;
  auto primary = read_gpt_header(disk, 1);
  bool have = false;
  if (primary) {
    auto e = read_gpt_entries(disk, *primary);
    if (e) {
      header = *primary;
      entries = std::move(*e);
      have = true;
    } else {
      table.warnings.push_back("primary GPT: " + e.error().message());
    }
  } else {
    table.warnings.push_back("primary GPT: " + primary.error().message());
  }
  // The backup header is at the alternate LBA of the primary, or at the last sector of the disk.
  std::vector<uint64_t> backup_lbas;
  if (primary && primary->alternate_lba < disk_sectors) backup_lbas.push_back(primary->alternate_lba);
  if (disk_sectors > 1) backup_lbas.push_back(disk_sectors - 1);
  bool backup_ok = false;
  for (uint64_t lba : backup_lbas) {
    auto backup = read_gpt_header(disk, lba);
    if (!backup) continue;
    auto e = read_gpt_entries(disk, *backup);
    if (!e) continue;
    backup_ok = true;
    if (!have) {
      header = *backup;
      entries = std::move(*e);
      have = true;
      table.warnings.push_back("using the backup GPT header");
    }
    break;
  }
  if (!have) return fail_invalid("disk has a protective MBR but neither GPT header is valid");
  if (!backup_ok) table.warnings.push_back("backup GPT header is missing or corrupt");

  table.type = PartitionTableType::Gpt;
  table.disk_guid = header.disk_guid;
  static const uint8_t kZero[16] = {};
  for (uint32_t i = 0; i < header.entry_count; i++) {
    const uint8_t* e = entries.data() + size_t(i) * header.entry_size;
    if (std::memcmp(e, kZero, 16) == 0) continue;
    uint64_t first = load_le64(e + 32);
    uint64_t last = load_le64(e + 40);
    if (first > last || last >= disk_sectors) {
      table.warnings.push_back(fmt::format("GPT entry {} lies outside the disk; skipped", i + 1));
      continue;
    }
    PartitionInfo info;
    info.number = int(i) + 1;
    info.offset = first * kSector;
    info.length = (last - first + 1) * kSector;
    info.gpt_type = format_guid(e);
    info.gpt_guid = format_guid(e + 16);
    std::u16string name;
    for (int c = 0; c < 36; c++) {
      char16_t ch = char16_t(load_le16(e + 56 + 2 * c));
      if (ch == 0) break;
      name.push_back(ch);
    }
    info.name = utf16_to_utf8(name);
    table.partitions.push_back(std::move(info));
  }
  return ok();
}

}  // namespace

const char* to_string(PartitionTableType type) {
  switch (type) {
    case PartitionTableType::None: return "none";
    case PartitionTableType::Mbr: return "msdos";
    case PartitionTableType::Gpt: return "gpt";
  }
  return "?";
}

std::string format_guid(const uint8_t* b) {
  return fmt::format("{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}", load_le32(b),
                     load_le16(b + 4), load_le16(b + 6), b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

Result<PartitionTable> read_partition_table(disk::BlockDevice& disk) {
  PartitionTable table;
  if (disk.size() < 2 * kSector) return table;
  auto mbr = TRY(read_sector(disk, 0));
  if (!has_boot_signature(mbr)) return table;
  MbrEntry entries[4];
  for (int i = 0; i < 4; i++) entries[i] = parse_mbr_entry(mbr.data() + 446 + 16 * i);
  // A FAT or NTFS boot sector also ends in 55 AA: a partition table has only 0x00/0x80 status bytes.
  for (const auto& e : entries)
    if (e.status != 0 && e.status != 0x80) return table;
  bool protective = false;
  for (const auto& e : entries)
    if (e.type == 0xee) protective = true;
  if (protective) {
    TRY(read_gpt(disk, table));
    return table;
  }
  bool any = false;
  for (const auto& e : entries) any |= e.type != 0;
  if (!any) return table;
  table.type = PartitionTableType::Mbr;
  table.mbr_signature = load_le32(&mbr[440]);
  uint64_t disk_sectors = disk.size() / kSector;
  for (int i = 0; i < 4; i++) {
    const MbrEntry& e = entries[i];
    if (e.type == 0 || e.sectors == 0) continue;
    if (uint64_t(e.lba_start) + e.sectors > disk_sectors) {
      table.warnings.push_back(fmt::format("partition {} extends beyond the end of the disk; skipped", i + 1));
      continue;
    }
    PartitionInfo info;
    info.number = i + 1;
    info.offset = uint64_t(e.lba_start) * kSector;
    info.length = uint64_t(e.sectors) * kSector;
    info.mbr_type = e.type;
    info.bootable = e.status == 0x80;
    info.extended = is_extended_type(e.type);
    table.partitions.push_back(info);
    if (info.extended) read_logical_partitions(disk, e.lba_start, e.sectors, table);
  }
  std::sort(table.partitions.begin(), table.partitions.end(),
            [](const PartitionInfo& a, const PartitionInfo& b) { return a.number < b.number; });
  return table;
}

}  // namespace keel::guestfs
