// ksw-vhost-bench: VM -> keel-switch -> VM over vhost-user at full speed, without VMs.
//
// A TCG guest cannot drive a virtio-net NIC anywhere near line rate, so two synthetic front-ends
// (tests/unit/vhost: QEMU's vhost-user handshake plus a guest virtio-net driver on shared memory)
// play the two VMs. An in-process keel-switch Bridge, on its own thread and EventLoop as in the
// daemon, has two `vhostuser` ports; guest A sends UDP frames to guest B's MAC, guest B takes them
// out of its receive queue. Measured: frames/s and Gb/s (Ethernet bytes) at B, for 64- and
// 1500-byte frames, with only NORMAL installed and with 10,000 more flows that the traffic misses
// (the shapes bench/switch/run.sh installs).
//
// No OVS-DPDK runs here, so the reference is the same Bridge with the same traffic through two
// `stream` ports instead: AF_UNIX stream sockets with QEMU's `-netdev stream` framing (4-byte
// big-endian length, then the frame), the path a VM has to the switch without vhost-user. Runs
// alternate (vhost-user, stream, vhost-user, ...) so the shared cores' noise hits both; medians and
// the vhost/stream ratio are printed. --veth-pps N adds the ratio to keel-switch's AF_PACKET veth
// path (64-byte pps, from run.sh). Last, TCP payload Gb/s between the two guests with and without
// segmentation offload (64 KB super-frames vs 1514-byte frames; see run_vhost_tcp).
//
//   ksw-vhost-bench [--seconds 1.0] [--rounds 3] [--sizes 64,1500] [--busy-poll]
//                   [--veth-pps-normal N] [--veth-pps-flows N]
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "base/event_loop.h"
#include "base/log.h"
#include "switch/bridge.h"
#include "switch/port.h"
#include "switch/vhost_user_port.h"
#include "synthetic_frontend.h"
#include "vhost/net_port.h"

using namespace keel;
using namespace keel::sw;
using BenchClock = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "ksw-vhost-bench: %s\n", what.c_str());
  std::exit(1);
}

struct Figures {
  double frames_per_s = 0;
  double gbit_per_s = 0;
  uint64_t not_received = 0;  // sent but not seen at B: in flight at the end, or dropped
};

const uint8_t kMacA[6] = {0x52, 0x54, 0x00, 0x00, 0x00, 0x0a};
const uint8_t kMacB[6] = {0x52, 0x54, 0x00, 0x00, 0x00, 0x0b};

uint16_t ip_checksum(const uint8_t* p, size_t n) {
  uint32_t sum = 0;
  for (size_t i = 0; i + 1 < n; i += 2) sum += uint32_t(p[i] << 8 | p[i + 1]);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return uint16_t(~sum);
}

// Ethernet + IPv4 header (no options) from `src` to `dst`, 10.0.0.x -> 10.0.0.y, for a frame of
// f.size() bytes; returns the IP header.
uint8_t* write_ipv4_headers(std::vector<uint8_t>& f, const uint8_t dst[6], const uint8_t src[6], uint8_t proto) {
  std::memcpy(f.data(), dst, 6);
  std::memcpy(f.data() + 6, src, 6);
  f[12] = 0x08;
  f[13] = 0x00;
  uint8_t* ip = f.data() + 14;
  uint16_t ip_len = uint16_t(f.size() - 14);
  ip[0] = 0x45;
  ip[2] = uint8_t(ip_len >> 8);
  ip[3] = uint8_t(ip_len);
  ip[8] = 64;
  ip[9] = proto;
  const uint8_t sip[4] = {10, 0, 0, src[5]}, dip[4] = {10, 0, 0, dst[5]};
  std::memcpy(ip + 12, sip, 4);
  std::memcpy(ip + 16, dip, 4);
  uint16_t c = ip_checksum(ip, 20);
  ip[10] = uint8_t(c >> 8);
  ip[11] = uint8_t(c);
  return ip;
}

// Ethernet + IPv4 + UDP, `size` bytes in all (no FCS), 10.0.0.x -> 10.0.0.y.
std::vector<uint8_t> udp_frame(size_t size, const uint8_t dst[6], const uint8_t src[6], uint16_t sport) {
  std::vector<uint8_t> f(std::max<size_t>(size, 42));
  uint8_t* ip = write_ipv4_headers(f, dst, src, 17);
  uint16_t ip_len = uint16_t(f.size() - 14);
  uint8_t* udp = ip + 20;
  uint16_t udp_len = uint16_t(ip_len - 20);
  udp[0] = uint8_t(sport >> 8);
  udp[1] = uint8_t(sport);
  udp[2] = 0x13;  // 5001
  udp[3] = 0x89;
  udp[4] = uint8_t(udp_len >> 8);
  udp[5] = uint8_t(udp_len);
  for (size_t i = 42; i < f.size(); ++i) f[i] = uint8_t(i);
  return f;
}

// 16 flows (UDP source ports), as run.sh's generator sends.
std::vector<std::vector<uint8_t>> traffic(size_t size) {
  std::vector<std::vector<uint8_t>> frames;
  for (uint16_t i = 0; i < 16; ++i) frames.push_back(udp_frame(size, kMacB, kMacA, uint16_t(10000 + i)));
  return frames;
}

template <typename T>
void set_field(Match& m, Oxm field, T value, T mask = T(~T(0))) {
  uint8_t v[16] = {}, mk[16] = {};
  size_t n = oxm_field_info(uint8_t(field)).length;
  for (size_t i = 0; i < n; ++i) {
    v[i] = uint8_t(uint64_t(value) >> (8 * (n - 1 - i)));
    mk[i] = uint8_t(uint64_t(mask) >> (8 * (n - 1 - i)));
  }
  bool exact = mask == T(~T(0));
  m.set_field(uint8_t(field), v, exact ? nullptr : mk);
}

void install_flows(Bridge& bridge, bool ten_thousand) {
  FlowMod normal;
  Action to_normal;
  to_normal.arg = OFPP_NORMAL;
  normal.instructions.has_apply = true;
  normal.instructions.apply = {to_normal};
  if (!bridge.apply_flow_mod(normal)) die("cannot install NORMAL");
  if (!ten_thousand) return;
  // The 10,000 flows of run.sh, in four shapes (so several subtables), none hit by the traffic.
  for (uint32_t i = 0; i < 10000; ++i) {
    FlowMod fm;
    fm.instructions.has_apply = true;
    Action out;
    switch (i % 4) {
      case 0:
        fm.priority = uint16_t(100 + i % 50);
        set_field<uint16_t>(fm.match, Oxm::EthType, 0x0800);
        set_field<uint8_t>(fm.match, Oxm::IpProto, 6);
        set_field<uint32_t>(fm.match, Oxm::Ipv4Dst, 0xac100000u | (i / 256) << 8 | (i % 256));
        set_field<uint16_t>(fm.match, Oxm::TcpDst, uint16_t(i % 1000 + 1));
        out.arg = 1;
        fm.instructions.apply = {out};
        break;
      case 1:
        fm.priority = uint16_t(100 + i % 50);
        set_field<uint16_t>(fm.match, Oxm::EthType, 0x0800);
        set_field<uint8_t>(fm.match, Oxm::IpProto, 17);
        set_field<uint32_t>(fm.match, Oxm::Ipv4Src, 0xac110000u | (i / 256) << 8, 0xffffff00u);
        set_field<uint16_t>(fm.match, Oxm::UdpDst, uint16_t(i % 2000 + 1));
        out.arg = 2;
        fm.instructions.apply = {out};
        break;
      case 2:
        fm.priority = uint16_t(200 + i % 50);
        set_field<uint16_t>(fm.match, Oxm::EthType, 0x0800);
        set_field<uint32_t>(fm.match, Oxm::Ipv4Dst, 0xac120000u | (i / 256) << 8 | (i % 256));
        break;  // no actions: drop
      case 3:
        fm.priority = uint16_t(300 + i % 50);
        set_field<uint64_t>(fm.match, Oxm::EthSrc, 0x021100000000ull | (i / 256) << 8 | (i % 256),
                            0xffffffffffffull);
        fm.instructions.apply = {to_normal};
        break;
    }
    if (!bridge.apply_flow_mod(fm)) die("cannot install flow " + std::to_string(i));
  }
  if (bridge.flow_count() != 10001) die("expected 10001 flows, have " + std::to_string(bridge.flow_count()));
}

// The switch: a Bridge on its own thread, run as keel-switch runs it (epoll, or --busy-poll).
class SwitchThread {
public:
  explicit SwitchThread(bool busy_poll) : busy_poll_(busy_poll) {
    auto loop = EventLoop::create();
    if (!loop) die("event loop: " + loop.error().message());
    loop_ = std::move(*loop);
    bridge_ = std::make_unique<Bridge>(*loop_, "br0", 1);
  }
  ~SwitchThread() { stop(); }
  Bridge& bridge() { return *bridge_; }
  void start() {
    thread_ = std::thread([this] {
      auto timeout = std::chrono::milliseconds(busy_poll_ ? 0 : 100);
      while (!stop_.load(std::memory_order_relaxed))
        if (auto r = loop_->run_once(timeout); !r) die("event loop: " + r.error().message());
    });
  }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

private:
  bool busy_poll_;
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Bridge> bridge_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// --- vhost-user: two synthetic guests ---
// Two synthetic guests on two `vhostuser` ports of the switch, their receive queues filled, each
// MAC learnt by NORMAL (each guest announces itself), so what follows is unicast.
struct GuestPair {
  std::unique_ptr<vhost::testing::SyntheticFrontend> a, b;
};
GuestPair connect_guests(SwitchThread& sw, bool flows10k, const std::string& dir,
                         const vhost::testing::FrontendOptions& fopts) {
  std::string sock_a = dir + "/vm-a.sock", sock_b = dir + "/vm-b.sock";
  for (const auto& [name, path] : {std::pair{"vm-a", sock_a}, std::pair{"vm-b", sock_b}}) {
    VhostUserPortOptions options;
    options.socket_path = path;
    auto port = open_vhost_user_port(options);
    if (!port) die(port.error().message());
    if (!sw.bridge().add_port(name, "vhostuser", std::move(*port))) die("add_port");
  }
  install_flows(sw.bridge(), flows10k);
  sw.start();
  GuestPair g;
  for (auto* fe : {&g.a, &g.b}) {
    auto fe_or = vhost::testing::SyntheticFrontend::connect(fe == &g.a ? sock_a : sock_b, fopts);
    if (!fe_or) die(fe_or.error().message());
    *fe = std::move(*fe_or);
    if (auto r = (*fe)->start(); !r) die("front-end start: " + r.error().message());
    (*fe)->post_rx_buffers(0);
  }
  auto learn_b = udp_frame(64, kMacA, kMacB, 1);
  auto learn_a = udp_frame(64, kMacB, kMacA, 1);
  bool learnt = false;
  for (int attempt = 0; attempt < 200 && !learnt; ++attempt) {
    g.b->transmit(0, learn_b);
    g.b->kick(1, true);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    g.a->transmit(0, learn_a);
    g.a->kick(1, true);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    learnt = g.a->receive(0, [](std::span<const uint8_t>) {}) > 0 && g.b->receive(0, [](std::span<const uint8_t>) {}) > 0;
    g.a->reclaim_tx(0);
    g.b->reclaim_tx(0);
  }
  if (!learnt) die("vhost-user: the guests cannot reach each other");
  return g;
}

// Guest A transmits (transmit(n) queues frame n; false when its ring is full) and guest B takes
// frames out for `seconds`, with at most `window` frames in flight. Figures count what B got:
// frames, and bits as `bytes_of` counts them.
template <typename Transmit, typename BytesOf>
Figures run_traffic(vhost::testing::SyntheticFrontend& a, vhost::testing::SyntheticFrontend& b, double seconds,
                    uint64_t window, Transmit&& transmit, BytesOf&& bytes_of) {
  // retired = received + given up as lost; the window counts frames neither received nor lost.
  uint64_t sent = 0, received = 0, retired = 0, bytes = 0;
  auto on_frame = [&](std::span<const uint8_t> f) {
    ++received;
    ++retired;
    bytes += bytes_of(f);
  };
  auto start = BenchClock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  uint64_t spins = 0;
  while ((++spins & 63) != 0 || BenchClock::now() < deadline) {
    bool progress = false;
    while (sent - retired < window && transmit(sent)) {
      ++sent;
      progress = true;
    }
    a.kick(1);
    a.reclaim_tx(0);
    if (b.receive(0, on_frame)) progress = true;
    // Frames the switch dropped (none should be) would shrink the window for good: once the
    // switch has taken every frame A sent and B has nothing more, the rest are lost.
    if (!progress) {
      std::this_thread::yield();
      if (a.free_descriptors(1) == a.queue_size() && sent - retired >= window) retired = sent;
    }
  }
  double elapsed = std::chrono::duration<double>(BenchClock::now() - start).count();
  return {received / elapsed, bytes * 8.0 / elapsed / 1e9, sent - received};
}

Figures run_vhost(size_t size, double seconds, bool flows10k, bool busy_poll, const std::string& dir) {
  Figures fig;
  {
    SwitchThread sw(busy_poll);
    vhost::testing::FrontendOptions fopts;
    fopts.queue_size = 256;
    GuestPair guests = connect_guests(sw, flows10k, dir, fopts);
    auto& a = guests.a;
    auto& b = guests.b;

    auto frames = traffic(size);
    // Frames in flight: 224 fits B's 256 receive buffers.
    fig = run_traffic(*a, *b, seconds, 224, [&](uint64_t n) { return a->transmit(0, frames[n & 15]); },
                      [](std::span<const uint8_t> f) { return f.size(); });
    sw.stop();
  }
  return fig;
}

// --- TCP with and without segmentation offload, vhost-user both ways ---
//
// Guest A sends a TCP stream to guest B. With offload (what a Linux guest does when the NIC offers
// HOST_TSO4) it hands over 64 KB super-frames behind a virtio-net header (45 segments of 1448
// bytes, partial checksum); without, the same bytes as 1514-byte frames with their checksums done.
// B takes super-frames whole (GUEST_TSO4). Measured: TCP payload Gb/s at B.

// Ethernet + IPv4 + TCP headers (54 bytes) in front of `payload` bytes, A -> B.
std::vector<uint8_t> tcp_frame(size_t payload, uint32_t seq, bool partial_checksum) {
  std::vector<uint8_t> f(54 + payload);
  uint8_t* ip = write_ipv4_headers(f, kMacB, kMacA, 6);
  uint8_t* tcp = ip + 20;
  tcp[0] = 0x9c, tcp[1] = 0x40, tcp[2] = 0x13, tcp[3] = 0x89;  // 40000 -> 5001
  tcp[4] = uint8_t(seq >> 24), tcp[5] = uint8_t(seq >> 16), tcp[6] = uint8_t(seq >> 8), tcp[7] = uint8_t(seq);
  tcp[12] = 0x50;
  tcp[13] = 0x10;  // ACK
  tcp[14] = 0xff, tcp[15] = 0xff;
  for (size_t i = 0; i < payload; ++i) f[54 + i] = uint8_t(i * 7);
  // The pseudo-header sum; a finished checksum adds the segment and complements.
  uint32_t sum = 0;
  for (int i = 0; i < 8; i += 2) sum += uint32_t(ip[12 + i] << 8 | ip[13 + i]);
  sum += 6 + uint32_t(f.size() - 34);
  if (!partial_checksum)
    for (size_t i = 34; i < f.size(); i += 2) sum += uint32_t(f[i] << 8 | (i + 1 < f.size() ? f[i + 1] : 0));
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  uint16_t field = partial_checksum ? uint16_t(sum) : uint16_t(~sum);
  tcp[16] = uint8_t(field >> 8);
  tcp[17] = uint8_t(field);
  return f;
}

Figures run_vhost_tcp(bool offload, double seconds, bool busy_poll, const std::string& dir) {
  Figures fig;
  SwitchThread sw(busy_poll);
  vhost::testing::FrontendOptions fopts;
  fopts.queue_size = 1024;  // 64 KB super-frames take 33 buffers of 2 KB
  fopts.memory_size = 64 << 20;
  GuestPair guests = connect_guests(sw, false, dir, fopts);
  auto& a = guests.a;
  auto& b = guests.b;
  const uint64_t tso = uint64_t{1} << vhost::kVirtioNetFHostTso4;
  if (offload && (a->acked_features() & tso) == 0) die("vhost-user: the switch offers no TCP segmentation offload");

  constexpr size_t kMss = 1448, kSegments = 45;
  std::vector<std::vector<uint8_t>> frames;
  if (offload) {
    frames.push_back(tcp_frame(kMss * kSegments, 1, true));
  } else {
    for (size_t k = 0; k < kSegments; ++k) frames.push_back(tcp_frame(kMss, uint32_t(1 + k * kMss), false));
  }
  // Partial checksum at the TCP header (34 + 16), segments of kMss.
  const auto header = vhost::testing::virtio_net_header(vhost::kVirtioNetHdrFNeedsCsum, vhost::kVirtioNetHdrGsoTcpv4,
                                                        54, kMss, 34, 16);
  std::span<const uint8_t> hdr = offload ? std::span<const uint8_t>(header) : std::span<const uint8_t>();
  // Frames in flight: fits B's 1024 receive buffers.
  fig = run_traffic(
      *a, *b, seconds, offload ? 24 : 400,
      [&](uint64_t n) { return a->transmit(0, frames[n % frames.size()], vhost::testing::TxLayout::Single, hdr); },
      [](std::span<const uint8_t> f) { return f.size() - 54; });
  sw.stop();
  return fig;
}

// --- reference: the same Bridge with two `stream` ports (QEMU -netdev stream over AF_UNIX) ---
UniqueFd connect_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  UniqueFd owned(fd);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) die("connect " + path);
  return owned;
}

// Reads whatever arrived on a stream socket and counts whole frames.
class StreamReader {
public:
  explicit StreamReader(int fd) : fd_(fd), buf_(512 * 1024) {}
  // Returns frames completed by this call (0 when nothing was there).
  size_t poll(uint64_t& bytes) {
    ssize_t n = recv(fd_, buf_.data() + have_, buf_.size() - have_, MSG_DONTWAIT);
    if (n <= 0) return 0;
    have_ += size_t(n);
    size_t pos = 0, frames = 0;
    while (have_ - pos >= 4) {
      uint32_t len;
      std::memcpy(&len, buf_.data() + pos, 4);
      len = ntohl(len);
      if (have_ - pos < 4 + len) break;
      ++frames;
      bytes += len;
      pos += 4 + len;
    }
    std::memmove(buf_.data(), buf_.data() + pos, have_ - pos);
    have_ -= pos;
    return frames;
  }

private:
  int fd_;
  std::vector<uint8_t> buf_;
  size_t have_ = 0;
};

void write_frame(int fd, const std::vector<uint8_t>& frame) {
  // One writev per frame, as QEMU's stream netdev sends.
  uint32_t len_be = htonl(uint32_t(frame.size()));
  iovec iov[2] = {{&len_be, 4}, {const_cast<uint8_t*>(frame.data()), frame.size()}};
  if (writev(fd, iov, 2) < 0) die(std::string("writev: ") + std::strerror(errno));
}

Figures run_stream(size_t size, double seconds, bool flows10k, bool busy_poll, const std::string& dir) {
  std::string sock_a = dir + "/st-a.sock", sock_b = dir + "/st-b.sock";
  Figures fig;
  SwitchThread sw(busy_poll);
  for (const auto& [name, path] : {std::pair{"st-a", sock_a}, std::pair{"st-b", sock_b}}) {
    auto port = open_socket_port(path, SocketFraming::Stream);
    if (!port) die(port.error().message());
    if (!sw.bridge().add_port(name, "stream", std::move(*port))) die("add_port");
  }
  install_flows(sw.bridge(), flows10k);
  sw.start();
  UniqueFd a = connect_unix(sock_a), b = connect_unix(sock_b);
  StreamReader ra(a.get()), rb(b.get());
  auto learn_b = udp_frame(64, kMacA, kMacB, 1);
  auto learn_a = udp_frame(64, kMacB, kMacA, 1);
  bool learnt = false;
  uint64_t ignored = 0;
  bool got_a = false, got_b = false;
  for (int attempt = 0; attempt < 200 && !learnt; ++attempt) {
    write_frame(b.get(), learn_b);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    write_frame(a.get(), learn_a);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    got_a = got_a || ra.poll(ignored) > 0;
    got_b = got_b || rb.poll(ignored) > 0;
    learnt = got_a && got_b;
  }
  if (!learnt) die("stream: the guests cannot reach each other");
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  while (ra.poll(ignored) || rb.poll(ignored)) {
  }

  auto frames = traffic(size);
  // In-flight bytes stay well below the socket buffers, so a full buffer never blocks us for good.
  const uint64_t window = std::clamp<uint64_t>(96 * 1024 / (size + 4), 1, 224);
  uint64_t sent = 0, received = 0, retired = 0, bytes = 0;
  auto start = BenchClock::now();
  auto deadline = start + std::chrono::duration<double>(seconds);
  auto last_progress = start;
  uint64_t spins = 0;
  while ((++spins & 63) != 0 || BenchClock::now() < deadline) {
    while (sent - retired < window) write_frame(a.get(), frames[sent++ & 15]);
    size_t n = rb.poll(bytes);
    received += n;
    retired += n;
    if (n == 0) {
      std::this_thread::yield();
      // A dropped frame would shrink the window for good; after 50 ms of silence, the rest are lost.
      if ((spins & 1023) == 0 && BenchClock::now() - last_progress > std::chrono::milliseconds(50)) retired = sent;
    } else {
      last_progress = BenchClock::now();
    }
  }
  double elapsed = std::chrono::duration<double>(BenchClock::now() - start).count();
  fig = {received / elapsed, bytes * 8.0 / elapsed / 1e9, sent - received};
  sw.stop();
  return fig;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string join(const std::vector<double>& v, double scale) {
  std::string s;
  for (double x : v) s += (s.empty() ? "" : " ") + std::to_string(int64_t(x / scale));
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1.0;
  int rounds = 3;
  bool busy_poll = false;
  double veth_pps[2] = {0, 0};
  std::vector<size_t> sizes = {64, 1500};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value for " + arg);
      return argv[++i];
    };
    if (arg == "--seconds") seconds = std::atof(value().c_str());
    else if (arg == "--rounds") rounds = std::atoi(value().c_str());
    else if (arg == "--busy-poll") busy_poll = true;
    else if (arg == "--veth-pps-normal") veth_pps[0] = std::atof(value().c_str());
    else if (arg == "--veth-pps-flows") veth_pps[1] = std::atof(value().c_str());
    else if (arg == "--sizes") {
      sizes.clear();
      std::string list = value();
      for (size_t pos = 0; pos < list.size();) {
        size_t comma = list.find(',', pos);
        if (comma == std::string::npos) comma = list.size();
        size_t s = size_t(std::atol(list.substr(pos, comma - pos).c_str()));
        if (s < 60 || s > 9000) die("frame sizes must be 60..9000");
        sizes.push_back(s);
        pos = comma + 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: ksw-vhost-bench [--seconds S] [--rounds N] [--sizes 64,1500] [--busy-poll]\n"
                   "                       [--veth-pps-normal PPS] [--veth-pps-flows PPS]\n");
      return 2;
    }
  }
  if (seconds <= 0 || rounds < 1) die("--seconds and --rounds must be positive");
  keel::init_logging("ksw-vhost-bench", "warn");

  char templ[] = "/tmp/ksw-vhost-bench-XXXXXX";
  if (!mkdtemp(templ)) die("mkdtemp");
  std::string dir = templ;

  std::printf("VM -> keel-switch -> VM: vhost-user (synthetic guests) vs stream ports (AF_UNIX, QEMU "
              "-netdev stream framing); %d rounds of %.1fs, %s, medians\n",
              rounds, seconds, busy_poll ? "busy-poll" : "epoll");
  struct Row {
    std::string label;
    Figures vhost, stream;
    double veth_pps = 0;
  };
  std::vector<Row> rows;
  for (bool flows10k : {false, true}) {
    const char* scenario = flows10k ? "10k flows" : "NORMAL";
    for (size_t size : sizes) {
      std::vector<double> vf, vg, sf, sg;
      uint64_t v_missing = 0, s_missing = 0;
      for (int r = 0; r < rounds; ++r) {
        Figures v = run_vhost(size, seconds, flows10k, busy_poll, dir);
        Figures s = run_stream(size, seconds, flows10k, busy_poll, dir);
        v_missing = std::max(v_missing, v.not_received);
        s_missing = std::max(s_missing, s.not_received);
        vf.push_back(v.frames_per_s);
        vg.push_back(v.gbit_per_s);
        sf.push_back(s.frames_per_s);
        sg.push_back(s.gbit_per_s);
      }
      Row row;
      row.label = std::to_string(size) + "B " + scenario;
      row.vhost = {median(vf), median(vg)};
      row.stream = {median(sf), median(sg)};
      row.veth_pps = size == 64 ? veth_pps[flows10k ? 1 : 0] : 0;
      // Not received = in flight when time ran out (at most the window) plus any drops.
      std::printf("  %-16s vhost-user kfps [%s] (not received <= %llu)  stream kfps [%s] (<= %llu)\n",
                  row.label.c_str(), join(vf, 1e3).c_str(), static_cast<unsigned long long>(v_missing),
                  join(sf, 1e3).c_str(), static_cast<unsigned long long>(s_missing));
      std::fflush(stdout);
      rows.push_back(row);
    }
  }
  std::printf("\n%-16s %12s %9s %12s %9s %7s", "frames", "vhost kfps", "Gb/s", "stream kfps", "Gb/s", "ratio");
  bool have_veth = veth_pps[0] > 0 || veth_pps[1] > 0;
  if (have_veth) std::printf(" %10s %9s", "veth kpps", "vs veth");
  std::printf("\n");
  for (const Row& r : rows) {
    std::printf("%-16s %12.0f %9.2f %12.0f %9.2f %6.2fx", r.label.c_str(), r.vhost.frames_per_s / 1e3,
                r.vhost.gbit_per_s, r.stream.frames_per_s / 1e3, r.stream.gbit_per_s,
                r.stream.frames_per_s > 0 ? r.vhost.frames_per_s / r.stream.frames_per_s : 0.0);
    if (have_veth && r.veth_pps > 0) std::printf(" %10.0f %8.2fx", r.veth_pps / 1e3, r.vhost.frames_per_s / r.veth_pps);
    std::printf("\n");
  }

  // TCP: what a guest gets with segmentation offload negotiated vs without (the same bytes).
  std::vector<double> with, without;
  uint64_t missing = 0;
  for (int r = 0; r < rounds; ++r) {
    Figures t = run_vhost_tcp(true, seconds, busy_poll, dir);
    Figures p = run_vhost_tcp(false, seconds, busy_poll, dir);
    missing = std::max({missing, t.not_received, p.not_received});
    with.push_back(t.gbit_per_s);
    without.push_back(p.gbit_per_s);
  }
  double w = median(with), wo = median(without);
  auto gbits = [](const std::vector<double>& v) {
    std::string out;
    char b[32];
    for (double x : v) out += (std::snprintf(b, sizeof b, out.empty() ? "%.2f" : " %.2f", x), b);
    return out;
  };
  std::printf("\nTCP payload, VM -> keel-switch -> VM over vhost-user (not received <= %llu)\n"
              "  segmentation offload (64 KB super-frames) Gb/s [%s]\n"
              "  none (1514-byte frames)                   Gb/s [%s]\n"
              "%-16s %9.2f Gb/s with offload, %.2f Gb/s without: %.2fx\n",
              static_cast<unsigned long long>(missing), gbits(with).c_str(), gbits(without).c_str(),
              "tcp offload", w, wo, wo > 0 ? w / wo : 0.0);
  std::filesystem::remove_all(dir);
  return 0;
}
