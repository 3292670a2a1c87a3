#include "qemu/command_line.h"

#include <algorithm>
#include <sstream>

#include <fmt/format.h>

namespace keel::qemu {

using nlohmann::json;

namespace {

struct CacheFlags {
  bool direct;
  bool no_flush;
  bool write_cache;
};

// The same mapping libvirt uses from a cache mode to QEMU's three knobs.
CacheFlags cache_flags(DiskCache c) {
  switch (c) {
    case DiskCache::None: return {true, false, true};
    case DiskCache::Writeback: return {false, false, true};
    case DiskCache::Writethrough: return {false, false, false};
    case DiskCache::Directsync: return {true, false, false};
    case DiskCache::Unsafe: return {false, true, true};
  }
  return {false, false, true};
}

std::string file_node(const DiskDef& d) { return "file-" + d.id; }
std::string format_node(const DiskDef& d) { return "fmt-" + d.id; }

std::string cpu_option(const DomainDef& def, const LaunchConfig& cfg) {
  bool kvm = cfg.accel == Accelerator::Kvm;
  std::string cpu;
  switch (def.cpu.mode) {
    case CpuMode::HostPassthrough: cpu = kvm ? "host" : "max"; break;
    case CpuMode::HostModel: cpu = kvm ? "host" : "max"; break;
    case CpuMode::Custom: cpu = def.cpu.model; break;
  }
  // Nested virtualization only means something with KVM underneath.
  if (def.cpu.nested && kvm) cpu += cfg.host_has_vmx ? ",+vmx" : ",+svm";
  return cpu;
}

}  // namespace

std::string hotplug_port_id(int n) { return fmt::format("hotplug{}", n); }

std::string nic_netdev_id(const NicDef& n) { return "hostnet-" + n.id; }
std::string nic_chardev_id(const NicDef& n) { return "charnet-" + n.id; }

json blockdev_add_args(const DiskDef& d) {
  CacheFlags cf = cache_flags(d.cache);
  json file = {{"driver", "file"},
               {"filename", d.path},
               {"node-name", file_node(d)},
               {"cache", {{"direct", cf.direct}, {"no-flush", cf.no_flush}}},
               {"read-only", d.readonly},
               {"auto-read-only", true},
               {"discard", "unmap"}};
  return {{"node-name", format_node(d)},
          {"driver", std::string(to_string(d.format))},
          {"file", file},
          {"cache", {{"direct", cf.direct}, {"no-flush", cf.no_flush}}},
          {"read-only", d.readonly}};
}

json disk_device_args(const DiskDef& d, const std::string& bus) {
  json j = {{"driver", "virtio-blk-pci"},
            {"drive", format_node(d)},
            {"id", d.id},
            {"write-cache", cache_flags(d.cache).write_cache ? "on" : "off"}};
  if (!bus.empty()) j["bus"] = bus;
  return j;
}

json chardev_add_args(const NicDef& n, const std::string& socket) {
  // server=on, wait=off: QEMU listens and keel-switch connects (and reconnects after either restarts).
  json addr = {{"type", "unix"}, {"data", {{"path", socket}}}};
  return {{"id", nic_chardev_id(n)},
          {"backend", {{"type", "socket"}, {"data", {{"addr", addr}, {"server", true}, {"wait", false}}}}}};
}

json netdev_add_args(const NicDef& n, const NicBackend& backend) {
  if (n.kind == NicKind::User) return {{"type", "user"}, {"id", nic_netdev_id(n)}};
  if (backend.type == NicBackendType::VhostUser)
    return {{"type", "vhost-user"}, {"id", nic_netdev_id(n)}, {"chardev", nic_chardev_id(n)}};
  return {{"type", "tap"}, {"id", nic_netdev_id(n)}, {"ifname", backend.tap}, {"script", "no"}, {"downscript", "no"}};
}

json nic_device_args(const NicDef& n, const std::string& bus, const NicBackend& backend, Accelerator accel) {
  // No option ROM: guests boot from disks or a kernel, never PXE, and qboot hangs on the ROM.
  json j = {{"driver", "virtio-net-pci"}, {"netdev", nic_netdev_id(n)}, {"id", n.id}, {"mac", n.mac}, {"romfile", ""}};
  // INTx instead of MSI-X: QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers when a
  // vhost-user virtio-net-pci with MSI-X vectors starts. KVM keeps MSI-X.
  if (n.kind != NicKind::User && backend.type == NicBackendType::VhostUser && accel == Accelerator::Tcg) j["vectors"] = 0;
  if (!bus.empty()) j["bus"] = bus;
  return j;
}

Result<std::vector<std::string>> build_command_line(const DomainDef& def, const LaunchConfig& cfg) {
  std::vector<std::string> a;
  auto add = [&](std::initializer_list<std::string> items) { a.insert(a.end(), items); };
  bool q35 = def.machine.find("q35") != std::string::npos;

  add({cfg.qemu_binary, "-name", fmt::format("guest={},debug-threads=on", def.name), "-uuid", def.uuid});
  add({"-nodefaults", "-no-user-config", "-msg", "timestamp=on"});
  bool shared_memory = cfg.shared_memory ||
                       std::any_of(cfg.nic_backends.begin(), cfg.nic_backends.end(),
                                   [](const NicBackend& b) { return b.type == NicBackendType::VhostUser; });
  std::string machine = fmt::format("{},mem-merge={}", def.machine, def.ksm ? "on" : "off");
  if (def.hugepages || shared_memory) machine += ",memory-backend=mem0";
  add({"-machine", machine, "-accel", std::string(accel_name(cfg.accel))});
  add({"-cpu", cpu_option(def, cfg)});
  uint64_t mib = def.memory_bytes >> 20;
  add({"-m", fmt::format("{}M", mib)});
  if (def.hugepages)
    add({"-object", fmt::format("memory-backend-file,id=mem0,size={}M,mem-path=/dev/hugepages,share=on,prealloc=on", mib)});
  else if (shared_memory)
    // keel-switch maps guest memory to reach the virtqueues: it must be a shared file (a memfd).
    add({"-object", fmt::format("memory-backend-memfd,id=mem0,size={}M,share=on", mib)});
  add({"-smp", fmt::format("{},sockets=1,cores={},threads=1", def.vcpus, def.vcpus)});

  if (def.boot.firmware == "qboot") add({"-bios", "/usr/share/qemu/qboot.rom"});
  if (!def.boot.kernel.empty()) add({"-kernel", def.boot.kernel});
  if (!def.boot.initrd.empty()) add({"-initrd", def.boot.initrd});
  if (!def.boot.cmdline.empty()) add({"-append", def.boot.cmdline});

  switch (def.graphics.kind) {
    case GraphicsKind::None: add({"-display", "none"}); break;
    case GraphicsKind::Vnc: {
      int display = def.graphics.port == -1 ? 0 : def.graphics.port - 5900;
      std::string vnc = fmt::format("{}:{}", def.graphics.listen, display);
      if (def.graphics.port == -1) vnc += ",to=99";
      add({"-display", "none", "-vnc", vnc, "-device", "VGA,id=video0"});
      break;
    }
    case GraphicsKind::Spice: {
      int port = def.graphics.port == -1 ? 5900 : def.graphics.port;
      add({"-display", "none", "-spice", fmt::format("port={},addr={},disable-ticketing=on", port, def.graphics.listen),
           "-device", "qxl-vga,id=video0"});
      break;
    }
  }

  add({"-chardev", fmt::format("socket,id=charmonitor,path={},server=on,wait=off", cfg.qmp_socket),
       "-mon", "chardev=charmonitor,id=monitor,mode=control"});
  if (def.serial) {
    // logfile= keeps the console's output even while nobody (not even keeld) is connected.
    add({"-chardev", fmt::format("socket,id=charserial0,path={},server=on,wait=off,logfile={},logappend=on",
                                 cfg.console_socket, cfg.console_log),
         "-serial", "chardev:charserial0"});
  }

  for (auto& d : def.disks) {
    if (d.path.empty()) return fail_invalid("disk {}: no image path (volume not resolved)", d.id);
    add({"-blockdev", blockdev_add_args(d).dump(), "-device", disk_device_args(d, "").dump()});
  }
  size_t backend_index = 0;
  for (auto& n : def.nics) {
    NicBackend backend;
    if (n.kind != NicKind::User) {
      if (backend_index >= cfg.nic_backends.size()) return fail_invalid("nic {}: no host side prepared", n.id);
      backend = cfg.nic_backends[backend_index++];
    }
    std::string netdev = fmt::format("user,id={}", nic_netdev_id(n));
    if (n.kind != NicKind::User && backend.type == NicBackendType::VhostUser) {
      if (backend.socket.empty()) return fail_invalid("nic {}: no vhost-user socket path", n.id);
      add({"-chardev", fmt::format("socket,id={},path={},server=on,wait=off", nic_chardev_id(n), backend.socket)});
      netdev = fmt::format("vhost-user,id={},chardev={}", nic_netdev_id(n), nic_chardev_id(n));
    } else if (n.kind != NicKind::User) {
      if (backend.tap.empty()) return fail_invalid("nic {}: no tap device prepared", n.id);
      netdev = fmt::format("tap,id={},ifname={},script=no,downscript=no", nic_netdev_id(n), backend.tap);
    }
    add({"-netdev", netdev, "-device", nic_device_args(n, "", backend, cfg.accel).dump()});
  }
  if (def.rng) add({"-object", "rng-random,id=objrng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=objrng0,id=rng0"});
  if (def.balloon) add({"-device", "virtio-balloon-pci,id=balloon0"});
  if (q35) {
    for (int i = 0; i < cfg.hotplug_ports; ++i)
      add({"-device", fmt::format("pcie-root-port,id={},chassis={},bus=pcie.0", hotplug_port_id(i), i + 1)});
  }

  if (cfg.sandbox) add({"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"});
  if (!cfg.pidfile.empty()) add({"-pidfile", cfg.pidfile});
  if (cfg.start_paused || cfg.incoming_defer) add({"-S"});
  if (cfg.incoming_defer) add({"-incoming", "defer"});
  return a;
}

Result<std::string> resolve_machine_type(const std::string& requested, const std::string& machine_help) {
  std::istringstream in(machine_help);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string name;
    words >> name;
    if (name != requested) continue;
    auto alias = line.find("(alias of ");
    if (alias != std::string::npos) {
      auto start = alias + 10;
      auto end = line.find(')', start);
      if (end != std::string::npos) return line.substr(start, end - start);
    }
    return requested;
  }
  return fail_invalid("machine: '{}' is not a machine type this QEMU knows (e.g. q35, pc, pc-q35-7.2)", requested);
}

}  // namespace keel::qemu
