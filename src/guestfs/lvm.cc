#include "guestfs/lvm.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <optional>

#include "guestfs/util.h"

namespace keel::guestfs {

const LvmValue* LvmSection::find(std::string_view key) const {
  for (const auto& [k, v] : values)
    if (k == key) return &v;
  return nullptr;
}
const LvmSection* LvmSection::section(std::string_view key) const {
  for (const auto& [k, s] : sections)
    if (k == key) return &s;
  return nullptr;
}
std::optional<int64_t> LvmSection::integer(std::string_view key) const {
  const LvmValue* v = find(key);
  if (!v || !std::holds_alternative<int64_t>(v->value)) return std::nullopt;
  return std::get<int64_t>(v->value);
}
std::optional<std::string> LvmSection::string(std::string_view key) const {
  const LvmValue* v = find(key);
  if (!v || !std::holds_alternative<std::string>(v->value)) return std::nullopt;
  return std::get<std::string>(v->value);
}

namespace {

constexpr int kMaxNesting = 32;
constexpr size_t kMaxMetadataSize = 16 << 20;

class LvmTextParser {
public:
  explicit LvmTextParser(std::string_view text) : text_(text) {}

  Result<LvmSection> parse_document() {
    LvmSection root;
    TRY(parse_items(root, 0, /*top=*/true));
    return root;
  }

private:
  void skip_space() {
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (c == '#') {
        while (pos_ < text_.size() && text_[pos_] != '\n') pos_++;
      } else if (std::isspace(uint8_t(c)) || c == '\0') {
        if (c == '\n') line_++;
        pos_++;
      } else {
        break;
      }
    }
  }

  tl::unexpected<Error> error(std::string_view what) {
    return fail_invalid("LVM metadata line {}: {}", line_, what);
  }

  Result<std::string> parse_name() {
    size_t start = pos_;
    while (pos_ < text_.size()) {
      char c = text_[pos_];
      if (std::isalnum(uint8_t(c)) || c == '_' || c == '-' || c == '.' || c == '+') {
        pos_++;
      } else {
        break;
      }
    }
    if (start == pos_) return error("expected a name");
    return std::string(text_.substr(start, pos_ - start));
  }

  Result<LvmValue> parse_value(int depth) {
    if (depth > kMaxNesting) return error("values nest too deeply");
    skip_space();
    if (pos_ >= text_.size()) return error("unexpected end of text");
    char c = text_[pos_];
    if (c == '"') {
      pos_++;
      std::string s;
      while (true) {
        if (pos_ >= text_.size()) return error("unterminated string");
        char d = text_[pos_++];
        if (d == '"') break;
        if (d == '\\') {
          if (pos_ >= text_.size()) return error("unterminated string");
          d = text_[pos_++];
        }
        if (d == '\n') line_++;
        s.push_back(d);
      }
      return LvmValue{std::move(s)};
    }
    if (c == '[') {
      pos_++;
      std::vector<LvmValue> list;
      while (true) {
        skip_space();
        if (pos_ >= text_.size()) return error("unterminated list");
        if (text_[pos_] == ']') {
          pos_++;
          break;
        }
        list.push_back(TRY(parse_value(depth + 1)));
        skip_space();
        if (pos_ < text_.size() && text_[pos_] == ',') pos_++;
      }
      return LvmValue{std::move(list)};
    }
    if (c == '-' || std::isdigit(uint8_t(c))) {
      bool negative = c == '-';
      if (negative) pos_++;
      int64_t value = 0;
      size_t digits = 0;
      while (pos_ < text_.size() && std::isdigit(uint8_t(text_[pos_]))) {
        int d = text_[pos_++] - '0';
        if (value > (INT64_MAX - d) / 10) return error("number is too large");
        value = value * 10 + d;
        digits++;
      }
      if (digits == 0) return error("expected a number");
      // Floats appear in a few fields we do not use: skip the fraction.
      if (pos_ < text_.size() && text_[pos_] == '.') {
        pos_++;
        while (pos_ < text_.size() && std::isdigit(uint8_t(text_[pos_]))) pos_++;
      }
      return LvmValue{negative ? -value : value};
    }
    return error("expected a value");
  }

  Result<void> parse_items(LvmSection& section, int depth, bool top) {
    if (depth > kMaxNesting) return error("sections nest too deeply");
    while (true) {
      skip_space();
      if (pos_ >= text_.size()) {
        if (top) return ok();
        return error("unexpected end of text inside a section");
      }
      if (text_[pos_] == '}') {
        if (top) return error("unexpected '}'");
        pos_++;
        return ok();
      }
      std::string name = TRY(parse_name());
      skip_space();
      if (pos_ >= text_.size()) return error("unexpected end of text after a name");
      if (text_[pos_] == '=') {
        pos_++;
        section.values.emplace_back(std::move(name), TRY(parse_value(depth)));
      } else if (text_[pos_] == '{') {
        pos_++;
        LvmSection child;
        TRY(parse_items(child, depth + 1, false));
        section.sections.push_back(LvmNamedSection{std::move(name), std::move(child)});
      } else {
        return error("expected '=' or '{' after " + name);
      }
    }
  }

  std::string_view text_;
  size_t pos_ = 0;
  int line_ = 1;
};

std::string strip_dashes(std::string s) {
  s.erase(std::remove(s.begin(), s.end(), '-'), s.end());
  return s;
}

bool has_flag(const LvmSection& s, std::string_view flag) {
  const LvmValue* v = s.find("status");
  if (!v || !std::holds_alternative<std::vector<LvmValue>>(v->value)) return false;
  for (const auto& item : std::get<std::vector<LvmValue>>(v->value))
    if (std::holds_alternative<std::string>(item.value) && std::get<std::string>(item.value) == flag) return true;
  return false;
}

}  // namespace

Result<LvmSection> parse_lvm_text(std::string_view text) {
  if (text.size() > kMaxMetadataSize) return fail_invalid("LVM metadata is too large ({} bytes)", text.size());
  LvmTextParser parser(text);
  return parser.parse_document();
}

Result<LvmPhysicalVolume> read_lvm_physical_volume(disk::BlockDevice& device) {
  if (device.size() < 4096) return fail_invalid("device is too small for an LVM label");
  std::vector<uint8_t> head(2048);
  TRY(device.read(0, head));
  const uint8_t* label = nullptr;
  for (int sector = 0; sector < 4; sector++) {
    const uint8_t* p = head.data() + sector * 512;
    if (std::memcmp(p, "LABELONE", 8) == 0 && std::memcmp(p + 24, "LVM2 001", 8) == 0) {
      label = p;
      break;
    }
  }
  if (!label) return fail_invalid("no LVM2 label");
  uint32_t header_offset = load_le32(label + 20);
  if (header_offset < 32 || header_offset > 512 - 40) return fail_invalid("LVM label has a bad header offset");
  const uint8_t* pvh = label + header_offset;
  LvmPhysicalVolume pv;
  pv.uuid.assign(reinterpret_cast<const char*>(pvh), 32);
  // Two lists of (offset, size) follow, each ending with a zero pair: data areas, then metadata areas.
  size_t at = size_t(pvh - label) + 40;
  auto next_locn = [&](uint64_t& offset, uint64_t& size) -> bool {
    if (at + 16 > 512) return false;
    offset = load_le64(label + at);
    size = load_le64(label + at + 8);
    at += 16;
    return true;
  };
  uint64_t offset = 0, size = 0;
  while (true) {
    if (!next_locn(offset, size)) return fail_invalid("LVM label's data area list is not terminated");
    if (offset == 0) break;
  }
  std::vector<std::pair<uint64_t, uint64_t>> mdas;
  while (true) {
    if (!next_locn(offset, size)) break;
    if (offset == 0) break;
    mdas.emplace_back(offset, size);
  }
  if (mdas.empty()) return fail_invalid("LVM physical volume has no metadata area");
  for (auto [mda_offset, mda_size] : mdas) {
    if (mda_size < 1024 || mda_offset > device.size() || mda_size > device.size() - mda_offset) continue;
    std::vector<uint8_t> header(512);
    TRY(device.read(mda_offset, header));
    if (std::memcmp(header.data() + 4, " LVM2 x[5A%r0N*>", 16) != 0) continue;
    uint64_t raw_offset = load_le64(header.data() + 40);
    uint64_t raw_size = load_le64(header.data() + 48);
    if (raw_offset == 0 || raw_size == 0) continue;
    if (raw_size > kMaxMetadataSize || raw_size > mda_size - 512 || raw_offset >= mda_size || raw_offset < 512)
      return fail_invalid("LVM metadata location is out of range");
    std::string text(size_t(raw_size), '\0');
    uint64_t first = std::min(raw_size, mda_size - raw_offset);
    TRY(device.read(mda_offset + raw_offset, std::span<uint8_t>(reinterpret_cast<uint8_t*>(text.data()), first)));
    if (first < raw_size) {
      // The metadata area is a ring that wraps to just after its header.
      TRY(device.read(mda_offset + 512,
                      std::span<uint8_t>(reinterpret_cast<uint8_t*>(text.data()) + first, raw_size - first)));
    }
    while (!text.empty() && text.back() == '\0') text.pop_back();
    pv.metadata = std::move(text);
    return pv;
  }
  return fail_invalid("LVM physical volume has no readable metadata");
}

LvmAssembly assemble_volume_groups(const std::vector<LvmPhysicalVolume>& pvs) {
  LvmAssembly out;
  struct Vg {
    std::string name;
    int64_t seqno = -1;
    LvmSection section;
  };
  std::vector<Vg> vgs;
  for (const auto& pv : pvs) {
    auto doc = parse_lvm_text(pv.metadata);
    if (!doc) {
      out.warnings.push_back(pv.device_name + ": " + doc.error().message());
      continue;
    }
    for (auto& named : doc->sections) {
      const std::string& name = named.name;
      const LvmSection& section = named.section;
      int64_t seqno = section.integer("seqno").value_or(0);
      auto it = std::find_if(vgs.begin(), vgs.end(), [&](const Vg& v) { return v.name == name; });
      if (it == vgs.end()) {
        vgs.push_back(Vg{name, seqno, section});
      } else if (seqno > it->seqno) {
        it->seqno = seqno;
        it->section = section;
      }
    }
  }
  for (const auto& vg : vgs) {
    out.names.push_back(vg.name);
    int64_t extent_sectors = vg.section.integer("extent_size").value_or(0);
    if (extent_sectors <= 0 || extent_sectors > (int64_t(1) << 40)) {
      out.warnings.push_back("volume group " + vg.name + " has a bad extent size");
      continue;
    }
    uint64_t extent_bytes = uint64_t(extent_sectors) * 512;
    // pvN -> (device, first byte of extent 0)
    std::map<std::string, std::pair<disk::BlockDevice*, uint64_t>> pv_map;
    if (const LvmSection* pvsec = vg.section.section("physical_volumes")) {
      for (const auto& [pv_name, pv_section] : pvsec->sections) {
        std::string id = strip_dashes(pv_section.string("id").value_or(""));
        int64_t pe_start = pv_section.integer("pe_start").value_or(-1);
        for (const auto& pv : pvs) {
          if (pv.uuid == id && pe_start >= 0) pv_map[pv_name] = {pv.device, uint64_t(pe_start) * 512};
        }
      }
    }
    const LvmSection* lvsec = vg.section.section("logical_volumes");
    if (!lvsec) continue;
    for (const auto& [lv_name, lv] : lvsec->sections) {
      if (!has_flag(lv, "VISIBLE")) continue;
      LvmMappedVolume mapped;
      mapped.vg = vg.name;
      mapped.name = lv_name;
      mapped.read_only = !has_flag(lv, "WRITE");
      std::string problem;
      int64_t count = lv.integer("segment_count").value_or(0);
      struct Seg {
        uint64_t start;
        MappedSegment mapping;
      };
      std::vector<Seg> segs;
      for (int64_t i = 1; i <= count && i <= 100000 && problem.empty(); i++) {
        const LvmSection* seg = lv.section("segment" + std::to_string(i));
        if (!seg) {
          problem = "segment" + std::to_string(i) + " is missing";
          break;
        }
        std::string type = seg->string("type").value_or("");
        int64_t start = seg->integer("start_extent").value_or(-1);
        int64_t extents = seg->integer("extent_count").value_or(-1);
        int64_t stripes_count = seg->integer("stripe_count").value_or(0);
        if (type != "striped" || stripes_count != 1) {
          problem = "segment type " + type + (stripes_count > 1 ? " with several stripes" : "") + " is not supported";
          break;
        }
        const LvmValue* stripes = seg->find("stripes");
        if (start < 0 || extents <= 0 || !stripes || !std::holds_alternative<std::vector<LvmValue>>(stripes->value)) {
          problem = "segment " + std::to_string(i) + " is malformed";
          break;
        }
        const auto& list = std::get<std::vector<LvmValue>>(stripes->value);
        if (list.size() != 2 || !std::holds_alternative<std::string>(list[0].value) ||
            !std::holds_alternative<int64_t>(list[1].value) || std::get<int64_t>(list[1].value) < 0) {
          problem = "segment " + std::to_string(i) + " has malformed stripes";
          break;
        }
        auto pv_it = pv_map.find(std::get<std::string>(list[0].value));
        if (pv_it == pv_map.end()) {
          problem = "physical volume " + std::get<std::string>(list[0].value) + " is missing";
          break;
        }
        uint64_t pv_extent = uint64_t(std::get<int64_t>(list[1].value));
        if (uint64_t(extents) > (UINT64_MAX / extent_bytes) || pv_extent > (UINT64_MAX / extent_bytes) / 2) {
          problem = "segment is too large";
          break;
        }
        uint64_t offset = pv_it->second.second + pv_extent * extent_bytes;
        uint64_t length = uint64_t(extents) * extent_bytes;
        disk::BlockDevice* dev = pv_it->second.first;
        if (offset > dev->size() || length > dev->size() - offset) {
          problem = "a segment extends beyond its physical volume";
          break;
        }
        segs.push_back(Seg{uint64_t(start), MappedSegment{dev, offset, length}});
      }
      if (problem.empty()) {
        std::sort(segs.begin(), segs.end(), [](const Seg& a, const Seg& b) { return a.start < b.start; });
        uint64_t expected = 0;
        for (const auto& s : segs) {
          if (s.start != expected) {
            problem = "segments leave a gap or overlap";
            break;
          }
          expected += s.mapping.length / extent_bytes;
          mapped.segments.push_back(s.mapping);
        }
      }
      if (!problem.empty()) {
        out.warnings.push_back("logical volume " + vg.name + "/" + lv_name + ": " + problem);
        continue;
      }
      out.volumes.push_back(std::move(mapped));
    }
  }
  return out;
}

}  // namespace keel::guestfs
