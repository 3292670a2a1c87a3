#include "base/progress.h"

#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/size.h"

namespace keel {

Progress::Progress(std::string label, uint64_t total, ProgressStyle style, std::FILE* stream)
    : label_(std::move(label)), total_(total), style_(style), stream_(stream) {
  if (style_ == ProgressStyle::Auto)
    style_ = ::isatty(::fileno(stream_)) ? ProgressStyle::Bar : ProgressStyle::Quiet;
}

Progress::~Progress() { finish(); }

void Progress::update(uint64_t done) {
  done_ = done;
  if (style_ == ProgressStyle::Quiet || finished_) return;
  int percent = total_ ? static_cast<int>(done_ * 100 / total_) : 0;
  auto now = std::chrono::steady_clock::now();
  // Redraw at most 10 times a second, and only when something visible changed.
  if (now - last_draw_ < std::chrono::milliseconds(100)) return;
  if (style_ == ProgressStyle::Json && percent == last_percent_) return;
  last_draw_ = now;
  last_percent_ = percent;
  draw(false);
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  if (style_ == ProgressStyle::Quiet) return;
  if (total_ && done_ < total_) done_ = total_;
  draw(true);
}

std::string Progress::render_bar(const std::string& label, uint64_t done, uint64_t total, int width) {
  double fraction = total ? static_cast<double>(done) / static_cast<double>(total) : 0.0;
  if (fraction > 1.0) fraction = 1.0;
  int filled = static_cast<int>(fraction * width);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  return fmt::format("{} [{}] {:5.1f}% {} / {}", label, bar, fraction * 100.0, format_size(done),
                     format_size(total));
}

void Progress::draw(bool final) {
  if (style_ == ProgressStyle::Bar) {
    std::string line = render_bar(label_, done_, total_, 30);
    // \r and clear-to-end-of-line redraw in place.
    std::fprintf(stream_, "\r%s\x1b[K%s", line.c_str(), final ? "\n" : "");
  } else if (style_ == ProgressStyle::Json) {
    nlohmann::json j = {{"progress",
                         {{"label", label_},
                          {"done", done_},
                          {"total", total_},
                          {"percent", total_ ? static_cast<double>(done_) * 100.0 / static_cast<double>(total_) : 0.0},
                          {"final", final}}}};
    std::fprintf(stream_, "%s\n", j.dump().c_str());
  }
  std::fflush(stream_);
}

}  // namespace keel
