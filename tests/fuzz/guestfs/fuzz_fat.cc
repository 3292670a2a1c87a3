// The input is a FAT filesystem: probe it, walk every directory and read every file, then (on a
// copy) create, extend, rename and delete files and directories.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "guestfs/devices.h"
#include "guestfs/fat_fs.h"
#include "guestfs/util.h"

using namespace keel::guestfs;

static void walk(Filesystem& fs, const std::string& dir, int depth, int& budget) {
  if (depth > 8) return;
  auto entries = fs.readdir(dir);
  if (!entries) return;
  for (const auto& e : *entries) {
    if (--budget < 0) return;
    std::string path = join_path(dir, e.name);
    auto st = fs.lstat(path);
    if (!st) continue;
    if (e.type == FileType::Directory) {
      walk(fs, path, depth + 1, budget);
    } else {
      (void)fs.read(path, 0, 1 << 20, [](std::span<const uint8_t>) -> keel::Result<void> { return keel::ok(); });
    }
  }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> bytes(data, data + size);
  {
    MemoryDevice disk(bytes, true);
    (void)probe_fat(disk);
    auto fs = open_fat_filesystem(disk, true);
    if (!fs) return 0;
    int budget = 2000;
    walk(**fs, "/", 0, budget);
    (void)(*fs)->statvfs();
  }
  MemoryDevice disk(bytes, false);
  auto fs = open_fat_filesystem(disk, false);
  if (!fs) return 0;
  Filesystem& f = **fs;
  static const uint8_t payload[3000] = {1, 2, 3};
  (void)f.mkdir("/fuzz dir", 0755);
  (void)f.write("/fuzz dir/a long file name.txt", std::span<const uint8_t>(payload, sizeof payload),
                WriteMode::Truncate, 0644);
  (void)f.write("/fuzz dir/a long file name.txt", std::span<const uint8_t>(payload, 100), WriteMode::Append, 0644);
  (void)f.rename("/fuzz dir/a long file name.txt", "/moved.txt");
  (void)f.unlink("/moved.txt");
  (void)f.rmdir("/fuzz dir");
  (void)f.sync();
  return 0;
}
