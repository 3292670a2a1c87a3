#include "qemu/domain_def.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <set>

#include <fmt/format.h>

#include "base/size.h"
#include "base/unique_fd.h"

namespace keel::qemu {

using nlohmann::json;

namespace {

// Smallest and largest guest memory we accept: QEMU cannot boot below 16 MiB, and nothing here
// can back more than 16 TiB.
constexpr uint64_t kMinMemory = 16ull << 20;
constexpr uint64_t kMaxMemory = 16ull << 40;
constexpr unsigned kMaxVcpus = 288;
constexpr size_t kMaxDevices = 32;

std::string type_name(const json& j) { return j.type_name(); }

// Reads one JSON object field by field and remembers which keys were read, so unknown keys can be
// reported by name.
class ObjectReader {
public:
  ObjectReader(const json& j, std::string path) : j_(j), path_(std::move(path)) {}

  Result<void> check_object() const {
    if (!j_.is_object())
      return fail_invalid("{}: expected an object, got {}", path_.empty() ? "domain" : path_, type_name(j_));
    return ok();
  }
  std::string field(std::string_view key) const {
    return path_.empty() ? std::string(key) : fmt::format("{}.{}", path_, key);
  }
  const json* get(std::string_view key) {
    known_.insert(std::string(key));
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  Result<std::optional<std::string>> string(std::string_view key) {
    const json* v = get(key);
    if (!v) return std::optional<std::string>();
    if (!v->is_string()) return fail_invalid("{}: expected a string, got {}", field(key), type_name(*v));
    return std::optional<std::string>(v->get<std::string>());
  }
  Result<std::optional<bool>> boolean(std::string_view key) {
    const json* v = get(key);
    if (!v) return std::optional<bool>();
    if (!v->is_boolean()) return fail_invalid("{}: expected true or false, got {}", field(key), type_name(*v));
    return std::optional<bool>(v->get<bool>());
  }
  Result<std::optional<int64_t>> integer(std::string_view key) {
    const json* v = get(key);
    if (!v) return std::optional<int64_t>();
    if (!v->is_number_integer())
      return fail_invalid("{}: expected an integer, got {}", field(key), type_name(*v));
    return std::optional<int64_t>(v->get<int64_t>());
  }
  // Every key present must have been read.
  Result<void> finish() const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (!known_.count(it.key())) {
        std::string allowed;
        for (auto& k : known_) allowed += (allowed.empty() ? "" : ", ") + k;
        return fail_invalid("{}: unknown field (allowed here: {})", field(it.key()), allowed);
      }
    }
    return ok();
  }

private:
  const json& j_;
  std::string path_;
  std::set<std::string> known_;
};

template <typename E, size_t N>
Result<E> parse_enum(const std::string& field, const std::string& value,
                     const std::array<std::pair<std::string_view, E>, N>& table) {
  for (auto& [name, e] : table)
    if (name == value) return e;
  std::string allowed;
  for (auto& [name, e] : table) allowed += (allowed.empty() ? "" : ", ") + std::string(name);
  return fail_invalid("{}: '{}' is not one of {}", field, value, allowed);
}

constexpr std::array<std::pair<std::string_view, CpuMode>, 3> kCpuModes{{
    {"host-passthrough", CpuMode::HostPassthrough},
    {"host-model", CpuMode::HostModel},
    {"custom", CpuMode::Custom},
}};
constexpr std::array<std::pair<std::string_view, DiskCache>, 5> kCaches{{
    {"none", DiskCache::None},
    {"writeback", DiskCache::Writeback},
    {"writethrough", DiskCache::Writethrough},
    {"directsync", DiskCache::Directsync},
    {"unsafe", DiskCache::Unsafe},
}};
constexpr std::array<std::pair<std::string_view, DiskFormat>, 2> kFormats{{
    {"raw", DiskFormat::Raw},
    {"qcow2", DiskFormat::Qcow2},
}};
constexpr std::array<std::pair<std::string_view, NicKind>, 3> kNicKinds{{
    {"user", NicKind::User},
    {"network", NicKind::Network},
    {"bridge", NicKind::Bridge},
}};
constexpr std::array<std::pair<std::string_view, GraphicsKind>, 3> kGraphics{{
    {"none", GraphicsKind::None},
    {"vnc", GraphicsKind::Vnc},
    {"spice", GraphicsKind::Spice},
}};

template <typename E, size_t N>
std::string_view enum_name(E e, const std::array<std::pair<std::string_view, E>, N>& table) {
  for (auto& [name, v] : table)
    if (v == e) return name;
  return "?";
}

Result<uint64_t> parse_memory(const std::string& field, const json& v) {
  uint64_t bytes = 0;
  if (v.is_number_unsigned() || v.is_number_integer()) {
    // A bare number is MiB, as in libvirt's and xl's most common usage.
    int64_t mib = v.get<int64_t>();
    if (mib <= 0 || static_cast<uint64_t>(mib) > (kMaxMemory >> 20))
      return fail_invalid("{}: {} MiB is impossible (allowed: 16 MiB to 16 TiB)", field, mib);
    bytes = static_cast<uint64_t>(mib) << 20;
  } else if (v.is_string()) {
    auto parsed = parse_size(v.get<std::string>());
    if (!parsed)
      return fail_invalid("{}: '{}' is not a size (write e.g. \"256M\" or \"2G\")", field, v.get<std::string>());
    bytes = *parsed;
  } else {
    return fail_invalid("{}: expected a size such as \"256M\" or a number of MiB, got {}", field, type_name(v));
  }
  if (bytes < kMinMemory || bytes > kMaxMemory)
    return fail_invalid("{}: {} is impossible (allowed: 16 MiB to 16 TiB)", field, format_size(bytes));
  if (bytes % (1 << 20) != 0) return fail_invalid("{}: must be a whole number of MiB", field);
  return bytes;
}

bool valid_mac(std::string_view mac) {
  if (mac.size() != 17) return false;
  for (size_t i = 0; i < 17; ++i) {
    if (i % 3 == 2) {
      if (mac[i] != ':') return false;
    } else if (!isxdigit(static_cast<unsigned char>(mac[i]))) {
      return false;
    }
  }
  // Unicast only: the low bit of the first octet is the multicast bit.
  int first = std::stoi(std::string(mac.substr(0, 2)), nullptr, 16);
  return (first & 1) == 0;
}

bool valid_device_id(std::string_view id) {
  if (id.empty() || id.size() > 32 || !isalpha(static_cast<unsigned char>(id[0]))) return false;
  for (char c : id)
    if (!isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
  return true;
}

Result<DiskDef> parse_disk(const json& j, const std::string& path) {
  ObjectReader r(j, path);
  TRY(r.check_object());
  DiskDef d;
  if (auto v = TRY(r.string("id"))) d.id = *v;
  if (auto v = TRY(r.string("path"))) d.path = *v;
  if (auto v = TRY(r.string("volume"))) d.volume = *v;
  if (auto v = TRY(r.string("format"))) d.format = TRY(parse_enum(r.field("format"), *v, kFormats));
  if (auto v = TRY(r.string("cache"))) d.cache = TRY(parse_enum(r.field("cache"), *v, kCaches));
  if (auto v = TRY(r.boolean("readonly"))) d.readonly = *v;
  TRY(r.finish());
  if (d.path.empty() == d.volume.empty())
    return fail_invalid("{}: give exactly one of \"path\" (an image file) or \"volume\" (\"pool/volume\")", path);
  return d;
}

Result<NicDef> parse_nic(const json& j, const std::string& path) {
  ObjectReader r(j, path);
  TRY(r.check_object());
  NicDef n;
  if (auto v = TRY(r.string("id"))) n.id = *v;
  if (auto v = TRY(r.string("type"))) n.kind = TRY(parse_enum(r.field("type"), *v, kNicKinds));
  if (auto v = TRY(r.string("network"))) n.network = *v;
  if (auto v = TRY(r.string("bridge"))) n.bridge = *v;
  if (auto v = TRY(r.string("mac"))) n.mac = *v;
  // "model" is accepted for libvirt familiarity; only virtio exists.
  if (auto v = TRY(r.string("model")); v && *v != "virtio")
    return fail_invalid("{}: '{}' is not supported (allowed: virtio)", r.field("model"), *v);
  TRY(r.finish());
  if (!n.network.empty() && n.kind == NicKind::User) n.kind = NicKind::Network;
  if (n.kind == NicKind::Network && n.network.empty()) n.network = "default";
  if (n.kind == NicKind::Bridge && n.bridge.empty())
    return fail_invalid("{}.bridge: required when type is \"bridge\"", path);
  return n;
}

}  // namespace

std::string_view to_string(CpuMode m) { return enum_name(m, kCpuModes); }
std::string_view to_string(DiskCache c) { return enum_name(c, kCaches); }
std::string_view to_string(DiskFormat f) { return enum_name(f, kFormats); }
std::string_view to_string(NicKind k) { return enum_name(k, kNicKinds); }
std::string_view to_string(GraphicsKind k) { return enum_name(k, kGraphics); }

Result<void> validate_name(std::string_view what, std::string_view name) {
  if (name.empty() || name.size() > 64)
    return fail_invalid("{}: must be 1 to 64 characters, got {}", what, name.size());
  if (name[0] == '.' || name[0] == '-') return fail_invalid("{}: '{}' may not start with '.' or '-'", what, name);
  for (char c : name) {
    if (!isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.')
      return fail_invalid("{}: '{}' has a character outside [A-Za-z0-9_.-]", what, name);
  }
  return ok();
}

Result<DomainDef> domain_from_json(const json& j) {
  ObjectReader r(j, "");
  TRY(r.check_object());
  DomainDef d;
  if (auto v = TRY(r.string("name"))) d.name = *v;
  else return fail_invalid("name: required");
  if (auto v = TRY(r.string("uuid"))) d.uuid = *v;
  if (const json* m = r.get("memory")) d.memory_bytes = TRY(parse_memory("memory", *m));
  else return fail_invalid("memory: required (e.g. \"256M\")");
  if (auto v = TRY(r.integer("vcpus"))) {
    if (*v < 1 || *v > kMaxVcpus) return fail_invalid("vcpus: {} is impossible (allowed: 1 to {})", *v, kMaxVcpus);
    d.vcpus = static_cast<unsigned>(*v);
  }
  if (auto v = TRY(r.string("machine"))) d.machine = *v;
  if (const json* c = r.get("cpu")) {
    ObjectReader cr(*c, "cpu");
    TRY(cr.check_object());
    if (auto v = TRY(cr.string("mode"))) d.cpu.mode = TRY(parse_enum(std::string("cpu.mode"), *v, kCpuModes));
    if (auto v = TRY(cr.string("model"))) d.cpu.model = *v;
    if (auto v = TRY(cr.boolean("nested"))) d.cpu.nested = *v;
    TRY(cr.finish());
  }
  if (auto v = TRY(r.boolean("hugepages"))) d.hugepages = *v;
  if (auto v = TRY(r.boolean("ksm"))) d.ksm = *v;
  if (const json* b = r.get("boot")) {
    ObjectReader br(*b, "boot");
    TRY(br.check_object());
    if (auto v = TRY(br.string("kernel"))) d.boot.kernel = *v;
    if (auto v = TRY(br.string("initrd"))) d.boot.initrd = *v;
    if (auto v = TRY(br.string("cmdline"))) d.boot.cmdline = *v;
    if (auto v = TRY(br.string("firmware"))) {
      if (*v != "bios" && *v != "qboot")
        return fail_invalid("boot.firmware: '{}' is not one of bios, qboot", *v);
      d.boot.firmware = *v;
    }
    TRY(br.finish());
  }
  if (const json* disks = r.get("disks")) {
    if (!disks->is_array()) return fail_invalid("disks: expected an array, got {}", type_name(*disks));
    if (disks->size() > kMaxDevices) return fail_invalid("disks: at most {} disks", kMaxDevices);
    for (size_t i = 0; i < disks->size(); ++i)
      d.disks.push_back(TRY(parse_disk((*disks)[i], fmt::format("disks[{}]", i))));
  }
  if (const json* nics = r.get("nics")) {
    if (!nics->is_array()) return fail_invalid("nics: expected an array, got {}", type_name(*nics));
    if (nics->size() > kMaxDevices) return fail_invalid("nics: at most {} NICs", kMaxDevices);
    for (size_t i = 0; i < nics->size(); ++i)
      d.nics.push_back(TRY(parse_nic((*nics)[i], fmt::format("nics[{}]", i))));
  }
  if (auto v = TRY(r.boolean("serial"))) d.serial = *v;
  if (const json* g = r.get("graphics")) {
    ObjectReader gr(*g, "graphics");
    TRY(gr.check_object());
    if (auto v = TRY(gr.string("type"))) d.graphics.kind = TRY(parse_enum(std::string("graphics.type"), *v, kGraphics));
    if (auto v = TRY(gr.string("listen"))) d.graphics.listen = *v;
    if (auto v = TRY(gr.integer("port"))) {
      if (*v != -1 && (*v < 5900 || *v > 65535))
        return fail_invalid("graphics.port: {} is not allowed (-1 for automatic, or 5900 to 65535)", *v);
      d.graphics.port = static_cast<int>(*v);
    }
    TRY(gr.finish());
  }
  if (auto v = TRY(r.boolean("rng"))) d.rng = *v;
  if (auto v = TRY(r.boolean("balloon"))) d.balloon = *v;
  TRY(r.finish());
  TRY(validate_domain(d));
  return d;
}

Result<DomainDef> parse_domain_json(std::string_view text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again with exceptions only to get the position for the message.
    try {
      json again = json::parse(text);
      (void)again;
    } catch (const json::exception& e) {
      return fail_invalid("malformed JSON: {}", e.what());
    }
    return fail_invalid("malformed JSON");
  }
  return domain_from_json(j);
}

Result<void> validate_domain(const DomainDef& d) {
  TRY(validate_name("name", d.name));
  if (!d.uuid.empty()) {
    bool good = d.uuid.size() == 36;
    for (size_t i = 0; good && i < 36; ++i)
      good = (i == 8 || i == 13 || i == 18 || i == 23) ? d.uuid[i] == '-' : isxdigit(static_cast<unsigned char>(d.uuid[i]));
    if (!good) return fail_invalid("uuid: '{}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", d.uuid);
  }
  if (d.memory_bytes < kMinMemory || d.memory_bytes > kMaxMemory)
    return fail_invalid("memory: {} is impossible (allowed: 16 MiB to 16 TiB)", format_size(d.memory_bytes));
  if (d.vcpus < 1 || d.vcpus > kMaxVcpus) return fail_invalid("vcpus: {} is impossible (allowed: 1 to {})", d.vcpus, kMaxVcpus);
  for (char c : d.machine)
    if (!isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_')
      return fail_invalid("machine: '{}' is not a machine type name", d.machine);
  if (d.machine.empty()) return fail_invalid("machine: must not be empty");
  for (char c : d.cpu.model)
    if (!isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_')
      return fail_invalid("cpu.model: '{}' is not a CPU model name", d.cpu.model);
  // Paths go into QEMU option strings, where ',' is an escape: keep them simple.
  auto check_path = [](const std::string& field, const std::string& p) -> Result<void> {
    if (p.empty()) return ok();
    if (p[0] != '/') return fail_invalid("{}: '{}' must be an absolute path", field, p);
    if (p.find(',') != std::string::npos || p.find('\n') != std::string::npos)
      return fail_invalid("{}: '{}' may not contain ',' or newlines", field, p);
    return ok();
  };
  TRY(check_path("boot.kernel", d.boot.kernel));
  TRY(check_path("boot.initrd", d.boot.initrd));
  if (!d.boot.initrd.empty() && d.boot.kernel.empty()) return fail_invalid("boot.initrd: needs boot.kernel");
  if (!d.boot.cmdline.empty() && d.boot.kernel.empty()) return fail_invalid("boot.cmdline: needs boot.kernel");
  if (d.boot.cmdline.size() > 4096) return fail_invalid("boot.cmdline: longer than 4096 bytes");
  std::set<std::string> ids;
  std::set<std::string> macs;
  for (size_t i = 0; i < d.disks.size(); ++i) {
    auto& disk = d.disks[i];
    std::string f = fmt::format("disks[{}]", i);
    TRY(check_path(f + ".path", disk.path));
    if (!disk.volume.empty()) {
      auto slash = disk.volume.find('/');
      if (slash == std::string::npos) return fail_invalid("{}.volume: '{}' must be \"pool/volume\"", f, disk.volume);
      TRY(validate_name(f + ".volume", disk.volume.substr(0, slash)));
      TRY(validate_name(f + ".volume", disk.volume.substr(slash + 1)));
    }
    if (!disk.id.empty()) {
      if (!valid_device_id(disk.id)) return fail_invalid("{}.id: '{}' must be a letter then [A-Za-z0-9_-], at most 32", f, disk.id);
      if (!ids.insert(disk.id).second) return fail_invalid("{}.id: '{}' is used twice", f, disk.id);
    }
  }
  for (size_t i = 0; i < d.nics.size(); ++i) {
    auto& nic = d.nics[i];
    std::string f = fmt::format("nics[{}]", i);
    if (!nic.id.empty()) {
      if (!valid_device_id(nic.id)) return fail_invalid("{}.id: '{}' must be a letter then [A-Za-z0-9_-], at most 32", f, nic.id);
      if (!ids.insert(nic.id).second) return fail_invalid("{}.id: '{}' is used twice", f, nic.id);
    }
    if (!nic.mac.empty()) {
      if (!valid_mac(nic.mac)) return fail_invalid("{}.mac: '{}' is not a unicast MAC address (aa:bb:cc:dd:ee:ff)", f, nic.mac);
      if (!macs.insert(nic.mac).second) return fail_invalid("{}.mac: '{}' is used twice", f, nic.mac);
    }
    if (nic.kind == NicKind::Network) TRY(validate_name(f + ".network", nic.network));
    if (!nic.bridge.empty()) TRY(validate_name(f + ".bridge", nic.bridge));
  }
  if (d.graphics.listen.find(',') != std::string::npos)
    return fail_invalid("graphics.listen: '{}' is not an address", d.graphics.listen);
  return ok();
}

json domain_to_json(const DomainDef& d) {
  json j;
  j["name"] = d.name;
  if (!d.uuid.empty()) j["uuid"] = d.uuid;
  j["memory"] = fmt::format("{}M", d.memory_bytes >> 20);
  j["vcpus"] = d.vcpus;
  j["machine"] = d.machine;
  j["cpu"] = {{"mode", to_string(d.cpu.mode)}};
  if (d.cpu.mode == CpuMode::Custom) j["cpu"]["model"] = d.cpu.model;
  if (d.cpu.nested) j["cpu"]["nested"] = true;
  if (d.hugepages) j["hugepages"] = true;
  if (!d.ksm) j["ksm"] = false;
  if (!d.boot.kernel.empty() || d.boot.firmware != "bios") {
    json b = json::object();
    if (!d.boot.kernel.empty()) b["kernel"] = d.boot.kernel;
    if (!d.boot.initrd.empty()) b["initrd"] = d.boot.initrd;
    if (!d.boot.cmdline.empty()) b["cmdline"] = d.boot.cmdline;
    if (d.boot.firmware != "bios") b["firmware"] = d.boot.firmware;
    j["boot"] = b;
  }
  j["disks"] = json::array();
  for (auto& disk : d.disks) {
    json dj;
    if (!disk.id.empty()) dj["id"] = disk.id;
    if (!disk.path.empty()) dj["path"] = disk.path;
    if (!disk.volume.empty()) dj["volume"] = disk.volume;
    dj["format"] = to_string(disk.format);
    dj["cache"] = to_string(disk.cache);
    if (disk.readonly) dj["readonly"] = true;
    j["disks"].push_back(dj);
  }
  j["nics"] = json::array();
  for (auto& nic : d.nics) {
    json nj;
    if (!nic.id.empty()) nj["id"] = nic.id;
    nj["type"] = to_string(nic.kind);
    if (nic.kind == NicKind::Network) nj["network"] = nic.network;
    if (nic.kind == NicKind::Bridge) nj["bridge"] = nic.bridge;
    if (!nic.mac.empty()) nj["mac"] = nic.mac;
    j["nics"].push_back(nj);
  }
  if (!d.serial) j["serial"] = false;
  if (d.graphics.kind != GraphicsKind::None) {
    j["graphics"] = {{"type", to_string(d.graphics.kind)}, {"listen", d.graphics.listen}};
    if (d.graphics.port != -1) j["graphics"]["port"] = d.graphics.port;
  }
  if (d.rng) j["rng"] = true;
  if (d.balloon) j["balloon"] = true;
  return j;
}

namespace {
void random_bytes(uint8_t* out, size_t n) {
  auto fd = UniqueFd::open("/dev/urandom", O_RDONLY);
  if (!fd || !read_full(fd->get(), out, n)) {
    // /dev/urandom always exists on Linux; if it does not, the host is broken.
    KEEL_CHECK(false && "cannot read /dev/urandom");
  }
}
}  // namespace

std::string generate_uuid() {
  uint8_t b[16];
  random_bytes(b, sizeof b);
  b[6] = (b[6] & 0x0f) | 0x40;  // version 4
  b[8] = (b[8] & 0x3f) | 0x80;  // RFC 4122 variant
  return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                     b[14], b[15]);
}

std::string generate_mac() {
  uint8_t b[3];
  random_bytes(b, sizeof b);
  return fmt::format("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]);
}

void assign_defaults(DomainDef& d) {
  if (d.uuid.empty()) d.uuid = generate_uuid();
  std::set<std::string> ids;
  for (auto& disk : d.disks) ids.insert(disk.id);
  for (auto& nic : d.nics) ids.insert(nic.id);
  auto next_id = [&](const std::string& prefix, int& counter) {
    std::string id;
    do {
      if (prefix == "vd" && counter < 26) id = fmt::format("vd{}", static_cast<char>('a' + counter));
      else id = fmt::format("{}{}", prefix == "vd" ? "disk" : prefix, counter);
      ++counter;
    } while (ids.count(id));
    ids.insert(id);
    return id;
  };
  int disk_counter = 0, nic_counter = 0;
  for (auto& disk : d.disks)
    if (disk.id.empty()) disk.id = next_id("vd", disk_counter);
  for (auto& nic : d.nics) {
    if (nic.id.empty()) nic.id = next_id("net", nic_counter);
    if (nic.mac.empty()) nic.mac = generate_mac();
  }
}

}  // namespace keel::qemu
