#include <gtest/gtest.h>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cstring>

#include "test_util.h"

namespace keel::vhost::testing {
namespace {

using Frames = std::vector<std::vector<uint8_t>>;

class NetPortTest : public PortFixture {};

TEST_F(NetPortTest, NegotiatesFeaturesAndBringsLinkUp) {
  bool link_events = false;
  make_port();
  port->set_link_callback([&](bool up) { link_events = up; });
  connect_frontend();
  uint64_t f = fe->acked_features();
  EXPECT_TRUE(f & feature_bit(kVirtioFVersion1));
  EXPECT_TRUE(f & feature_bit(kVirtioNetFMrgRxbuf));
  EXPECT_TRUE(f & feature_bit(kVirtioFRingEventIdx));
  EXPECT_TRUE(f & feature_bit(kVirtioFRingIndirectDesc));
  EXPECT_TRUE(f & feature_bit(kFeatureProtocolFeatures));
  EXPECT_FALSE(f & feature_bit(kVirtioNetFCsum));  // no offloads offered
  EXPECT_FALSE(f & feature_bit(kVirtioFRingPacked));
  EXPECT_TRUE(fe->acked_protocol_features() & feature_bit(kProtocolReplyAck));
  EXPECT_EQ(fe->backend_queue_num(), 2u);
  EXPECT_EQ(port->negotiated_features(), f);
  EXPECT_TRUE(port->link_up());
  EXPECT_TRUE(link_events);
  EXPECT_EQ(port->active_queue_pairs(), 1);
}

TEST_F(NetPortTest, GuestTransmitReachesReceiveBatchInEveryLayout) {
  setup();
  Frames sent;
  const TxLayout layouts[] = {TxLayout::Single, TxLayout::SplitHeader, TxLayout::Indirect,
                              TxLayout::Scattered};
  uint32_t seed = 0;
  for (TxLayout layout : layouts) {
    for (size_t size : {60, 64, 1000, 1514}) {
      sent.push_back(make_frame(size, seed++));
      ASSERT_TRUE(fe->transmit(0, sent.back(), layout));
    }
  }
  fe->kick(1);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(got[i], sent[i]) << "frame " << i;
  EXPECT_EQ(fe->reclaim_tx(0), sent.size());
  EXPECT_EQ(fe->free_descriptors(1), fe->queue_size());
  EXPECT_GE(fe->take_calls(1), 1u);
  EXPECT_EQ(port->counters().rx_frames, sent.size());
  EXPECT_EQ(port->counters().device_errors, 0u);
}

TEST_F(NetPortTest, FramesLargerThanOneBufferArriveWhole) {
  setup();
  auto big = make_frame(9000, 7);  // buffers are 2 KiB: 5 descriptors
  ASSERT_TRUE(fe->transmit(0, big, TxLayout::Single));
  ASSERT_TRUE(fe->transmit(0, big, TxLayout::SplitHeader));
  fe->kick(1);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], big);
  EXPECT_EQ(got[1], big);
}

TEST_F(NetPortTest, SendMergesBuffersForLargeFrames) {
  setup();
  fe->post_rx_buffers(0);
  Frames sent = {make_frame(64, 1), make_frame(1514, 2), make_frame(9000, 3), make_frame(65535, 4)};
  for (auto& f : sent) EXPECT_TRUE(port->send(f));
  Frames got;
  fe->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
  ASSERT_EQ(got.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(got[i], sent[i]) << "frame " << i;
  EXPECT_EQ(port->counters().tx_frames, sent.size());
  EXPECT_GE(fe->take_calls(0), 1u);
}

// Offloads: offered only when asked, the guest's header reaches the receiver, and send_offloaded()
// writes a header with the frame in two parts.
constexpr uint64_t kOffloadFeatures = feature_bit(kVirtioNetFCsum) | feature_bit(kVirtioNetFGuestCsum) |
                                      feature_bit(kVirtioNetFHostTso4) | feature_bit(kVirtioNetFHostTso6) |
                                      feature_bit(kVirtioNetFGuestTso4) | feature_bit(kVirtioNetFGuestTso6);

VhostNetOptions with_offloads() {
  VhostNetOptions o;
  o.offloads = true;
  return o;
}

TEST_F(NetPortTest, OffloadsAreOfferedOnlyWhenAsked) {
  setup(with_offloads());
  EXPECT_EQ(fe->acked_features() & kOffloadFeatures, kOffloadFeatures);
  EXPECT_TRUE(port->host_offloads());
  EXPECT_TRUE(port->guest_accepts(kVirtioNetHdrGsoTcpv4));
  EXPECT_TRUE(port->guest_accepts(kVirtioNetHdrGsoTcpv6));
  EXPECT_TRUE(port->guest_accepts(kVirtioNetHdrGsoTcpv4 | kVirtioNetHdrGsoEcn));
  EXPECT_FALSE(port->guest_accepts(3));  // UDP fragmentation offload: never offered
}

TEST_F(NetPortTest, GuestAcceptsOnlyTheOffloadsItNegotiated) {
  FrontendOptions fe_options;
  fe_options.wanted_features = ~(feature_bit(kVirtioNetFGuestTso4) | feature_bit(kVirtioNetFGuestEcn));
  setup(with_offloads(), fe_options);
  EXPECT_TRUE(port->guest_accepts(kVirtioNetHdrGsoTcpv6));
  EXPECT_FALSE(port->guest_accepts(kVirtioNetHdrGsoTcpv4));
  EXPECT_FALSE(port->guest_accepts(kVirtioNetHdrGsoTcpv6 | kVirtioNetHdrGsoEcn));
}

TEST_F(NetPortTest, TheGuestsHeaderReachesTheReceiverInEveryLayout) {
  setup(with_offloads());
  auto header = virtio_net_header(kVirtioNetHdrFNeedsCsum, kVirtioNetHdrGsoTcpv4, 54, 1448, 34, 16);
  auto frame = make_frame(20000, 3);
  const TxLayout layouts[] = {TxLayout::Single, TxLayout::SplitHeader, TxLayout::Scattered};
  for (TxLayout layout : layouts) ASSERT_TRUE(fe->transmit(0, frame, layout, header));
  fe->kick(1);
  RxBatch batch;
  pump();
  ASSERT_EQ(port->receive_batch(batch), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const VirtioNetHdr& h = batch.header(i);
    EXPECT_EQ(h.flags, kVirtioNetHdrFNeedsCsum);
    EXPECT_EQ(h.gso_type, kVirtioNetHdrGsoTcpv4);
    EXPECT_EQ(h.hdr_len, 54);
    EXPECT_EQ(h.gso_size, 1448);
    EXPECT_EQ(h.csum_start, 34);
    EXPECT_EQ(h.csum_offset, 16);
    EXPECT_TRUE(std::equal(frame.begin(), frame.end(), batch.frame(i).begin(), batch.frame(i).end()));
  }
  port->release();
}

TEST_F(NetPortTest, WithoutOffloadsTheGuestsHeaderIsIgnored) {
  setup();
  auto header = virtio_net_header(kVirtioNetHdrFNeedsCsum, kVirtioNetHdrGsoTcpv4, 54, 1448, 34, 16);
  ASSERT_TRUE(fe->transmit(0, make_frame(1514, 3), TxLayout::Single, header));
  fe->kick(1);
  RxBatch batch;
  pump();
  ASSERT_EQ(port->receive_batch(batch), 1u);
  EXPECT_EQ(batch.header(0).flags, 0);
  EXPECT_EQ(batch.header(0).gso_type, 0);
  port->release();
}

class SendOffloadedTest : public PortFixture {
protected:
  void check(bool mergeable) {
    VhostNetOptions options = with_offloads();
    options.mergeable_rx_buffers = mergeable;
    FrontendOptions fe_options;
    if (!mergeable) fe_options.buffer_size = 70000;  // a guest without MRG_RXBUF posts 64 KB buffers
    fe_options.memory_size = 64 << 20;
    fe_options.queue_size = mergeable ? 256 : 64;
    setup(options, fe_options);
    fe->post_rx_buffers(0);
    auto frame = make_frame(30054, 9);
    std::span<const uint8_t> head(frame.data(), 54), payload(frame.data() + 54, frame.size() - 54);
    VirtioNetHdr h{kVirtioNetHdrFNeedsCsum, kVirtioNetHdrGsoTcpv6, 54, 1440, 54, 16, 0};
    EXPECT_TRUE(port->send_offloaded(h, head, payload));
    std::vector<uint8_t> got_header, got;
    size_t n = fe->receive_with_header(0, [&](std::span<const uint8_t> hdr, std::span<const uint8_t> f) {
      got_header.assign(hdr.begin(), hdr.end());
      got.assign(f.begin(), f.end());
    });
    ASSERT_EQ(n, 1u);
    EXPECT_EQ(got, frame);
    auto want = virtio_net_header(kVirtioNetHdrFNeedsCsum, kVirtioNetHdrGsoTcpv6, 54, 1440, 54, 16);
    ASSERT_EQ(got_header.size(), 12u);
    EXPECT_TRUE(std::equal(want.begin(), want.begin() + 10, got_header.begin()));
    uint16_t buffers = uint16_t(got_header[10] | got_header[11] << 8);
    EXPECT_EQ(buffers, mergeable ? (30054 + 12 + 2047) / 2048 : 1);
    EXPECT_EQ(port->counters().tx_frames, 1u);
    EXPECT_EQ(port->counters().tx_bytes, frame.size());
  }
};

TEST_F(SendOffloadedTest, WritesTheHeaderThenHeadAndPayloadOverMergedBuffers) { check(true); }
TEST_F(SendOffloadedTest, WritesTheHeaderThenHeadAndPayloadIntoOneBigBuffer) { check(false); }

TEST_F(NetPortTest, SendWithoutBuffersDropsAndCounts) {
  setup();
  auto frame = make_frame(100, 1);
  EXPECT_FALSE(port->send(frame));
  EXPECT_EQ(port->counters().tx_dropped_no_buffers, 1u);
  // A frame needing more buffers than are posted is dropped whole, and the buffers stay posted.
  fe->post_rx_buffers(0, 2);
  auto big = make_frame(6000, 2);
  EXPECT_FALSE(port->send(big));
  EXPECT_TRUE(port->send(frame));
  Frames got;
  fe->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
  EXPECT_FALSE(port->send(make_frame(kMaxFrameSize + 1, 0)));
  EXPECT_EQ(port->counters().tx_dropped_too_big, 1u);
}

TEST_F(NetPortTest, SendBatchNotifiesOnce) {
  setup();
  fe->post_rx_buffers(0);
  Frames frames;
  for (uint32_t i = 0; i < 16; ++i) frames.push_back(make_frame(128, i));
  std::vector<std::span<const uint8_t>> spans(frames.begin(), frames.end());
  EXPECT_EQ(port->send_batch(spans), 16u);
  EXPECT_EQ(fe->take_calls(0), 1u);
  size_t n = fe->receive(0, [](std::span<const uint8_t>) {});
  EXPECT_EQ(n, 16u);
}

TEST_F(NetPortTest, WithoutMergeableBuffersEachFrameTakesOneBuffer) {
  FrontendOptions opts;
  opts.wanted_features = ~feature_bit(kVirtioNetFMrgRxbuf);
  opts.buffer_size = 16384;
  setup({}, opts);
  EXPECT_FALSE(fe->acked_features() & feature_bit(kVirtioNetFMrgRxbuf));
  fe->post_rx_buffers(0, 4);
  auto frame = make_frame(9000, 9);
  EXPECT_TRUE(port->send(frame));
  EXPECT_FALSE(port->send(make_frame(20000, 1)));  // larger than a buffer
  Frames got;
  fe->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
  // The too-small buffer comes back empty (a guest counts that as a length error).
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], frame);
  EXPECT_TRUE(got[1].empty());
}

TEST_F(NetPortTest, LegacyTenByteHeader) {
  FrontendOptions opts;
  opts.wanted_features = ~(feature_bit(kVirtioNetFMrgRxbuf) | feature_bit(kVirtioFVersion1));
  setup({}, opts);
  EXPECT_EQ(fe->header_size(), 10u);
  auto frame = make_frame(300, 3);
  ASSERT_TRUE(fe->transmit(0, frame, TxLayout::SplitHeader));
  fe->kick(1);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
  fe->post_rx_buffers(0, 1);
  EXPECT_TRUE(port->send(frame));
  got.clear();
  fe->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
}

TEST_F(NetPortTest, WithoutProtocolFeaturesRingsStartEnabled) {
  FrontendOptions opts;
  opts.protocol_features = false;
  setup({}, opts);
  EXPECT_FALSE(fe->acked_features() & feature_bit(kFeatureProtocolFeatures));
  EXPECT_TRUE(port->link_up());
  auto frame = make_frame(80, 1);
  ASSERT_TRUE(fe->transmit(0, frame));
  fe->kick(1);
  EXPECT_EQ(receive_all().size(), 1u);
}

TEST_F(NetPortTest, SplitMemoryRegionsWithOffsets) {
  FrontendOptions opts;
  opts.split_memory = true;
  opts.queue_size = 1024;  // queue 1's buffers land in the second region
  setup({}, opts);
  Frames sent;
  for (uint32_t i = 0; i < 300; ++i) {
    sent.push_back(make_frame(60 + i, i));
    ASSERT_TRUE(fe->transmit(0, sent.back()));
  }
  fe->kick(1);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), sent.size());
  EXPECT_EQ(got, sent);
  fe->post_rx_buffers(0);
  for (auto& f : sent) EXPECT_TRUE(port->send(f));
  got.clear();
  fe->receive(0, [&](std::span<const uint8_t> f) { got.emplace_back(f.begin(), f.end()); });
  EXPECT_EQ(got, sent);
}

TEST_F(NetPortTest, MultiQueue) {
  VhostNetOptions popts;
  popts.queue_pairs = 2;
  FrontendOptions fopts;
  fopts.queue_pairs = 2;
  setup(popts, fopts);
  EXPECT_TRUE(fe->acked_features() & feature_bit(kVirtioNetFMq));
  EXPECT_EQ(fe->backend_queue_num(), 4u);
  EXPECT_EQ(port->active_queue_pairs(), 2);
  auto f0 = make_frame(100, 0), f1 = make_frame(100, 1);
  fe->transmit(0, f0);
  fe->transmit(1, f1);
  fe->kick(1);
  fe->kick(3);
  pump();
  RxBatch batch;
  size_t n = port->receive_batch(batch);
  ASSERT_EQ(n, 2u);
  for (size_t i = 0; i < n; ++i) {
    std::vector<uint8_t> got(batch.frame(i).begin(), batch.frame(i).end());
    EXPECT_EQ(got, batch.queue_pair(i) == 0 ? f0 : f1);
  }
  port->release();
  fe->post_rx_buffers(0);
  fe->post_rx_buffers(1);
  EXPECT_TRUE(port->send(f1, 1));
  size_t on0 = fe->receive(0, [](auto) {});
  size_t on1 = fe->receive(1, [](auto) {});
  EXPECT_EQ(on0, 0u);
  EXPECT_EQ(on1, 1u);
  // Disabling pair 1 sends its traffic to pair 0.
  ASSERT_TRUE(fe->set_vring_enable(2, false));
  EXPECT_EQ(port->active_queue_pairs(), 1);
  EXPECT_TRUE(port->send(f1, 1));
  EXPECT_EQ(fe->receive(0, [](auto) {}), 1u);
}

TEST_F(NetPortTest, EventIdxSuppressesKicksAndCalls) {
  setup();
  auto frame = make_frame(64, 1);
  ASSERT_TRUE(fe->transmit(0, frame));
  EXPECT_TRUE(fe->kick(1));  // first one always
  ASSERT_TRUE(fe->transmit(0, frame));
  EXPECT_FALSE(fe->kick(1));  // the back-end has not caught up: no new kick needed
  EXPECT_EQ(receive_all().size(), 2u);
  ASSERT_TRUE(fe->transmit(0, frame));
  EXPECT_TRUE(fe->kick(1));  // caught up: it asked to be kicked again

  // Calls: the guest reads used entries up to used_event; more completions without the guest
  // catching up need no further interrupt.
  fe->take_calls(1);
  fe->reclaim_tx(0);
  EXPECT_EQ(receive_all().size(), 1u);
  EXPECT_EQ(fe->take_calls(1), 1u);
  ASSERT_TRUE(fe->transmit(0, frame));
  fe->kick(1, true);
  EXPECT_EQ(receive_all().size(), 1u);
  EXPECT_EQ(fe->take_calls(1), 0u);  // the guest has not consumed the previous completion
}

TEST_F(NetPortTest, RefillingReceiveBuffersNeedsNoKick) {
  setup();
  fe->post_rx_buffers(0, 16);
  fe->kick(0);  // the first may go out (the event index starts at 0)
  for (int round = 0; round < 3; ++round) {
    EXPECT_TRUE(port->send(make_frame(100, round)));
    EXPECT_EQ(fe->receive(0, [](auto) {}), 1u);  // re-posts the buffer
    EXPECT_FALSE(fe->kick(0));
  }
}

TEST_F(NetPortTest, RefillingWithoutEventIdxSetsNoNotify) {
  FrontendOptions opts;
  opts.wanted_features = ~feature_bit(kVirtioFRingEventIdx);
  setup({}, opts);
  uint16_t flags;
  std::memcpy(&flags, fe->used_ring(0), 2);
  EXPECT_EQ(flags, kUsedFNoNotify);
  std::memcpy(&flags, fe->used_ring(1), 2);
  EXPECT_EQ(flags, 0);
}

TEST_F(NetPortTest, RxBatchIsBoundedAndReportsMore) {
  setup();
  for (uint32_t i = 0; i < 100; ++i) ASSERT_TRUE(fe->transmit(0, make_frame(64, i)));
  fe->kick(1);
  pump();
  RxBatch batch;
  EXPECT_EQ(port->receive_batch(batch), RxBatch::kMaxFrames);
  EXPECT_TRUE(batch.more());
  EXPECT_EQ(batch.frame(0)[14], 0);
  // A caller that only acts on readiness is woken for the rest.
  pollfd p{port->poll_fd(), POLLIN, 0};
  EXPECT_EQ(poll(&p, 1, 0), 1);
  size_t total = RxBatch::kMaxFrames;
  while (batch.more()) total += port->receive_batch(batch);
  pump();
  EXPECT_EQ(poll(&p, 1, 0), 0);
  EXPECT_EQ(total, 100u);
  port->release();
  EXPECT_EQ(fe->reclaim_tx(0), 100u);
}

TEST_F(NetPortTest, GetVringBaseStopsTheRingAndReportsProgress) {
  setup();
  for (uint32_t i = 0; i < 5; ++i) fe->transmit(0, make_frame(64, i));
  fe->kick(1);
  EXPECT_EQ(receive_all().size(), 5u);
  auto base = fe->get_vring_base(1);
  ASSERT_TRUE(base) << base.error().message();
  EXPECT_EQ(*base, 5);
  EXPECT_FALSE(port->link_up());
  fe->transmit(0, make_frame(64, 9));
  fe->kick(1, true);
  EXPECT_EQ(receive_all().size(), 0u);
}

TEST_F(NetPortTest, RingIndexesWrapAround) {
  // More than 65536 frames each way, in random sizes and layouts, so every 16-bit index wraps.
  FrontendOptions opts;
  opts.queue_size = 64;
  setup({}, opts);
  fe->post_rx_buffers(0);
  uint32_t rng = 12345;
  auto next = [&] { return rng = rng * 1103515245 + 12345; };
  const TxLayout layouts[] = {TxLayout::Single, TxLayout::SplitHeader, TxLayout::Indirect,
                              TxLayout::Scattered};
  size_t sent = 0, checked = 0, returned = 0;
  RxBatch batch;
  std::vector<std::vector<uint8_t>> in_flight;
  while (sent < 70000) {
    in_flight.clear();
    for (int i = 0; i < 16; ++i) {
      auto frame = make_frame(60 + next() % 1400, static_cast<uint32_t>(sent));
      if (!fe->transmit(0, frame, layouts[next() % 4])) break;
      in_flight.push_back(std::move(frame));
      ++sent;
    }
    fe->kick(1);
    pump();
    size_t got = 0;
    do {
      size_t n = port->receive_batch(batch);
      for (size_t i = 0; i < n; ++i, ++got) {
        ASSERT_LT(got, in_flight.size());
        ASSERT_TRUE(std::equal(batch.frame(i).begin(), batch.frame(i).end(), in_flight[got].begin(),
                               in_flight[got].end()));
        ASSERT_TRUE(port->send(batch.frame(i)));
      }
    } while (batch.more());
    port->release();
    ASSERT_EQ(got, in_flight.size());
    checked += got;
    fe->reclaim_tx(0);
    size_t back = 0;
    fe->receive(0, [&](std::span<const uint8_t> f) {
      ASSERT_TRUE(std::equal(f.begin(), f.end(), in_flight[back].begin(), in_flight[back].end()));
      ++back;
    });
    ASSERT_EQ(back, in_flight.size());
    returned += back;
  }
  EXPECT_EQ(checked, sent);
  EXPECT_EQ(returned, sent);
  EXPECT_EQ(port->counters().device_errors, 0u);
  EXPECT_EQ(port->counters().tx_dropped_no_buffers, 0u);
}

TEST_F(NetPortTest, StoppedRingRestartsFromItsBase) {
  setup();
  for (uint32_t i = 0; i < 5; ++i) fe->transmit(0, make_frame(64, i));
  fe->kick(1);
  EXPECT_EQ(receive_all().size(), 5u);
  auto base = fe->get_vring_base(1);
  ASSERT_TRUE(base);
  EXPECT_FALSE(port->link_up());
  ASSERT_TRUE(fe->restart_queue(1, *base));
  EXPECT_TRUE(port->link_up());
  auto frame = make_frame(300, 42);
  fe->transmit(0, frame);
  fe->kick(1, true);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
  EXPECT_EQ(fe->reclaim_tx(0), 6u);
}

TEST_F(NetPortTest, AttachedConnectionWithoutASocketPath) {
  VhostNetOptions opts;  // no socket path: the connection is handed over
  auto port_or = VhostNetPort::create(opts);
  ASSERT_TRUE(port_or);
  port = std::move(*port_or);
  auto fe_or = SyntheticFrontend::listen(dir.file("handover.sock"), {});
  ASSERT_TRUE(fe_or);
  fe = std::move(*fe_or);
  fe->set_pump([this] { pump(); });
  // Connect a socket to the front-end ourselves, as a supervisor would, and hand it over.
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::string path = dir.file("handover.sock");
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_TRUE(port->backend().attach_connection(UniqueFd(fd)));
  ASSERT_TRUE(fe->accept());
  ASSERT_TRUE(fe->start());
  EXPECT_TRUE(port->link_up());
  auto frame = make_frame(64, 3);
  fe->transmit(0, frame);
  fe->kick(1);
  EXPECT_EQ(receive_all().size(), 1u);
}

TEST_F(NetPortTest, ServerModeAcceptsANewFrontendAfterTheOldOneGoes) {
  setup();
  EXPECT_TRUE(port->link_up());
  fe.reset();  // QEMU killed
  for (int i = 0; i < 10 && port->connected(); ++i) pump();
  EXPECT_FALSE(port->connected());
  EXPECT_FALSE(port->link_up());
  connect_frontend();
  EXPECT_TRUE(port->link_up());
  auto frame = make_frame(200, 5);
  fe->transmit(0, frame);
  fe->kick(1);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
  EXPECT_EQ(port->backend_counters().connections, 2u);
}

TEST_F(NetPortTest, SecondConcurrentFrontendIsTurnedAway) {
  setup();
  auto second = SyntheticFrontend::connect(dir.file("net.sock"), {});
  ASSERT_TRUE(second);
  (*second)->set_pump([this] { pump(); });
  EXPECT_TRUE((*second)->peer_closed());
  EXPECT_TRUE(port->link_up());
  EXPECT_TRUE(fe->sync());
}

TEST_F(NetPortTest, ClientModeReconnectsWhenTheFrontendRestarts) {
  auto fe_or = SyntheticFrontend::listen(dir.file("qemu.sock"), {});
  ASSERT_TRUE(fe_or);
  fe = std::move(*fe_or);
  fe->set_pump([this] { pump(); });
  VhostNetOptions opts;
  opts.mode = SocketMode::Client;
  opts.socket_path = dir.file("qemu.sock");
  opts.reconnect_interval = std::chrono::milliseconds(10);
  auto port_or = VhostNetPort::create(opts);
  ASSERT_TRUE(port_or);
  port = std::move(*port_or);
  ASSERT_TRUE(fe->accept());
  ASSERT_TRUE(fe->start());
  EXPECT_TRUE(port->link_up());

  fe.reset();  // QEMU goes away, and its socket with it
  for (int i = 0; i < 20 && port->connected(); ++i) ASSERT_TRUE(port->wait_and_handle(std::chrono::milliseconds(5)));
  EXPECT_FALSE(port->link_up());
  // Retrying against a missing socket is harmless.
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(port->wait_and_handle(std::chrono::milliseconds(20)));

  fe_or = SyntheticFrontend::listen(dir.file("qemu.sock"), {});
  ASSERT_TRUE(fe_or);
  fe = std::move(*fe_or);
  fe->set_pump([this] { (void)port->wait_and_handle(std::chrono::milliseconds(5)); });
  ASSERT_TRUE(fe->accept());
  ASSERT_TRUE(fe->start());
  EXPECT_TRUE(port->link_up());
  auto frame = make_frame(128, 1);
  fe->transmit(0, frame);
  fe->kick(1);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
}

}  // namespace
}  // namespace keel::vhost::testing
