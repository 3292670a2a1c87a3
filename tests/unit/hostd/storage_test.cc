// Storage pools and volumes, run against both volume backends (Keel's disk library and qemu-img),
// with real qemu-img as the judge of what the disk library writes.
#include <gtest/gtest.h>

#include <stdlib.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "base/process.h"
#include "base/unique_fd.h"
#include "disk/image.h"
#include "hostd/event_bus.h"
#include "hostd/state_store.h"
#include "hostd/storage.h"

namespace keel::hostd {
namespace {

class StorageTest : public ::testing::TestWithParam<std::string> {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/keel-hostd-storage-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto s = StateStore::open(dir_ + "/db");
    ASSERT_TRUE(s) << s.error().message();
    store_ = std::move(*s);
    auto backend = make_volume_backend(GetParam());
    ASSERT_TRUE(backend) << backend.error().message();
    pools_ = std::make_unique<StoragePools>(*store_, std::move(*backend));
    ASSERT_TRUE(pools_->ensure_default(dir_ + "/images"));
  }
  void TearDown() override { (void)run_command({"rm", "-rf", dir_}); }

  std::string vol(const std::string& name) const { return dir_ + "/images/" + name; }

  // `qemu-img check` on a qcow2 volume: no corruptions, no leaks.
  void expect_qemu_img_check_clean(const std::string& name) {
    auto out = run_command({"qemu-img", "check", "-q", vol(name)});
    ASSERT_TRUE(out);
    EXPECT_EQ(out->exit_code, 0) << name << ": " << out->out << out->err;
  }
  nlohmann::json qemu_img_info(const std::string& name) {
    auto out = run_command({"qemu-img", "info", "--output=json", "-U", vol(name)});
    if (!out || out->exit_code != 0) return {};
    return nlohmann::json::parse(out->out, nullptr, false);
  }
  // Writes `data` at `offset` of the guest-visible disk through the disk library.
  void write_guest(const std::string& name, uint64_t offset, const std::string& data) {
    auto dev = disk::open_image(vol(name), disk::OpenMode::ReadWrite);
    ASSERT_TRUE(dev) << dev.error().message();
    ASSERT_TRUE((*dev)->write(offset, {reinterpret_cast<const uint8_t*>(data.data()), data.size()}));
    ASSERT_TRUE((*dev)->flush());
  }
  std::string read_guest(const std::string& name, uint64_t offset, size_t length) {
    auto dev = disk::open_image(vol(name), disk::OpenMode::ReadOnly);
    if (!dev) return "open failed: " + dev.error().message();
    std::string out(length, '\0');
    if (!(*dev)->read(offset, {reinterpret_cast<uint8_t*>(out.data()), out.size()})) return "read failed";
    return out;
  }

  std::string dir_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<StoragePools> pools_;
};

TEST_P(StorageTest, Volumes) {
  auto& pools = *pools_;
  ASSERT_TRUE(pools.ensure_default(dir_ + "/images"));  // idempotent
  ASSERT_TRUE(pools.create_volume("default", "base", "qcow2", 64 << 20));
  EXPECT_EQ(pools.create_volume("default", "base", "qcow2", 1 << 20).error().code(), EEXIST);
  EXPECT_FALSE(pools.create_volume("default", "x", "vmdk", 1 << 20));
  EXPECT_FALSE(pools.create_volume("default", "../escape", "raw", 1 << 20));
  EXPECT_EQ(pools.create_volume("nopool", "x", "raw", 1 << 20).error().code(), ENOENT);
  auto info = pools.volume_info("default", "base");
  ASSERT_TRUE(info) << info.error().message();
  EXPECT_EQ((*info)["format"], "qcow2");
  EXPECT_EQ((*info)["capacity"], 64u << 20);
  expect_qemu_img_check_clean("base");

  ASSERT_TRUE(pools.clone_volume("default", "base", "overlay", "overlay"));
  auto ov = pools.volume_info("default", "overlay");
  ASSERT_TRUE(ov);
  EXPECT_EQ((*ov)["backing"], dir_ + "/images/base");
  EXPECT_EQ((*ov)["capacity"], 64u << 20);
  ASSERT_TRUE(pools.clone_volume("default", "base", "copy", "copy"));
  EXPECT_FALSE((*pools.volume_info("default", "copy")).contains("backing"));
  EXPECT_FALSE(pools.clone_volume("default", "base", "other", "sideways"));

  ASSERT_TRUE(pools.resize_volume("default", "copy", 128 << 20));
  EXPECT_EQ((*pools.volume_info("default", "copy"))["capacity"], 128u << 20);

  ASSERT_TRUE(pools.create_volume("default", "blob", "raw", 4096));
  std::string data(4096, 'k');
  ASSERT_TRUE(pools.upload("default", "blob", data));
  EXPECT_EQ(*pools.download("default", "blob"), data);

  auto list = pools.list_volumes("default");
  ASSERT_TRUE(list);
  EXPECT_EQ(list->size(), 4u);
  auto resolved = pools.resolve("default/overlay");
  ASSERT_TRUE(resolved);
  EXPECT_EQ(resolved->second, "qcow2");
  ASSERT_TRUE(pools.delete_volume("default", "blob"));
  EXPECT_EQ(pools.delete_volume("default", "blob").error().code(), ENOENT);

  ASSERT_TRUE(pools.define_pool("second", dir_ + "/second"));
  EXPECT_EQ(pools.define_pool("second", dir_ + "/third").error().code(), EEXIST);
  EXPECT_FALSE(pools.define_pool("rel", "relative/path"));
  EXPECT_EQ((*pools.list_pools()).size(), 2u);
  ASSERT_TRUE(pools.undefine_pool("second"));
}

// What qemu-img reads in the images matches what the disk library wrote, and the reverse.
TEST_P(StorageTest, ClonesKeepGuestDataAndPassQemuImgCheck) {
  auto& pools = *pools_;
  ASSERT_TRUE(pools.create_volume("default", "base", "qcow2", 32 << 20));
  write_guest("base", 0, "boot sector");
  write_guest("base", 20 << 20, "far away");
  ASSERT_TRUE(pools.create_volume("default", "rawbase", "raw", 8 << 20));
  write_guest("rawbase", 4 << 20, "raw data");

  ASSERT_TRUE(pools.clone_volume("default", "base", "child", "overlay"));
  write_guest("child", 1 << 20, "child only");
  EXPECT_EQ(read_guest("child", 0, 11), "boot sector");
  EXPECT_EQ(read_guest("base", 1 << 20, 10), std::string(10, '\0'));
  auto qi = qemu_img_info("child");
  EXPECT_EQ(qi.value("backing-filename", ""), vol("base"));
  EXPECT_EQ(qi.value("backing-filename-format", ""), "qcow2");

  // A full copy of the overlay flattens the chain.
  ASSERT_TRUE(pools.clone_volume("default", "child", "flat", "copy"));
  EXPECT_EQ(read_guest("flat", 0, 11), "boot sector");
  EXPECT_EQ(read_guest("flat", 1 << 20, 10), "child only");
  EXPECT_EQ(read_guest("flat", 20 << 20, 8), "far away");
  EXPECT_EQ(qemu_img_info("flat").count("backing-filename"), 0u);
  auto cmp = run_command({"qemu-img", "compare", "-q", vol("child"), vol("flat")});
  ASSERT_TRUE(cmp);
  EXPECT_EQ(cmp->exit_code, 0) << cmp->out << cmp->err;

  // Overlay on a raw volume: the backing format is recorded.
  ASSERT_TRUE(pools.clone_volume("default", "rawbase", "rawchild", "overlay"));
  EXPECT_EQ(qemu_img_info("rawchild").value("backing-filename-format", ""), "raw");
  EXPECT_EQ(read_guest("rawchild", 4 << 20, 8), "raw data");
  ASSERT_TRUE(pools.clone_volume("default", "rawbase", "rawcopy", "copy"));
  EXPECT_EQ((*pools.volume_info("default", "rawcopy"))["format"], "raw");
  EXPECT_EQ(read_guest("rawcopy", 4 << 20, 8), "raw data");
  cmp = run_command({"qemu-img", "compare", "-q", vol("rawbase"), vol("rawcopy")});
  ASSERT_TRUE(cmp);
  EXPECT_EQ(cmp->exit_code, 0) << cmp->out << cmp->err;

  for (auto* name : {"base", "child", "flat", "rawchild"}) expect_qemu_img_check_clean(name);
}

TEST_P(StorageTest, FullCopySkipsHoles) {
  auto& pools = *pools_;
  ASSERT_TRUE(pools.create_volume("default", "sparse", "raw", 256 << 20));
  write_guest("sparse", 100 << 20, std::string(4096, 'x'));
  // Zeros written as data (allocated in the source): the copy leaves them unallocated too.
  write_guest("sparse", 10 << 20, std::string(8 << 20, '\0'));
  write_guest("sparse", 13 << 20, "island");
  ASSERT_TRUE(pools.clone_volume("default", "sparse", "sparsecopy", "copy"));
  auto info = pools.volume_info("default", "sparsecopy");
  ASSERT_TRUE(info);
  EXPECT_EQ((*info)["capacity"], 256u << 20);
  EXPECT_LT((*info)["allocation"].get<uint64_t>(), 4u << 20);
  EXPECT_EQ(read_guest("sparsecopy", 100 << 20, 4096), std::string(4096, 'x'));
  EXPECT_EQ(read_guest("sparsecopy", 13 << 20, 6), "island");
  EXPECT_EQ(read_guest("sparsecopy", 12 << 20, 6), std::string(6, '\0'));
}

TEST_P(StorageTest, ShrinkOnlyWhenAsked) {
  auto& pools = *pools_;
  ASSERT_TRUE(pools.create_volume("default", "q", "qcow2", 64 << 20));
  ASSERT_TRUE(pools.create_volume("default", "r", "raw", 64 << 20));
  for (auto* name : {"q", "r"}) {
    ASSERT_TRUE(pools.resize_volume("default", name, 96 << 20)) << name;
    auto refused = pools.resize_volume("default", name, 32 << 20);
    EXPECT_FALSE(refused) << name;
    EXPECT_EQ((*pools.volume_info("default", name))["capacity"], 96u << 20) << name;
    auto shrunk = pools.resize_volume("default", name, 32 << 20, ShrinkPolicy::Allow);
    ASSERT_TRUE(shrunk) << name << ": " << shrunk.error().message();
    EXPECT_EQ((*pools.volume_info("default", name))["capacity"], 32u << 20) << name;
  }
  EXPECT_FALSE(pools.resize_volume("default", "q", 0));
  EXPECT_FALSE(pools.resize_volume("default", "missing", 1 << 20));
  expect_qemu_img_check_clean("q");
}

TEST_P(StorageTest, BadImagesGiveErrors) {
  auto& pools = *pools_;
  // A file that claims to be qcow2 but is not one: clear errors, no crash.
  ASSERT_TRUE(pools.create_volume("default", "junk", "raw", 1 << 20));
  std::string bogus = "QFI\xfb";
  bogus += std::string(60, '\xff');
  ASSERT_TRUE(pools.upload("default", "junk", bogus));
  EXPECT_FALSE(pools.volume_info("default", "junk"));
  EXPECT_FALSE(pools.clone_volume("default", "junk", "junkcopy", "copy"));
  EXPECT_FALSE(pools.resize_volume("default", "junk", 2 << 20));
}

// A guest owns the bytes of its raw disk and may write a qcow2 header at offset 0, naming a host file
// as its backing file. The volume must stay raw: opened as qcow2 it would expose that host file.
TEST_P(StorageTest, GuestWrittenHeaderDoesNotChangeTheFormat) {
  auto& pools = *pools_;
  ASSERT_TRUE(pools.create_volume("default", "rawdisk", "raw", 8 << 20));
  std::string evil = dir_ + "/evil.qcow2";
  auto made = run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", evil, "1G"});
  ASSERT_TRUE(made && made->exit_code == 0);
  auto header = read_file(evil);
  ASSERT_TRUE(header);
  write_guest("rawdisk", 0, header->substr(0, 4096));
  ASSERT_EQ(*disk::probe_format(vol("rawdisk")), disk::ImageFormat::Qcow2);  // what probing would say

  auto info = pools.volume_info("default", "rawdisk");
  ASSERT_TRUE(info) << info.error().message();
  EXPECT_EQ((*info)["format"], "raw");
  EXPECT_EQ((*info)["capacity"], 8u << 20);
  EXPECT_FALSE(info->contains("backing"));
  auto resolved = pools.resolve("default/rawdisk");
  ASSERT_TRUE(resolved);
  EXPECT_EQ(resolved->second, "raw");
  // Copies and overlays treat it as raw too.
  ASSERT_TRUE(pools.clone_volume("default", "rawdisk", "rawcopy", "copy"));
  EXPECT_EQ((*pools.volume_info("default", "rawcopy"))["format"], "raw");
  ASSERT_TRUE(pools.clone_volume("default", "rawdisk", "rawover", "overlay"));
  EXPECT_EQ(qemu_img_info("rawover")["backing-filename-format"], "raw");
  ASSERT_TRUE(pools.resize_volume("default", "rawdisk", 16 << 20));
  EXPECT_EQ((*pools.volume_info("default", "rawdisk"))["capacity"], 16u << 20);

  // Deleting forgets the format: a new volume of that name gets its own.
  ASSERT_TRUE(pools.delete_volume("default", "rawdisk"));
  ASSERT_TRUE(pools.create_volume("default", "rawdisk", "qcow2", 1 << 20));
  EXPECT_EQ((*pools.volume_info("default", "rawdisk"))["format"], "qcow2");
}

TEST_P(StorageTest, LongOperationsReportProgress) {
  EventBus events;
  auto sub = events.subscribe();
  pools_->set_events(&events);
  ASSERT_TRUE(pools_->create_volume("default", "src", "qcow2", 16 << 20));
  write_guest("src", 0, "data");
  ASSERT_TRUE(pools_->clone_volume("default", "src", "dst", "copy"));
  std::string body(3 << 20, 'u');
  size_t at = 0;
  ASSERT_TRUE(pools_->upload_from("default", "dst", body.size(), [&](char* buf, size_t len) -> Result<size_t> {
    size_t n = std::min(len, body.size() - at);
    std::memcpy(buf, body.data() + at, n);
    at += n;
    return n;
  }));
  int copy_done = 0, upload_done = 0;
  while (auto ev = sub->next(std::chrono::milliseconds(0))) {
    auto detail = ev->value("detail", nlohmann::json::object());
    if (!detail.is_object() || detail.value("percent", -1) != 100) continue;
    if (ev->value("event", "") == "volume-copy" && detail.value("volume", "") == "dst") ++copy_done;
    if (ev->value("event", "") == "volume-upload" && detail.value("total", uint64_t{0}) == body.size()) ++upload_done;
  }
  EXPECT_EQ(copy_done, 1);
  EXPECT_EQ(upload_done, 1);
}

INSTANTIATE_TEST_SUITE_P(Backends, StorageTest, ::testing::Values("keel-disk", "qemu-img"),
                         [](const auto& info) { return info.param == "keel-disk" ? "KeelDisk" : "QemuImg"; });

TEST(VolumeBackends, UnknownNameIsAnError) { EXPECT_FALSE(make_volume_backend("lvm")); }

}  // namespace
}  // namespace keel::hostd
