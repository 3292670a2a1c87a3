#include "disk/nbd_server.h"

namespace keel::disk {

Result<void> serve_nbd(BlockDevice&, const NbdServerOptions&) {
  return fail(ENOTSUP, "serve: not implemented yet");
}

}  // namespace keel::disk
