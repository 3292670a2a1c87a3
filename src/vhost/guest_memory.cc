#include "vhost/guest_memory.h"

#include <sys/mman.h>
#include <sys/stat.h>

namespace keel::vhost {

Result<Mapping> map_frontend_file(int fd, uint64_t size, std::string_view what) {
  struct stat st;
  if (fstat(fd, &st) != 0) return fail_errno(fmt::format("fstat {} fd", what));
  if (!S_ISREG(st.st_mode)) return fail_invalid("{} fd is not a regular file or memfd", what);
  if (static_cast<uint64_t>(st.st_size) < size)
    return fail_invalid("{} needs {:#x} bytes of its file, which has only {:#x}", what, size,
                        static_cast<uint64_t>(st.st_size));
  return Mapping::map_fd(fd, size, 0, PROT_READ | PROT_WRITE, MAP_SHARED);
}

Result<GuestMemory> GuestMemory::map(std::span<const MemRegionDesc> regions,
                                     std::span<const UniqueFd> fds) {
  if (regions.size() != fds.size())
    return fail_invalid("memory table has {} regions but {} fds", regions.size(), fds.size());
  GuestMemory memory;
  for (size_t i = 0; i < regions.size(); ++i)
    TRY_CTX(memory.add_region(fds[i].get(), regions[i]), fmt::format("memory region {}", i));
  return memory;
}

Result<void> GuestMemory::add_region(int fd, const MemRegionDesc& desc) {
  if (count_ == regions_.size()) return fail_invalid("more than {} memory regions", regions_.size());
  if (desc.memory_size == 0) return fail_invalid("empty memory region");
  uint64_t map_size = desc.mmap_offset + desc.memory_size;
  if (map_size < desc.mmap_offset || desc.guest_phys_addr + desc.memory_size < desc.guest_phys_addr ||
      desc.userspace_addr + desc.memory_size < desc.userspace_addr)
    return fail_invalid("memory region wraps the address space");
  for (size_t i = 0; i < count_; ++i) {
    const Region& o = regions_[i];
    if (desc.guest_phys_addr < o.guest_phys_addr + o.size &&
        o.guest_phys_addr < desc.guest_phys_addr + desc.memory_size)
      return fail_invalid("memory region at gpa {:#x} overlaps another", desc.guest_phys_addr);
  }

  // mmap_offset need not be page aligned, so map from the file's start and step in.
  Mapping mapping = TRY(map_frontend_file(fd, map_size, "memory region"));
  Region& r = regions_[count_];
  r.guest_phys_addr = desc.guest_phys_addr;
  r.size = desc.memory_size;
  r.user_addr = desc.userspace_addr;
  r.host = mapping.data() + desc.mmap_offset;
  r.mapping = std::move(mapping);
  ++count_;
  return ok();
}

}  // namespace keel::vhost
