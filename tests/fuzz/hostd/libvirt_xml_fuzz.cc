// libvirt domain XML import (pugixml underneath) and the export of whatever imports.
#include <cstdint>
#include <string_view>

#include "qemu/libvirt_xml.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel::qemu;
  auto r = import_libvirt_xml(std::string_view(reinterpret_cast<const char*>(data), size));
  if (r) {
    assign_defaults(r->def);
    auto back = import_libvirt_xml(export_libvirt_xml(r->def));
    KEEL_CHECK(back.has_value());
  }
  return 0;
}
