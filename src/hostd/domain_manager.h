// DomainManager: keeld's domains. Definitions live in the StateStore; each running domain has a
// QEMU process (started detached, so it outlives keeld) and a QMP connection. On start-up keeld
// re-attaches to the QEMUs recorded in the store and reports what it finds.
//
// Error codes tell the API layer which HTTP status to use: ENOENT (404), EEXIST (409),
// EBUSY (409: wrong state for the operation), EINVAL (400), anything else (500).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "hostd/event_bus.h"
#include "hostd/network.h"
#include "hostd/state_store.h"
#include "hostd/storage.h"
#include "qemu/accel.h"
#include "qemu/domain_def.h"
#include "qemu/launcher.h"
#include "qemu/qmp.h"

namespace keel::hostd {

struct DomainManagerConfig {
  std::string state_dir;
  std::string qemu_binary = "qemu-system-x86_64";
  qemu::Accelerator accel = qemu::Accelerator::Tcg;
  bool sandbox = true;
  // "auto": as root, QEMU runs as nobody when nobody can read its kernel/initrd, else as root;
  // "none": as keeld's uid; or a user name (always that user). Images and runtime files are handed
  // to QEMU's user.
  std::string qemu_user = "auto";
};

class DomainManager {
public:
  DomainManager(DomainManagerConfig cfg, StateStore& store, EventBus& events, StoragePools& pools,
                Networks& networks);
  ~DomainManager();

  // Loads the machine types QEMU knows and re-attaches to running QEMUs. Call once.
  Result<void> init();

  // Validates, fills in defaults (uuid, ids, MACs, versioned machine type) and stores.
  Result<qemu::DomainDef> define(qemu::DomainDef def);
  Result<void> undefine(const std::string& name);
  Result<nlohmann::json> list();
  Result<nlohmann::json> info(const std::string& name);
  Result<nlohmann::json> stats(const std::string& name);
  Result<qemu::DomainDef> definition(const std::string& name);

  Result<void> start(const std::string& name, bool paused = false);
  Result<void> shutdown(const std::string& name);  // ACPI power button
  Result<void> destroy(const std::string& name);
  Result<void> reboot(const std::string& name);
  Result<void> suspend(const std::string& name);
  Result<void> resume(const std::string& name);
  // Saves the running guest's state to `file` and stops it; restore starts it from there.
  Result<void> save(const std::string& name, const std::string& file);
  Result<std::string> restore(const std::string& file);

  Result<qemu::NicDef> attach_nic(const std::string& name, qemu::NicDef nic);
  Result<void> detach_nic(const std::string& name, const std::string& id_or_mac);
  Result<qemu::DiskDef> attach_disk(const std::string& name, qemu::DiskDef disk);
  Result<void> detach_disk(const std::string& name, const std::string& id);

  // For the console endpoint: the serial socket and log of a running domain.
  Result<std::string> console_socket(const std::string& name);
  Result<std::string> console_log(const std::string& name);

  // Prometheus text for every running domain.
  std::string metrics();

private:
  struct Running {
    pid_t pid = 0;
    std::unique_ptr<qemu::QmpClient> qmp;
    bool destroying = false;
  };

  std::string run_dir(const std::string& name) const;
  Result<DomainRecord> get(const std::string& name);
  Result<void> check_host_resources(const qemu::DomainDef& def);
  Result<void> resolve_disks(qemu::DomainDef& def);
  // How a launch starts the guest: afresh, or waiting for a saved migration stream (restore),
  // whose guest RAM was private memory or a shared memfd. QEMU loads a stream only into the same
  // RAM layout, so a restore follows what was saved: shared RAM gets vhost-user NICs (when keeld
  // makes them), private RAM keeps taps.
  enum class LaunchFrom { Fresh, SavedPrivateRam, SavedSharedRam };
  Result<void> launch(DomainRecord& rec, bool paused, LaunchFrom from = LaunchFrom::Fresh);
  Result<void> attach(const std::string& name, pid_t pid);
  Result<Running*> running(const std::string& name);
  void on_qemu_exit(const std::string& name, pid_t pid);
  void on_qmp_event(const std::string& name, const qemu::QmpEvent& ev);
  void cleanup_after_stop(const std::string& name, pid_t pid, const std::string& reason);
  Result<void> wait_gone(const std::string& name, pid_t pid, std::chrono::milliseconds timeout);
  Result<std::string> free_hotplug_port(const std::string& name, const DomainRecord& rec);

  DomainManagerConfig cfg_;
  StateStore& store_;
  EventBus& events_;
  StoragePools& pools_;
  Networks& networks_;
  std::string machine_help_;
  qemu::LaunchIdentity identity_;
  bool auto_identity_ = false;
  // The identity of a running domain's QEMU (for hot-plugged images and taps).
  qemu::LaunchIdentity identity_of(pid_t pid) const;

  // One lock for domain operations: they are short (QMP round trips, a fork), and it keeps
  // define/start/destroy of the same name from racing.
  std::recursive_mutex mutex_;
  std::atomic<bool> closing_{false};  // set by the destructor: QMP close callbacks do nothing then
  std::map<std::string, std::unique_ptr<Running>> running_;
  // QMP clients of exited QEMUs; destroyed outside their reader threads.
  std::vector<std::unique_ptr<qemu::QmpClient>> retired_;
};

}  // namespace keel::hostd
