#include "disk/qcow2_image.h"

#include <fcntl.h>
#include <libdeflate.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <tuple>

#include "base/log.h"
#include "disk/endian.h"
#include "disk/image_internal.h"
#include "disk/qcow2_layout.h"

namespace keel::disk {

namespace {

using namespace qcow2;

constexpr uint32_t kMagic = 0x514649fb;
constexpr uint64_t kOflagZero = 1ULL;
constexpr uint64_t kMaxL1Bytes = 32ULL << 20;     // as qemu: QCOW_MAX_L1_SIZE
constexpr uint64_t kMaxRefTableBytes = 8ULL << 20;  // QCOW_MAX_REFTABLE_SIZE
constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureNames = 0x6803f857;
constexpr int kMaxChainDepth = 256;

// Incompatible feature bits we understand.
constexpr uint64_t kIncDirty = 1ULL << 0;
constexpr uint64_t kIncCorrupt = 1ULL << 1;
constexpr uint64_t kIncDataFile = 1ULL << 2;
constexpr uint64_t kIncCompression = 1ULL << 3;
constexpr uint64_t kIncExtendedL2 = 1ULL << 4;
constexpr uint64_t kIncKnown = kIncDirty | kIncCorrupt | kIncDataFile | kIncCompression | kIncExtendedL2;

std::string hex(uint64_t v) { return fmt::format("{:#x}", v); }

// Per-thread scratch buffers: the data path allocates nothing per request once warm.
struct Scratch {
  std::vector<uint8_t> cluster;      // one cluster: L2 copies, zero fills
  std::vector<uint8_t> rmw;          // one cluster for read-modify-write
  std::vector<uint8_t> compressed;   // compressed input/output
  std::vector<uint8_t> decompressed; // last decompressed cluster
  const void* decompressed_owner = nullptr;
  uint64_t decompressed_desc = UINT64_MAX;
  z_stream inflater{};
  bool inflater_ready = false;
  z_stream deflater{};
  bool deflater_ready = false;
  ZSTD_DCtx* zstd_d = nullptr;
  ZSTD_CCtx* zstd_c = nullptr;
  libdeflate_decompressor* deflate_d = nullptr;
  libdeflate_compressor* deflate_probe = nullptr;
  ~Scratch() {
    if (deflate_d) libdeflate_free_decompressor(deflate_d);
    if (deflate_probe) libdeflate_free_compressor(deflate_probe);
    if (inflater_ready) inflateEnd(&inflater);
    if (deflater_ready) deflateEnd(&deflater);
    if (zstd_d) ZSTD_freeDCtx(zstd_d);
    if (zstd_c) ZSTD_freeCCtx(zstd_c);
  }
};
thread_local Scratch t_scratch;
thread_local std::vector<std::tuple<const void*, uint64_t, const uint8_t*, size_t, uint64_t>> t_deferred;

// Whether the bytes' order-0 entropy is above 7.5 bits per byte: random-looking data (already
// compressed or encrypted), which Huffman coding cannot shrink and LZ matching rarely does.
bool looks_incompressible(const uint8_t* p, size_t n) {
  if (n < 4096) return false;
  uint32_t counts[4][256] = {};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++counts[0][p[i]];
    ++counts[1][p[i + 1]];
    ++counts[2][p[i + 2]];
    ++counts[3][p[i + 3]];
  }
  for (; i < n; ++i) ++counts[0][p[i]];
  double bits = 0;
  for (int b = 0; b < 256; ++b) {
    uint32_t c = counts[0][b] + counts[1][b] + counts[2][b] + counts[3][b];
    if (c) bits -= c * std::log2(static_cast<double>(c) / static_cast<double>(n));
  }
  return bits > 7.5 * static_cast<double>(n);
}

uint8_t* scratch_buffer(std::vector<uint8_t>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// pread that reads zeros past the end of the file, as qemu's block layer does for data.
Result<void> pread_zero_past_eof(int fd, uint8_t* buf, size_t len, uint64_t offset) {
  while (len > 0) {
    ssize_t n = ::pread(fd, buf, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("pread");
    }
    if (n == 0) {
      std::memset(buf, 0, len);
      return ok();
    }
    buf += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return ok();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Opening

Qcow2Image::~Qcow2Image() {
  if (!closed_) {
    auto r = close();
    if (!r) KEEL_LOG_ERROR("closing {}: {}", path_, r.error().message());
  }
}

Result<void> Qcow2Image::close() {
  if (closed_) return ok();
  closed_ = true;
  if (read_only_ || !fd_) return ok();
  std::lock_guard lock(mutex_);
  TRY(flush_metadata());
  TRY(flush_refcounts());
  TRY(sync_file());
  // Everything, refcount blocks included, is on disk now: the image is whole again.
  if (we_set_dirty_) TRY(mark_clean());
  return ok();
}

Result<std::unique_ptr<Qcow2Image>> Qcow2Image::open(const std::string& path, OpenMode mode,
                                                      const Qcow2OpenOptions& options,
                                                      int chain_depth) {
  if (chain_depth > kMaxChainDepth)
    return fail_invalid("{}: backing chain is deeper than {} images (a loop?)", path, kMaxChainDepth);
  std::unique_ptr<Qcow2Image> image(new Qcow2Image());
  image->path_ = path;
  image->read_only_ = mode == OpenMode::ReadOnly;
  int flags = image->read_only_ ? O_RDONLY : O_RDWR;
  if (options.direct) {
    image->fd_ = TRY(DirectFile::open(path, flags));
    image->direct_ = std::make_unique<DirectFile>();
  } else {
    image->fd_ = TRY(UniqueFd::open(path, flags));
  }
  TRY(image->load(options, chain_depth));
  return image;
}

Result<void> Qcow2Image::validate_header_bytes(std::span<const uint8_t> bytes, uint64_t file_size) {
  // Writes the bytes to a memfd and runs the full open path on it: the same checks as a real open.
  int raw = ::memfd_create("qcow2-validate", MFD_CLOEXEC);
  if (raw < 0) return fail_errno("memfd_create");
  UniqueFd fd(raw);
  TRY(pwrite_all(fd.get(), bytes.data(), bytes.size(), 0));
  if (file_size > bytes.size() && ::ftruncate(fd.get(), static_cast<off_t>(file_size)) < 0)
    return fail_errno("ftruncate");
  std::unique_ptr<Qcow2Image> image(new Qcow2Image());
  image->path_ = "<memory>";
  image->fd_ = std::move(fd);
  Qcow2OpenOptions options;
  options.open_backing = false;
  return image->load(options, 0);
}

uint64_t Qcow2Image::file_size() const {
  struct stat st;
  if (::fstat(fd_.get(), &st) < 0) return 0;
  return static_cast<uint64_t>(st.st_size);
}

uint64_t Qcow2Image::allocated_file_bytes() const {
  struct stat st;
  if (::fstat(fd_.get(), &st) < 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Result<void> Qcow2Image::pread_meta(void* buf, size_t len, uint64_t offset, const char* what) {
  uint64_t fsize = file_size();
  if (offset > fsize || len > fsize - offset)
    return fail_invalid("{}: {} at offset {} ({} bytes) lies beyond the end of the file ({} bytes)",
                        path_, what, hex(offset), len, fsize);
  auto r = file_read(buf, len, offset);
  if (!r) return fail(r.error().with_context(fmt::format("{}: reading {} at offset {}", path_, what, hex(offset))));
  return ok();
}

// Every access to the image file goes through these two, so cache=none (O_DIRECT) covers data and
// metadata alike.
Result<void> Qcow2Image::file_read(void* buf, size_t len, uint64_t offset) {
  if (direct_) return direct_->read(fd_.get(), static_cast<uint8_t*>(buf), len, offset);
  return pread_zero_past_eof(fd_.get(), static_cast<uint8_t*>(buf), len, offset);
}

Result<void> Qcow2Image::file_write(const void* buf, size_t len, uint64_t offset) {
  if (direct_) return direct_->write(fd_.get(), static_cast<const uint8_t*>(buf), len, offset);
  return pwrite_all(fd_.get(), buf, len, static_cast<off_t>(offset));
}

Result<void> Qcow2Image::pwrite_meta(const void* buf, size_t len, uint64_t offset, const char* what) {
  auto r = file_write(buf, len, offset);
  if (!r) return fail(r.error().with_context(fmt::format("{}: writing {} at offset {}", path_, what, hex(offset))));
  return ok();
}

Result<void> Qcow2Image::load(const Qcow2OpenOptions& options, int chain_depth) {
  uint64_t fsize = file_size();
  uint8_t h[112] = {};
  if (fsize < 72) return fail_invalid("{}: file is too short for a qcow2 header ({} bytes)", path_, fsize);
  TRY(file_read(h, std::min<uint64_t>(sizeof(h), fsize), 0));
  if (load_be32(h) != kMagic) return fail_invalid("{}: not a qcow2 image (bad magic)", path_);
  uint32_t version = load_be32(h + 4);
  if (version != 2 && version != 3)
    return fail_invalid("{}: unsupported qcow2 version {} (only 2 and 3 exist)", path_, version);
  version_ = static_cast<int>(version);
  uint64_t backing_offset = load_be64(h + 8);
  uint32_t backing_size = load_be32(h + 16);
  cluster_bits_ = load_be32(h + 20);
  size_ = load_be64(h + 24);
  uint32_t crypt = load_be32(h + 32);
  l1_size_ = load_be32(h + 36);
  l1_offset_ = load_be64(h + 40);
  rt_offset_ = load_be64(h + 48);
  rt_clusters_ = load_be32(h + 56);
  nb_snapshots_ = load_be32(h + 60);
  snapshots_offset_ = load_be64(h + 64);
  if (cluster_bits_ < 9 || cluster_bits_ > 21)
    return fail_invalid("{}: cluster size 2^{} is outside 512 B..2 MiB", path_, cluster_bits_);
  cluster_size_ = 1U << cluster_bits_;
  if (version_ == 3) {
    if (fsize < 104) return fail_invalid("{}: file is too short for a qcow2 v3 header", path_);
    incompat_ = load_be64(h + 72);
    compat_ = load_be64(h + 80);
    autoclear_ = load_be64(h + 88);
    refcount_order_ = load_be32(h + 96);
    header_length_ = load_be32(h + 100);
    if (header_length_ < 104 || header_length_ > cluster_size_)
      return fail_invalid("{}: bad header length {}", path_, header_length_);
    if (header_length_ > 104) compression_ = static_cast<Qcow2Compression>(h[104]);
  } else {
    refcount_order_ = 4;
    header_length_ = 72;
  }
  if (refcount_order_ > 6)
    return fail_invalid("{}: refcount width 2^{} bits is more than 64", path_, refcount_order_);
  if (crypt != 0)
    return fail(ENOTSUP, fmt::format("{}: encrypted qcow2 images (method {}) are not supported", path_, crypt));

  // The header cluster: extensions, and the backing file name.
  std::vector<uint8_t> hc(std::min<uint64_t>(cluster_size_, fsize));
  TRY(file_read(hc.data(), hc.size(), 0));
  uint64_t ext_end = backing_offset ? backing_offset : hc.size();
  TRY(parse_extensions(hc, header_length_, std::min<uint64_t>(ext_end, hc.size())));

  if (incompat_ & ~kIncKnown) {
    std::string names;
    for (int bit = 0; bit < 64; ++bit) {
      if (!(incompat_ & ~kIncKnown & (1ULL << bit))) continue;
      std::string name = fmt::format("unknown incompatible feature bit {}", bit);
      for (auto& [type, bit_name] : feature_names_)
        if (type == 0 && bit_name.first == bit) name = fmt::format("'{}' (bit {})", bit_name.second, bit);
      names += (names.empty() ? "" : ", ") + name;
    }
    return fail(ENOTSUP, fmt::format("{}: the image uses qcow2 features this version cannot handle: {}",
                                     path_, names));
  }
  if (incompat_ & kIncDataFile)
    return fail(ENOTSUP, fmt::format("{}: qcow2 images with an external data file are not supported", path_));
  if (incompat_ & kIncCompression) {
    if (compression_ != Qcow2Compression::Zlib && compression_ != Qcow2Compression::Zstd)
      return fail_invalid("{}: unknown compression type {}", path_, static_cast<int>(compression_));
  } else if (compression_ != Qcow2Compression::Zlib) {
    return fail_invalid("{}: compression type {} set without the compression-type feature bit", path_,
                        static_cast<int>(compression_));
  }
  extended_l2_ = incompat_ & kIncExtendedL2;
  if (extended_l2_ && cluster_bits_ < 14)
    return fail_invalid("{}: extended L2 entries need clusters of at least 16 KiB", path_);
  l2_entry_size_ = extended_l2_ ? 16 : 8;
  l2_bits_ = cluster_bits_ - (extended_l2_ ? 4 : 3);
  subcluster_bits_ = extended_l2_ ? cluster_bits_ - 5 : cluster_bits_;
  csize_shift_ = 62 - (cluster_bits_ - 8);
  csize_mask_ = (1ULL << (cluster_bits_ - 8)) - 1;
  coffset_mask_ = (1ULL << csize_shift_) - 1;
  refblock_entries_ = (uint64_t{cluster_size_} * 8) >> refcount_order_;

  if (!read_only_) {
    if ((incompat_ & kIncCorrupt) && !options.for_repair)
      return fail_invalid("{}: the image is marked corrupt; check it with 'keel-img check -r all'", path_);
  }

  // Sizes and tables.
  uint64_t l2_coverage = uint64_t{1} << (cluster_bits_ + l2_bits_);
  if (size_ > (1ULL << 62)) return fail_invalid("{}: virtual size {} is too large", path_, size_);
  uint64_t l1_needed = (size_ + l2_coverage - 1) / l2_coverage;
  if (uint64_t{l1_size_} * 8 > kMaxL1Bytes)
    return fail_invalid("{}: L1 table of {} entries is too large", path_, l1_size_);
  if (l1_size_ < l1_needed)
    return fail_invalid("{}: L1 table ({} entries) is too small for the virtual size {}", path_, l1_size_, size_);
  if (l1_size_ && (l1_offset_ % cluster_size_))
    return fail_invalid("{}: L1 table offset {} is not cluster aligned", path_, hex(l1_offset_));
  if (rt_offset_ % cluster_size_ || rt_offset_ == 0)
    return fail_invalid("{}: refcount table offset {} is invalid", path_, hex(rt_offset_));
  if (uint64_t{rt_clusters_} * cluster_size_ > kMaxRefTableBytes || rt_clusters_ == 0)
    return fail_invalid("{}: refcount table of {} clusters is invalid", path_, rt_clusters_);
  if (nb_snapshots_ > 65536) return fail_invalid("{}: too many snapshots ({})", path_, nb_snapshots_);
  if (nb_snapshots_ && snapshots_offset_ % cluster_size_)
    return fail_invalid("{}: snapshot table offset {} is not cluster aligned", path_, hex(snapshots_offset_));

  if (backing_offset) {
    if (backing_size > 1023 || backing_offset >= hc.size() || backing_size > hc.size() - backing_offset)
      return fail_invalid("{}: backing file name at {} ({} bytes) is out of bounds", path_,
                          hex(backing_offset), backing_size);
    backing_file_.assign(reinterpret_cast<const char*>(hc.data() + backing_offset), backing_size);
  }

  l1_.assign(l1_size_, 0);
  if (l1_size_) {
    std::vector<uint8_t> buf(uint64_t{l1_size_} * 8);
    TRY(pread_meta(buf.data(), buf.size(), l1_offset_, "L1 table"));
    for (uint32_t i = 0; i < l1_size_; ++i) l1_[i] = load_be64(buf.data() + i * 8);
  }
  {
    uint64_t entries = uint64_t{rt_clusters_} * cluster_size_ / 8;
    std::vector<uint8_t> buf(entries * 8);
    TRY(pread_meta(buf.data(), buf.size(), rt_offset_, "refcount table"));
    rt_.resize(entries);
    for (uint64_t i = 0; i < entries; ++i) rt_[i] = load_be64(buf.data() + i * 8);
    // Trailing empty entries need no memory of their own.
    while (!rt_.empty() && rt_.back() == 0) rt_.pop_back();
  }
  TRY(load_snapshots());

  // Caches: enough L2 tables for 32 GiB..many TiB of virtual disk, bounded in memory.
  size_t l2_slots = std::clamp<size_t>((32u << 20) / cluster_size_, 16, 4096);
  size_t rb_slots = std::clamp<size_t>((4u << 20) / cluster_size_, 8, 1024);
  l2_cache_.slots.resize(l2_slots);
  rb_cache_.slots.resize(rb_slots);

  if (!read_only_ && (autoclear_ != 0)) {
    // We do not keep bitmaps (or anything behind autoclear bits) up to date: clear them, as the
    // spec requires of writers that do not understand them.
    autoclear_ = 0;
    uint8_t z[8] = {};
    TRY(pwrite_meta(z, 8, 88, "header"));
  }

  lazy_ = !read_only_ && version_ == 3 && (compat_ & 1);
  if (!read_only_ && (incompat_ & kIncDirty) && !options.for_repair) {
    // Not closed cleanly: its refcounts may lag behind its L2 tables. Repair before any write, as
    // QEMU does (a check that fixes everything, rebuilding the refcount structure if it must).
    auto repaired = check(RepairMode::All);
    if (!repaired)
      return fail(repaired.error().with_context(fmt::format("{}: could not repair dirty image", path_)));
    // The details at info level, at most 50 lines: a daemon's log need not hold one per cluster.
    constexpr size_t kMaxLogged = 50;
    for (size_t i = 0; i < repaired->messages.size() && i < kMaxLogged; ++i)
      KEEL_LOG_INFO("{}: {}", path_, repaired->messages[i]);
    if (repaired->messages.size() > kMaxLogged)
      KEEL_LOG_INFO("{}: ... and {} more lines", path_, repaired->messages.size() - kMaxLogged);
    if (repaired->check_errors || !repaired->failure.empty())
      return fail(EIO, fmt::format("{}: could not repair dirty image: {}", path_,
                                   repaired->failure.empty() ? "check errors" : repaired->failure));
    KEEL_LOG_WARN("{}: image was not closed cleanly (dirty bit set); repaired {} leaked clusters and {} "
                  "corruptions{}", path_, repaired->leaks_fixed, repaired->corruptions_fixed,
                  repaired->corruptions ? fmt::format(", {} corruptions remain", repaired->corruptions) : "");
    open_repair_ = std::move(*repaired);
  }

  if (!backing_file_.empty() && options.open_backing) {
    backing_resolved_ = backing_path();
    std::optional<ImageFormat> fmt;
    if (!backing_format_.empty()) fmt = TRY_CTX(parse_format(backing_format_), path_ + ": backing format");
    auto backing = open_image_internal(backing_resolved_, OpenMode::ReadOnly, fmt, chain_depth + 1,
                                       options.direct ? CacheMode::None : CacheMode::Writeback);
    if (!backing)
      return fail(backing.error().with_context(fmt::format("{}: opening backing file", path_)));
    backing_ = std::move(*backing);
  }
  return ok();
}

std::string Qcow2Image::backing_path() const {
  if (backing_file_.empty()) return {};
  if (!backing_file_.empty() && backing_file_[0] == '/') return backing_file_;
  if (backing_file_.find(':') != std::string::npos && backing_file_.rfind("file:", 0) == 0)
    return backing_file_.substr(5);
  std::filesystem::path dir = std::filesystem::path(path_).parent_path();
  return (dir / backing_file_).string();
}

Result<void> Qcow2Image::parse_extensions(const std::vector<uint8_t>& hc, uint64_t pos, uint64_t end) {
  while (pos + 8 <= end) {
    uint32_t type = load_be32(hc.data() + pos);
    uint32_t len = load_be32(hc.data() + pos + 4);
    pos += 8;
    if (type == kExtEnd) break;
    if (len > end - pos)
      return fail_invalid("{}: header extension {} at {} ({} bytes) overruns the header cluster", path_,
                          hex(type), hex(pos - 8), len);
    const uint8_t* data = hc.data() + pos;
    if (type == kExtBackingFormat) {
      backing_format_.assign(reinterpret_cast<const char*>(data), strnlen(reinterpret_cast<const char*>(data), len));
    } else if (type == kExtFeatureNames) {
      for (uint32_t i = 0; i + 48 <= len; i += 48) {
        const char* name = reinterpret_cast<const char*>(data + i + 2);
        feature_names_.push_back({data[i], {data[i + 1], std::string(name, strnlen(name, 46))}});
      }
    } else {
      unknown_extensions_.push_back({type, std::vector<uint8_t>(data, data + len)});
    }
    pos += (uint64_t{len} + 7) & ~7ULL;
  }
  return ok();
}

Result<void> Qcow2Image::load_snapshots() {
  snapshots_.clear();
  uint64_t pos = snapshots_offset_;
  uint64_t fsize = file_size();
  for (uint32_t i = 0; i < nb_snapshots_; ++i) {
    uint8_t h[40];
    TRY(pread_meta(h, sizeof(h), pos, "snapshot table"));
    Qcow2Snapshot s;
    s.l1_offset = load_be64(h);
    s.l1_size = load_be32(h + 8);
    uint16_t id_size = load_be16(h + 12);
    uint16_t name_size = load_be16(h + 14);
    s.date_sec = load_be32(h + 16);
    s.date_nsec = load_be32(h + 20);
    s.vm_clock_nsec = load_be64(h + 24);
    s.vm_state_size = load_be32(h + 32);
    uint32_t extra_size = load_be32(h + 36);
    if (extra_size > 1024)
      return fail_invalid("{}: snapshot {} has {} bytes of extra data (at most 1024 allowed)", path_, i, extra_size);
    if (uint64_t{s.l1_size} * 8 > kMaxL1Bytes || (s.l1_offset % cluster_size_) || s.l1_offset >= fsize)
      return fail_invalid("{}: snapshot {} has a bad L1 table ({} entries at {})", path_, i, s.l1_size,
                          hex(s.l1_offset));
    pos += 40;
    std::vector<uint8_t> rest(extra_size + id_size + name_size);
    TRY(pread_meta(rest.data(), rest.size(), pos, "snapshot table"));
    if (extra_size >= 8) s.vm_state_size = load_be64(rest.data());
    if (extra_size >= 16) s.disk_size = load_be64(rest.data() + 8);
    else s.disk_size = size_;
    if (extra_size >= 24) s.icount = load_be64(rest.data() + 16);
    if (extra_size > 24) s.extra.assign(rest.begin() + 24, rest.begin() + extra_size);
    s.id.assign(reinterpret_cast<const char*>(rest.data() + extra_size), id_size);
    s.name.assign(reinterpret_cast<const char*>(rest.data() + extra_size + id_size), name_size);
    pos += rest.size();
    pos = (pos + 7) & ~7ULL;
    snapshots_.push_back(std::move(s));
  }
  snapshot_table_bytes_ = pos - snapshots_offset_;
  return ok();
}

// ---------------------------------------------------------------------------------------------
// Metadata caches

Result<void> Qcow2Image::cache_write_slot(TableSlot& slot, bool is_l2) {
  if (!slot.dirty) return ok();
  if (is_l2) {
    wait_for_deferred_writes();
    TRY(ensure_refcounts_before_l2());
  }
  TRY(pwrite_meta(slot.data.data(), cluster_size_, slot.offset, is_l2 ? "L2 table" : "refcount block"));
  slot.dirty = false;
  return ok();
}

Result<void> Qcow2Image::ensure_refcounts_before_l2() {
  bool any = rt_dirty_;
  for (auto& s : rb_cache_.slots) any = any || s.dirty;
  if (!any) return ok();
  // Lazy refcounts: the blocks stay cached; the dirty bit tells a later open to rebuild them.
  if (lazy_) return mark_dirty();
  TRY(flush_refcounts());
  TRY(sync_file());
  return ok();
}

Result<uint8_t*> Qcow2Image::cache_get(TableCache& cache, uint64_t offset, bool load, bool is_l2) {
  ++cache.tick;
  auto it = cache.index.find(offset);
  if (it != cache.index.end()) {
    TableSlot& s = cache.slots[it->second];
    s.used = cache.tick;
    return s.data.data();
  }
  size_t victim = 0;
  uint64_t oldest = UINT64_MAX;
  for (size_t i = 0; i < cache.slots.size(); ++i) {
    if (cache.slots[i].offset == 0) {
      victim = i;
      oldest = 0;
      break;
    }
    if (cache.slots[i].used < oldest) {
      oldest = cache.slots[i].used;
      victim = i;
    }
  }
  TableSlot& s = cache.slots[victim];
  if (s.offset != 0) {
    TRY(cache_write_slot(s, is_l2));
    cache.index.erase(s.offset);
    s.offset = 0;
  }
  if (s.data.size() != cluster_size_) s.data.assign(cluster_size_, 0);
  if (load) {
    TRY(pread_meta(s.data.data(), cluster_size_, offset, is_l2 ? "L2 table" : "refcount block"));
  } else {
    std::fill(s.data.begin(), s.data.end(), 0);
  }
  s.offset = offset;
  s.dirty = !load;
  s.used = cache.tick;
  cache.index[offset] = victim;
  return s.data.data();
}

// ---------------------------------------------------------------------------------------------
// Refcounts

Result<uint8_t*> Qcow2Image::get_refblock(uint64_t range, bool create) {
  if (range < rt_.size() && rt_[range] != 0) {
    uint64_t off = rt_[range] & kRtOffsetMask;
    if (off % cluster_size_)
      return fail_invalid("{}: refcount block {} offset {} is not cluster aligned", path_, range, hex(off));
    return cache_get(rb_cache_, off, true, false);
  }
  if (!create) return nullptr;
  // A range without a block has no allocated clusters, so its first cluster is free: the new
  // block lives there and counts itself.
  uint64_t block_cluster = range * refblock_entries_;
  uint64_t off = block_cluster << cluster_bits_;
  if (range >= rt_.size()) rt_.resize(range + 1, 0);
  rt_[range] = off;
  rt_dirty_ = true;
  uint8_t* block = TRY(cache_get(rb_cache_, off, false, false));
  rb_cache_.slots[rb_cache_.index[off]].dirty = true;
  // Entry 0 of this block is the block itself.
  switch (refcount_order_) {
    case 0: case 1: case 2: block[0] |= 1; break;
    case 3: block[0] = 1; break;
    case 4: store_be16(block, 1); break;
    case 5: store_be32(block, 1); break;
    default: store_be64(block, 1); break;
  }
  if (free_hint_ == block_cluster) ++free_hint_;
  return block;
}

Result<uint64_t> Qcow2Image::get_refcount(uint64_t cluster) {
  uint64_t range = cluster / refblock_entries_;
  uint64_t idx = cluster % refblock_entries_;
  uint8_t* block = TRY(get_refblock(range, false));
  if (!block) return uint64_t{0};
  switch (refcount_order_) {
    case 0: case 1: case 2: {
      uint32_t bits = 1U << refcount_order_;
      uint64_t bit = idx * bits;
      return uint64_t{(block[bit / 8] >> (bit % 8)) & ((1U << bits) - 1)};
    }
    case 3: return uint64_t{block[idx]};
    case 4: return uint64_t{load_be16(block + idx * 2)};
    case 5: return uint64_t{load_be32(block + idx * 4)};
    default: return load_be64(block + idx * 8);
  }
}

Result<void> Qcow2Image::set_refcount(uint64_t cluster, uint64_t value) {
  uint64_t range = cluster / refblock_entries_;
  uint64_t idx = cluster % refblock_entries_;
  uint8_t* block = TRY(get_refblock(range, value != 0));
  if (!block) return ok();
  uint32_t bits = 1U << refcount_order_;
  if (bits < 64 && value >= (1ULL << bits))
    return fail(EOVERFLOW, fmt::format("{}: refcount of cluster {} would overflow {} bits", path_, cluster, bits));
  switch (refcount_order_) {
    case 0: case 1: case 2: {
      uint64_t bit = idx * bits;
      uint8_t mask = static_cast<uint8_t>(((1U << bits) - 1) << (bit % 8));
      block[bit / 8] = static_cast<uint8_t>((block[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
      break;
    }
    case 3: block[idx] = static_cast<uint8_t>(value); break;
    case 4: store_be16(block + idx * 2, static_cast<uint16_t>(value)); break;
    case 5: store_be32(block + idx * 4, static_cast<uint32_t>(value)); break;
    default: store_be64(block + idx * 8, value); break;
  }
  uint64_t off = rt_[range] & kRtOffsetMask;
  rb_cache_.slots[rb_cache_.index[off]].dirty = true;
  // A freed cluster may be reused for anything: never append compressed data to it again.
  if (value == 0 && compressed_next_ && cluster == (compressed_next_ >> cluster_bits_))
    compressed_next_ = compressed_end_ = 0;
  return ok();
}

Result<void> Qcow2Image::add_refcount(uint64_t cluster, int64_t delta) {
  uint64_t rc = TRY(get_refcount(cluster));
  if (delta < 0 && rc < static_cast<uint64_t>(-delta))
    return fail_invalid("{}: refcount of cluster {} (host offset {}) would drop below zero", path_, cluster,
                        hex(cluster << cluster_bits_));
  uint64_t value = rc + static_cast<uint64_t>(delta);
  TRY(set_refcount(cluster, value));
  if (value == 0 && cluster < free_hint_) free_hint_ = cluster;
  return ok();
}

Result<uint64_t> Qcow2Image::allocate_clusters(uint64_t min_count, uint64_t max_count, uint64_t* got) {
  uint64_t c = free_hint_;
  uint64_t first_free = UINT64_MAX;  // first free cluster this scan saw (maybe in a run too short)
  while (true) {
    // Ranges without a refcount block get one first (in their own first cluster).
    uint64_t range = c / refblock_entries_;
    if (range >= rt_.size() || rt_[range] == 0) TRY(get_refblock(range, true));
    if (TRY(get_refcount(c)) != 0) {
      ++c;
      continue;
    }
    first_free = std::min(first_free, c);
    uint64_t n = 1;
    bool broke = false;
    while (n < max_count) {
      uint64_t next = c + n;
      uint64_t r = next / refblock_entries_;
      if (r >= rt_.size() || rt_[r] == 0) {
        if (next % refblock_entries_ == 0) {  // its block will take this very cluster
          broke = true;
          break;
        }
        TRY(get_refblock(r, true));
      }
      if (TRY(get_refcount(next)) != 0) {
        broke = true;
        break;
      }
      ++n;
    }
    if (n < min_count) {
      c += n + (broke ? 0 : 0);
      continue;
    }
    for (uint64_t i = 0; i < n; ++i) TRY(set_refcount(c + i, 1));
    // Everything between the hint and the first free cluster seen is in use: the next scan starts
    // there (not at the old hint, which made every allocation rescan the image from its start).
    if (free_hint_ <= first_free) free_hint_ = first_free == c ? c + n : first_free;
    *got = n;
    return c << cluster_bits_;
  }
}

Result<uint64_t> Qcow2Image::allocate_one_cluster() {
  uint64_t got = 0;
  return allocate_clusters(1, 1, &got);
}

Result<void> Qcow2Image::free_later(uint64_t host_offset, uint64_t bytes) {
  if (bytes == 0) return ok();
  pending_frees_.push_back({host_offset, bytes});
  return ok();
}

Result<void> Qcow2Image::free_now(uint64_t host_offset, uint64_t bytes) {
  uint64_t first = host_offset >> cluster_bits_;
  uint64_t last = (host_offset + bytes - 1) >> cluster_bits_;
  for (uint64_t c = first; c <= last; ++c) TRY(add_refcount(c, -1));
  return ok();
}

Result<void> Qcow2Image::flush_refcounts() {
  uint64_t capacity = uint64_t{rt_clusters_} * cluster_size_ / 8;
  while (rt_.size() > capacity) {
    TRY(relocate_refcount_table());
    capacity = uint64_t{rt_clusters_} * cluster_size_ / 8;
  }
  for (auto& s : rb_cache_.slots)
    if (s.offset && s.dirty) TRY(cache_write_slot(s, false));
  if (rt_dirty_) {
    std::vector<uint8_t> buf(rt_.size() * 8);
    for (size_t i = 0; i < rt_.size(); ++i) store_be64(buf.data() + i * 8, rt_[i]);
    TRY(pwrite_meta(buf.data(), buf.size(), rt_offset_, "refcount table"));
    rt_dirty_ = false;
  }
  return ok();
}

Result<void> Qcow2Image::relocate_refcount_table() {
  uint64_t old_offset = rt_offset_;
  uint64_t old_clusters = rt_clusters_;
  uint64_t want = rt_.size() + rt_.size() / 2 + 8;
  uint64_t clusters = (want * 8 + cluster_size_ - 1) / cluster_size_;
  uint64_t offset = 0;
  while (true) {
    uint64_t got = 0;
    offset = TRY(allocate_clusters(clusters, clusters, &got));
    if (rt_.size() * 8 <= clusters * cluster_size_) break;
    TRY(free_now(offset, clusters * cluster_size_));
    clusters *= 2;
  }
  if (clusters * cluster_size_ > kMaxRefTableBytes * 4)
    return fail(EFBIG, fmt::format("{}: refcount table would grow too large", path_));
  for (auto& s : rb_cache_.slots)
    if (s.offset && s.dirty) TRY(cache_write_slot(s, false));
  TRY(install_refcount_table(offset, clusters));
  TRY(free_now(old_offset, old_clusters * cluster_size_));
  return ok();
}

Result<void> Qcow2Image::install_refcount_table(uint64_t offset, uint64_t clusters) {
  std::vector<uint8_t> buf(clusters * cluster_size_, 0);
  for (size_t i = 0; i < rt_.size(); ++i) store_be64(buf.data() + i * 8, rt_[i]);
  TRY(pwrite_meta(buf.data(), buf.size(), offset, "refcount table"));
  TRY(sync_file());
  uint8_t h[12];
  store_be64(h, offset);
  store_be32(h + 8, static_cast<uint32_t>(clusters));
  TRY(pwrite_meta(h, sizeof(h), 48, "header"));
  TRY(sync_file());
  rt_offset_ = offset;
  rt_clusters_ = static_cast<uint32_t>(clusters);
  rt_dirty_ = false;
  return ok();
}

Result<void> Qcow2Image::flush_metadata() {
  if (read_only_) return ok();
  wait_for_deferred_writes();
  bool tables_dirty = l1_dirty_;
  for (auto& s : l2_cache_.slots) tables_dirty = tables_dirty || (s.offset && s.dirty);
  // (Lazy refcounts with no table to write: no dirty bit needed; the blocks stay cached.)
  if (!lazy_ || tables_dirty) TRY(ensure_refcounts_before_l2());
  bool wrote = false;
  for (auto& s : l2_cache_.slots)
    if (s.offset && s.dirty) {
      TRY(cache_write_slot(s, true));
      wrote = true;
    }
  if (l1_dirty_) {
    if (wrote) TRY(sync_file());
    TRY(write_l1());
    wrote = true;
  }
  if (!pending_frees_.empty()) {
    if (wrote) TRY(sync_file());
    auto frees = std::move(pending_frees_);
    pending_frees_.clear();
    for (auto& [off, bytes] : frees) TRY(free_now(off, bytes));
    // Lazy refcounts: as QEMU's flush of a dirty image, the blocks stay cached until close.
    if (!lazy_) TRY(flush_refcounts());
  }
  return ok();
}

Result<void> Qcow2Image::mark_dirty() {
  if (incompat_ & kIncDirty) return ok();
  uint8_t b[8];
  store_be64(b, incompat_ | kIncDirty);
  TRY(pwrite_meta(b, sizeof(b), 72, "header"));
  // The bit must be on disk before any L2 entry whose cluster the refcounts do not count yet.
  TRY(sync_file());
  incompat_ |= kIncDirty;
  we_set_dirty_ = true;
  return ok();
}

Result<void> Qcow2Image::mark_clean() {
  if (version_ < 3 || !(incompat_ & (kIncDirty | kIncCorrupt))) return ok();
  uint8_t b[8];
  store_be64(b, incompat_ & ~(kIncDirty | kIncCorrupt));
  TRY(pwrite_meta(b, sizeof(b), 72, "header"));
  TRY(sync_file());
  incompat_ &= ~(kIncDirty | kIncCorrupt);
  we_set_dirty_ = false;
  return ok();
}

Result<void> Qcow2Image::pwrite_data(const uint8_t* data, size_t length, uint64_t host) {
  TRY(file_write(data, length, host));
  holes_.note_data(host, length);
  return ok();
}

Result<void> Qcow2Image::sync_file() {
  if (unsafe_cache_) return ok();
  if (::fdatasync(fd_.get()) < 0) return fail_errno("fdatasync " + path_);
  return ok();
}

void Qcow2Image::defer_write(uint64_t host, const uint8_t* data, size_t length, uint64_t voffset) {
  {
    std::lock_guard lk(inflight_mutex_);
    inflight_ranges_.push_back({voffset, voffset + length});
  }
  inflight_.fetch_add(1);
  t_deferred.emplace_back(this, host, data, length, voffset);
}

bool Qcow2Image::overlaps_inflight(uint64_t offset, uint64_t length) const {
  for (auto& [a, b] : inflight_ranges_)
    if (a < offset + length && offset < b) return true;
  return false;
}

void Qcow2Image::wait_for_range(std::unique_lock<std::mutex>& meta_lock, uint64_t offset, uint64_t length) {
  // Reads and writes of a cluster whose new data is still on its way wait for it: they would see
  // whatever the freshly allocated cluster held before.
  while (true) {
    {
      std::unique_lock lk(inflight_mutex_);
      if (!overlaps_inflight(offset, length)) return;
      meta_lock.unlock();
      inflight_cv_.wait(lk, [&] { return !overlaps_inflight(offset, length); });
    }
    meta_lock.lock();
  }
}

Result<void> Qcow2Image::run_deferred_writes() {
  Result<void> result = ok();
  for (auto& [owner, host, data, length, voffset] : t_deferred) {
    if (owner != this) continue;
    if (result) {
      auto r = pwrite_data(data, length, host);
      if (!r) result = fail(r.error().with_context(fmt::format("write {} at host offset {}", path_, hex(host))));
    }
    {
      std::lock_guard lk(inflight_mutex_);
      inflight_.fetch_sub(1);
      for (auto it = inflight_ranges_.begin(); it != inflight_ranges_.end(); ++it)
        if (it->first == voffset && it->second == voffset + length) {
          inflight_ranges_.erase(it);
          break;
        }
    }
    inflight_cv_.notify_all();
  }
  std::erase_if(t_deferred, [this](auto& d) { return std::get<0>(d) == this; });
  return result;
}

void Qcow2Image::wait_for_deferred_writes() {
  if (inflight_.load() == 0) return;
  // Our own thread's writes first (never wait on ourselves).
  if (!t_deferred.empty()) {
    auto r = run_deferred_writes();
    if (!r) KEEL_LOG_ERROR("{}", r.error().message());
  }
  std::unique_lock lk(inflight_mutex_);
  inflight_cv_.wait(lk, [this] { return inflight_.load() == 0; });
}

Result<void> Qcow2Image::write_l1() {
  std::vector<uint8_t> buf(l1_.size() * 8);
  for (size_t i = 0; i < l1_.size(); ++i) store_be64(buf.data() + i * 8, l1_[i]);
  if (!buf.empty()) TRY(pwrite_meta(buf.data(), buf.size(), l1_offset_, "L1 table"));
  l1_dirty_ = false;
  return ok();
}

// ---------------------------------------------------------------------------------------------
// L2 tables

uint64_t Qcow2Image::l2_entry(const uint8_t* table, uint64_t index) const {
  return load_be64(table + index * l2_entry_size_);
}
uint64_t Qcow2Image::l2_bitmap(const uint8_t* table, uint64_t index) const {
  return extended_l2_ ? load_be64(table + index * l2_entry_size_ + 8) : 0;
}
void Qcow2Image::set_l2_entry(uint8_t* table, uint64_t index, uint64_t entry) {
  store_be64(table + index * l2_entry_size_, entry);
}

Result<uint8_t*> Qcow2Image::get_l2(uint64_t l1_index, bool for_write) {
  if (l1_index >= l1_.size())
    return fail_invalid("{}: L1 index {} is beyond the L1 table ({} entries)", path_, l1_index, l1_.size());
  uint64_t entry = l1_[l1_index];
  uint64_t off = entry & kL1OffsetMask;
  if (off % cluster_size_)
    return fail_invalid("{}: L2 table offset {} (L1 index {}) is not cluster aligned", path_, hex(off), l1_index);
  if (off == 0 && !for_write) return nullptr;
  if (off != 0 && off < cluster_size_)
    return fail_invalid("{}: L2 table of L1 index {} overlaps the header", path_, l1_index);
  if (!for_write) return cache_get(l2_cache_, off, true, true);
  if (off != 0 && (entry & kOflagCopied)) {
    uint8_t* t = TRY(cache_get(l2_cache_, off, true, true));
    return t;
  }
  // A new table, or a copy of a shared one.
  std::vector<uint8_t>& tmp = t_scratch.cluster;
  scratch_buffer(tmp, cluster_size_);
  if (off != 0) {
    uint8_t* old = TRY(cache_get(l2_cache_, off, true, true));
    std::memcpy(tmp.data(), old, cluster_size_);
  }
  uint64_t new_off = TRY(allocate_one_cluster());
  uint8_t* table = TRY(cache_get(l2_cache_, new_off, false, true));
  if (off != 0) std::memcpy(table, tmp.data(), cluster_size_);
  l2_cache_.slots[l2_cache_.index[new_off]].dirty = true;
  l1_[l1_index] = new_off | kOflagCopied;
  l1_dirty_ = true;
  if (off != 0) TRY(free_later(off, cluster_size_));
  return table;
}

// ---------------------------------------------------------------------------------------------
// Reading

Result<void> Qcow2Image::check_range(uint64_t offset, uint64_t length, const char* op) const {
  if (offset > size_ || length > size_ - offset)
    return fail_invalid("{} {}: range {}+{} is beyond the end of the disk ({} bytes)", op, path_, offset,
                        length, size_);
  return ok();
}

Result<void> Qcow2Image::check_host_offset(uint64_t host, uint64_t voffset) const {
  if (host % cluster_size_)
    return fail_invalid("{}: data cluster for virtual offset {} is at unaligned host offset {}", path_,
                        hex(voffset), hex(host));
  if (host < cluster_size_)
    return fail_invalid("{}: data cluster for virtual offset {} overlaps the header", path_, hex(voffset));
  return ok();
}

void Qcow2Image::compressed_range(uint64_t desc, uint64_t* host, uint64_t* bytes) const {
  uint64_t coffset = desc & coffset_mask_;
  uint64_t nb_sectors = ((desc >> csize_shift_) & csize_mask_) + 1;
  *host = coffset & ~511ULL;
  *bytes = nb_sectors * 512;
}

Result<Qcow2Image::Run> Qcow2Image::resolve(uint64_t offset, uint64_t max_length) {
  Run run{RunKind::Unallocated, 0, 0};
  uint64_t pos = offset;
  uint64_t end = offset + max_length;
  uint64_t unit = uint64_t{1} << subcluster_bits_;
  bool first = true;
  while (pos < end) {
    uint64_t l1_index = pos >> (cluster_bits_ + l2_bits_);
    uint64_t l2_index = (pos >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
    uint8_t* table = TRY(get_l2(l1_index, false));
    uint64_t in_cluster = pos & (cluster_size_ - 1);
    RunKind kind = RunKind::Unallocated;
    uint64_t host = 0;
    uint64_t piece_end = std::min(end, (pos | (unit - 1)) + 1);
    if (table) {
      uint64_t e = l2_entry(table, l2_index);
      if (e & kOflagCompressed) {
        if (extended_l2_ && l2_bitmap(table, l2_index) != 0)
          return fail_invalid("{}: compressed cluster at virtual offset {} has a subcluster bitmap", path_,
                              hex(pos));
        kind = RunKind::Compressed;
        host = e & ~(kOflagCompressed | kOflagCopied);
        piece_end = std::min(end, (pos | (cluster_size_ - 1)) + 1);
      } else if (extended_l2_) {
        uint64_t bitmap = l2_bitmap(table, l2_index);
        uint64_t sc = in_cluster >> subcluster_bits_;
        uint64_t hoff = e & kL2OffsetMask;
        if ((bitmap >> 32) & bitmap & (1ULL << sc))
          return fail_invalid("{}: subcluster at virtual offset {} is marked both allocated and zero", path_,
                              hex(pos));
        if (bitmap & (1ULL << (32 + sc))) {
          kind = RunKind::Zero;
          if (hoff) host = hoff + in_cluster;
        } else if (!(bitmap & (1ULL << sc))) {
          // Unallocated, though its cluster has a place: qemu-img map shows that place.
          if (hoff) host = hoff + in_cluster;
        } else {
          if (hoff == 0)
            return fail_invalid("{}: subcluster at virtual offset {} is allocated but its cluster has no offset",
                                path_, hex(pos));
          TRY(check_host_offset(hoff, pos));
          kind = RunKind::Data;
          host = hoff + in_cluster;
        }
      } else {
        uint64_t hoff = e & kL2OffsetMask;
        if (e & kOflagZero) {
          kind = RunKind::Zero;
          if (hoff) host = hoff + in_cluster;
        } else if (hoff) {
          TRY(check_host_offset(hoff, pos));
          kind = RunKind::Data;
          host = hoff + in_cluster;
        }
      }
    }
    if (first) {
      run.kind = kind;
      run.host = host;
      first = false;
    } else if (kind != run.kind || kind == RunKind::Compressed ||
               (host != 0) != (run.host != 0) ||
               (host != 0 && host != run.host + run.length)) {
      break;
    }
    run.length += piece_end - pos;
    pos = piece_end;
    if (kind == RunKind::Compressed) break;
  }
  return run;
}

Result<void> Qcow2Image::read_compressed(uint64_t desc, uint8_t* out) {
  uint64_t coffset = desc & coffset_mask_;
  uint64_t nb_sectors = ((desc >> csize_shift_) & csize_mask_) + 1;
  uint64_t csize = nb_sectors * 512 - (coffset & 511);
  uint8_t* in = scratch_buffer(t_scratch.compressed, csize);
  auto r = file_read(in, csize, coffset);
  if (!r) return fail(r.error().with_context(fmt::format("{}: compressed cluster at {}", path_, hex(coffset))));
  if (compression_ == Qcow2Compression::Zlib) {
    // libdeflate inflates a whole buffer about twice as fast as zlib's streaming inflate. It takes
    // what qemu takes whenever the stream ends within the cluster; streams that run past it (qemu
    // keeps the first cluster's worth) or that libdeflate refuses go through zlib, qemu's own path.
    if (!t_scratch.deflate_d) t_scratch.deflate_d = libdeflate_alloc_decompressor();
    if (t_scratch.deflate_d) {
      size_t in_used = 0, out_len = 0;
      if (libdeflate_deflate_decompress_ex(t_scratch.deflate_d, in, csize, out, cluster_size_, &in_used, &out_len) ==
              LIBDEFLATE_SUCCESS &&
          out_len == cluster_size_)
        return ok();
    }
    z_stream& z = t_scratch.inflater;
    if (!t_scratch.inflater_ready) {
      std::memset(&z, 0, sizeof(z));
      if (inflateInit2(&z, -12) != Z_OK) return fail(ENOMEM, "inflateInit2 failed");
      t_scratch.inflater_ready = true;
    } else {
      inflateReset(&z);
    }
    z.next_in = in;
    z.avail_in = static_cast<uInt>(csize);
    z.next_out = out;
    z.avail_out = cluster_size_;
    int ret = inflate(&z, Z_FINISH);
    if ((ret != Z_STREAM_END && ret != Z_BUF_ERROR) || z.avail_out != 0)
      return fail_invalid("{}: compressed cluster at host offset {} ({} bytes) does not inflate to a full cluster",
                          path_, hex(coffset), csize);
  } else {
    if (!t_scratch.zstd_d) t_scratch.zstd_d = ZSTD_createDCtx();
    if (!t_scratch.zstd_d) return fail(ENOMEM, "ZSTD_createDCtx failed");
    ZSTD_DCtx_reset(t_scratch.zstd_d, ZSTD_reset_session_only);
    ZSTD_inBuffer input{in, csize, 0};
    ZSTD_outBuffer output{out, cluster_size_, 0};
    // qemu's decompressor: stop once the cluster is full; the input may carry padding.
    while (output.pos < output.size) {
      size_t before_in = input.pos, before_out = output.pos;
      size_t ret = ZSTD_decompressStream(t_scratch.zstd_d, &output, &input);
      if (ZSTD_isError(ret))
        return fail_invalid("{}: compressed cluster at host offset {}: zstd: {}", path_, hex(coffset),
                            ZSTD_getErrorName(ret));
      if (input.pos == before_in && output.pos == before_out) break;
      if (ret == 0 && input.pos == input.size) break;
    }
    if (output.pos != output.size)
      return fail_invalid("{}: compressed cluster at host offset {} ({} bytes) decompresses to {} bytes, not {}",
                          path_, hex(coffset), csize, output.pos, cluster_size_);
  }
  return ok();
}

Result<void> Qcow2Image::read_backing(uint64_t offset, std::span<uint8_t> out) {
  if (!backing_) {
    std::memset(out.data(), 0, out.size());
    return ok();
  }
  uint64_t bsize = backing_->size();
  uint64_t n = offset >= bsize ? 0 : std::min<uint64_t>(out.size(), bsize - offset);
  if (n) TRY(backing_->read(offset, out.subspan(0, n)));
  if (n < out.size()) std::memset(out.data() + n, 0, out.size() - n);
  return ok();
}

Result<void> Qcow2Image::read_run(const Run& run, uint64_t offset, std::span<uint8_t> out) {
  switch (run.kind) {
    case RunKind::Zero:
      std::memset(out.data(), 0, out.size());
      return ok();
    case RunKind::Unallocated:
      return read_backing(offset, out);
    case RunKind::Data: {
      auto r = file_read(out.data(), out.size(), run.host);
      if (!r) return fail(r.error().with_context(fmt::format("read {} at host offset {}", path_, hex(run.host))));
      return ok();
    }
    case RunKind::Compressed: {
      Scratch& s = t_scratch;
      if (out.size() == cluster_size_ && (offset & (cluster_size_ - 1)) == 0) {
        // A whole cluster (convert's case): inflate straight into the caller's buffer.
        return read_compressed(run.host, out.data());
      }
      uint8_t* cluster = scratch_buffer(s.decompressed, cluster_size_);
      if (s.decompressed_owner != this || s.decompressed_desc != run.host) {
        s.decompressed_owner = nullptr;
        TRY(read_compressed(run.host, cluster));
        s.decompressed_owner = this;
        s.decompressed_desc = run.host;
      }
      std::memcpy(out.data(), cluster + (offset & (cluster_size_ - 1)), out.size());
      return ok();
    }
  }
  return ok();
}

Result<void> Qcow2Image::read(uint64_t offset, std::span<uint8_t> out) {
  TRY(check_range(offset, out.size(), "read"));
  uint64_t done = 0;
  while (done < out.size()) {
    Run run;
    {
      std::unique_lock lock(mutex_);
      wait_for_range(lock, offset + done, out.size() - done);
      run = TRY(resolve(offset + done, out.size() - done));
    }
    TRY(read_run(run, offset + done, out.subspan(done, run.length)));
    done += run.length;
  }
  return ok();
}

Result<void> Qcow2Image::read_cluster_locked(uint64_t voffset, uint8_t* out) {
  uint64_t len = std::min<uint64_t>(cluster_size_, size_ - voffset);
  uint64_t done = 0;
  while (done < len) {
    Run run = TRY(resolve(voffset + done, len - done));
    if (run.kind == RunKind::Compressed) {
      // Not through the per-thread cache: the cluster is about to change.
      uint8_t* tmp = scratch_buffer(t_scratch.decompressed, cluster_size_);
      t_scratch.decompressed_owner = nullptr;
      TRY(read_compressed(run.host, tmp));
      std::memcpy(out + done, tmp + ((voffset + done) & (cluster_size_ - 1)), run.length);
    } else {
      TRY(read_run(run, voffset + done, std::span<uint8_t>(out + done, run.length)));
    }
    done += run.length;
  }
  if (len < cluster_size_) std::memset(out + len, 0, cluster_size_ - len);
  return ok();
}

Result<std::vector<Extent>> Qcow2Image::block_status(uint64_t offset, uint64_t length) {
  TRY(check_range(offset, length, "block-status"));
  std::vector<Extent> extents;
  auto add = [&](Extent e) {
    if (!extents.empty()) {
      Extent& b = extents.back();
      bool contiguous_file = b.file.empty() ? e.file.empty() : (e.file == b.file && b.file_offset + b.length == e.file_offset);
      if (b.data == e.data && b.zero == e.zero && b.depth == e.depth && b.allocated == e.allocated &&
          b.offset + b.length == e.offset && contiguous_file) {
        b.length += e.length;
        return;
      }
    }
    extents.push_back(std::move(e));
  };
  uint64_t pos = offset, end = offset + length;
  while (pos < end) {
    Run run;
    {
      std::lock_guard lock(mutex_);
      run = TRY(resolve(pos, end - pos));
    }
    // A subcluster not allocated in a cluster that has a place: qemu-img map shows that place when
    // nothing lies below, and what lies below otherwise.
    if (run.kind == RunKind::Unallocated && run.host && !backing_) {
      Extent e;
      e.offset = pos;
      e.length = run.length;
      e.zero = true;
      e.allocated = false;
      e.depth = 0;
      e.file = path_;
      e.file_offset = run.host;
      add(std::move(e));
    } else if (run.kind == RunKind::Unallocated) {
      if (backing_ && pos < backing_->size()) {
        uint64_t n = std::min(run.length, backing_->size() - pos);
        auto sub = TRY(backing_->block_status(pos, n));
        for (auto& e : sub) {
          e.depth += 1;
          add(std::move(e));
        }
        if (n < run.length) {
          Extent e;
          e.offset = pos + n;
          e.length = run.length - n;
          e.zero = true;
          e.allocated = false;
          e.depth = 1;
          add(std::move(e));
        }
      } else {
        Extent e;
        e.offset = pos;
        e.length = run.length;
        e.zero = true;
        e.allocated = false;
        e.depth = backing_ ? 1 : 0;
        add(std::move(e));
      }
    } else {
      Extent e;
      e.offset = pos;
      e.length = run.length;
      e.data = run.kind != RunKind::Zero;
      e.zero = run.kind == RunKind::Zero;
      if (run.kind == RunKind::Zero && run.host) {
        e.file = path_;
        e.file_offset = run.host;
      }
      if (run.kind == RunKind::Data) {
        // Parts of the cluster area that are holes in our file read as zeros (preallocated
        // metadata, or data never written): say so, as qemu-img map does.
        auto pieces = TRY(holes_.pieces(fd_.get(), run.host, run.host + run.length));
        for (auto& piece : pieces) {
          Extent x = e;
          x.offset = pos + (piece.start - run.host);
          x.length = piece.end - piece.start;
          x.zero = !piece.data;
          x.file = path_;
          x.file_offset = piece.start;
          add(std::move(x));
        }
        pos += run.length;
        continue;
      }
      add(std::move(e));
    }
    pos += run.length;
  }
  return extents;
}

// ---------------------------------------------------------------------------------------------
// Writing

Result<void> Qcow2Image::write(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  TRY(check_range(offset, data.size(), "write"));
  uint64_t done = 0;
  while (done < data.size()) {
    uint64_t pos = offset + done;
    // Fast path: an allocated cluster we own alone is overwritten in place, outside the lock.
    Run run;
    bool in_place = false;
    {
      std::unique_lock lock(mutex_);
      // Whole clusters: a read-modify-write reads the rest of the cluster.
      uint64_t wstart = pos & ~uint64_t{cluster_size_ - 1};
      wait_for_range(lock, wstart, ((pos + (data.size() - done) + cluster_size_ - 1) & ~uint64_t{cluster_size_ - 1}) - wstart);
      uint64_t l1_index = pos >> (cluster_bits_ + l2_bits_);
      uint64_t l2_index = (pos >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
      if ((l1_[l1_index] & kOflagCopied) && (l1_[l1_index] & kL1OffsetMask)) {
        uint8_t* table = TRY(get_l2(l1_index, false));
        uint64_t e = l2_entry(table, l2_index);
        if ((e & kOflagCopied) && !(e & (kOflagCompressed | kOflagZero)) && (e & kL2OffsetMask)) {
          run = TRY(resolve(pos, data.size() - done));
          in_place = run.kind == RunKind::Data;
          if (in_place) {
            // Only the clusters we own: stop the run at the first one without the copied flag.
            uint64_t len = 0;
            while (len < run.length) {
              uint64_t p = pos + len;
              uint64_t li = p >> (cluster_bits_ + l2_bits_);
              if (!(l1_[li] & kOflagCopied)) break;
              uint8_t* t = TRY(get_l2(li, false));
              uint64_t ee = l2_entry(t, (p >> cluster_bits_) & ((1ULL << l2_bits_) - 1));
              if (!(ee & kOflagCopied)) break;
              len = std::min(run.length, ((p | (cluster_size_ - 1)) + 1) - pos);
            }
            run.length = len;
            if (len == 0) in_place = false;
            else TRY(check_host_offset(run.host & ~uint64_t{cluster_size_ - 1}, pos));
          }
        }
      }
      if (!in_place) {
        // Allocating write: everything under the lock, up to the end of this L2 table.
        uint64_t table_end = ((pos >> (cluster_bits_ + l2_bits_)) + 1) << (cluster_bits_ + l2_bits_);
        uint64_t n = std::min<uint64_t>(data.size() - done, table_end - pos);
        auto r = extended_l2_ ? write_subclusters_locked(pos, data.subspan(done, n))
                              : write_locked(pos, data.subspan(done, n));
        lock.unlock();
        auto d = run_deferred_writes();
        if (!r) return r;
        if (!d) return d;
        done += n;
        continue;
      }
    }
    if (run.length == 0) continue;
    auto r = pwrite_data(data.data() + done, run.length, run.host);
    if (!r) return fail(r.error().with_context(fmt::format("write {} at host offset {}", path_, hex(run.host))));
    done += run.length;
  }
  return ok();
}

// Writes within one L2 table. Clusters that need allocation are allocated as one contiguous run
// where possible, and their data goes out in one pwrite.
Result<void> Qcow2Image::write_locked(uint64_t offset, std::span<const uint8_t> data) {
  uint64_t l1_index = offset >> (cluster_bits_ + l2_bits_);
  uint8_t* table = TRY(get_l2(l1_index, true));
  uint64_t done = 0;
  while (done < data.size()) {
    uint64_t pos = offset + done;
    uint64_t l2_index = (pos >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
    uint64_t in_cluster = pos & (cluster_size_ - 1);
    uint64_t e = l2_entry(table, l2_index);
    uint64_t hoff = e & kL2OffsetMask;
    uint64_t chunk = std::min<uint64_t>(cluster_size_ - in_cluster, data.size() - done);
    bool owned = (e & kOflagCopied) && hoff && !(e & kOflagCompressed);
    if (owned && !(e & kOflagZero)) {
      TRY(check_host_offset(hoff, pos));
      TRY(pwrite_data(data.data() + done, chunk, hoff + in_cluster));
      done += chunk;
      continue;
    }
    if (owned && (e & kOflagZero)) {
      // A preallocated zero cluster: fill around the write with zeros, then clear the flag.
      TRY(check_host_offset(hoff, pos));
      uint8_t* buf = scratch_buffer(t_scratch.cluster, cluster_size_);
      std::memset(buf, 0, cluster_size_);
      std::memcpy(buf + in_cluster, data.data() + done, chunk);
      TRY(pwrite_data(buf, cluster_size_, hoff));
      set_l2_entry(table, l2_index, hoff | kOflagCopied);
      l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
      done += chunk;
      continue;
    }
    // Needs a new cluster. Count how many consecutive whole clusters need one too.
    uint64_t whole = 0;
    if (in_cluster == 0) {
      uint64_t entries = 1ULL << l2_bits_;
      while (l2_index + whole < entries && (whole + 1) * cluster_size_ <= data.size() - done) {
        uint64_t ee = l2_entry(table, l2_index + whole);
        bool o = (ee & kOflagCopied) && (ee & kL2OffsetMask) && !(ee & kOflagCompressed);
        if (o) break;
        ++whole;
      }
    }
    uint64_t got = 0;
    uint64_t host = TRY(allocate_clusters(1, std::max<uint64_t>(whole, 1), &got));
    // The allocation may have evicted our table from the cache: fetch it again.
    table = TRY(get_l2(l1_index, true));
    if (whole >= 1) {
      defer_write(host, data.data() + done, got * cluster_size_, pos);
    } else {
      got = 1;
      // What the cluster reads as now, with the write laid over it.
      uint8_t* merged = scratch_buffer(t_scratch.rmw, cluster_size_);
      TRY(read_cluster_locked(pos - in_cluster, merged));
      std::memcpy(merged + in_cluster, data.data() + done, chunk);
      TRY(pwrite_data(merged, cluster_size_, host));
    }
    table = TRY(get_l2(l1_index, true));
    for (uint64_t i = 0; i < got; ++i) {
      uint64_t old = l2_entry(table, l2_index + i);
      if (old & kOflagCompressed) {
        uint64_t h, b;
        compressed_range(old & ~(kOflagCompressed | kOflagCopied), &h, &b);
        TRY(free_later(h, b));
      } else if (old & kL2OffsetMask) {
        TRY(free_later(old & kL2OffsetMask, cluster_size_));
      }
      set_l2_entry(table, l2_index + i, (host + i * cluster_size_) | kOflagCopied);
    }
    l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
    done += whole >= 1 ? got * cluster_size_ : chunk;
  }
  return ok();
}

Result<void> Qcow2Image::write_compressed(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  TRY(check_range(offset, data.size(), "write"));
  if (offset % cluster_size_ || data.size() > cluster_size_ ||
      (data.size() != cluster_size_ && offset + cluster_size_ < size_))
    return fail_invalid("{}: compressed writes must cover one whole cluster", path_);
  const uint8_t* src = data.data();
  std::vector<uint8_t> padded;
  if (data.size() < cluster_size_) {
    padded.assign(cluster_size_, 0);
    std::memcpy(padded.data(), data.data(), data.size());
    src = padded.data();
  }
  Scratch& s = t_scratch;
  uint8_t* out = scratch_buffer(s.compressed, cluster_size_ + 1024);
  size_t out_len = 0;
  size_t limit = cluster_size_ - 1;
  if (compression_ == Qcow2Compression::Zlib) {
    // Incompressible clusters (already compressed or encrypted files) are stored plain, as qemu
    // does, but zlib at its default level takes as long to give up on them as to compress text.
    // libdeflate's fastest level (with a larger window than qcow2's 4 KiB) tells them apart in a
    // fraction of that time. Data it cannot shrink by a byte, zlib could at best shrink by a few
    // bytes; such a cluster is stored plain, which any reader takes.
    // The probe costs about half of zlib's time, so it runs only on clusters whose bytes are
    // spread evenly (order-0 entropy above 7.5 bits per byte), where deflate has little to gain.
    if (looks_incompressible(src, cluster_size_)) {
      if (!s.deflate_probe) s.deflate_probe = libdeflate_alloc_compressor(1);
      if (s.deflate_probe && libdeflate_deflate_compress(s.deflate_probe, src, cluster_size_, out, limit) == 0)
        return write(offset, data);
    }
    z_stream& z = s.deflater;
    if (!s.deflater_ready) {
      std::memset(&z, 0, sizeof(z));
      if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
        return fail(ENOMEM, "deflateInit2 failed");
      s.deflater_ready = true;
    } else {
      deflateReset(&z);
    }
    z.next_in = const_cast<uint8_t*>(src);
    z.avail_in = cluster_size_;
    z.next_out = out;
    z.avail_out = static_cast<uInt>(limit);
    int ret = deflate(&z, Z_FINISH);
    out_len = ret == Z_STREAM_END ? limit - z.avail_out : 0;
  } else {
    if (!s.zstd_c) s.zstd_c = ZSTD_createCCtx();
    if (!s.zstd_c) return fail(ENOMEM, "ZSTD_createCCtx failed");
    size_t r = ZSTD_compressCCtx(s.zstd_c, out, limit, src, cluster_size_, ZSTD_CLEVEL_DEFAULT);
    out_len = ZSTD_isError(r) ? 0 : r;
  }
  if (out_len == 0) return write(offset, data);  // did not shrink: store it plain

  Result<void> placed;
  {
    std::unique_lock lock(mutex_);
    wait_for_range(lock, offset, cluster_size_);
    placed = place_compressed(offset, out, out_len);
  }
  auto written = run_deferred_writes();
  if (!placed) return placed;
  return written;
}

Result<void> Qcow2Image::place_compressed(uint64_t offset, const uint8_t* out, size_t out_len) {
  uint64_t l1_index = offset >> (cluster_bits_ + l2_bits_);
  uint64_t l2_index = (offset >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
  uint8_t* table = TRY(get_l2(l1_index, true));
  // Place the bytes: continue the current compressed cluster if they fit, else start new clusters
  // (spanning into the next one when it is contiguous, as qemu does).
  uint64_t start;
  uint64_t room = compressed_next_ ? compressed_end_ - compressed_next_ : 0;
  if (room) {
    // With narrow refcounts a shared cluster fills up on references before it fills on bytes.
    uint64_t max = refcount_order_ == 6 ? UINT64_MAX : (1ULL << (1U << refcount_order_)) - 1;
    if (TRY(get_refcount(compressed_next_ >> cluster_bits_)) >= max) room = 0, compressed_next_ = 0;
  }
  if (room >= out_len) {
    start = compressed_next_;
    TRY(add_refcount(start >> cluster_bits_, 1));
  } else {
    uint64_t extra = (out_len - room + cluster_size_ - 1) / cluster_size_;
    uint64_t got = 0;
    uint64_t host = TRY(allocate_clusters(extra, extra, &got));
    if (room > 0 && host == compressed_end_) {
      start = compressed_next_;
      TRY(add_refcount(start >> cluster_bits_, 1));
    } else {
      uint64_t whole = (out_len + cluster_size_ - 1) / cluster_size_;
      if (whole > got) {
        TRY(free_now(host, got * cluster_size_));
        host = TRY(allocate_clusters(whole, whole, &got));
      }
      start = host;
    }
    compressed_end_ = host + got * cluster_size_;
  }
  compressed_next_ = start + out_len;
  if (compressed_next_ == compressed_end_) compressed_next_ = compressed_end_ = 0;
  uint64_t nb_sectors = ((start + out_len - 1) >> 9) - (start >> 9);
  table = TRY(get_l2(l1_index, true));
  uint64_t old = l2_entry(table, l2_index);
  if (old & kOflagCompressed) {
    uint64_t h, b;
    compressed_range(old & ~(kOflagCompressed | kOflagCopied), &h, &b);
    TRY(free_later(h, b));
  } else if (old & kL2OffsetMask) {
    TRY(free_later(old & kL2OffsetMask, cluster_size_));
  }
  set_l2_entry(table, l2_index, kOflagCompressed | (nb_sectors << csize_shift_) | start);
  if (extended_l2_) set_l2_bitmap(table, l2_index, 0);  // compressed clusters have no subclusters
  l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
  defer_write(start, out, out_len, offset);
  return ok();
}

Result<void> Qcow2Image::set_zero_locked(uint64_t offset, uint64_t length, bool unallocate) {
  // offset and length are cluster aligned (length may end at the disk's end).
  if (extended_l2_)
    return unmap_subclusters_locked(offset, offset + length, unallocate ? UnmapTo::Backing : UnmapTo::Zero);
  uint64_t pos = offset, end = offset + length;
  while (pos < end) {
    uint64_t l1_index = pos >> (cluster_bits_ + l2_bits_);
    uint64_t l2_index = (pos >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
    bool can_unmap = !backing_ || unallocate;
    uint8_t* table = TRY(get_l2(l1_index, false));
    uint64_t e = table ? l2_entry(table, l2_index) : 0;
    uint64_t want = can_unmap ? 0 : kOflagZero;
    if (version_ < 3 && !can_unmap) return fail(ENOTSUP, "zero clusters need qcow2 v3");
    bool nothing_to_do = table ? (e == want || (want == 0 && (e & ~kOflagCopied) == 0)) : can_unmap;
    if (!nothing_to_do) {
      table = TRY(get_l2(l1_index, true));
      e = l2_entry(table, l2_index);
      if (e & kOflagCompressed) {
        uint64_t h, b;
        compressed_range(e & ~(kOflagCompressed | kOflagCopied), &h, &b);
        TRY(free_later(h, b));
      } else if (e & kL2OffsetMask) {
        TRY(free_later(e & kL2OffsetMask, cluster_size_));
      }
      set_l2_entry(table, l2_index, want);
      l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
    }
    pos += cluster_size_;
  }
  return ok();
}

Result<void> Qcow2Image::write_zeroes(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  TRY(check_range(offset, length, "write-zeroes"));
  if (extended_l2_) return write_zeroes_subclusters(offset, length);
  uint64_t end = offset + length;
  uint64_t a = (offset + cluster_size_ - 1) & ~uint64_t{cluster_size_ - 1};
  uint64_t b = end & ~uint64_t{cluster_size_ - 1};
  if (end == size_) b = end;  // the last, short cluster counts as whole
  bool can_zero_clusters = version_ >= 3 || !backing_;
  if (a >= b || !can_zero_clusters) {
    std::vector<uint8_t> zeros(std::min<uint64_t>(length, 1 << 20), 0);
    for (uint64_t pos = offset; pos < end;) {
      uint64_t n = std::min<uint64_t>(zeros.size(), end - pos);
      TRY(write(pos, std::span<const uint8_t>(zeros.data(), n)));
      pos += n;
    }
    return ok();
  }
  if (offset < a) TRY(write_zeroes(offset, a - offset));
  {
    std::lock_guard lock(mutex_);
    TRY(set_zero_locked(a, b - a, false));
  }
  if (b < end) TRY(write_zeroes(b, end - b));
  return ok();
}

Result<void> Qcow2Image::discard(uint64_t offset, uint64_t length) {
  if (read_only_) return fail(EROFS, "discard " + path_ + ": image is open read-only");
  TRY(check_range(offset, length, "discard"));
  uint64_t end = offset + length;
  uint64_t a = (offset + cluster_size_ - 1) & ~uint64_t{cluster_size_ - 1};
  uint64_t b = end == size_ ? end : end & ~uint64_t{cluster_size_ - 1};
  if (a >= b) return ok();  // a hint: partial clusters are left alone
  if (version_ < 3 && backing_) return ok();
  std::lock_guard lock(mutex_);
  return set_zero_locked(a, b - a, false);
}

Result<void> Qcow2Image::make_empty() {
  if (read_only_) return fail(EROFS, path_ + ": image is open read-only");
  std::lock_guard lock(mutex_);
  uint64_t coverage = uint64_t{1} << (cluster_bits_ + l2_bits_);
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    if (!(l1_[i] & kL1OffsetMask)) continue;
    uint64_t start = i * coverage;
    if (start >= size_) break;
    TRY(set_zero_locked(start, std::min(coverage, size_ - start), true));
  }
  TRY(flush_metadata());
  TRY(sync_file());
  return ok();
}

Result<void> Qcow2Image::flush() {
  if (read_only_) return ok();
  std::lock_guard lock(mutex_);
  TRY(flush_metadata());
  TRY(sync_file());
  return ok();
}

}  // namespace keel::disk
