#include <gtest/gtest.h>

#include <algorithm>

#include "qemu/command_line.h"

namespace keel::qemu {
namespace {

using nlohmann::json;

DomainDef base() {
  auto d = domain_from_json({{"name", "vm"}, {"memory", "256M"}, {"machine", "pc-q35-7.2"}});
  EXPECT_TRUE(d);
  assign_defaults(*d);
  return *d;
}

LaunchConfig config() {
  LaunchConfig c;
  c.qmp_socket = "/run/k/qmp.sock";
  c.console_socket = "/run/k/console.sock";
  c.console_log = "/run/k/console.log";
  return c;
}

// The value after `flag`, for each occurrence.
std::vector<std::string> values(const std::vector<std::string>& argv, const std::string& flag) {
  std::vector<std::string> out;
  for (size_t i = 0; i + 1 < argv.size(); ++i)
    if (argv[i] == flag) out.push_back(argv[i + 1]);
  return out;
}

bool has(const std::vector<std::string>& argv, const std::string& s) {
  return std::find(argv.begin(), argv.end(), s) != argv.end();
}

TEST(CommandLine, Basics) {
  auto argv = build_command_line(base(), config());
  ASSERT_TRUE(argv) << argv.error().message();
  EXPECT_TRUE(has(*argv, "-nodefaults"));
  EXPECT_EQ(values(*argv, "-machine").at(0), "pc-q35-7.2,mem-merge=on");
  EXPECT_EQ(values(*argv, "-accel").at(0), "tcg");
  EXPECT_EQ(values(*argv, "-m").at(0), "256M");
  EXPECT_EQ(values(*argv, "-cpu").at(0), "qemu64");
  EXPECT_EQ(values(*argv, "-sandbox").at(0), "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
  EXPECT_FALSE(has(*argv, "-runas"));  // the uid is dropped before exec instead
  auto chardevs = values(*argv, "-chardev");
  ASSERT_EQ(chardevs.size(), 2u);
  EXPECT_NE(chardevs[1].find("logfile=/run/k/console.log"), std::string::npos);
  EXPECT_EQ(values(*argv, "-device").size(), 4u);  // the hot-plug root ports
  EXPECT_FALSE(has(*argv, "-S"));
}

TEST(CommandLine, CpuModes) {
  auto d = base();
  auto c = config();
  d.cpu.mode = CpuMode::HostPassthrough;
  d.cpu.nested = true;
  EXPECT_EQ(values(*build_command_line(d, c), "-cpu").at(0), "max");  // TCG: no host CPU, no nesting
  c.accel = Accelerator::Kvm;
  EXPECT_EQ(values(*build_command_line(d, c), "-cpu").at(0), "host,+vmx");
  c.host_has_vmx = false;
  EXPECT_EQ(values(*build_command_line(d, c), "-cpu").at(0), "host,+svm");
  EXPECT_EQ(values(*build_command_line(d, c), "-accel").at(0), "kvm");
}

TEST(CommandLine, MemoryOptions) {
  auto d = base();
  d.hugepages = true;
  d.ksm = false;
  auto argv = *build_command_line(d, config());
  EXPECT_EQ(values(argv, "-machine").at(0), "pc-q35-7.2,mem-merge=off,memory-backend=mem0");
  EXPECT_NE(values(argv, "-object").at(0).find("mem-path=/dev/hugepages"), std::string::npos);
}

TEST(CommandLine, DisksAndCacheModes) {
  auto d = base();
  d.disks.push_back(DiskDef{"vda", "/img/a.qcow2", "", DiskFormat::Qcow2, DiskCache::None, false});
  d.disks.push_back(DiskDef{"vdb", "/img/b.raw", "", DiskFormat::Raw, DiskCache::Writethrough, true});
  d.disks.push_back(DiskDef{"vdc", "/img/c.raw", "", DiskFormat::Raw, DiskCache::Unsafe, false});
  auto argv = *build_command_line(d, config());
  auto blockdevs = values(argv, "-blockdev");
  ASSERT_EQ(blockdevs.size(), 3u);
  auto a = json::parse(blockdevs[0]);
  EXPECT_EQ(a["driver"], "qcow2");
  EXPECT_EQ(a["file"]["filename"], "/img/a.qcow2");
  EXPECT_EQ(a["cache"]["direct"], true);
  auto b = json::parse(blockdevs[1]);
  EXPECT_EQ(b["driver"], "raw");
  EXPECT_EQ(b["read-only"], true);
  EXPECT_EQ(b["cache"]["direct"], false);
  EXPECT_EQ(json::parse(blockdevs[2])["cache"]["no-flush"], true);
  auto devices = values(argv, "-device");
  EXPECT_EQ(json::parse(devices[0])["write-cache"], "on");
  EXPECT_EQ(json::parse(devices[1])["write-cache"], "off");
  EXPECT_EQ(json::parse(devices[0])["driver"], "virtio-blk-pci");
}

TEST(CommandLine, NicsNeedTaps) {
  auto d = base();
  d.nics.push_back(NicDef{"net0", NicKind::Network, "default", "", "52:54:00:00:00:01"});
  d.nics.push_back(NicDef{"net1", NicKind::User, "", "", "52:54:00:00:00:02"});
  auto c = config();
  EXPECT_FALSE(build_command_line(d, c));  // no tap prepared
  c.nic_backends = {NicBackend{NicBackendType::Tap, "kt1234-0", ""}};
  auto argv = *build_command_line(d, c);
  auto netdevs = values(argv, "-netdev");
  ASSERT_EQ(netdevs.size(), 2u);
  EXPECT_EQ(netdevs[0], "tap,id=hostnet-net0,ifname=kt1234-0,script=no,downscript=no");
  EXPECT_EQ(netdevs[1], "user,id=hostnet-net1");
  auto nic = json::parse(values(argv, "-device").at(0));
  EXPECT_EQ(nic["driver"], "virtio-net-pci");
  EXPECT_EQ(nic["mac"], "52:54:00:00:00:01");
  EXPECT_EQ(nic["romfile"], "");
  EXPECT_FALSE(nic.contains("vectors"));
  // Private memory: nothing but a tap needs to reach it.
  EXPECT_EQ(values(argv, "-machine").at(0), "pc-q35-7.2,mem-merge=on");
  EXPECT_TRUE(values(argv, "-object").empty());
}

TEST(CommandLine, VhostUserNicSharesGuestMemory) {
  auto d = base();
  d.nics.push_back(NicDef{"net0", NicKind::Network, "default", "", "52:54:00:00:00:01"});
  d.nics.push_back(NicDef{"net1", NicKind::Network, "default", "", "52:54:00:00:00:02"});
  auto c = config();
  c.nic_backends = {NicBackend{NicBackendType::VhostUser, "", "/run/k/net0.vhost"},
                    NicBackend{NicBackendType::Tap, "kt1234-1", ""}};
  auto argv = *build_command_line(d, c);
  // The switch maps guest memory: a shared memfd the size of -m is the machine's RAM.
  EXPECT_EQ(values(argv, "-machine").at(0), "pc-q35-7.2,mem-merge=on,memory-backend=mem0");
  EXPECT_EQ(values(argv, "-object").at(0), "memory-backend-memfd,id=mem0,size=256M,share=on");
  EXPECT_EQ(values(argv, "-m").at(0), "256M");
  auto chardevs = values(argv, "-chardev");
  ASSERT_EQ(chardevs.size(), 3u);
  EXPECT_EQ(chardevs[2], "socket,id=charnet-net0,path=/run/k/net0.vhost,server=on,wait=off");
  auto netdevs = values(argv, "-netdev");
  ASSERT_EQ(netdevs.size(), 2u);
  EXPECT_EQ(netdevs[0], "vhost-user,id=hostnet-net0,chardev=charnet-net0");
  EXPECT_EQ(netdevs[1], "tap,id=hostnet-net1,ifname=kt1234-1,script=no,downscript=no");
  auto devices = values(argv, "-device");
  auto vhost_nic = json::parse(devices.at(0));
  EXPECT_EQ(vhost_nic["netdev"], "hostnet-net0");
  EXPECT_EQ(vhost_nic["vectors"], 0);  // TCG: MSI-X on a vhost-user NIC crashes QEMU 7.2
  EXPECT_FALSE(json::parse(devices.at(1)).contains("vectors"));
  // KVM keeps MSI-X.
  c.accel = Accelerator::Kvm;
  argv = *build_command_line(d, c);
  EXPECT_FALSE(json::parse(values(argv, "-device").at(0)).contains("vectors"));
  // Hugepages are shared already: that backend stays.
  d.hugepages = true;
  argv = *build_command_line(d, c);
  ASSERT_EQ(values(argv, "-object").size(), 1u);
  EXPECT_NE(values(argv, "-object").at(0).find("memory-backend-file,id=mem0"), std::string::npos);
  // A vhost-user backend without a socket is an error, not a broken command line.
  c.nic_backends[0].socket.clear();
  EXPECT_FALSE(build_command_line(d, c));
}

TEST(CommandLine, NicHotplugArguments) {
  NicDef user{"net0", NicKind::User, "", "", "52:54:00:00:00:01"};
  NicDef net{"net1", NicKind::Network, "default", "", "52:54:00:00:00:02"};
  NicBackend tap{NicBackendType::Tap, "kt1234-1", ""};
  NicBackend vhost{NicBackendType::VhostUser, "", "/run/k/net1.vhost"};
  EXPECT_EQ(netdev_add_args(user, tap), json({{"type", "user"}, {"id", "hostnet-net0"}}));
  EXPECT_EQ(netdev_add_args(net, tap)["ifname"], "kt1234-1");
  EXPECT_EQ(netdev_add_args(net, vhost),
            json({{"type", "vhost-user"}, {"id", "hostnet-net1"}, {"chardev", "charnet-net1"}}));
  auto chardev = chardev_add_args(net, "/run/k/net1.vhost");
  EXPECT_EQ(chardev["id"], "charnet-net1");
  EXPECT_EQ(chardev["backend"]["type"], "socket");
  EXPECT_EQ(chardev["backend"]["data"]["addr"], json({{"type", "unix"}, {"data", {{"path", "/run/k/net1.vhost"}}}}));
  EXPECT_EQ(chardev["backend"]["data"]["server"], true);
  EXPECT_EQ(chardev["backend"]["data"]["wait"], false);
  auto dev = nic_device_args(net, "hotplug0", vhost, Accelerator::Tcg);
  EXPECT_EQ(dev["bus"], "hotplug0");
  EXPECT_EQ(dev["vectors"], 0);
  EXPECT_FALSE(nic_device_args(net, "hotplug0", tap, Accelerator::Tcg).contains("vectors"));
  EXPECT_FALSE(nic_device_args(user, "", vhost, Accelerator::Tcg).contains("vectors"));
}

TEST(CommandLine, DisplayRngBalloonBoot) {
  auto d = base();
  d.graphics.kind = GraphicsKind::Vnc;
  d.rng = true;
  d.balloon = true;
  d.boot.kernel = "/k";
  d.boot.initrd = "/i";
  d.boot.cmdline = "console=ttyS0";
  d.boot.firmware = "qboot";
  auto argv = *build_command_line(d, config());
  EXPECT_EQ(values(argv, "-vnc").at(0), "127.0.0.1:0,to=99");
  EXPECT_EQ(values(argv, "-kernel").at(0), "/k");
  EXPECT_EQ(values(argv, "-append").at(0), "console=ttyS0");
  EXPECT_EQ(values(argv, "-bios").at(0), "/usr/share/qemu/qboot.rom");
  EXPECT_TRUE(has(argv, "virtio-balloon-pci,id=balloon0"));
  EXPECT_TRUE(has(argv, "virtio-rng-pci,rng=objrng0,id=rng0"));
  d.graphics.kind = GraphicsKind::Spice;
  d.graphics.port = 5905;
  argv = *build_command_line(d, config());
  EXPECT_EQ(values(argv, "-spice").at(0), "port=5905,addr=127.0.0.1,disable-ticketing=on");
}

TEST(CommandLine, RestoreWaitsForIncoming) {
  auto c = config();
  c.incoming_defer = true;
  auto argv = *build_command_line(base(), c);
  EXPECT_TRUE(has(argv, "-S"));
  EXPECT_EQ(values(argv, "-incoming").at(0), "defer");
}

TEST(CommandLine, MachineTypeResolution) {
  std::string help = "Supported machines are:\n"
                     "microvm              microvm (i386)\n"
                     "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
                     "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
                     "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
                     "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
                     "pc-q35-6.2           Standard PC (Q35 + ICH9, 2009)\n";
  EXPECT_EQ(*resolve_machine_type("q35", help), "pc-q35-7.2");
  EXPECT_EQ(*resolve_machine_type("pc", help), "pc-i440fx-7.2");
  EXPECT_EQ(*resolve_machine_type("pc-q35-6.2", help), "pc-q35-6.2");
  EXPECT_EQ(*resolve_machine_type("microvm", help), "microvm");
  auto bad = resolve_machine_type("pc-q35-99", help);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message().find("machine"), std::string::npos);
}

}  // namespace
}  // namespace keel::qemu
