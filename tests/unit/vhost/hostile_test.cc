// Hostile guests and hostile front-ends: the back-end must report an error on the device or close
// the connection, and never crash, read outside guest memory or hang.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "test_util.h"

namespace keel::vhost::testing {
namespace {

using Frames = std::vector<std::vector<uint8_t>>;

class HostileGuestTest : public PortFixture {
protected:
  // Publishes `head` on the TX queue, runs the port, and expects the queue to break.
  void expect_device_error(uint16_t head) {
    fe->publish_avail(1, head);
    fe->kick(1, true);
    Frames got = receive_all();
    EXPECT_TRUE(got.empty());
    EXPECT_EQ(port->counters().device_errors, 1u);
    EXPECT_TRUE(port->backend().queue(1).broken());
    EXPECT_FALSE(port->link_up());
    uint64_t errs = 0;
    EXPECT_EQ(read(fe->err_fd(1), &errs, sizeof errs), static_cast<ssize_t>(sizeof errs));
    EXPECT_EQ(errs, 1u);
    // The connection and the other direction still work.
    EXPECT_TRUE(fe->sync());
    fe->post_rx_buffers(0, 4);
    EXPECT_TRUE(port->backend().queue(0).ready());
  }
  uint64_t buffer(size_t size = 256) { return fe->alloc(size); }
};

TEST_F(HostileGuestTest, AddressOutsideMemory) {
  setup();
  fe->desc_table(1)[0] = {fe->memory_end_gpa() + 0x1000, 100, 0, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, AddressBelowMemory) {
  setup();
  fe->desc_table(1)[0] = {0x1000, 100, 0, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, HugeLength) {
  setup();
  fe->desc_table(1)[0] = {buffer(), 0xffffffff, 0, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, LengthRunningPastTheEnd) {
  setup();
  fe->desc_table(1)[0] = {fe->memory_end_gpa() - 16, 32, 0, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, ChainLoop) {
  setup();
  uint64_t b = buffer();
  fe->desc_table(1)[0] = {b, 64, kDescFNext, 1};
  fe->desc_table(1)[1] = {b, 64, kDescFNext, 2};
  fe->desc_table(1)[2] = {b, 64, kDescFNext, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, SelfLoop) {
  setup();
  fe->desc_table(1)[3] = {buffer(), 64, kDescFNext, 3};
  expect_device_error(3);
}

TEST_F(HostileGuestTest, NextOutOfRange) {
  setup();
  fe->desc_table(1)[0] = {buffer(), 64, kDescFNext, 5000};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, HeadOutOfRange) {
  setup();
  expect_device_error(5000);
}

TEST_F(HostileGuestTest, IndirectTableWithBadLength) {
  setup();
  fe->desc_table(1)[0] = {buffer(), 24, kDescFIndirect, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, IndirectTableOutsideMemory) {
  setup();
  fe->desc_table(1)[0] = {fe->memory_end_gpa() - 16, 64, kDescFIndirect, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, NestedIndirect) {
  setup();
  uint64_t table = buffer(64);
  auto* t = reinterpret_cast<VringDesc*>(fe->host(table));
  t[0] = {table, 32, kDescFIndirect, 0};
  fe->desc_table(1)[0] = {table, 32, kDescFIndirect, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, IndirectWithNext) {
  setup();
  uint64_t table = buffer(64);
  auto* t = reinterpret_cast<VringDesc*>(fe->host(table));
  t[0] = {buffer(), 64, 0, 0};
  fe->desc_table(1)[0] = {table, 16, kDescFIndirect | kDescFNext, 1};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, LoopInsideIndirectTable) {
  setup();
  uint64_t table = buffer(64);
  uint64_t b = buffer();
  auto* t = reinterpret_cast<VringDesc*>(fe->host(table));
  t[0] = {b, 64, kDescFNext, 1};
  t[1] = {b, 64, kDescFNext, 0};
  fe->desc_table(1)[0] = {table, 32, kDescFIndirect, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, IndirectWithoutTheFeature) {
  FrontendOptions opts;
  opts.wanted_features = ~feature_bit(kVirtioFRingIndirectDesc);
  setup({}, opts);
  uint64_t table = buffer(64);
  auto* t = reinterpret_cast<VringDesc*>(fe->host(table));
  t[0] = {buffer(), 64, 0, 0};
  fe->desc_table(1)[0] = {table, 16, kDescFIndirect, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, ReadableAfterWritable) {
  setup();
  uint64_t b = buffer();
  fe->desc_table(1)[0] = {b, 64, kDescFWrite | kDescFNext, 1};
  fe->desc_table(1)[1] = {b, 64, 0, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, AvailIndexRunsAhead) {
  setup();
  uint16_t* avail = fe->avail_ring(1);
  __atomic_store_n(&avail[1], static_cast<uint16_t>(avail[1] + 1000), __ATOMIC_RELEASE);
  fe->kick(1, true);
  EXPECT_TRUE(receive_all().empty());
  EXPECT_TRUE(port->backend().queue(1).broken());
  EXPECT_EQ(port->counters().device_errors, 1u);
}

TEST_F(HostileGuestTest, BufferStraddlingTwoRegions) {
  FrontendOptions opts;
  opts.split_memory = true;
  setup({}, opts);
  auto regions = fe->memory_regions();
  uint64_t end0 = regions[0].guest_phys_addr + regions[0].memory_size;
  fe->desc_table(1)[0] = {end0 - 32, 64, 0, 0};
  expect_device_error(0);
}

TEST_F(HostileGuestTest, OversizedAndRuntFramesAreDroppedNotFatal) {
  setup();
  uint64_t big = fe->alloc(70000);
  fe->desc_table(1)[10] = {big, 70000, 0, 0};
  fe->publish_avail(1, 10);
  fe->desc_table(1)[11] = {buffer(), 8, 0, 0};  // shorter than a header
  fe->publish_avail(1, 11);
  auto frame = make_frame(100, 1);
  // Descriptor indexes 10 and 11 collide with the front-end's own free list only if it uses them;
  // with an empty ring it hands out 0 first.
  ASSERT_TRUE(fe->transmit(0, frame));
  fe->kick(1, true);
  Frames got = receive_all();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
  EXPECT_EQ(port->counters().rx_dropped, 2u);
  EXPECT_EQ(port->counters().device_errors, 0u);
  EXPECT_TRUE(port->link_up());
}

TEST_F(HostileGuestTest, ReceiveBufferWithoutWritablePart) {
  setup();
  fe->desc_table(0)[0] = {buffer(), 2048, 0, 0};  // read-only "receive buffer"
  fe->publish_avail(0, 0);
  EXPECT_FALSE(port->send(make_frame(64, 0)));
  EXPECT_TRUE(port->backend().queue(0).broken());
  EXPECT_EQ(port->counters().device_errors, 1u);
}

// --- hostile front-ends ---

class HostileFrontendTest : public PortFixture {
protected:
  std::vector<uint8_t> message(uint32_t request, uint32_t flags, std::vector<uint8_t> payload) {
    MessageHeader h{request, flags, static_cast<uint32_t>(payload.size())};
    std::vector<uint8_t> bytes(sizeof h);
    std::memcpy(bytes.data(), &h, sizeof h);
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    return bytes;
  }
  template <typename T>
  std::vector<uint8_t> pod(const T& v) {
    std::vector<uint8_t> b(sizeof v);
    std::memcpy(b.data(), &v, sizeof v);
    return b;
  }
  std::vector<uint8_t> mem_table(const std::vector<MemRegionDesc>& regions, uint32_t n = 0) {
    MemTableHeader th{n ? n : static_cast<uint32_t>(regions.size()), 0};
    auto b = pod(th);
    for (auto& r : regions) {
      auto rb = pod(r);
      b.insert(b.end(), rb.begin(), rb.end());
    }
    return b;
  }
  // Sends the bytes, expects the back-end to close the connection, then checks a new front-end gets
  // a working port.
  void expect_closed(const std::vector<uint8_t>& bytes, std::vector<int> fds = {}) {
    ASSERT_TRUE(fe->send_raw(bytes, fds));
    EXPECT_TRUE(fe->peer_closed());
    EXPECT_FALSE(port->connected());
    EXPECT_GE(port->backend_counters().protocol_errors, 1u);
    expect_recovers();
  }
  void expect_recovers() {
    fe.reset();
    connect_frontend();
    auto frame = make_frame(90, 4);
    ASSERT_TRUE(fe->transmit(0, frame));
    fe->kick(1);
    auto got = receive_all();
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0], frame);
  }
  UniqueFd memfd(size_t size) {
    int fd = memfd_create("hostile", MFD_CLOEXEC);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    return UniqueFd(fd);
  }
};

TEST_F(HostileFrontendTest, BadVersion) {
  setup();
  expect_closed(message(1, 0, {}));
}

TEST_F(HostileFrontendTest, ReplyFlagFromFrontend) {
  setup();
  expect_closed(message(1, kVersion | kFlagReply, {}));
}

TEST_F(HostileFrontendTest, OversizedPayload) {
  setup();
  expect_closed(message(2, kVersion, std::vector<uint8_t>(kMaxPayloadSize + 8)));
}

TEST_F(HostileFrontendTest, WrongPayloadSize) {
  setup();
  expect_closed(message(2, kVersion, std::vector<uint8_t>(3)));
}

TEST_F(HostileFrontendTest, RingIndexBeyondTheDevice) {
  setup();
  expect_closed(message(8, kVersion, pod(VringState{7, 256})));
}

TEST_F(HostileFrontendTest, RingSizeNotAPowerOfTwo) {
  setup();
  expect_closed(message(8, kVersion, pod(VringState{0, 300})));
}

TEST_F(HostileFrontendTest, RingSizeTooLarge) {
  setup();
  expect_closed(message(8, kVersion, pod(VringState{0, 65536})));
}

TEST_F(HostileFrontendTest, RingSizeZero) {
  setup();
  expect_closed(message(8, kVersion, pod(VringState{0, 0})));
}

TEST_F(HostileFrontendTest, RingBaseNotSixteenBits) {
  setup();
  expect_closed(message(10, kVersion, pod(VringState{0, 70000})));
}

TEST_F(HostileFrontendTest, RingAddressOutsideMemory) {
  setup();
  expect_closed(message(9, kVersion, pod(VringAddr{0, 0, 0x1000, 0x2000, 0x3000, 0})));
}

TEST_F(HostileFrontendTest, RingAddressMisaligned) {
  setup();
  uint64_t base = fe->memory_regions()[0].userspace_addr;
  expect_closed(message(9, kVersion, pod(VringAddr{0, 0, base + 8, base + 0x10000, base + 0x8000, 0})));
}

TEST_F(HostileFrontendTest, MemTableFdCountMismatch) {
  setup();
  auto regions = fe->memory_regions();
  regions.push_back({0x80000000, 0x1000, 0x7f9000000000, 0});
  int fd = fe->memory_fd();
  expect_closed(message(5, kVersion, mem_table(regions)), {fd});
}

TEST_F(HostileFrontendTest, MemTableRegionLargerThanItsFile) {
  setup();
  UniqueFd small = memfd(0x10000);
  expect_closed(message(5, kVersion, mem_table({{0, 0x100000, 0x7f9000000000, 0}})), {small.get()});
}

TEST_F(HostileFrontendTest, MemTableOffsetPastTheFile) {
  setup();
  UniqueFd small = memfd(0x10000);
  expect_closed(message(5, kVersion, mem_table({{0, 0x1000, 0x7f9000000000, 0x10000}})), {small.get()});
}

TEST_F(HostileFrontendTest, MemTableWithAPipe) {
  setup();
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  UniqueFd r(p[0]), w(p[1]);
  expect_closed(message(5, kVersion, mem_table({{0, 0x1000, 0x7f9000000000, 0}})), {r.get()});
}

TEST_F(HostileFrontendTest, MemTableTooManyRegions) {
  setup();
  std::vector<MemRegionDesc> regions;
  std::vector<int> fds;
  for (uint64_t i = 0; i < 9; ++i) {
    regions.push_back({i << 20, 0x1000, 0x7f9000000000 + (i << 20), 0});
    fds.push_back(fe->memory_fd());
  }
  expect_closed(message(5, kVersion, mem_table(regions)), std::vector<int>(fds.begin(), fds.begin() + 8));
}

TEST_F(HostileFrontendTest, UnofferedFeature) {
  setup();
  expect_closed(message(2, kVersion, pod(feature_bit(kVirtioNetFCsum))));
}

TEST_F(HostileFrontendTest, UnofferedProtocolFeature) {
  setup();
  expect_closed(message(16, kVersion, pod(feature_bit(kProtocolRarp))));
}

TEST_F(HostileFrontendTest, FdsWithAMessageThatTakesNone) {
  setup();
  int fd = fe->memory_fd();
  expect_closed(message(1, kVersion, {}), {fd});
}

TEST_F(HostileFrontendTest, KickWithTwoFds) {
  setup();
  int fd = eventfd(0, EFD_CLOEXEC);
  UniqueFd owner(fd);
  expect_closed(message(12, kVersion, pod(uint64_t{0})), {fd, fd});
}

TEST_F(HostileFrontendTest, EnableWithBadValue) {
  setup();
  expect_closed(message(18, kVersion, pod(VringState{0, 2})));
}

TEST_F(HostileFrontendTest, TruncatedMessageThenHangUp) {
  setup();
  auto bytes = message(9, kVersion, std::vector<uint8_t>(40));
  bytes.resize(20);
  ASSERT_TRUE(fe->send_raw(bytes));
  pump();
  EXPECT_TRUE(port->connected());  // still waiting for the rest
  expect_recovers();               // hangs up mid-message
  EXPECT_EQ(port->backend_counters().disconnects, 1u);
}

TEST_F(HostileFrontendTest, UnknownRequestIsRefusedNotFatal) {
  setup();
  auto reply = fe->request(static_cast<Request>(77), {}, {}, false, true);
  EXPECT_FALSE(reply);  // REPLY_ACK carried a failure
  EXPECT_TRUE(port->connected());
  EXPECT_TRUE(fe->sync());
  EXPECT_EQ(port->backend_counters().refused_requests, 1u);
}

TEST_F(HostileFrontendTest, CallFdThatWouldBlockDoesNotStallTheDataPath) {
  setup();
  int p[2];
  ASSERT_EQ(pipe(p), 0);  // blocking pipe
  UniqueFd r(p[0]), w(p[1]);
  // Fill the pipe so any blocking write would hang.
  int flags = fcntl(w.get(), F_GETFL);
  fcntl(w.get(), F_SETFL, flags | O_NONBLOCK);
  char junk[4096] = {};
  while (write(w.get(), junk, sizeof junk) > 0) {
  }
  fcntl(w.get(), F_SETFL, flags);
  uint64_t index = 0;
  int fd = w.get();
  ASSERT_TRUE(fe->request(Request::SetVringCall, as_bytes_of(index), {&fd, 1}));
  ASSERT_TRUE(fe->sync());
  fe->post_rx_buffers(0, 8);
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(port->send(make_frame(64, i)));
  EXPECT_EQ(fe->receive(0, [](auto) {}), 8u);
}

TEST_F(HostileFrontendTest, MemoryTableThatNoLongerCoversTheRingsBreaksThem) {
  setup();
  // A new table with only a small piece of memory, far from the rings.
  auto regions = fe->memory_regions();
  MemRegionDesc tiny{regions[0].guest_phys_addr, 0x1000, regions[0].userspace_addr + (8 << 20), 8 << 20};
  int fd = fe->memory_fd();
  ASSERT_TRUE(fe->request(Request::SetMemTable, mem_table({tiny}), {&fd, 1}, false, true));
  EXPECT_TRUE(port->connected());
  EXPECT_FALSE(port->link_up());
  EXPECT_TRUE(port->backend().queue(0).broken());
  EXPECT_TRUE(port->backend().queue(1).broken());
  EXPECT_FALSE(port->send(make_frame(64, 1)));
  expect_recovers();
}

// SET_LOG_BASE: every malformed log closes the connection with a clear error; nothing is mapped.
class HostileLogBaseTest : public HostileFrontendTest {
protected:
  std::vector<uint8_t> log_base(uint64_t size, uint64_t offset) {
    return message(static_cast<uint32_t>(Request::SetLogBase), kVersion, pod(LogDesc{size, offset}));
  }
};

TEST_F(HostileLogBaseTest, FileSmallerThanTheLog) {
  setup();
  auto fd = memfd(0x1000);
  expect_closed(log_base(0x1000, 8), {fd.get()});
}

TEST_F(HostileLogBaseTest, OffsetPlusSizeWraps) {
  setup();
  auto fd = memfd(0x1000);
  expect_closed(log_base(0x1000, ~0ull - 0x10), {fd.get()});
}

TEST_F(HostileLogBaseTest, EmptyLog) {
  setup();
  auto fd = memfd(0x1000);
  expect_closed(log_base(0, 0), {fd.get()});
}

TEST_F(HostileLogBaseTest, NotAFile) {
  setup();
  UniqueFd fd(eventfd(0, EFD_CLOEXEC));
  expect_closed(log_base(0x1000, 0), {fd.get()});
}

TEST_F(HostileLogBaseTest, NoFd) {
  setup();
  expect_closed(log_base(0x1000, 0));
}

TEST_F(HostileLogBaseTest, ShortPayload) {
  setup();
  auto fd = memfd(0x1000);
  expect_closed(message(static_cast<uint32_t>(Request::SetLogBase), kVersion, pod(uint64_t{0x1000})), {fd.get()});
}

TEST_F(HostileLogBaseTest, WithoutTheProtocolFeature) {
  FrontendOptions options;
  options.log_shmfd = false;
  setup({}, options);
  ASSERT_FALSE(fe->acked_protocol_features() & feature_bit(kProtocolLogShmfd));
  auto fd = memfd(0x1000);
  expect_closed(log_base(0x1000, 0), {fd.get()});
}

TEST_F(HostileFrontendTest, ResendingTheMemoryTableRemapsRunningRings) {
  setup();
  auto regions = fe->memory_regions();
  std::vector<int> fds(regions.size(), fe->memory_fd());
  ASSERT_TRUE(fe->request(Request::SetMemTable, mem_table(regions), fds, false, true));
  EXPECT_TRUE(port->link_up());
  auto frame = make_frame(77, 7);
  ASSERT_TRUE(fe->transmit(0, frame));
  fe->kick(1);
  auto got = receive_all();
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0], frame);
}

}  // namespace
}  // namespace keel::vhost::testing
