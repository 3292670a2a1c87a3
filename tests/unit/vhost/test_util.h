// Shared bits of the vhost unit tests: a temporary socket path and a port + synthetic front-end pair
// running on the test's thread.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "synthetic_frontend.h"
#include "vhost/net_port.h"

namespace keel::vhost::testing {

class TempDir {
public:
  TempDir() {
    char templ[] = "/tmp/keel-vhost-test-XXXXXX";
    path_ = mkdtemp(templ);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

private:
  std::string path_;
};

class PortFixture : public ::testing::Test {
protected:
  void make_port(VhostNetOptions options = {}) {
    options.socket_path = dir.file("net.sock");
    auto port_or = VhostNetPort::create(options);
    ASSERT_TRUE(port_or) << port_or.error().message();
    port = std::move(*port_or);
  }
  // A front-end connected to the port (server mode) and started.
  void connect_frontend(FrontendOptions options = {}, bool start = true) {
    auto fe_or = SyntheticFrontend::connect(dir.file("net.sock"), options);
    ASSERT_TRUE(fe_or) << fe_or.error().message();
    fe = std::move(*fe_or);
    fe->set_pump([this] { pump(); });
    if (start) {
      auto r = fe->start();
      ASSERT_TRUE(r) << r.error().message();
    }
  }
  void setup(VhostNetOptions port_options = {}, FrontendOptions fe_options = {}) {
    make_port(port_options);
    connect_frontend(fe_options);
  }
  void pump() {
    auto r = port->handle_events();
    ASSERT_TRUE(r) << r.error().message();
  }
  // Runs the port until the guest's transmitted frames are all received; returns them.
  std::vector<std::vector<uint8_t>> receive_all() {
    std::vector<std::vector<uint8_t>> frames;
    RxBatch batch;
    pump();
    for (int i = 0; i < 100; ++i) {
      size_t n = port->receive_batch(batch);
      for (size_t f = 0; f < n; ++f) frames.emplace_back(batch.frame(f).begin(), batch.frame(f).end());
      if (n == 0 && !batch.more()) break;
    }
    port->release();
    return frames;
  }

  TempDir dir;
  std::unique_ptr<VhostNetPort> port;
  std::unique_ptr<SyntheticFrontend> fe;
};

}  // namespace keel::vhost::testing
