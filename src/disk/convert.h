// copy_image: what `keel-img convert` does once both images are open: the source's content into a
// freshly created target, holes and zero granules left unwritten (qemu-img convert's -S).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "base/result.h"
#include "disk/block_device.h"

namespace keel::disk {

struct CopyOptions {
  // Zero detection works on granules of this many bytes: a granule of zeros is not written (the
  // target is fresh and reads as zeros there already). qemu-img's -S, 4 KiB by default; for qcow2
  // targets their cluster size, so all-zero clusters stay unallocated.
  uint64_t granule = 4096;
  // Unit of work handed to the reader threads (rounded up to a multiple of the granule).
  uint64_t chunk_size = uint64_t{2} << 20;
  // Compress every cluster (qcow2 targets only; the readers compress and write themselves).
  bool compress = false;
  // The target's backing file (convert -B): only what differs from it is written, and ranges the
  // source reads as zeros are written as zeroes so the backing file does not show through.
  BlockDevice* target_backing = nullptr;
  // Reader threads; 0: one per core.
  unsigned readers = 0;
  // Chunk buffers: chunks with data the readers may hold read ahead of the writer. 0: one more
  // than the readers (measured on 2 cores: fewer slow the decompressing readers, more cost
  // fresh pages and cache without gaining anything).
  unsigned queue_chunks = 0;
  // Called by the writer after each chunk with the bytes done so far.
  std::function<void(uint64_t)> progress;
};

// Reader threads take chunks in turn (block status, reads, decompression, the zero scan); the
// calling thread writes the chunks to the target in order. With `compress` and no backing file the
// readers compress and write their clusters themselves. The caller flushes or closes the target
// afterwards.
Result<void> copy_image(BlockDevice& source, BlockDevice& target, const CopyOptions& options);

// True when all n bytes are zero.
bool is_zero(const uint8_t* p, size_t n);

}  // namespace keel::disk
