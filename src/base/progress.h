// Progress for long operations (convert, copy, image builds, migration).
//
// On a terminal it draws a bar that redraws in place; in JSON mode it writes one JSON object per
// line ({"progress":{"label":...,"done":...,"total":...,"percent":...}}) for scripts; otherwise it
// stays quiet. Updates are rate-limited, so calling update() per block is cheap.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace keel {

enum class ProgressStyle {
  Auto,   // Bar when the stream is a terminal, else Quiet
  Bar,
  Json,
  Quiet,
};

class Progress {
public:
  Progress(std::string label, uint64_t total, ProgressStyle style = ProgressStyle::Auto,
           std::FILE* stream = stderr);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void set_total(uint64_t total) { total_ = total; }
  void update(uint64_t done);
  void advance(uint64_t delta) { update(done_ + delta); }
  // Draws 100% (or the final count) and ends the line. Called by the destructor if not before.
  void finish();

  ProgressStyle style() const { return style_; }

  // The bar line as it would be drawn, without the carriage return: for tests.
  static std::string render_bar(const std::string& label, uint64_t done, uint64_t total, int width);

private:
  void draw(bool final);

  std::string label_;
  uint64_t total_;
  uint64_t done_ = 0;
  ProgressStyle style_;
  std::FILE* stream_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
  int last_percent_ = -1;
};

}  // namespace keel
