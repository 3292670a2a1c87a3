// The backend without virtio-net: a small block-like device with its own config space, driving its
// queue through the generic VirtQueue API, as a storage back-end would.
#include <gtest/gtest.h>

#include <array>
#include <cstring>

#include "test_util.h"
#include "vhost/backend.h"

namespace keel::vhost::testing {
namespace {

class TestBlockDevice : public VhostDevice {
public:
  uint64_t device_features() const override { return feature_bit(kVirtioFVersion1); }
  uint32_t max_queues() const override { return 2; }
  bool has_config() const override { return true; }
  Result<void> read_config(uint32_t offset, std::span<uint8_t> out) override {
    std::memcpy(out.data(), config.data() + offset, out.size());
    return ok();
  }
  Result<void> write_config(uint32_t offset, std::span<const uint8_t> data) override {
    // Only the writeback byte (offset 32) is writable, as in virtio-blk.
    if (offset != 32 || data.size() != 1) return fail_invalid("read-only config field");
    config[32] = data[0];
    return ok();
  }
  void on_queue_ready(uint32_t index, bool ready) override { ready_[index] = ready; }

  std::array<uint8_t, 60> config{};
  bool ready_[2] = {false, false};
};

class GenericDeviceTest : public ::testing::Test {
protected:
  void SetUp() override {
    for (size_t i = 0; i < device.config.size(); ++i) device.config[i] = static_cast<uint8_t>(i + 1);
    BackendOptions opts;
    opts.socket_path = dir.file("blk.sock");
    auto b = VhostUserBackend::create(device, opts);
    ASSERT_TRUE(b) << b.error().message();
    backend = std::move(*b);
    auto fe_or = SyntheticFrontend::connect(opts.socket_path, {});
    ASSERT_TRUE(fe_or);
    fe = std::move(*fe_or);
    fe->set_pump([this] { ASSERT_TRUE(backend->handle_events()); });
  }
  Result<std::vector<uint8_t>> get_config(uint32_t offset, uint32_t size) {
    std::vector<uint8_t> payload(sizeof(ConfigHeader) + size);
    ConfigHeader h{offset, size, 0};
    std::memcpy(payload.data(), &h, sizeof h);
    return fe->request(Request::GetConfig, payload, {}, true);
  }

  TempDir dir;
  TestBlockDevice device;
  std::unique_ptr<VhostUserBackend> backend;
  std::unique_ptr<SyntheticFrontend> fe;
};

TEST_F(GenericDeviceTest, ConfigSpaceThroughGetAndSetConfig) {
  ASSERT_TRUE(fe->start());
  auto pf = fe->request(Request::GetProtocolFeatures, {}, {}, true);
  ASSERT_TRUE(pf);
  uint64_t protocol;
  std::memcpy(&protocol, pf->data(), 8);
  ASSERT_TRUE(protocol & feature_bit(kProtocolConfig));
  uint64_t set = feature_bit(kProtocolConfig) | feature_bit(kProtocolReplyAck);
  ASSERT_TRUE(fe->request(Request::SetProtocolFeatures, as_bytes_of(set)));

  auto reply = get_config(0, 60);
  ASSERT_TRUE(reply) << reply.error().message();
  ASSERT_EQ(reply->size(), sizeof(ConfigHeader) + 60);
  EXPECT_EQ(std::memcmp(reply->data() + sizeof(ConfigHeader), device.config.data(), 60), 0);
  auto part = get_config(8, 4);
  ASSERT_TRUE(part);
  EXPECT_EQ((*part)[sizeof(ConfigHeader)], 9);

  std::vector<uint8_t> write(sizeof(ConfigHeader) + 1);
  ConfigHeader h{32, 1, 0};
  std::memcpy(write.data(), &h, sizeof h);
  write.back() = 0xaa;
  EXPECT_TRUE(fe->request(Request::SetConfig, write, {}, false, true));
  EXPECT_EQ(device.config[32], 0xaa);
  h.offset = 0;
  std::memcpy(write.data(), &h, sizeof h);
  EXPECT_FALSE(fe->request(Request::SetConfig, write, {}, false, true));  // refused, still connected
  EXPECT_TRUE(backend->connected());

  // A window past the config space is a protocol violation.
  auto bad = get_config(250, 10);
  EXPECT_FALSE(bad);
  EXPECT_FALSE(backend->connected());
}

TEST_F(GenericDeviceTest, DeviceRunsItsQueueThroughTheGenericApi) {
  ASSERT_TRUE(fe->start());
  EXPECT_TRUE(device.ready_[0]);
  EXPECT_TRUE(device.ready_[1]);
  // A request as virtio-blk lays it out: a readable header, a writable data buffer, a writable
  // status byte.
  uint64_t header = fe->alloc(16), data = fe->alloc(512), status = fe->alloc(1);
  std::memcpy(fe->host(header), "READ-SECTOR-0001", 16);
  VringDesc* desc = fe->desc_table(0);
  desc[0] = {header, 16, kDescFNext, 1};
  desc[1] = {data, 512, kDescFWrite | kDescFNext, 2};
  desc[2] = {status, 1, kDescFWrite, 0};
  fe->publish_avail(0, 0);
  fe->kick(0, true);
  ASSERT_TRUE(backend->handle_events());
  EXPECT_TRUE(backend->take_kicked() & 1);

  VirtQueue& q = backend->queue(0);
  DescChain chain;
  ASSERT_EQ(q.pop(backend->memory(), chain), VirtQueue::PopStatus::Chain);
  ASSERT_EQ(chain.num_readable, 1);
  ASSERT_EQ(chain.num_writable, 2);
  EXPECT_EQ(std::memcmp(chain.readable()[0].data, "READ-SECTOR-0001", 16), 0);
  std::memset(chain.writable()[0].data, 0x5a, 512);
  chain.writable()[1].data[0] = 0;  // VIRTIO_BLK_S_OK
  q.push_used(chain.head, 513);
  q.publish_used();
  EXPECT_TRUE(q.notify_if_needed());
  EXPECT_EQ(q.pop(backend->memory(), chain), VirtQueue::PopStatus::Empty);

  EXPECT_EQ(fe->host(data)[511], 0x5a);
  EXPECT_EQ(fe->host(status)[0], 0);
  uint16_t used_idx;
  std::memcpy(&used_idx, fe->used_ring(0) + 2, 2);
  EXPECT_EQ(used_idx, 1);
  EXPECT_EQ(fe->take_calls(0), 1u);
}

TEST(VhostNetConfig, NetPortLeavesConfigToQemu) {
  TempDir dir;
  VhostNetOptions opts;
  opts.socket_path = dir.file("n.sock");
  auto port = VhostNetPort::create(opts);
  ASSERT_TRUE(port);
  auto fe_or = SyntheticFrontend::connect(opts.socket_path, {});
  ASSERT_TRUE(fe_or);
  auto& fe = *fe_or;
  fe->set_pump([&] { ASSERT_TRUE((*port)->handle_events()); });
  ASSERT_TRUE(fe->start());
  std::vector<uint8_t> payload(sizeof(ConfigHeader) + 6);
  ConfigHeader h{0, 6, 0};
  std::memcpy(payload.data(), &h, sizeof h);
  auto reply = fe->request(Request::GetConfig, payload, {}, true);
  ASSERT_TRUE(reply);
  EXPECT_TRUE(reply->empty());  // failure, and the connection stays
  EXPECT_TRUE(fe->sync());
}

}  // namespace
}  // namespace keel::vhost::testing
