// The input is a guest's text files (dpkg status, fstab, os-release) and an rpm header blob.
#include <cstdint>
#include <span>
#include <string_view>

#include "guestfs/inspect.h"

using namespace keel::guestfs;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)parse_dpkg_status(text);
  (void)parse_fstab(text);
  (void)parse_key_values(text);
  (void)parse_rpm_header(std::span<const uint8_t>(data, size));
  (void)elf_architecture(std::span<const uint8_t>(data, size));
  return 0;
}
