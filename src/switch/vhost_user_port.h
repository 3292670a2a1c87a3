// VhostUserPort: a VM's virtio-net NIC reached over vhost-user (src/vhost's VhostNetPort) as a
// switch Port. Frames move through the guest's shared memory; QEMU is not on the data path.
//
// Two socket modes, named as Open vSwitch names them:
//   server (OVS dpdkvhostuser): the switch listens on the socket and QEMU connects
//     (-chardev socket,path=SOCK). QEMU must reconnect by itself if the switch restarts.
//   client (OVS dpdkvhostuserclient, options:vhost-server-path): QEMU listens
//     (-chardev socket,path=SOCK,server=on) and the switch connects, reconnecting whenever QEMU or
//     the switch restarts: the mode to prefer, since either side can restart.
#pragma once

#include <memory>
#include <string>

#include "base/result.h"
#include "switch/port.h"

namespace keel::sw {

enum class VhostSocketMode { Server, Client };

struct VhostUserPortOptions {
  std::string socket_path;
  VhostSocketMode mode = VhostSocketMode::Server;
  uint16_t queue_pairs = 1;  // the most the guest may enable; frames to the guest go on pair 0
  // Offer the guest checksum and TCP segmentation offload both ways (QEMU's csum/guest_csum/
  // host_tso4/guest_tso4 properties then decide what is used): TCP super-frames of up to 64 KB
  // cross the switch whole instead of as 45 frames each.
  bool offloads = true;
};

Result<std::unique_ptr<Port>> open_vhost_user_port(const VhostUserPortOptions& options);

}  // namespace keel::sw
