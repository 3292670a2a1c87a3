// libvirt domain XML and xl.cfg import against golden files: data/<kind>/<name>.<ext> imports to
// data/<kind>/<name>.expected.json ({"definition": ..., "ignored": [...]} or {"error": ...}).
// KEEL_UPDATE_GOLDEN=1 rewrites the golden files (review the diff).
#include <gtest/gtest.h>

#include <dirent.h>

#include <algorithm>
#include <cstdlib>

#include "base/unique_fd.h"
#include "qemu/libvirt_xml.h"
#include "qemu/xl_cfg.h"

#ifndef KEEL_QEMU_TEST_DATA
#error KEEL_QEMU_TEST_DATA must point at tests/unit/qemu/data
#endif

namespace keel::qemu {
namespace {

using nlohmann::json;

std::vector<std::string> files_with(const std::string& dir, const std::string& ext) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > ext.size() && n.compare(n.size() - ext.size(), ext.size(), ext) == 0) out.push_back(n);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

json outcome(const Result<ImportResult>& r) {
  if (!r) return {{"error", r.error().message()}};
  return {{"definition", domain_to_json(r->def)}, {"ignored", r->ignored}};
}

void check_golden(const std::string& dir, const std::string& ext,
                  Result<ImportResult> (*import)(std::string_view)) {
  auto files = files_with(dir, ext);
  ASSERT_FALSE(files.empty()) << dir;
  bool update = std::getenv("KEEL_UPDATE_GOLDEN") != nullptr;
  for (auto& f : files) {
    SCOPED_TRACE(f);
    auto text = read_file(dir + "/" + f);
    ASSERT_TRUE(text);
    json got = outcome(import(*text));
    std::string golden = dir + "/" + f.substr(0, f.size() - ext.size()) + ".expected.json";
    if (update) {
      ASSERT_TRUE(write_file(golden, got.dump(2) + "\n"));
      continue;
    }
    auto want = read_file(golden);
    ASSERT_TRUE(want) << "missing golden file " << golden << " (run with KEEL_UPDATE_GOLDEN=1)";
    EXPECT_EQ(got, json::parse(*want)) << got.dump(2);
  }
}

TEST(LibvirtImport, GoldenFiles) { check_golden(std::string(KEEL_QEMU_TEST_DATA) + "/libvirt", ".xml", import_libvirt_xml); }
TEST(XlImport, GoldenFiles) { check_golden(std::string(KEEL_QEMU_TEST_DATA) + "/xl", ".cfg", import_xl_cfg); }

TEST(LibvirtImport, AtLeastTwentyGoodFiles) {
  int good = 0;
  std::string dir = std::string(KEEL_QEMU_TEST_DATA) + "/libvirt";
  for (auto& f : files_with(dir, ".xml")) good += import_libvirt_xml(*read_file(dir + "/" + f)).has_value();
  EXPECT_GE(good, 20);
}

TEST(LibvirtImport, ExportImportsBackTheSame) {
  std::string dir = std::string(KEEL_QEMU_TEST_DATA) + "/libvirt";
  for (auto& f : files_with(dir, ".xml")) {
    SCOPED_TRACE(f);
    auto r = import_libvirt_xml(*read_file(dir + "/" + f));
    if (!r) continue;
    assign_defaults(r->def);
    std::string xml = export_libvirt_xml(r->def);
    auto back = import_libvirt_xml(xml);
    ASSERT_TRUE(back) << back.error().message() << "\n" << xml;
    EXPECT_EQ(domain_to_json(back->def), domain_to_json(r->def)) << xml;
    EXPECT_TRUE(back->ignored.empty()) << back->ignored.front();
  }
}

TEST(LibvirtImport, MalformedXml) {
  auto r = import_libvirt_xml("<domain><name>x</name>");
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("malformed XML"), std::string::npos);
  EXPECT_FALSE(import_libvirt_xml(""));
  EXPECT_FALSE(import_libvirt_xml("<network/>"));
  EXPECT_FALSE(import_libvirt_xml("<domain><name>x</name><memory unit='parsecs'>1</memory></domain>"));
  EXPECT_FALSE(import_libvirt_xml("<domain><name>x</name><memory>99999999999999999999999</memory></domain>"));
}

}  // namespace
}  // namespace keel::qemu
