// sysprep: prepares a guest image to be cloned, as virt-sysprep does. Each operation is listed,
// described and selectable; the default set is every operation marked default.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "guestfs/guest.h"

namespace keel::guestfs {

struct SysprepOptions {
  std::optional<std::string> hostname;       // set this hostname (the hostname operation)
  std::optional<std::string> root_password;  // set root's password (the root-password operation)
  std::vector<std::string> operations;       // empty: the defaults
  bool dry_run = false;
};

struct SysprepOperation {
  std::string name;
  std::string description;
  bool enabled_by_default;
};

const std::vector<SysprepOperation>& sysprep_operations();

// Runs the selected operations on the mounted guest; `log` receives one line per action.
Result<void> run_sysprep(Guest& guest, const SysprepOptions& options,
                         const std::function<void(const std::string&)>& log);

// A SHA-512 crypt(3) hash of a password, with a fresh random salt.
Result<std::string> hash_password(const std::string& password);

}  // namespace keel::guestfs
