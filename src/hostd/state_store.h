// StateStore: keeld's persistent state in SQLite (WAL; every change is one transaction, so a SIGKILL
// at any moment leaves either the old or the new row, never half of one or two).
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace keel::hostd {

struct DomainRecord {
  std::string name;
  std::string uuid;
  nlohmann::json definition;  // Keel JSON format, defaults assigned, machine type resolved
  // Runtime: the QEMU pid while it runs (0 when shut off) and what keeld last knew.
  int64_t pid = 0;
  std::string state = "shutoff";  // shutoff | running | paused
  // Devices hot-plugged into the running guest (Keel JSON disk/nic objects), kept so a re-attached
  // keeld knows them; cleared at shutdown.
  nlohmann::json live = nlohmann::json::object();
};

struct PoolRecord {
  std::string name;
  std::string path;
  std::string type = "dir";
};

struct NetworkRecord {
  std::string name;
  nlohmann::json definition;
  bool active = false;
};

class StateStore {
public:
  static Result<std::unique_ptr<StateStore>> open(const std::string& path);
  ~StateStore();

  Result<void> insert_domain(const DomainRecord& r);   // fails with EEXIST on a duplicate name/uuid
  Result<void> update_domain(const DomainRecord& r);   // by name
  Result<void> delete_domain(const std::string& name);
  // Only the run state column (QMP events update it without touching the rest of the row).
  Result<void> set_domain_state(const std::string& name, const std::string& state);
  Result<std::optional<DomainRecord>> get_domain(const std::string& name);
  Result<std::vector<DomainRecord>> list_domains();

  Result<void> insert_pool(const PoolRecord& r);
  Result<void> delete_pool(const std::string& name);
  Result<std::vector<PoolRecord>> list_pools();

  // The format each volume was made in, by pool and volume name (volumes are files in the pool's
  // directory; this only remembers how to open them).
  Result<void> set_volume_format(const std::string& pool, const std::string& volume, const std::string& format);
  Result<std::optional<std::string>> volume_format(const std::string& pool, const std::string& volume);
  Result<void> forget_volume(const std::string& pool, const std::string& volume);

  Result<void> upsert_network(const NetworkRecord& r);
  Result<void> delete_network(const std::string& name);
  Result<std::vector<NetworkRecord>> list_networks();

private:
  explicit StateStore(sqlite3* db) : db_(db) {}
  Result<void> exec(const std::string& sql);

  sqlite3* db_;
  std::mutex mutex_;
};

}  // namespace keel::hostd
