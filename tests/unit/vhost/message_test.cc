#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "vhost/message.h"

namespace keel::vhost {
namespace {

Result<MessageHeader> header_of(uint32_t request, uint32_t flags, uint32_t size) {
  uint8_t bytes[kHeaderSize];
  MessageHeader h{request, flags, size};
  std::memcpy(bytes, &h, sizeof h);
  return decode_header(std::span<const uint8_t, kHeaderSize>(bytes, kHeaderSize));
}

template <typename T>
std::vector<uint8_t> bytes_of(const T& v) {
  std::vector<uint8_t> b(sizeof v);
  std::memcpy(b.data(), &v, sizeof v);
  return b;
}

Result<DecodedMessage> decode(Request r, const std::vector<uint8_t>& payload, size_t fds = 0) {
  MessageHeader h{static_cast<uint32_t>(r), kVersion, static_cast<uint32_t>(payload.size())};
  return decode_message(h, payload, fds);
}

std::vector<uint8_t> mem_table(std::vector<MemRegionDesc> regions, uint32_t claimed = 0) {
  MemTableHeader th{claimed ? claimed : static_cast<uint32_t>(regions.size()), 0};
  std::vector<uint8_t> b = bytes_of(th);
  for (auto& r : regions) {
    auto rb = bytes_of(r);
    b.insert(b.end(), rb.begin(), rb.end());
  }
  return b;
}

TEST(VhostMessage, HeaderChecksVersionReplyFlagAndSize) {
  EXPECT_TRUE(header_of(1, kVersion, 0));
  EXPECT_TRUE(header_of(1, kVersion | kFlagNeedReply, 0));
  EXPECT_FALSE(header_of(1, 0, 0));
  EXPECT_FALSE(header_of(1, 2, 0));
  EXPECT_FALSE(header_of(1, kVersion | kFlagReply, 0));
  EXPECT_FALSE(header_of(1, kVersion, kMaxPayloadSize + 1));
  EXPECT_FALSE(header_of(1, kVersion, 0xffffffff));
}

TEST(VhostMessage, LogBaseNeedsSizeOffsetAndOneFd) {
  auto m = decode(Request::SetLogBase, bytes_of(LogDesc{0x2000, 0x10}), 1);
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->log.mmap_size, 0x2000u);
  EXPECT_EQ(m->log.mmap_offset, 0x10u);
  EXPECT_FALSE(decode(Request::SetLogBase, bytes_of(LogDesc{0x2000, 0}), 0));      // no fd
  EXPECT_FALSE(decode(Request::SetLogBase, bytes_of(LogDesc{0x2000, 0}), 2));      // two
  EXPECT_FALSE(decode(Request::SetLogBase, bytes_of(uint64_t{0x2000}), 1));        // QEMU's old u64
  EXPECT_FALSE(decode(Request::SetLogBase, bytes_of(LogDesc{0, 0}), 1));           // empty
  EXPECT_FALSE(decode(Request::SetLogBase, bytes_of(LogDesc{0x2000, ~0ull}), 1));  // wraps
}

TEST(VhostMessage, FixedSizePayloadsMustMatch) {
  EXPECT_TRUE(decode(Request::SetFeatures, bytes_of(uint64_t{5})));
  EXPECT_FALSE(decode(Request::SetFeatures, std::vector<uint8_t>(4)));
  EXPECT_FALSE(decode(Request::SetFeatures, std::vector<uint8_t>(16)));
  EXPECT_TRUE(decode(Request::SetVringNum, bytes_of(VringState{0, 256})));
  EXPECT_FALSE(decode(Request::SetVringNum, std::vector<uint8_t>(12)));
  EXPECT_FALSE(decode(Request::SetVringAddr, std::vector<uint8_t>(32)));
  EXPECT_TRUE(decode(Request::SetVringAddr, std::vector<uint8_t>(40)));
  EXPECT_TRUE(decode(Request::GetFeatures, {}));
  EXPECT_FALSE(decode(Request::GetFeatures, std::vector<uint8_t>(3)));
}

TEST(VhostMessage, RingIndexesAreBounded) {
  EXPECT_FALSE(decode(Request::SetVringBase, bytes_of(VringState{kMaxQueues, 0})));
  VringAddr addr{};
  addr.index = 1000;
  EXPECT_FALSE(decode(Request::SetVringAddr, bytes_of(addr)));
}

TEST(VhostMessage, VringFdMessagesMatchTheirFds) {
  auto with_fd = decode(Request::SetVringKick, bytes_of(uint64_t{3}), 1);
  ASSERT_TRUE(with_fd);
  EXPECT_EQ(with_fd->vring_index, 3u);
  EXPECT_TRUE(with_fd->vring_has_fd);
  auto no_fd = decode(Request::SetVringCall, bytes_of(uint64_t{2 | kVringNoFdFlag}), 0);
  ASSERT_TRUE(no_fd);
  EXPECT_FALSE(no_fd->vring_has_fd);
  EXPECT_FALSE(decode(Request::SetVringKick, bytes_of(uint64_t{3}), 0));
  EXPECT_FALSE(decode(Request::SetVringKick, bytes_of(uint64_t{3 | kVringNoFdFlag}), 1));
  EXPECT_FALSE(decode(Request::SetVringKick, bytes_of(uint64_t{1ull << 40}), 1));
  EXPECT_FALSE(decode(Request::SetFeatures, bytes_of(uint64_t{1}), 1));
}

TEST(VhostMessage, MemTableIsValidated) {
  MemRegionDesc a{0, 0x100000, 0x7f0000000000, 0};
  MemRegionDesc b{0x200000, 0x100000, 0x7f0000200000, 0x200000};
  auto good = decode(Request::SetMemTable, mem_table({a, b}), 2);
  ASSERT_TRUE(good) << good.error().message();
  EXPECT_EQ(good->nregions, 2u);
  EXPECT_EQ(good->regions[1].mmap_offset, 0x200000u);

  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({a, b}), 1));  // fd count
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({a}, 2), 2));  // claims more than sent
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({}), 0));      // no regions
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({a}, 9), 8));  // too many
  EXPECT_FALSE(decode(Request::SetMemTable, std::vector<uint8_t>(4), 0));
  MemRegionDesc overlap{0x80000, 0x100000, 0x7f1000000000, 0};
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({a, overlap}), 2));
  MemRegionDesc empty{0x400000, 0, 0x7f2000000000, 0};
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({empty}), 1));
  MemRegionDesc wraps{0xfffffffffffff000, 0x2000, 0x1000, 0};
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({wraps}), 1));
  MemRegionDesc offset_wraps{0, 0x2000, 0x1000, 0xfffffffffffff000};
  EXPECT_FALSE(decode(Request::SetMemTable, mem_table({offset_wraps}), 1));
}

TEST(VhostMessage, ConfigWindowIsBounded) {
  auto config = [](uint32_t offset, uint32_t size, size_t data) {
    ConfigHeader h{offset, size, 0};
    std::vector<uint8_t> b = bytes_of(h);
    b.resize(b.size() + data);
    return b;
  };
  auto ok_msg = decode(Request::GetConfig, config(0, 60, 60));
  ASSERT_TRUE(ok_msg);
  EXPECT_EQ(ok_msg->config.size, 60u);
  auto set = decode(Request::SetConfig, config(32, 1, 1));
  ASSERT_TRUE(set);
  EXPECT_EQ(set->config_data.size(), 1u);
  EXPECT_FALSE(decode(Request::GetConfig, config(0, 60, 59)));    // size mismatch
  EXPECT_FALSE(decode(Request::GetConfig, config(250, 10, 10)));   // past 256 bytes
  EXPECT_FALSE(decode(Request::GetConfig, config(0, 300, 300)));
  EXPECT_FALSE(decode(Request::GetConfig, config(0xffffffff, 2, 2)));  // offset + size wraps
  EXPECT_FALSE(decode(Request::GetConfig, std::vector<uint8_t>(8)));
}

TEST(VhostMessage, UnknownRequestsDecodeAsHeaderOnly) {
  MessageHeader h{999, kVersion, 3};
  uint8_t payload[3] = {1, 2, 3};
  auto m = decode_message(h, payload, 0);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->header.request, 999u);
  EXPECT_EQ(request_name(999), "UNKNOWN");
}

TEST(VhostMessage, ReplyEncoding) {
  uint8_t out[kHeaderSize + 8];
  uint64_t v = 0x1122334455667788;
  size_t n = encode_reply(1, as_bytes_of(v), out);
  ASSERT_EQ(n, sizeof out);
  MessageHeader h;
  std::memcpy(&h, out, sizeof h);
  EXPECT_EQ(h.request, 1u);
  EXPECT_EQ(h.flags, kVersion | kFlagReply);
  EXPECT_EQ(h.size, 8u);
}

}  // namespace
}  // namespace keel::vhost
