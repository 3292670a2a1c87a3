// Storage pools (directories) and their volumes. Image operations go through VolumeBackend:
// DiskLibraryVolumeBackend (Keel's own src/disk, keeld's default) or QemuImgBackend (qemu-img, kept
// selectable with `keeld --volume-backend qemu-img` for comparison).
//
// Upload and download move a volume's *file* bytes as they are (a qcow2 volume downloads as its
// qcow2 file, and an uploaded qcow2 file becomes a qcow2 volume), whatever the backend: they are
// not guest-visible contents.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "hostd/state_store.h"

namespace keel::hostd {

struct VolumeInfo {
  std::string format;     // "qcow2", "raw", ...
  uint64_t capacity = 0;  // virtual size
  uint64_t allocation = 0;
  std::string backing;    // backing file, if any
};

enum class ShrinkPolicy { Refuse, Allow };

// Called now and then during long operations: bytes of the virtual disk done out of total.
using VolumeProgress = std::function<void(uint64_t done, uint64_t total)>;

class VolumeBackend {
public:
  virtual std::string name() const = 0;
  virtual ~VolumeBackend() = default;
  virtual Result<void> create(const std::string& path, const std::string& format, uint64_t size) = 0;
  // A qcow2 overlay whose reads fall through to `backing` until written.
  virtual Result<void> create_overlay(const std::string& path, const std::string& backing,
                                      const std::string& backing_format) = 0;
  // `format` below is the volume's recorded format: the file is opened as that, never probed, so a
  // raw volume whose guest wrote a qcow2 header into it stays raw (probing would let a guest point
  // keeld at host files as "backing files"). An empty format probes (for files keeld did not make).
  // A full, independent copy (backing chains flattened) of `from`, in `from`'s own format.
  virtual Result<void> copy(const std::string& from, const std::string& to, const std::string& format,
                            const VolumeProgress& progress) = 0;
  virtual Result<void> resize(const std::string& path, const std::string& format, uint64_t size,
                              ShrinkPolicy shrink) = 0;
  virtual Result<VolumeInfo> info(const std::string& path, const std::string& format) = 0;
};

std::unique_ptr<VolumeBackend> make_qemu_img_backend();
std::unique_ptr<VolumeBackend> make_disk_library_backend();
// "keel-disk" (the default) or "qemu-img".
Result<std::unique_ptr<VolumeBackend>> make_volume_backend(const std::string& name);

class EventBus;

class StoragePools {
public:
  StoragePools(StateStore& store, std::unique_ptr<VolumeBackend> backend);

  // Long operations (full-copy clones, uploads) publish "job" events with their progress here.
  void set_events(EventBus* events) { events_ = events; }
  const VolumeBackend& backend() const { return *backend_; }

  // Creates the "default" pool at `dir` on first start.
  Result<void> ensure_default(const std::string& dir);

  Result<nlohmann::json> list_pools();
  Result<void> define_pool(const std::string& name, const std::string& path);
  Result<void> undefine_pool(const std::string& name);

  Result<nlohmann::json> list_volumes(const std::string& pool);
  Result<nlohmann::json> volume_info(const std::string& pool, const std::string& vol);
  Result<void> create_volume(const std::string& pool, const std::string& vol, const std::string& format, uint64_t size);
  // mode "overlay" (qcow2 on a backing file) or "copy" (full copy).
  Result<void> clone_volume(const std::string& pool, const std::string& from, const std::string& to,
                            const std::string& mode);
  Result<void> resize_volume(const std::string& pool, const std::string& vol, uint64_t size,
                             ShrinkPolicy shrink = ShrinkPolicy::Refuse);
  Result<void> delete_volume(const std::string& pool, const std::string& vol);
  Result<void> upload(const std::string& pool, const std::string& vol, std::string_view data);
  // Streams `size` bytes from `read` (which returns 0 at EOF) into the volume, replacing it whole
  // only once everything arrived.
  Result<void> upload_from(const std::string& pool, const std::string& vol, uint64_t size,
                           const std::function<Result<size_t>(char*, size_t)>& read);
  // The file behind an existing volume (for streaming downloads).
  Result<std::string> data_path(const std::string& pool, const std::string& vol);
  Result<std::string> download(const std::string& pool, const std::string& vol);

  // "pool/volume" -> path and format of an existing volume.
  Result<std::pair<std::string, std::string>> resolve(const std::string& pool_slash_volume);

private:
  Result<PoolRecord> pool(const std::string& name);
  Result<std::string> volume_path(const std::string& pool, const std::string& vol, bool must_exist);
  // The format recorded when keeld made the volume, or "" for a file it did not make (then probed).
  Result<std::string> recorded_format(const std::string& pool, const std::string& vol);
  Result<VolumeInfo> describe(const std::string& pool, const std::string& vol, const std::string& path);
  Result<void> record_uploaded_format(const std::string& pool, const std::string& vol, const std::string& path);

  // Publishes progress at most every quarter second (and at the start and the end).
  VolumeProgress progress_reporter(const std::string& operation, const std::string& pool, const std::string& vol);

  StateStore& store_;
  std::unique_ptr<VolumeBackend> backend_;
  EventBus* events_ = nullptr;
};

}  // namespace keel::hostd
