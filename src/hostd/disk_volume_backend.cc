// DiskLibraryVolumeBackend: volumes through Keel's own disk library (src/disk), in-process, the same
// code keel-img runs. keel-img's create/resize/info glue lives in keel_img.cc (not in the library),
// so the few lines of it keeld needs are repeated here.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/unique_fd.h"
#include "disk/image.h"
#include "disk/qcow2_image.h"
#include "disk/raw_image.h"
#include "hostd/storage.h"

namespace keel::hostd {

namespace {

using disk::BlockDevice;
using disk::ImageFormat;
using disk::OpenMode;
using disk::Qcow2Image;
using disk::RawImage;

constexpr uint64_t kCopyChunk = 4 << 20;  // bytes read/written per step of a full copy
constexpr uint64_t kStatusChunk = 1ULL << 30;  // block_status asked per step

bool all_zero(const uint8_t* p, size_t n) {
  if (n == 0) return true;
  return p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0;
}

Result<void> close_device(BlockDevice& dev) {
  if (auto* q = dynamic_cast<Qcow2Image*>(&dev)) return q->close();
  return dev.flush();
}

// Writes the runs of `data` that are not all zeros, in granules of a qcow2 cluster: the target is
// fresh (reads as zeros), so zeros need not be written and stay unallocated.
Result<void> write_nonzero_runs(BlockDevice& dst, uint64_t offset, std::span<const uint8_t> data,
                                const std::string& what) {
  constexpr size_t kGranule = 64 << 10;
  size_t g = 0;
  while (g < data.size()) {
    size_t glen = std::min(kGranule, data.size() - g);
    if (all_zero(data.data() + g, glen)) {
      g += glen;
      continue;
    }
    size_t run = glen;
    while (g + run < data.size()) {
      size_t next = std::min(kGranule, data.size() - g - run);
      if (all_zero(data.data() + g + run, next)) break;
      run += next;
    }
    TRY_CTX(dst.write(offset + g, data.subspan(g, run)), "write " + what);
    g += run;
  }
  return ok();
}

Result<ImageFormat> format_or_probe(const std::string& path, const std::string& format) {
  if (format.empty()) return disk::probe_format(path);
  return disk::parse_format(format);
}

Result<void> sync_path(const std::string& path) {
  auto fd = TRY(UniqueFd::open(path, O_RDONLY));
  if (::fsync(fd.get()) < 0) return fail_errno("fsync " + path);
  return ok();
}

class DiskLibraryVolumeBackend final : public VolumeBackend {
public:
  std::string name() const override { return "keel-disk"; }

  Result<void> create(const std::string& path, const std::string& format, uint64_t size) override {
    auto fmt = TRY(disk::parse_format(format));
    switch (fmt) {
      case ImageFormat::Raw: return RawImage::create(path, size);
      case ImageFormat::Qcow2: {
        disk::Qcow2CreateOptions o;  // qemu-img's defaults: compat 1.1, 64 KiB clusters, 16-bit refcounts
        o.size = size;
        return Qcow2Image::create(path, o);
      }
      case ImageFormat::Vmdk: break;
    }
    return fail_invalid("format: '{}' volumes are not created here (qcow2, raw)", format);
  }

  Result<void> create_overlay(const std::string& path, const std::string& backing,
                              const std::string& backing_format) override {
    auto fmt = TRY(disk::parse_format(backing_format));
    // The overlay is as large as what it overlays; opening the backing file also proves it readable.
    auto base = TRY_CTX(disk::open_image(backing, OpenMode::ReadOnly, fmt), "open backing file");
    disk::Qcow2CreateOptions o;
    o.size = base->size();
    o.backing_file = backing;
    o.backing_format = backing_format;
    return Qcow2Image::create(path, o);
  }

  // Copies only what holds data: ranges block_status reports as holes or zeros, and chunks that read
  // as all zeros, are left unwritten in the fresh (all-zero) destination, which so stays sparse.
  Result<void> copy(const std::string& from, const std::string& to, const std::string& format,
                    const VolumeProgress& progress) override {
    auto src = TRY_CTX(disk::open_image(from, OpenMode::ReadOnly, TRY(format_or_probe(from, format))), "open " + from);
    const uint64_t total = src->size();
    TRY(create(to, format, total));
    auto dst = TRY_CTX(disk::open_image(to, OpenMode::ReadWrite, TRY(disk::parse_format(format))), "open " + to);
    // Like qemu-img convert's output: metadata still goes out in crash-safe order, but without a
    // sync after each allocation (which made the copy ~4x slower). A copy cut short is deleted by
    // the caller; a finished one is synced once, at the end.
    if (auto* q = dynamic_cast<Qcow2Image*>(dst.get())) q->set_unsafe_cache(true);
    if (progress) progress(0, total);
    std::vector<uint8_t> buf(kCopyChunk);
    uint64_t pos = 0;
    while (pos < total) {
      auto extents = TRY(src->block_status(pos, std::min(kStatusChunk, total - pos)));
      if (extents.empty()) return fail(EIO, fmt::format("{}: no block status at offset {}", from, pos));
      for (const auto& e : extents) {
        // Bounds-check what the driver says, so a confused image cannot make the loop spin or overrun.
        if (e.offset != pos || e.length == 0 || e.length > total - pos)
          return fail(EIO, fmt::format("{}: bad block status extent {}+{} at offset {}", from, e.offset, e.length, pos));
        if (e.data && !e.zero) {
          for (uint64_t off = e.offset; off < e.offset + e.length;) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), e.offset + e.length - off));
            std::span<uint8_t> piece(buf.data(), n);
            TRY_CTX(src->read(off, piece), "read " + from);
            TRY(write_nonzero_runs(*dst, off, piece, to));
            off += n;
            if (progress && off < total) progress(off, total);
          }
        }
        pos += e.length;
        if (progress && pos < total) progress(pos, total);
      }
    }
    TRY_CTX(close_device(*dst), "close " + to);
    dst.reset();
    TRY(sync_path(to));
    if (progress) progress(total, total);  // only once the copy is on disk
    return ok();
  }

  Result<void> resize(const std::string& path, const std::string& format, uint64_t size,
                      ShrinkPolicy shrink) override {
    auto dev = TRY(disk::open_image(path, OpenMode::ReadWrite, TRY(format_or_probe(path, format))));
    if (size < dev->size() && shrink == ShrinkPolicy::Refuse)
      return fail_invalid("capacity: {} is smaller than the volume ({} bytes); shrinking loses data and must be "
                          "asked for",
                          size, dev->size());
    if (auto* q = dynamic_cast<Qcow2Image*>(dev.get())) {
      TRY(q->resize(size));
      return q->close();
    }
    if (auto* r = dynamic_cast<RawImage*>(dev.get())) return r->resize(size);
    return fail(ENOTSUP, fmt::format("{}: resizing {} volumes is not supported", path, dev->format()));
  }

  Result<VolumeInfo> info(const std::string& path, const std::string& format) override {
    auto fmt = TRY(format_or_probe(path, format));
    std::unique_ptr<BlockDevice> dev;
    if (fmt == ImageFormat::Qcow2) {
      // The backing chain is not needed to describe this layer (and may be missing).
      disk::Qcow2OpenOptions o;
      o.open_backing = false;
      dev = TRY(Qcow2Image::open(path, OpenMode::ReadOnly, o));
    } else {
      dev = TRY(disk::open_image(path, OpenMode::ReadOnly, fmt));
    }
    VolumeInfo v;
    v.format = dev->format();
    v.capacity = dev->size();
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) v.allocation = static_cast<uint64_t>(st.st_blocks) * 512;
    if (auto* q = dynamic_cast<Qcow2Image*>(dev.get())) v.backing = q->backing_file();
    return v;
  }
};

}  // namespace

std::unique_ptr<VolumeBackend> make_disk_library_backend() { return std::make_unique<DiskLibraryVolumeBackend>(); }

}  // namespace keel::hostd
