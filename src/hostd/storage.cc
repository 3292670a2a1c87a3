#include "hostd/storage.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <fmt/format.h>

#include <chrono>

#include "base/process.h"
#include "base/unique_fd.h"
#include "disk/image.h"
#include "hostd/event_bus.h"
#include "qemu/domain_def.h"

namespace keel::hostd {

using nlohmann::json;

namespace {

class QemuImgBackend : public VolumeBackend {
public:
  std::string name() const override { return "qemu-img"; }
  Result<void> create(const std::string& path, const std::string& format, uint64_t size) override {
    return run({"qemu-img", "create", "-q", "-f", format, path, std::to_string(size)});
  }
  Result<void> create_overlay(const std::string& path, const std::string& backing,
                              const std::string& backing_format) override {
    return run({"qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_format, path});
  }
  // qemu-img reports no progress we read: the caller hears only the start and the end.
  Result<void> copy(const std::string& from, const std::string& to, const std::string& format,
                    const VolumeProgress& progress) override {
    auto info = TRY(this->info(from, format));
    if (progress) progress(0, info.capacity);
    TRY(run({"qemu-img", "convert", "-q", "-f", format, "-O", format, from, to}));
    if (progress) progress(info.capacity, info.capacity);
    return ok();
  }
  Result<void> resize(const std::string& path, const std::string& format, uint64_t size,
                      ShrinkPolicy shrink) override {
    std::vector<std::string> argv = {"qemu-img", "resize", "-q", "-f", format};
    if (shrink == ShrinkPolicy::Allow) argv.push_back("--shrink");
    argv.push_back(path);
    argv.push_back(std::to_string(size));
    return run(argv);
  }
  Result<VolumeInfo> info(const std::string& path, const std::string& format) override {
    std::vector<std::string> argv = {"qemu-img", "info", "--output=json", "-U"};
    if (!format.empty()) argv.insert(argv.end(), {"-f", format});
    argv.push_back(path);
    auto out = TRY(run_command(argv));
    if (out.exit_code != 0) return fail(EIO, fmt::format("qemu-img info {}: {}", path, out.err));
    json j = json::parse(out.out, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return fail(EIO, "qemu-img info: unreadable output");
    VolumeInfo v;
    v.format = j.value("format", "");
    v.capacity = j.value("virtual-size", uint64_t{0});
    v.allocation = j.value("actual-size", uint64_t{0});
    v.backing = j.value("backing-filename", "");
    return v;
  }

private:
  static Result<void> run(const std::vector<std::string>& argv) {
    auto out = TRY(run_command(argv));
    if (out.exit_code != 0) {
      std::string err = out.err;
      while (!err.empty() && err.back() == '\n') err.pop_back();
      return fail(EIO, fmt::format("{} {}: {}", argv[0], argv[1], err));
    }
    return ok();
  }
};

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

}  // namespace

std::unique_ptr<VolumeBackend> make_qemu_img_backend() { return std::make_unique<QemuImgBackend>(); }

Result<std::unique_ptr<VolumeBackend>> make_volume_backend(const std::string& name) {
  if (name == "keel-disk") return make_disk_library_backend();
  if (name == "qemu-img") return make_qemu_img_backend();
  return fail_invalid("volume backend: '{}' is not one of keel-disk, qemu-img", name);
}

VolumeProgress StoragePools::progress_reporter(const std::string& operation, const std::string& pool_name,
                                               const std::string& vol) {
  if (!events_) return {};
  using Clock = std::chrono::steady_clock;
  auto last = std::make_shared<Clock::time_point>();
  return [this, operation, pool_name, vol, last](uint64_t done, uint64_t total) {
    auto now = Clock::now();
    bool edge = done == 0 || done >= total;
    if (!edge && now - *last < std::chrono::milliseconds(250)) return;
    *last = now;
    events_->publish("job", "", operation,
                     {{"pool", pool_name}, {"volume", vol}, {"done", done}, {"total", total},
                      {"percent", total ? static_cast<int>(done * 100 / total) : 100}});
  };
}

StoragePools::StoragePools(StateStore& store, std::unique_ptr<VolumeBackend> backend)
    : store_(store), backend_(std::move(backend)) {}

Result<void> StoragePools::ensure_default(const std::string& dir) {
  auto pools = TRY(store_.list_pools());
  for (auto& p : pools)
    if (p.name == "default") return ok();
  if (::mkdir(dir.c_str(), 0711) < 0 && errno != EEXIST) return fail_errno("mkdir " + dir);
  return store_.insert_pool(PoolRecord{"default", dir, "dir"});
}

Result<PoolRecord> StoragePools::pool(const std::string& name) {
  auto pools = TRY(store_.list_pools());
  for (auto& p : pools)
    if (p.name == name) return p;
  return fail(ENOENT, fmt::format("pool '{}' not found", name));
}

Result<json> StoragePools::list_pools() {
  json out = json::array();
  for (auto& p : TRY(store_.list_pools())) {
    json j = {{"name", p.name}, {"type", p.type}, {"path", p.path}};
    struct statvfs vfs;
    if (::statvfs(p.path.c_str(), &vfs) == 0) {
      j["capacity"] = static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize;
      j["available"] = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      j["state"] = "active";
    } else {
      j["state"] = "inaccessible";
    }
    out.push_back(j);
  }
  return out;
}

Result<void> StoragePools::define_pool(const std::string& name, const std::string& path) {
  TRY(qemu::validate_name("name", name));
  if (path.empty() || path[0] != '/') return fail_invalid("path: '{}' must be an absolute path", path);
  struct stat st;
  if (::stat(path.c_str(), &st) < 0) {
    if (::mkdir(path.c_str(), 0711) < 0) return fail(Error::from_errno("path: mkdir " + path));
  } else if (!S_ISDIR(st.st_mode)) {
    return fail_invalid("path: '{}' is not a directory", path);
  }
  auto r = store_.insert_pool(PoolRecord{name, path, "dir"});
  if (!r && r.error().code() == EEXIST) return fail(EEXIST, fmt::format("pool '{}' (or one at {}) already exists", name, path));
  return r;
}

Result<void> StoragePools::undefine_pool(const std::string& name) {
  TRY(pool(name));
  return store_.delete_pool(name);
}

Result<std::string> StoragePools::volume_path(const std::string& pool_name, const std::string& vol, bool must_exist) {
  TRY(qemu::validate_name("volume", vol));
  auto p = TRY(pool(pool_name));
  std::string path = p.path + "/" + vol;
  if (must_exist && !exists(path)) return fail(ENOENT, fmt::format("volume '{}' not found in pool '{}'", vol, pool_name));
  if (!must_exist && exists(path)) return fail(EEXIST, fmt::format("volume '{}' already exists in pool '{}'", vol, pool_name));
  return path;
}

Result<json> StoragePools::list_volumes(const std::string& pool_name) {
  auto p = TRY(pool(pool_name));
  DIR* d = ::opendir(p.path.c_str());
  if (!d) return fail(Error::from_errno("open pool directory " + p.path));
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    if (qemu::validate_name("volume", n)) names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  json out = json::array();
  for (auto& n : names) {
    std::string path = p.path + "/" + n;
    struct stat st;
    if (::stat(path.c_str(), &st) < 0 || !S_ISREG(st.st_mode)) continue;
    json j = {{"name", n}, {"path", path}, {"allocation", static_cast<uint64_t>(st.st_blocks) * 512}};
    out.push_back(j);
  }
  return out;
}

Result<std::string> StoragePools::recorded_format(const std::string& pool_name, const std::string& vol) {
  auto format = TRY(store_.volume_format(pool_name, vol));
  return format ? *format : std::string();
}

Result<VolumeInfo> StoragePools::describe(const std::string& pool_name, const std::string& vol, const std::string& path) {
  return backend_->info(path, TRY(recorded_format(pool_name, vol)));
}

Result<json> StoragePools::volume_info(const std::string& pool_name, const std::string& vol) {
  auto path = TRY(volume_path(pool_name, vol, true));
  auto info = TRY(describe(pool_name, vol, path));
  json j = {{"name", vol}, {"pool", pool_name}, {"path", path}, {"format", info.format},
            {"capacity", info.capacity}, {"allocation", info.allocation}};
  if (!info.backing.empty()) j["backing"] = info.backing;
  return j;
}

Result<void> StoragePools::create_volume(const std::string& pool_name, const std::string& vol, const std::string& format,
                                         uint64_t size) {
  if (format != "qcow2" && format != "raw") return fail_invalid("format: '{}' is not one of qcow2, raw", format);
  if (size == 0) return fail_invalid("capacity: must be more than 0");
  if (size > (uint64_t{64} << 40)) return fail_invalid("capacity: larger than 64 TiB");
  auto path = TRY(volume_path(pool_name, vol, false));
  auto r = backend_->create(path, format, size);
  if (r) r = store_.set_volume_format(pool_name, vol, format);
  if (!r) ::unlink(path.c_str());
  return r;
}

Result<void> StoragePools::clone_volume(const std::string& pool_name, const std::string& from, const std::string& to,
                                        const std::string& mode) {
  auto src = TRY(volume_path(pool_name, from, true));
  auto dst = TRY(volume_path(pool_name, to, false));
  auto info = TRY(describe(pool_name, from, src));
  Result<void> r;
  std::string format = info.format;
  if (mode == "overlay") {
    r = backend_->create_overlay(dst, src, info.format);
    format = "qcow2";
  } else if (mode == "copy") {
    r = backend_->copy(src, dst, info.format, progress_reporter("volume-copy", pool_name, to));
  } else {
    return fail_invalid("mode: '{}' is not one of overlay, copy", mode);
  }
  if (r) r = store_.set_volume_format(pool_name, to, format);
  if (!r) ::unlink(dst.c_str());
  return r;
}

Result<void> StoragePools::resize_volume(const std::string& pool_name, const std::string& vol, uint64_t size,
                                         ShrinkPolicy shrink) {
  auto path = TRY(volume_path(pool_name, vol, true));
  if (size == 0) return fail_invalid("capacity: must be more than 0");
  if (size > (uint64_t{64} << 40)) return fail_invalid("capacity: larger than 64 TiB");
  // Refused here, not only in the backends, so both say it the same way (a 400, not qemu-img's words).
  auto info = TRY(describe(pool_name, vol, path));
  if (size < info.capacity && shrink == ShrinkPolicy::Refuse)
    return fail_invalid("capacity: {} is smaller than volume '{}' ({} bytes); shrinking loses data: pass "
                        "\"shrink\": true to do it anyway",
                        size, vol, info.capacity);
  return backend_->resize(path, info.format, size, shrink);
}

Result<void> StoragePools::delete_volume(const std::string& pool_name, const std::string& vol) {
  auto path = TRY(volume_path(pool_name, vol, true));
  if (::unlink(path.c_str()) < 0) return fail_errno("delete " + path);
  return store_.forget_volume(pool_name, vol);
}

// An upload replaces the whole file with bytes the user chose (a qcow2 file uploads as a qcow2 volume),
// so its format is probed once, here, and recorded; afterwards the guest's writes never change it.
Result<void> StoragePools::record_uploaded_format(const std::string& pool_name, const std::string& vol,
                                                  const std::string& path) {
  auto format = TRY(disk::probe_format(path));  // by magic only: a damaged upload is reported when used
  return store_.set_volume_format(pool_name, vol, disk::format_name(format));
}

Result<void> StoragePools::upload(const std::string& pool_name, const std::string& vol, std::string_view data) {
  auto path = TRY(volume_path(pool_name, vol, true));
  // Write beside and rename, so a failed upload leaves the old volume whole.
  std::string tmp = path + ".upload";
  {
    auto fd = TRY(UniqueFd::open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644));
    auto w = write_all(fd.get(), data.data(), data.size());
    if (!w || ::fsync(fd.get()) < 0) {
      ::unlink(tmp.c_str());
      return w ? fail_errno("fsync " + tmp) : fail(w.error());
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) < 0) return fail_errno("rename " + tmp);
  return record_uploaded_format(pool_name, vol, path);
}

Result<void> StoragePools::upload_from(const std::string& pool_name, const std::string& vol, uint64_t size,
                                       const std::function<Result<size_t>(char*, size_t)>& read) {
  auto path = TRY(volume_path(pool_name, vol, true));
  std::string tmp = path + ".upload";
  auto fd = TRY(UniqueFd::open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644));
  auto fail_tmp = [&](Error e) -> Result<void> {
    ::unlink(tmp.c_str());
    return fail(std::move(e));
  };
  std::vector<char> buf(1 << 20);
  uint64_t done = 0;
  auto progress = progress_reporter("volume-upload", pool_name, vol);
  if (progress) progress(0, size);
  while (done < size) {
    auto n = read(buf.data(), static_cast<size_t>(std::min<uint64_t>(buf.size(), size - done)));
    if (!n) return fail_tmp(n.error());
    if (*n == 0) return fail_tmp(Error::invalid(fmt::format("upload ended after {} of {} bytes", done, size)));
    if (auto w = write_all(fd.get(), buf.data(), *n); !w) return fail_tmp(w.error());
    done += *n;
    if (progress && done < size) progress(done, size);
  }
  if (::fsync(fd.get()) < 0) return fail_tmp(Error::from_errno("fsync " + tmp));
  if (::rename(tmp.c_str(), path.c_str()) < 0) return fail_tmp(Error::from_errno("rename " + tmp));
  TRY(record_uploaded_format(pool_name, vol, path));
  if (progress) progress(size, size);
  return ok();
}

Result<std::string> StoragePools::data_path(const std::string& pool_name, const std::string& vol) {
  return volume_path(pool_name, vol, true);
}

Result<std::string> StoragePools::download(const std::string& pool_name, const std::string& vol) {
  auto path = TRY(volume_path(pool_name, vol, true));
  return read_file(path);
}

Result<std::pair<std::string, std::string>> StoragePools::resolve(const std::string& spec) {
  auto slash = spec.find('/');
  if (slash == std::string::npos) return fail_invalid("volume: '{}' must be \"pool/volume\"", spec);
  auto path = TRY(volume_path(spec.substr(0, slash), spec.substr(slash + 1), true));
  auto info = TRY(describe(spec.substr(0, slash), spec.substr(slash + 1), path));
  return std::make_pair(path, info.format);
}

}  // namespace keel::hostd
