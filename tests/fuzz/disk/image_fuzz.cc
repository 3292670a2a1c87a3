// Fuzzes the image parsers: the bytes become a file that open_image probes and opens read-only
// (qcow2, vmdk or raw), then reads, block status and (for qcow2) a full check run over it, and a
// read-write open (which repairs dirty images) plus check -r all on a private copy.
// Anything may fail with an error; nothing may crash, hang or read out of bounds.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include "base/unique_fd.h"
#include "disk/image.h"
#include "disk/qcow2_image.h"
#include "disk/vmdk_image.h"

using namespace keel;
using namespace keel::disk;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)VmdkImage::parse_bytes(std::span<const uint8_t>(data, size));
  int raw = ::memfd_create("fuzz-image", MFD_CLOEXEC);
  if (raw < 0) return 0;
  UniqueFd fd(raw);
  if (!pwrite_all(fd.get(), data, size, 0)) return 0;
  std::string path = "/proc/self/fd/" + std::to_string(fd.get());
  auto probed = probe_format(path);
  if (!probed || *probed == ImageFormat::Raw) return 0;
  std::unique_ptr<BlockDevice> dev;
  if (*probed == ImageFormat::Qcow2) {
    Qcow2OpenOptions options;
    options.open_backing = false;  // a fuzzed name must not open files
    auto q = Qcow2Image::open(path, OpenMode::ReadOnly, options);
    if (!q) return 0;
    dev = std::move(*q);
  } else {
    VmdkOpenOptions options;
    options.open_parent = false;  // likewise for a delta link's parent
    auto v = VmdkImage::open(path, OpenMode::ReadOnly, options);
    if (!v) return 0;
    dev = std::move(*v);
  }
  // Bounded work: the first and last MiB, and the map of the first 64 MiB.
  std::vector<uint8_t> buf(1 << 20);
  uint64_t n = std::min<uint64_t>(dev->size(), buf.size());
  (void)dev->read(0, std::span<uint8_t>(buf.data(), n));
  if (dev->size() > n) (void)dev->read(dev->size() - n, std::span<uint8_t>(buf.data(), n));
  (void)dev->block_status(0, std::min<uint64_t>(dev->size(), 64 << 20));
  if (auto* q = dynamic_cast<Qcow2Image*>(dev.get()); q && size < (16 << 10)) {
    (void)q->check(RepairMode::None);
    // The repair path writes: run it on a private copy. A read-write open repairs a dirty image
    // by itself; check -r all then rebuilds whatever refcount structure is left broken.
    int copy_raw = ::memfd_create("fuzz-repair", MFD_CLOEXEC);
    if (copy_raw < 0) return 0;
    UniqueFd copy(copy_raw);
    if (!pwrite_all(copy.get(), data, size, 0)) return 0;
    Qcow2OpenOptions options;
    options.open_backing = false;
    auto rw = Qcow2Image::open("/proc/self/fd/" + std::to_string(copy.get()), OpenMode::ReadWrite, options);
    if (rw) (void)(*rw)->check(RepairMode::All);
  }
  return 0;
}
