// Builds a QEMU command line from a DomainDef. Pure: no host access, so every option is unit-tested.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"
#include "qemu/accel.h"
#include "qemu/domain_def.h"

namespace keel::qemu {

// How keeld connected a NIC of kind Network or Bridge to the host.
enum class NicBackendType {
  Tap,        // -netdev tap on a tap device keeld made; QEMU moves every frame
  VhostUser,  // -netdev vhost-user: keel-switch reads and writes the virtqueues in guest memory
};

struct NicBackend {
  NicBackendType type = NicBackendType::Tap;
  std::string tap;     // Tap: the tap device
  std::string socket;  // VhostUser: the unix socket QEMU listens on; keel-switch connects to it
};

// Where this VM's runtime files live (under keeld's state dir) and how to run it.
struct LaunchConfig {
  std::string qemu_binary = "qemu-system-x86_64";
  Accelerator accel = Accelerator::Tcg;
  std::string qmp_socket;
  std::string console_socket;
  std::string console_log;
  std::string pidfile;
  // Host CPU has vmx (else svm), for nested virtualization flags under KVM.
  bool host_has_vmx = true;
  // The process drops to an unprivileged uid before exec; QEMU's sandbox then also denies privilege
  // elevation (never pair that with -runas: QEMU would kill itself, see MACHINE-NOTES).
  bool sandbox = true;
  bool start_paused = false;
  // Restore: wait for the migration stream (migrate-incoming over QMP).
  bool incoming_defer = false;
  // Per resolved disk: the image path to open (pool volumes already resolved by keeld).
  // Per NIC of kind Network/Bridge, in order: how keeld connected it. Guest memory becomes a shared
  // memfd when any of them is vhost-user (the switch maps it).
  std::vector<NicBackend> nic_backends;
  // Guest memory is a shared memfd even without vhost-user NICs: restoring a guest saved with
  // them (the migration stream only loads into the same RAM backend).
  bool shared_memory = false;
  // Empty PCIe root ports for hot-plug (q35 cannot hot-plug onto pcie.0).
  int hotplug_ports = 4;
};

// The QEMU id of the PCIe root port slot N (for hot-plug).
std::string hotplug_port_id(int n);

// The argv; the definition must have passed validate_domain and assign_defaults, and the machine
// type must be resolved. Disk `path`s must be set.
Result<std::vector<std::string>> build_command_line(const DomainDef& def, const LaunchConfig& cfg);

// QMP arguments for hot-plugging a disk: the blockdev-add arguments (format node on top of a file
// node) and the device_add arguments.
nlohmann::json blockdev_add_args(const DiskDef& disk);
nlohmann::json disk_device_args(const DiskDef& disk, const std::string& bus);
// QMP arguments for hot-plugging a NIC: chardev-add (vhost-user only: the socket QEMU listens on),
// netdev_add and device_add. `backend` is ignored for user-mode NICs.
nlohmann::json chardev_add_args(const NicDef& nic, const std::string& socket);
nlohmann::json netdev_add_args(const NicDef& nic, const NicBackend& backend);
nlohmann::json nic_device_args(const NicDef& nic, const std::string& bus, const NicBackend& backend, Accelerator accel);
// The QEMU ids of a NIC's backend and (vhost-user) its socket chardev.
std::string nic_netdev_id(const NicDef& nic);
std::string nic_chardev_id(const NicDef& nic);

// "q35" -> "pc-q35-7.2" from the output of `qemu-system-x86_64 -machine help`. Already versioned
// names are returned as they are if QEMU lists them.
Result<std::string> resolve_machine_type(const std::string& requested, const std::string& machine_help);

}  // namespace keel::qemu
