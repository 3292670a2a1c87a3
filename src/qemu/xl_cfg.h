// Xen xl.cfg (xl domain configuration) -> DomainDef: name, memory, vcpus/maxvcpus, kernel, ramdisk,
// cmdline/extra/root, disk = [...] (target=/vdev=/format=/access=), vif = [...] (mac=/bridge=),
// vnc/vnclisten/vncdisplay, serial. Other keys are listed in `ignored`.
#pragma once

#include <string_view>

#include "base/result.h"
#include "qemu/libvirt_xml.h"

namespace keel::qemu {

Result<ImportResult> import_xl_cfg(std::string_view text);

}  // namespace keel::qemu
