// Human sizes as qemu-img and friends write them: "512", "64k", "512M", "2G", "1.5T" (binary
// units: k = 1024). Parsing rejects negative, overflowing and unknown-suffix input.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/result.h"

namespace keel {

// Bytes when no suffix is given. Suffixes (case-insensitive): b, k/K, M, G, T, P, E, optionally
// followed by "iB" or "B" ("2GiB", "2GB" both mean 2 * 2^30, as qemu-img reads them).
Result<uint64_t> parse_size(std::string_view text);

// "0 B", "512 B", "64 KiB", "1.5 GiB": three significant digits at most, as qemu-img info prints.
std::string format_size(uint64_t bytes);

}  // namespace keel
