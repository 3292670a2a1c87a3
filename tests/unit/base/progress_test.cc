#include "base/progress.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <sstream>

namespace keel {
namespace {

std::string capture(ProgressStyle style, void (*drive)(Progress&)) {
  char* buf = nullptr;
  size_t len = 0;
  std::FILE* stream = ::open_memstream(&buf, &len);
  {
    Progress p("copy", 1000, style, stream);
    drive(p);
  }
  std::fclose(stream);
  std::string out(buf, len);
  std::free(buf);
  return out;
}

TEST(Progress, BarRendersFractionAndSizes) {
  EXPECT_EQ(Progress::render_bar("convert", 512, 1024, 10), "convert [#####.....]  50.0% 512 B / 1 KiB");
  EXPECT_EQ(Progress::render_bar("x", 5, 0, 4), "x [....]   0.0% 5 B / 0 B");
  EXPECT_EQ(Progress::render_bar("x", 9, 3, 4), "x [####] 100.0% 9 B / 3 B");
}

TEST(Progress, QuietWritesNothing) {
  EXPECT_EQ(capture(ProgressStyle::Quiet, [](Progress& p) { p.update(500); }), "");
}

TEST(Progress, AutoIsQuietWhenNotATerminal) {
  auto out = capture(ProgressStyle::Auto, [](Progress& p) { p.update(500); });
  EXPECT_EQ(out, "");
}

TEST(Progress, JsonLinesEndWithAFinalRecord) {
  auto out = capture(ProgressStyle::Json, [](Progress& p) {
    p.update(100);
    p.advance(100);
  });
  std::istringstream lines(out);
  std::string line, last;
  int count = 0;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);  // every line is a complete JSON object
    EXPECT_EQ(j["progress"]["label"], "copy");
    last = line;
    ++count;
  }
  ASSERT_GE(count, 2);
  auto final_record = nlohmann::json::parse(last)["progress"];
  EXPECT_EQ(final_record["done"], 1000);
  EXPECT_EQ(final_record["percent"], 100.0);
  EXPECT_EQ(final_record["final"], true);
}

TEST(Progress, BarEndsWithNewline) {
  auto out = capture(ProgressStyle::Bar, [](Progress& p) { p.update(10); });
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(out.back(), '\n');
  EXPECT_NE(out.find("100.0%"), std::string::npos);
}

}  // namespace
}  // namespace keel
