// ksw-pktgen: blasts small UDP frames out of an interface with AF_PACKET + sendmmsg, for measuring a
// switch's packets-per-second. Prints the number of frames the kernel accepted.
//   ksw-pktgen IFACE SECONDS SIZE DST_MAC [FLOWS]
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: ksw-pktgen IFACE SECONDS SIZE DST_MAC [FLOWS]\n");
    return 2;
  }
  const char* ifname = argv[1];
  double seconds = std::atof(argv[2]);
  size_t size = std::strtoul(argv[3], nullptr, 10);
  unsigned mac[6];
  if (std::sscanf(argv[4], "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6) {
    std::fprintf(stderr, "bad MAC\n");
    return 2;
  }
  int flows = argc > 5 ? std::atoi(argv[5]) : 1;
  if (size < 60 || size > 1514 || flows < 1) return 2;
  int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
  if (fd < 0) {
    std::perror("socket");
    return 1;
  }
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_ifindex = int(if_nametoindex(ifname));
  sll.sll_protocol = htons(ETH_P_ALL);
  if (bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0) {
    std::perror("bind");
    return 1;
  }
  int sndbuf = 8 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  constexpr int kBatch = 64;
  std::vector<std::vector<uint8_t>> frames(kBatch, std::vector<uint8_t>(size, 0));
  for (int i = 0; i < kBatch; ++i) {
    uint8_t* f = frames[size_t(i)].data();
    for (int j = 0; j < 6; ++j) f[j] = uint8_t(mac[j]);
    uint8_t src[6] = {0x02, 0xbe, 0, 0, 0, 1};
    std::memcpy(f + 6, src, 6);
    f[12] = 0x08;
    f[13] = 0x00;
    uint8_t* ip = f + 14;
    ip[0] = 0x45;
    uint16_t tot = uint16_t(size - 14);
    ip[2] = uint8_t(tot >> 8);
    ip[3] = uint8_t(tot);
    ip[8] = 64;
    ip[9] = 17;
    uint8_t s[4] = {10, 0, 0, 200}, d[4] = {10, 0, 0, 99};
    std::memcpy(ip + 12, s, 4);
    std::memcpy(ip + 16, d, 4);
    uint32_t sum = 0;
    for (int k = 0; k < 20; k += 2) sum += uint32_t(ip[k] << 8 | ip[k + 1]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    ip[10] = uint8_t(~sum >> 8);
    ip[11] = uint8_t(~sum);
    uint8_t* udp = ip + 20;
    uint16_t sport = uint16_t(10000 + i % flows);
    udp[0] = uint8_t(sport >> 8);
    udp[1] = uint8_t(sport);
    udp[2] = 0x23;
    udp[3] = 0x28;
    uint16_t ulen = uint16_t(tot - 20);
    udp[4] = uint8_t(ulen >> 8);
    udp[5] = uint8_t(ulen);
  }
  mmsghdr msgs[kBatch]{};
  iovec iov[kBatch];
  for (int i = 0; i < kBatch; ++i) {
    iov[i] = {frames[size_t(i)].data(), size};
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  unsigned long long sent = 0;
  while (std::chrono::steady_clock::now() < end) {
    int n = sendmmsg(fd, msgs, kBatch, 0);
    if (n > 0) sent += unsigned(n);
  }
  std::printf("%llu\n", sent);
  close(fd);
  return 0;
}
