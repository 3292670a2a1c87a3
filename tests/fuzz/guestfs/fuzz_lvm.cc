// The input is both LVM text metadata and a physical volume (label + metadata area).
#include <cstdint>
#include <string_view>
#include <vector>

#include "guestfs/devices.h"
#include "guestfs/lvm.h"

using namespace keel::guestfs;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)parse_lvm_text(std::string_view(reinterpret_cast<const char*>(data), size));
  std::vector<uint8_t> bytes(data, data + size);
  if (bytes.size() < 8192) bytes.resize(8192);
  MemoryDevice disk(std::move(bytes), true);
  auto pv = read_lvm_physical_volume(disk);
  if (pv) {
    pv->device = &disk;
    pv->device_name = "/dev/sda";
    auto assembly = assemble_volume_groups({*pv});
    for (auto& lv : assembly.volumes) {
      MappedDevice mapped(std::move(lv.segments), true);
      uint8_t sector[512];
      if (mapped.size() >= sizeof sector) (void)mapped.read(mapped.size() - sizeof sector, sector);
    }
  } else {
    // A text-only input: wrap it as a PV's metadata.
    LvmPhysicalVolume text_pv;
    text_pv.metadata.assign(reinterpret_cast<const char*>(data), size);
    text_pv.uuid = "00000000000000000000000000000000";
    text_pv.device = &disk;
    (void)assemble_volume_groups({text_pv});
  }
  return 0;
}
