// HoleMap: which parts of a file hold data and which are holes, from SEEK_DATA/SEEK_HOLE, then
// kept current by the writes we make. lseek(SEEK_HOLE) scans from its offset to the next hole,
// which in a dense file is its end: asking per request would make block status cost as much as
// the file is long. So each data run is asked about once, front to back, as far as requests
// reach (a convert's first chunk does not wait for the whole file's walk). Writes by other
// processes while we hold the file are not seen.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "base/result.h"

namespace keel::disk {

class HoleMap {
public:
  struct Piece {
    uint64_t start;
    uint64_t end;
    bool data;
  };
  // [start, end) of the file as consecutive pieces.
  Result<std::vector<Piece>> pieces(int fd, uint64_t start, uint64_t end);
  // We wrote [start, start+length): it holds data now.
  void note_data(uint64_t start, uint64_t length);
  // Holes may have appeared (hole punching): look again next time.
  void invalidate();

private:
  // Walks the file until [0, end) is known (or its end is reached).
  Result<void> walk_to(int fd, uint64_t end);
  void add_data(uint64_t start, uint64_t end);

  std::mutex mutex_;
  bool started_ = false;
  uint64_t file_size_ = 0;              // when the walk started; past it, only our writes are data
  uint64_t known_end_ = 0;              // [0, known_end_) walked
  bool all_data_ = false;               // no SEEK_DATA support: everything is data
  std::map<uint64_t, uint64_t> data_;   // start -> end, disjoint, not touching
};

}  // namespace keel::disk
