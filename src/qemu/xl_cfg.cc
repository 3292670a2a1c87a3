#include "qemu/xl_cfg.h"

#include <map>
#include <set>
#include <variant>

#include <fmt/format.h>

namespace keel::qemu {

namespace {

// An xl.cfg value: a string, a number, or a list of strings.
struct XlValue {
  enum Kind { String, Number, List } kind = String;
  std::string text;  // String or Number's spelling
  std::vector<std::string> items;
};

class XlParser {
public:
  explicit XlParser(std::string_view s) : s_(s) {}

  Result<std::vector<std::pair<std::string, XlValue>>> parse() {
    std::vector<std::pair<std::string, XlValue>> out;
    for (;;) {
      skip_space_and_comments();
      if (pos_ >= s_.size()) break;
      std::string key;
      while (pos_ < s_.size() && (isalnum(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '_')) key += s_[pos_++];
      if (key.empty()) return fail_invalid("line {}: expected a key, found '{}'", line_, s_[pos_]);
      skip_blanks();
      if (pos_ >= s_.size() || s_[pos_] != '=') return fail_invalid("line {}: expected '=' after '{}'", line_, key);
      ++pos_;
      skip_blanks();
      XlValue v = TRY(value(key));
      skip_blanks();
      if (pos_ < s_.size() && s_[pos_] == ';') ++pos_;
      skip_blanks();
      if (pos_ < s_.size() && s_[pos_] == '#') skip_comment();
      if (pos_ < s_.size() && s_[pos_] != '\n') return fail_invalid("line {}: unexpected '{}' after the value of {}", line_, s_[pos_], key);
      out.emplace_back(key, std::move(v));
    }
    return out;
  }

private:
  void skip_blanks() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\r')) ++pos_;
  }
  void skip_comment() {
    while (pos_ < s_.size() && s_[pos_] != '\n') ++pos_;
  }
  void skip_space_and_comments() {
    for (;;) {
      skip_blanks();
      if (pos_ < s_.size() && s_[pos_] == '#') skip_comment();
      if (pos_ < s_.size() && (s_[pos_] == '\n' || s_[pos_] == ';')) {
        if (s_[pos_] == '\n') ++line_;
        ++pos_;
        continue;
      }
      return;
    }
  }
  Result<std::string> quoted() {
    char q = s_[pos_++];
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != q) {
      if (s_[pos_] == '\n') return fail_invalid("line {}: string not closed", line_);
      if (s_[pos_] == '\\' && pos_ + 1 < s_.size()) ++pos_;
      out += s_[pos_++];
    }
    if (pos_ >= s_.size()) return fail_invalid("line {}: string not closed", line_);
    ++pos_;
    return out;
  }
  Result<XlValue> value(const std::string& key) {
    XlValue v;
    if (pos_ >= s_.size()) return fail_invalid("line {}: {} has no value", line_, key);
    char c = s_[pos_];
    if (c == '"' || c == '\'') {
      v.text = TRY(quoted());
      return v;
    }
    if (c == '[') {
      ++pos_;
      v.kind = XlValue::List;
      for (;;) {
        skip_space_and_comments();
        if (pos_ >= s_.size()) return fail_invalid("line {}: list of {} not closed", line_, key);
        if (s_[pos_] == ']') {
          ++pos_;
          return v;
        }
        if (s_[pos_] == '"' || s_[pos_] == '\'') v.items.push_back(TRY(quoted()));
        else return fail_invalid("line {}: list items of {} must be quoted strings", line_, key);
        if (v.items.size() > 256) return fail_invalid("{}: too many items", key);
        skip_space_and_comments();
        if (pos_ < s_.size() && s_[pos_] == ',') ++pos_;
      }
    }
    v.kind = XlValue::Number;
    while (pos_ < s_.size() && (isalnum(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '.' || s_[pos_] == '-')) v.text += s_[pos_++];
    if (v.text.empty()) return fail_invalid("line {}: {} has no value", line_, key);
    return v;
  }

  std::string_view s_;
  size_t pos_ = 0;
  int line_ = 1;
};

// "k=v,k2=v2,positional" -> map (positional ones keyed by index "#0", "#1"...).
std::map<std::string, std::string> spec_items(const std::string& spec) {
  std::map<std::string, std::string> out;
  int positional = 0;
  size_t i = 0;
  while (i <= spec.size()) {
    size_t j = spec.find(',', i);
    if (j == std::string::npos) j = spec.size();
    std::string item = spec.substr(i, j - i);
    while (!item.empty() && item.front() == ' ') item.erase(0, 1);
    while (!item.empty() && item.back() == ' ') item.pop_back();
    if (!item.empty()) {
      auto eq = item.find('=');
      if (eq == std::string::npos) out["#" + std::to_string(positional++)] = item;
      else out[item.substr(0, eq)] = item.substr(eq + 1);
    }
    i = j + 1;
  }
  return out;
}

Result<int64_t> number(const std::string& key, const XlValue& v) {
  if (v.kind != XlValue::Number || v.text.empty() || v.text.size() > 12 ||
      v.text.find_first_not_of("0123456789") != std::string::npos)
    return fail_invalid("{}: '{}' is not a whole number", key, v.text);
  return std::stoll(v.text);
}

}  // namespace

Result<ImportResult> import_xl_cfg(std::string_view text) {
  XlParser p(text);
  auto entries = TRY(p.parse());
  ImportResult out;
  DomainDef& d = out.def;
  std::string extra, root;
  int64_t maxmem = 0;
  for (auto& [key, v] : entries) {
    auto str = [&, &key = key, &v = v]() -> Result<std::string> {
      if (v.kind == XlValue::List) return fail_invalid("{}: expected a string, got a list", key);
      return v.text;
    };
    if (key == "name") d.name = TRY(str());
    else if (key == "uuid") d.uuid = TRY(str());
    else if (key == "memory") {
      auto mib = TRY(number(key, v));
      if (mib < 16 || mib > (int64_t{16} << 20)) return fail_invalid("memory: {} MiB is impossible (16 MiB to 16 TiB)", mib);
      d.memory_bytes = static_cast<uint64_t>(mib) << 20;
    } else if (key == "maxmem") {
      maxmem = TRY(number(key, v));
    } else if (key == "vcpus") {
      auto n = TRY(number(key, v));
      if (n < 1 || n > 288) return fail_invalid("vcpus: {} is impossible (1 to 288)", n);
      d.vcpus = static_cast<unsigned>(n);
    } else if (key == "maxvcpus") {
      out.ignored.push_back("maxvcpus: vCPU hot-plug not supported, vcpus are all online");
    } else if (key == "kernel") d.boot.kernel = TRY(str());
    else if (key == "ramdisk") d.boot.initrd = TRY(str());
    else if (key == "cmdline") d.boot.cmdline = TRY(str());
    else if (key == "extra") extra = TRY(str());
    else if (key == "root") root = TRY(str());
    else if (key == "type" || key == "builder") {
      std::string t = TRY(str());
      if (t != "hvm" && t != "pvh") out.ignored.push_back(fmt::format("{}: '{}' guests run as HVM under QEMU", key, t));
    } else if (key == "disk") {
      if (v.kind != XlValue::List) return fail_invalid("disk: expected a list [ '...' ]");
      for (size_t i = 0; i < v.items.size(); ++i) {
        auto items = spec_items(v.items[i]);
        DiskDef disk;
        // Positional forms: target, format, vdev, access; or the classic target, vdev, access
        // ('phy:/dev/vg/x,xvda2,w') when the second one is not a format.
        static const std::set<std::string> formats{"raw", "qcow", "qcow2", "vhd", "qed", "aio"};
        if (items.count("#1") && !formats.count(items["#1"])) {
          if (items.count("#2")) items["#3"] = items["#2"];
          items["#2"] = items["#1"];
          items.erase("#1");
        }
        std::string target = items.count("target") ? items["target"] : items["#0"];
        std::string format = items.count("format") ? items["format"] : (items.count("#1") ? items["#1"] : "raw");
        std::string vdev = items.count("vdev") ? items["vdev"] : items["#2"];
        std::string access = items.count("access") ? items["access"] : items["#3"];
        std::string devtype = items.count("devtype") ? items["devtype"] : "";
        if (items.count("cdrom") || devtype == "cdrom" || vdev.find(":cdrom") != std::string::npos) {
          out.ignored.push_back(fmt::format("disk[{}]: CD-ROM not supported", i));
          continue;
        }
        if (target.rfind("phy:", 0) == 0) target = target.substr(4);
        else if (target.rfind("file:", 0) == 0) target = target.substr(5);
        else if (target.rfind("tap:", 0) == 0) {
          out.ignored.push_back(fmt::format("disk[{}]: blktap prefix dropped", i));
          target = target.substr(target.find(':', 4) + 1);
        }
        if (target.empty()) return fail_invalid("disk[{}]: no target", i);
        disk.path = target;
        if (format == "qcow2") disk.format = DiskFormat::Qcow2;
        else if (format == "raw" || format == "aio") disk.format = DiskFormat::Raw;
        else return fail_invalid("disk[{}]: format '{}' is not one of raw, qcow2", i, format);
        if (!vdev.empty()) {
          std::string id = vdev;
          if (id.rfind("xvd", 0) == 0) id = "vd" + id.substr(3);
          if (id.rfind("hd", 0) == 0 || id.rfind("sd", 0) == 0) id = "vd" + id.substr(2);
          if (!id.empty() && isalpha(static_cast<unsigned char>(id[0]))) disk.id = id;
        }
        disk.readonly = access == "r" || access == "ro" || access == "rdonly";
        d.disks.push_back(disk);
      }
    } else if (key == "vif") {
      if (v.kind != XlValue::List) return fail_invalid("vif: expected a list [ '...' ]");
      for (size_t i = 0; i < v.items.size(); ++i) {
        auto items = spec_items(v.items[i]);
        NicDef nic;
        if (items.count("mac")) {
          nic.mac = items["mac"];
          for (auto& c : nic.mac) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
        }
        if (items.count("bridge")) {
          nic.kind = NicKind::Bridge;
          nic.bridge = items["bridge"];
        } else {
          nic.kind = NicKind::Network;
          nic.network = "default";
        }
        if (items.count("model") && items["model"] != "virtio-net")
          out.ignored.push_back(fmt::format("vif[{}]: model={} becomes virtio", i, items["model"]));
        for (auto& [k, val] : items)
          if (k != "mac" && k != "bridge" && k != "model" && k != "type")
            out.ignored.push_back(fmt::format("vif[{}]: {}={} not supported", i, k, val));
        d.nics.push_back(nic);
      }
    } else if (key == "vnc" || key == "sdl" || key == "spice") {
      auto on = TRY(number(key, v));
      if (on && key == "vnc") d.graphics.kind = GraphicsKind::Vnc;
      else if (on && key == "spice") d.graphics.kind = GraphicsKind::Spice;
      else if (on) out.ignored.push_back(key + ": not supported");
    } else if (key == "vnclisten" || key == "spicehost") {
      d.graphics.listen = TRY(str());
    } else if (key == "vncdisplay") {
      d.graphics.port = 5900 + static_cast<int>(TRY(number(key, v)));
    } else if (key == "spiceport") {
      d.graphics.port = static_cast<int>(TRY(number(key, v)));
    } else if (key == "serial") {
      d.serial = true;
    } else if (key == "on_poweroff" || key == "on_reboot" || key == "on_crash") {
      out.ignored.push_back(fmt::format("{}: Keel stops on poweroff and restarts on reboot", key));
    } else if (key == "nestedhvm") {
      d.cpu.nested = TRY(number(key, v)) != 0;
    } else if (key == "cpuid" || key == "cpu_weight" || key == "cpus") {
      out.ignored.push_back(key + ": not supported");
    } else {
      out.ignored.push_back(key + ": not supported");
    }
  }
  if (maxmem && static_cast<uint64_t>(maxmem) << 20 != d.memory_bytes)
    out.ignored.push_back("maxmem: memory hot-plug/ballooning not supported, the guest gets `memory`");
  std::string cmdline = d.boot.cmdline;
  if (!root.empty()) cmdline = "root=" + root + (cmdline.empty() ? "" : " " + cmdline);
  if (!extra.empty()) cmdline += (cmdline.empty() ? "" : " ") + extra;
  d.boot.cmdline = cmdline;
  if (d.name.empty()) return fail_invalid("name: required");
  if (d.memory_bytes == 0) return fail_invalid("memory: required (MiB)");
  TRY(validate_domain(d));
  return out;
}

}  // namespace keel::qemu
