#include "guestfs/tar.h"

#include <cstring>

#include "base/unique_fd.h"
#include "guestfs/util.h"

namespace keel::guestfs {

namespace {

constexpr size_t kBlock = 512;

void put_octal(uint8_t* field, size_t width, uint64_t value) {
  std::string s = fmt::format("{:0{}o}", value, width - 1);
  if (s.size() > width - 1) s = std::string(width - 1, '7');
  std::memcpy(field, s.data(), s.size());
  field[width - 1] = 0;
}

std::array<uint8_t, kBlock> make_header(const std::string& name, char type, const FileStat& st, uint64_t size,
                                        const std::string& link) {
  std::array<uint8_t, kBlock> h{};
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  put_octal(&h[100], 8, st.mode & 07777);
  put_octal(&h[108], 8, st.uid);
  put_octal(&h[116], 8, st.gid);
  put_octal(&h[124], 12, size);
  put_octal(&h[136], 12, uint64_t(std::max<int64_t>(st.mtime, 0)));
  std::memset(&h[148], ' ', 8);
  h[156] = uint8_t(type);
  std::memcpy(&h[157], link.data(), std::min<size_t>(link.size(), 100));
  std::memcpy(&h[257], "ustar  ", 8);  // GNU magic: allows the 'L'/'K' long-name records
  unsigned sum = 0;
  for (uint8_t b : h) sum += b;
  std::string cs = fmt::format("{:06o}", sum);
  std::memcpy(&h[148], cs.data(), 6);
  h[154] = 0;
  h[155] = ' ';
  return h;
}

Result<void> write_padded(int fd, const void* data, size_t len) {
  TRY(write_all(fd, data, len));
  static const uint8_t zeros[kBlock] = {};
  if (len % kBlock) TRY(write_all(fd, zeros, kBlock - len % kBlock));
  return ok();
}

Result<void> write_long_name(int fd, char type, const std::string& value) {
  FileStat st;
  auto h = make_header("././@LongLink", type, st, value.size() + 1, "");
  TRY(write_all(fd, h.data(), h.size()));
  std::string v = value;
  v.push_back('\0');
  return write_padded(fd, v.data(), v.size());
}

uint64_t parse_octal(const uint8_t* field, size_t width) {
  // GNU base-256 for large values.
  if (field[0] & 0x80) {
    uint64_t v = 0;
    for (size_t i = 1; i < width; i++) v = (v << 8) | field[i];
    return v;
  }
  uint64_t v = 0;
  for (size_t i = 0; i < width; i++) {
    uint8_t c = field[i];
    if (c == 0 || c == ' ') {
      if (v) break;
      continue;
    }
    if (c < '0' || c > '7') break;
    v = v * 8 + (c - '0');
  }
  return v;
}

}  // namespace

Result<void> tar_out(Guest& guest, const std::string& dir, int fd) {
  TRY(guest.walk(dir, [&](const std::string& rel, const FileStat& st) -> Result<void> {
    std::string name = "./" + rel;
    std::string path = join_path(dir, rel);
    char type;
    std::string link;
    uint64_t size = 0;
    switch (st.type()) {
      case FileType::Regular: type = '0'; size = st.size; break;
      case FileType::Directory: type = '5'; name += "/"; break;
      case FileType::Symlink: type = '2'; link = TRY(guest.readlink(path)); break;
      case FileType::Fifo: type = '6'; break;
      default: return ok();
    }
    if (name.size() > 100) TRY(write_long_name(fd, 'L', name));
    if (link.size() > 100) TRY(write_long_name(fd, 'K', link));
    auto header = make_header(name, type, st, size, link);
    TRY(write_all(fd, header.data(), header.size()));
    if (type == '0') {
      uint64_t written = 0;
      TRY(guest.read_stream(path, 0, size, [&](std::span<const uint8_t> chunk) -> Result<void> {
        written += chunk.size();
        return write_all(fd, chunk.data(), chunk.size());
      }));
      if (written != size) return fail(EIO, path + ": file changed size while being read");
      static const uint8_t zeros[kBlock] = {};
      if (size % kBlock) TRY(write_all(fd, zeros, kBlock - size % kBlock));
    }
    return ok();
  }));
  static const uint8_t end[2 * kBlock] = {};
  return write_all(fd, end, sizeof end);
}

Result<void> tar_in(Guest& guest, int fd, const std::string& dir) {
  if (!TRY(guest.is_dir(dir))) return fail(ENOTDIR, dir + ": not a directory");
  std::string long_name, long_link;
  std::array<uint8_t, kBlock> h;
  auto read_block = [&](uint8_t* out) -> Result<bool> {
    size_t n = TRY(read_full(fd, out, kBlock));
    if (n == 0) return false;
    if (n != kBlock) return fail_invalid("tar stream is truncated");
    return true;
  };
  auto read_data = [&](uint64_t size) -> Result<std::string> {
    if (size > (4ull << 30)) return fail_invalid("tar entry is too large ({} bytes)", size);
    std::string data(size, '\0');
    if (size) {
      size_t n = TRY(read_full(fd, data.data(), size));
      if (n != size) return fail_invalid("tar stream is truncated");
    }
    uint8_t pad[kBlock];
    if (size % kBlock) {
      size_t n = TRY(read_full(fd, pad, kBlock - size % kBlock));
      if (n != kBlock - size % kBlock) return fail_invalid("tar stream is truncated");
    }
    return data;
  };
  while (true) {
    if (!TRY(read_block(h.data()))) break;
    if (std::all_of(h.begin(), h.end(), [](uint8_t b) { return b == 0; })) break;
    unsigned sum = 0;
    for (size_t i = 0; i < kBlock; i++) sum += (i >= 148 && i < 156) ? ' ' : h[i];
    if (sum != parse_octal(&h[148], 8)) return fail_invalid("tar header checksum mismatch");
    char type = char(h[156]);
    uint64_t size = parse_octal(&h[124], 12);
    if (type == 'L' || type == 'K') {
      std::string v = TRY(read_data(size));
      v = v.substr(0, strnlen(v.c_str(), v.size()));
      (type == 'L' ? long_name : long_link) = v;
      continue;
    }
    if (type == 'x') {
      std::string pax = TRY(read_data(size));
      size_t pos = 0;
      while (pos < pax.size()) {
        size_t space = pax.find(' ', pos);
        if (space == std::string::npos) break;
        uint64_t len = std::strtoull(pax.substr(pos, space - pos).c_str(), nullptr, 10);
        if (len == 0 || pos + len > pax.size()) break;
        std::string rec = pax.substr(space + 1, pos + len - space - 2);
        size_t eq = rec.find('=');
        if (eq != std::string::npos) {
          if (rec.substr(0, eq) == "path") long_name = rec.substr(eq + 1);
          if (rec.substr(0, eq) == "linkpath") long_link = rec.substr(eq + 1);
        }
        pos += len;
      }
      continue;
    }
    if (type == 'g') {
      TRY(read_data(size));
      continue;
    }
    std::string name = long_name.empty() ? std::string(reinterpret_cast<char*>(&h[0]), strnlen(reinterpret_cast<char*>(&h[0]), 100)) : long_name;
    if (long_name.empty() && std::memcmp(&h[257], "ustar\0", 6) == 0 && h[345]) {
      std::string prefix(reinterpret_cast<char*>(&h[345]), strnlen(reinterpret_cast<char*>(&h[345]), 155));
      name = prefix + "/" + name;
    }
    std::string link = long_link.empty() ? std::string(reinterpret_cast<char*>(&h[157]), strnlen(reinterpret_cast<char*>(&h[157]), 100)) : long_link;
    long_name.clear();
    long_link.clear();
    uint32_t mode = uint32_t(parse_octal(&h[100], 8)) & 07777;
    uint32_t uid = uint32_t(parse_octal(&h[108], 8)), gid = uint32_t(parse_octal(&h[116], 8));
    int64_t mtime = int64_t(parse_octal(&h[136], 12));
    auto parts = split_path(name);
    for (const auto& p : parts)
      if (p == "..") return fail_invalid("tar entry {} leaves the target directory", name);
    std::string data = TRY(read_data((type == '0' || type == '\0' || type == '7') ? size : (type == '5' || type == '2' || type == '1') ? 0 : size));
    if (parts.empty()) continue;  // "./"
    std::string rel;
    for (const auto& p : parts) rel += "/" + p;
    std::string target = join_path(dir, rel);
    switch (type) {
      case '5':
        TRY(guest.mkdir_p(target, mode));
        TRY(guest.chmod(target, mode));
        break;
      case '0':
      case '\0':
      case '7':
        TRY(guest.mkdir_p(parent_path(target)));
        TRY(guest.write_file(target, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size()),
                             WriteMode::Truncate, mode));
        TRY(guest.chmod(target, mode));
        break;
      case '2':
        TRY(guest.mkdir_p(parent_path(target)));
        (void)guest.rm(target);
        TRY(guest.ln_s(link, target));
        break;
      case '1': {
        // Hard links become copies: not every filesystem here has them (FAT).
        auto lparts = split_path(link);
        std::string lrel;
        for (const auto& p : lparts) {
          if (p == "..") return fail_invalid("tar link {} leaves the target directory", link);
          lrel += "/" + p;
        }
        TRY(guest.cp(join_path(dir, lrel), target));
        break;
      }
      default:
        continue;  // devices, fifos: skipped
    }
    if (type != '2') {
      (void)guest.chown(target, uid, gid);
      (void)guest.set_times(target, mtime, mtime);
    }
  }
  return guest.sync();
}

}  // namespace keel::guestfs
