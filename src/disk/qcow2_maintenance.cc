// Qcow2Image: creation, check and repair, resize, snapshots, header rewrites.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "disk/endian.h"
#include "disk/qcow2_image.h"
#include "disk/qcow2_layout.h"

namespace keel::disk {

namespace {

using namespace qcow2;
constexpr uint64_t kMaxRefTableBytes = 8ULL << 20;  // QCOW_MAX_REFTABLE_SIZE
constexpr uint64_t kSubclusterAllocMask = 0xffffffffULL;  // extended L2 bitmap: the "allocated" half

std::string hex(uint64_t v) { return fmt::format("{:#x}", v); }

int log2_exact(uint64_t v) {
  if (v == 0 || (v & (v - 1))) return -1;
  return __builtin_ctzll(v);
}

// The header cluster's bytes after the fixed header: extensions, end marker, backing file name.
// Returns the offset of the backing file name (0 when none).
uint64_t build_extensions(std::vector<uint8_t>& hc, uint64_t pos, const std::string& backing_file,
                          const std::string& backing_format, bool with_feature_names,
                          const std::vector<std::pair<uint32_t, std::vector<uint8_t>>>& others) {
  auto put_ext = [&](uint32_t type, const uint8_t* data, uint32_t len) {
    store_be32(hc.data() + pos, type);
    store_be32(hc.data() + pos + 4, len);
    if (len) std::memcpy(hc.data() + pos + 8, data, len);
    pos += 8 + ((uint64_t{len} + 7) & ~7ULL);
  };
  if (!backing_format.empty())
    put_ext(0xe2792aca, reinterpret_cast<const uint8_t*>(backing_format.data()),
            static_cast<uint32_t>(backing_format.size()));
  if (with_feature_names) {
    struct F { uint8_t type, bit; const char* name; };
    static const F features[] = {
        {0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
        {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"}, {2, 1, "raw external data"},
    };
    std::vector<uint8_t> table(sizeof(features) / sizeof(features[0]) * 48, 0);
    for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); ++i) {
      table[i * 48] = features[i].type;
      table[i * 48 + 1] = features[i].bit;
      std::memcpy(table.data() + i * 48 + 2, features[i].name, std::strlen(features[i].name));
    }
    put_ext(0x6803f857, table.data(), static_cast<uint32_t>(table.size()));
  }
  for (auto& [type, data] : others) put_ext(type, data.data(), static_cast<uint32_t>(data.size()));
  put_ext(0, nullptr, 0);
  if (backing_file.empty()) return 0;
  std::memcpy(hc.data() + pos, backing_file.data(), backing_file.size());
  return pos;
}

}  // namespace

Result<void> Qcow2Image::create(const std::string& path, const Qcow2CreateOptions& o) {
  int cluster_bits = log2_exact(o.cluster_size);
  if (cluster_bits < 9 || cluster_bits > 21)
    return fail_invalid("cluster size {} must be a power of two between 512 and 2M", o.cluster_size);
  int refcount_order = log2_exact(static_cast<uint64_t>(o.refcount_bits));
  if (refcount_order < 0 || refcount_order > 6)
    return fail_invalid("refcount_bits {} must be a power of two between 1 and 64", o.refcount_bits);
  if (o.version != 2 && o.version != 3) return fail_invalid("qcow2 version must be 2 or 3");
  if (o.version == 2) {
    if (o.refcount_bits != 16) return fail_invalid("compat=0.10 (qcow2 v2) only supports refcount_bits=16");
    if (o.lazy_refcounts) return fail_invalid("lazy refcounts need compat=1.1");
    if (o.compression != Qcow2Compression::Zlib) return fail_invalid("compression_type=zstd needs compat=1.1");
    if (o.extended_l2) return fail_invalid("extended L2 entries need compat=1.1");
  }
  if (o.extended_l2 && o.cluster_size < 16384)
    return fail_invalid("extended L2 entries need clusters of at least 16 KiB (cluster size {})", o.cluster_size);
  if (o.backing_file.size() > 1023) return fail_invalid("backing file name is longer than 1023 bytes");
  uint64_t size = (o.size + 511) & ~511ULL;
  uint64_t cs = o.cluster_size;
  uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
  uint64_t l1_size = (size + cs * l2_entries - 1) / (cs * l2_entries);
  if (l1_size * 8 > (32ULL << 20)) return fail_invalid("virtual size {} is too large for {}-byte clusters", size, cs);
  uint64_t refblock_entries = cs * 8 / static_cast<uint64_t>(o.refcount_bits);
  uint64_t l1_clusters = std::max<uint64_t>(1, (l1_size * 8 + cs - 1) / cs);
  // Layout: header, refcount table, refcount blocks, L1 table; grow until the blocks cover it all.
  uint64_t rb_count = 1, rt_clusters = 1;
  while (true) {
    uint64_t total = 1 + rt_clusters + rb_count + l1_clusters;
    uint64_t need_rb = (total + refblock_entries - 1) / refblock_entries;
    uint64_t need_rt = (need_rb * 8 + cs - 1) / cs;
    if (need_rb <= rb_count && need_rt <= rt_clusters) break;
    rb_count = std::max(rb_count, need_rb);
    rt_clusters = std::max(rt_clusters, need_rt);
  }
  uint64_t rt_offset = cs;
  uint64_t rb_offset = (1 + rt_clusters) * cs;
  uint64_t l1_offset = (1 + rt_clusters + rb_count) * cs;
  uint64_t total = 1 + rt_clusters + rb_count + l1_clusters;

  std::vector<uint8_t> hc(cs, 0);
  store_be32(hc.data(), 0x514649fb);
  store_be32(hc.data() + 4, static_cast<uint32_t>(o.version));
  store_be32(hc.data() + 20, static_cast<uint32_t>(cluster_bits));
  store_be64(hc.data() + 24, size);
  store_be32(hc.data() + 36, static_cast<uint32_t>(l1_size));
  store_be64(hc.data() + 40, l1_offset);
  store_be64(hc.data() + 48, rt_offset);
  store_be32(hc.data() + 56, static_cast<uint32_t>(rt_clusters));
  uint64_t ext_start = 72;
  if (o.version == 3) {
    uint64_t incompat = (o.compression == Qcow2Compression::Zstd ? (1ULL << 3) : 0) | (o.extended_l2 ? (1ULL << 4) : 0);
    store_be64(hc.data() + 72, incompat);
    store_be64(hc.data() + 80, o.lazy_refcounts ? 1 : 0);
    store_be32(hc.data() + 96, static_cast<uint32_t>(refcount_order));
    store_be32(hc.data() + 100, 112);
    hc[104] = static_cast<uint8_t>(o.compression);
    ext_start = 112;
  }
  uint64_t backing_offset =
      build_extensions(hc, ext_start, o.backing_file, o.backing_format, o.version == 3, {});
  if (backing_offset) {
    store_be64(hc.data() + 8, backing_offset);
    store_be32(hc.data() + 16, static_cast<uint32_t>(o.backing_file.size()));
  }

  UniqueFd fd = TRY(UniqueFd::open(path, O_RDWR | O_CREAT | O_TRUNC));
  std::vector<uint8_t> meta(total * cs, 0);
  std::memcpy(meta.data(), hc.data(), cs);
  for (uint64_t i = 0; i < rb_count; ++i) store_be64(meta.data() + rt_offset + i * 8, rb_offset + i * cs);
  for (uint64_t c = 0; c < total; ++c) {
    uint8_t* block = meta.data() + rb_offset + (c / refblock_entries) * cs;
    uint64_t idx = c % refblock_entries;
    switch (refcount_order) {
      case 0: case 1: case 2: {
        uint64_t bit = idx * static_cast<uint64_t>(o.refcount_bits);
        block[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
        break;
      }
      case 3: block[idx] = 1; break;
      case 4: store_be16(block + idx * 2, 1); break;
      case 5: store_be32(block + idx * 4, 1); break;
      default: store_be64(block + idx * 8, 1); break;
    }
  }
  // The header last, so a half-written file never looks like a valid image.
  TRY_CTX(pwrite_all(fd.get(), meta.data() + cs, meta.size() - cs, static_cast<off_t>(cs)), "write " + path);
  TRY_CTX(pwrite_all(fd.get(), meta.data(), cs, 0), "write " + path);
  if (::fdatasync(fd.get()) < 0) return fail_errno("fdatasync " + path);
  fd.reset();

  if (o.preallocation != Preallocation::Off) {
    Qcow2OpenOptions oo;
    oo.open_backing = false;
    auto image = TRY(open(path, OpenMode::ReadWrite, oo));
    TRY(image->preallocate(o.preallocation));
    TRY(image->close());
  }
  return ok();
}

Result<void> Qcow2Image::preallocate(Preallocation mode) {
  std::lock_guard lock(mutex_);
  uint64_t clusters = (size_ + cluster_size_ - 1) / cluster_size_;
  uint64_t c = 0;
  uint64_t entries = 1ULL << l2_bits_;
  while (c < clusters) {
    uint64_t l1_index = c / entries;
    TRY(get_l2(l1_index, true));
    uint64_t n = std::min(clusters - c, entries - c % entries);
    uint64_t got = 0;
    uint64_t host = TRY(allocate_clusters(1, n, &got));
    uint8_t* table = TRY(get_l2(l1_index, true));
    for (uint64_t i = 0; i < got; ++i)
      set_l2_entry(table, (c + i) % entries, (host + i * cluster_size_) | kOflagCopied);
    l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
    uint64_t end = host + got * cluster_size_;
    if (mode == Preallocation::Falloc) {
      if (::fallocate(fd_.get(), 0, static_cast<off_t>(host), static_cast<off_t>(got * cluster_size_)) < 0)
        return fail_errno("fallocate " + path_);
    } else if (mode == Preallocation::Full) {
      std::vector<uint8_t> zeros(std::min<uint64_t>(got * cluster_size_, 4 << 20), 0);
      for (uint64_t p = host; p < end;) {
        uint64_t k = std::min<uint64_t>(zeros.size(), end - p);
        TRY(pwrite_data(zeros.data(), k, p));
        p += k;
      }
    } else if (file_size() < end) {
      if (::ftruncate(fd_.get(), static_cast<off_t>(end)) < 0) return fail_errno("truncate " + path_);
    }
    c += got;
  }
  return flush_metadata();
}

// ---------------------------------------------------------------------------------------------
// Check and repair
//
// As qemu-img's: count every reference from the metadata into an in-memory refcount table (imrt),
// compare it with the refcounts on disk, fix in place where the structure is sound, and rebuild the
// whole refcount structure from the imrt when it is not (a referenced cluster with refcount 0, a
// refcount block that is missing, misplaced or shared). Messages, counts and exit codes follow
// qemu-img 7.2, so both tools report the same damage the same way.

struct Qcow2Image::CheckState {
  std::vector<uint32_t> refs;  // imrt: references counted per host cluster
  uint64_t file_size = 0;
  uint64_t refcount_max = 0;
  bool rebuild = false;
  uint64_t highest = 0;  // last cluster in use, by either count
};

namespace {

constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffULL;
constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feULL;
constexpr uint64_t kRtReservedMask = 0x1ffULL;
constexpr uint64_t kOflagZero = 1ULL;

// One refcount block's bytes from imrt entries [first, first + entries).
void encode_refblock(uint8_t* block, size_t block_bytes, const std::vector<uint32_t>& refs, uint64_t first,
                     uint64_t entries, uint32_t refcount_order, uint64_t refcount_max) {
  std::memset(block, 0, block_bytes);
  for (uint64_t i = 0; i < entries && first + i < refs.size(); ++i) {
    uint64_t v = std::min<uint64_t>(refs[first + i], refcount_max);
    if (!v) continue;
    switch (refcount_order) {
      case 0: case 1: case 2: {
        uint64_t bit = i << refcount_order;
        block[bit / 8] = static_cast<uint8_t>(block[bit / 8] | (v << (bit % 8)));
        break;
      }
      case 3: block[i] = static_cast<uint8_t>(v); break;
      case 4: store_be16(block + i * 2, static_cast<uint16_t>(v)); break;
      case 5: store_be32(block + i * 4, static_cast<uint32_t>(v)); break;
      default: store_be64(block + i * 8, v); break;
    }
  }
}

// First fit of `count` free clusters in the imrt from *first_free on (growing it at the end), marked
// used. *first_free moves to the first gap seen, as qemu's alloc_clusters_imrt does.
uint64_t allocate_in_imrt(std::vector<uint32_t>& refs, uint64_t count, uint64_t* first_free) {
  uint64_t c = *first_free;
  uint64_t run = 0;
  bool first_gap = true;
  for (; c < refs.size() && run < count; ++c) {
    if (refs[c] == 0) {
      ++run;
      if (first_gap) {
        *first_free = c;
        first_gap = false;
      }
    } else {
      run = 0;
    }
  }
  uint64_t start = c - run;
  if (refs.size() < start + count) refs.resize(start + count, 0);
  for (uint64_t i = 0; i < count; ++i) refs[start + i] = 1;
  return start;
}

}  // namespace

Result<uint64_t> Qcow2Image::stored_refcount(uint64_t cluster, uint64_t fsize) {
  uint64_t range = cluster / refblock_entries_;
  if (range >= rt_.size()) return uint64_t{0};
  uint64_t off = rt_[range] & kRtOffsetMask;
  if (!off) return uint64_t{0};
  if (off % cluster_size_) return fail(EIO, fmt::format("refblock offset {} unaligned (reftable index: {:#x})", hex(off), range));
  // A block past the end of the file reads as zeros (qemu's block layer pads reads there).
  if (off >= fsize || cluster_size_ > fsize - off) return uint64_t{0};
  return get_refcount(cluster);
}

Result<void> Qcow2Image::check_count_references(CheckState& st, CheckResult& res) {
  auto inc = [&](uint64_t off, uint64_t bytes, const char* what) {
    if (bytes == 0) return;
    uint64_t first = off >> cluster_bits_;
    uint64_t last = (off + bytes - 1) >> cluster_bits_;
    for (uint64_t c = first; c <= last; ++c) {
      if (c >= st.refs.size()) {
        res.messages.push_back(fmt::format("ERROR: {} at offset {} is beyond the end of the image file", what, hex(off)));
        ++res.corruptions;
        return;
      }
      if (st.refs[c] >= st.refcount_max) {
        res.messages.push_back(fmt::format("ERROR: overflow cluster offset={:#x}", c << cluster_bits_));
        ++res.corruptions;
        continue;
      }
      ++st.refs[c];
    }
  };
  inc(0, cluster_size_, "header");
  auto walk_l1 = [&](const std::vector<uint64_t>& l1, bool active) -> Result<void> {
    for (size_t i = 0; i < l1.size(); ++i) {
      if (!l1[i]) continue;
      if (l1[i] & kL1ReservedMask) {
        res.messages.push_back(fmt::format("ERROR found L1 entry with reserved bits set: {:x}", l1[i]));
        ++res.corruptions;
      }
      uint64_t l2_off = l1[i] & kL1OffsetMask;
      if (!l2_off) continue;
      inc(l2_off, cluster_size_, "L2 table");
      if (l2_off % cluster_size_) {
        res.messages.push_back(fmt::format("ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted", l2_off));
        ++res.corruptions;
        continue;
      }
      if (l2_off >= st.file_size || cluster_size_ > st.file_size - l2_off) continue;  // counted by inc
      uint8_t* table = TRY(cache_get(l2_cache_, l2_off, true, true));
      // Refcount lookups below do not touch the L2 cache, but keep a copy all the same: cheap.
      std::vector<uint8_t> copy(table, table + cluster_size_);
      uint64_t entries = 1ULL << l2_bits_;
      uint64_t next_contiguous = 0;  // fragmentation counts within one L2 table, as qemu's
      for (uint64_t j = 0; j < entries; ++j) {
        uint64_t e = load_be64(copy.data() + j * l2_entry_size_);
        // Extended L2: the subcluster bitmap (low 32 bits: allocated, high 32: reads as zeros),
        // checked as qemu-img 7.2 checks it, with its messages.
        uint64_t bitmap = extended_l2_ ? load_be64(copy.data() + j * l2_entry_size_ + 8) : 0;
        if (e & kOflagCompressed) {
          if (bitmap) {
            res.messages.push_back(fmt::format(
                "ERROR compressed cluster {} with non-zero subcluster allocation bitmap, entry={:#x}", j, e));
            ++res.corruptions;
            continue;  // not counted as a reference (qemu then reports its cluster as leaked)
          }
          if (e & kOflagCopied) {
            res.messages.push_back(fmt::format("ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                                               e & coffset_mask_));
            ++res.corruptions;
          }
          uint64_t h, b;
          compressed_range(e & ~(kOflagCompressed | kOflagCopied), &h, &b);
          inc(h, b, "compressed cluster");
          if (active) {
            // As qemu counts them: compressed clusters are fragmented by nature.
            ++res.allocated_clusters;
            ++res.compressed_clusters;
            ++res.fragmented_clusters;
          }
          continue;
        }
        if (e & kL2StdReservedMask) {
          res.messages.push_back(fmt::format("ERROR found l2 entry with reserved bits set: {:x}", e));
          ++res.corruptions;
        }
        uint64_t host = e & kL2OffsetMask;
        if (!host) {
          if (bitmap & kSubclusterAllocMask) {
            res.messages.push_back("ERROR: Unallocated cluster has non-zero subcluster allocation map");
            ++res.corruptions;
          }
          continue;
        }
        if ((bitmap >> 32) & bitmap) {
          res.messages.push_back(
              fmt::format("ERROR offset={:x}: Allocated cluster has corrupted subcluster allocation bitmap", host));
          ++res.corruptions;
        }
        if (host % cluster_size_) {
          ++res.corruptions;
          bool holds_data = extended_l2_ ? (bitmap & kSubclusterAllocMask) != 0 : !(e & kOflagZero);
          res.messages.push_back(fmt::format("ERROR offset={:x}: {} cluster is not properly aligned; L2 entry corrupted.",
                                             host, holds_data ? "Data" : "Preallocated"));
        }
        if (active) {
          ++res.allocated_clusters;
          if (next_contiguous && host != next_contiguous) ++res.fragmented_clusters;
          next_contiguous = host + cluster_size_;
        }
        inc(host, cluster_size_, "data cluster");
      }
    }
    return ok();
  };
  inc(l1_offset_, uint64_t{l1_size_} * 8, "L1 table");
  TRY(walk_l1(l1_, true));
  for (auto& s : snapshots_) {
    if (s.l1_offset % cluster_size_) {
      res.messages.push_back(fmt::format("ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; "
                                         "snapshot table entry corrupted", s.id, s.name, s.l1_offset));
      ++res.corruptions;
      continue;
    }
    inc(s.l1_offset, uint64_t{s.l1_size} * 8, "snapshot L1 table");
    uint64_t bytes = uint64_t{s.l1_size} * 8;
    if (s.l1_offset > st.file_size || bytes > st.file_size - s.l1_offset) continue;  // counted by inc
    std::vector<uint64_t> l1(s.l1_size);
    std::vector<uint8_t> buf(bytes);
    if (!buf.empty()) TRY(pread_meta(buf.data(), buf.size(), s.l1_offset, "snapshot L1 table"));
    for (size_t i = 0; i < l1.size(); ++i) l1[i] = load_be64(buf.data() + i * 8);
    TRY(walk_l1(l1, false));
  }
  if (nb_snapshots_) inc(snapshots_offset_, snapshot_table_bytes_, "snapshot table");
  inc(rt_offset_, uint64_t{rt_clusters_} * cluster_size_, "refcount table");
  for (size_t i = 0; i < rt_.size(); ++i) {
    if (rt_[i] & kRtReservedMask) {
      res.messages.push_back(fmt::format("ERROR refcount table entry {} has reserved bits set", i));
      ++res.corruptions;
      st.rebuild = true;
      continue;
    }
    uint64_t off = rt_[i] & kRtOffsetMask;
    if (off % cluster_size_) {
      res.messages.push_back(fmt::format("ERROR refcount block {} is not cluster aligned; refcount table entry corrupted", i));
      ++res.corruptions;
      st.rebuild = true;
      continue;
    }
    uint64_t cluster = off >> cluster_bits_;
    if (off && cluster >= st.refs.size()) {
      // (qemu grows the file to cover the block and then rebuilds; rebuilding alone does as well.)
      res.messages.push_back(fmt::format("ERROR refcount block {} is outside image", i));
      ++res.corruptions;
      st.rebuild = true;
      continue;
    }
    if (!off) continue;
    inc(off, cluster_size_, "refcount block");
    if (st.refs[cluster] != 1) {
      res.messages.push_back(fmt::format("ERROR refcount block {} refcount={}", i, st.refs[cluster]));
      ++res.corruptions;
      st.rebuild = true;
    }
  }
  return ok();
}

Result<void> Qcow2Image::check_compare(CheckState& st, CheckResult& res, RepairMode fix) {
  st.highest = 0;
  for (uint64_t c = 0; c < st.refs.size(); ++c) {
    auto stored = stored_refcount(c, st.file_size);
    if (!stored) {
      res.messages.push_back(fmt::format("Can't get refcount for cluster {}: {}", c, std::strerror(EIO)));
      ++res.check_errors;
      continue;
    }
    uint64_t on_disk = *stored;
    uint64_t counted = st.refs[c];
    if (on_disk || counted) st.highest = c;
    if (on_disk == counted) continue;
    uint64_t* fixed = nullptr;
    if (on_disk == 0) st.rebuild = true;  // the structure itself may be missing: rebuild, never patch
    else if (on_disk > counted && fix != RepairMode::None) fixed = &res.leaks_fixed;
    else if (on_disk < counted && fix == RepairMode::All) fixed = &res.corruptions_fixed;
    res.messages.push_back(fmt::format("{} cluster {} refcount={} reference={}",
                                       fixed ? "Repairing" : on_disk < counted ? "ERROR" : "Leaked", c, on_disk, counted));
    if (fixed && set_refcount(c, counted)) {
      ++*fixed;
      continue;
    }
    if (on_disk < counted) ++res.corruptions;
    else ++res.leaks;
  }
  return ok();
}

Result<void> Qcow2Image::check_copied_flags(CheckResult& res, RepairMode fix) {
  bool repair = fix == RepairMode::All ||
                (fix == RepairMode::Leaks && !res.check_errors && !res.corruptions && !res.leaks);
  uint64_t fsize = file_size();
  for (size_t i = 0; i < l1_.size(); ++i) {
    uint64_t l2_off = l1_[i] & kL1OffsetMask;
    if (!l2_off) continue;
    auto rc = stored_refcount(l2_off >> cluster_bits_, fsize);
    if (!rc) continue;  // already reported by the comparison
    if ((*rc == 1) != ((l1_[i] & kOflagCopied) != 0)) {
      ++res.corruptions;
      res.messages.push_back(fmt::format("{} OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}",
                                         repair ? "Repairing" : "ERROR", i, l1_[i], *rc));
      if (repair) {
        l1_[i] = *rc == 1 ? l1_[i] | kOflagCopied : l1_[i] & ~kOflagCopied;
        l1_dirty_ = true;
        --res.corruptions;
        ++res.corruptions_fixed;
      }
    }
    if (l2_off % cluster_size_ || l2_off >= fsize || cluster_size_ > fsize - l2_off) continue;
    uint8_t* table = TRY(cache_get(l2_cache_, l2_off, true, true));
    uint64_t fixed_here = 0;
    for (uint64_t j = 0; j < (1ULL << l2_bits_); ++j) {
      uint64_t e = l2_entry(table, j);
      uint64_t host = e & kL2OffsetMask;
      if ((e & kOflagCompressed) || !host) continue;
      auto drc = stored_refcount(host >> cluster_bits_, fsize);
      if (!drc) continue;
      if ((*drc == 1) == ((e & kOflagCopied) != 0)) continue;
      ++res.corruptions;
      res.messages.push_back(fmt::format("{} OFLAG_COPIED data cluster: l2_entry={:x} refcount={}",
                                         repair ? "Repairing" : "ERROR", e, *drc));
      if (repair) {
        set_l2_entry(table, j, *drc == 1 ? e | kOflagCopied : e & ~kOflagCopied);
        ++fixed_here;
      }
    }
    if (fixed_here) {
      l2_cache_.slots[l2_cache_.index[l2_off]].dirty = true;
      res.corruptions -= fixed_here;
      res.corruptions_fixed += fixed_here;
    }
  }
  return ok();
}

Result<void> Qcow2Image::rebuild_refcount_structure(CheckState& st) {
  // The old blocks are forgotten, not written: the new structure replaces them wholly.
  for (auto& slot : rb_cache_.slots) {
    slot.offset = 0;
    slot.dirty = false;
  }
  rb_cache_.index.clear();
  compressed_next_ = compressed_end_ = 0;

  // Each refcount block is a slice of the imrt; blocks and the table are allocated in the imrt
  // itself (the old structure stays counted there, so nothing live is overwritten), and every
  // block is written after the allocations it describes. Allocating the table can need a longer
  // table, hence the loop; what earlier rounds allocated is leaked and given back afterwards.
  std::vector<uint64_t> table;
  std::vector<uint8_t> block(cluster_size_);
  auto write_blocks = [&](uint64_t first, uint64_t end, bool* grown) -> Result<void> {
    uint64_t first_free = 0;
    for (uint64_t c = first; c < end && c < st.refs.size(); ++c) {
      if (!st.refs[c]) continue;
      uint64_t index = c / refblock_entries_;
      uint64_t start = index * refblock_entries_;
      uint64_t off;
      if (index < table.size() && table[index]) {
        off = table[index];
      } else {
        first_free = std::max(first_free, start);  // never inside a block already written
        uint64_t block_cluster = allocate_in_imrt(st.refs, 1, &first_free);
        end = std::max(end, block_cluster + 1);  // the block that counts this block is written too
        if (table.size() <= index) {
          uint64_t per_cluster = cluster_size_ / 8;
          table.resize((index / per_cluster + 1) * per_cluster, 0);
          *grown = true;
        }
        off = block_cluster << cluster_bits_;
        table[index] = off;
      }
      encode_refblock(block.data(), block.size(), st.refs, start, refblock_entries_, refcount_order_, st.refcount_max);
      TRY(pwrite_meta(block.data(), block.size(), off, "refcount block"));
      c = start + refblock_entries_ - 1;
    }
    return ok();
  };
  bool grown = false;
  TRY(write_blocks(0, st.refs.size(), &grown));
  uint64_t table_offset = 0;
  uint64_t table_clusters = 0;
  do {
    table_clusters = (table.size() * 8 + cluster_size_ - 1) / cluster_size_;
    if (table_clusters * cluster_size_ > kMaxRefTableBytes)
      return fail(EFBIG, fmt::format("{}: rebuilt refcount table would need {} clusters", path_, table_clusters));
    uint64_t first_free = 0;
    uint64_t start = allocate_in_imrt(st.refs, table_clusters, &first_free);
    grown = false;
    TRY(write_blocks(start, start + table_clusters, &grown));
    table_offset = start << cluster_bits_;
  } while (grown);

  while (!table.empty() && table.back() == 0) table.pop_back();
  rt_ = std::move(table);
  TRY(install_refcount_table(table_offset, table_clusters));
  free_hint_ = 0;
  return ok();
}

Result<CheckResult> Qcow2Image::check(RepairMode repair) {
  std::lock_guard lock(mutex_);
  RepairMode fix = read_only_ ? RepairMode::None : repair;
  if (!read_only_) {
    TRY(flush_metadata());
    TRY(flush_refcounts());
  }
  CheckResult res;
  CheckState st;
  st.file_size = file_size();
  st.refs.assign((st.file_size + cluster_size_ - 1) / cluster_size_, 0);
  st.refcount_max = refcount_order_ >= 5 ? UINT32_MAX : (1ULL << (1U << refcount_order_)) - 1;
  res.total_clusters = (size_ + cluster_size_ - 1) / cluster_size_;

  TRY(check_count_references(st, res));
  CheckResult before_compare = res;
  TRY(check_compare(st, res, RepairMode::None));

  if (st.rebuild && fix == RepairMode::All) {
    res.messages.push_back("Rebuilding refcount structure");
    CheckResult old = res;
    auto rebuilt = rebuild_refcount_structure(st);
    if (!rebuilt) {
      res.messages.push_back(fmt::format("ERROR rebuilding the refcount structure: {}", rebuilt.error().message()));
      ++res.check_errors;
      res.failure = rebuilt.error().message();
      return res;
    }
    // The references are counted again against the new structure; what the old one occupied is
    // leaked now and given back (those leaks are the rebuild's own, not the image's).
    CheckResult frag = res;
    res.corruptions = res.leaks = 0;
    st.rebuild = false;
    st.file_size = file_size();
    st.refs.assign(std::max<uint64_t>(st.refs.size(), (st.file_size + cluster_size_ - 1) / cluster_size_), 0);
    TRY(check_count_references(st, res));
    res.allocated_clusters = frag.allocated_clusters;
    res.fragmented_clusters = frag.fragmented_clusters;
    res.compressed_clusters = frag.compressed_clusters;
    CheckResult saved = res;
    res = CheckResult{};
    res.messages = std::move(saved.messages);
    TRY(check_compare(st, res, RepairMode::Leaks));
    if (st.rebuild) res.messages.push_back("ERROR rebuilt refcount structure is still broken");
    uint64_t fresh_leaks = res.leaks;
    saved.messages = std::move(res.messages);
    res = std::move(saved);
    if (res.corruptions < old.corruptions) res.corruptions_fixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaks_fixed += old.leaks - res.leaks;
    res.leaks += fresh_leaks;
  } else if (fix != RepairMode::None) {
    if (st.rebuild) {
      res.messages.push_back("ERROR need to rebuild refcount structures");
      ++res.check_errors;
      res.failure = std::strerror(EIO);
      return res;
    }
    if (res.leaks || res.corruptions) {
      auto messages = std::move(res.messages);
      res = before_compare;
      res.messages = std::move(messages);
      TRY(check_compare(st, res, fix));
    }
  }

  TRY(check_copied_flags(res, fix));
  res.image_end_offset = (st.highest + 1) * cluster_size_;

  if (fix != RepairMode::None) {
    TRY(flush_refcounts());
    TRY(flush_metadata());
    TRY(sync_file());
    free_hint_ = 0;
    if (!res.check_errors && !res.corruptions) TRY(mark_clean());
  }
  return res;
}

// ---------------------------------------------------------------------------------------------
// Header rewrites

Result<void> Qcow2Image::set_backing(const std::string& backing_file, const std::string& backing_format) {
  if (read_only_) return fail(EROFS, path_ + ": image is open read-only");
  if (backing_file.size() > 1023) return fail_invalid("backing file name is longer than 1023 bytes");
  std::lock_guard lock(mutex_);
  std::vector<uint8_t> hc(cluster_size_, 0);
  TRY(pread_meta(hc.data(), header_length_, 0, "header"));
  std::fill(hc.begin() + header_length_, hc.end(), 0);
  bool had_feature_names = !feature_names_.empty();
  uint64_t needed = header_length_ + 16 + backing_format.size() + 8 + (had_feature_names ? 8 * 48 + 8 : 0) +
                    backing_file.size() + 8;
  for (auto& [t, d] : unknown_extensions_) needed += 8 + d.size() + 8;
  if (needed > cluster_size_) return fail_invalid("{}: backing file name does not fit in the header cluster", path_);
  uint64_t off = build_extensions(hc, header_length_, backing_file, backing_file.empty() ? "" : backing_format,
                                  had_feature_names, unknown_extensions_);
  store_be64(hc.data() + 8, off);
  store_be32(hc.data() + 16, static_cast<uint32_t>(off ? backing_file.size() : 0));
  TRY(pwrite_meta(hc.data(), cluster_size_, 0, "header"));
  TRY(sync_file());
  backing_file_ = backing_file;
  backing_format_ = backing_file.empty() ? "" : backing_format;
  return ok();
}

// ---------------------------------------------------------------------------------------------
// Resize

Result<void> Qcow2Image::resize(uint64_t new_size) {
  if (read_only_) return fail(EROFS, path_ + ": image is open read-only");
  new_size = (new_size + 511) & ~511ULL;
  std::lock_guard lock(mutex_);
  uint64_t coverage = uint64_t{1} << (cluster_bits_ + l2_bits_);
  uint64_t l1_needed = (new_size + coverage - 1) / coverage;
  if (new_size < size_) {
    // Drop the clusters past the new end (whole clusters only).
    uint64_t first = (new_size + cluster_size_ - 1) & ~uint64_t{cluster_size_ - 1};
    uint64_t entries = 1ULL << l2_bits_;
    for (uint64_t pos = first; pos < size_; pos += cluster_size_) {
      uint64_t l1_index = pos >> (cluster_bits_ + l2_bits_);
      uint8_t* table = TRY(get_l2(l1_index, false));
      if (!table) {
        pos = ((l1_index + 1) << (cluster_bits_ + l2_bits_)) - cluster_size_;
        continue;
      }
      uint64_t idx = (pos >> cluster_bits_) & (entries - 1);
      if (l2_entry(table, idx) == 0 && l2_bitmap(table, idx) == 0) continue;
      table = TRY(get_l2(l1_index, true));
      uint64_t e = l2_entry(table, idx);
      if (extended_l2_) set_l2_bitmap(table, idx, 0);
      if (e & kOflagCompressed) {
        uint64_t h, b;
        compressed_range(e & ~(kOflagCompressed | kOflagCopied), &h, &b);
        TRY(free_later(h, b));
      } else if (e & kL2OffsetMask) {
        TRY(free_later(e & kL2OffsetMask, cluster_size_));
      }
      set_l2_entry(table, idx, 0);
      l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
    }
    TRY(flush_metadata());
  }
  if (l1_needed > l1_.size()) {
    if (l1_needed * 8 > (32ULL << 20)) return fail_invalid("{}: size {} is too large for this cluster size", path_, new_size);
    TRY(flush_metadata());
    uint64_t clusters = (l1_needed * 8 + cluster_size_ - 1) / cluster_size_;
    uint64_t got = 0;
    uint64_t off = TRY(allocate_clusters(clusters, clusters, &got));
    TRY(flush_refcounts());
    TRY(sync_file());
    std::vector<uint8_t> buf(clusters * cluster_size_, 0);
    for (size_t i = 0; i < l1_.size(); ++i) store_be64(buf.data() + i * 8, l1_[i]);
    TRY(pwrite_meta(buf.data(), buf.size(), off, "L1 table"));
    TRY(sync_file());
    uint64_t old_off = l1_offset_;
    uint64_t old_bytes = l1_.size() * 8;
    l1_.resize(l1_needed, 0);
    l1_offset_ = off;
    l1_size_ = static_cast<uint32_t>(l1_needed);
    size_ = new_size;
    uint8_t h[24];
    store_be64(h, size_);
    store_be32(h + 8, 0);
    store_be32(h + 12, l1_size_);
    store_be64(h + 16, l1_offset_);
    TRY(pwrite_meta(h, sizeof(h), 24, "header"));
    TRY(sync_file());
    if (old_bytes) TRY(free_now(old_off, old_bytes));
    TRY(flush_refcounts());
  } else {
    size_ = new_size;
    uint8_t h[8];
    store_be64(h, size_);
    TRY(pwrite_meta(h, sizeof(h), 24, "header"));
  }
  TRY(sync_file());
  return ok();
}

// ---------------------------------------------------------------------------------------------
// Snapshots

Result<void> Qcow2Image::update_tree_refcounts(uint64_t l1_offset, uint32_t l1_size, int64_t delta,
                                              bool fix_copied_active) {
  std::vector<uint64_t> l1;
  if (l1_offset == l1_offset_) {
    l1 = l1_;
  } else {
    std::vector<uint8_t> buf(uint64_t{l1_size} * 8);
    if (!buf.empty()) TRY(pread_meta(buf.data(), buf.size(), l1_offset, "snapshot L1 table"));
    l1.resize(l1_size);
    for (size_t i = 0; i < l1.size(); ++i) l1[i] = load_be64(buf.data() + i * 8);
  }
  uint64_t entries = 1ULL << l2_bits_;
  if (delta != 0) {
    for (size_t i = 0; i < l1.size(); ++i) {
      uint64_t l2_off = l1[i] & kL1OffsetMask;
      if (!l2_off) continue;
      uint8_t* t = TRY(cache_get(l2_cache_, l2_off, true, true));
      std::vector<uint8_t> copy(t, t + cluster_size_);
      for (uint64_t j = 0; j < entries; ++j) {
        uint64_t e = load_be64(copy.data() + j * l2_entry_size_);
        if (e & kOflagCompressed) {
          uint64_t h, b;
          compressed_range(e & ~(kOflagCompressed | kOflagCopied), &h, &b);
          for (uint64_t c = h >> cluster_bits_; c <= (h + b - 1) >> cluster_bits_; ++c) TRY(add_refcount(c, delta));
        } else if (e & kL2OffsetMask) {
          TRY(add_refcount((e & kL2OffsetMask) >> cluster_bits_, delta));
        }
      }
      TRY(add_refcount(l2_off >> cluster_bits_, delta));
    }
  }
  if (fix_copied_active) {
    for (size_t i = 0; i < l1_.size(); ++i) {
      uint64_t l2_off = l1_[i] & kL1OffsetMask;
      if (!l2_off) continue;
      uint64_t rc = TRY(get_refcount(l2_off >> cluster_bits_));
      uint64_t want = l2_off | (rc == 1 ? kOflagCopied : 0);
      if (l1_[i] != want) {
        l1_[i] = want;
        l1_dirty_ = true;
      }
      uint8_t* t = TRY(cache_get(l2_cache_, l2_off, true, true));
      std::vector<uint8_t> copy(t, t + cluster_size_);
      bool changed = false;
      for (uint64_t j = 0; j < entries; ++j) {
        uint64_t e = load_be64(copy.data() + j * l2_entry_size_);
        if ((e & kOflagCompressed) || !(e & kL2OffsetMask)) continue;
        uint64_t erc = TRY(get_refcount((e & kL2OffsetMask) >> cluster_bits_));
        uint64_t we = (e & ~kOflagCopied) | (erc == 1 ? kOflagCopied : 0);
        if (we != e) {
          store_be64(copy.data() + j * l2_entry_size_, we);
          changed = true;
        }
      }
      if (changed) {
        t = TRY(cache_get(l2_cache_, l2_off, true, true));
        std::memcpy(t, copy.data(), cluster_size_);
        l2_cache_.slots[l2_cache_.index[l2_off]].dirty = true;
      }
    }
  }
  return ok();
}

Result<void> Qcow2Image::write_snapshot_table(std::vector<Qcow2Snapshot> snaps) {
  std::vector<uint8_t> buf;
  for (auto& s : snaps) {
    size_t base = buf.size();
    uint32_t extra_size = static_cast<uint32_t>(24 + s.extra.size());
    buf.resize(base + 40 + extra_size + s.id.size() + s.name.size());
    uint8_t* p = buf.data() + base;
    store_be64(p, s.l1_offset);
    store_be32(p + 8, s.l1_size);
    store_be16(p + 12, static_cast<uint16_t>(s.id.size()));
    store_be16(p + 14, static_cast<uint16_t>(s.name.size()));
    store_be32(p + 16, s.date_sec);
    store_be32(p + 20, s.date_nsec);
    store_be64(p + 24, s.vm_clock_nsec);
    store_be32(p + 32, static_cast<uint32_t>(std::min<uint64_t>(s.vm_state_size, UINT32_MAX)));
    store_be32(p + 36, extra_size);
    store_be64(p + 40, s.vm_state_size);
    store_be64(p + 48, s.disk_size);
    store_be64(p + 56, s.icount);
    if (!s.extra.empty()) std::memcpy(p + 64, s.extra.data(), s.extra.size());
    std::memcpy(p + 40 + extra_size, s.id.data(), s.id.size());
    std::memcpy(p + 40 + extra_size + s.id.size(), s.name.data(), s.name.size());
    buf.resize((buf.size() + 7) & ~size_t{7}, 0);
  }
  uint64_t old_off = snapshots_offset_;
  uint64_t old_bytes = snapshot_table_bytes_;
  uint64_t new_off = 0;
  if (!buf.empty()) {
    uint64_t clusters = (buf.size() + cluster_size_ - 1) / cluster_size_;
    uint64_t got = 0;
    new_off = TRY(allocate_clusters(clusters, clusters, &got));
    TRY(flush_refcounts());
    TRY(pwrite_meta(buf.data(), buf.size(), new_off, "snapshot table"));
  }
  TRY(sync_file());
  uint8_t h[12];
  store_be32(h, static_cast<uint32_t>(snaps.size()));
  store_be64(h + 4, new_off);
  TRY(pwrite_meta(h, sizeof(h), 60, "header"));
  TRY(sync_file());
  if (nb_snapshots_ && old_bytes) TRY(free_now(old_off, old_bytes));
  snapshots_ = std::move(snaps);
  nb_snapshots_ = static_cast<uint32_t>(snapshots_.size());
  snapshots_offset_ = new_off;
  snapshot_table_bytes_ = buf.size();
  return ok();
}

static const Qcow2Snapshot* find_snapshot(const std::vector<Qcow2Snapshot>& snaps, const std::string& key,
                                          size_t* index) {
  for (size_t i = 0; i < snaps.size(); ++i)
    if (snaps[i].id == key || snaps[i].name == key) {
      *index = i;
      return &snaps[i];
    }
  return nullptr;
}

Result<void> Qcow2Image::snapshot_create(const std::string& name) {
  if (read_only_) return fail(EROFS, path_ + ": image is open read-only");
  std::lock_guard lock(mutex_);
  size_t idx;
  if (find_snapshot(snapshots_, name, &idx)) return fail(EEXIST, fmt::format("{}: snapshot '{}' already exists", path_, name));
  TRY(flush_metadata());
  // Copy the active L1 table.
  uint64_t l1_bytes = l1_.size() * 8;
  uint64_t l1_copy = 0;
  if (l1_bytes) {
    uint64_t clusters = (l1_bytes + cluster_size_ - 1) / cluster_size_;
    uint64_t got = 0;
    l1_copy = TRY(allocate_clusters(clusters, clusters, &got));
    std::vector<uint8_t> buf(clusters * cluster_size_, 0);
    for (size_t i = 0; i < l1_.size(); ++i) store_be64(buf.data() + i * 8, l1_[i] & ~kOflagCopied);
    TRY(pwrite_meta(buf.data(), buf.size(), l1_copy, "snapshot L1 table"));
  }
  TRY(update_tree_refcounts(l1_offset_, l1_size_, +1, true));
  TRY(flush_metadata());
  Qcow2Snapshot s;
  uint64_t max_id = 0;
  for (auto& e : snapshots_) max_id = std::max<uint64_t>(max_id, std::strtoull(e.id.c_str(), nullptr, 10));
  s.id = std::to_string(max_id + 1);
  s.name = name;
  s.l1_offset = l1_copy;
  s.l1_size = l1_size_;
  auto now = std::chrono::system_clock::now().time_since_epoch();
  s.date_sec = static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(now).count());
  s.date_nsec = static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count() % 1000000000);
  s.disk_size = size_;
  s.icount = UINT64_MAX;
  auto snaps = snapshots_;
  snaps.push_back(s);
  TRY(write_snapshot_table(std::move(snaps)));
  TRY(flush_metadata());
  TRY(sync_file());
  return ok();
}

Result<void> Qcow2Image::snapshot_delete(const std::string& key) {
  if (read_only_) return fail(EROFS, path_ + ": image is open read-only");
  std::lock_guard lock(mutex_);
  size_t idx;
  const Qcow2Snapshot* found = find_snapshot(snapshots_, key, &idx);
  if (!found) return fail(ENOENT, fmt::format("{}: no snapshot '{}'", path_, key));
  Qcow2Snapshot s = *found;
  TRY(flush_metadata());
  auto snaps = snapshots_;
  snaps.erase(snaps.begin() + static_cast<long>(idx));
  TRY(write_snapshot_table(std::move(snaps)));
  TRY(update_tree_refcounts(s.l1_offset, s.l1_size, -1, true));
  if (s.l1_size) TRY(free_now(s.l1_offset, uint64_t{s.l1_size} * 8));
  TRY(flush_metadata());
  TRY(sync_file());
  return ok();
}

Result<void> Qcow2Image::snapshot_apply(const std::string& key) {
  if (read_only_) return fail(EROFS, path_ + ": image is open read-only");
  std::lock_guard lock(mutex_);
  size_t idx;
  const Qcow2Snapshot* found = find_snapshot(snapshots_, key, &idx);
  if (!found) return fail(ENOENT, fmt::format("{}: no snapshot '{}'", path_, key));
  Qcow2Snapshot s = *found;
  if (s.l1_size > l1_.size())
    return fail(ENOTSUP, fmt::format("{}: snapshot '{}' has a larger L1 table than the image", path_, key));
  TRY(flush_metadata());
  TRY(update_tree_refcounts(s.l1_offset, s.l1_size, +1, false));
  TRY(flush_refcounts());
  TRY(sync_file());
  uint32_t old_size = l1_size_;
  std::vector<uint64_t> old_l1 = l1_;
  std::vector<uint8_t> buf(uint64_t{s.l1_size} * 8);
  if (!buf.empty()) TRY(pread_meta(buf.data(), buf.size(), s.l1_offset, "snapshot L1 table"));
  std::vector<uint64_t> new_l1(l1_.size(), 0);
  for (uint32_t i = 0; i < s.l1_size; ++i) new_l1[i] = load_be64(buf.data() + i * 8) & ~kOflagCopied;
  l1_ = new_l1;
  TRY(write_l1());
  TRY(sync_file());
  // Drop the references the old active tree held.
  std::vector<uint64_t> saved = l1_;
  l1_ = old_l1;
  {
    // update_tree_refcounts reads the active table from memory when the offset matches.
    auto r = update_tree_refcounts(l1_offset_, old_size, -1, false);
    l1_ = saved;
    if (!r) return r;
  }
  TRY(update_tree_refcounts(l1_offset_, l1_size_, 0, true));
  if (s.disk_size != size_ && s.disk_size != 0) {
    size_ = s.disk_size;
    uint8_t h[8];
    store_be64(h, size_);
    TRY(pwrite_meta(h, sizeof(h), 24, "header"));
  }
  TRY(flush_metadata());
  TRY(sync_file());
  return ok();
}

}  // namespace keel::disk
