// Fuzz target: a stream of vhost-user messages from a hostile front-end.
//
// The input is read as consecutive messages (12-byte header, then header.size payload bytes). Each
// one goes through the decoder alone, and then for real through a VhostNetPort over a socketpair,
// with the fds the request expects (memfds for SET_MEM_TABLE, eventfds for the vring messages), so
// the whole dispatcher, memory mapping and ring setup run. After every message the data path runs
// once too (receive a batch, send a frame), against guest memory filled with the input's bytes.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "base/log.h"
#include "vhost/message.h"
#include "vhost/net_port.h"

using namespace keel::vhost;

namespace {

constexpr size_t kGuestMemory = 128 << 10;

int fds_for(const MessageHeader& h, const uint8_t* payload, size_t len) {
  switch (static_cast<Request>(h.request)) {
    case Request::SetMemTable: {
      if (len < 4) return 0;
      uint32_t n;
      std::memcpy(&n, payload, 4);
      return static_cast<int>(std::min<uint32_t>(n, kMaxFds));
    }
    case Request::SetVringKick:
    case Request::SetVringCall:
    case Request::SetVringErr: {
      if (len < 8) return 1;
      uint64_t v;
      std::memcpy(&v, payload, 8);
      return (v & kVringNoFdFlag) ? 0 : 1;
    }
    case Request::SetLogFd:
    case Request::SetLogBase:
      return 1;
    default:
      return 0;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool quiet = [] {
    spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)quiet;
  if (size > 64 * 1024) return 0;

  // 1. The decoder alone, over every message of the stream.
  for (size_t pos = 0; pos + kHeaderSize <= size;) {
    auto header = decode_header(std::span<const uint8_t, kHeaderSize>(data + pos, kHeaderSize));
    if (!header) break;
    size_t plen = std::min<size_t>(header->size, size - pos - kHeaderSize);
    if (plen == header->size) {
      auto m = decode_message(*header, {data + pos + kHeaderSize, plen}, data[pos] % (kMaxFds + 1));
      (void)m;
    }
    pos += kHeaderSize + plen;
  }

  // 2. The same stream through a real back-end.
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  keel::UniqueFd frontend(sv[0]);
  VhostNetOptions options;
  options.queue_pairs = 2;
  auto port_or = VhostNetPort::create(options);
  if (!port_or) return 0;
  auto& port = *port_or;
  if (!port->backend().attach_connection(keel::UniqueFd(sv[1]))) return 0;

  keel::UniqueFd memfd(memfd_create("fuzz-guest", MFD_CLOEXEC));
  if (!memfd.valid() || ftruncate(memfd.get(), kGuestMemory) != 0) return 0;
  if (size > 0) {
    std::vector<uint8_t> fill(kGuestMemory);
    for (size_t off = 0; off < fill.size(); off += size)
      std::memcpy(fill.data() + off, data, std::min(size, fill.size() - off));
    if (pwrite(memfd.get(), fill.data(), fill.size(), 0) != static_cast<ssize_t>(fill.size())) return 0;
  }
  std::vector<keel::UniqueFd> eventfds;

  RxBatch batch;
  uint8_t frame[64] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x06};
  for (size_t pos = 0; pos + kHeaderSize <= size && port->connected();) {
    MessageHeader h;
    std::memcpy(&h, data + pos, sizeof h);
    size_t plen = std::min<size_t>(h.size, size - pos - kHeaderSize);
    const uint8_t* payload = data + pos + kHeaderSize;
    int nfds = fds_for(h, payload, plen);
    int fds[kMaxFds];
    for (int i = 0; i < nfds; ++i) {
      auto request = static_cast<Request>(h.request);
      if (request == Request::SetMemTable || request == Request::SetLogBase) {
        fds[i] = memfd.get();
      } else {
        eventfds.emplace_back(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
        fds[i] = eventfds.back().get();
      }
    }
    iovec iov{const_cast<uint8_t*>(data + pos), kHeaderSize + plen};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    if (nfds > 0) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
      std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    if (sendmsg(frontend.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) break;
    (void)port->handle_events();
    // Drain replies so the socket never fills.
    uint8_t sink[512];
    while (recv(frontend.get(), sink, sizeof sink, MSG_DONTWAIT) > 0) {
    }
    port->receive_batch(batch);
    port->release();
    port->send({frame, sizeof frame});
    pos += kHeaderSize + plen;
  }
  frontend.reset();
  (void)port->handle_events();
  return 0;
}
