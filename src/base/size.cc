#include "base/size.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <limits>

namespace keel {

Result<uint64_t> parse_size(std::string_view text) {
  std::string_view original = text;
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.remove_prefix(1);
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.remove_suffix(1);
  if (text.empty()) return fail_invalid("invalid size '{}': empty", original);

  // Number part: digits with an optional fraction.
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  std::string_view number = text.substr(0, i);
  std::string_view suffix = text.substr(i);
  if (number.empty() || number.front() == '.' || number.find('.') != number.rfind('.'))
    return fail_invalid("invalid size '{}': expected a number such as 512, 64k, 2G", original);

  int shift = 0;
  if (!suffix.empty()) {
    switch (std::tolower(static_cast<unsigned char>(suffix.front()))) {
      case 'b': shift = 0; break;
      case 'k': shift = 10; break;
      case 'm': shift = 20; break;
      case 'g': shift = 30; break;
      case 't': shift = 40; break;
      case 'p': shift = 50; break;
      case 'e': shift = 60; break;
      default: return fail_invalid("invalid size '{}': unknown unit '{}'", original, suffix);
    }
    std::string_view rest = suffix.substr(1);
    bool plain_bytes = std::tolower(static_cast<unsigned char>(suffix.front())) == 'b';
    if (!(rest.empty() || (!plain_bytes && (rest == "iB" || rest == "B" || rest == "ib" || rest == "b"))))
      return fail_invalid("invalid size '{}': unknown unit '{}'", original, suffix);
  }

  if (number.find('.') == std::string_view::npos) {
    uint64_t value = 0;
    auto [ptr, ec] = std::from_chars(number.data(), number.data() + number.size(), value);
    if (ec != std::errc() || ptr != number.data() + number.size())
      return fail_invalid("invalid size '{}': number too large", original);
    if (shift > 0 && value > (std::numeric_limits<uint64_t>::max() >> shift))
      return fail_invalid("invalid size '{}': too large", original);
    return value << shift;
  }
  // Fractions ("1.5G") go through long double, which is exact enough for 64-bit sizes.
  long double value = std::strtold(std::string(number).c_str(), nullptr);
  long double bytes = std::ldexp(value, shift);
  if (bytes >= 18446744073709551616.0L) return fail_invalid("invalid size '{}': too large", original);
  if (bytes != std::floor(bytes))
    return fail_invalid("invalid size '{}': not a whole number of bytes", original);
  return static_cast<uint64_t>(bytes);
}

std::string format_size(uint64_t bytes) {
  static constexpr const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return fmt::format("{} B", bytes);
  int unit = 0;
  long double value = static_cast<long double>(bytes);
  while (value >= 1024.0L && unit < 6) {
    value /= 1024.0L;
    ++unit;
  }
  // Up to three significant digits, trailing zeros dropped: 1 GiB, 1.5 GiB, 10.2 GiB, 512 MiB.
  std::string text;
  if (value >= 100.0L) text = fmt::format("{:.0f}", static_cast<double>(value));
  else if (value >= 10.0L) text = fmt::format("{:.1f}", static_cast<double>(value));
  else text = fmt::format("{:.2f}", static_cast<double>(value));
  if (text.find('.') != std::string::npos) {
    while (text.back() == '0') text.pop_back();
    if (text.back() == '.') text.pop_back();
  }
  return fmt::format("{} {}", text, units[unit]);
}

}  // namespace keel
