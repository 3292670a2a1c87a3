// Big-endian readers and writers over byte buffers, for OpenFlow messages and packet headers.
//
// ByteReader never reads past its end: every get fails softly (sets a sticky error flag and returns
// zero), so a decoder can read a whole fixed structure and check ok() once, and hostile lengths can
// never walk off the buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace keel::sw {

class ByteReader {
public:
  ByteReader() = default;
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  explicit ByteReader(std::span<const uint8_t> s) : data_(s.data()), size_(s.size()) {}

  bool ok() const { return ok_; }
  size_t remaining() const { return ok_ ? size_ - pos_ : 0; }
  size_t position() const { return pos_; }
  const uint8_t* current() const { return data_ + pos_; }

  bool has(size_t n) const { return ok_ && size_ - pos_ >= n; }

  uint8_t u8() {
    if (!need(1)) return 0;
    return data_[pos_++];
  }
  uint16_t u16() {
    if (!need(2)) return 0;
    uint16_t v = uint16_t(data_[pos_] << 8 | data_[pos_ + 1]);
    pos_ += 2;
    return v;
  }
  uint32_t u32() {
    uint32_t hi = u16();
    return hi << 16 | u16();
  }
  uint64_t u64() {
    uint64_t hi = u32();
    return hi << 32 | u32();
  }
  void bytes(void* out, size_t n) {
    if (!need(n)) {
      std::memset(out, 0, n);
      return;
    }
    std::memcpy(out, data_ + pos_, n);
    pos_ += n;
  }
  void skip(size_t n) {
    if (need(n)) pos_ += n;
  }
  // A sub-reader over the next n bytes, which this reader skips.
  ByteReader sub(size_t n) {
    if (!need(n)) return ByteReader(nullptr, 0).failed();
    ByteReader r(data_ + pos_, n);
    pos_ += n;
    return r;
  }
  std::span<const uint8_t> span(size_t n) {
    if (!need(n)) return {};
    auto s = std::span<const uint8_t>(data_ + pos_, n);
    pos_ += n;
    return s;
  }
  std::span<const uint8_t> rest() { return span(remaining()); }
  // A fixed-width, NUL-padded string field.
  std::string fixed_string(size_t n) {
    auto s = span(n);
    size_t len = 0;
    while (len < s.size() && s[len]) ++len;
    return std::string(reinterpret_cast<const char*>(s.data()), len);
  }

private:
  ByteReader failed() {
    ok_ = false;
    return *this;
  }
  bool need(size_t n) {
    if (!ok_ || size_ - pos_ < n) {
      ok_ = false;
      return false;
    }
    return true;
  }
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t pos_ = 0;
  bool ok_ = true;
};

class ByteWriter {
public:
  explicit ByteWriter(std::vector<uint8_t>& out) : out_(out) {}

  size_t size() const { return out_.size(); }
  void u8(uint8_t v) { out_.push_back(v); }
  void u16(uint16_t v) {
    out_.push_back(uint8_t(v >> 8));
    out_.push_back(uint8_t(v));
  }
  void u32(uint32_t v) {
    u16(uint16_t(v >> 16));
    u16(uint16_t(v));
  }
  void u64(uint64_t v) {
    u32(uint32_t(v >> 32));
    u32(uint32_t(v));
  }
  void bytes(const void* p, size_t n) {
    auto b = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), b, b + n);
  }
  void zeros(size_t n) { out_.insert(out_.end(), n, 0); }
  void fixed_string(std::string_view s, size_t n) {
    size_t len = std::min(s.size(), n - 1);
    bytes(s.data(), len);
    zeros(n - len);
  }
  void pad_to(size_t alignment, size_t from = 0) {
    while ((out_.size() - from) % alignment) out_.push_back(0);
  }
  // Overwrites a 16-bit field already written (lengths known only at the end).
  void patch_u16(size_t at, uint16_t v) {
    out_[at] = uint8_t(v >> 8);
    out_[at + 1] = uint8_t(v);
  }

private:
  std::vector<uint8_t>& out_;
};

}  // namespace keel::sw
