// DomainDef: what a VM is, in Keel's own terms. Parsed from (and written back to) Keel's concise
// JSON domain format (docs/hostd.md, schemas/domain.schema.json); libvirt XML and xl.cfg importers
// produce the same struct.
//
// Parsing is strict: unknown fields, wrong types and impossible values are errors that name the field
// and say what is allowed, so a typo never silently changes a VM.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace keel::qemu {

enum class CpuMode { HostPassthrough, HostModel, Custom };
enum class DiskCache { None, Writeback, Writethrough, Directsync, Unsafe };
enum class DiskFormat { Raw, Qcow2 };
enum class NicKind { User, Network, Bridge };
enum class GraphicsKind { None, Vnc, Spice };

struct CpuDef {
  CpuMode mode = CpuMode::Custom;
  std::string model = "qemu64";  // for Custom
  bool nested = false;           // expose vmx/svm to the guest (KVM only)
};

struct BootDef {
  std::string kernel;   // direct kernel boot when set
  std::string initrd;
  std::string cmdline;
  std::string firmware = "bios";  // "bios" (SeaBIOS) or "qboot"
};

struct DiskDef {
  std::string id;        // device id, e.g. "vda"; generated when empty
  std::string path;      // image file; empty when `volume` names a pool volume
  std::string volume;    // "pool/volume", resolved by keeld to a path
  DiskFormat format = DiskFormat::Qcow2;
  DiskCache cache = DiskCache::Writeback;  // none (O_DIRECT) fails on tmpfs, so not the default
  bool readonly = false;
};

struct NicDef {
  std::string id;        // device id, e.g. "net0"; generated when empty
  NicKind kind = NicKind::User;
  std::string network;   // for Network: keel network name
  std::string bridge;    // for Bridge: host bridge; for Network: filled in by keeld at start
  std::string mac;       // generated at define time when empty
};

struct GraphicsDef {
  GraphicsKind kind = GraphicsKind::None;
  std::string listen = "127.0.0.1";
  int port = -1;  // -1: auto
};

struct DomainDef {
  std::string name;
  std::string uuid;              // generated at define time when empty
  uint64_t memory_bytes = 0;
  unsigned vcpus = 1;
  std::string machine = "q35";   // resolved to a versioned type (pc-q35-7.2) at define time
  CpuDef cpu;
  bool hugepages = false;
  bool ksm = true;               // allow KSM to merge guest pages (mem-merge)
  BootDef boot;
  std::vector<DiskDef> disks;
  std::vector<NicDef> nics;
  bool serial = true;
  GraphicsDef graphics;
  bool rng = false;
  bool balloon = false;
};

std::string_view to_string(CpuMode m);
std::string_view to_string(DiskCache c);
std::string_view to_string(DiskFormat f);
std::string_view to_string(NicKind k);
std::string_view to_string(GraphicsKind k);

// Names allowed for a domain, pool, volume or network: [A-Za-z0-9_.-], 1..64, not starting with '.'.
Result<void> validate_name(std::string_view what, std::string_view name);

// Parses Keel's JSON domain format. Errors name the field ("disks[1].cache: 'fast' is not one of
// none, writeback, writethrough, directsync, unsafe").
Result<DomainDef> parse_domain_json(std::string_view text);
Result<DomainDef> domain_from_json(const nlohmann::json& j);
nlohmann::json domain_to_json(const DomainDef& def);

// Checks what does not depend on the host: sizes, counts, names, unique device ids and MACs.
Result<void> validate_domain(const DomainDef& def);

// Fills in what define does: uuid, device ids, MAC addresses (52:54:00 prefix, as QEMU/libvirt).
void assign_defaults(DomainDef& def);

std::string generate_uuid();
std::string generate_mac();

}  // namespace keel::qemu
