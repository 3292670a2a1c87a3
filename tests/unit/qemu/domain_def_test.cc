#include <gtest/gtest.h>

#include "qemu/domain_def.h"

namespace keel::qemu {
namespace {

using nlohmann::json;

json minimal() { return {{"name", "vm"}, {"memory", "256M"}}; }

TEST(DomainDef, ParsesMinimalWithDefaults) {
  auto d = domain_from_json(minimal());
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->name, "vm");
  EXPECT_EQ(d->memory_bytes, 256u << 20);
  EXPECT_EQ(d->vcpus, 1u);
  EXPECT_EQ(d->machine, "q35");
  EXPECT_TRUE(d->serial);
  EXPECT_TRUE(d->ksm);
}

TEST(DomainDef, MemoryAsNumberIsMiB) {
  auto j = minimal();
  j["memory"] = 512;
  auto d = domain_from_json(j);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->memory_bytes, 512u << 20);
}

TEST(DomainDef, ImpossibleMemoryIsRejectedByName) {
  for (json m : {json("0"), json("1M"), json("64T"), json("lots"), json(-5), json(true), json("1.5k")}) {
    auto j = minimal();
    j["memory"] = m;
    auto d = domain_from_json(j);
    ASSERT_FALSE(d) << m.dump();
    EXPECT_NE(d.error().message().find("memory"), std::string::npos) << d.error().message();
  }
}

TEST(DomainDef, UnknownFieldsAreNamed) {
  auto j = minimal();
  j["colour"] = "red";
  auto d = domain_from_json(j);
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message().find("colour: unknown field"), std::string::npos) << d.error().message();
  j = minimal();
  j["disks"] = json::array({{{"path", "/a.qcow2"}, {"cahce", "none"}}});
  d = domain_from_json(j);
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message().find("disks[0].cahce"), std::string::npos) << d.error().message();
}

TEST(DomainDef, EnumErrorsListWhatIsAllowed) {
  auto j = minimal();
  j["disks"] = json::array({{{"path", "/a.qcow2"}, {"cache", "fast"}}});
  auto d = domain_from_json(j);
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().message(), "disks[0].cache: 'fast' is not one of none, writeback, writethrough, directsync, unsafe");
}

TEST(DomainDef, TypeErrors) {
  auto j = minimal();
  j["vcpus"] = "two";
  EXPECT_FALSE(domain_from_json(j));
  j = minimal();
  j["disks"] = json::object();
  EXPECT_FALSE(domain_from_json(j));
  EXPECT_FALSE(domain_from_json(json::array()));
  EXPECT_FALSE(parse_domain_json("{\"name\": "));
  EXPECT_FALSE(parse_domain_json(""));
}

TEST(DomainDef, NamesAndPaths) {
  auto j = minimal();
  j["name"] = "../etc";
  EXPECT_FALSE(domain_from_json(j));
  j = minimal();
  j["disks"] = json::array({{{"path", "relative.qcow2"}}});
  EXPECT_FALSE(domain_from_json(j));
  j = minimal();
  j["disks"] = json::array({{{"path", "/a,b.qcow2"}}});
  EXPECT_FALSE(domain_from_json(j));
  j = minimal();
  j["disks"] = json::array({{{"path", "/a.qcow2"}, {"volume", "p/v"}}});
  EXPECT_FALSE(domain_from_json(j));
  j = minimal();
  j["boot"] = {{"initrd", "/i"}};
  EXPECT_FALSE(domain_from_json(j));
}

TEST(DomainDef, DuplicateIdsAndMacs) {
  auto j = minimal();
  j["nics"] = json::array({{{"mac", "52:54:00:00:00:01"}}, {{"mac", "52:54:00:00:00:01"}}});
  auto d = domain_from_json(j);
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message().find("used twice"), std::string::npos);
  j = minimal();
  j["nics"] = json::array({{{"mac", "01:54:00:00:00:01"}}});
  EXPECT_FALSE(domain_from_json(j));  // multicast
  j = minimal();
  j["disks"] = json::array({{{"path", "/a"}, {"id", "x"}}});
  j["nics"] = json::array({{{"id", "x"}}});
  EXPECT_FALSE(domain_from_json(j));
}

TEST(DomainDef, AssignDefaultsGivesIdsMacsUuid) {
  auto j = minimal();
  j["disks"] = json::array({{{"path", "/a"}}, {{"path", "/b"}, {"id", "vda"}}});
  j["nics"] = json::array({{{"network", "default"}}, json::object()});
  auto d = domain_from_json(j);
  ASSERT_TRUE(d) << d.error().message();
  assign_defaults(*d);
  EXPECT_EQ(d->uuid.size(), 36u);
  EXPECT_EQ(d->disks[0].id, "vdb");  // vda is taken by the second disk
  EXPECT_EQ(d->disks[1].id, "vda");
  EXPECT_EQ(d->nics[0].id, "net0");
  EXPECT_EQ(d->nics[0].kind, NicKind::Network);
  EXPECT_EQ(d->nics[1].kind, NicKind::User);
  EXPECT_EQ(d->nics[0].mac.substr(0, 9), "52:54:00:");
  EXPECT_NE(d->nics[0].mac, d->nics[1].mac);
  EXPECT_TRUE(validate_domain(*d));
}

TEST(DomainDef, RoundTrip) {
  json j = {{"name", "full"},
            {"memory", "1G"},
            {"vcpus", 2},
            {"machine", "pc-q35-7.2"},
            {"cpu", {{"mode", "host-passthrough"}, {"nested", true}}},
            {"hugepages", true},
            {"ksm", false},
            {"boot", {{"kernel", "/k"}, {"initrd", "/i"}, {"cmdline", "console=ttyS0"}, {"firmware", "qboot"}}},
            {"disks", json::array({{{"path", "/d.qcow2"}, {"cache", "none"}, {"readonly", true}}})},
            {"nics", json::array({{{"type", "bridge"}, {"bridge", "br0"}}})},
            {"graphics", {{"type", "vnc"}, {"listen", "127.0.0.1"}, {"port", 5901}}},
            {"rng", true},
            {"balloon", true}};
  auto d = domain_from_json(j);
  ASSERT_TRUE(d) << d.error().message();
  assign_defaults(*d);
  auto again = domain_from_json(domain_to_json(*d));
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_EQ(domain_to_json(*again), domain_to_json(*d));
  EXPECT_EQ(again->cpu.mode, CpuMode::HostPassthrough);
  EXPECT_TRUE(again->cpu.nested);
  EXPECT_FALSE(again->ksm);
  EXPECT_EQ(again->graphics.port, 5901);
}

}  // namespace
}  // namespace keel::qemu

// Every example in examples/ is a valid definition.
#include <dirent.h>

#include "base/unique_fd.h"

namespace keel::qemu {
namespace {
TEST(Examples, AllParse) {
  std::string dir = KEEL_EXAMPLES_DIR;
  DIR* d = ::opendir(dir.c_str());
  ASSERT_NE(d, nullptr) << dir;
  int count = 0;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() < 5 || n.substr(n.size() - 5) != ".json") continue;
    auto text = read_file(dir + "/" + n);
    ASSERT_TRUE(text);
    auto def = parse_domain_json(*text);
    EXPECT_TRUE(def) << n << ": " << def.error().message();
    ++count;
  }
  ::closedir(d);
  EXPECT_GE(count, 10);
}
}  // namespace
}  // namespace keel::qemu
