// Xen xl.cfg import.
#include <cstdint>
#include <string_view>

#include "qemu/xl_cfg.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = keel::qemu::import_xl_cfg(std::string_view(reinterpret_cast<const char*>(data), size));
  if (r) KEEL_CHECK(keel::qemu::validate_domain(r->def).has_value());
  return 0;
}
