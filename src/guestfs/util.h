// Small byte and text helpers shared by the on-disk parsers.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace keel::guestfs {

inline uint16_t load_le16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
inline uint32_t load_le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
inline uint64_t load_le64(const uint8_t* p) { return uint64_t(load_le32(p)) | (uint64_t(load_le32(p + 4)) << 32); }
inline void store_le16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
}
inline void store_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = uint8_t(v >> (8 * i));
}

// UTF-16 (with surrogate pairs) to UTF-8; unpaired surrogates become U+FFFD.
std::string utf16_to_utf8(std::u16string_view in);
// UTF-8 to UTF-16; invalid bytes become U+FFFD.
std::u16string utf8_to_utf16(std::string_view in);

// Splits "/a/b/c" into {"a","b","c"}; empty components and "." are dropped.
std::vector<std::string> split_path(std::string_view path);
// Joins a directory and a name with exactly one slash.
std::string join_path(std::string_view dir, std::string_view name);
// "/a/b" -> "/a"; "/a" -> "/".
std::string parent_path(std::string_view path);
// "/a/b" -> "b".
std::string base_name(std::string_view path);

}  // namespace keel::guestfs
