// Qcow2Image: QEMU's copy-on-write format, versions 2 and 3 (docs/interop/qcow2.rst).
//
// Reads every variant qemu-img 7.2 writes: cluster sizes 512 B..2 MiB, refcount widths 1..64 bits,
// zero clusters, compressed clusters (deflate and zstd), backing chains, extended L2 entries
// (subclusters), internal snapshots. Writes all of them.
//
// Metadata is cached (L2 tables and refcount blocks) and written back in an order that keeps the
// image consistent after a crash at any moment: refcount increments reach the file before the L2/L1
// entries that use them, and references are removed before the refcounts that counted them are
// decremented. At worst a crash leaks clusters, which `check -r leaks` gives back.
//
// Lazy refcounts (compatible feature bit 0): refcount blocks are not written ahead of the L2 tables
// that use their clusters. Instead the dirty bit (incompatible bit 0) is set before the first such
// L2 write, a clean close writes the refcount blocks back and clears it, and a read-write open of a
// dirty image first runs check(RepairMode::All), which rebuilds what a crash left behind (as QEMU).
//
// Thread safety: one mutex guards the metadata; data reads and in-place data writes run outside it.
#pragma once

#include <cstdint>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/unique_fd.h"
#include "disk/block_device.h"
#include "disk/direct_file.h"
#include "disk/hole_map.h"

namespace keel::disk {

enum class Qcow2Compression : uint8_t { Zlib = 0, Zstd = 1 };
enum class Preallocation { Off, Metadata, Falloc, Full };

struct Qcow2CreateOptions {
  uint64_t size = 0;
  uint32_t cluster_size = 65536;
  int version = 3;  // compat=0.10 -> 2, compat=1.1 -> 3
  int refcount_bits = 16;
  Qcow2Compression compression = Qcow2Compression::Zlib;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  std::string backing_file;
  std::string backing_format;
  Preallocation preallocation = Preallocation::Off;
};

struct Qcow2OpenOptions {
  bool open_backing = true;
  // Opens images whose corrupt bit is set, or that are dirty, for repair (no automatic repair of
  // a dirty image on a read-write open: the caller runs check() itself).
  bool for_repair = false;
  // O_DIRECT for this image and its backing chain (cache mode "none").
  bool direct = false;
};

struct Qcow2Snapshot {
  std::string id;
  std::string name;
  uint64_t l1_offset = 0;
  uint32_t l1_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;
  uint64_t disk_size = 0;
  uint64_t icount = UINT64_MAX;
  std::vector<uint8_t> extra;  // extra data beyond what we know, kept as is
};

struct CheckResult {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t check_errors = 0;
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t total_clusters = 0;      // virtual clusters
  uint64_t allocated_clusters = 0;  // virtual clusters with data
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  uint64_t image_end_offset = 0;
  std::vector<std::string> messages;  // one line each, as qemu-img prints them
  // Set when a repair could not go on (qemu-img: "Check failed: ..."); the counts are partial.
  std::string failure;
};

enum class RepairMode { None, Leaks, All };

class Qcow2Image final : public BlockDevice {
public:
  static Result<std::unique_ptr<Qcow2Image>> open(const std::string& path, OpenMode mode,
                                                  const Qcow2OpenOptions& options = {},
                                                  int chain_depth = 0);
  static Result<void> create(const std::string& path, const Qcow2CreateOptions& options);
  // Parses a header from raw bytes; used by open and by the fuzz target.
  static Result<void> validate_header_bytes(std::span<const uint8_t> bytes, uint64_t file_size);

  ~Qcow2Image() override;

  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  std::string format() const override { return "qcow2"; }

  Result<void> read(uint64_t offset, std::span<uint8_t> out) override;
  Result<void> write(uint64_t offset, std::span<const uint8_t> data) override;
  Result<void> flush() override;
  Result<void> discard(uint64_t offset, uint64_t length) override;
  Result<void> write_zeroes(uint64_t offset, uint64_t length) override;
  Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) override;

  // Writes one whole cluster compressed (the last cluster may be short at the end of the disk).
  // Compression runs outside the metadata lock, so several threads can compress at once.
  Result<void> write_compressed(uint64_t offset, std::span<const uint8_t> data);
  // Flushes metadata, and returns the first error; the destructor does the same but can only log.
  Result<void> close();

  // Unsafe cache (qemu-img convert's default for its output): metadata is still written in a
  // crash-safe order, but nothing is synced to stable storage, so a power loss (not a process
  // crash) can lose more than leaks. For scratch output only.
  void set_unsafe_cache(bool unsafe) { unsafe_cache_ = unsafe; }

  Result<CheckResult> check(RepairMode repair);
  // Drops every cluster of the active layer, so the backing file shows through (commit).
  Result<void> make_empty();
  Result<void> resize(uint64_t new_size);

  // Internal snapshots.
  const std::vector<Qcow2Snapshot>& snapshots() const { return snapshots_; }
  Result<void> snapshot_create(const std::string& name);
  Result<void> snapshot_delete(const std::string& name_or_id);
  Result<void> snapshot_apply(const std::string& name_or_id);

  // Rewrites the backing file name and format in the header (rebase -u, commit bookkeeping).
  Result<void> set_backing(const std::string& backing_file, const std::string& backing_format);

  const std::string& path() const { return path_; }
  int version() const { return version_; }
  uint32_t cluster_size() const { return cluster_size_; }
  int refcount_bits() const { return 1 << refcount_order_; }
  Qcow2Compression compression() const { return compression_; }
  bool lazy_refcounts() const { return compat_ & 1; }
  // What the automatic repair of a dirty image at open found and fixed (empty when there was none).
  const std::optional<CheckResult>& open_repair() const { return open_repair_; }
  bool extended_l2() const { return extended_l2_; }
  bool corrupt() const { return incompat_ & 2; }
  bool dirty() const { return incompat_ & 1; }
  const std::string& backing_file() const { return backing_file_; }
  const std::string& backing_format() const { return backing_format_; }
  // The backing file name resolved against this image's directory, as it was opened.
  std::string backing_path() const;
  BlockDevice* backing() const { return backing_.get(); }
  uint64_t file_size() const;
  // Bytes of host file actually allocated (st_blocks * 512).
  uint64_t allocated_file_bytes() const;

private:
  struct TableSlot {
    uint64_t offset = 0;  // 0: empty slot
    std::vector<uint8_t> data;
    bool dirty = false;
    uint64_t used = 0;
  };
  struct TableCache {
    std::vector<TableSlot> slots;
    std::unordered_map<uint64_t, size_t> index;
    uint64_t tick = 0;
  };
  enum class RunKind { Data, Zero, Unallocated, Compressed };
  struct Run {
    RunKind kind;
    uint64_t host = 0;  // Data: host offset of the run's first byte; Compressed: descriptor
    uint64_t length = 0;
  };

  Qcow2Image() = default;

  Result<void> load(const Qcow2OpenOptions& options, int chain_depth);
  Result<void> parse_extensions(const std::vector<uint8_t>& header_cluster, uint64_t start, uint64_t end);
  Result<void> load_snapshots();

  // Metadata caches.
  Result<uint8_t*> cache_get(TableCache& cache, uint64_t offset, bool load, bool is_l2);
  Result<void> cache_write_slot(TableSlot& slot, bool is_l2);
  Result<void> ensure_refcounts_before_l2();

  // L2 access. Returns nullptr for an unallocated table when !for_write.
  Result<uint8_t*> get_l2(uint64_t l1_index, bool for_write);
  uint64_t l2_entry(const uint8_t* table, uint64_t index) const;
  uint64_t l2_bitmap(const uint8_t* table, uint64_t index) const;
  void set_l2_entry(uint8_t* table, uint64_t index, uint64_t entry);

  // Refcounts.
  Result<uint64_t> get_refcount(uint64_t cluster);
  Result<void> set_refcount(uint64_t cluster, uint64_t value);
  Result<void> add_refcount(uint64_t cluster, int64_t delta);
  Result<uint8_t*> get_refblock(uint64_t range, bool create);
  // Allocates up to max_count free clusters in a row (at least `min_count`); returns the first.
  Result<uint64_t> allocate_clusters(uint64_t min_count, uint64_t max_count, uint64_t* got);
  Result<uint64_t> allocate_one_cluster();
  Result<void> free_later(uint64_t host_offset, uint64_t bytes);
  Result<void> free_now(uint64_t host_offset, uint64_t bytes);
  Result<void> flush_refcounts();
  Result<void> relocate_refcount_table();
  // Writes rt_ as the refcount table at `offset` (synced), then points the header at it (synced).
  Result<void> install_refcount_table(uint64_t offset, uint64_t clusters);
  // Lazy refcounts: sets the dirty bit on disk (synced) before metadata that relies on it.
  Result<void> mark_dirty();
  // Clears the dirty and corrupt bits once the refcounts on disk are whole again.
  Result<void> mark_clean();
  Result<void> flush_metadata();
  Result<void> sync_file();

  // Data path.
  Result<Run> resolve(uint64_t offset, uint64_t max_length);
  Result<void> read_run(const Run& run, uint64_t offset, std::span<uint8_t> out);
  Result<void> read_compressed(uint64_t descriptor, uint8_t* cluster_out);
  void compressed_range(uint64_t descriptor, uint64_t* host, uint64_t* bytes) const;
  Result<void> read_backing(uint64_t offset, std::span<uint8_t> out);
  // Reads what a cluster of this image reads as now (for copy-on-write), under the lock.
  Result<void> read_cluster_locked(uint64_t cluster_voffset, uint8_t* out);
  Result<void> write_locked(uint64_t offset, std::span<const uint8_t> data);
  Result<void> place_compressed(uint64_t offset, const uint8_t* out, size_t out_len);
  Result<void> set_zero_locked(uint64_t offset, uint64_t length, bool unallocate);

  // Extended L2 entries (qcow2_subclusters.cc).
  enum class UnmapTo { Backing, Zero };
  void set_l2_bitmap(uint8_t* table, uint64_t index, uint64_t bitmap);
  void mark_l2_dirty(uint64_t l1_index);
  Result<void> free_l2_target(uint64_t entry);
  Result<void> read_range_locked(uint64_t voffset, std::span<uint8_t> out);
  Result<void> write_with_cow(uint64_t cluster_voffset, uint64_t host, uint64_t from, uint64_t to,
                              uint64_t in_cluster, std::span<const uint8_t> data);
  Result<void> write_subclusters_locked(uint64_t offset, std::span<const uint8_t> data);
  Result<void> zero_subclusters_locked(uint64_t a, uint64_t b);
  Result<void> unmap_subclusters_locked(uint64_t a, uint64_t b, UnmapTo target);
  Result<bool> recorded_as_zero(uint64_t offset, uint64_t length);
  Result<void> zero_partial_subcluster(uint64_t from, uint64_t to);
  Result<void> write_zeroes_subclusters(uint64_t offset, uint64_t length);
  Result<void> check_range(uint64_t offset, uint64_t length, const char* op) const;
  Result<void> check_host_offset(uint64_t host, uint64_t voffset) const;
  Result<void> pread_meta(void* buf, size_t len, uint64_t offset, const char* what);
  Result<void> pwrite_meta(const void* buf, size_t len, uint64_t offset, const char* what);
  Result<void> file_read(void* buf, size_t len, uint64_t offset);
  Result<void> file_write(const void* buf, size_t len, uint64_t offset);
  Result<void> write_header();
  Result<void> write_l1();
  Result<void> write_snapshot_table(std::vector<Qcow2Snapshot> snapshots);
  // check() helpers (qcow2_maintenance.cc): the in-memory refcount table ("imrt") rebuilt from
  // the metadata, the refcounts stored on disk read the way qemu-img reads them, and a rebuild of
  // the whole refcount structure from the imrt.
  struct CheckState;
  Result<void> check_count_references(CheckState& st, CheckResult& res);
  Result<void> check_compare(CheckState& st, CheckResult& res, RepairMode fix);
  Result<void> check_copied_flags(CheckResult& res, RepairMode fix);
  Result<uint64_t> stored_refcount(uint64_t cluster, uint64_t file_size);
  Result<void> rebuild_refcount_structure(CheckState& st);
  Result<void> update_tree_refcounts(uint64_t l1_offset, uint32_t l1_size, int64_t delta,
                                     bool fix_copied_active);
  Result<void> preallocate(Preallocation mode);

  std::string path_;
  UniqueFd fd_;
  std::unique_ptr<DirectFile> direct_;  // set when opened with O_DIRECT
  bool read_only_ = true;
  mutable std::mutex mutex_;

  int version_ = 3;
  uint32_t cluster_bits_ = 16;
  uint32_t cluster_size_ = 65536;
  uint64_t size_ = 0;
  uint32_t l1_size_ = 0;
  uint64_t l1_offset_ = 0;
  uint64_t rt_offset_ = 0;
  uint32_t rt_clusters_ = 0;
  uint32_t nb_snapshots_ = 0;
  uint64_t snapshots_offset_ = 0;
  uint64_t snapshot_table_bytes_ = 0;
  uint64_t incompat_ = 0;
  uint64_t compat_ = 0;
  uint64_t autoclear_ = 0;
  uint32_t refcount_order_ = 4;
  uint32_t header_length_ = 72;
  Qcow2Compression compression_ = Qcow2Compression::Zlib;
  bool extended_l2_ = false;
  uint32_t l2_entry_size_ = 8;
  uint32_t l2_bits_ = 13;        // log2(entries per L2 table)
  uint32_t subcluster_bits_ = 16;
  uint32_t csize_shift_ = 0;     // compressed descriptor: where the sector count starts
  uint64_t csize_mask_ = 0;
  uint64_t coffset_mask_ = 0;
  uint64_t refblock_entries_ = 0;
  std::string backing_file_;
  std::string backing_format_;
  std::vector<std::pair<int, std::pair<int, std::string>>> feature_names_;  // type, bit, name
  std::vector<std::pair<uint32_t, std::vector<uint8_t>>> unknown_extensions_;

  std::vector<uint64_t> l1_;
  bool l1_dirty_ = false;
  std::vector<uint64_t> rt_;       // in memory; may grow past the on-disk table's capacity
  bool rt_dirty_ = false;
  TableCache l2_cache_;
  TableCache rb_cache_;
  std::vector<std::pair<uint64_t, uint64_t>> pending_frees_;
  uint64_t free_hint_ = 0;
  uint64_t compressed_next_ = 0;  // next free byte in the current compressed-data cluster
  uint64_t compressed_end_ = 0;
  // Data writes reserved under the lock but issued after it (so threads do not queue behind each
  // other's I/O). No L2 table is written while any is in flight: an entry never reaches the file
  // before the data it points to.
  struct DeferredWrite {
    uint64_t host;
    const uint8_t* data;
    size_t length;
  };
  void defer_write(uint64_t host, const uint8_t* data, size_t length, uint64_t voffset);
  bool overlaps_inflight(uint64_t offset, uint64_t length) const;
  void wait_for_range(std::unique_lock<std::mutex>& meta_lock, uint64_t offset, uint64_t length);
  std::vector<std::pair<uint64_t, uint64_t>> inflight_ranges_;  // virtual ranges, under inflight_mutex_
  Result<void> run_deferred_writes();
  void wait_for_deferred_writes();
  Result<void> pwrite_data(const uint8_t* data, size_t length, uint64_t host);
  HoleMap holes_;
  std::atomic<int> inflight_{0};
  std::mutex inflight_mutex_;
  std::condition_variable inflight_cv_;
  bool closed_ = false;
  bool unsafe_cache_ = false;
  bool lazy_ = false;  // lazy refcounts in effect (v3, the compatible bit, opened read-write)
  bool we_set_dirty_ = false;  // this session set the dirty bit: a clean close clears it
  std::optional<CheckResult> open_repair_;

  std::vector<Qcow2Snapshot> snapshots_;
  std::unique_ptr<BlockDevice> backing_;
  std::string backing_resolved_;
};

}  // namespace keel::disk
