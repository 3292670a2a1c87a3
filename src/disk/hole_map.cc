#include "disk/hole_map.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

namespace keel::disk {

Result<void> HoleMap::walk_to(int fd, uint64_t end) {
  if (!started_) {
    data_.clear();
    all_data_ = false;
    known_end_ = 0;
    struct stat st;
    if (::fstat(fd, &st) < 0) return fail_errno("fstat");
    file_size_ = static_cast<uint64_t>(st.st_size);
    started_ = true;
  }
  while (!all_data_ && known_end_ < std::min(end, file_size_)) {
    off_t d = ::lseek(fd, static_cast<off_t>(known_end_), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) {  // holes to the end
        known_end_ = file_size_;
        break;
      }
      all_data_ = true;  // the filesystem cannot tell
      break;
    }
    off_t h = ::lseek(fd, d, SEEK_HOLE);
    uint64_t stop = h < 0 ? file_size_ : static_cast<uint64_t>(h);
    if (stop <= static_cast<uint64_t>(d)) stop = std::max(file_size_, static_cast<uint64_t>(d) + 1);
    add_data(static_cast<uint64_t>(d), stop);
    known_end_ = stop;
  }
  return ok();
}

void HoleMap::add_data(uint64_t start, uint64_t end) {
  // Merge with every range that overlaps or touches [start, end).
  auto it = data_.upper_bound(start);
  if (it != data_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= start) {
      start = prev->first;
      end = std::max(end, prev->second);
      it = data_.erase(prev);
    }
  }
  while (it != data_.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = data_.erase(it);
  }
  data_[start] = end;
}

void HoleMap::note_data(uint64_t start, uint64_t length) {
  if (length == 0) return;
  std::lock_guard lock(mutex_);
  if (!started_ || all_data_) return;
  add_data(start, start + length);
}

void HoleMap::invalidate() {
  std::lock_guard lock(mutex_);
  started_ = false;
}

Result<std::vector<HoleMap::Piece>> HoleMap::pieces(int fd, uint64_t start, uint64_t end) {
  std::lock_guard lock(mutex_);
  TRY(walk_to(fd, end));
  std::vector<Piece> out;
  if (all_data_) {
    out.push_back({start, end, true});
    return out;
  }
  uint64_t pos = start;
  auto it = data_.upper_bound(start);
  if (it != data_.begin()) --it;
  for (; it != data_.end() && pos < end; ++it) {
    uint64_t a = std::max(it->first, pos), b = std::min(it->second, end);
    if (b <= pos) continue;
    if (a >= end) break;
    if (a > pos) out.push_back({pos, a, false});
    out.push_back({a, b, true});
    pos = b;
  }
  if (pos < end) out.push_back({pos, end, false});
  return out;
}

}  // namespace keel::disk
