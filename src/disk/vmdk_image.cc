#include "disk/vmdk_image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>

#include "base/progress.h"
#include "disk/endian.h"
#include "disk/image_internal.h"

namespace keel::disk {

namespace {

constexpr uint32_t kSparseMagic = 0x564d444b;  // "KDMV"
constexpr uint64_t kGdAtEnd = 0xffffffffffffffffULL;
constexpr uint32_t kFlagNlDetect = 1u << 0;
constexpr uint32_t kFlagRgd = 1u << 1;
constexpr uint32_t kFlagZeroGrain = 1u << 2;
constexpr uint32_t kFlagCompressed = 1u << 16;
constexpr uint32_t kFlagMarkers = 1u << 17;
constexpr uint64_t kMaxCapacitySectors = 1ULL << 40;  // 512 TiB: far beyond any real VMDK
constexpr uint32_t kMarkerEos = 0, kMarkerGt = 1, kMarkerGd = 2, kMarkerFooter = 3;

struct SparseHeader {
  uint32_t version = 0;
  uint32_t flags = 0;
  uint64_t capacity = 0;      // sectors
  uint64_t grain_size = 0;    // sectors
  uint64_t desc_offset = 0;   // sectors
  uint64_t desc_size = 0;     // sectors
  uint32_t gtes_per_gt = 0;
  uint64_t rgd_offset = 0;
  uint64_t gd_offset = 0;
  uint64_t overhead = 0;
  uint16_t compress_algorithm = 0;
};

Result<SparseHeader> parse_sparse_header(const uint8_t* h, const std::string& path) {
  if (load_le32(h) != kSparseMagic) return fail_invalid("{}: not a VMDK sparse extent (bad magic)", path);
  SparseHeader s;
  s.version = load_le32(h + 4);
  s.flags = load_le32(h + 8);
  s.capacity = load_le64(h + 12);
  s.grain_size = load_le64(h + 20);
  s.desc_offset = load_le64(h + 28);
  s.desc_size = load_le64(h + 36);
  s.gtes_per_gt = load_le32(h + 44);
  s.rgd_offset = load_le64(h + 48);
  s.gd_offset = load_le64(h + 56);
  s.overhead = load_le64(h + 64);
  s.compress_algorithm = load_le16(h + 77);
  if (s.version < 1 || s.version > 3) return fail_invalid("{}: unsupported VMDK version {}", path, s.version);
  if (s.capacity > kMaxCapacitySectors) return fail_invalid("{}: VMDK capacity of {} sectors is too large", path, s.capacity);
  if (s.grain_size < 1 || s.grain_size > 2048 || (s.grain_size & (s.grain_size - 1)))
    return fail_invalid("{}: VMDK grain size of {} sectors is invalid", path, s.grain_size);
  if (s.gtes_per_gt < 1 || s.gtes_per_gt > 65536)
    return fail_invalid("{}: VMDK grain table of {} entries is invalid", path, s.gtes_per_gt);
  if ((s.flags & kFlagCompressed) && s.compress_algorithm != 1)
    return fail(ENOTSUP, fmt::format("{}: unsupported VMDK compression algorithm {}", path, s.compress_algorithm));
  return s;
}

std::string quoted_value(const std::string& text, const std::string& key) {
  size_t p = text.find(key + "=");
  if (p == std::string::npos) return {};
  p += key.size() + 1;
  while (p < text.size() && (text[p] == ' ')) ++p;
  if (p < text.size() && text[p] == '"') {
    size_t e = text.find('"', p + 1);
    if (e == std::string::npos) return {};
    return text.substr(p + 1, e - p - 1);
  }
  size_t e = text.find('\n', p);
  return text.substr(p, e == std::string::npos ? std::string::npos : e - p);
}

// The value of `key=` on a line of its own (so "CID" does not find "parentCID"), without quotes.
std::string descriptor_value(const std::string& text, const std::string& key) {
  size_t line_start = 0;
  while (line_start < text.size()) {
    size_t line_end = text.find('\n', line_start);
    if (line_end == std::string::npos) line_end = text.size();
    std::string_view line(text.data() + line_start, line_end - line_start);
    line_start = line_end + 1;
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (line.substr(0, key.size()) != key) continue;
    line.remove_prefix(key.size());
    while (!line.empty() && line.front() == ' ') line.remove_prefix(1);
    if (line.empty() || line.front() != '=') continue;
    line.remove_prefix(1);
    while (!line.empty() && (line.front() == ' ' || line.front() == '"')) line.remove_prefix(1);
    while (!line.empty() && (line.back() == ' ' || line.back() == '"' || line.back() == '\r')) line.remove_suffix(1);
    return std::string(line);
  }
  return {};
}

// A CID as qemu reads it (hex, "ffffffff" for none); missing or unparsable: ffffffff.
uint32_t parse_cid(const std::string& text) {
  if (text.empty()) return 0xffffffff;
  char* end = nullptr;
  unsigned long v = std::strtoul(text.c_str(), &end, 16);
  return end == text.c_str() ? 0xffffffff : static_cast<uint32_t>(v);
}

constexpr int kMaxChainDepth = 256;

bool is_zero(const uint8_t* p, size_t n) {
  if (n == 0) return true;
  if (p[0]) return false;
  return std::memcmp(p, p + 1, n - 1) == 0;
}

}  // namespace

struct VmdkImage::ExtentInfo {
  enum class Kind { Flat, Sparse, Zero } kind = Kind::Flat;
  uint64_t start = 0;    // virtual byte offset of this extent
  uint64_t length = 0;   // bytes
  std::string path;
  UniqueFd fd;
  std::atomic<uint64_t> file_size = 0;  // grows as writes allocate grains
  uint64_t flat_offset = 0;  // bytes into the file (FLAT)
  SparseHeader header;
  std::vector<uint32_t> gd;                          // grain directory (sectors of grain tables)
  std::vector<uint32_t> rgd;                         // redundant directory (writable images with one)
  std::map<uint64_t, std::vector<uint32_t>> tables;  // loaded grain tables
  std::mutex mutex;                                  // guards `tables`
};

VmdkImage::~VmdkImage() = default;

Result<std::unique_ptr<VmdkImage>> VmdkImage::open(const std::string& path, OpenMode mode,
                                                   const VmdkOpenOptions& options, int chain_depth) {
  if (chain_depth > kMaxChainDepth)
    return fail_invalid("{}: VMDK parent chain is deeper than {} images (a loop?)", path, kMaxChainDepth);
  std::unique_ptr<VmdkImage> image(new VmdkImage());
  image->path_ = path;
  image->options_ = options;
  TRY(image->load(path, chain_depth));
  if (mode == OpenMode::ReadWrite) TRY(image->make_writable());
  return image;
}

// Writes go to monolithicSparse images only (one uncompressed sparse extent with its descriptor
// inside), as qemu writes them: what delta links are made of.
Result<void> VmdkImage::make_writable() {
  ExtentInfo* e = extents_.size() == 1 ? extents_[0].get() : nullptr;
  if (!e || e->kind != ExtentInfo::Kind::Sparse || (e->header.flags & kFlagCompressed) || !e->header.desc_offset)
    return fail(EROFS, fmt::format("{}: only monolithicSparse VMDK images open for writing ({} opens read-only; "
                                   "convert it to write)", path_, create_type_));
  e->fd = TRY(UniqueFd::open(path_, O_RDWR));
  if ((e->header.flags & kFlagRgd) && e->header.rgd_offset) {
    uint64_t off = e->header.rgd_offset * 512, bytes = e->gd.size() * 4;
    if (off > e->file_size || bytes > e->file_size - off)
      return fail_invalid("{}: VMDK redundant grain directory lies outside the file", path_);
    std::vector<uint8_t> buf(bytes);
    if (bytes) TRY(pread_all(e->fd.get(), buf.data(), bytes, static_cast<off_t>(off)));
    e->rgd.resize(e->gd.size());
    for (size_t i = 0; i < e->rgd.size(); ++i) e->rgd[i] = load_le32(buf.data() + i * 4);
  }
  uint64_t grain = e->header.grain_size;
  next_grain_sector_ = ((e->file_size + 511) / 512 + grain - 1) / grain * grain;
  read_only_ = false;
  return ok();
}

// As qemu does before an image's first write: a new CID, so deltas made on top of it notice.
Result<void> VmdkImage::renew_cid() {
  ExtentInfo& e = *extents_[0];
  uint64_t off = e.header.desc_offset * 512;
  uint64_t len = std::min<uint64_t>(e.header.desc_size * 512, 64 << 10);
  if (off > e.file_size || len > e.file_size - off) return fail_invalid("{}: VMDK descriptor lies outside the file", path_);
  std::string text(len, '\0');
  TRY(pread_all(e.fd.get(), text.data(), len, static_cast<off_t>(off)));
  for (size_t p = 0; p < text.size(); p = text.find('\n', p) + 1) {
    size_t eol = text.find('\n', p);
    if (eol == std::string::npos) break;
    if (text.compare(p, 4, "CID=") != 0) continue;
    // The whole line is rewritten: qemu writes CIDs without leading zeros, so the old value may
    // be shorter than ours, and what follows moves.
    std::random_device entropy;
    uint32_t cid = entropy();
    std::string updated = text.substr(0, p) + fmt::format("CID={:08x}", cid) + text.substr(eol);
    if (updated.size() > len) {
      if (updated.find_first_not_of('\0', len) != std::string::npos)
        return fail_invalid("{}: no room in the VMDK descriptor for a new CID", path_);
    }
    updated.resize(len, '\0');
    TRY(pwrite_all(e.fd.get(), updated.data(), updated.size(), static_cast<off_t>(off)));
    cid_ = cid;
    cid_renewed_ = true;
    return ok();
  }
  return fail_invalid("{}: VMDK descriptor has no CID line to update", path_);
}

Result<void> VmdkImage::set_grain_sector(uint64_t grain, uint32_t sector) {
  ExtentInfo& e = *extents_[0];
  uint64_t gt_index = grain / e.header.gtes_per_gt;
  uint64_t slot = (grain % e.header.gtes_per_gt) * 4;
  if (gt_index >= e.gd.size() || e.gd[gt_index] == 0)
    return fail(ENOTSUP, fmt::format("{}: grain {} has no grain table to record it in", path_, grain));
  uint8_t entry[4];
  store_le32(entry, sector);
  TRY(pwrite_all(e.fd.get(), entry, 4, static_cast<off_t>(uint64_t{e.gd[gt_index]} * 512 + slot)));
  if (gt_index < e.rgd.size() && e.rgd[gt_index])
    TRY(pwrite_all(e.fd.get(), entry, 4, static_cast<off_t>(uint64_t{e.rgd[gt_index]} * 512 + slot)));
  std::lock_guard lock(e.mutex);
  auto it = e.tables.find(gt_index);
  if (it != e.tables.end()) it->second[grain % e.header.gtes_per_gt] = sector;
  return ok();
}

Result<void> VmdkImage::load_parent(const std::string& descriptor, int chain_depth) {
  cid_ = parse_cid(descriptor_value(descriptor, "CID"));
  parent_cid_ = parse_cid(descriptor_value(descriptor, "parentCID"));
  parent_hint_ = descriptor_value(descriptor, "parentFileNameHint");
  if (parent_hint_.empty() || !options_.open_parent) return ok();
  std::filesystem::path hint(parent_hint_);
  parent_resolved_ = hint.is_absolute() ? hint.string() : (std::filesystem::path(path_).parent_path() / hint).string();
  std::error_code ec;
  if (std::filesystem::equivalent(parent_resolved_, path_, ec))
    return fail_invalid("{}: VMDK image names itself as its parent ({})", path_, parent_hint_);
  // As qemu: a delta link's parent is a VMDK (its CID is what the link checks).
  auto parent = open_image_internal(parent_resolved_, OpenMode::ReadOnly, ImageFormat::Vmdk, chain_depth + 1);
  if (!parent) {
    // Only the outermost image adds its name: a loop would otherwise repeat it 256 times.
    if (chain_depth > 0) return fail(parent.error());
    return fail(parent.error().with_context(fmt::format("{}: opening VMDK parent '{}'", path_, parent_hint_)));
  }
  parent_ = std::move(*parent);
  return ok();
}

Result<void> VmdkImage::check_parent_cid() const {
  if (!parent_) return ok();
  auto* p = dynamic_cast<VmdkImage*>(parent_.get());
  uint32_t have = p ? p->cid() : 0xffffffff;
  if (have != parent_cid_)
    return fail_invalid("{}: parent {} has CID {:08x}, but this image was made on CID {:08x} (parentCID): the "
                        "parent changed after this delta was made", path_, parent_resolved_, have, parent_cid_);
  return ok();
}

Result<void> VmdkImage::read_parent(uint64_t offset, std::span<uint8_t> out) {
  uint64_t have = parent_ && offset < parent_->size() ? std::min<uint64_t>(out.size(), parent_->size() - offset) : 0;
  if (have) TRY(parent_->read(offset, out.subspan(0, have)));
  if (have < out.size()) std::memset(out.data() + have, 0, out.size() - have);
  return ok();
}

static Result<void> load_sparse(VmdkImage::ExtentInfo& e, const std::string& path, std::string* descriptor) {
  e.kind = VmdkImage::ExtentInfo::Kind::Sparse;
  e.fd = TRY(UniqueFd::open(path, O_RDONLY));
  struct stat st;
  if (::fstat(e.fd.get(), &st) < 0) return fail_errno("stat " + path);
  e.file_size = static_cast<uint64_t>(st.st_size);
  if (e.file_size < 512) return fail_invalid("{}: file is too short for a VMDK header", path);
  uint8_t h[512];
  TRY(pread_all(e.fd.get(), h, 512, 0));
  e.header = TRY(parse_sparse_header(h, path));
  if (e.header.gd_offset == kGdAtEnd) {
    // streamOptimized: the real header is the footer, 1024 bytes before the end.
    if (e.file_size < 1536) return fail_invalid("{}: streamOptimized VMDK without a footer", path);
    uint8_t f[512];
    TRY(pread_all(e.fd.get(), f, 512, static_cast<off_t>(e.file_size - 1024)));
    SparseHeader footer = TRY_CTX(parse_sparse_header(f, path), path + ": footer");
    if (footer.gd_offset == kGdAtEnd) return fail_invalid("{}: VMDK footer has no grain directory", path);
    e.header.gd_offset = footer.gd_offset;
    e.header.capacity = footer.capacity;
    e.header.grain_size = footer.grain_size;
    e.header.gtes_per_gt = footer.gtes_per_gt;
  }
  if (descriptor && e.header.desc_offset && e.header.desc_size) {
    uint64_t off = e.header.desc_offset * 512, len = std::min<uint64_t>(e.header.desc_size * 512, 64 << 10);
    if (off < e.file_size && len <= e.file_size - off) {
      std::string text(len, '\0');
      TRY(pread_all(e.fd.get(), text.data(), len, static_cast<off_t>(off)));
      text.resize(strnlen(text.data(), text.size()));
      *descriptor = text;
    }
  }
  uint64_t grain_bytes = e.header.grain_size * 512;
  uint64_t gt_coverage = grain_bytes * e.header.gtes_per_gt;
  uint64_t gd_entries = (e.header.capacity * 512 + gt_coverage - 1) / gt_coverage;
  uint64_t gd_off = e.header.gd_offset * 512;
  if (gd_entries * 4 > e.file_size || gd_off > e.file_size || gd_entries * 4 > e.file_size - gd_off)
    return fail_invalid("{}: VMDK grain directory ({} entries at sector {}) lies outside the file", path,
                        gd_entries, e.header.gd_offset);
  std::vector<uint8_t> buf(gd_entries * 4);
  if (!buf.empty()) TRY(pread_all(e.fd.get(), buf.data(), buf.size(), static_cast<off_t>(gd_off)));
  e.gd.resize(gd_entries);
  for (uint64_t i = 0; i < gd_entries; ++i) e.gd[i] = load_le32(buf.data() + i * 4);
  e.length = e.header.capacity * 512;
  return ok();
}

Result<void> VmdkImage::load(const std::string& path, int chain_depth) {
  UniqueFd fd = TRY(UniqueFd::open(path, O_RDONLY));
  uint8_t head[512] = {};
  size_t n = TRY(read_full(fd.get(), head, sizeof(head)));
  if (n >= 4 && load_le32(head) == kSparseMagic) {
    auto e = std::make_unique<ExtentInfo>();
    std::string descriptor;
    TRY(load_sparse(*e, path, &descriptor));
    create_type_ = quoted_value(descriptor, "createType");
    if (create_type_.empty())
      create_type_ = (e->header.flags & kFlagCompressed) ? "streamOptimized" : "monolithicSparse";
    size_ = e->length;
    e->path = path;
    extents_.push_back(std::move(e));
    return load_parent(descriptor, chain_depth);
  }
  // A text descriptor naming extent files.
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) return fail_errno("stat " + path);
  if (st.st_size > (1 << 20)) return fail_invalid("{}: VMDK descriptor is larger than 1 MiB", path);
  std::string text(static_cast<size_t>(st.st_size), '\0');
  TRY(pread_all(fd.get(), text.data(), text.size(), 0));
  if (text.rfind("# Disk DescriptorFile", 0) != 0) return fail_invalid("{}: not a VMDK descriptor", path);
  create_type_ = quoted_value(text, "createType");
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  uint64_t pos = 0;
  size_t line_start = 0;
  int line_no = 0;
  while (line_start < text.size()) {
    size_t line_end = text.find('\n', line_start);
    if (line_end == std::string::npos) line_end = text.size();
    std::string line = text.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    ++line_no;
    if (!(line.rfind("RW ", 0) == 0 || line.rfind("RDONLY ", 0) == 0 || line.rfind("NOACCESS ", 0) == 0)) continue;
    char access[16] = {}, type[16] = {};
    unsigned long long sectors = 0, offset = 0;
    char name[1024] = {};
    int got = std::sscanf(line.c_str(), "%15s %llu %15s \"%1023[^\"]\" %llu", access, &sectors, type, name, &offset);
    if (got < 3) return fail_invalid("{}:{}: cannot parse extent line '{}'", path, line_no, line);
    if (sectors > kMaxCapacitySectors || pos + sectors * 512 > kMaxCapacitySectors * 512)
      return fail_invalid("{}:{}: extent of {} sectors is too large", path, line_no, sectors);
    auto e = std::make_unique<ExtentInfo>();
    std::string t = type;
    std::string file = name[0] ? (dir / name).string() : std::string();
    if (t == "ZERO") {
      e->kind = ExtentInfo::Kind::Zero;
    } else if (t == "FLAT" || t == "VMFS") {
      if (got < 4) return fail_invalid("{}:{}: FLAT extent without a file name", path, line_no);
      e->kind = ExtentInfo::Kind::Flat;
      e->fd = TRY_CTX(UniqueFd::open(file, O_RDONLY), fmt::format("{}:{}: extent", path, line_no));
      struct stat est;
      if (::fstat(e->fd.get(), &est) < 0) return fail_errno("stat " + file);
      e->file_size = static_cast<uint64_t>(est.st_size);
      e->flat_offset = offset * 512;
    } else if (t == "SPARSE" || t == "VMFSSPARSE") {
      if (got < 4) return fail_invalid("{}:{}: SPARSE extent without a file name", path, line_no);
      TRY_CTX(load_sparse(*e, file, nullptr), fmt::format("{}:{}: extent", path, line_no));
    } else {
      return fail(ENOTSUP, fmt::format("{}:{}: VMDK extent type {} is not supported", path, line_no, t));
    }
    e->path = file;
    e->start = pos;
    e->length = sectors * 512;
    pos += e->length;
    extents_.push_back(std::move(e));
  }
  if (extents_.empty()) return fail_invalid("{}: VMDK descriptor names no extents", path);
  size_ = pos;
  return load_parent(text, chain_depth);
}

Result<void> VmdkImage::parse_bytes(std::span<const uint8_t> bytes) {
  if (bytes.size() >= 512 && load_le32(bytes.data()) == kSparseMagic) {
    TRY(parse_sparse_header(bytes.data(), "<memory>"));
  }
  return ok();
}

// Where grain `g` of a sparse extent lives: 0 unallocated, 1 zero grain, else its sector.
static Result<uint32_t> grain_sector(VmdkImage::ExtentInfo& e, uint64_t grain) {
  uint64_t gt_index = grain / e.header.gtes_per_gt;
  if (gt_index >= e.gd.size()) return uint32_t{0};
  uint32_t gt_sector = e.gd[gt_index];
  if (gt_sector == 0) return uint32_t{0};
  std::lock_guard lock(e.mutex);
  auto it = e.tables.find(gt_index);
  if (it == e.tables.end()) {
    uint64_t off = uint64_t{gt_sector} * 512, len = uint64_t{e.header.gtes_per_gt} * 4;
    if (off > e.file_size || len > e.file_size - off)
      return fail_invalid("{}: VMDK grain table {} at sector {} lies outside the file", e.path, gt_index, gt_sector);
    std::vector<uint8_t> buf(len);
    TRY(pread_all(e.fd.get(), buf.data(), len, static_cast<off_t>(off)));
    std::vector<uint32_t> table(e.header.gtes_per_gt);
    for (size_t i = 0; i < table.size(); ++i) table[i] = load_le32(buf.data() + i * 4);
    it = e.tables.emplace(gt_index, std::move(table)).first;
  }
  return it->second[grain % e.header.gtes_per_gt];
}

Result<void> VmdkImage::read_extent(ExtentInfo& e, uint64_t offset, std::span<uint8_t> out) {
  switch (e.kind) {
    case ExtentInfo::Kind::Zero:
      std::memset(out.data(), 0, out.size());
      return ok();
    case ExtentInfo::Kind::Flat: {
      uint64_t off = e.flat_offset + offset;
      uint64_t have = off >= e.file_size ? 0 : std::min<uint64_t>(out.size(), e.file_size - off);
      if (have) TRY_CTX(pread_all(e.fd.get(), out.data(), have, static_cast<off_t>(off)), "read " + e.path);
      std::memset(out.data() + have, 0, out.size() - have);
      return ok();
    }
    case ExtentInfo::Kind::Sparse:
      break;
  }
  uint64_t grain_bytes = e.header.grain_size * 512;
  uint64_t done = 0;
  thread_local std::vector<uint8_t> grain_buf, comp_buf;
  while (done < out.size()) {
    uint64_t pos = offset + done;
    uint64_t grain = pos / grain_bytes;
    uint64_t in_grain = pos % grain_bytes;
    uint64_t n = std::min<uint64_t>(grain_bytes - in_grain, out.size() - done);
    uint32_t sector = TRY(grain_sector(e, grain));
    if (sector == 0) {
      TRY(read_parent(e.start + pos, out.subspan(done, n)));  // unallocated: the parent's, or zeros
    } else if (sector == 1 && (e.header.flags & kFlagZeroGrain)) {
      std::memset(out.data() + done, 0, n);
    } else if (!(e.header.flags & kFlagCompressed)) {
      uint64_t off = uint64_t{sector} * 512 + in_grain;
      if (off > e.file_size || n > e.file_size - off)
        return fail_invalid("{}: grain {} at sector {} lies outside the file", e.path, grain, sector);
      TRY(pread_all(e.fd.get(), out.data() + done, n, static_cast<off_t>(off)));
    } else {
      uint64_t off = uint64_t{sector} * 512;
      uint64_t header = (e.header.flags & kFlagMarkers) ? 12 : 0;
      uint32_t csize;
      if (header) {
        uint8_t m[12];
        if (off > e.file_size || 12 > e.file_size - off)
          return fail_invalid("{}: grain marker at sector {} lies outside the file", e.path, sector);
        TRY(pread_all(e.fd.get(), m, 12, static_cast<off_t>(off)));
        csize = load_le32(m + 8);
      } else {
        csize = static_cast<uint32_t>(std::min<uint64_t>(grain_bytes * 2 + 1024, e.file_size - std::min<uint64_t>(off, e.file_size)));
      }
      if (csize == 0 || csize > grain_bytes * 2 + 1024 || off + header > e.file_size ||
          csize > e.file_size - off - header)
        return fail_invalid("{}: compressed grain {} at sector {} has a bad length {}", e.path, grain, sector, csize);
      if (comp_buf.size() < csize) comp_buf.resize(csize);
      if (grain_buf.size() < grain_bytes) grain_buf.resize(grain_bytes);
      TRY(pread_all(e.fd.get(), comp_buf.data(), csize, static_cast<off_t>(off + header)));
      uLongf dest_len = grain_bytes;
      int zr = uncompress(grain_buf.data(), &dest_len, comp_buf.data(), csize);
      if (zr != Z_OK && zr != Z_BUF_ERROR)
        return fail_invalid("{}: compressed grain {} at sector {} does not inflate (zlib error {})", e.path, grain,
                            sector, zr);
      if (dest_len < grain_bytes) std::memset(grain_buf.data() + dest_len, 0, grain_bytes - dest_len);
      std::memcpy(out.data() + done, grain_buf.data() + in_grain, n);
    }
    done += n;
  }
  return ok();
}

Result<void> VmdkImage::read(uint64_t offset, std::span<uint8_t> out) {
  if (offset > size_ || out.size() > size_ - offset)
    return fail_invalid("read {}: range {}+{} is beyond the end of the disk ({} bytes)", path_, offset, out.size(), size_);
  TRY(check_parent_cid());
  uint64_t done = 0;
  for (auto& e : extents_) {
    if (done >= out.size()) break;
    uint64_t pos = offset + done;
    if (pos >= e->start + e->length || pos < e->start) continue;
    uint64_t n = std::min<uint64_t>(e->start + e->length - pos, out.size() - done);
    TRY(read_extent(*e, pos - e->start, out.subspan(done, n)));
    done += n;
  }
  return ok();
}

Result<void> VmdkImage::write(uint64_t offset, std::span<const uint8_t> data) {
  if (read_only_) return fail(EROFS, "write " + path_ + ": image is open read-only");
  if (offset > size_ || data.size() > size_ - offset)
    return fail_invalid("write {}: range {}+{} is beyond the end of the disk ({} bytes)", path_, offset, data.size(), size_);
  TRY(check_parent_cid());
  std::lock_guard lock(write_mutex_);
  if (!cid_renewed_) TRY(renew_cid());
  ExtentInfo& e = *extents_[0];
  uint64_t grain_bytes = e.header.grain_size * 512;
  thread_local std::vector<uint8_t> grain_buf;
  uint64_t done = 0;
  while (done < data.size()) {
    uint64_t pos = offset + done;
    uint64_t grain = pos / grain_bytes;
    uint64_t in_grain = pos % grain_bytes;
    uint64_t n = std::min<uint64_t>(grain_bytes - in_grain, data.size() - done);
    uint32_t sector = TRY(grain_sector(e, grain));
    if (sector > 1) {
      uint64_t off = uint64_t{sector} * 512 + in_grain;
      if (off > e.file_size || n > e.file_size - off)
        return fail_invalid("{}: grain {} at sector {} lies outside the file", path_, grain, sector);
      TRY_CTX(pwrite_all(e.fd.get(), data.data() + done, n, static_cast<off_t>(off)), "write " + path_);
    } else {
      // A new grain at the end of the file. What the write does not cover keeps what it reads as
      // now: the parent's data for an unallocated grain, zeros for a zero grain.
      if (grain_buf.size() < grain_bytes) grain_buf.resize(grain_bytes);
      std::span<uint8_t> whole(grain_buf.data(), grain_bytes);
      if (n < grain_bytes) {
        if (sector == 0) TRY(read_parent(grain * grain_bytes, whole));
        else std::memset(whole.data(), 0, grain_bytes);
      }
      std::memcpy(whole.data() + in_grain, data.data() + done, n);
      uint64_t at = next_grain_sector_;
      if (at + e.header.grain_size > 0xffffffffULL) return fail(EFBIG, path_ + ": VMDK image would exceed 2 TiB of sectors");
      TRY_CTX(pwrite_all(e.fd.get(), whole.data(), grain_bytes, static_cast<off_t>(at * 512)), "write " + path_);
      next_grain_sector_ = at + e.header.grain_size;
      e.file_size = std::max<uint64_t>(e.file_size, next_grain_sector_ * 512);
      // The table entry after the data: a crash in between leaks a grain, never exposes garbage.
      TRY(set_grain_sector(grain, static_cast<uint32_t>(at)));
    }
    done += n;
  }
  return ok();
}

Result<void> VmdkImage::write_zeroes(uint64_t offset, uint64_t length) {
  std::vector<uint8_t> zeros(std::min<uint64_t>(length, 1 << 20), 0);
  for (uint64_t pos = offset; pos < offset + length;) {
    uint64_t n = std::min<uint64_t>(zeros.size(), offset + length - pos);
    TRY(write(pos, std::span<const uint8_t>(zeros.data(), n)));
    pos += n;
  }
  return ok();
}

Result<void> VmdkImage::flush() {
  if (read_only_) return ok();
  if (::fdatasync(extents_[0]->fd.get()) < 0) return fail_errno("fdatasync " + path_);
  return ok();
}

Result<std::vector<Extent>> VmdkImage::block_status(uint64_t offset, uint64_t length) {
  if (offset > size_ || length > size_ - offset)
    return fail_invalid("block-status {}: range beyond the end of the disk", path_);
  TRY(check_parent_cid());
  std::vector<Extent> out;
  auto add_extent = [&](Extent x) {
    if (!out.empty()) {
      Extent& b = out.back();
      if (b.data == x.data && b.zero == x.zero && b.depth == x.depth && b.allocated == x.allocated &&
          b.offset + b.length == x.offset) {
        b.length += x.length;
        return;
      }
    }
    out.push_back(std::move(x));
  };
  auto add = [&](uint64_t start, uint64_t len, bool data) {
    Extent x;
    x.offset = start;
    x.length = len;
    x.data = data;
    x.zero = !data;
    x.allocated = data;
    add_extent(std::move(x));
  };
  // Unallocated grains: what the parent chain says, one level deeper.
  auto add_unallocated = [&](uint64_t start, uint64_t len) -> Result<void> {
    uint64_t have = parent_ && start < parent_->size() ? std::min(len, parent_->size() - start) : 0;
    if (have) {
      for (auto& x : TRY(parent_->block_status(start, have))) {
        x.depth += 1;
        x.file.clear();
        add_extent(std::move(x));
      }
    }
    if (have < len) add(start + have, len - have, false);
    return ok();
  };
  uint64_t pos = offset, end = offset + length;
  for (auto& e : extents_) {
    if (pos >= end) break;
    if (pos >= e->start + e->length) continue;
    uint64_t stop = std::min(end, e->start + e->length);
    if (e->kind != ExtentInfo::Kind::Sparse) {
      add(pos, stop - pos, e->kind == ExtentInfo::Kind::Flat);
      pos = stop;
      continue;
    }
    uint64_t grain_bytes = e->header.grain_size * 512;
    while (pos < stop) {
      uint64_t rel = pos - e->start;
      uint64_t n = std::min(grain_bytes - rel % grain_bytes, stop - pos);
      uint32_t sector = TRY(grain_sector(*e, rel / grain_bytes));
      if (sector == 0) TRY(add_unallocated(pos, n));
      else add(pos, n, !(sector == 1 && (e->header.flags & kFlagZeroGrain)));
      pos += n;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing: monolithicSparse and streamOptimized, from another image.

namespace {

struct ZeroDevice final : BlockDevice {
  explicit ZeroDevice(uint64_t size) : size_(size) {}
  uint64_t size() const override { return size_; }
  bool read_only() const override { return true; }
  std::string format() const override { return "zero"; }
  Result<void> read(uint64_t, std::span<uint8_t> out) override {
    std::memset(out.data(), 0, out.size());
    return ok();
  }
  Result<void> write(uint64_t, std::span<const uint8_t>) override { return fail(EROFS, "zero device"); }
  Result<void> flush() override { return ok(); }
  Result<void> discard(uint64_t, uint64_t) override { return ok(); }
  Result<void> write_zeroes(uint64_t, uint64_t) override { return ok(); }
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) override {
    Extent e;
    e.offset = offset;
    e.length = length;
    e.zero = true;
    e.allocated = false;
    return std::vector<Extent>{e};
  }
  uint64_t size_;
};

void put_header(uint8_t* h, uint32_t flags, uint64_t capacity, uint64_t desc_offset, uint64_t desc_size,
                uint64_t rgd, uint64_t gd, uint64_t overhead, bool compressed) {
  std::memset(h, 0, 512);
  store_le32(h, kSparseMagic);
  store_le32(h + 4, compressed ? 3 : 1);
  store_le32(h + 8, flags);
  store_le64(h + 12, capacity);
  store_le64(h + 20, 128);
  store_le64(h + 28, desc_offset);
  store_le64(h + 36, desc_size);
  store_le32(h + 44, 512);
  store_le64(h + 48, rgd);
  store_le64(h + 56, gd);
  store_le64(h + 64, overhead);
  h[72] = 0;
  h[73] = '\n';
  h[74] = ' ';
  h[75] = '\r';
  h[76] = '\n';
  h[77] = compressed ? 1 : 0;
  h[78] = 0;
}

std::string descriptor_text(const std::string& create_type, uint64_t sectors, const std::string& file_name,
                            uint32_t parent_cid = 0xffffffff, const std::string& parent_file = {}) {
  std::random_device entropy;
  std::mt19937 rng(entropy() ^ static_cast<uint32_t>(sectors * 2654435761u) ^ static_cast<uint32_t>(::getpid()));
  uint64_t cylinders = std::min<uint64_t>(sectors / (16 * 63), 16383);
  std::string parent_line = parent_file.empty() ? "" : fmt::format("parentFileNameHint=\"{}\"\n", parent_file);
  return fmt::format(
      "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID={:08x}\ncreateType=\"{}\"\n{}\n"
      "# Extent description\nRW {} SPARSE \"{}\"\n\n# The Disk Data Base\n#DDB\n\n"
      "ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"16\"\n"
      "ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n",
      rng(), parent_cid, create_type, parent_line, sectors, file_name, cylinders);
}

void put_marker(uint8_t* m, uint64_t val, uint32_t type) {
  std::memset(m, 0, 512);
  store_le64(m, val);
  store_le32(m + 8, 0);
  store_le32(m + 12, type);
}

}  // namespace

Result<void> VmdkImage::create(const std::string& path, const VmdkCreateOptions& options) {
  ZeroDevice zero(options.size);
  if (options.parent_file.empty()) return convert_from(zero, path, options.subformat, false);
  // A delta link: an empty monolithicSparse child that records the parent's CID.
  if (options.subformat != "monolithicSparse")
    return fail(ENOTSUP, fmt::format("a VMDK with a parent must be monolithicSparse, not '{}'", options.subformat));
  std::filesystem::path hint(options.parent_file);
  std::string resolved = hint.is_absolute() ? hint.string() : (std::filesystem::path(path).parent_path() / hint).string();
  auto parent = TRY_CTX(open(resolved, OpenMode::ReadOnly), "VMDK parent");
  return write_sparse(zero, path, options.subformat, false, parent->cid(), options.parent_file);
}

Result<void> VmdkImage::convert_from(BlockDevice& source, const std::string& path, const std::string& subformat,
                                     bool progress) {
  return write_sparse(source, path, subformat, progress, 0xffffffff, {});
}

Result<void> VmdkImage::write_sparse(BlockDevice& source, const std::string& path, const std::string& subformat,
                                     bool progress, uint32_t parent_cid, const std::string& parent_file) {
  bool stream = subformat == "streamOptimized";
  if (!stream && subformat != "monolithicSparse")
    return fail(ENOTSUP, fmt::format("VMDK subformat '{}' cannot be written (use monolithicSparse or streamOptimized)",
                                     subformat));
  const uint64_t grain_bytes = 128 * 512;
  uint64_t capacity = (source.size() + 511) / 512;
  uint64_t grains = (capacity * 512 + grain_bytes - 1) / grain_bytes;
  uint64_t num_gts = (grains + 511) / 512;
  std::string name = std::filesystem::path(path).filename().string();
  std::string desc = descriptor_text(stream ? "streamOptimized" : "monolithicSparse", capacity, name, parent_cid,
                                     parent_file);
  const uint64_t desc_offset = 1, desc_size = 20;
  if (desc.size() > desc_size * 512) return fail_invalid("VMDK descriptor does not fit");
  UniqueFd fd = TRY(UniqueFd::open(path, O_RDWR | O_CREAT | O_TRUNC));
  std::vector<uint8_t> sector(512);
  std::vector<uint32_t> gt(num_gts * 512, 0);
  std::vector<uint8_t> grain(grain_bytes), comp(compressBound(grain_bytes) + 12 + 512);  // + sector padding
  Progress bar("convert", source.size(), progress ? ProgressStyle::Auto : ProgressStyle::Quiet);

  // Layout. monolithicSparse: header, descriptor, grain directory, grain tables, grains.
  // streamOptimized: header, descriptor, grains (with markers), grain tables, directory, footer.
  uint64_t gd_sectors = (num_gts * 4 + 511) / 512;
  uint64_t gd_start = desc_offset + desc_size;
  uint64_t gt_start = gd_start + gd_sectors;
  uint64_t overhead = stream ? 128 : ((gt_start + num_gts * 4 + 127) / 128 * 128);
  uint64_t next_sector = overhead;
  std::vector<uint8_t> head(overhead * 512, 0);
  std::memcpy(head.data() + desc_offset * 512, desc.data(), desc.size());
  uint32_t flags = kFlagNlDetect | (stream ? (kFlagCompressed | kFlagMarkers) : kFlagRgd * 0);
  put_header(head.data(), flags, capacity, desc_offset, desc_size, 0, stream ? kGdAtEnd : gd_start, overhead, stream);
  TRY(pwrite_all(fd.get(), head.data(), head.size(), 0));

  for (uint64_t g = 0; g < grains; ++g) {
    uint64_t pos = g * grain_bytes;
    uint64_t n = std::min<uint64_t>(grain_bytes, source.size() - pos);
    auto st = TRY(source.block_status(pos, n));
    bool any_data = std::any_of(st.begin(), st.end(), [](const Extent& e) { return e.data && !e.zero; });
    if (!any_data) continue;
    TRY(source.read(pos, std::span<uint8_t>(grain.data(), n)));
    if (n < grain_bytes) std::memset(grain.data() + n, 0, grain_bytes - n);
    if (is_zero(grain.data(), grain_bytes)) continue;
    if (stream) {
      uLongf clen = comp.size() - 12 - 512;
      if (compress2(comp.data() + 12, &clen, grain.data(), grain_bytes, Z_DEFAULT_COMPRESSION) != Z_OK)
        return fail(EIO, "VMDK grain compression failed");
      store_le64(comp.data(), g * 128);
      store_le32(comp.data() + 8, static_cast<uint32_t>(clen));
      uint64_t total = (12 + clen + 511) / 512 * 512;
      std::memset(comp.data() + 12 + clen, 0, total - 12 - clen);
      TRY(pwrite_all(fd.get(), comp.data(), total, static_cast<off_t>(next_sector * 512)));
      gt[g] = static_cast<uint32_t>(next_sector);
      next_sector += total / 512;
    } else {
      TRY(pwrite_all(fd.get(), grain.data(), grain_bytes, static_cast<off_t>(next_sector * 512)));
      gt[g] = static_cast<uint32_t>(next_sector);
      next_sector += 128;
    }
    if (next_sector > 0xffffffffULL) return fail(EFBIG, "VMDK image would exceed 2 TiB of sectors");
    bar.update(pos + n);
  }
  std::vector<uint8_t> table(512 * 4);
  std::vector<uint32_t> gd(num_gts);
  for (uint64_t t = 0; t < num_gts; ++t) {
    for (int i = 0; i < 512; ++i) store_le32(table.data() + i * 4, gt[t * 512 + static_cast<uint64_t>(i)]);
    uint64_t at;
    if (stream) {
      put_marker(sector.data(), 4, kMarkerGt);
      TRY(pwrite_all(fd.get(), sector.data(), 512, static_cast<off_t>(next_sector * 512)));
      at = next_sector + 1;
      next_sector += 5;
    } else {
      at = gt_start + t * 4;
    }
    TRY(pwrite_all(fd.get(), table.data(), table.size(), static_cast<off_t>(at * 512)));
    gd[t] = static_cast<uint32_t>(at);
  }
  std::vector<uint8_t> gdbuf(gd_sectors * 512, 0);
  for (uint64_t t = 0; t < num_gts; ++t) store_le32(gdbuf.data() + t * 4, gd[t]);
  if (stream) {
    put_marker(sector.data(), gd_sectors, kMarkerGd);
    TRY(pwrite_all(fd.get(), sector.data(), 512, static_cast<off_t>(next_sector * 512)));
    uint64_t gd_at = next_sector + 1;
    TRY(pwrite_all(fd.get(), gdbuf.data(), gdbuf.size(), static_cast<off_t>(gd_at * 512)));
    next_sector = gd_at + gd_sectors;
    put_marker(sector.data(), 1, kMarkerFooter);
    TRY(pwrite_all(fd.get(), sector.data(), 512, static_cast<off_t>(next_sector * 512)));
    std::vector<uint8_t> footer(512);
    put_header(footer.data(), flags, capacity, desc_offset, desc_size, 0, gd_at, overhead, true);
    TRY(pwrite_all(fd.get(), footer.data(), 512, static_cast<off_t>((next_sector + 1) * 512)));
    put_marker(sector.data(), 0, kMarkerEos);
    TRY(pwrite_all(fd.get(), sector.data(), 512, static_cast<off_t>((next_sector + 2) * 512)));
  } else {
    TRY(pwrite_all(fd.get(), gdbuf.data(), gdbuf.size(), static_cast<off_t>(gd_start * 512)));
    if (::ftruncate(fd.get(), static_cast<off_t>(next_sector * 512)) < 0) return fail_errno("truncate " + path);
  }
  bar.finish();
  return ok();
}

}  // namespace keel::disk
