// Dirty-page logging for live migration: the synthetic front-end plays QEMU (SET_LOG_BASE, LOG_ALL,
// ring log flags), frames move both ways, and the log must hold exactly the pages the back-end
// wrote: every page whose bytes changed, plus nothing outside the used rings it may rewrite with
// the same value.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "test_util.h"

namespace keel::vhost::testing {
namespace {

using Frames = std::vector<std::vector<uint8_t>>;
using PageSet = std::set<uint64_t>;

// A log as QEMU makes it: a memfd, `offset` bytes in, one bit per 4 KiB page of guest memory.
struct SharedLog {
  SharedLog(uint64_t bytes, uint64_t offset) : size(bytes), offset(offset) {
    fd = UniqueFd(memfd_create("test-dirty-log", MFD_CLOEXEC));
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(ftruncate(fd.get(), static_cast<off_t>(offset + bytes)), 0);
    auto m = Mapping::map_fd(fd.get(), offset + bytes, 0, PROT_READ | PROT_WRITE, MAP_SHARED);
    EXPECT_TRUE(m);
    mapping = std::move(*m);
  }
  uint8_t* bits() const { return mapping.data() + offset; }
  void clear() const { std::memset(bits(), 0, size); }
  PageSet pages() const {
    PageSet out;
    for (uint64_t byte = 0; byte < size; ++byte)
      for (int bit = 0; bit < 8; ++bit)
        if (bits()[byte] & (1u << bit)) out.insert(byte * 8 + bit);
    return out;
  }
  UniqueFd fd;
  Mapping mapping;
  uint64_t size, offset;
};

uint64_t log_bytes_for(uint64_t memory_end_gpa) {
  uint64_t pages = (memory_end_gpa + kLogPageSize - 1) / kLogPageSize;
  return (pages + 63) / 64 * 8;  // QEMU counts in u64 words
}

PageSet pages_of(uint64_t gpa, uint64_t len) {
  PageSet out;
  for (uint64_t p = gpa / kLogPageSize; p <= (gpa + len - 1) / kLogPageSize; ++p) out.insert(p);
  return out;
}

bool contains(const PageSet& big, const PageSet& small) {
  return std::includes(big.begin(), big.end(), small.begin(), small.end());
}

std::string describe(const PageSet& s) {
  std::string out;
  for (uint64_t p : s) out += fmt::format("{:#x} ", p * kLogPageSize);
  return out;
}

class DirtyLogTest : public PortFixture, public ::testing::WithParamInterface<bool> {
protected:
  void SetUp() override {
    FrontendOptions options;
    options.split_memory = GetParam();
    setup({}, options);
  }
  std::vector<uint8_t> snapshot() {
    std::vector<uint8_t> bytes(static_cast<size_t>(lseek(fe->memory_fd(), 0, SEEK_END)));
    EXPECT_EQ(pread(fe->memory_fd(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    return bytes;
  }
  // Guest-physical pages whose bytes differ between two snapshots of the memfd.
  PageSet changed_pages(const std::vector<uint8_t>& before, const std::vector<uint8_t>& after) {
    PageSet out;
    for (const MemRegionDesc& r : fe->memory_regions())
      for (uint64_t off = 0; off < r.memory_size; ++off)
        if (before[r.mmap_offset + off] != after[r.mmap_offset + off])
          out.insert((r.guest_phys_addr + off) / kLogPageSize);
    return out;
  }
  PageSet used_ring_pages(uint32_t queue) {
    return pages_of(fe->used_ring_gpa(queue), used_ring_bytes(fe->queue_size()));
  }
  // The guest's side of an exchange: receive buffers posted, `to_switch` queued and kicked.
  void guest_posts(const Frames& to_switch) {
    fe->post_rx_buffers(0, 16);
    for (auto& f : to_switch) ASSERT_TRUE(fe->transmit(0, f));
    fe->kick(1);
  }
  // The back-end's side: it sends `to_guest` (the last frame large enough to merge receive
  // buffers) and receives what the guest queued into `got_by_switch`.
  void backend_runs(const Frames& to_guest, Frames& got_by_switch) {
    std::vector<std::span<const uint8_t>> spans(to_guest.begin(), to_guest.end());
    EXPECT_EQ(port->send_batch(spans), to_guest.size());
    got_by_switch = receive_all();
  }

  Frames to_switch = {make_frame(60, 1), make_frame(1514, 2)};
  Frames to_guest = {make_frame(64, 3), make_frame(1514, 4), make_frame(5000, 5)};
};

TEST_P(DirtyLogTest, OffersLoggingAndLogsExactlyTheWrittenPages) {
  ASSERT_TRUE(fe->get_features().value() & feature_bit(kFeatureLogAll));
  ASSERT_TRUE(fe->acked_protocol_features() & feature_bit(kProtocolLogShmfd));
  SharedLog log(log_bytes_for(fe->memory_end_gpa()), 24);
  ASSERT_TRUE(fe->set_log_base(log.fd.get(), log.size, log.offset));
  EXPECT_EQ(port->backend().dirty_log(), nullptr);  // a log, but LOG_ALL is still off
  ASSERT_TRUE(fe->set_logging(true));
  ASSERT_NE(port->backend().dirty_log(), nullptr);
  EXPECT_TRUE(port->backend().queue(0).logging());
  EXPECT_TRUE(port->backend().queue(1).logging());

  guest_posts(to_switch);
  auto before = snapshot();
  log.clear();
  Frames got;
  backend_runs(to_guest, got);
  auto after = snapshot();
  EXPECT_EQ(got, to_switch);

  PageSet dirty = log.pages();
  PageSet changed = changed_pages(before, after);
  EXPECT_FALSE(changed.empty());
  EXPECT_TRUE(contains(dirty, changed)) << "changed: " << describe(changed) << "logged: " << describe(dirty);
  // The used rings' pages (both directions) are logged, at log_guest_addr.
  uint64_t used_idx_page[2];
  for (uint32_t q = 0; q < 2; ++q) {
    used_idx_page[q] = (fe->used_ring_gpa(q) + 2) / kLogPageSize;
    EXPECT_TRUE(dirty.count(used_idx_page[q])) << "used ring of queue " << q;
  }
  // Nothing else: a logged page either changed or is a used ring (fields rewritten unchanged).
  PageSet allowed = changed;
  for (uint32_t q = 0; q < 2; ++q) allowed.merge(used_ring_pages(q));
  EXPECT_TRUE(contains(allowed, dirty)) << "logged: " << describe(dirty) << "allowed: " << describe(allowed);
  // The frames the guest got are intact.
  Frames received;
  fe->receive(0, [&](std::span<const uint8_t> f) { received.emplace_back(f.begin(), f.end()); });
  EXPECT_EQ(received, to_guest);
  EXPECT_EQ(port->backend().dirty_log()->pages_beyond_log(), 0u);

  // Migration over: LOG_ALL off, nothing is logged any more.
  ASSERT_TRUE(fe->set_logging(false));
  EXPECT_EQ(port->backend().dirty_log(), nullptr);
  EXPECT_FALSE(port->backend().queue(0).logging());
  guest_posts(to_switch);
  log.clear();
  backend_runs(to_guest, got);
  EXPECT_EQ(got, to_switch);
  EXPECT_TRUE(log.pages().empty()) << describe(log.pages());
  EXPECT_EQ(port->counters().device_errors, 0u);
}

TEST_P(DirtyLogTest, NewLogReplacesTheOld) {
  SharedLog first(log_bytes_for(fe->memory_end_gpa()), 0);
  SharedLog second(log_bytes_for(fe->memory_end_gpa()) + 64, 4096);
  ASSERT_TRUE(fe->set_log_base(first.fd.get(), first.size, first.offset));
  ASSERT_TRUE(fe->set_logging(true));
  ASSERT_TRUE(fe->set_log_base(second.fd.get(), second.size, second.offset));  // QEMU resizes
  first.clear();  // it logged the rings' set-up so far
  guest_posts(to_switch);
  Frames got;
  backend_runs(to_guest, got);
  EXPECT_TRUE(first.pages().empty());
  EXPECT_FALSE(second.pages().empty());
}

TEST_P(DirtyLogTest, LogTooSmallForTheMemoryIsCountedNotOverrun) {
  // One byte of log covers 32 KiB of guest memory, far below where the buffers are. The file is
  // longer than the log, so a write past the log's end would show up in its tail.
  SharedLog log(8, 0);
  ASSERT_EQ(ftruncate(log.fd.get(), 4096), 0);
  ASSERT_TRUE(fe->set_log_base(log.fd.get(), 1, 0));
  ASSERT_TRUE(fe->set_logging(true));
  guest_posts(to_switch);
  Frames got;
  backend_runs(to_guest, got);
  EXPECT_EQ(got, to_switch);
  EXPECT_GT(port->backend().dirty_log()->pages_beyond_log(), 0u);
  std::vector<uint8_t> tail(4095);
  ASSERT_EQ(pread(log.fd.get(), tail.data(), tail.size(), 1), static_cast<ssize_t>(tail.size()));
  EXPECT_EQ(std::count(tail.begin(), tail.end(), 0), static_cast<long>(tail.size()));
}

TEST_P(DirtyLogTest, RingsWithoutTheLogFlagLogOnlyBuffers) {
  SharedLog log(log_bytes_for(fe->memory_end_gpa()), 0);
  ASSERT_TRUE(fe->set_log_base(log.fd.get(), log.size, 0));
  // LOG_ALL alone, as if SET_VRING_ADDR with VHOST_VRING_F_LOG had not come (yet).
  uint64_t features = fe->acked_features() | feature_bit(kFeatureLogAll);
  ASSERT_TRUE(fe->request(Request::SetFeatures, as_bytes_of(features), {}, false, true));
  ASSERT_TRUE(fe->sync());
  EXPECT_NE(port->backend().dirty_log(), nullptr);
  EXPECT_FALSE(port->backend().queue(0).logging());
  guest_posts({});
  uint16_t used_before;
  std::memcpy(&used_before, fe->used_ring(0) + 2, 2);
  Frames got;
  backend_runs({make_frame(100, 9), make_frame(3000, 10)}, got);
  // The receive buffers the back-end filled, from the used ring (single-descriptor chains).
  uint16_t used_after;
  std::memcpy(&used_after, fe->used_ring(0) + 2, 2);
  ASSERT_EQ(static_cast<uint16_t>(used_after - used_before), 3);  // 100 B: 1 buffer, 3000 B: 2
  PageSet buffers;
  for (uint16_t i = used_before; i != used_after; ++i) {
    VringUsedElem e;
    std::memcpy(&e, fe->used_ring(0) + 4 + 8 * (i % fe->queue_size()), sizeof e);
    buffers.merge(pages_of(fe->desc_table(0)[e.id].addr, e.len));
  }
  PageSet dirty = log.pages();
  EXPECT_EQ(dirty, buffers) << "logged: " << describe(dirty) << "buffers: " << describe(buffers);
}

TEST_P(DirtyLogTest, ReconnectForgetsTheLog) {
  SharedLog log(log_bytes_for(fe->memory_end_gpa()), 0);
  ASSERT_TRUE(fe->set_log_base(log.fd.get(), log.size, 0));
  ASSERT_TRUE(fe->set_logging(true));
  ASSERT_NE(port->backend().dirty_log(), nullptr);
  fe.reset();
  FrontendOptions options;
  options.split_memory = GetParam();
  connect_frontend(options);
  EXPECT_EQ(port->backend().dirty_log(), nullptr);
  EXPECT_FALSE(port->backend().queue(1).logging());
}

INSTANTIATE_TEST_SUITE_P(Memory, DirtyLogTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "SplitRegions" : "OneRegion"; });

TEST(DirtyLogMarks, BitPerPageAtTheEdges) {
  SharedLog shared(16, 8);
  LogDesc desc{16, 8};
  auto log = DirtyLog::map(shared.fd.get(), desc);
  ASSERT_TRUE(log) << log.error().message();
  log->mark_gpa(0x0fff, 2);               // straddles pages 0 and 1
  log->mark_gpa(127 * kLogPageSize, 1);   // the last page the log covers
  log->mark_gpa(128 * kLogPageSize, 1);   // beyond
  log->mark_gpa(~0ull - 10, 100);         // at the top of the address space: no wrap
  log->mark_gpa(0x5000, 0);               // empty
  EXPECT_EQ(shared.pages(), (PageSet{0, 1, 127}));
  EXPECT_TRUE(log->page_dirty(127));
  EXPECT_FALSE(log->page_dirty(5));
  EXPECT_EQ(log->pages_beyond_log(), 2u);
  // The bytes before the log (its offset in the file) are untouched.
  EXPECT_EQ(std::count(shared.mapping.data(), shared.mapping.data() + 8, 0), 8);
}

}  // namespace
}  // namespace keel::vhost::testing
