// Partition tables: MBR (with extended/logical partitions) and GPT (both headers, CRC-checked).
// Everything read from the disk is hostile: every offset is bounds-checked against the disk, EBR
// chains are loop-checked, and a bad primary GPT falls back to the backup header.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "disk/block_device.h"

namespace keel::guestfs {

enum class PartitionTableType { None, Mbr, Gpt };
const char* to_string(PartitionTableType type);

struct PartitionInfo {
  int number = 0;            // as Linux numbers them: MBR primaries 1-4, logicals from 5; GPT entry index + 1
  uint64_t offset = 0;       // bytes from the start of the disk
  uint64_t length = 0;       // bytes
  uint8_t mbr_type = 0;      // MBR partition type byte (0 for GPT)
  bool bootable = false;     // MBR active flag
  bool extended = false;     // an MBR extended container (holds logicals, no filesystem)
  std::string gpt_type;      // GPT partition type GUID, upper case, as sgdisk prints it
  std::string gpt_guid;      // GPT unique partition GUID
  std::string name;          // GPT partition name (UTF-8)
};

struct PartitionTable {
  PartitionTableType type = PartitionTableType::None;
  std::vector<PartitionInfo> partitions;  // sorted by number
  std::string disk_guid;                  // GPT
  uint32_t mbr_signature = 0;             // MBR disk identifier
  std::vector<std::string> warnings;      // e.g. "primary GPT header is corrupt, using the backup"
};

// Reads the partition table of a disk. A disk with no table gives type None and no error; a table
// that is present but broken beyond use gives an error that says what is wrong.
Result<PartitionTable> read_partition_table(disk::BlockDevice& disk);

// GUID bytes as GPT stores them (first three fields little-endian) to the usual text form.
std::string format_guid(const uint8_t* bytes16);

}  // namespace keel::guestfs
