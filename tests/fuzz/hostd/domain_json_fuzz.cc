// Keel's JSON domain format: parse, and for what parses, the defaults, validation, command line and
// XML export must not crash and must round-trip.
#include <cstdint>
#include <string_view>

#include "base/result.h"
#include "qemu/command_line.h"
#include "qemu/domain_def.h"
#include "qemu/libvirt_xml.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel::qemu;
  auto def = parse_domain_json(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!def) return 0;
  for (auto& d : def->disks)
    if (d.path.empty()) d.path = "/dev/null";
  assign_defaults(*def);
  auto again = domain_from_json(domain_to_json(*def));
  KEEL_CHECK(again.has_value());
  LaunchConfig cfg;
  cfg.nic_backends.assign(def->nics.size(), NicBackend{NicBackendType::Tap, "tap0", ""});
  (void)build_command_line(*def, cfg);
  cfg.nic_backends.assign(def->nics.size(), NicBackend{NicBackendType::VhostUser, "", "/run/k/net.vhost"});
  (void)build_command_line(*def, cfg);
  (void)import_libvirt_xml(export_libvirt_xml(*def));
  return 0;
}
