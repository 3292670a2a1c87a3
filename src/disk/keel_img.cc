// keel-img: qemu-img's subcommands over keel's block layer.
#include <fcntl.h>
#include <getopt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/log.h"
#include "base/progress.h"
#include "base/size.h"
#include "disk/convert.h"
#include "disk/image.h"
#include "disk/nbd_server.h"
#include "disk/qcow2_image.h"
#include "disk/raw_image.h"
#include "disk/vmdk_image.h"

using namespace keel;
using namespace keel::disk;
using json = nlohmann::ordered_json;

namespace {

[[noreturn]] void die(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "keel-img: %s\n", msg.c_str());
  std::exit(code);
}

template <typename T>
T must(Result<T> r) {
  if (!r) die(r.error().message());
  if constexpr (!std::is_void_v<T>) return std::move(*r);
}

void usage() {
  std::fputs(
      "usage: keel-img COMMAND [options]\n"
      "  create [-f fmt] [-o options] [-b backing [-F fmt]] [-u] FILE [SIZE]\n"
      "  info [-f fmt] [--output=human|json] [--backing-chain] FILE\n"
      "  check [-f fmt] [--output=human|json] [-r leaks|all] FILE\n"
      "  convert [-f fmt] [-O fmt] [-o options] [-c] [-B backing] [-p] [-S size] [-W] [-t cache] [-T src_cache] SRC DST\n"
      "  compare [-f fmt] [-F fmt] [-s] FILE1 FILE2\n"
      "  map [-f fmt] [--output=human|json] FILE\n"
      "  resize [-f fmt] [--shrink] FILE [+|-]SIZE\n"
      "  snapshot [-l | -c NAME | -a NAME | -d NAME] FILE\n"
      "  commit [-f fmt] [-d] FILE\n"
      "  rebase [-f fmt] [-u] -b BACKING [-F fmt] FILE\n"
      "  measure [-O fmt] [-o options] (--size SIZE | [-f fmt] FILE)\n"
      "  bench [-c count] [-d depth] [-s size] [-w] [-f fmt] [-t cache | -n] [--pattern=random|sequential] FILE\n"
      "  serve [-f fmt] (--socket PATH | --port N) [--read-only] [--shared N] [-t] [-x NAME] [--cache=none|-n] FILE\n",
      stderr);
  std::exit(1);
}

std::optional<ImageFormat> fmt_opt(const std::string& s) {
  if (s.empty()) return std::nullopt;
  return must(parse_format(s));
}

// qemu's cache modes: "none" and "directsync" bypass the page cache (O_DIRECT); the others use it.
CacheMode parse_cache_mode(const std::string& mode) {
  if (mode == "none" || mode == "directsync") return CacheMode::None;
  if (mode == "writeback" || mode == "unsafe" || mode == "writethrough") return CacheMode::Writeback;
  die("cache mode must be none, directsync, writeback, writethrough or unsafe, not '" + mode + "'");
}

std::unique_ptr<BlockDevice> open_or_die(const std::string& path, OpenMode mode, const std::string& fmt,
                                         CacheMode cache = CacheMode::Writeback) {
  auto r = open_image(path, mode, fmt_opt(fmt), cache);
  if (!r) die(r.error().message());
  return std::move(*r);
}

std::map<std::string, std::string> parse_options(const std::string& text) {
  std::map<std::string, std::string> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t eq = item.find('=');
    if (!item.empty()) {
      if (eq == std::string::npos) out[item] = "on";
      else out[item.substr(0, eq)] = item.substr(eq + 1);
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

bool parse_bool(const std::string& key, const std::string& v) {
  if (v == "on" || v == "true" || v == "yes") return true;
  if (v == "off" || v == "false" || v == "no") return false;
  die("option " + key + ": expected on or off, not '" + v + "'");
}

Qcow2CreateOptions qcow2_options(const std::map<std::string, std::string>& opts) {
  Qcow2CreateOptions o;
  for (auto& [k, v] : opts) {
    if (k == "cluster_size") o.cluster_size = static_cast<uint32_t>(must(parse_size(v)));
    else if (k == "compat") {
      if (v == "0.10" || v == "v2") o.version = 2;
      else if (v == "1.1" || v == "v3") o.version = 3;
      else die("compat must be 0.10 or 1.1, not '" + v + "'");
    } else if (k == "refcount_bits") o.refcount_bits = std::atoi(v.c_str());
    else if (k == "compression_type") {
      if (v == "zlib") o.compression = Qcow2Compression::Zlib;
      else if (v == "zstd") o.compression = Qcow2Compression::Zstd;
      else die("compression_type must be zlib or zstd, not '" + v + "'");
    } else if (k == "lazy_refcounts") o.lazy_refcounts = parse_bool(k, v);
    else if (k == "extended_l2") o.extended_l2 = parse_bool(k, v);
    else if (k == "preallocation") {
      if (v == "off") o.preallocation = Preallocation::Off;
      else if (v == "metadata") o.preallocation = Preallocation::Metadata;
      else if (v == "falloc") o.preallocation = Preallocation::Falloc;
      else if (v == "full") o.preallocation = Preallocation::Full;
      else die("preallocation must be off, metadata, falloc or full, not '" + v + "'");
    } else if (k == "backing_file") o.backing_file = v;
    else if (k == "backing_fmt") o.backing_format = v;
    else if (k == "size") o.size = must(parse_size(v));
    else die("unknown qcow2 option '" + k + "'");
  }
  return o;
}

// Creates an image of the given format. Returns nothing; errors end the program.
void create_image(const std::string& path, ImageFormat fmt, uint64_t size,
                  const std::map<std::string, std::string>& opts, const std::string& backing,
                  const std::string& backing_fmt) {
  if (fmt == ImageFormat::Raw) {
    for (auto& [k, v] : opts)
      if (k != "preallocation" && k != "size") die("unknown raw option '" + k + "'");
    must(RawImage::create(path, size));
    auto it = opts.find("preallocation");
    if (it != opts.end() && it->second != "off") {
      UniqueFd fd = must(UniqueFd::open(path, O_RDWR));
      if (it->second == "falloc" && ::fallocate(fd.get(), 0, 0, static_cast<off_t>(size)) < 0)
        die("fallocate " + path + ": " + std::strerror(errno));
      if (it->second == "full") {
        std::vector<uint8_t> zeros(1 << 20, 0);
        for (uint64_t p = 0; p < size; p += zeros.size())
          must(pwrite_all(fd.get(), zeros.data(), std::min<uint64_t>(zeros.size(), size - p), static_cast<off_t>(p)));
      }
    }
    return;
  }
  if (fmt == ImageFormat::Vmdk) {
    VmdkCreateOptions vo;
    vo.size = size;
    for (auto& [k, v] : opts) {
      if (k == "subformat") vo.subformat = v;
      else die("unknown vmdk option '" + k + "'");
    }
    if (!backing.empty() && backing_fmt != "vmdk")
      die("a VMDK image's parent must be a VMDK image, not " + backing_fmt);
    vo.parent_file = backing;
    must(VmdkImage::create(path, vo));
    return;
  }
  Qcow2CreateOptions o = qcow2_options(opts);
  o.size = size;
  if (!backing.empty()) {
    o.backing_file = backing;
    o.backing_format = backing_fmt;
  }
  must(Qcow2Image::create(path, o));
}

// ---------------------------------------------------------------------------------------------

int cmd_create(int argc, char** argv) {
  std::string fmt = "raw", options, backing, backing_fmt;
  bool unsafe = false;
  int c;
  while ((c = getopt(argc, argv, "f:o:b:F:uq")) != -1) {
    switch (c) {
      case 'f': fmt = optarg; break;
      case 'o': options += (options.empty() ? "" : ",") + std::string(optarg); break;
      case 'b': backing = optarg; break;
      case 'F': backing_fmt = optarg; break;
      case 'u': unsafe = true; break;
      case 'q': break;
      default: usage();
    }
  }
  if (optind >= argc) usage();
  std::string path = argv[optind];
  auto opts = parse_options(options);
  if (opts.count("backing_file")) backing = opts["backing_file"], opts.erase("backing_file");
  if (opts.count("backing_fmt")) backing_fmt = opts["backing_fmt"], opts.erase("backing_fmt");
  uint64_t size = 0;
  bool have_size = false;
  if (optind + 1 < argc) {
    size = must(parse_size(argv[optind + 1]));
    have_size = true;
  } else if (opts.count("size")) {
    size = must(parse_size(opts["size"]));
    have_size = true;
  }
  opts.erase("size");
  if (!backing.empty()) {
    std::string resolved = backing[0] == '/' ? backing
        : (std::filesystem::path(path).parent_path() / backing).string();
    if (backing_fmt.empty()) {
      if (unsafe) die("-u needs the backing format (-F)");
      backing_fmt = format_name(must(probe_format(resolved)));
    }
    if (!unsafe || !have_size) {
      auto b = open_image(resolved, OpenMode::ReadOnly, must(parse_format(backing_fmt)));
      if (!b) die("could not open backing file: " + b.error().message());
      if (!have_size) size = (*b)->size();
    }
  } else if (!have_size) {
    die("create: image size is required");
  }
  ImageFormat f = must(parse_format(fmt));
  if (!backing.empty() && f == ImageFormat::Raw) die("raw images cannot have a backing file");
  create_image(path, f, size, opts, backing, backing_fmt);
  std::printf("Formatting '%s', fmt=%s size=%llu\n", path.c_str(), fmt.c_str(), static_cast<unsigned long long>(size));
  return 0;
}

// ---------------------------------------------------------------------------------------------

std::string format_date(uint32_t sec) {
  time_t t = sec;
  struct tm tm;
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string format_clock(uint64_t nsec) {
  uint64_t ms = nsec / 1000000;
  return fmt::format("{:02}:{:02}:{:02}.{:03}", ms / 3600000, (ms / 60000) % 60, (ms / 1000) % 60, ms % 1000);
}

void print_snapshot_table(const std::vector<Qcow2Snapshot>& snaps) {
  std::printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
  for (auto& s : snaps) {
    std::string icount = s.icount == UINT64_MAX ? "" : std::to_string(s.icount);
    std::printf("%-9s %-16s %8s %19s %12s %10s\n", s.id.c_str(), s.name.c_str(), format_size(s.vm_state_size).c_str(),
                format_date(s.date_sec).c_str(), format_clock(s.vm_clock_nsec).c_str(), icount.c_str());
  }
}

json image_info_json(BlockDevice& dev, const std::string& path) {
  json j;
  auto* q = dynamic_cast<Qcow2Image*>(&dev);
  if (q && !q->backing_file().empty()) j["backing-filename-format"] = q->backing_format();
  if (q && !q->snapshots().empty()) {
    json snaps = json::array();
    for (auto& s : q->snapshots()) {
      json e;
      e["icount"] = s.icount == UINT64_MAX ? 0 : s.icount;
      e["vm-clock-nsec"] = s.vm_clock_nsec % 1000000000;
      e["name"] = s.name;
      e["date-sec"] = s.date_sec;
      e["date-nsec"] = s.date_nsec;
      e["vm-clock-sec"] = s.vm_clock_nsec / 1000000000;
      e["id"] = s.id;
      e["vm-state-size"] = s.vm_state_size;
      snaps.push_back(e);
    }
    j["snapshots"] = snaps;
  }
  j["virtual-size"] = dev.size();
  j["filename"] = path;
  if (q) j["cluster-size"] = q->cluster_size();
  j["format"] = dev.format();
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) j["actual-size"] = static_cast<uint64_t>(st.st_blocks) * 512;
  if (q) {
    json data;
    data["compat"] = q->version() == 3 ? "1.1" : "0.10";
    if (q->version() == 3) {
      data["compression-type"] = q->compression() == Qcow2Compression::Zstd ? "zstd" : "zlib";
      data["lazy-refcounts"] = q->lazy_refcounts();
    }
    data["refcount-bits"] = q->refcount_bits();
    if (q->version() == 3) {
      data["corrupt"] = q->corrupt();
      data["extended-l2"] = q->extended_l2();
    }
    j["format-specific"] = {{"type", "qcow2"}, {"data", data}};
    if (!q->backing_file().empty()) {
      j["full-backing-filename"] = q->backing_path();
      j["backing-filename"] = q->backing_file();
    }
  }
  if (auto* v = dynamic_cast<VmdkImage*>(&dev)) {
    j["format-specific"] = {{"type", "vmdk"},
                            {"data", {{"create-type", v->create_type()}, {"cid", v->cid()}, {"parent-cid", v->parent_cid()}}}};
    if (!v->parent_file().empty()) {
      j["backing-filename"] = v->parent_file();
      j["full-backing-filename"] = v->parent_path();
      j["backing-filename-format"] = "vmdk";
    }
  }
  j["dirty-flag"] = q ? q->dirty() : false;
  return j;
}

void print_info_human(BlockDevice& dev, const std::string& path) {
  auto* q = dynamic_cast<Qcow2Image*>(&dev);
  struct stat st;
  uint64_t disk = ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
  std::printf("image: %s\nfile format: %s\nvirtual size: %s (%llu bytes)\ndisk size: %s\n", path.c_str(),
              dev.format().c_str(), format_size(dev.size()).c_str(), static_cast<unsigned long long>(dev.size()),
              format_size(disk).c_str());
  if (q) {
    std::printf("cluster_size: %u\n", q->cluster_size());
    if (q->dirty()) std::printf("cleanly shut down: no\n");
    if (!q->backing_file().empty()) {
      std::printf("backing file: %s", q->backing_file().c_str());
      if (q->backing_path() != q->backing_file()) std::printf(" (actual path: %s)", q->backing_path().c_str());
      std::printf("\n");
      if (!q->backing_format().empty()) std::printf("backing file format: %s\n", q->backing_format().c_str());
    }
    if (!q->snapshots().empty()) {
      std::printf("Snapshot list:\n");
      print_snapshot_table(q->snapshots());
    }
    std::printf("Format specific information:\n    compat: %s\n", q->version() == 3 ? "1.1" : "0.10");
    if (q->version() == 3) {
      std::printf("    compression type: %s\n", q->compression() == Qcow2Compression::Zstd ? "zstd" : "zlib");
      std::printf("    lazy refcounts: %s\n", q->lazy_refcounts() ? "true" : "false");
    }
    std::printf("    refcount bits: %d\n", q->refcount_bits());
    if (q->version() == 3) {
      std::printf("    corrupt: %s\n", q->corrupt() ? "true" : "false");
      std::printf("    extended l2: %s\n", q->extended_l2() ? "true" : "false");
    }
  }
  if (auto* v = dynamic_cast<VmdkImage*>(&dev)) {
    if (!v->parent_file().empty())
      std::printf("backing file: %s\nbacking file format: vmdk\n", v->parent_file().c_str());
    std::printf("Format specific information:\n    cid: %u\n    parent cid: %u\n    create type: %s\n", v->cid(),
                v->parent_cid(), v->create_type().c_str());
  }
}

enum { OPT_OUTPUT = 1000, OPT_BACKING_CHAIN, OPT_SHRINK, OPT_SIZE, OPT_SOCKET, OPT_PORT, OPT_READ_ONLY,
       OPT_SHARED, OPT_PATTERN, OPT_FLUSH_INTERVAL, OPT_MIXED, OPT_FORCE_SHARE, OPT_OBJECT, OPT_IMAGE_OPTS,
       OPT_CACHE };

int cmd_info(int argc, char** argv) {
  static option longopts[] = {{"output", required_argument, nullptr, OPT_OUTPUT},
                              {"backing-chain", no_argument, nullptr, OPT_BACKING_CHAIN},
                              {"force-share", no_argument, nullptr, 'U'},
                              {nullptr, 0, nullptr, 0}};
  std::string fmt, output = "human";
  bool chain = false;
  int c;
  while ((c = getopt_long(argc, argv, "f:U", longopts, nullptr)) != -1) {
    if (c == 'f') fmt = optarg;
    else if (c == OPT_OUTPUT) output = optarg;
    else if (c == OPT_BACKING_CHAIN) chain = true;
    else if (c == 'U') {}
    else usage();
  }
  if (optind >= argc) usage();
  std::string path = argv[optind];
  std::vector<std::pair<std::string, std::unique_ptr<BlockDevice>>> layers;
  {
    ImageFormat f = fmt.empty() ? must(probe_format(path)) : must(parse_format(fmt));
    std::unique_ptr<BlockDevice> dev;
    if (f == ImageFormat::Qcow2) {
      Qcow2OpenOptions oo;
      oo.open_backing = false;
      dev = must(Qcow2Image::open(path, OpenMode::ReadOnly, oo));
    } else {
      dev = open_or_die(path, OpenMode::ReadOnly, format_name(f));
    }
    layers.push_back({path, std::move(dev)});
  }
  while (chain) {
    auto* q = dynamic_cast<Qcow2Image*>(layers.back().second.get());
    if (!q || q->backing_file().empty() || layers.size() > 256) break;
    std::string bpath = q->backing_path();
    ImageFormat f = q->backing_format().empty() ? must(probe_format(bpath)) : must(parse_format(q->backing_format()));
    std::unique_ptr<BlockDevice> dev;
    if (f == ImageFormat::Qcow2) {
      Qcow2OpenOptions oo;
      oo.open_backing = false;
      dev = must(Qcow2Image::open(bpath, OpenMode::ReadOnly, oo));
    } else {
      dev = open_or_die(bpath, OpenMode::ReadOnly, format_name(f));
    }
    layers.push_back({bpath, std::move(dev)});
  }
  if (output == "json") {
    if (chain) {
      json arr = json::array();
      for (auto& [p, d] : layers) arr.push_back(image_info_json(*d, p));
      std::printf("%s\n", arr.dump(4).c_str());
    } else {
      std::printf("%s\n", image_info_json(*layers[0].second, path).dump(4).c_str());
    }
  } else {
    for (size_t i = 0; i < layers.size(); ++i) {
      if (i) std::printf("\n");
      print_info_human(*layers[i].second, layers[i].first);
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------

int cmd_check(int argc, char** argv) {
  static option longopts[] = {{"output", required_argument, nullptr, OPT_OUTPUT},
                              {"force-share", no_argument, nullptr, 'U'},
                              {nullptr, 0, nullptr, 0}};
  std::string fmt, output = "human", repair;
  int c;
  while ((c = getopt_long(argc, argv, "f:r:qU", longopts, nullptr)) != -1) {
    if (c == 'f') fmt = optarg;
    else if (c == 'r') repair = optarg;
    else if (c == OPT_OUTPUT) output = optarg;
    else if (c == 'q' || c == 'U') {}
    else usage();
  }
  if (optind >= argc) usage();
  std::string path = argv[optind];
  RepairMode mode = RepairMode::None;
  if (repair == "leaks") mode = RepairMode::Leaks;
  else if (repair == "all") mode = RepairMode::All;
  else if (!repair.empty()) die("-r must be leaks or all");
  auto probed = fmt.empty() ? probe_format(path) : parse_format(fmt);
  if (!probed) {
    std::fprintf(stderr, "keel-img: %s\n", probed.error().message().c_str());
    return 1;
  }
  if (*probed != ImageFormat::Qcow2) {
    std::fprintf(stderr, "keel-img: This image format does not support checks\n");
    return 63;
  }
  Qcow2OpenOptions oo;
  oo.open_backing = false;
  oo.for_repair = true;
  auto image = Qcow2Image::open(path, mode == RepairMode::None ? OpenMode::ReadOnly : OpenMode::ReadWrite, oo);
  if (!image) {
    std::fprintf(stderr, "keel-img: Could not open '%s': %s\n", path.c_str(), image.error().message().c_str());
    return 1;
  }
  auto r = (*image)->check(mode);
  if (!r) {
    std::fprintf(stderr, "keel-img: check of %s failed: %s\n", path.c_str(), r.error().message().c_str());
    return 1;
  }
  CheckResult res = *r;
  // Every pass's findings go to stderr as qemu-img prints them (errors, repairs, the re-check).
  for (auto& m : res.messages) std::fprintf(stderr, "%s\n", m.c_str());
  if (!res.failure.empty()) {
    std::fprintf(stderr, "keel-img: Check failed: %s\n", res.failure.c_str());
    return 1;
  }
  if (mode != RepairMode::None && (res.leaks_fixed || res.corruptions_fixed)) {
    // Check again, as qemu-img does, to report what is left.
    auto again = (*image)->check(RepairMode::None);
    if (again) {
      for (auto& m : again->messages) std::fprintf(stderr, "%s\n", m.c_str());
      uint64_t lf = res.leaks_fixed, cf = res.corruptions_fixed;
      res = *again;
      res.leaks_fixed = lf;
      res.corruptions_fixed = cf;
    }
  }
  auto close = (*image)->close();
  if (!close) std::fprintf(stderr, "keel-img: %s\n", close.error().message().c_str());
  if (output == "json") {
    json j;
    j["image-end-offset"] = res.image_end_offset;
    j["total-clusters"] = res.total_clusters;
    j["check-errors"] = res.check_errors;
    if (res.leaks) j["leaks"] = res.leaks;
    if (res.corruptions) j["corruptions"] = res.corruptions;
    if (res.leaks_fixed) j["leaks-fixed"] = res.leaks_fixed;
    if (res.corruptions_fixed) j["corruptions-fixed"] = res.corruptions_fixed;
    j["allocated-clusters"] = res.allocated_clusters;
    j["filename"] = path;
    j["format"] = "qcow2";
    if (res.fragmented_clusters) j["fragmented-clusters"] = res.fragmented_clusters;
    if (res.compressed_clusters) j["compressed-clusters"] = res.compressed_clusters;
    std::printf("%s\n", j.dump(4).c_str());
  } else {
    if (res.leaks_fixed || res.corruptions_fixed)
      std::printf("The following inconsistencies were found and repaired:\n\n    %llu leaked clusters\n    %llu corruptions\n\nDouble checking the fixed image now...\n",
                  static_cast<unsigned long long>(res.leaks_fixed), static_cast<unsigned long long>(res.corruptions_fixed));
    if (!res.corruptions && !res.leaks && !res.check_errors) std::printf("No errors were found on the image.\n");
    if (res.corruptions)
      std::printf("\n%llu errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                  static_cast<unsigned long long>(res.corruptions));
    if (res.leaks)
      std::printf("\n%llu leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                  static_cast<unsigned long long>(res.leaks));
    if (res.total_clusters)
      std::printf("%llu/%llu = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
                  static_cast<unsigned long long>(res.allocated_clusters), static_cast<unsigned long long>(res.total_clusters),
                  100.0 * static_cast<double>(res.allocated_clusters) / static_cast<double>(res.total_clusters),
                  res.allocated_clusters ? 100.0 * static_cast<double>(res.fragmented_clusters) / static_cast<double>(res.allocated_clusters) : 0.0,
                  res.allocated_clusters ? 100.0 * static_cast<double>(res.compressed_clusters) / static_cast<double>(res.allocated_clusters) : 0.0);
    std::printf("Image end offset: %llu\n", static_cast<unsigned long long>(res.image_end_offset));
  }
  if (res.check_errors) return 1;
  if (res.corruptions) return 2;
  if (res.leaks) return 3;
  return 0;
}

// ---------------------------------------------------------------------------------------------

int cmd_convert(int argc, char** argv) {
  std::string src_fmt, dst_fmt = "raw", options, target_backing, target_backing_fmt;
  bool compress = false, progress = false, safe_cache = false, direct = false;
  CacheMode src_cache = CacheMode::Writeback;
  uint64_t sparse_size = 4096;
  int c;
  while ((c = getopt(argc, argv, "f:O:o:cB:F:pS:WqnUm:t:T:")) != -1) {
    switch (c) {
      case 'f': src_fmt = optarg; break;
      case 'O': dst_fmt = optarg; break;
      case 'o': options += (options.empty() ? "" : ",") + std::string(optarg); break;
      case 'c': compress = true; break;
      case 'B': target_backing = optarg; break;
      case 'F': target_backing_fmt = optarg; break;
      case 'p': progress = true; break;
      case 'S': sparse_size = must(parse_size(optarg)); break;
      case 't':
        safe_cache = std::string(optarg) != "unsafe";
        direct = parse_cache_mode(optarg) == CacheMode::None;
        break;
      case 'T': src_cache = parse_cache_mode(optarg); break;
      case 'W': case 'q': case 'n': case 'U': case 'm': break;
      default: usage();
    }
  }
  if (optind + 2 != argc) usage();
  if (sparse_size % 512 || sparse_size > (16 << 20))
    die("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216.");
  std::string src_path = argv[optind], dst_path = argv[optind + 1];
  auto src = open_or_die(src_path, OpenMode::ReadOnly, src_fmt, src_cache);
  uint64_t size = src->size();
  ImageFormat df = must(parse_format(dst_fmt));
  auto opts = parse_options(options);
  if (compress && df == ImageFormat::Raw) die("compression is not supported for the raw format");
  if (df == ImageFormat::Vmdk) {
    if (!opts.count("subformat")) opts["subformat"] = compress ? "streamOptimized" : "monolithicSparse";
    must(VmdkImage::convert_from(*src, dst_path, opts["subformat"], progress));
    return 0;
  }
  if (!target_backing.empty() && target_backing_fmt.empty()) {
    std::string resolved = target_backing[0] == '/' ? target_backing
        : (std::filesystem::path(dst_path).parent_path() / target_backing).string();
    target_backing_fmt = format_name(must(probe_format(resolved)));
  }
  create_image(dst_path, df, size, opts, target_backing, target_backing_fmt);
  std::unique_ptr<BlockDevice> dst;
  dst = open_or_die(dst_path, OpenMode::ReadWrite, dst_fmt, direct ? CacheMode::None : CacheMode::Writeback);
  auto* qdst = dynamic_cast<Qcow2Image*>(dst.get());
  if (qdst && !safe_cache) qdst->set_unsafe_cache(true);
  CopyOptions copy;
  copy.compress = compress;
  copy.target_backing = qdst ? qdst->backing() : nullptr;
  // Zero detection works on -S granules (a cluster for qcow2 targets: all-zero clusters stay
  // unallocated).
  copy.granule = qdst ? qdst->cluster_size() : std::max<uint64_t>(sparse_size, 512);
  if (const char* t = std::getenv("KEEL_IMG_THREADS")) copy.readers = static_cast<unsigned>(std::clamp(std::atoi(t), 1, 64));
  Progress bar("convert", size, progress ? ProgressStyle::Auto : ProgressStyle::Quiet);
  if (progress) copy.progress = [&bar](uint64_t done) { bar.update(done); };
  must(copy_image(*src, *dst, copy));
  if (qdst) must(qdst->close());
  else if (safe_cache) must(dst->flush());
  bar.finish();
  return 0;
}

// ---------------------------------------------------------------------------------------------

int cmd_compare(int argc, char** argv) {
  std::string f1, f2;
  bool strict = false;
  int c;
  while ((c = getopt(argc, argv, "f:F:spqU")) != -1) {
    if (c == 'f') f1 = optarg;
    else if (c == 'F') f2 = optarg;
    else if (c == 's') strict = true;
    else if (c == 'p' || c == 'q' || c == 'U') {}
    else usage();
  }
  if (optind + 2 != argc) usage();
  auto a = open_image(argv[optind], OpenMode::ReadOnly, fmt_opt(f1));
  if (!a) { std::fprintf(stderr, "keel-img: %s\n", a.error().message().c_str()); return 2; }
  auto b = open_image(argv[optind + 1], OpenMode::ReadOnly, fmt_opt(f2.empty() ? f1 : f2));
  if (!b) { std::fprintf(stderr, "keel-img: %s\n", b.error().message().c_str()); return 2; }
  BlockDevice& A = **a;
  BlockDevice& B = **b;
  if (strict && A.size() != B.size()) {
    std::printf("Strict mode: Image size mismatch!\n");
    return 1;
  }
  uint64_t common = std::min(A.size(), B.size());
  const uint64_t chunk = 2 << 20;
  std::vector<uint8_t> ba(chunk), bb(chunk);
  auto report_mismatch = [&](uint64_t off) {
    std::printf("Content mismatch at offset %llu!\n", static_cast<unsigned long long>(off));
    return 1;
  };
  // Workers compare 2 MiB chunks in turn; the first (lowest) mismatch wins, as in a serial scan.
  std::atomic<uint64_t> next{0}, first_mismatch{UINT64_MAX};
  std::mutex err_mu;
  std::optional<Error> err;
  auto worker = [&] {
    std::vector<uint8_t> wa(chunk), wb(chunk);
    while (true) {
      uint64_t pos = next.fetch_add(1) * chunk;
      if (pos >= common || pos >= first_mismatch.load()) return;
      {
        std::lock_guard lk(err_mu);
        if (err) return;
      }
      uint64_t n = std::min(chunk, common - pos);
      auto ea = A.block_status(pos, n);
      auto eb = B.block_status(pos, n);
      if (!ea || !eb) {
        std::lock_guard lk(err_mu);
        if (!err) err = !ea ? ea.error() : eb.error();
        return;
      }
      // Both zero over the whole chunk: nothing to read.
      bool za = std::all_of(ea->begin(), ea->end(), [](const Extent& e) { return !e.data || e.zero; });
      bool zb = std::all_of(eb->begin(), eb->end(), [](const Extent& e) { return !e.data || e.zero; });
      if (za && zb) continue;
      auto ra = A.read(pos, std::span<uint8_t>(wa.data(), n));
      auto rb = B.read(pos, std::span<uint8_t>(wb.data(), n));
      if (!ra || !rb) {
        std::lock_guard lk(err_mu);
        if (!err) err = !ra ? ra.error() : rb.error();
        return;
      }
      if (std::memcmp(wa.data(), wb.data(), n) != 0) {
        uint64_t i = 0;
        while (wa[i] == wb[i]) ++i;
        uint64_t at = (pos + i) & ~511ULL;
        uint64_t cur = first_mismatch.load();
        while (at < cur && !first_mismatch.compare_exchange_weak(cur, at)) {
        }
        return;
      }
    }
  };
  {
    std::vector<std::thread> threads;
    for (int i = 1; i < 4; ++i) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
  }
  if (err) {
    std::fprintf(stderr, "keel-img: %s\n", err->message().c_str());
    return 2;
  }
  if (first_mismatch.load() != UINT64_MAX) return report_mismatch(first_mismatch.load());
  if (A.size() != B.size()) {
    BlockDevice& L = A.size() > B.size() ? A : B;
    for (uint64_t pos = common; pos < L.size();) {
      uint64_t n = std::min(chunk, L.size() - pos);
      auto r = L.read(pos, std::span<uint8_t>(ba.data(), n));
      if (!r) { std::fprintf(stderr, "keel-img: %s\n", r.error().message().c_str()); return 2; }
      if (!is_zero(ba.data(), n)) {
        uint64_t i = 0;
        while (ba[i] == 0) ++i;
        std::printf("Warning: Image size mismatch!\n");
        return report_mismatch((pos + i) & ~511ULL);
      }
      pos += n;
    }
    std::printf("Warning: Image size mismatch!\n");
  }
  std::printf("Images are identical.\n");
  return 0;
}

// ---------------------------------------------------------------------------------------------

int cmd_map(int argc, char** argv) {
  static option longopts[] = {{"output", required_argument, nullptr, OPT_OUTPUT},
                              {"force-share", no_argument, nullptr, 'U'},
                              {nullptr, 0, nullptr, 0}};
  std::string fmt, output = "human";
  int c;
  while ((c = getopt_long(argc, argv, "f:U", longopts, nullptr)) != -1) {
    if (c == 'f') fmt = optarg;
    else if (c == OPT_OUTPUT) output = optarg;
    else if (c == 'U') {}
    else usage();
  }
  if (optind >= argc) usage();
  auto dev = open_or_die(argv[optind], OpenMode::ReadOnly, fmt);
  std::vector<Extent> all;
  const uint64_t step = 1ULL << 30;
  for (uint64_t pos = 0; pos < dev->size(); pos += step) {
    auto ex = must(dev->block_status(pos, std::min(step, dev->size() - pos)));
    for (auto& e : ex) {
      if (!all.empty()) {
        Extent& b = all.back();
        bool file_ok = b.file.empty() ? e.file.empty() : (b.file == e.file && b.file_offset + b.length == e.file_offset);
        if (b.data == e.data && b.zero == e.zero && b.depth == e.depth && b.allocated == e.allocated && file_ok) {
          b.length += e.length;
          continue;
        }
      }
      all.push_back(e);
    }
  }
  if (output == "json") {
    std::printf("[");
    for (size_t i = 0; i < all.size(); ++i) {
      auto& e = all[i];
      std::printf("%s{ \"start\": %llu, \"length\": %llu, \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
                  i ? ",\n" : "", static_cast<unsigned long long>(e.offset), static_cast<unsigned long long>(e.length),
                  e.depth, e.allocated ? "true" : "false", e.zero ? "true" : "false", e.data ? "true" : "false");
      if (!e.file.empty()) std::printf(", \"offset\": %llu", static_cast<unsigned long long>(e.file_offset));
      std::printf("}");
    }
    std::printf("]\n");
  } else {
    std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    for (auto& e : all) {
      if (!e.data || e.file.empty()) continue;
      std::printf("%#-16llx%#-16llx%#-16llx%s\n", static_cast<unsigned long long>(e.offset),
                  static_cast<unsigned long long>(e.length), static_cast<unsigned long long>(e.file_offset), e.file.c_str());
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------

int cmd_resize(int argc, char** argv) {
  static option longopts[] = {{"shrink", no_argument, nullptr, OPT_SHRINK}, {nullptr, 0, nullptr, 0}};
  std::string fmt;
  bool shrink = false;
  // Sizes like "-1G" look like options: find the last argument by hand.
  if (argc >= 2 && argv[argc - 1][0] == '-' && std::isdigit(static_cast<unsigned char>(argv[argc - 1][1]))) {
    std::string sz = argv[argc - 1];
    argv[argc - 1] = nullptr;
    --argc;
    int c;
    while ((c = getopt_long(argc, argv, "f:q", longopts, nullptr)) != -1) {
      if (c == 'f') fmt = optarg;
      else if (c == OPT_SHRINK) shrink = true;
      else if (c == 'q') {}
      else usage();
    }
    if (optind + 1 != argc) usage();
    auto dev = open_or_die(argv[optind], OpenMode::ReadWrite, fmt);
    uint64_t delta = must(parse_size(sz.substr(1)));
    if (delta > dev->size()) die("resize: the new size would be negative");
    if (!shrink) die("Use the --shrink option to perform a shrink operation.");
    uint64_t target = dev->size() - delta;
    if (auto* q = dynamic_cast<Qcow2Image*>(dev.get())) must(q->resize(target));
    else if (auto* r = dynamic_cast<RawImage*>(dev.get())) must(r->resize(target));
    else die("resize is not supported for this format");
    std::printf("Image resized.\n");
    return 0;
  }
  int c;
  while ((c = getopt_long(argc, argv, "f:q", longopts, nullptr)) != -1) {
    if (c == 'f') fmt = optarg;
    else if (c == OPT_SHRINK) shrink = true;
    else if (c == 'q') {}
    else usage();
  }
  if (optind + 2 != argc) usage();
  std::string sz = argv[optind + 1];
  auto dev = open_or_die(argv[optind], OpenMode::ReadWrite, fmt);
  uint64_t target;
  if (sz[0] == '+') target = dev->size() + must(parse_size(sz.substr(1)));
  else target = must(parse_size(sz));
  if (target < dev->size() && !shrink) die("Use the --shrink option to perform a shrink operation.");
  if (auto* q = dynamic_cast<Qcow2Image*>(dev.get())) {
    must(q->resize(target));
    must(q->close());
  } else if (auto* r = dynamic_cast<RawImage*>(dev.get())) {
    must(r->resize(target));
  } else {
    die("resize is not supported for this format");
  }
  std::printf("Image resized.\n");
  return 0;
}

int cmd_snapshot(int argc, char** argv) {
  char op = 0;
  std::string name, fmt;
  int c;
  while ((c = getopt(argc, argv, "lc:a:d:f:qU")) != -1) {
    switch (c) {
      case 'l': op = 'l'; break;
      case 'c': case 'a': case 'd': op = static_cast<char>(c); name = optarg; break;
      case 'f': fmt = optarg; break;
      case 'q': case 'U': break;
      default: usage();
    }
  }
  if (optind >= argc || !op) usage();
  std::string path = argv[optind];
  Qcow2OpenOptions oo;
  oo.open_backing = false;
  auto image = Qcow2Image::open(path, op == 'l' ? OpenMode::ReadOnly : OpenMode::ReadWrite, oo);
  if (!image) die(image.error().message());
  auto& q = **image;
  switch (op) {
    case 'l':
      if (!q.snapshots().empty()) {
        std::printf("Snapshot list:\n");
        print_snapshot_table(q.snapshots());
      }
      break;
    case 'c': must(q.snapshot_create(name)); break;
    case 'a': must(q.snapshot_apply(name)); break;
    case 'd': must(q.snapshot_delete(name)); break;
  }
  must(q.close());
  return 0;
}

int cmd_commit(int argc, char** argv) {
  std::string fmt;
  bool keep = false;
  int c;
  while ((c = getopt(argc, argv, "f:dqpt:b:")) != -1) {
    if (c == 'f') fmt = optarg;
    else if (c == 'd') keep = true;
    else if (c == 'q' || c == 'p' || c == 't' || c == 'b') {}
    else usage();
  }
  if (optind >= argc) usage();
  std::string path = argv[optind];
  auto top = must(Qcow2Image::open(path, OpenMode::ReadWrite, {}));
  if (top->backing_file().empty()) die(path + " has no backing file to commit into");
  auto base = open_or_die(top->backing_path(), OpenMode::ReadWrite,
                          top->backing_format().empty() ? "" : top->backing_format());
  uint64_t size = std::min(top->size(), base->size());
  std::vector<uint8_t> buf(2 << 20);
  for (uint64_t pos = 0; pos < size;) {
    uint64_t n = std::min<uint64_t>(buf.size(), size - pos);
    auto ex = must(top->block_status(pos, n));
    for (auto& e : ex) {
      if (e.depth != 0 || !e.allocated) continue;
      if (e.zero) {
        must(base->write_zeroes(e.offset, e.length));
        continue;
      }
      must(top->read(e.offset, std::span<uint8_t>(buf.data(), e.length)));
      must(base->write(e.offset, std::span<const uint8_t>(buf.data(), e.length)));
    }
    pos += n;
  }
  must(base->flush());
  if (!keep) must(top->make_empty());
  must(top->close());
  std::printf("Image committed.\n");
  return 0;
}

int cmd_rebase(int argc, char** argv) {
  std::string fmt, backing, backing_fmt;
  bool unsafe = false, have_b = false;
  int c;
  while ((c = getopt(argc, argv, "f:b:F:upqt:T:U")) != -1) {
    switch (c) {
      case 'f': fmt = optarg; break;
      case 'b': backing = optarg; have_b = true; break;
      case 'F': backing_fmt = optarg; break;
      case 'u': unsafe = true; break;
      case 'p': case 'q': case 't': case 'T': case 'U': break;
      default: usage();
    }
  }
  if (optind >= argc || !have_b) usage();
  std::string path = argv[optind];
  std::string resolved = backing.empty() || backing[0] == '/' ? backing
      : (std::filesystem::path(path).parent_path() / backing).string();
  if (!backing.empty() && backing_fmt.empty()) backing_fmt = format_name(must(probe_format(resolved)));
  Qcow2OpenOptions oo;
  oo.open_backing = !unsafe;
  auto top = must(Qcow2Image::open(path, OpenMode::ReadWrite, oo));
  if (!unsafe) {
    // Where the top layer shows its old backing file through, keep those bytes: copy every
    // cluster whose content differs between the old and the new backing into the top layer.
    std::unique_ptr<BlockDevice> new_backing;
    if (!backing.empty()) new_backing = open_or_die(resolved, OpenMode::ReadOnly, backing_fmt);
    BlockDevice* old_backing = top->backing();
    uint64_t cs = top->cluster_size();
    std::vector<uint8_t> a(cs), b(cs);
    auto read_or_zero = [&](BlockDevice* d, uint64_t pos, std::vector<uint8_t>& out, uint64_t n) {
      std::memset(out.data(), 0, n);
      if (!d || pos >= d->size()) return;
      must(d->read(pos, std::span<uint8_t>(out.data(), std::min(n, d->size() - pos))));
    };
    for (uint64_t pos = 0; pos < top->size();) {
      uint64_t span = std::min<uint64_t>(64ULL << 20, top->size() - pos);
      auto ex = must(top->block_status(pos, span));
      for (auto& e : ex) {
        if (e.depth == 0 && e.allocated) continue;
        for (uint64_t p = e.offset; p < e.offset + e.length;) {
          uint64_t n = std::min<uint64_t>(cs - (p % cs), e.offset + e.length - p);
          read_or_zero(old_backing, p, a, n);
          read_or_zero(new_backing.get(), p, b, n);
          if (std::memcmp(a.data(), b.data(), n) != 0) must(top->write(p, std::span<const uint8_t>(a.data(), n)));
          p += n;
        }
      }
      pos += span;
    }
  }
  must(top->flush());
  must(top->set_backing(backing, backing_fmt));
  must(top->close());
  return 0;
}

int cmd_measure(int argc, char** argv) {
  static option longopts[] = {{"size", required_argument, nullptr, OPT_SIZE},
                              {"output", required_argument, nullptr, OPT_OUTPUT},
                              {nullptr, 0, nullptr, 0}};
  std::string fmt, out_fmt = "raw", options, output = "human";
  std::optional<uint64_t> size;
  int c;
  while ((c = getopt_long(argc, argv, "f:O:o:U", longopts, nullptr)) != -1) {
    if (c == 'f') fmt = optarg;
    else if (c == 'O') out_fmt = optarg;
    else if (c == 'o') options += (options.empty() ? "" : ",") + std::string(optarg);
    else if (c == OPT_SIZE) size = must(parse_size(optarg));
    else if (c == OPT_OUTPUT) output = optarg;
    else if (c == 'U') {}
    else usage();
  }
  uint64_t virtual_size = 0, allocated = 0;
  std::unique_ptr<BlockDevice> src;
  if (size) {
    virtual_size = *size;
  } else {
    if (optind >= argc) usage();
    src = open_or_die(argv[optind], OpenMode::ReadOnly, fmt);
    virtual_size = src->size();
  }
  ImageFormat of = must(parse_format(out_fmt));
  uint64_t required, full;
  if (of == ImageFormat::Raw) {
    full = virtual_size;
    required = virtual_size;
    if (src) {
      required = 0;
      for (auto& e : must(src->block_status(0, virtual_size))) if (e.data && !e.zero) required += e.length;
      required = virtual_size;
    }
  } else if (of == ImageFormat::Qcow2) {
    Qcow2CreateOptions o = qcow2_options(parse_options(options));
    uint64_t cs = o.cluster_size;
    virtual_size = (virtual_size + 511) & ~511ULL;
    auto meta = [&](uint64_t data_bytes) {
      // As qemu's qcow2_calc_prealloc_size: header, L2 tables, L1 table, refcount structures.
      uint64_t aligned = (virtual_size + cs - 1) / cs * cs;
      uint64_t total = cs;  // header
      uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
      uint64_t l2_tables = (aligned / cs + l2_entries - 1) / l2_entries;
      total += l2_tables * cs;
      uint64_t l1 = (l2_tables * 8 + cs - 1) / cs * cs;
      total += l1;
      total += data_bytes;
      uint64_t rb_entries = cs * 8 / static_cast<uint64_t>(o.refcount_bits);
      uint64_t meta_size = total;
      // Refcount blocks and table for everything, including themselves.
      uint64_t blocks = 0, table = 0;
      for (int i = 0; i < 8; ++i) {
        uint64_t clusters = (meta_size + (blocks + table) * cs + cs - 1) / cs;
        blocks = (clusters + rb_entries - 1) / rb_entries;
        table = (blocks * 8 + cs - 1) / cs;
      }
      return meta_size + (blocks + table) * cs;
    };
    if (src) {
      for (uint64_t pos = 0; pos < virtual_size;) {
        uint64_t n = std::min<uint64_t>(1ULL << 30, src->size() - pos);
        for (auto& e : must(src->block_status(pos, n))) {
          if (!e.data || e.zero) continue;
          uint64_t a = e.offset / cs * cs, b = (e.offset + e.length + cs - 1) / cs * cs;
          allocated += b - a;
        }
        pos += n;
        if (n == 0) break;
      }
    }
    // As qemu-img: the metadata of a fully allocated image, plus the data actually there.
    full = meta((virtual_size + cs - 1) / cs * cs);
    required = full - (virtual_size + cs - 1) / cs * cs + (src ? allocated : 0);
  } else {
    die("measure supports the raw and qcow2 output formats");
  }
  if (output == "json") {
    json j;
    if (of == ImageFormat::Qcow2) j["bitmaps"] = 0;
    j["required"] = required;
    j["fully-allocated"] = full;
    std::printf("%s\n", j.dump(4).c_str());
  } else {
    std::printf("required size: %llu\nfully allocated size: %llu\n", static_cast<unsigned long long>(required),
                static_cast<unsigned long long>(full));
    if (of == ImageFormat::Qcow2 && src) std::printf("bitmaps size: 0\n");
  }
  return 0;
}

// bench: the same request pattern as qemu-img bench (count requests of `size` bytes, `depth` in
// flight), issued from `depth` threads over one shared BlockDevice.
int cmd_bench(int argc, char** argv) {
  static option longopts[] = {{"pattern", required_argument, nullptr, OPT_PATTERN},
                              {"flush-interval", required_argument, nullptr, OPT_FLUSH_INTERVAL},
                              {"mixed", no_argument, nullptr, OPT_MIXED},
                              {nullptr, 0, nullptr, 0}};
  std::string fmt;
  uint64_t count = 75000, depth = 64, size = 4096, step = 0, offset = 0, flush_interval = 0;
  bool write = false, random = false, flush_at_end = true, mixed = false, bench_direct = false;
  int c;
  while ((c = getopt_long(argc, argv, "c:d:s:S:o:wf:t:i:nqU", longopts, nullptr)) != -1) {
    switch (c) {
      case 'c': count = std::strtoull(optarg, nullptr, 10); break;
      case 'd': depth = std::max<uint64_t>(1, std::strtoull(optarg, nullptr, 10)); break;
      case 's': size = must(parse_size(optarg)); break;
      case 'S': step = must(parse_size(optarg)); break;
      case 'o': offset = must(parse_size(optarg)); break;
      case 'w': write = true; break;
      case 'f': fmt = optarg; break;
      case OPT_PATTERN: random = std::string(optarg) == "random"; break;
      case OPT_FLUSH_INTERVAL: flush_interval = std::strtoull(optarg, nullptr, 10); break;
      case OPT_MIXED: mixed = true; write = true; random = true; break;
      case 't': bench_direct = parse_cache_mode(optarg) == CacheMode::None; break;
      case 'n': bench_direct = true; break;  // --nocache
      case 'i': case 'q': case 'U': break;
      default: usage();
    }
  }
  if (optind >= argc) usage();
  if (!step) step = size;
  std::unique_ptr<BlockDevice> dev;
  dev = open_or_die(argv[optind], write ? OpenMode::ReadWrite : OpenMode::ReadOnly, fmt,
                    bench_direct ? CacheMode::None : CacheMode::Writeback);
  uint64_t slots = dev->size() > offset + size ? (dev->size() - offset - size) / size + 1 : 1;
  std::printf("Sending %llu %s requests, %llu bytes each, %llu in parallel (starting at offset %llu, step size %llu)\n",
              static_cast<unsigned long long>(count), write ? "write" : "read", static_cast<unsigned long long>(size),
              static_cast<unsigned long long>(depth), static_cast<unsigned long long>(offset),
              static_cast<unsigned long long>(step));
  if (mixed && offset) {
    // Crash tests: [0, offset) gets a known pattern and is flushed before the random mix (which then
    // stays above offset), so a test can check that flushed data survives a kill and the repair.
    offset = std::min(offset, dev->size());
    std::vector<uint8_t> known(1 << 20, 0x5a);
    for (uint64_t pos = 0; pos < offset; pos += known.size())
      must(dev->write(pos, std::span<const uint8_t>(known.data(), std::min<uint64_t>(known.size(), offset - pos))));
    must(dev->flush());
    std::printf("prefilled %llu bytes\n", static_cast<unsigned long long>(offset));
    std::fflush(stdout);
  }
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  unsigned threads = static_cast<unsigned>(std::min<uint64_t>(depth, 8));
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<uint8_t> buf(size, static_cast<uint8_t>(0xa5 + t));
      std::mt19937_64 rng(t * 7919 + 1);
      while (true) {
        uint64_t i = next.fetch_add(1);
        if (i >= count || failed) return;
        uint64_t off = random ? offset + (rng() % slots) * size : offset + (i * step) % (slots * size);
        if (off + size > dev->size()) off = offset;
        Result<void> r;
        if (mixed) {
          // Stress mix for crash tests: unaligned writes, zeroes, discards, compressed clusters.
          uint64_t kind = rng() % 10;
          uint64_t len = 1 + rng() % (size * 4);
          if (offset >= dev->size()) return;
          off = offset + rng() % (dev->size() - offset);
          len = std::min(len, dev->size() - off);
          if (buf.size() < len) buf.resize(len, static_cast<uint8_t>(i));
          auto* q = dynamic_cast<Qcow2Image*>(dev.get());
          if (kind < 6) r = dev->write(off, std::span<const uint8_t>(buf.data(), len));
          else if (kind < 7) r = dev->write_zeroes(off, len);
          else if (kind < 8) r = dev->discard(off, len);
          else if (q && off / q->cluster_size() * q->cluster_size() >= offset) {
            uint64_t cs = q->cluster_size();
            uint64_t coff = off / cs * cs;
            uint64_t clen = std::min<uint64_t>(cs, dev->size() - coff);
            if (buf.size() < cs) buf.resize(cs, 1);
            r = q->write_compressed(coff, std::span<const uint8_t>(buf.data(), clen));
          } else r = dev->write(off, std::span<const uint8_t>(buf.data(), len));
        } else {
          r = write ? dev->write(off, buf) : dev->read(off, buf);
        }
        if (r && flush_interval && write && i % flush_interval == flush_interval - 1) r = dev->flush();
        if (!r) {
          std::fprintf(stderr, "keel-img: %s\n", r.error().message().c_str());
          failed = true;
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  if (write && flush_at_end) must(dev->flush());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("Run completed in %.3f seconds.\n", secs);
  return failed ? 1 : 0;
}

int cmd_serve(int argc, char** argv) {
  static option longopts[] = {{"socket", required_argument, nullptr, OPT_SOCKET},
                              {"port", required_argument, nullptr, OPT_PORT},
                              {"read-only", no_argument, nullptr, OPT_READ_ONLY},
                              {"shared", required_argument, nullptr, OPT_SHARED},
                              {"persistent", no_argument, nullptr, 't'},
                              {"export-name", required_argument, nullptr, 'x'},
                              {"cache", required_argument, nullptr, OPT_CACHE},
                              {"nocache", no_argument, nullptr, 'n'},
                              {nullptr, 0, nullptr, 0}};
  NbdServerOptions so;
  std::string fmt;
  bool read_only = false;
  CacheMode cache = CacheMode::Writeback;
  int c;
  while ((c = getopt_long(argc, argv, "f:tx:n", longopts, nullptr)) != -1) {
    switch (c) {
      case OPT_CACHE: cache = parse_cache_mode(optarg); break;
      case 'n': cache = CacheMode::None; break;
      case 'f': fmt = optarg; break;
      case 't': so.persistent = true; break;
      case 'x': so.export_name = optarg; break;
      case OPT_SOCKET: so.socket_path = optarg; break;
      case OPT_PORT: so.port = std::atoi(optarg); break;
      case OPT_READ_ONLY: read_only = true; break;
      case OPT_SHARED: so.max_clients = std::max(1, std::atoi(optarg)); break;
      default: usage();
    }
  }
  if (optind >= argc || (so.socket_path.empty() && so.port == 0)) usage();
  auto dev = open_or_die(argv[optind], read_only ? OpenMode::ReadOnly : OpenMode::ReadWrite, fmt, cache);
  so.read_only = read_only;
  must(serve_nbd(*dev, so));
  if (auto* q = dynamic_cast<Qcow2Image*>(dev.get())) must(q->close());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage();
  // Warnings (such as the repair of a dirty image on open) go to stderr, never into the output.
  keel::init_logging("keel-img", "warn");
  std::string cmd = argv[1];
  if (cmd == "--version" || cmd == "-V") {
    std::printf("keel-img version 0.1.0\n");
    return 0;
  }
  if (cmd == "--help" || cmd == "-h") usage();
  argv[1] = argv[0];
  --argc;
  ++argv;
  if (cmd == "create") return cmd_create(argc, argv);
  if (cmd == "info") return cmd_info(argc, argv);
  if (cmd == "check") return cmd_check(argc, argv);
  if (cmd == "convert") return cmd_convert(argc, argv);
  if (cmd == "compare") return cmd_compare(argc, argv);
  if (cmd == "map") return cmd_map(argc, argv);
  if (cmd == "resize") return cmd_resize(argc, argv);
  if (cmd == "snapshot") return cmd_snapshot(argc, argv);
  if (cmd == "commit") return cmd_commit(argc, argv);
  if (cmd == "rebase") return cmd_rebase(argc, argv);
  if (cmd == "measure") return cmd_measure(argc, argv);
  if (cmd == "bench") return cmd_bench(argc, argv);
  if (cmd == "serve") return cmd_serve(argc, argv);
  std::fprintf(stderr, "keel-img: unknown command '%s'\n", cmd.c_str());
  usage();
}
