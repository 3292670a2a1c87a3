// GuestMemory: the front-end's memory regions mapped into this process, and the translation of
// guest-physical addresses (what virtio descriptors hold) and front-end virtual addresses (what
// SET_VRING_ADDR holds) to pointers here.
//
// Every translation is bounds-checked: a range must lie inside one region, or the lookup fails. A
// range that straddles two regions fails too, even if they happen to be contiguous; the caller turns
// that into an error on the device.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>

#include "base/mapping.h"
#include "base/result.h"
#include "base/unique_fd.h"
#include "vhost/message.h"

namespace keel::vhost {

// Maps `size` bytes of `fd` (shared, read-write) from its start. The fd comes from the front-end:
// it must be a regular file (memfd, hugetlbfs, tmpfs) at least `size` long, so no access through
// the mapping can fault past its end. `what` names it in errors.
Result<Mapping> map_frontend_file(int fd, uint64_t size, std::string_view what);

class GuestMemory {
public:
  struct Region {
    uint64_t guest_phys_addr = 0;
    uint64_t size = 0;
    uint64_t user_addr = 0;  // where the front-end has it mapped
    uint8_t* host = nullptr;  // where we have it: mapping.data() + mmap_offset
    Mapping mapping;
  };

  GuestMemory() = default;
  GuestMemory(GuestMemory&&) noexcept = default;
  GuestMemory& operator=(GuestMemory&&) noexcept = default;

  // Maps every region of a decoded SET_MEM_TABLE; fds[i] backs regions[i]. The fd must be a regular
  // file (memfd, hugetlbfs, tmpfs) at least mmap_offset + memory_size long, so no access through the
  // mapping can fault past its end.
  static Result<GuestMemory> map(std::span<const MemRegionDesc> regions, std::span<const UniqueFd> fds);

  // Adds one region mapped from fd (shared, read-write). Regions must not overlap.
  Result<void> add_region(int fd, const MemRegionDesc& desc);

  // Pointer to [gpa, gpa + len) if it lies inside one region, else nullptr.
  uint8_t* gpa_to_host(uint64_t gpa, uint64_t len) const {
    for (size_t i = 0; i < count_; ++i) {
      const Region& r = regions_[i];
      uint64_t off = gpa - r.guest_phys_addr;
      if (gpa >= r.guest_phys_addr && off <= r.size && len <= r.size - off) return r.host + off;
    }
    return nullptr;
  }
  // Pointer to [uva, uva + len) of the front-end's address space if it lies inside one region.
  uint8_t* uva_to_host(uint64_t uva, uint64_t len) const {
    for (size_t i = 0; i < count_; ++i) {
      const Region& r = regions_[i];
      uint64_t off = uva - r.user_addr;
      if (uva >= r.user_addr && off <= r.size && len <= r.size - off) return r.host + off;
    }
    return nullptr;
  }

  // Guest-physical address of [host, host + len), a range inside one region's mapping (what the
  // translations above return); false if it is not. Used to log writes for live migration.
  bool host_to_gpa(const uint8_t* host, uint64_t len, uint64_t& gpa) const {
    const auto p = reinterpret_cast<uintptr_t>(host);
    for (size_t i = 0; i < count_; ++i) {
      const Region& r = regions_[i];
      const auto base = reinterpret_cast<uintptr_t>(r.host);
      uint64_t off = p - base;
      if (p >= base && off <= r.size && len <= r.size - off) {
        gpa = r.guest_phys_addr + off;
        return true;
      }
    }
    return false;
  }

  size_t region_count() const { return count_; }
  const Region& region(size_t i) const { return regions_[i]; }
  bool empty() const { return count_ == 0; }

private:
  std::array<Region, kMaxMemRegions> regions_{};
  size_t count_ = 0;
};

}  // namespace keel::vhost
