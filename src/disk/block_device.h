// BlockDevice: what every disk format driver offers and every consumer (keel-img, keel-fish's
// filesystems, the NBD server, keeld's storage pools) uses. Byte-addressed; drivers handle any
// alignment, though aligned, large requests are the fast path.
//
// Thread safety: a driver may be used from several threads at once unless it says otherwise.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace keel::disk {

enum class OpenMode { ReadOnly, ReadWrite };

// What a range of the virtual disk holds, as `qemu-img map` reports it.
struct Extent {
  uint64_t offset = 0;   // virtual offset
  uint64_t length = 0;
  bool data = false;     // allocated somewhere in the chain (false: reads as zero / hole)
  bool zero = false;     // reads as zeros
  int depth = 0;         // 0: this image; 1: its backing file; ...
  // Where the bytes live, when they are plainly in a file (raw, uncompressed qcow2 cluster);
  // empty file name otherwise.
  std::string file;
  uint64_t file_offset = 0;
  // Allocated in some layer of the chain ("present" in qemu-img map); false only for ranges no
  // layer holds, which read as zeros.
  bool allocated = true;
};

class BlockDevice {
public:
  virtual ~BlockDevice() = default;

  // Virtual size in bytes.
  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;
  // A short format name: "raw", "qcow2", "vmdk".
  virtual std::string format() const = 0;

  virtual Result<void> read(uint64_t offset, std::span<uint8_t> out) = 0;
  virtual Result<void> write(uint64_t offset, std::span<const uint8_t> data) = 0;
  virtual Result<void> flush() = 0;
  // Hints that a range is no longer needed; reads afterwards return zeros or the old data.
  virtual Result<void> discard(uint64_t offset, uint64_t length) = 0;
  // Makes a range read as zeros, without writing zeros where the format can avoid it.
  virtual Result<void> write_zeroes(uint64_t offset, uint64_t length) = 0;
  // The allocation status of [offset, offset+length), as consecutive extents covering it.
  virtual Result<std::vector<Extent>> block_status(uint64_t offset, uint64_t length) = 0;
};

}  // namespace keel::disk
