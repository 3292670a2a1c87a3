// copy_image (keel-img convert's engine) on real files: zero granules inside data regions, an
// unaligned tail, sources many times larger than the chunk queue, qcow2 targets (plain,
// compressed, over a backing file), errors from either side; and HoleMap's lazy walk.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "base/unique_fd.h"
#include "disk/convert.h"
#include "disk/hole_map.h"
#include "disk/qcow2_image.h"
#include "disk/raw_image.h"

using namespace keel;
using namespace keel::disk;

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("keel-convert-" + std::to_string(getpid()) + "-" + name)).string();
}

enum class Piece { Hole, Zeros, Data };

// A raw file of `size` bytes built from pieces: holes, written zeros (data to SEEK_DATA, zeros
// to the zero scan) and random bytes. Returns its content.
std::vector<uint8_t> make_raw(const std::string& path, uint64_t size,
                              const std::vector<std::tuple<uint64_t, uint64_t, Piece>>& pieces, uint32_t seed) {
  EXPECT_TRUE(RawImage::create(path, size));
  std::vector<uint8_t> content(size, 0);
  std::mt19937 rng(seed);
  auto fd = UniqueFd::open(path, O_RDWR);
  EXPECT_TRUE(fd);
  for (auto [offset, length, kind] : pieces) {
    if (kind == Piece::Hole) continue;
    std::vector<uint8_t> bytes(length, 0);
    if (kind == Piece::Data)
      for (auto& b : bytes) b = static_cast<uint8_t>(rng() % 255 + 1);
    EXPECT_TRUE(pwrite_all(fd->get(), bytes.data(), length, static_cast<off_t>(offset)));
    std::memcpy(content.data() + offset, bytes.data(), length);
  }
  return content;
}

// copy_image with a progress callback that must only move forward and end at the source's size.
void copy_checking_progress(BlockDevice& source, BlockDevice& target, CopyOptions o) {
  uint64_t last_progress = 0;
  o.progress = [&](uint64_t done) {
    EXPECT_GT(done, last_progress);
    last_progress = done;
  };
  auto r = copy_image(source, target, o);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(last_progress, source.size());
}

std::vector<uint8_t> read_all(BlockDevice& dev) {
  std::vector<uint8_t> out(dev.size());
  auto r = dev.read(0, out);
  EXPECT_TRUE(r) << (r ? "" : r.error().message());
  return out;
}

// Which granules of the device hold data, per block status.
std::vector<bool> allocated_granules(BlockDevice& dev, uint64_t granule) {
  std::vector<bool> out((dev.size() + granule - 1) / granule, false);
  auto extents = dev.block_status(0, dev.size());
  EXPECT_TRUE(extents);
  for (auto& e : *extents)
    if (e.data && !e.zero)
      for (uint64_t g = e.offset / granule; g * granule < e.offset + e.length; ++g) out[g] = true;
  return out;
}

// Granules of `content` holding a non-zero byte.
std::vector<bool> nonzero_granules(const std::vector<uint8_t>& content, uint64_t granule) {
  std::vector<bool> out((content.size() + granule - 1) / granule, false);
  for (size_t i = 0; i < content.size(); ++i)
    if (content[i]) out[i / granule] = true;
  return out;
}

// A device that fails reads or writes from some offset on; everything else goes to `inner`.
class FailingDevice final : public BlockDevice {
public:
  FailingDevice(BlockDevice& inner, uint64_t fail_read_at, uint64_t fail_write_at)
      : inner_(inner), fail_read_at_(fail_read_at), fail_write_at_(fail_write_at) {}
  uint64_t size() const override { return inner_.size(); }
  bool read_only() const override { return inner_.read_only(); }
  std::string format() const override { return "failing"; }
  Result<void> read(uint64_t offset, std::span<uint8_t> out) override {
    if (offset + out.size() > fail_read_at_) return fail(EIO, "injected read error");
    return inner_.read(offset, out);
  }
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override {
    if (offset + data.size() > fail_write_at_) return fail(ENOSPC, "injected write error");
    return inner_.write(offset, data);
  }
  Result<void> flush() override { return inner_.flush(); }
  Result<void> discard(uint64_t offset, uint64_t length) override { return inner_.discard(offset, length); }
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override { return inner_.write_zeroes(offset, length); }
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) override {
    return inner_.block_status(offset, length);
  }

private:
  BlockDevice& inner_;
  uint64_t fail_read_at_, fail_write_at_;
};

}  // namespace

TEST(CopyImage, ZeroGranulesInsideDataAndUnalignedTail) {
  const uint64_t size = (5 << 20) + 1234;
  std::string src_path = temp_path("tail-src.raw"), dst_path = temp_path("tail-dst.raw");
  auto content = make_raw(src_path, size,
                          {{0, 65536, Piece::Data},
                           {65536, 131072, Piece::Zeros},             // written zeros inside data
                           {196608 + 100, 40000, Piece::Data},        // starts and ends inside granules
                           {(2 << 20) - 8192, 16384, Piece::Data},    // across a chunk's end
                           {(3 << 20), 4096, Piece::Zeros},
                           {size - 3000, 3000, Piece::Data}},         // the partial last granule
                          1);
  auto src = RawImage::open(src_path, OpenMode::ReadOnly);
  ASSERT_TRUE(src);
  for (unsigned readers : {1u, 2u, 3u}) {
    ASSERT_TRUE(RawImage::create(dst_path, size));
    auto dst = RawImage::open(dst_path, OpenMode::ReadWrite);
    ASSERT_TRUE(dst);
    CopyOptions o;
    o.granule = 4096;
    o.chunk_size = 65536;
    o.readers = readers;
    o.queue_chunks = 2;
    ASSERT_NO_FATAL_FAILURE(copy_checking_progress(**src, **dst, o));
    EXPECT_EQ(read_all(**dst), content);
    // Granules of zeros stay holes, whether the source had them as holes or as written zeros.
    EXPECT_EQ(allocated_granules(**dst, 4096), nonzero_granules(content, 4096)) << "readers " << readers;
  }
  ::unlink(src_path.c_str());
  ::unlink(dst_path.c_str());
}

TEST(CopyImage, SourceManyTimesLargerThanTheQueue) {
  // 1,000 chunks of 16 KiB against 64 queue entries and 1-3 data buffers: entries and buffers
  // wrap many times, through long runs of holes and of data.
  const uint64_t size = 1000 * 16384 + 512;
  std::vector<std::tuple<uint64_t, uint64_t, Piece>> pieces;
  std::mt19937 rng(7);
  for (uint64_t pos = 0; pos < size;) {
    uint64_t len = std::min<uint64_t>(size - pos, 4096 * (1 + rng() % 24));
    Piece kind = std::array{Piece::Hole, Piece::Hole, Piece::Zeros, Piece::Data, Piece::Data}[rng() % 5];
    pieces.push_back({pos, len, kind});
    pos += len;
  }
  std::string src_path = temp_path("many-src.raw"), dst_path = temp_path("many-dst.raw");
  auto content = make_raw(src_path, size, pieces, 2);
  auto src = RawImage::open(src_path, OpenMode::ReadOnly);
  ASSERT_TRUE(src);
  for (auto [readers, queue] : {std::pair{1u, 1u}, {2u, 2u}, {3u, 5u}}) {
    ASSERT_TRUE(RawImage::create(dst_path, size));
    auto dst = RawImage::open(dst_path, OpenMode::ReadWrite);
    ASSERT_TRUE(dst);
    CopyOptions o;
    o.granule = 4096;
    o.chunk_size = 16384;
    o.readers = readers;
    o.queue_chunks = queue;
    auto r = copy_image(**src, **dst, o);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(read_all(**dst), content);
    EXPECT_EQ(allocated_granules(**dst, 4096), nonzero_granules(content, 4096)) << readers << " " << queue;
  }
  ::unlink(src_path.c_str());
  ::unlink(dst_path.c_str());
}

TEST(CopyImage, Qcow2TargetsPlainCompressedAndOverABackingFile) {
  const uint64_t size = 8 << 20;
  std::string src_path = temp_path("q-src.raw"), base_path = temp_path("q-base.raw"),
              dst_path = temp_path("q-dst.qcow2");
  auto content = make_raw(src_path, size,
                          {{0, 65536 + 4096, Piece::Data},
                           {196608, 65536, Piece::Zeros},
                           {(2 << 20) + 512, 300000, Piece::Data},
                           {size - 4096, 4096, Piece::Data}},
                          3);
  auto src = RawImage::open(src_path, OpenMode::ReadOnly);
  ASSERT_TRUE(src);
  const uint64_t cluster = 65536;
  for (bool compress : {false, true}) {
    Qcow2CreateOptions co;
    co.size = size;
    ASSERT_TRUE(Qcow2Image::create(dst_path, co));
    auto dst = Qcow2Image::open(dst_path, OpenMode::ReadWrite);
    ASSERT_TRUE(dst);
    CopyOptions o;
    o.granule = cluster;
    o.compress = compress;
    o.chunk_size = 1 << 20;
    // Compressing readers write themselves, each from its own buffer, however few were asked for.
    o.readers = compress ? 3 : 0;
    o.queue_chunks = compress ? 1 : 0;
    ASSERT_NO_FATAL_FAILURE(copy_checking_progress(**src, **dst, o));
    ASSERT_TRUE((*dst)->close());
    auto back = Qcow2Image::open(dst_path, OpenMode::ReadOnly);
    ASSERT_TRUE(back);
    EXPECT_EQ(read_all(**back), content);
    EXPECT_EQ(allocated_granules(**back, cluster), nonzero_granules(content, cluster)) << compress;
    auto check = (*back)->check(RepairMode::None);
    ASSERT_TRUE(check);
    EXPECT_EQ(check->corruptions + check->leaks + check->check_errors, 0u);
  }

  // Over a backing file: only clusters that differ from it are written, and what the source
  // reads as zeros hides the backing file's data.
  std::vector<std::tuple<uint64_t, uint64_t, Piece>> base_pieces{{0, size, Piece::Data}};
  auto base_content = make_raw(base_path, size, base_pieces, 4);
  {
    auto fd = UniqueFd::open(base_path, O_RDWR);
    ASSERT_TRUE(fd);
    // The base agrees with the source on the first cluster.
    ASSERT_TRUE(pwrite_all(fd->get(), content.data(), cluster, 0));
  }
  Qcow2CreateOptions co;
  co.size = size;
  co.backing_file = base_path;
  co.backing_format = "raw";
  ASSERT_TRUE(Qcow2Image::create(dst_path, co));
  auto dst = Qcow2Image::open(dst_path, OpenMode::ReadWrite);
  ASSERT_TRUE(dst);
  CopyOptions o;
  o.granule = cluster;
  o.target_backing = (*dst)->backing();
  ASSERT_NE(o.target_backing, nullptr);
  auto r = copy_image(**src, **dst, o);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(read_all(**dst), content);
  auto extents = (*dst)->block_status(0, cluster);
  ASSERT_TRUE(extents);
  for (auto& e : *extents) EXPECT_EQ(e.depth, 1) << "the cluster equal to the backing file was written";
  ASSERT_TRUE((*dst)->close());
  for (auto& p : {src_path, base_path, dst_path}) ::unlink(p.c_str());
}

TEST(CopyImage, ErrorsOnEitherSideEndTheCopy) {
  const uint64_t size = 6 << 20;
  std::string src_path = temp_path("err-src.raw"), dst_path = temp_path("err-dst.raw");
  make_raw(src_path, size, {{0, size, Piece::Data}}, 5);
  auto src = RawImage::open(src_path, OpenMode::ReadOnly);
  ASSERT_TRUE(src);
  ASSERT_TRUE(RawImage::create(dst_path, size));
  auto dst = RawImage::open(dst_path, OpenMode::ReadWrite);
  ASSERT_TRUE(dst);
  for (unsigned readers : {1u, 2u}) {
    CopyOptions o;
    o.chunk_size = 65536;
    o.readers = readers;
    FailingDevice bad_src(**src, 3 << 20, UINT64_MAX);
    auto r = copy_image(bad_src, **dst, o);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find("injected read error"), std::string::npos);
    FailingDevice bad_dst(**dst, UINT64_MAX, 1 << 20);
    r = copy_image(**src, bad_dst, o);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find("injected write error"), std::string::npos);
  }
  // A target smaller than the source, and compression into a raw target, are refused.
  ASSERT_TRUE(RawImage::create(dst_path, size / 2));
  auto small = RawImage::open(dst_path, OpenMode::ReadWrite);
  ASSERT_TRUE(small);
  EXPECT_FALSE(copy_image(**src, **small, {}));
  CopyOptions compress;
  compress.compress = true;
  EXPECT_FALSE(copy_image(**src, **dst, compress));
  ::unlink(src_path.c_str());
  ::unlink(dst_path.c_str());
}

TEST(CopyImage, EmptySource) {
  std::string src_path = temp_path("empty-src.raw"), dst_path = temp_path("empty-dst.raw");
  ASSERT_TRUE(RawImage::create(src_path, 0));
  ASSERT_TRUE(RawImage::create(dst_path, 0));
  auto src = RawImage::open(src_path, OpenMode::ReadOnly);
  auto dst = RawImage::open(dst_path, OpenMode::ReadWrite);
  ASSERT_TRUE(src && dst);
  EXPECT_TRUE(copy_image(**src, **dst, {}));
  ::unlink(src_path.c_str());
  ::unlink(dst_path.c_str());
}

TEST(HoleMap, WalksLazilyAndKeepsOurWrites) {
  const uint64_t size = 8 << 20;
  std::string path = temp_path("holes.raw");
  make_raw(path, size, {{1 << 20, 65536, Piece::Data}, {6 << 20, 65536, Piece::Data}}, 6);
  auto fd = UniqueFd::open(path, O_RDWR);
  ASSERT_TRUE(fd);
  HoleMap holes;
  // Only the front is asked about; a write far ahead is noted before the walk gets there.
  auto front = holes.pieces(fd->get(), 0, 2 << 20);
  ASSERT_TRUE(front);
  ASSERT_EQ(front->size(), 3u);
  EXPECT_EQ((*front)[1].start, 1u << 20);
  EXPECT_TRUE((*front)[1].data);
  std::vector<uint8_t> bytes(4096, 0x5a);
  ASSERT_TRUE(pwrite_all(fd->get(), bytes.data(), bytes.size(), 4 << 20));
  holes.note_data(4 << 20, 4096);
  auto all = holes.pieces(fd->get(), 0, size);
  ASSERT_TRUE(all);
  std::vector<std::pair<uint64_t, uint64_t>> data;
  for (auto& p : *all)
    if (p.data) data.push_back({p.start, p.end});
  ASSERT_EQ(data.size(), 3u);
  EXPECT_EQ(data[0], (std::pair<uint64_t, uint64_t>{1 << 20, (1 << 20) + 65536}));
  EXPECT_EQ(data[1].first, 4u << 20);
  EXPECT_GE(data[1].second, (4u << 20) + 4096);
  EXPECT_EQ(data[2].first, 6u << 20);
  // Pieces cover the range exactly, in order.
  uint64_t pos = 0;
  for (auto& p : *all) {
    EXPECT_EQ(p.start, pos);
    pos = p.end;
  }
  EXPECT_EQ(pos, size);
  // Past the file's end, only our writes are data.
  auto past = holes.pieces(fd->get(), size, size + 65536);
  ASSERT_TRUE(past);
  ASSERT_EQ(past->size(), 1u);
  EXPECT_FALSE((*past)[0].data);
  ::unlink(path.c_str());
}
