// Qcow2Image through its API: random I/O against a shadow copy, threads, and hostile images. The
// images it writes are checked with the real qemu-img.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "base/process.h"
#include "disk/endian.h"
#include "disk/image.h"
#include "disk/qcow2_image.h"

using namespace keel;
using namespace keel::disk;

namespace {

class TempDir {
public:
  TempDir() {
    char tmpl[] = "/tmp/keel-qcow2-test-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

int qemu_img(const std::vector<std::string>& args, std::string* out = nullptr) {
  std::vector<std::string> argv = {"qemu-img"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = run_command(argv);
  if (!r) return -1;
  if (out) *out = r->out + r->err;
  return r->exit_code;
}

void write_shadow(const std::string& path, const std::vector<uint8_t>& data) {
  ASSERT_TRUE(write_file(path, std::string_view(reinterpret_cast<const char*>(data.data()), data.size())));
}

void patch_be64(const std::string& path, uint64_t offset, uint64_t value) {
  int fd = ::open(path.c_str(), O_RDWR);
  uint8_t b[8];
  store_be64(b, value);
  ASSERT_EQ(::pwrite(fd, b, 8, static_cast<off_t>(offset)), 8);
  ::close(fd);
}
void patch_be32(const std::string& path, uint64_t offset, uint32_t value) {
  int fd = ::open(path.c_str(), O_RDWR);
  uint8_t b[4];
  store_be32(b, value);
  ASSERT_EQ(::pwrite(fd, b, 4, static_cast<off_t>(offset)), 4);
  ::close(fd);
}

struct Variant {
  uint32_t cluster_size;
  int refcount_bits;
  int version;
  bool extended_l2 = false;
  bool direct = false;  // O_DIRECT (cache=none)
};

class Qcow2RandomIo : public ::testing::TestWithParam<Variant> {};

TEST_P(Qcow2RandomIo, MatchesShadowAndQemuImgCheck) {
  TempDir dir;
  Variant v = GetParam();
  std::string path = dir.file("a.qcow2");
  const uint64_t size = 9 << 20;
  Qcow2CreateOptions o;
  o.size = size;
  o.cluster_size = v.cluster_size;
  o.refcount_bits = v.refcount_bits;
  o.version = v.version;
  o.extended_l2 = v.extended_l2;
  ASSERT_TRUE(Qcow2Image::create(path, o));
  std::vector<uint8_t> shadow(size, 0);
  std::mt19937_64 rng(v.cluster_size * 131 + static_cast<uint64_t>(v.refcount_bits) + (v.direct ? 7 : 0));
  {
    Qcow2OpenOptions oo;
    oo.direct = v.direct;
    auto img = Qcow2Image::open(path, OpenMode::ReadWrite, oo);
    ASSERT_TRUE(img) << img.error().message() << (v.direct ? " (O_DIRECT variants need /tmp on a file system that takes it)" : "");
    auto& q = **img;
    std::vector<uint8_t> buf;
    for (int i = 0; i < 400; ++i) {
      uint64_t off = rng() % size;
      // Small requests too: with subclusters they allocate pieces of clusters.
      uint64_t len = std::min<uint64_t>(1 + rng() % (i % 2 ? 200000 : 3000), size - off);
      int op = static_cast<int>(rng() % 10);
      if (op < 6) {
        buf.resize(len);
        for (auto& b : buf) b = static_cast<uint8_t>(rng());
        ASSERT_TRUE(q.write(off, buf));
        std::memcpy(shadow.data() + off, buf.data(), len);
      } else if (op < 8) {
        ASSERT_TRUE(q.write_zeroes(off, len));
        std::memset(shadow.data() + off, 0, len);
      } else if (op < 9 && v.version == 3) {
        uint64_t cs = v.cluster_size;
        uint64_t coff = off / cs * cs;
        uint64_t clen = std::min<uint64_t>(cs, size - coff);
        buf.assign(clen, static_cast<uint8_t>(i));
        ASSERT_TRUE(q.write_compressed(coff, buf));
        std::memcpy(shadow.data() + coff, buf.data(), clen);
      } else {
        ASSERT_TRUE(q.flush());
      }
      if (i % 50 == 0) {
        std::vector<uint8_t> back(len);
        ASSERT_TRUE(q.read(off, back));
        ASSERT_EQ(0, std::memcmp(back.data(), shadow.data() + off, len)) << "at op " << i;
      }
    }
    std::vector<uint8_t> all(size);
    ASSERT_TRUE(q.read(0, all));
    ASSERT_EQ(all, shadow);
    ASSERT_TRUE(q.close());
  }
  std::string out;
  EXPECT_EQ(qemu_img({"check", path}, &out), 0) << out;
  write_shadow(dir.file("shadow.raw"), shadow);
  EXPECT_EQ(qemu_img({"compare", "-f", "raw", "-F", "qcow2", dir.file("shadow.raw"), path}, &out), 0) << out;
}

INSTANTIATE_TEST_SUITE_P(Variants, Qcow2RandomIo,
                         ::testing::Values(Variant{65536, 16, 3}, Variant{512, 1, 3}, Variant{4096, 64, 3},
                                           Variant{2 << 20, 8, 3}, Variant{65536, 16, 2},
                                           Variant{1024, 2, 3}, Variant{65536, 16, 3, true},
                                           Variant{16384, 16, 3, true}, Variant{2 << 20, 16, 3, true},
                                           Variant{512, 16, 3, false, true}, Variant{65536, 16, 3, false, true},
                                           Variant{32768, 4, 3, true, true}));

TEST(Qcow2, ThreadsWritingDisjointRegions) {
  TempDir dir;
  std::string path = dir.file("t.qcow2");
  Qcow2CreateOptions o;
  o.size = 64 << 20;
  ASSERT_TRUE(Qcow2Image::create(path, o));
  auto img = Qcow2Image::open(path, OpenMode::ReadWrite);
  ASSERT_TRUE(img);
  auto& q = **img;
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<uint8_t> buf(12345, static_cast<uint8_t>(t + 1));
      for (int i = 0; i < 300; ++i) {
        uint64_t off = static_cast<uint64_t>(t) * (16 << 20) + static_cast<uint64_t>(i) * 50000;
        if (!q.write(off, buf)) ++errors;
        std::vector<uint8_t> back(buf.size());
        if (!q.read(off, back) || back != buf) ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors, 0);
  ASSERT_TRUE(q.close());
  std::string out;
  EXPECT_EQ(qemu_img({"check", path}, &out), 0) << out;
}

// Threads racing on the same clusters: compressed whole-cluster writes against partial writes
// (which must read the compressed data back) and reads. No request may fail, and every cluster
// must end up holding bytes some writer wrote, never stale or half-decoded data.
TEST(Qcow2, OverlappingWritersOnSameClusters) {
  TempDir dir;
  std::string path = dir.file("race.qcow2");
  Qcow2CreateOptions o;
  o.size = 4 << 20;
  o.compression = Qcow2Compression::Zstd;
  ASSERT_TRUE(Qcow2Image::create(path, o));
  auto img = Qcow2Image::open(path, OpenMode::ReadWrite);
  ASSERT_TRUE(img);
  auto& q = **img;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 100);
      std::vector<uint8_t> buf(65536, static_cast<uint8_t>(0x10 + t));
      std::vector<uint8_t> back(65536);
      for (int i = 0; i < 400; ++i) {
        uint64_t cluster = rng() % 16;
        Result<void> r;
        if (t % 2 == 0) {
          r = q.write_compressed(cluster * 65536, buf);
        } else {
          uint64_t off = cluster * 65536 + rng() % 60000;
          r = q.write(off, std::span<const uint8_t>(buf.data(), 1000));
        }
        if (!r) ++errors;
        if (!q.read(cluster * 65536, back)) ++errors;
        for (uint8_t b : back)
          if (b != 0 && (b < 0x10 || b > 0x13)) {
            ++errors;
            break;
          }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors, 0);
  ASSERT_TRUE(q.close());
  std::string out;
  EXPECT_EQ(qemu_img({"check", path}, &out), 0) << out;
}

TEST(Qcow2, OverlayPartialWritesPullInBackingData) {
  TempDir dir;
  std::string base = dir.file("base.qcow2"), top = dir.file("top.qcow2");
  Qcow2CreateOptions o;
  o.size = 4 << 20;
  ASSERT_TRUE(Qcow2Image::create(base, o));
  std::vector<uint8_t> pattern(4 << 20);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i * 7 + 3);
  {
    auto b = Qcow2Image::open(base, OpenMode::ReadWrite);
    ASSERT_TRUE(b);
    ASSERT_TRUE((*b)->write(0, pattern));
    ASSERT_TRUE((*b)->close());
  }
  o.backing_file = "base.qcow2";
  o.backing_format = "qcow2";
  o.cluster_size = 4096;
  ASSERT_TRUE(Qcow2Image::create(top, o));
  auto dev = open_image(top, OpenMode::ReadWrite);
  ASSERT_TRUE(dev) << dev.error().message();
  std::vector<uint8_t> small(100, 0xee);
  ASSERT_TRUE((*dev)->write(5000, small));
  std::memcpy(pattern.data() + 5000, small.data(), small.size());
  ASSERT_TRUE((*dev)->write_zeroes(65536, 8192));
  std::memset(pattern.data() + 65536, 0, 8192);
  std::vector<uint8_t> all(4 << 20);
  ASSERT_TRUE((*dev)->read(0, all));
  EXPECT_EQ(all, pattern);
  auto ex = (*dev)->block_status(0, 4 << 20);
  ASSERT_TRUE(ex);
  EXPECT_EQ((*ex)[0].depth, 1);  // the first cluster shows through from the base
  dev->reset();
  std::string out;
  EXPECT_EQ(qemu_img({"check", top}, &out), 0) << out;
  EXPECT_EQ(qemu_img({"check", base}, &out), 0) << out;
}

// --- Hostile images: a clear error, never a crash.

class Qcow2Hostile : public ::testing::Test {
protected:
  void SetUp() override {
    path = dir.file("h.qcow2");
    Qcow2CreateOptions o;
    o.size = 1 << 20;
    ASSERT_TRUE(Qcow2Image::create(path, o));
    auto img = Qcow2Image::open(path, OpenMode::ReadWrite);
    ASSERT_TRUE(img);
    std::vector<uint8_t> data(200000, 0x5a);
    ASSERT_TRUE((*img)->write(0, data));
    ASSERT_TRUE((*img)->close());
  }
  std::string open_error() {
    auto img = Qcow2Image::open(path, OpenMode::ReadOnly);
    if (img) return {};
    return img.error().message();
  }
  std::string read_error() {
    auto img = Qcow2Image::open(path, OpenMode::ReadOnly);
    if (!img) return img.error().message();
    std::vector<uint8_t> buf((*img)->size());
    auto r = (*img)->read(0, buf);
    return r ? std::string() : r.error().message();
  }
  TempDir dir;
  std::string path;
};

TEST_F(Qcow2Hostile, Truncated) {
  ASSERT_EQ(::truncate(path.c_str(), 3 * 65536 + 4), 0);  // the L1 table is cut off
  std::string e = open_error();
  EXPECT_NE(e.find("L1 table"), std::string::npos) << e;
  ASSERT_EQ(::truncate(path.c_str(), 100), 0);
  e = open_error();
  EXPECT_NE(e.find("h.qcow2"), std::string::npos) << e;
}

TEST_F(Qcow2Hostile, UnknownIncompatibleFeatureIsNamed) {
  patch_be64(path, 72, 1ULL << 9);
  std::string e = open_error();
  EXPECT_NE(e.find("bit 9"), std::string::npos) << e;
  // With a name in the feature-name table, the error gives it.
  int fd = ::open(path.c_str(), O_RDWR);
  uint8_t hc[4096];
  ASSERT_EQ(::pread(fd, hc, sizeof(hc), 0), static_cast<ssize_t>(sizeof(hc)));
  for (size_t p = 112; p + 8 < sizeof(hc);) {
    uint32_t type = load_be32(hc + p), len = load_be32(hc + p + 4);
    if (type == 0) break;
    if (type == 0x6803f857) {
      hc[p + 8] = 0;
      hc[p + 9] = 9;
      std::memset(hc + p + 10, 0, 46);
      std::memcpy(hc + p + 10, "time travel", 11);
    }
    p += 8 + ((len + 7) & ~7u);
  }
  ASSERT_EQ(::pwrite(fd, hc, sizeof(hc), 0), static_cast<ssize_t>(sizeof(hc)));
  ::close(fd);
  e = open_error();
  EXPECT_NE(e.find("time travel"), std::string::npos) << e;
}

TEST_F(Qcow2Hostile, HugeSizes) {
  patch_be64(path, 24, 1ULL << 62);
  EXPECT_NE(open_error().find("too small"), std::string::npos) << open_error();
  patch_be64(path, 24, 1 << 20);
  patch_be32(path, 36, 0xffffffff);
  EXPECT_NE(open_error().find("too large"), std::string::npos) << open_error();
}

TEST_F(Qcow2Hostile, L2PointingAtHeader) {
  patch_be64(path, 3 * 65536, (1ULL << 63) | 0);  // L1[0] = 0 | copied: unallocated
  EXPECT_EQ(read_error(), "");
  patch_be64(path, 3 * 65536, (1ULL << 63) | 512);
  EXPECT_NE(read_error().find("not cluster aligned"), std::string::npos) << read_error();
}

TEST_F(Qcow2Hostile, BadCompressedLength) {
  // Turn the first data cluster into a "compressed" one whose bytes are not deflate data.
  auto img = Qcow2Image::open(path, OpenMode::ReadOnly);
  ASSERT_TRUE(img);
  uint64_t l2 = 0;
  {
    int fd = ::open(path.c_str(), O_RDONLY);
    uint8_t b[8];
    ASSERT_EQ(::pread(fd, b, 8, 3 * 65536), 8);
    l2 = load_be64(b) & 0x00fffffffffffe00ULL;
    ::close(fd);
  }
  img->reset();
  patch_be64(path, l2, (1ULL << 62) | (0xffULL << 54) | (4 * 65536));
  std::string e = read_error();
  EXPECT_NE(e.find("compressed cluster"), std::string::npos) << e;
}

TEST_F(Qcow2Hostile, OverlappingTablesAreCorruption) {
  // The refcount table claims the L1 table's cluster as a refcount block.
  patch_be64(path, 65536 + 8, 3 * 65536);
  auto img = Qcow2Image::open(path, OpenMode::ReadOnly);
  ASSERT_TRUE(img);
  auto r = (*img)->check(RepairMode::None);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_GT(r->corruptions, 0u);
}

TEST_F(Qcow2Hostile, BackingLoop) {
  Qcow2CreateOptions o;
  o.size = 1 << 20;
  o.backing_file = "b.qcow2";
  o.backing_format = "qcow2";
  ASSERT_TRUE(Qcow2Image::create(dir.file("a.qcow2"), o));
  o.backing_file = "a.qcow2";
  ASSERT_TRUE(Qcow2Image::create(dir.file("b.qcow2"), o));
  auto img = open_image(dir.file("a.qcow2"), OpenMode::ReadOnly);
  ASSERT_FALSE(img);
  EXPECT_NE(img.error().message().find("deeper"), std::string::npos) << img.error().message();
}

TEST_F(Qcow2Hostile, CorruptBitRefusesWrites) {
  patch_be64(path, 72, 2);
  auto img = Qcow2Image::open(path, OpenMode::ReadWrite);
  ASSERT_FALSE(img);
  EXPECT_NE(img.error().message().find("corrupt"), std::string::npos);
  EXPECT_TRUE(Qcow2Image::open(path, OpenMode::ReadOnly));
}

}  // namespace

namespace {

uint64_t header_incompat(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  uint8_t b[8] = {};
  EXPECT_EQ(::pread(fd, b, 8, 72), 8);
  ::close(fd);
  return load_be64(b);
}

}  // namespace

TEST(Qcow2Lazy, DirtyWhileOpenCleanAfterClose) {
  TempDir dir;
  std::string path = dir.file("lazy.qcow2");
  Qcow2CreateOptions o;
  o.size = 64 << 20;
  o.lazy_refcounts = true;
  ASSERT_TRUE(Qcow2Image::create(path, o));
  auto img = Qcow2Image::open(path, OpenMode::ReadWrite);
  ASSERT_TRUE(img) << img.error().message();
  EXPECT_EQ(header_incompat(path) & 1, 0u) << "no dirty bit before the first allocating write";
  std::vector<uint8_t> data(1 << 20, 0x42);
  for (uint64_t off = 0; off < (32 << 20); off += 3 << 20) ASSERT_TRUE((*img)->write(off, data));
  ASSERT_TRUE((*img)->flush());
  EXPECT_EQ(header_incompat(path) & 1, 1u) << "dirty once L2 tables reach the file ahead of refcounts";
  std::string out;
  EXPECT_EQ(qemu_img({"check", path}, &out), 2) << "refcounts stay cached across a flush: " << out;
  ASSERT_TRUE((*img)->close());
  EXPECT_EQ(header_incompat(path) & 1, 0u);
  EXPECT_EQ(qemu_img({"check", path}, &out), 0) << out;
}

TEST(Qcow2Lazy, DirtyImageRepairedOnReadWriteOpen) {
  TempDir dir;
  std::string path = dir.file("dirty.qcow2");
  ASSERT_EQ(qemu_img({"create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "16M"}), 0);
  auto r = run_command({"qemu-io", "-c", "write -P 7 0 1M", "-c", "sigraise 9", path});
  ASSERT_TRUE(r);
  ASSERT_EQ(header_incompat(path) & 1, 1u);
  {
    auto ro = Qcow2Image::open(path, OpenMode::ReadOnly);
    ASSERT_TRUE(ro) << "read-only opens of a dirty image only report";
    auto c = (*ro)->check(RepairMode::None);
    ASSERT_TRUE(c);
    EXPECT_GT(c->corruptions, 0u);
    EXPECT_FALSE((*ro)->open_repair());
  }
  auto img = Qcow2Image::open(path, OpenMode::ReadWrite);
  ASSERT_TRUE(img) << img.error().message();
  ASSERT_TRUE((*img)->open_repair());
  EXPECT_GT((*img)->open_repair()->corruptions_fixed, 0u);
  EXPECT_FALSE((*img)->dirty());
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_TRUE((*img)->read(0, buf));
  EXPECT_EQ(std::count(buf.begin(), buf.end(), 7), static_cast<long>(buf.size()));
  ASSERT_TRUE((*img)->close());
  std::string out;
  EXPECT_EQ(qemu_img({"check", path}, &out), 0) << out;
}

TEST(Qcow2Check, MissingRefcountBlockIsRebuilt) {
  TempDir dir;
  std::string path = dir.file("norefblock.qcow2");
  ASSERT_EQ(qemu_img({"create", "-q", "-f", "qcow2", path, "16M"}), 0);
  ASSERT_EQ(run_command({"qemu-io", "-c", "write -P 9 0 2M", path})->exit_code, 0);
  patch_be64(path, 65536, 0);  // refcount table entry 0
  auto img = Qcow2Image::open(path, OpenMode::ReadWrite, {.open_backing = false, .for_repair = true});
  ASSERT_TRUE(img) << img.error().message();
  auto leaks_only = (*img)->check(RepairMode::Leaks);
  ASSERT_TRUE(leaks_only);
  EXPECT_FALSE(leaks_only->failure.empty()) << "-r leaks cannot rebuild";
  auto fixed = (*img)->check(RepairMode::All);
  ASSERT_TRUE(fixed) << fixed.error().message();
  EXPECT_TRUE(fixed->failure.empty());
  EXPECT_EQ(fixed->corruptions, 0u);
  EXPECT_GT(fixed->corruptions_fixed, 0u);
  ASSERT_TRUE((*img)->close());
  std::string out;
  EXPECT_EQ(qemu_img({"check", path}, &out), 0) << out;
}
