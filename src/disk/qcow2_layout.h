// qcow2 on-disk flags and masks (QEMU's docs/interop/qcow2.rst), shared by the qcow2 driver's files.
#pragma once

#include <cstdint>

namespace keel::disk::qcow2 {

constexpr uint64_t kOflagCopied = 1ULL << 63;      // L1/L2 entry: refcount is exactly 1
constexpr uint64_t kOflagCompressed = 1ULL << 62;  // L2 entry: compressed cluster descriptor
constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ULL;
constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ULL;
constexpr uint64_t kRtOffsetMask = 0xfffffffffffffe00ULL;

}  // namespace keel::disk::qcow2
