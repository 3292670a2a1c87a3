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

Result<CheckResult> Qcow2Image::check(RepairMode repair) {
  std::lock_guard lock(mutex_);
  if (!read_only_) TRY(flush_metadata());
  CheckResult res;
  uint64_t fsize = file_size();
  uint64_t nb = (fsize + cluster_size_ - 1) / cluster_size_;
  std::vector<uint32_t> refs(nb, 0);
  auto inc = [&](uint64_t off, uint64_t bytes, const char* what) {
    if (bytes == 0) return;
    uint64_t first = off >> cluster_bits_;
    uint64_t last = (off + bytes - 1) >> cluster_bits_;
    for (uint64_t c = first; c <= last; ++c) {
      if (c >= nb) {
        res.messages.push_back(fmt::format("ERROR: {} at offset {} is beyond the end of the image file", what, hex(off)));
        ++res.corruptions;
        return;
      }
      if (refs[c] < UINT32_MAX) ++refs[c];
    }
  };
  inc(0, cluster_size_, "header");
  uint64_t prev_host = 0;
  auto walk_l1 = [&](const std::vector<uint64_t>& l1, bool active) -> Result<void> {
    for (size_t i = 0; i < l1.size(); ++i) {
      uint64_t l2_off = l1[i] & kL1OffsetMask;
      if (!l2_off) continue;
      if (l2_off % cluster_size_) {
        res.messages.push_back(fmt::format("ERROR l2_offset={}: Table is not cluster aligned; L1 entry corrupted", hex(l2_off)));
        ++res.corruptions;
        continue;
      }
      if (l2_off >= fsize) {
        res.messages.push_back(fmt::format("ERROR: L2 table {} (L1 index {}) is beyond the end of the file", hex(l2_off), i));
        ++res.corruptions;
        continue;
      }
      inc(l2_off, cluster_size_, "L2 table");
      if (active) {
        uint64_t rc = TRY(get_refcount(l2_off >> cluster_bits_));
        if ((rc == 1) != ((l1[i] & kOflagCopied) != 0)) {
          res.messages.push_back(fmt::format("ERROR OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={}", i, l1[i], rc));
          ++res.corruptions;
        }
      }
      uint8_t* table = TRY(cache_get(l2_cache_, l2_off, true, true));
      // The cache may evict this table while we look up refcounts: copy it.
      std::vector<uint8_t> copy(table, table + cluster_size_);
      uint64_t entries = 1ULL << l2_bits_;
      prev_host = 0;  // contiguity counts within one L2 table
      for (uint64_t j = 0; j < entries; ++j) {
        uint64_t e = load_be64(copy.data() + j * l2_entry_size_);
        uint64_t voff = ((i << l2_bits_) + j) << cluster_bits_;
        if (e & kOflagCompressed) {
          uint64_t h, b;
          compressed_range(e & ~(kOflagCompressed | kOflagCopied), &h, &b);
          if (active && (e & kOflagCopied)) {
            res.messages.push_back(fmt::format("ERROR: compressed cluster {} has the copied flag set", hex(voff)));
            ++res.corruptions;
          }
          inc(h, b, "compressed cluster");
          if (active) {
            // As qemu counts them: compressed clusters are fragmented by nature.
            ++res.allocated_clusters;
            ++res.compressed_clusters;
            ++res.fragmented_clusters;
          }
          continue;
        }
        uint64_t host = e & kL2OffsetMask;
        if (!host) continue;
        if (host % cluster_size_) {
          res.messages.push_back(fmt::format("ERROR offset={}: Cluster is not properly aligned; L2 entry corrupted", hex(host)));
          ++res.corruptions;
          continue;
        }
        inc(host, cluster_size_, "data cluster");
        if (active) {
          ++res.allocated_clusters;
          if (prev_host && host != prev_host + cluster_size_) ++res.fragmented_clusters;
          prev_host = host;
          if (host < fsize) {
            uint64_t rc = TRY(get_refcount(host >> cluster_bits_));
            if ((rc == 1) != ((e & kOflagCopied) != 0)) {
              res.messages.push_back(fmt::format("ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={}", e, rc));
              ++res.corruptions;
            }
          }
        }
      }
    }
    return ok();
  };
  inc(l1_offset_, uint64_t{l1_size_} * 8, "L1 table");
  TRY(walk_l1(l1_, true));
  if (nb_snapshots_) {
    inc(snapshots_offset_, snapshot_table_bytes_, "snapshot table");
    for (auto& s : snapshots_) {
      inc(s.l1_offset, uint64_t{s.l1_size} * 8, "snapshot L1 table");
      std::vector<uint64_t> l1(s.l1_size);
      std::vector<uint8_t> buf(l1.size() * 8);
      if (!buf.empty()) TRY(pread_meta(buf.data(), buf.size(), s.l1_offset, "snapshot L1 table"));
      for (size_t i = 0; i < l1.size(); ++i) l1[i] = load_be64(buf.data() + i * 8);
      TRY(walk_l1(l1, false));
    }
  }
  inc(rt_offset_, uint64_t{rt_clusters_} * cluster_size_, "refcount table");
  for (size_t i = 0; i < rt_.size(); ++i) {
    uint64_t off = rt_[i] & kRtOffsetMask;
    if (!off) continue;
    if (off % cluster_size_ || off >= fsize) {
      res.messages.push_back(fmt::format("ERROR refcount block {} is not cluster aligned or beyond the end of the file", i));
      ++res.corruptions;
      continue;
    }
    inc(off, cluster_size_, "refcount block");
  }
  // Compare what the refcounts say with what we counted.
  uint64_t highest = 0;
  std::vector<std::pair<uint64_t, uint64_t>> leaks, under;
  for (uint64_t c = 0; c < nb; ++c) {
    uint64_t rc = TRY(get_refcount(c));
    if (rc > 0 || refs[c] > 0) highest = c;
    if (rc > refs[c]) {
      res.messages.push_back(fmt::format("Leaked cluster {} refcount={} reference={}", c, rc, refs[c]));
      ++res.leaks;
      leaks.push_back({c, refs[c]});
    } else if (rc < refs[c]) {
      res.messages.push_back(fmt::format("ERROR cluster {} refcount={} reference={}", c, rc, refs[c]));
      ++res.corruptions;
      under.push_back({c, refs[c]});
    }
  }
  res.image_end_offset = (highest + 1) * cluster_size_;
  res.total_clusters = (size_ + cluster_size_ - 1) / cluster_size_;

  if (repair != RepairMode::None && !read_only_) {
    for (auto& [c, want] : leaks) TRY(set_refcount(c, want));
    res.leaks_fixed = leaks.size();
    if (repair == RepairMode::All) {
      for (auto& [c, want] : under) {
        uint64_t range = c / refblock_entries_;
        if ((range >= rt_.size() || rt_[range] == 0) && refs[range * refblock_entries_] > 0) {
          res.messages.push_back(fmt::format("cannot repair cluster {}: its refcount block is missing", c));
          continue;
        }
        TRY(set_refcount(c, want));
        ++res.corruptions_fixed;
      }
    }
    TRY(flush_refcounts());
    if (repair == RepairMode::All && (incompat_ & 1) && res.corruptions_fixed == under.size()) {
      incompat_ &= ~1ULL;
      uint8_t b[8];
      store_be64(b, incompat_);
      TRY(pwrite_meta(b, 8, 72, "header"));
    }
    TRY(sync_file());
    res.leaks -= std::min(res.leaks, res.leaks_fixed);
    res.corruptions -= std::min(res.corruptions, res.corruptions_fixed);
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
