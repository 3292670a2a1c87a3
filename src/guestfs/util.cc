#include "guestfs/util.h"

namespace keel::guestfs {

std::string utf16_to_utf8(std::u16string_view in) {
  std::string out;
  for (size_t i = 0; i < in.size(); i++) {
    uint32_t cp = in[i];
    if (cp >= 0xd800 && cp <= 0xdbff && i + 1 < in.size() && in[i + 1] >= 0xdc00 && in[i + 1] <= 0xdfff) {
      cp = 0x10000 + ((cp - 0xd800) << 10) + (in[i + 1] - 0xdc00);
      i++;
    } else if (cp >= 0xd800 && cp <= 0xdfff) {
      cp = 0xfffd;
    }
    if (cp < 0x80) {
      out.push_back(char(cp));
    } else if (cp < 0x800) {
      out.push_back(char(0xc0 | (cp >> 6)));
      out.push_back(char(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
      out.push_back(char(0xe0 | (cp >> 12)));
      out.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
      out.push_back(char(0x80 | (cp & 0x3f)));
    } else {
      out.push_back(char(0xf0 | (cp >> 18)));
      out.push_back(char(0x80 | ((cp >> 12) & 0x3f)));
      out.push_back(char(0x80 | ((cp >> 6) & 0x3f)));
      out.push_back(char(0x80 | (cp & 0x3f)));
    }
  }
  return out;
}

std::u16string utf8_to_utf16(std::string_view in) {
  std::u16string out;
  size_t i = 0;
  while (i < in.size()) {
    uint8_t c = uint8_t(in[i]);
    uint32_t cp = 0xfffd;
    size_t len = 1;
    if (c < 0x80) {
      cp = c;
    } else if ((c & 0xe0) == 0xc0) {
      len = 2;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
    }
    if (len > 1) {
      if (i + len > in.size()) {
        len = 1;
      } else {
        cp = c & (0x7f >> len);
        bool good = true;
        for (size_t k = 1; k < len; k++) {
          uint8_t cc = uint8_t(in[i + k]);
          if ((cc & 0xc0) != 0x80) good = false;
          cp = (cp << 6) | (cc & 0x3f);
        }
        if (!good || cp > 0x10ffff) {
          cp = 0xfffd;
          len = 1;
        }
      }
    }
    i += len;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out.push_back(char16_t(0xd800 + (cp >> 10)));
      out.push_back(char16_t(0xdc00 + (cp & 0x3ff)));
    } else {
      out.push_back(char16_t(cp));
    }
  }
  return out;
}

std::vector<std::string> split_path(std::string_view path) {
  std::vector<std::string> parts;
  size_t i = 0;
  while (i < path.size()) {
    size_t j = path.find('/', i);
    if (j == std::string_view::npos) j = path.size();
    std::string_view part = path.substr(i, j - i);
    if (!part.empty() && part != ".") parts.emplace_back(part);
    i = j + 1;
  }
  return parts;
}

std::string join_path(std::string_view dir, std::string_view name) {
  std::string out(dir);
  if (out.empty() || out.back() != '/') out.push_back('/');
  while (!name.empty() && name.front() == '/') name.remove_prefix(1);
  out.append(name);
  return out;
}

std::string parent_path(std::string_view path) {
  auto parts = split_path(path);
  if (parts.size() <= 1) return "/";
  std::string out;
  for (size_t i = 0; i + 1 < parts.size(); i++) out += "/" + parts[i];
  return out;
}

std::string base_name(std::string_view path) {
  auto parts = split_path(path);
  return parts.empty() ? std::string("/") : parts.back();
}

}  // namespace keel::guestfs
