// keel-vhost-responder: a vhost-user virtio-net back-end that plays a tiny host on the guest's
// link: it answers ARP requests and ICMP echo requests for one IPv4 address and drops everything
// else. The integration test boots a real guest against it and pings.
//
//   keel-vhost-responder --socket PATH [--client] --ip 10.0.2.2 [--queues N]
//
// Prints "READY" once the socket is set up, "LINK up|down" on changes, and its counters on SIGTERM.
// Frames only ever travel between QEMU's shared memory and this process; no host network is used.
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "base/log.h"
#include "base/signals.h"
#include "vhost/net_port.h"

namespace {

using keel::vhost::RxBatch;
using keel::vhost::VhostNetPort;

constexpr uint8_t kOurMac[6] = {0x52, 0x54, 0x00, 0x4b, 0x45, 0x4c};

uint16_t checksum(const uint8_t* data, size_t len) {
  uint32_t sum = 0;
  for (size_t i = 0; i + 1 < len; i += 2) sum += (data[i] << 8) | data[i + 1];
  if (len & 1) sum += data[len - 1] << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(~sum);
}

// Builds the reply to `frame` into `out`; returns its length or 0 for no reply.
size_t make_reply(std::span<const uint8_t> in, uint32_t our_ip, uint8_t* out, size_t out_size,
                  uint64_t& arp_replies, uint64_t& echo_replies) {
  if (in.size() < 14 || in.size() > out_size) return 0;
  // Copy first: the guest may change its buffer while we look at it.
  std::memcpy(out, in.data(), in.size());
  uint16_t ethertype = static_cast<uint16_t>((out[12] << 8) | out[13]);
  if (ethertype == 0x0806 && in.size() >= 42) {
    uint8_t* arp = out + 14;
    bool request = arp[0] == 0 && arp[1] == 1 && arp[2] == 8 && arp[3] == 0 && arp[4] == 6 &&
                   arp[5] == 4 && arp[6] == 0 && arp[7] == 1;
    uint32_t target;
    std::memcpy(&target, arp + 24, 4);
    if (!request || target != our_ip) return 0;
    uint8_t sender_mac[6], sender_ip[4];
    std::memcpy(sender_mac, arp + 8, 6);
    std::memcpy(sender_ip, arp + 14, 4);
    arp[7] = 2;  // reply
    std::memcpy(arp + 8, kOurMac, 6);
    std::memcpy(arp + 14, &our_ip, 4);
    std::memcpy(arp + 18, sender_mac, 6);
    std::memcpy(arp + 24, sender_ip, 4);
    std::memcpy(out, sender_mac, 6);
    std::memcpy(out + 6, kOurMac, 6);
    ++arp_replies;
    return 42;
  }
  if (ethertype == 0x0800 && in.size() >= 34) {
    uint8_t* ip = out + 14;
    size_t ihl = (ip[0] & 0x0f) * 4u;
    if ((ip[0] >> 4) != 4 || ihl < 20) return 0;
    size_t total = static_cast<size_t>((ip[2] << 8) | ip[3]);
    if (total < ihl + 8 || 14 + total > in.size() || ip[9] != 1) return 0;
    uint32_t dst;
    std::memcpy(&dst, ip + 16, 4);
    uint8_t* icmp = ip + ihl;
    if (dst != our_ip || icmp[0] != 8) return 0;
    // Swap addresses, turn the request into a reply, fix both checksums.
    std::memcpy(ip + 16, ip + 12, 4);
    std::memcpy(ip + 12, &our_ip, 4);
    ip[8] = 64;
    ip[10] = ip[11] = 0;
    uint16_t ipsum = checksum(ip, ihl);
    ip[10] = static_cast<uint8_t>(ipsum >> 8);
    ip[11] = static_cast<uint8_t>(ipsum);
    icmp[0] = 0;
    icmp[2] = icmp[3] = 0;
    uint16_t icsum = checksum(icmp, total - ihl);
    icmp[2] = static_cast<uint8_t>(icsum >> 8);
    icmp[3] = static_cast<uint8_t>(icsum);
    std::memcpy(out, out + 6, 6);  // back to the sender (disjoint ranges)
    std::memcpy(out + 6, kOurMac, 6);
    ++echo_replies;
    return 14 + total;
  }
  return 0;
}

int usage() {
  std::fprintf(stderr, "usage: keel-vhost-responder --socket PATH [--client] --ip A.B.C.D [--queues N]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string socket_path, ip = "10.0.2.2";
  keel::vhost::VhostNetOptions options;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--socket" && i + 1 < argc) socket_path = argv[++i];
    else if (a == "--client") options.mode = keel::vhost::SocketMode::Client;
    else if (a == "--ip" && i + 1 < argc) ip = argv[++i];
    else if (a == "--queues" && i + 1 < argc) options.queue_pairs = static_cast<uint16_t>(std::stoi(argv[++i]));
    else return usage();
  }
  if (socket_path.empty()) return usage();
  uint32_t our_ip;
  if (inet_pton(AF_INET, ip.c_str(), &our_ip) != 1) return usage();
  keel::init_logging("keel-vhost-responder");
  keel::ignore_sigpipe();
  auto signals = keel::block_signals_to_fd({SIGTERM, SIGINT});
  if (!signals) {
    KEEL_LOG_ERROR("{}", signals.error().message());
    return 1;
  }
  options.socket_path = socket_path;
  auto port_or = VhostNetPort::create(options);
  if (!port_or) {
    KEEL_LOG_ERROR("{}", port_or.error().message());
    return 1;
  }
  auto& port = *port_or;
  port->set_link_callback([](bool up) {
    std::printf("LINK %s\n", up ? "up" : "down");
    std::fflush(stdout);
  });

  int epoll = epoll_create1(EPOLL_CLOEXEC);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u32 = 1;
  epoll_ctl(epoll, EPOLL_CTL_ADD, port->poll_fd(), &ev);
  ev.data.u32 = 2;
  epoll_ctl(epoll, EPOLL_CTL_ADD, signals->get(), &ev);
  std::printf("READY\n");
  std::fflush(stdout);

  RxBatch batch;
  std::vector<uint8_t> replies(RxBatch::kMaxFrames * 2048);
  std::array<std::span<const uint8_t>, RxBatch::kMaxFrames> out;
  uint64_t arp_replies = 0, echo_replies = 0;
  bool running = true;
  while (running) {
    epoll_event events[2];
    int n = epoll_wait(epoll, events, 2, 1000);
    for (int i = 0; i < n; ++i)
      if (events[i].data.u32 == 2) running = false;
    if (auto r = port->handle_events(); !r) {
      KEEL_LOG_ERROR("{}", r.error().message());
      return 1;
    }
    do {
      size_t got = port->receive_batch(batch);
      size_t count = 0;
      for (size_t f = 0; f < got; ++f) {
        uint8_t* slot = replies.data() + count * 2048;
        size_t len = make_reply(batch.frame(f), our_ip, slot, 2048, arp_replies, echo_replies);
        if (len) out[count++] = {slot, len};
      }
      port->release();
      if (count) port->send_batch({out.data(), count}, 0);
    } while (batch.more());
  }
  const auto& c = port->counters();
  std::printf("COUNTERS rx_frames=%llu tx_frames=%llu arp_replies=%llu echo_replies=%llu device_errors=%llu "
              "connections=%llu\n",
              (unsigned long long)c.rx_frames, (unsigned long long)c.tx_frames,
              (unsigned long long)arp_replies, (unsigned long long)echo_replies,
              (unsigned long long)c.device_errors,
              (unsigned long long)port->backend_counters().connections);
  std::fflush(stdout);
  close(epoll);
  return 0;
}
