// Mapping: the one owner of an mmap'ed region, exposed as a byte span. Move-only; unmaps on
// destruction.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

#include "base/result.h"

namespace keel {

class Mapping {
public:
  Mapping() = default;
  ~Mapping() { reset(); }
  Mapping(Mapping&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  // Maps `size` bytes of `fd` at `offset` (page aligned). prot is PROT_READ[|PROT_WRITE];
  // flags MAP_SHARED or MAP_PRIVATE.
  static Result<Mapping> map_fd(int fd, size_t size, off_t offset, int prot, int flags);
  // Anonymous private memory, zero filled.
  static Result<Mapping> anonymous(size_t size);

  std::span<uint8_t> bytes() const { return {static_cast<uint8_t*>(data_), size_}; }
  uint8_t* data() const { return static_cast<uint8_t*>(data_); }
  size_t size() const { return size_; }
  bool valid() const { return data_ != nullptr; }

  void reset();

private:
  Mapping(void* data, size_t size) : data_(data), size_(size) {}
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace keel
