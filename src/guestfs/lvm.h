// LVM2: the physical volume label, its metadata area, and the text metadata that describes volume
// groups and logical volumes. Linear logical volumes (striped segments with one stripe) are
// mapped; other segment types are reported, not guessed at.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "disk/block_device.h"
#include "guestfs/devices.h"

namespace keel::guestfs {

// The LVM text format: sections of `key = value` lines and nested sections.
struct LvmValue {
  std::variant<int64_t, std::string, std::vector<LvmValue>> value;
};
struct LvmNamedSection;
struct LvmSection {
  std::vector<std::pair<std::string, LvmValue>> values;
  std::vector<LvmNamedSection> sections;
  const LvmValue* find(std::string_view key) const;
  const LvmSection* section(std::string_view key) const;
  std::optional<int64_t> integer(std::string_view key) const;
  std::optional<std::string> string(std::string_view key) const;
};
struct LvmNamedSection {
  std::string name;
  LvmSection section;
};
// Parses metadata text; errors say where the text went wrong. Fuzzed.
Result<LvmSection> parse_lvm_text(std::string_view text);

struct LvmPhysicalVolume {
  std::string uuid;         // 32 characters, no dashes
  std::string metadata;     // the newest text metadata found in its metadata area
  disk::BlockDevice* device = nullptr;
  std::string device_name;
};

// Reads a PV's label and the metadata its first metadata area holds.
Result<LvmPhysicalVolume> read_lvm_physical_volume(disk::BlockDevice& device);

struct LvmMappedVolume {
  std::string vg;
  std::string name;
  std::vector<MappedSegment> segments;
  bool read_only = false;
};

struct LvmAssembly {
  std::vector<std::string> names;  // volume groups found
  std::vector<LvmMappedVolume> volumes;
  std::vector<std::string> warnings;
};

// Groups PVs into VGs (newest metadata wins) and maps each linear LV onto its PVs.
LvmAssembly assemble_volume_groups(const std::vector<LvmPhysicalVolume>& pvs);

}  // namespace keel::guestfs
