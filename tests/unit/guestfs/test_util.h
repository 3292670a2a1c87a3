// Helpers for guestfs unit tests: make filesystems with the real mkfs tools into memory.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "guestfs/devices.h"

namespace keel::guestfs::testing {

// Runs `command` with "%s" replaced by a fresh temporary file of `size` bytes; returns its bytes.
inline std::vector<uint8_t> make_image(const std::string& command, size_t size) {
  char path[] = "/tmp/keel-guestfs-unit-XXXXXX";
  int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(ftruncate(fd, off_t(size)), 0);
  close(fd);
  std::string cmd = command;
  size_t at;
  while ((at = cmd.find("%s")) != std::string::npos) cmd.replace(at, 2, path);
  EXPECT_EQ(std::system((cmd + " >/dev/null 2>&1").c_str()), 0) << cmd;
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  unlink(path);
  return bytes;
}

inline std::span<const uint8_t> bytes_of(const std::string& s) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

}  // namespace keel::guestfs::testing
