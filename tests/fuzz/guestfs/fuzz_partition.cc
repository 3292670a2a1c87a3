// The input is a whole disk: MBR/EBR chains and GPT headers and entries are read from it.
#include <cstdint>
#include <vector>

#include "guestfs/devices.h"
#include "guestfs/partition.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  keel::guestfs::MemoryDevice disk(std::vector<uint8_t>(data, data + size), true);
  auto table = keel::guestfs::read_partition_table(disk);
  if (table) {
    for (const auto& p : table->partitions) {
      // Every partition the parser returns lies inside the disk.
      if (p.offset > size || p.length > size - p.offset) __builtin_trap();
    }
  }
  return 0;
}
