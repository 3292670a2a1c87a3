#include "qemu/libvirt_xml.h"

#include <set>
#include <sstream>

#include <fmt/format.h>
#include <pugixml.hpp>

namespace keel::qemu {

namespace {

// libvirt's scaled integers: the unit attribute, KiB when absent.
Result<uint64_t> scaled(const pugi::xml_node& n, const char* default_unit, const std::string& field) {
  std::string text = n.text().as_string();
  std::string unit = n.attribute("unit") ? n.attribute("unit").as_string() : default_unit;
  if (text.empty() || text.find_first_not_of("0123456789 \t\n") != std::string::npos)
    return fail_invalid("{}: '{}' is not a number", field, text);
  if (text.size() > 19) return fail_invalid("{}: '{}' is too large", field, text);
  uint64_t v = std::stoull(text);
  static const std::pair<const char*, uint64_t> units[] = {
      {"b", 1}, {"bytes", 1}, {"KB", 1000}, {"k", 1024}, {"KiB", 1024}, {"MB", 1000000}, {"M", 1 << 20},
      {"MiB", 1 << 20}, {"GB", 1000000000}, {"G", 1 << 30}, {"GiB", 1 << 30}, {"TB", 1000000000000ull},
      {"T", 1ull << 40}, {"TiB", 1ull << 40}};
  for (auto& [name, mult] : units) {
    if (unit == name) {
      if (v > UINT64_MAX / mult) return fail_invalid("{}: too large", field);
      return v * mult;
    }
  }
  return fail_invalid("{}: unit '{}' is not one of b, KB, KiB, MB, MiB, GB, GiB, TB, TiB", field, unit);
}

class Importer {
public:
  Result<ImportResult> run(const pugi::xml_node& dom) {
    if (std::string(dom.name()) != "domain") return fail_invalid("root element is <{}>, expected <domain>", dom.name());
    std::string type = dom.attribute("type").as_string();
    if (type != "kvm" && type != "qemu")
      note(fmt::format("domain type '{}': Keel runs QEMU (kvm or tcg, chosen per host)", type));
    for (auto child : dom.children()) {
      if (child.type() != pugi::node_element) continue;
      std::string name = child.name();
      if (name == "name") out_.def.name = child.text().as_string();
      else if (name == "uuid") out_.def.uuid = child.text().as_string();
      else if (name == "memory") out_.def.memory_bytes = TRY(scaled(child, "KiB", "memory"));
      else if (name == "currentMemory") {
        auto cur = TRY(scaled(child, "KiB", "currentMemory"));
        if (out_.def.memory_bytes && cur != out_.def.memory_bytes)
          note("currentMemory: balloon target not supported, the guest gets <memory>");
      } else if (name == "vcpu") {
        auto v = child.text().as_llong(-1);
        if (v < 1 || v > 288) return fail_invalid("vcpu: '{}' is impossible (1 to 288)", child.text().as_string());
        out_.def.vcpus = static_cast<unsigned>(v);
        if (child.attribute("current")) note("vcpu/@current: vCPU hot-plug not supported, all vCPUs are online");
        if (child.attribute("cpuset")) note("vcpu/@cpuset: CPU pinning not supported");
      } else if (name == "os") TRY(os(child));
      else if (name == "cpu") cpu(child);
      else if (name == "memoryBacking") memory_backing(child);
      else if (name == "devices") TRY(devices(child));
      else if (name == "title" || name == "description") note(name + ": not kept");
      else if (name == "features") {
        for (auto f : child.children())
          if (f.type() == pugi::node_element) {
            std::string fn = f.name();
            if (fn == "acpi" || fn == "apic") continue;  // always on in Keel's q35/pc guests
            note("features/" + fn + ": not supported");
          }
      } else if (name == "clock") {
        // UTC is what Keel's guests get; anything else is worth saying.
        std::string offset = child.attribute("offset").as_string();
        if (offset != "utc") note(fmt::format("clock offset='{}': not supported (guests run on UTC)", offset));
        for (auto t : child.children("timer"))
          note(fmt::format("clock/timer name='{}': not supported", t.attribute("name").as_string()));
      } else if (name == "on_poweroff" || name == "on_reboot" || name == "on_crash") {
        std::string v = child.text().as_string();
        bool default_like = (name == "on_poweroff" && v == "destroy") || (name == "on_reboot" && v == "restart") ||
                            (name == "on_crash" && v == "destroy");
        if (!default_like) note(fmt::format("{}: '{}' not supported (Keel: poweroff stops, reboot restarts)", name, v));
      } else {
        note(name + ": not supported");
      }
    }
    if (out_.def.name.empty()) return fail_invalid("name: the domain has no <name>");
    if (out_.def.memory_bytes == 0) return fail_invalid("memory: the domain has no <memory>");
    TRY(validate_domain(out_.def));
    return std::move(out_);
  }

private:
  void note(std::string s) { out_.ignored.push_back(std::move(s)); }

  Result<void> os(const pugi::xml_node& os) {
    for (auto c : os.children()) {
      if (c.type() != pugi::node_element) continue;
      std::string n = c.name();
      if (n == "type") {
        std::string machine = c.attribute("machine").as_string();
        if (!machine.empty()) out_.def.machine = machine;
        std::string arch = c.attribute("arch").as_string();
        if (!arch.empty() && arch != "x86_64") note(fmt::format("os/type/@arch: '{}' not supported (x86_64 only)", arch));
        if (std::string(c.text().as_string()) != "hvm") note(fmt::format("os/type: '{}' not supported (hvm only)", c.text().as_string()));
      } else if (n == "kernel") out_.def.boot.kernel = c.text().as_string();
      else if (n == "initrd") out_.def.boot.initrd = c.text().as_string();
      else if (n == "cmdline") out_.def.boot.cmdline = c.text().as_string();
      else if (n == "boot") note(fmt::format("os/boot dev='{}': boot order not supported (disks boot in order)", c.attribute("dev").as_string()));
      else if (n == "loader" || n == "nvram") note("os/" + n + ": UEFI firmware not supported (SeaBIOS or qboot)");
      else note("os/" + n + ": not supported");
    }
    return ok();
  }

  void cpu(const pugi::xml_node& c) {
    std::string mode = c.attribute("mode").as_string();
    if (mode == "host-passthrough") out_.def.cpu.mode = CpuMode::HostPassthrough;
    else if (mode == "host-model") out_.def.cpu.mode = CpuMode::HostModel;
    else out_.def.cpu.mode = CpuMode::Custom;
    for (auto x : c.children()) {
      if (x.type() != pugi::node_element) continue;
      std::string n = x.name();
      if (n == "model") {
        std::string model = x.text().as_string();
        if (!model.empty()) out_.def.cpu.model = model;
      } else if (n == "feature") {
        std::string fname = x.attribute("name").as_string();
        std::string policy = x.attribute("policy").as_string();
        if ((fname == "vmx" || fname == "svm") && (policy == "require" || policy == "force")) out_.def.cpu.nested = true;
        else note(fmt::format("cpu/feature {} ({}): not supported", fname, policy));
      } else {
        note("cpu/" + n + ": not supported");
      }
    }
  }

  void memory_backing(const pugi::xml_node& m) {
    for (auto x : m.children()) {
      if (x.type() != pugi::node_element) continue;
      std::string n = x.name();
      if (n == "hugepages") out_.def.hugepages = true;
      else if (n == "nosharepages") out_.def.ksm = false;
      else note("memoryBacking/" + n + ": not supported");
    }
  }

  Result<void> devices(const pugi::xml_node& devs) {
    bool serial_seen = false;
    for (auto d : devs.children()) {
      if (d.type() != pugi::node_element) continue;
      std::string n = d.name();
      if (n == "disk") TRY(disk(d));
      else if (n == "interface") TRY(interface(d));
      else if (n == "serial" || n == "console") {
        std::string type = d.attribute("type").as_string();
        if (type != "pty" && !type.empty())
          note(fmt::format("devices/{} type='{}': Keel's serial console is a socket reached through keeld", n, type));
        if (n == "serial" && serial_seen) note("devices/serial: only one serial port, extra ones ignored");
        if (n == "serial") serial_seen = true;
      } else if (n == "graphics") {
        std::string type = d.attribute("type").as_string();
        if (type == "vnc") out_.def.graphics.kind = GraphicsKind::Vnc;
        else if (type == "spice") out_.def.graphics.kind = GraphicsKind::Spice;
        else {
          note(fmt::format("devices/graphics type='{}': not supported (vnc, spice)", type));
          continue;
        }
        std::string listen = d.attribute("listen").as_string();
        if (auto l = d.child("listen"); l && l.attribute("address")) listen = l.attribute("address").as_string();
        if (!listen.empty()) out_.def.graphics.listen = listen;
        int port = d.attribute("port").as_int(-1);
        if (std::string(d.attribute("autoport").as_string()) != "yes" && port >= 5900) out_.def.graphics.port = port;
        if (d.attribute("passwd")) note("devices/graphics/@passwd: passwords not supported, listen on localhost");
      } else if (n == "rng") {
        std::string backend = d.child("backend").text().as_string();
        if (!backend.empty() && backend != "/dev/urandom" && backend != "/dev/random")
          note("devices/rng/backend: only /dev/urandom");
        out_.def.rng = true;
      } else if (n == "memballoon") {
        out_.def.balloon = std::string(d.attribute("model").as_string()) == "virtio";
      } else if (n == "emulator") {
        note(fmt::format("devices/emulator '{}': keeld picks the QEMU binary", d.text().as_string()));
      } else if (n == "controller" || n == "input" || n == "video") {
        std::string type = d.attribute("type").as_string();
        if (type.empty()) type = d.child("model").attribute("type").as_string();
        note(fmt::format("devices/{}{}: implied or not supported", n, type.empty() ? "" : " type='" + type + "'"));
      } else {
        note("devices/" + n + ": not supported");
      }
    }
    out_.def.serial = serial_seen || out_.def.serial;
    return ok();
  }

  Result<void> disk(const pugi::xml_node& d) {
    std::string device = d.attribute("device").as_string();
    std::string type = d.attribute("type").as_string();
    if (device == "cdrom" || device == "floppy" || device == "lun") {
      note(fmt::format("devices/disk device='{}' ({}): not supported", device, d.child("target").attribute("dev").as_string()));
      return ok();
    }
    DiskDef disk;
    auto src = d.child("source");
    if (type == "file") disk.path = src.attribute("file").as_string();
    else if (type == "block") disk.path = src.attribute("dev").as_string();
    else if (type == "volume") {
      disk.volume = fmt::format("{}/{}", src.attribute("pool").as_string(), src.attribute("volume").as_string());
    } else {
      note(fmt::format("devices/disk type='{}' ({}): not supported (file, block, volume)", type,
                       d.child("target").attribute("dev").as_string()));
      return ok();
    }
    if (disk.path.empty() && disk.volume.empty()) {
      note(fmt::format("devices/disk {}: no source, skipped", d.child("target").attribute("dev").as_string()));
      return ok();
    }
    auto drv = d.child("driver");
    std::string fmt_ = drv.attribute("type").as_string();
    if (fmt_ == "raw") disk.format = DiskFormat::Raw;
    else if (fmt_ == "qcow2") disk.format = DiskFormat::Qcow2;
    else if (fmt_.empty()) disk.format = DiskFormat::Raw;  // libvirt's default without a driver type
    else return fail_invalid("devices/disk/driver/@type: '{}' is not one of raw, qcow2", fmt_);
    std::string cache = drv.attribute("cache").as_string();
    if (cache == "none") disk.cache = DiskCache::None;
    else if (cache == "writethrough") disk.cache = DiskCache::Writethrough;
    else if (cache == "directsync") disk.cache = DiskCache::Directsync;
    else if (cache == "unsafe") disk.cache = DiskCache::Unsafe;
    else if (cache == "writeback" || cache == "default" || cache.empty()) disk.cache = DiskCache::Writeback;
    else return fail_invalid("devices/disk/driver/@cache: '{}' is not a cache mode", cache);
    for (auto a : drv.attributes()) {
      std::string an = a.name();
      if (an != "name" && an != "type" && an != "cache") note(fmt::format("devices/disk/driver/@{}: not supported", an));
    }
    auto target = d.child("target");
    std::string bus = target.attribute("bus").as_string();
    std::string dev = target.attribute("dev").as_string();
    if (!bus.empty() && bus != "virtio") note(fmt::format("devices/disk {} bus='{}': becomes virtio", dev, bus));
    // libvirt's target names (vda, sda, hda) are valid Keel ids as they are.
    if (!dev.empty() && isalpha(static_cast<unsigned char>(dev[0]))) disk.id = dev;
    disk.readonly = static_cast<bool>(d.child("readonly"));
    if (d.child("shareable")) note(fmt::format("devices/disk {}/shareable: not supported", dev));
    if (d.child("boot")) note(fmt::format("devices/disk {}/boot: boot order not supported", dev));
    out_.def.disks.push_back(disk);
    return ok();
  }

  Result<void> interface(const pugi::xml_node& i) {
    std::string type = i.attribute("type").as_string();
    NicDef nic;
    if (type == "network") {
      nic.kind = NicKind::Network;
      nic.network = i.child("source").attribute("network").as_string();
    } else if (type == "bridge") {
      nic.kind = NicKind::Bridge;
      nic.bridge = i.child("source").attribute("bridge").as_string();
    } else if (type == "user") {
      nic.kind = NicKind::User;
    } else {
      note(fmt::format("devices/interface type='{}': not supported (network, bridge, user)", type));
      return ok();
    }
    nic.mac = i.child("mac").attribute("address").as_string();
    // libvirt's user aliases ("ua-" prefix) carry Keel's device ids across an export/import.
    std::string alias = i.child("alias").attribute("name").as_string();
    if (alias.rfind("ua-", 0) == 0 && alias.size() > 3) nic.id = alias.substr(3);
    for (auto& c : nic.mac) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
    std::string model = i.child("model").attribute("type").as_string();
    if (!model.empty() && model != "virtio") note(fmt::format("devices/interface model='{}': becomes virtio", model));
    for (auto c : i.children()) {
      if (c.type() != pugi::node_element) continue;
      std::string n = c.name();
      if (n != "source" && n != "mac" && n != "model" && n != "alias") note("devices/interface/" + n + ": not supported");
    }
    out_.def.nics.push_back(nic);
    return ok();
  }

  ImportResult out_;
};

}  // namespace

Result<ImportResult> import_libvirt_xml(std::string_view xml) {
  pugi::xml_document doc;
  auto parsed = doc.load_buffer(xml.data(), xml.size(), pugi::parse_default, pugi::encoding_utf8);
  if (!parsed) return fail_invalid("malformed XML at offset {}: {}", parsed.offset, parsed.description());
  auto dom = doc.document_element();
  if (!dom) return fail_invalid("empty XML document");
  Importer imp;
  return imp.run(dom);
}

std::string export_libvirt_xml(const DomainDef& def) {
  pugi::xml_document doc;
  auto dom = doc.append_child("domain");
  dom.append_attribute("type") = "kvm";
  dom.append_child("name").text() = def.name.c_str();
  if (!def.uuid.empty()) dom.append_child("uuid").text() = def.uuid.c_str();
  auto mem = dom.append_child("memory");
  mem.append_attribute("unit") = "KiB";
  mem.text() = std::to_string(def.memory_bytes >> 10).c_str();
  dom.append_child("vcpu").text() = std::to_string(def.vcpus).c_str();
  if (def.hugepages || !def.ksm) {
    auto mb = dom.append_child("memoryBacking");
    if (def.hugepages) mb.append_child("hugepages");
    if (!def.ksm) mb.append_child("nosharepages");
  }
  auto os = dom.append_child("os");
  auto type = os.append_child("type");
  type.append_attribute("arch") = "x86_64";
  type.append_attribute("machine") = def.machine.c_str();
  type.text() = "hvm";
  if (!def.boot.kernel.empty()) os.append_child("kernel").text() = def.boot.kernel.c_str();
  if (!def.boot.initrd.empty()) os.append_child("initrd").text() = def.boot.initrd.c_str();
  if (!def.boot.cmdline.empty()) os.append_child("cmdline").text() = def.boot.cmdline.c_str();
  auto features = dom.append_child("features");
  features.append_child("acpi");
  features.append_child("apic");
  auto cpu = dom.append_child("cpu");
  cpu.append_attribute("mode") = std::string(to_string(def.cpu.mode)).c_str();
  if (def.cpu.mode == CpuMode::Custom) cpu.append_child("model").text() = def.cpu.model.c_str();
  if (def.cpu.nested) {
    auto f = cpu.append_child("feature");
    f.append_attribute("policy") = "require";
    f.append_attribute("name") = "vmx";
  }
  auto devs = dom.append_child("devices");
  for (auto& d : def.disks) {
    auto disk = devs.append_child("disk");
    disk.append_attribute("type") = d.volume.empty() ? "file" : "volume";
    disk.append_attribute("device") = "disk";
    auto drv = disk.append_child("driver");
    drv.append_attribute("name") = "qemu";
    drv.append_attribute("type") = std::string(to_string(d.format)).c_str();
    drv.append_attribute("cache") = std::string(to_string(d.cache)).c_str();
    auto src = disk.append_child("source");
    if (d.volume.empty()) {
      src.append_attribute("file") = d.path.c_str();
    } else {
      auto slash = d.volume.find('/');
      src.append_attribute("pool") = d.volume.substr(0, slash).c_str();
      src.append_attribute("volume") = d.volume.substr(slash + 1).c_str();
    }
    auto target = disk.append_child("target");
    target.append_attribute("dev") = d.id.c_str();
    target.append_attribute("bus") = "virtio";
    if (d.readonly) disk.append_child("readonly");
  }
  for (auto& n : def.nics) {
    auto iface = devs.append_child("interface");
    iface.append_attribute("type") = std::string(to_string(n.kind)).c_str();
    if (!n.mac.empty()) iface.append_child("mac").append_attribute("address") = n.mac.c_str();
    if (n.kind == NicKind::Network) iface.append_child("source").append_attribute("network") = n.network.c_str();
    if (n.kind == NicKind::Bridge) iface.append_child("source").append_attribute("bridge") = n.bridge.c_str();
    iface.append_child("model").append_attribute("type") = "virtio";
    if (!n.id.empty()) iface.append_child("alias").append_attribute("name") = ("ua-" + n.id).c_str();
  }
  if (def.serial) {
    auto s = devs.append_child("serial");
    s.append_attribute("type") = "pty";
    s.append_child("target").append_attribute("port") = "0";
    auto c = devs.append_child("console");
    c.append_attribute("type") = "pty";
    auto t = c.append_child("target");
    t.append_attribute("type") = "serial";
    t.append_attribute("port") = "0";
  }
  if (def.graphics.kind != GraphicsKind::None) {
    auto g = devs.append_child("graphics");
    g.append_attribute("type") = std::string(to_string(def.graphics.kind)).c_str();
    if (def.graphics.port == -1) {
      g.append_attribute("autoport") = "yes";
    } else {
      g.append_attribute("port") = std::to_string(def.graphics.port).c_str();
    }
    g.append_attribute("listen") = def.graphics.listen.c_str();
  }
  if (def.rng) {
    auto r = devs.append_child("rng");
    r.append_attribute("model") = "virtio";
    auto b = r.append_child("backend");
    b.append_attribute("model") = "random";
    b.text() = "/dev/urandom";
  }
  devs.append_child("memballoon").append_attribute("model") = def.balloon ? "virtio" : "none";
  std::ostringstream out;
  doc.save(out, "  ", pugi::format_default | pugi::format_no_declaration);
  return out.str();
}

}  // namespace keel::qemu
