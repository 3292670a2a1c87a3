// vhost_bench: frames/s and Gb/s through Keel's vhost-user virtio-net back-end, next to the same
// traffic over an AF_UNIX stream socketpair with QEMU's `-netdev stream` framing (4-byte big-endian
// length, then the frame), the path QEMU offers without vhost-user and without a kernel tap.
//
// Both runs have the same shape: a "guest" thread sends frames and takes them back, a "back-end"
// thread reflects every frame it gets. For Keel the guest is the synthetic front-end (virtqueues in
// a memfd, vhost-user handshake over a real socket) and the back-end a VhostNetPort that
// receive_batch()es the guest's transmit queue and send_batch()es the frames into its receive
// queue. Runs alternate (Keel, peer, Keel, ...) so the two cores' noise hits both; medians and the
// Keel/peer ratio are printed.
//
// A second table measures each direction alone (guest -> back-end as a switch receives, back-end ->
// guest as it sends) against a one-way stream.
//
//   vhost_bench [--seconds 1.0] [--rounds 3] [--sizes 64,1500]
#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/log.h"
#include "base/signals.h"
#include "synthetic_frontend.h"
#include "vhost/net_port.h"

using namespace keel::vhost;
using Clock = std::chrono::steady_clock;

namespace {

struct BenchResult {
  double frames_per_s = 0;
  double gbit_per_s = 0;
};

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// --- Keel: synthetic guest <-> VhostNetPort reflecting frames ---
BenchResult run_keel(size_t frame_size, double seconds, const std::string& dir) {
  std::string sock = dir + "/bench.sock";
  VhostNetOptions popts;
  popts.socket_path = sock;
  auto port = VhostNetPort::create(popts);
  if (!port) {
    std::fprintf(stderr, "port: %s\n", port.error().message().c_str());
    std::exit(1);
  }
  std::atomic<bool> stop{false};
  std::thread backend([&] {
    VhostNetPort& p = **port;
    RxBatch batch;
    std::array<std::span<const uint8_t>, RxBatch::kMaxFrames> out;
    while (!stop.load(std::memory_order_relaxed)) {
      (void)p.handle_events();
      size_t n = p.receive_batch(batch);
      for (size_t i = 0; i < n; ++i) out[i] = batch.frame(i);
      if (n) p.send_batch({out.data(), n});
      p.release();
      if (n == 0 && !batch.more()) (void)p.wait_and_handle(std::chrono::milliseconds(1));
    }
  });

  testing::FrontendOptions fopts;
  fopts.queue_size = 256;
  auto fe_or = testing::SyntheticFrontend::connect(sock, fopts);
  if (!fe_or || !(*fe_or)->start()) {
    std::fprintf(stderr, "front-end failed to start\n");
    std::exit(1);
  }
  auto& fe = **fe_or;
  fe.post_rx_buffers(0);
  auto frame = testing::make_frame(frame_size, 1);
  const size_t window = 128;  // frames in flight
  uint64_t sent = 0, received = 0, bytes = 0;
  auto on_frame = [&](std::span<const uint8_t> f) {
    ++received;
    bytes += f.size();
  };
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    bool progress = false;
    while (sent - received < window && fe.transmit(0, frame)) {
      ++sent;
      progress = true;
    }
    fe.kick(1);
    fe.reclaim_tx(0);
    if (fe.receive(0, on_frame)) progress = true;
    if (!progress) std::this_thread::yield();
  }
  double elapsed = seconds_since(start);
  stop = true;
  backend.join();
  return {received / elapsed, bytes * 8.0 / elapsed / 1e9};
}

// --- peer: QEMU -netdev stream framing over a socketpair ---
BenchResult run_stream(size_t frame_size, double seconds) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::exit(1);
  keel::UniqueFd guest_side(sv[0]), backend_side(sv[1]);
  std::atomic<bool> stop{false};
  std::thread backend([&] {
    // Reads length-prefixed frames and writes each back with its own writev, as QEMU's stream
    // netdev does per packet.
    std::vector<uint8_t> buf(256 * 1024);
    size_t have = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      // Polls like the Keel back-end thread does, so neither side pays for sleeping.
      ssize_t n = recv(backend_side.get(), buf.data() + have, buf.size() - have, MSG_DONTWAIT);
      if (n < 0 && errno == EAGAIN) {
        std::this_thread::yield();
        continue;
      }
      if (n <= 0) break;
      have += static_cast<size_t>(n);
      size_t pos = 0;
      while (have - pos >= 4) {
        uint32_t len_be;
        std::memcpy(&len_be, buf.data() + pos, 4);
        uint32_t len = ntohl(len_be);
        if (have - pos < 4 + len) break;
        iovec iov[2] = {{&len_be, 4}, {buf.data() + pos + 4, len}};
        if (writev(backend_side.get(), iov, 2) < 0) return;
        pos += 4 + len;
      }
      std::memmove(buf.data(), buf.data() + pos, have - pos);
      have -= pos;
    }
  });

  auto frame = testing::make_frame(frame_size, 1);
  uint32_t len_be = htonl(static_cast<uint32_t>(frame.size()));
  std::vector<uint8_t> rbuf(256 * 1024);
  size_t have = 0;
  // In-flight bytes stay below the socket buffers, so neither side can block the other for good.
  const size_t window = std::clamp<size_t>(96 * 1024 / (frame.size() + 4), 1, 128);
  uint64_t sent = 0, received = 0, bytes = 0;
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    while (sent - received < window) {
      iovec iov[2] = {{&len_be, 4}, {frame.data(), frame.size()}};
      if (writev(guest_side.get(), iov, 2) < 0) std::exit(1);
      ++sent;
    }
    ssize_t n = recv(guest_side.get(), rbuf.data() + have, rbuf.size() - have, MSG_DONTWAIT);
    if (n < 0 && errno == EAGAIN) {
      std::this_thread::yield();
      continue;
    }
    if (n <= 0) break;
    have += static_cast<size_t>(n);
    size_t pos = 0;
    while (have - pos >= 4) {
      uint32_t l;
      std::memcpy(&l, rbuf.data() + pos, 4);
      l = ntohl(l);
      if (have - pos < 4 + l) break;
      ++received;
      bytes += l;
      pos += 4 + l;
    }
    std::memmove(rbuf.data(), rbuf.data() + pos, have - pos);
    have -= pos;
  }
  double elapsed = seconds_since(start);
  stop = true;
  guest_side.reset();
  backend.join();
  return {received / elapsed, bytes * 8.0 / elapsed / 1e9};
}

// --- one direction: guest -> back-end (the switch receiving) or back-end -> guest (sending) ---
enum class Direction { ToBackend, ToGuest };

BenchResult run_keel_oneway(size_t frame_size, double seconds, const std::string& dir, Direction direction) {
  std::string sock = dir + "/bench1.sock";
  VhostNetOptions popts;
  popts.socket_path = sock;
  auto port = VhostNetPort::create(popts);
  if (!port) std::exit(1);
  auto frame = testing::make_frame(frame_size, 2);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> consumed{0}, consumed_bytes{0};
  std::thread backend([&] {
    VhostNetPort& p = **port;
    RxBatch batch;
    std::array<std::span<const uint8_t>, RxBatch::kMaxFrames> out;
    out.fill(frame);
    uint64_t n_total = 0, bytes = 0, sink = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      (void)p.handle_events();
      if (direction == Direction::ToBackend) {
        size_t n = p.receive_batch(batch);
        for (size_t i = 0; i < n; ++i) {
          sink += batch.frame(i)[12];  // look at the ethertype, as a switch would
          bytes += batch.frame(i).size();
        }
        n_total += n;
        p.release();
        if (n == 0 && !batch.more()) (void)p.wait_and_handle(std::chrono::milliseconds(1));
      } else if (p.link_up()) {
        if (p.send_batch(out) == 0) std::this_thread::yield();
      } else {
        (void)p.wait_and_handle(std::chrono::milliseconds(1));
      }
    }
    consumed = n_total + (sink & 0);
    consumed_bytes = bytes;
  });
  testing::FrontendOptions fopts;
  auto fe_or = testing::SyntheticFrontend::connect(sock, fopts);
  if (!fe_or || !(*fe_or)->start()) std::exit(1);
  auto& fe = **fe_or;
  fe.post_rx_buffers(0);
  uint64_t received = 0, bytes = 0;
  auto on_frame = [&](std::span<const uint8_t> f) {
    ++received;
    bytes += f.size();
  };
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    bool progress = false;
    if (direction == Direction::ToBackend) {
      while (fe.transmit(0, frame)) progress = true;
      fe.kick(1);
      if (fe.reclaim_tx(0)) progress = true;
    } else {
      if (fe.receive(0, on_frame)) progress = true;
    }
    if (!progress) std::this_thread::yield();
  }
  double elapsed = seconds_since(start);
  stop = true;
  backend.join();
  if (direction == Direction::ToBackend) {
    received = consumed;
    bytes = consumed_bytes;
  }
  return {received / elapsed, bytes * 8.0 / elapsed / 1e9};
}

BenchResult run_stream_oneway(size_t frame_size, double seconds) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::exit(1);
  keel::UniqueFd writer(sv[0]), reader(sv[1]);
  std::atomic<bool> stop{false};
  auto frame = testing::make_frame(frame_size, 2);
  std::thread sender([&] {
    uint32_t len_be = htonl(static_cast<uint32_t>(frame.size()));
    while (!stop.load(std::memory_order_relaxed)) {
      iovec iov[2] = {{&len_be, 4}, {frame.data(), frame.size()}};
      if (writev(writer.get(), iov, 2) < 0) {
        if (errno == EAGAIN) continue;
        return;
      }
    }
  });
  std::vector<uint8_t> buf(256 * 1024);
  size_t have = 0;
  uint64_t received = 0, bytes = 0;
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    ssize_t n = recv(reader.get(), buf.data() + have, buf.size() - have, 0);
    if (n <= 0) break;
    have += static_cast<size_t>(n);
    size_t pos = 0;
    while (have - pos >= 4) {
      uint32_t l;
      std::memcpy(&l, buf.data() + pos, 4);
      l = ntohl(l);
      if (have - pos < 4 + l) break;
      ++received;
      bytes += l;
      pos += 4 + l;
    }
    std::memmove(buf.data(), buf.data() + pos, have - pos);
    have -= pos;
  }
  double elapsed = seconds_since(start);
  stop = true;
  reader.reset();  // the sender's next write fails and it ends
  sender.join();
  return {received / elapsed, bytes * 8.0 / elapsed / 1e9};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1.0;
  int rounds = 3;
  std::vector<size_t> sizes = {64, 1500};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::stod(argv[++i]);
    else if (a == "--rounds" && i + 1 < argc) rounds = std::stoi(argv[++i]);
    else if (a == "--sizes" && i + 1 < argc) {
      sizes.clear();
      std::string list = argv[++i];
      for (size_t pos = 0; pos < list.size();) {
        size_t comma = list.find(',', pos);
        sizes.push_back(std::stoul(list.substr(pos, comma - pos)));
        pos = comma == std::string::npos ? list.size() : comma + 1;
      }
    } else {
      std::fprintf(stderr, "usage: vhost_bench [--seconds S] [--rounds N] [--sizes 64,1500]\n");
      return 2;
    }
  }
  keel::init_logging("vhost_bench", "warn");
  keel::ignore_sigpipe();
  char templ[] = "/tmp/keel-vhost-bench-XXXXXX";
  std::string dir = mkdtemp(templ);

  std::printf("frames reflected guest -> back-end -> guest; %d rounds of %.1fs each, alternating; medians\n",
              rounds, seconds);
  std::printf("%-6s %-28s %14s %10s\n", "size", "path", "frames/s", "Gb/s");
  for (size_t size : sizes) {
    std::vector<double> keel_fps, keel_gbps, peer_fps, peer_gbps;
    for (int r = 0; r < rounds; ++r) {
      BenchResult k = run_keel(size, seconds, dir);
      keel_fps.push_back(k.frames_per_s);
      keel_gbps.push_back(k.gbit_per_s);
      BenchResult p = run_stream(size, seconds);
      peer_fps.push_back(p.frames_per_s);
      peer_gbps.push_back(p.gbit_per_s);
    }
    double kf = median(keel_fps), pf = median(peer_fps);
    std::printf("%-6zu %-28s %14.0f %10.2f\n", size, "keel vhost-user (shm rings)", kf, median(keel_gbps));
    std::printf("%-6zu %-28s %14.0f %10.2f\n", size, "AF_UNIX stream (netdev stream)", pf, median(peer_gbps));
    std::printf("%-6zu ratio keel/peer: %.2fx\n", size, pf > 0 ? kf / pf : 0.0);
  }

  std::printf("\none direction (the peer's stream is the same either way); medians\n");
  std::printf("%-6s %-28s %14s %10s\n", "size", "path", "frames/s", "Gb/s");
  for (size_t size : sizes) {
    std::vector<double> rx_fps, rx_gbps, tx_fps, tx_gbps, peer_fps, peer_gbps;
    for (int r = 0; r < rounds; ++r) {
      BenchResult a = run_keel_oneway(size, seconds, dir, Direction::ToBackend);
      rx_fps.push_back(a.frames_per_s);
      rx_gbps.push_back(a.gbit_per_s);
      BenchResult p = run_stream_oneway(size, seconds);
      peer_fps.push_back(p.frames_per_s);
      peer_gbps.push_back(p.gbit_per_s);
      BenchResult b = run_keel_oneway(size, seconds, dir, Direction::ToGuest);
      tx_fps.push_back(b.frames_per_s);
      tx_gbps.push_back(b.gbit_per_s);
    }
    double pf = median(peer_fps);
    std::printf("%-6zu %-28s %14.0f %10.2f  (%.2fx)\n", size, "keel guest -> back-end", median(rx_fps),
                median(rx_gbps), pf > 0 ? median(rx_fps) / pf : 0.0);
    std::printf("%-6zu %-28s %14.0f %10.2f  (%.2fx)\n", size, "keel back-end -> guest", median(tx_fps),
                median(tx_gbps), pf > 0 ? median(tx_fps) / pf : 0.0);
    std::printf("%-6zu %-28s %14.0f %10.2f\n", size, "AF_UNIX stream one-way", pf, median(peer_gbps));
  }
  rmdir(dir.c_str());
  return 0;
}
