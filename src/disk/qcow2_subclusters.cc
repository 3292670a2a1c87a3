// Qcow2Image: writes to images with extended L2 entries (subclusters).
//
// With extended L2 entries every cluster has 32 subclusters, each with an allocation bit (bits 0-31
// of the entry's second word) and a reads-as-zero bit (bits 32-63). A write allocates the cluster
// but marks only the subclusters it touches; copy-on-write covers only the uncovered parts of partly
// written subclusters, so the others keep reading from the backing file (or as zeros). Write-zeroes
// sets zero bits at subcluster granularity. Which subclusters end up allocated or zero follows
// qemu 7.2's rules (block/qcow2-cluster.c: calculate_l2_meta, qcow2_alloc_cluster_link_l2,
// zero_l2_subclusters, zero_in_l2_slice, discard_in_l2_slice), so `qemu-img map` of the same writes
// done by either tool agrees.
#include <algorithm>
#include <cstring>
#include <vector>

#include "disk/endian.h"
#include "disk/qcow2_image.h"
#include "disk/qcow2_layout.h"

namespace keel::disk {

namespace {

using namespace qcow2;

constexpr uint64_t kAllAllocated = 0xffffffffULL;
constexpr uint64_t kAllZero = kAllAllocated << 32;

// Allocation bits of subclusters [first, end), 0 <= first <= end <= 32.
uint64_t allocated_bits(uint64_t first, uint64_t end) {
  return ((1ULL << end) - 1) & ~((1ULL << first) - 1);
}
uint64_t zero_bits(uint64_t first, uint64_t end) { return allocated_bits(first, end) << 32; }

// Per-thread buffers for copy-on-write pieces and inflated compressed clusters.
thread_local std::vector<uint8_t> t_cow;
thread_local std::vector<uint8_t> t_inflated;

uint8_t* sized(std::vector<uint8_t>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace

void Qcow2Image::set_l2_bitmap(uint8_t* table, uint64_t index, uint64_t bitmap) {
  store_be64(table + index * l2_entry_size_ + 8, bitmap);
}

void Qcow2Image::mark_l2_dirty(uint64_t l1_index) {
  l2_cache_.slots[l2_cache_.index[l1_[l1_index] & kL1OffsetMask]].dirty = true;
}

Result<void> Qcow2Image::free_l2_target(uint64_t entry) {
  if (entry & kOflagCompressed) {
    uint64_t host, bytes;
    compressed_range(entry & ~(kOflagCompressed | kOflagCopied), &host, &bytes);
    return free_later(host, bytes);
  }
  if (entry & kL2OffsetMask) return free_later(entry & kL2OffsetMask, cluster_size_);
  return ok();
}

Result<void> Qcow2Image::read_range_locked(uint64_t voffset, std::span<uint8_t> out) {
  uint64_t len = voffset >= size_ ? 0 : std::min<uint64_t>(out.size(), size_ - voffset);
  uint64_t done = 0;
  while (done < len) {
    Run run = TRY(resolve(voffset + done, len - done));
    if (run.kind == RunKind::Compressed) {
      // Not through the per-thread cache of the last inflated cluster: this one is about to change.
      uint8_t* cluster = sized(t_inflated, cluster_size_);
      TRY(read_compressed(run.host, cluster));
      std::memcpy(out.data() + done, cluster + ((voffset + done) & (cluster_size_ - 1)), run.length);
    } else {
      TRY(read_run(run, voffset + done, out.subspan(done, run.length)));
    }
    done += run.length;
  }
  if (len < out.size()) std::memset(out.data() + len, 0, out.size() - len);
  return ok();
}

// Writes `data` at `in_cluster` of the host cluster at `host`, widened to [from, to) with what the
// cluster at `cluster_voffset` reads as now (the copy-on-write of partly written subclusters).
Result<void> Qcow2Image::write_with_cow(uint64_t cluster_voffset, uint64_t host, uint64_t from, uint64_t to,
                                        uint64_t in_cluster, std::span<const uint8_t> data) {
  uint64_t data_end = in_cluster + data.size();
  if (from == in_cluster && to == data_end) return pwrite_data(data.data(), data.size(), host + in_cluster);
  uint8_t* buf = sized(t_cow, to - from);
  if (from < in_cluster) TRY(read_range_locked(cluster_voffset + from, std::span<uint8_t>(buf, in_cluster - from)));
  std::memcpy(buf + (in_cluster - from), data.data(), data.size());
  if (data_end < to)
    TRY(read_range_locked(cluster_voffset + data_end, std::span<uint8_t>(buf + (data_end - from), to - data_end)));
  return pwrite_data(buf, to - from, host + from);
}

Result<void> Qcow2Image::write_subclusters_locked(uint64_t offset, std::span<const uint8_t> data) {
  uint64_t l1_index = offset >> (cluster_bits_ + l2_bits_);
  uint64_t entries = 1ULL << l2_bits_;
  uint8_t* table = TRY(get_l2(l1_index, true));
  uint64_t done = 0;
  while (done < data.size()) {
    uint64_t pos = offset + done;
    uint64_t l2_index = (pos >> cluster_bits_) & (entries - 1);
    uint64_t in_cluster = pos & (cluster_size_ - 1);
    uint64_t cluster_voffset = pos - in_cluster;
    uint64_t chunk = std::min<uint64_t>(cluster_size_ - in_cluster, data.size() - done);
    auto piece = data.subspan(done, chunk);
    uint64_t e = l2_entry(table, l2_index);
    uint64_t bitmap = l2_bitmap(table, l2_index);
    uint64_t hoff = e & kL2OffsetMask;
    bool compressed = e & kOflagCompressed;
    uint64_t first_sc = in_cluster >> subcluster_bits_;
    uint64_t end_sc = ((in_cluster + chunk - 1) >> subcluster_bits_) + 1;

    if ((e & kOflagCopied) && hoff && !compressed) {
      // Our own cluster: written in place. The parts of partly written subclusters that were not
      // allocated get what they read as now.
      TRY(check_host_offset(hoff, pos));
      uint64_t from = in_cluster, to = in_cluster + chunk;
      if (!(bitmap & (1ULL << first_sc))) from = first_sc << subcluster_bits_;
      if (!(bitmap & (1ULL << (end_sc - 1)))) to = end_sc << subcluster_bits_;
      TRY(write_with_cow(cluster_voffset, hoff, from, to, in_cluster, piece));
      uint64_t updated = (bitmap | allocated_bits(first_sc, end_sc)) & ~zero_bits(first_sc, end_sc);
      if (updated != bitmap) {
        set_l2_bitmap(table, l2_index, updated);
        mark_l2_dirty(l1_index);
      }
      done += chunk;
      continue;
    }

    if (in_cluster == 0 && data.size() - done >= cluster_size_) {
      // Whole clusters: one contiguous allocation, one write, every subcluster allocated.
      uint64_t whole = 0;
      while (l2_index + whole < entries && (whole + 1) * cluster_size_ <= data.size() - done) {
        uint64_t ee = l2_entry(table, l2_index + whole);
        if ((ee & kOflagCopied) && (ee & kL2OffsetMask) && !(ee & kOflagCompressed)) break;
        ++whole;
      }
      uint64_t got = 0;
      uint64_t host = TRY(allocate_clusters(1, whole, &got));
      table = TRY(get_l2(l1_index, true));  // the allocation may have evicted it
      defer_write(host, data.data() + done, got * cluster_size_, pos);
      for (uint64_t i = 0; i < got; ++i) {
        TRY(free_l2_target(l2_entry(table, l2_index + i)));
        set_l2_entry(table, l2_index + i, (host + i * cluster_size_) | kOflagCopied);
        set_l2_bitmap(table, l2_index + i, kAllAllocated);
      }
      mark_l2_dirty(l1_index);
      done += got * cluster_size_;
      continue;
    }

    // A new cluster for part of it. Copy-on-write covers the partly written subclusters; for a
    // shared cluster, also every allocated subcluster (they all move to the new cluster); for a
    // compressed one, the whole cluster.
    uint64_t from = first_sc << subcluster_bits_;
    uint64_t to = end_sc << subcluster_bits_;
    uint64_t kept = bitmap;
    if (compressed) {
      from = 0;
      to = cluster_size_;
      kept = 0;
    } else if (hoff && (bitmap & kAllAllocated)) {
      uint32_t alloc = static_cast<uint32_t>(bitmap & kAllAllocated);
      from = std::min<uint64_t>(from, uint64_t(__builtin_ctz(alloc)) << subcluster_bits_);
      to = std::max<uint64_t>(to, uint64_t(32 - __builtin_clz(alloc)) << subcluster_bits_);
    }
    uint64_t host = TRY(allocate_one_cluster());
    TRY(write_with_cow(cluster_voffset, host, from, to, in_cluster, piece));
    table = TRY(get_l2(l1_index, true));
    TRY(free_l2_target(l2_entry(table, l2_index)));
    uint64_t sc_from = from >> subcluster_bits_, sc_to = to >> subcluster_bits_;
    set_l2_entry(table, l2_index, host | kOflagCopied);
    set_l2_bitmap(table, l2_index, (kept | allocated_bits(sc_from, sc_to)) & ~zero_bits(sc_from, sc_to));
    mark_l2_dirty(l1_index);
    done += chunk;
  }
  return ok();
}

// [a, b) is subcluster aligned (b may be the end of the disk).
Result<void> Qcow2Image::zero_subclusters_locked(uint64_t a, uint64_t b) {
  uint64_t pos = a;
  uint64_t subcluster = uint64_t{1} << subcluster_bits_;
  while (pos < b) {
    uint64_t l1_index = pos >> (cluster_bits_ + l2_bits_);
    uint64_t l2_index = (pos >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
    uint64_t in_cluster = pos & (cluster_size_ - 1);
    uint64_t cluster_end = pos - in_cluster + cluster_size_;
    uint64_t piece_end = std::min(b, cluster_end);
    uint8_t* table = TRY(get_l2(l1_index, false));
    uint64_t e = table ? l2_entry(table, l2_index) : 0;
    uint64_t bitmap = table ? l2_bitmap(table, l2_index) : 0;
    bool compressed = e & kOflagCompressed;
    bool whole = in_cluster == 0 && (piece_end == cluster_end || piece_end == size_);
    uint64_t new_entry = e, new_bitmap;
    if (whole) {
      // The cluster keeps its place (qemu without MAY_UNMAP), unless it is compressed.
      if (compressed) new_entry = 0;
      new_bitmap = kAllZero;
    } else if (compressed) {
      // Subclusters of a compressed cluster cannot be zeroed alone: write zeros (which copies it).
      std::vector<uint8_t> zeros(piece_end - pos, 0);
      TRY(write_subclusters_locked(pos, zeros));
      pos = piece_end;
      continue;
    } else {
      uint64_t first_sc = in_cluster >> subcluster_bits_;
      uint64_t end_sc = (piece_end - (pos - in_cluster) + subcluster - 1) >> subcluster_bits_;
      new_bitmap = (bitmap | zero_bits(first_sc, end_sc)) & ~allocated_bits(first_sc, end_sc);
    }
    if (new_entry != e || new_bitmap != bitmap) {
      table = TRY(get_l2(l1_index, true));
      if (new_entry != e) TRY(free_l2_target(e));
      set_l2_entry(table, l2_index, new_entry);
      set_l2_bitmap(table, l2_index, new_bitmap);
      mark_l2_dirty(l1_index);
    }
    pos = piece_end;
  }
  return ok();
}

// [a, b) is cluster aligned (b may be the end of the disk). kToBacking drops the clusters so the
// backing file shows through (commit's make_empty); kToZero makes them read as zeros, as a discard
// does in qemu.
Result<void> Qcow2Image::unmap_subclusters_locked(uint64_t a, uint64_t b, UnmapTo target) {
  for (uint64_t pos = a; pos < b; pos += cluster_size_) {
    uint64_t l1_index = pos >> (cluster_bits_ + l2_bits_);
    uint64_t l2_index = (pos >> cluster_bits_) & ((1ULL << l2_bits_) - 1);
    uint8_t* table = TRY(get_l2(l1_index, false));
    uint64_t e = table ? l2_entry(table, l2_index) : 0;
    uint64_t bitmap = table ? l2_bitmap(table, l2_index) : 0;
    bool allocated = (e & kOflagCompressed) || (e & kL2OffsetMask);
    uint64_t new_bitmap = 0;
    if (target == UnmapTo::Zero) {
      // Unallocated clusters without a backing file read as zeros already.
      if (!backing_ && !allocated) continue;
      new_bitmap = kAllZero;
    }
    if (e == 0 && bitmap == new_bitmap) continue;
    table = TRY(get_l2(l1_index, true));
    TRY(free_l2_target(e));
    set_l2_entry(table, l2_index, 0);
    set_l2_bitmap(table, l2_index, new_bitmap);
    mark_l2_dirty(l1_index);
  }
  return ok();
}

// Whether [offset, offset+length) reads as zeros by what this image and its chain record (not by
// looking at data), as qemu's is_zero() asks before it turns a partly zeroed subcluster into a
// zero subcluster.
Result<bool> Qcow2Image::recorded_as_zero(uint64_t offset, uint64_t length) {
  if (length == 0) return true;
  auto extents = TRY(block_status(offset, length));
  for (auto& x : extents)
    if (!x.zero || x.data) return false;
  return true;
}

Result<void> Qcow2Image::zero_partial_subcluster(uint64_t from, uint64_t to) {
  uint64_t subcluster = uint64_t{1} << subcluster_bits_;
  uint64_t sc_start = from & ~(subcluster - 1);
  uint64_t sc_end = std::min(sc_start + subcluster, size_);
  // As qemu: if the rest of the subcluster reads as zeros already and the subcluster holds no data
  // of its own, it becomes a zero subcluster; otherwise zeros are written.
  bool rest_zero = TRY(recorded_as_zero(sc_start, from - sc_start));
  if (rest_zero && to < sc_end) rest_zero = TRY(recorded_as_zero(to, sc_end - to));
  if (rest_zero) {
    std::lock_guard lock(mutex_);
    Run run = TRY(resolve(sc_start, sc_end - sc_start));
    if (run.kind == RunKind::Zero || run.kind == RunKind::Unallocated)
      return zero_subclusters_locked(sc_start, sc_end);
  }
  std::vector<uint8_t> zeros(to - from, 0);
  return write(from, zeros);
}

Result<void> Qcow2Image::write_zeroes_subclusters(uint64_t offset, uint64_t length) {
  uint64_t subcluster = uint64_t{1} << subcluster_bits_;
  uint64_t end = offset + length;
  uint64_t a = (offset + subcluster - 1) & ~(subcluster - 1);
  uint64_t b = end == size_ ? end : end & ~(subcluster - 1);
  if (a > b) return zero_partial_subcluster(offset, end);  // inside one subcluster
  if (offset < a) TRY(zero_partial_subcluster(offset, a));
  if (a < b) {
    std::lock_guard lock(mutex_);
    TRY(zero_subclusters_locked(a, b));
  }
  if (b < end) TRY(zero_partial_subcluster(b, end));
  return ok();
}

}  // namespace keel::disk
