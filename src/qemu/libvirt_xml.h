// libvirt domain XML <-> DomainDef. Import takes the common subset (memory, vcpus, cpu mode, os
// kernel/initrd/cmdline, disks, interfaces, serial, graphics, rng, memballoon, hugepages) and lists
// everything else it saw in `ignored`, element by element, so nothing is dropped silently.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "qemu/domain_def.h"

namespace keel::qemu {

struct ImportResult {
  DomainDef def;
  std::vector<std::string> ignored;  // "devices/sound: not supported", "features/hyperv: ignored", ...
};

Result<ImportResult> import_libvirt_xml(std::string_view xml);
std::string export_libvirt_xml(const DomainDef& def);

}  // namespace keel::qemu
