// OS inspection: find a guest's root filesystem, mount its fstab layout, and read what the guest
// says about itself (os-release, hostname, architecture, packages, kernels), as virt-inspector does.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "guestfs/guest.h"

namespace keel::guestfs {

struct Application {
  std::string name;
  int epoch = 0;
  std::string version;
  std::string release;
  std::string arch;
  std::string summary;
  std::string description;
  std::string url;
  std::string source_package;
};

struct OsFilesystem {
  std::string device;
  std::string type;
  std::string label;
  std::string uuid;
};

struct OsInfo {
  std::string root;            // device holding /
  std::string type = "linux";
  std::string distro = "unknown";
  std::string product_name;
  std::string version_id;
  int major_version = 0;
  int minor_version = 0;
  std::string hostname;
  std::string arch = "unknown";
  std::string package_format = "unknown";
  std::string package_management = "unknown";
  std::string osinfo;
  std::vector<std::pair<std::string, std::string>> fstab;  // mountpoint, device (as our names)
  std::vector<OsFilesystem> filesystems;  // those the OS mounts (root and fstab), by device name
  std::string icon;  // the distribution's logo (PNG bytes), as virt-inspector finds it
};

// Finds every operating system on the guest's devices. Leaves nothing mounted.
Result<std::vector<OsInfo>> inspect_os(Guest& guest);
// Mounts an OS's filesystems where its fstab puts them (root first).
Result<void> mount_os(Guest& guest, const OsInfo& os, bool read_only);
// With the OS mounted: fills in what needs the whole tree (architecture).
Result<void> inspect_mounted(Guest& guest, OsInfo& os);
// With the OS mounted: the installed packages (dpkg status, rpm sqlite database).
Result<std::vector<Application>> list_applications(Guest& guest, const OsInfo& os);
// With the OS mounted: installed kernels ("/boot/vmlinuz-6.1.0-13-amd64"), newest first.
Result<std::vector<std::string>> list_kernels(Guest& guest);

// Parsers, exposed for tests and fuzzing.
std::vector<Application> parse_dpkg_status(std::string_view text);
std::vector<std::pair<std::string, std::string>> parse_key_values(std::string_view text);  // os-release
struct FstabEntry {
  std::string spec, mountpoint, type, options;
};
std::vector<FstabEntry> parse_fstab(std::string_view text);
// One rpm header blob (as rpmdb.sqlite stores it) to an Application.
Result<Application> parse_rpm_header(std::span<const uint8_t> blob);
// The ELF machine of a binary as libguestfs names it ("x86_64", "aarch64", "i386", ...).
Result<std::string> elf_architecture(std::span<const uint8_t> header);

nlohmann::json os_to_json(const OsInfo& os, const std::vector<Application>* apps,
                          const std::vector<std::string>* kernels);
std::string os_to_xml(const OsInfo& os, const std::vector<Application>* apps);

}  // namespace keel::guestfs
