// TransmitThread over a unix SOCK_SEQPACKET pair (message boundaries kept, as a packet socket's):
// frames come out in the order they were pushed, each behind its prefix, across many wraps of a
// small ring; a full ring refuses frames instead of blocking; failed sends are counted.
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "base/unique_fd.h"
#include "switch/tx_thread.h"

namespace keel::sw {
namespace {

struct Pair {
  UniqueFd ours, theirs;
  Pair() {
    int fds[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds), 0);
    ours.reset(fds[0]);
    theirs.reset(fds[1]);
  }
};

std::vector<uint8_t> frame(uint32_t seq) {
  std::vector<uint8_t> f(1 + (seq * 7919) % 3000);
  for (size_t i = 0; i < f.size(); ++i) f[i] = uint8_t(seq + i * 13);
  return f;
}

template <typename Pred>
bool eventually(Pred pred) {
  for (int i = 0; i < 500; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

// Pushes 20000 frames of up to 3000 bytes through 64 KiB of ring (it wraps hundreds of times) while
// another thread reads them; checks order, contents and counters.
void check_frames_leave_in_order() {
  Pair pair;
  constexpr uint32_t kFrames = 20000;
  TransmitThread tx(pair.ours.get(), 4, "test-tx", 64 << 10);
  std::vector<std::vector<uint8_t>> got;
  std::thread reader([&] {
    std::vector<uint8_t> buf(8192);
    while (got.size() < kFrames) {
      ssize_t n = recv(pair.theirs.get(), buf.data(), buf.size(), 0);
      if (n <= 0) break;
      got.emplace_back(buf.begin(), buf.begin() + n);
    }
  });
  uint64_t bytes = 0;
  for (uint32_t seq = 0; seq < kFrames; ++seq) {
    auto f = frame(seq);
    uint8_t prefix[4];
    std::memcpy(prefix, &seq, 4);
    // Split the frame in two pieces, as a super-frame's headers and payload are.
    size_t cut = f.size() / 3;
    while (!tx.push(prefix, f.data(), cut, f.data() + cut, f.size() - cut)) {
      tx.publish();  // full: let the thread drain it
      std::this_thread::yield();
    }
    bytes += f.size();
    if (seq % 16 == 15) tx.publish();
  }
  tx.publish();
  reader.join();
  ASSERT_EQ(got.size(), kFrames);
  for (uint32_t seq = 0; seq < kFrames; ++seq) {
    auto f = frame(seq);
    ASSERT_EQ(got[seq].size(), 4 + f.size()) << "frame " << seq;
    uint32_t prefix;
    std::memcpy(&prefix, got[seq].data(), 4);
    ASSERT_EQ(prefix, seq);
    ASSERT_TRUE(std::equal(f.begin(), f.end(), got[seq].begin() + 4)) << "frame " << seq;
  }
  EXPECT_TRUE(eventually([&] { return tx.sent_packets() == kFrames; }));
  EXPECT_EQ(tx.sent_bytes(), bytes);
  EXPECT_EQ(tx.send_failures(), 0u);
}

TEST(TransmitThreadTest, FramesLeaveInOrderBehindTheirPrefixAcrossRingWraps) { check_frames_leave_in_order(); }

TEST(TransmitThreadTest, OnOneCpuTheDatapathSendsMostBatchesItselfInOrder) {
  // Pinned to one CPU (the transmit thread inherits it), publish() finds the thread asleep on its
  // own CPU and sends three batches in four itself: the order must hold across the hand-overs.
  cpu_set_t saved, one;
  ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
  CPU_ZERO(&one);
  CPU_SET(sched_getcpu(), &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
  check_frames_leave_in_order();
  ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
}

TEST(TransmitThreadTest, AFullRingRefusesFramesAndNothingIsSentBeforePublish) {
  Pair pair;
  TransmitThread tx(pair.ours.get(), 0, "test-tx", 16 << 10);
  std::vector<uint8_t> f(1000, 0xab);
  size_t accepted = 0;
  while (tx.push(nullptr, f.data(), f.size())) ++accepted;
  // 16 KiB holds 16 records of 1000 bytes (each padded to 1024 with its header).
  EXPECT_EQ(accepted, 16u);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(tx.sent_packets(), 0u) << "frames left before publish()";
  tx.publish();
  ASSERT_TRUE(eventually([&] { return tx.sent_packets() == accepted; }));
  // Sent frames free their space.
  EXPECT_TRUE(tx.push(nullptr, f.data(), f.size()));
  tx.publish();
  std::vector<uint8_t> buf(2000);
  for (size_t i = 0; i <= accepted; ++i) ASSERT_EQ(recv(pair.theirs.get(), buf.data(), buf.size(), 0), 1000);
}

TEST(TransmitThreadTest, FailedSendsAreCountedAndDoNotStallTheRing) {
  Pair pair;
  TransmitThread tx(pair.ours.get(), 0, "test-tx", 64 << 10);
  pair.theirs.reset();  // the peer is gone: every send fails (EPIPE / ECONNRESET)
  std::vector<uint8_t> f(100, 1);
  for (int round = 0; round < 50; ++round) {
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(tx.push(nullptr, f.data(), f.size())) << "the ring did not drain";
    tx.publish();
    ASSERT_TRUE(eventually([&] { return tx.send_failures() == uint64_t(round + 1) * 10; }));
  }
  EXPECT_EQ(tx.sent_packets(), 0u);
  EXPECT_EQ(tx.sent_bytes(), 0u);
}

}  // namespace
}  // namespace keel::sw
