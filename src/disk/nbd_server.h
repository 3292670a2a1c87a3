// An NBD server over a BlockDevice, as qemu-nbd serves one: newstyle fixed handshake, NBD_OPT_GO
// (and EXPORT_NAME, LIST, INFO), structured replies, and block status (base:allocation) so clients
// see holes and zeros.
#pragma once

#include <string>

#include "disk/block_device.h"

namespace keel::disk {

struct NbdServerOptions {
  std::string socket_path;  // unix socket, or
  int port = 0;             // TCP on 127.0.0.1
  bool read_only = false;
  int max_clients = 1;      // --shared: clients served at once
  bool persistent = false;  // keep serving after the last client leaves
  std::string export_name;  // the one export; any name is accepted when empty
};

// Serves until the last client disconnects (or forever when persistent), or SIGINT/SIGTERM.
Result<void> serve_nbd(BlockDevice& device, const NbdServerOptions& options);

}  // namespace keel::disk
