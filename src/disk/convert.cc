#include "disk/convert.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include <sys/mman.h>

#include "base/mapping.h"
#include "disk/qcow2_image.h"

namespace keel::disk {

bool is_zero(const uint8_t* p, size_t n) {
  if (n == 0) return true;
  // Byte by byte for the head (most data granules stop here), then the overlapping-memcmp trick.
  for (size_t i = 0; i < std::min<size_t>(n, 16); ++i)
    if (p[i]) return false;
  return std::memcmp(p, p + 1, n - 1) == 0;
}

namespace {

// One operation on the target, prepared by a reader for the writer.
struct TargetOp {
  uint64_t offset;
  uint64_t length;
  uint64_t at;   // where its bytes are in the chunk's buffer
  bool zeroes;   // write_zeroes rather than write
};

// A chunk on its way to the writer. Entry i carries chunks i, i + E, i + 2E, ... in turn.
struct Entry {
  std::vector<TargetOp> ops;
  uint64_t chunk = 0;         // the chunk it holds, or the one it takes next
  uint64_t buffer = UINT64_MAX;  // the data buffer (its sequence number) the ops read from
  bool ready = false;         // filled: the writer may take it
};

uint64_t round_up(uint64_t value, uint64_t unit) { return (value + unit - 1) / unit * unit; }

}  // namespace

Result<void> copy_image(BlockDevice& src, BlockDevice& dst, const CopyOptions& options) {
  const uint64_t size = src.size();
  if (dst.size() < size)
    return fail_invalid("the target ({} bytes) is smaller than the source ({} bytes)", dst.size(), size);
  auto* qdst = dynamic_cast<Qcow2Image*>(&dst);
  if (options.compress && !qdst) return fail_invalid("compression needs the qcow2 output format");
  BlockDevice* backing = options.target_backing;
  // Compressed writes take whole clusters: then the granule is the cluster.
  const uint64_t granule = options.compress ? uint64_t{qdst->cluster_size()} : std::max<uint64_t>(options.granule, 1);
  // Chunks hold whole granules, so no granule (and no range read for one) crosses a chunk's end.
  const uint64_t chunk = round_up(std::max<uint64_t>(options.chunk_size, granule), granule);
  const uint64_t chunks = (size + chunk - 1) / chunk;
  if (chunks == 0) return ok();

  unsigned readers = options.readers ? options.readers : std::clamp(std::thread::hardware_concurrency(), 1u, 16u);
  readers = static_cast<unsigned>(std::min<uint64_t>(readers, chunks));
  // Data buffers: a chunk with something to read takes the next one in turn (chunks with data
  // number them in disk order), and gives it back once written. Chunks without data (holes, zero
  // ranges) need none, so the readers run ahead through them up to `nentries` chunks, and the
  // writer finds the next data chunk already read when it gets there.
  // Compressing without a backing file, the readers write everything themselves, each from a
  // buffer of its own: no writer thread, and no order to keep.
  const bool readers_write = options.compress && !backing;
  const uint64_t nbuffers = std::max<uint64_t>(options.queue_chunks ? options.queue_chunks : readers + 1,
                                               readers_write ? readers : 1);
  const uint64_t nentries = std::max<uint64_t>(64, nbuffers);
  // One mapping, backed by huge pages where the kernel has them: fresh 4 KiB pages would cost a
  // fault and a zeroed page each on the way to the first writes.
  Mapping buffers = TRY(Mapping::anonymous(nbuffers * chunk));
  ::madvise(buffers.data(), buffers.size(), MADV_HUGEPAGE);
  std::vector<Entry> entries(nentries);
  for (uint64_t i = 0; i < nentries; ++i) entries[i].chunk = i;
  std::vector<uint64_t> buffer_turn(nbuffers);  // the sequence number that may take buffer i next
  for (uint64_t i = 0; i < nbuffers; ++i) buffer_turn[i] = i;
  auto buffer_bytes = [&](uint64_t seq) { return buffers.data() + (seq % nbuffers) * chunk; };

  std::mutex mu;  // entries, buffer_turn, failure
  std::condition_variable reader_cv, writer_cv;
  std::atomic<bool> failed{false};  // set under mu; read without it to stop claiming
  std::optional<Error> first_error;
  std::mutex claim_mu;  // chunks are claimed, and their data buffers numbered, in disk order
  uint64_t next_chunk = 0, next_buffer = 0;
  auto fail_with = [&](const Error& e) {
    {
      std::lock_guard lk(mu);
      if (!first_error) first_error = e;
      failed = true;
    }
    reader_cv.notify_all();
    writer_cv.notify_all();
  };

  struct Claim {
    uint64_t chunk;
    uint64_t buffer;  // UINT64_MAX: nothing to read
    std::vector<Extent> extents;
  };
  // Ranges to read: data extents widened to whole granules, merged.
  auto data_ranges = [&](const std::vector<Extent>& extents, uint64_t pos, uint64_t n,
                         std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
    ranges.clear();
    for (const Extent& e : extents) {
      if (!e.data || e.zero) continue;
      uint64_t a = e.offset / granule * granule;
      uint64_t b = std::min(round_up(e.offset + e.length, granule), pos + n);
      if (!ranges.empty() && ranges.back().second >= a) ranges.back().second = std::max(ranges.back().second, b);
      else ranges.push_back({a, b});
    }
  };

  // Fills an entry with its chunk: what to write where, and the bytes to write.
  auto fill = [&](const Claim& claim, Entry& entry, uint8_t* buffer, std::vector<uint8_t>& backing_buf,
                  const std::vector<std::pair<uint64_t, uint64_t>>& ranges) -> Result<void> {
    const uint64_t pos = claim.chunk * chunk;
    entry.ops.clear();
    entry.buffer = claim.buffer;
    // Ranges reading as zeros need nothing on a fresh target, unless a backing file would show
    // through.
    if (backing)
      for (const Extent& e : claim.extents)
        if (!e.data || e.zero) entry.ops.push_back({e.offset, e.length, 0, true});
    for (auto [start, stop] : ranges) {
      const uint64_t len = stop - start;
      const uint64_t at = start - pos;
      uint8_t* data = buffer + at;
      TRY(src.read(start, std::span<uint8_t>(data, len)));
      const uint8_t* old = nullptr;
      if (backing) {
        uint64_t have = backing->size() > start ? std::min(len, backing->size() - start) : 0;
        if (have) TRY(backing->read(start, std::span<uint8_t>(backing_buf.data(), have)));
        std::memset(backing_buf.data() + have, 0, len - have);
        old = backing_buf.data();
      }
      // Granules that hold data (or differ from the new backing file) are written.
      auto needed = [&](uint64_t g, uint64_t l) {
        return old ? std::memcmp(data + g, old + g, l) != 0 : !is_zero(data + g, l);
      };
      uint64_t g = 0;
      while (g < len) {
        uint64_t glen = std::min(granule, len - g);
        if (!needed(g, glen)) {
          g += glen;
          continue;
        }
        uint64_t run = glen;
        while (g + run < len && needed(g + run, std::min(granule, len - g - run)))
          run += std::min(granule, len - g - run);
        if (options.compress) {
          // Compression is most of the work: every reader compresses and places its own clusters.
          for (uint64_t c = 0; c < run; c += granule) {
            uint64_t cl = std::min(granule, run - c);
            TRY(qdst->write_compressed(start + g + c, std::span<const uint8_t>(data + g + c, cl)));
          }
        } else {
          entry.ops.push_back({start + g, run, at + g, false});
        }
        g += run;
      }
    }
    return ok();
  };

  uint64_t bytes_done = 0;  // readers_write: progress, under mu

  auto reader = [&](unsigned id) {
    std::vector<uint8_t> backing_buf(backing ? chunk : 0);
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    Claim claim;
    while (true) {
      {
        std::lock_guard lk(claim_mu);
        if (next_chunk >= chunks || failed) return;
        claim.chunk = next_chunk++;
        const uint64_t pos = claim.chunk * chunk;
        auto extents = src.block_status(pos, std::min(chunk, size - pos));
        if (!extents) return fail_with(extents.error());
        claim.extents = std::move(*extents);
        data_ranges(claim.extents, pos, std::min(chunk, size - pos), ranges);
        claim.buffer = ranges.empty() || readers_write ? UINT64_MAX : next_buffer++;
      }
      Entry& entry = entries[claim.chunk % nentries];
      {
        std::unique_lock lk(mu);
        reader_cv.wait(lk, [&] {
          return failed || ((readers_write || (entry.chunk == claim.chunk && !entry.ready)) &&
                            (claim.buffer == UINT64_MAX || buffer_turn[claim.buffer % nbuffers] == claim.buffer));
        });
        if (failed) return;
      }
      if (readers_write) {
        // A buffer of its own: no reader waits for another's slow chunk.
        Entry own;
        if (auto r = fill(claim, own, buffer_bytes(id), backing_buf, ranges); !r) return fail_with(r.error());
        std::lock_guard lk(mu);
        bytes_done += std::min(chunk, size - claim.chunk * chunk);
        if (options.progress) options.progress(bytes_done);
        continue;
      }
      uint8_t* buffer = claim.buffer == UINT64_MAX ? nullptr : buffer_bytes(claim.buffer);
      if (auto r = fill(claim, entry, buffer, backing_buf, ranges); !r) return fail_with(r.error());
      // Nothing for the writer to take from the buffer (compressed here, or all zeros): it is free
      // now, so the readers do not wait for the writer to come by (under load, it may not soon).
      bool buffer_unused = entry.buffer != UINT64_MAX &&
                           std::none_of(entry.ops.begin(), entry.ops.end(), [](const TargetOp& op) { return !op.zeroes; });
      {
        std::lock_guard lk(mu);
        if (buffer_unused) {
          buffer_turn[entry.buffer % nbuffers] = entry.buffer + nbuffers;
          entry.buffer = UINT64_MAX;
        }
        entry.ready = true;
      }
      if (buffer_unused) reader_cv.notify_all();
      writer_cv.notify_one();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(readers);
  for (unsigned i = readers_write ? 1 : 0; i < readers; ++i) threads.emplace_back(reader, i);
  if (readers_write) {
    reader(0);
    for (auto& t : threads) t.join();
    if (first_error) return fail(*first_error);
    return ok();
  }

  // The writer: this thread, chunk after chunk in order. Writes to one file do not run in parallel
  // anyway (the kernel's inode lock), so one thread that never waits while work is ready keeps the
  // target busy, and the target's allocations come out in order, as qemu-img's do.
  for (uint64_t k = 0; k < chunks; ++k) {
    Entry& entry = entries[k % nentries];
    {
      std::unique_lock lk(mu);
      writer_cv.wait(lk, [&] { return failed || (entry.ready && entry.chunk == k); });
      if (failed) break;
    }
    uint8_t* buffer = entry.buffer == UINT64_MAX ? nullptr : buffer_bytes(entry.buffer);
    Result<void> r = ok();
    for (const TargetOp& op : entry.ops) {
      r = op.zeroes ? dst.write_zeroes(op.offset, op.length)
                    : dst.write(op.offset, std::span<const uint8_t>(buffer + op.at, op.length));
      if (!r) break;
    }
    if (!r) {
      fail_with(r.error());
      break;
    }
    if (options.progress) options.progress(std::min(size, (k + 1) * chunk));
    {
      std::lock_guard lk(mu);
      entry.ready = false;
      entry.chunk = k + nentries;
      if (entry.buffer != UINT64_MAX) buffer_turn[entry.buffer % nbuffers] = entry.buffer + nbuffers;
    }
    reader_cv.notify_all();
  }
  for (auto& t : threads) t.join();
  if (first_error) return fail(*first_error);
  return ok();
}

}  // namespace keel::disk
