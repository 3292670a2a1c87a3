#include <fcntl.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <bit>
#include <cstring>

#include "base/log.h"
#include "base/mapping.h"
#include "switch/port.h"
#include "switch/tx_thread.h"

namespace keel::sw {

void Port::send_frame(const Frame& f) {
  if (!f.is_super()) {
    send(f.data, f.len);
    return;
  }
  // This port takes only ordinary frames: cut the super-frame here.
  thread_local std::unique_ptr<uint8_t[]> scratch(new uint8_t[Frame::kBufferSize]);
  if (!cut_super_frame(f.data, f.len, f.payload, f.payload_len, f.offload.gso_size, scratch.get(),
                       Frame::kBufferSize, [&](const uint8_t* seg, size_t n) { send(seg, n); }))
    counters.tx_errors++;
}

PacketBatch::PacketBatch() : storage_(new uint8_t[kCapacity * Frame::kBufferSize]) {
  for (size_t i = 0; i < kCapacity; ++i) {
    frames_[i].buffer = storage_.get() + i * Frame::kBufferSize;
    frames_[i].reset_to_headroom();
  }
}

std::string format_mac(const MacAddress& m) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
}

namespace {

Result<UniqueFd> ioctl_socket() {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail_errno("socket");
  return UniqueFd(fd);
}

}  // namespace

Result<MacAddress> interface_mac(const std::string& ifname) {
  UniqueFd s = TRY(ioctl_socket());
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  if (ioctl(s.get(), SIOCGIFHWADDR, &ifr) < 0) return fail_errno("SIOCGIFHWADDR " + ifname);
  MacAddress mac;
  std::memcpy(mac.data(), ifr.ifr_hwaddr.sa_data, 6);
  return mac;
}

Result<void> set_interface_up(const std::string& ifname) {
  UniqueFd s = TRY(ioctl_socket());
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  if (ioctl(s.get(), SIOCGIFFLAGS, &ifr) < 0) return fail_errno("SIOCGIFFLAGS " + ifname);
  ifr.ifr_flags |= IFF_UP;
  if (ioctl(s.get(), SIOCSIFFLAGS, &ifr) < 0) return fail_errno("SIOCSIFFLAGS " + ifname);
  return ok();
}

Result<void> set_interface_mac(const std::string& ifname, const MacAddress& mac) {
  UniqueFd s = TRY(ioctl_socket());
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  ifr.ifr_hwaddr.sa_family = 1;  // ARPHRD_ETHER
  std::memcpy(ifr.ifr_hwaddr.sa_data, mac.data(), 6);
  if (ioctl(s.get(), SIOCSIFHWADDR, &ifr) < 0) return fail_errno("SIOCSIFHWADDR " + ifname);
  return ok();
}

bool interface_running(const std::string& ifname) {
  auto s = ioctl_socket();
  if (!s) return false;
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  if (ioctl(s->get(), SIOCGIFFLAGS, &ifr) < 0) return false;
  return (ifr.ifr_flags & IFF_UP) && (ifr.ifr_flags & IFF_RUNNING);
}

// ---------------------------------------------------------------------------------------------------

namespace {

class TapPort final : public Port {
public:
  TapPort(UniqueFd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}
  std::string_view type() const override { return "tap"; }
  int poll_fd() const override { return fd_.get(); }
  size_t receive(PacketBatch& batch) override {
    size_t added = 0;
    while (batch.size() < PacketBatch::kCapacity) {
      Frame& f = batch[batch.size()];
      f.reset_to_headroom();
      ssize_t n = read(fd_.get(), f.data, f.capacity_after_data());
      if (n <= 0) break;
      f.len = uint32_t(n);
      batch.set_size(batch.size() + 1);
      ++added;
    }
    return added;
  }
  void send(const uint8_t* frame, size_t len) override {
    if (write(fd_.get(), frame, len) == ssize_t(len)) {
      counters.tx_packets++;
      counters.tx_bytes += len;
    } else {
      counters.tx_dropped++;
    }
  }
  bool link_up() const override { return interface_running(name_); }
  MacAddress mac() const override {
    auto m = interface_mac(name_);
    return m ? *m : MacAddress{};
  }

private:
  UniqueFd fd_;
  std::string name_;
};

}  // namespace

namespace {

// Creates the tap `ifname`, or attaches to it if it exists (a persistent one left by a previous run).
Result<UniqueFd> attach_tap(const std::string& ifname) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ) return fail_invalid("bad interface name '{}'", ifname);
  UniqueFd fd = TRY(UniqueFd::open("/dev/net/tun", O_RDWR | O_NONBLOCK));
  ifreq ifr{};
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  std::strncpy(ifr.ifr_name, ifname.c_str(), IFNAMSIZ - 1);
  if (ioctl(fd.get(), TUNSETIFF, &ifr) < 0) return fail_errno("TUNSETIFF " + ifname);
  return fd;
}

}  // namespace

Result<std::unique_ptr<Port>> open_tap_port(const std::string& ifname, LinkState state, TapLifetime lifetime) {
  UniqueFd fd = TRY(attach_tap(ifname));
  if (lifetime == TapLifetime::Persistent && ioctl(fd.get(), TUNSETPERSIST, 1) < 0)
    return fail_errno("TUNSETPERSIST " + ifname);
  if (state == LinkState::Up) TRY(set_interface_up(ifname));
  return std::unique_ptr<Port>(new TapPort(std::move(fd), ifname));
}

Result<void> delete_persistent_tap(const std::string& ifname) {
  // Attaching creates the tap if it is already gone; either way it disappears when this fd closes.
  UniqueFd fd = TRY(attach_tap(ifname));
  if (ioctl(fd.get(), TUNSETPERSIST, 0) < 0) return fail_errno("TUNSETPERSIST " + ifname);
  return ok();
}

// ---------------------------------------------------------------------------------------------------

namespace {

// AF_PACKET with recvmmsg/sendmmsg batching. The kernel strips VLAN tags into metadata on receive;
// PACKET_AUXDATA gives them back and we re-insert them so the switch sees frames as on the wire.
// The virtio-net header PACKET_VNET_HDR prepends: its first kVirtioNetHdrLegacySize bytes, native
// byte order.
using vhost::VirtioNetHdr;
constexpr size_t kVnetHdrSize = vhost::kVirtioNetHdrLegacySize;

// AF_PACKET: a TPACKET_V2 receive ring, sendmmsg to transmit.
//
// Received frames land in a ring shared with the kernel (PACKET_RX_RING): the kernel copies each
// frame into a free slot in the sender's own context (for a veth, the softirq of whoever sent on its
// peer), so the datapath thread only reads memory, without a syscall or a copy per frame. A frame too
// large for a slot (a GSO super-frame, a jumbo frame) is marked TP_STATUS_COPY in its slot and
// queued whole on the socket (PACKET_COPY_THRESH); we take it with recvmsg() in ring order.
//
// The kernel strips VLAN tags into metadata on receive; the slot header gives them back and we
// re-insert them so the switch sees frames as on the wire. With PACKET_VNET_HDR, frames that a sender
// left unfinished (checksum offload: a partial checksum; segmentation offload: one 64 KB TCP
// "super-frame") come with a virtio-net header saying so; we finish them here, at the edge, so the
// rest of the switch and every other port only ever see ordinary frames.
class AfPacketPort final : public Port {
public:
  // The ring's geometry: 2 KiB slots hold any standard Ethernet frame plus the slot header and the
  // virtio-net header; 2048 of them (4 MiB, as the socket buffer before) absorb bursts.
  static constexpr size_t kSlotSize = 2048, kSlotsPerBlock = 32, kBlocks = 64;
  static constexpr size_t kSlots = kSlotsPerBlock * kBlocks;

  // `tx_fd`, when valid, is a second socket on the interface that only transmits, from a
  // TransmitThread of the port's own (see tx_thread.h).
  AfPacketPort(UniqueFd fd, std::string name, Mapping ring, UniqueFd tx_fd)
      : fd_(std::move(fd)), tx_fd_(std::move(tx_fd)), name_(std::move(name)), ring_(std::move(ring)) {
    if (tx_fd_.valid())
      tx_thread_ = std::make_unique<TransmitThread>(tx_fd_.get(), kVnetHdrSize, "ksw-tx-" + name_);
    copy_msg_.msg_hdr.msg_iov = copy_iov_;
    copy_msg_.msg_hdr.msg_iovlen = 3;
    copy_iov_[0] = {&copy_vnet_, kVnetHdrSize};
    for (size_t i = 0; i < PacketBatch::kCapacity; ++i) {
      tx_iov_[i][0] = {&tx_vnet_, kVnetHdrSize};
      tx_iov_[i][1].iov_base = tx_buf_.get() + i * kTxSlot;
      tx_msgs_[i].msg_hdr.msg_iov = tx_iov_[i];
      tx_msgs_[i].msg_hdr.msg_iovlen = 2;
    }
  }
  std::string_view type() const override { return "afpacket"; }
  int poll_fd() const override { return fd_.get(); }
  bool has_pending() const override { return pending_head_ < pending_count_; }

  size_t receive(PacketBatch& batch) override {
    super_used_ = 0;
    size_t added = drain_pending(batch), taken = 0;
    // Take a slot only when what it holds can be kept: a super-frame may become 45 segments.
    while (batch.size() < PacketBatch::kCapacity && pending_count_ + 46 <= kMaxPending &&
           super_used_ < PacketBatch::kCapacity) {
      auto* h = reinterpret_cast<tpacket2_hdr*>(ring_.data() + rx_head_ * kSlotSize);
      uint32_t status = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
      if (!(status & TP_STATUS_USER)) break;
      if (status & TP_STATUS_LOSING) account_ring_drops();
      int tci = -1;
      uint16_t tpid = 0x8100;
      if (status & TP_STATUS_VLAN_VALID) {
        tci = h->tp_vlan_tci;
        if (status & TP_STATUS_VLAN_TPID_VALID) tpid = h->tp_vlan_tpid;
      }
      if (status & TP_STATUS_COPY) {
        // The whole frame waits on the socket queue, in ring order; the slot has only its start.
        added += receive_queued(batch, tci, tpid);
      } else if (h->tp_mac < sizeof(tpacket2_hdr) + kVnetHdrSize || h->tp_snaplen != h->tp_len ||
                 size_t(h->tp_mac) + h->tp_snaplen > kSlotSize) {
        counters.rx_errors++;  // truncated (cannot happen with our snap length) or a malformed slot
      } else {
        VirtioNetHdr vh;
        const uint8_t* data = reinterpret_cast<const uint8_t*>(h) + h->tp_mac;
        std::memcpy(&vh, data - kVnetHdrSize, kVnetHdrSize);
        Frame& f = batch[batch.size()];
        f.reset_to_headroom();
        if (vh.gso_type != vhost::kVirtioNetHdrGsoNone) {
          if (!segment(data, h->tp_len, vh, tci, tpid)) counters.rx_errors++;
        } else if (h->tp_len > f.capacity_after_data()) {
          counters.rx_errors++;
        } else {
          std::memcpy(f.data, data, h->tp_len);
          f.len = h->tp_len;
          added += accept(batch, f, vh, tci, tpid);
        }
      }
      __atomic_store_n(&h->tp_status, uint32_t(TP_STATUS_KERNEL), __ATOMIC_RELEASE);
      rx_head_ = rx_head_ + 1 == kSlots ? 0 : rx_head_ + 1;
      ++taken;
    }
    if (taken == 0) {
      // Woken with nothing in the ring: a pending socket error (ENETDOWN when the interface went
      // down, or was down at bind) makes the fd poll as ready until it is read; nothing on the ring
      // path reads it, so read it here, or the datapath would spin on this fd.
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(fd_.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    }
    return added + drain_pending(batch);
  }

  void send(const uint8_t* frame, size_t len) override {
    if (len > kTxSlot) {
      counters.tx_dropped++;
      return;
    }
    if (tx_thread_) {
      if (!tx_thread_->push(&tx_vnet_, frame, len)) counters.tx_dropped++;
      return;
    }
    if (tx_count_ == PacketBatch::kCapacity) flush();
    std::memcpy(tx_iov_[tx_count_][1].iov_base, frame, len);
    tx_iov_[tx_count_][1].iov_len = len;
    ++tx_count_;
  }

  void flush() override {
    if (tx_thread_) {
      tx_thread_->publish();  // its counts reach `counters` at sync_counters(), before they are read
      return;
    }
    size_t done = 0;
    while (done < tx_count_) {
      int n = sendmmsg(fd_.get(), tx_msgs_ + done, unsigned(tx_count_ - done), MSG_DONTWAIT);
      if (n <= 0) {
        // Socket buffer full or link down: count the rest as dropped rather than block the datapath.
        counters.tx_dropped += tx_count_ - done;
        break;
      }
      for (int i = 0; i < n; ++i) {
        counters.tx_packets++;
        counters.tx_bytes += tx_iov_[done + size_t(i)][1].iov_len;
      }
      done += size_t(n);
    }
    tx_count_ = 0;
  }

  // A super-frame goes out whole behind a virtio-net header describing it: the kernel (or the
  // receiving host's stack, through a veth) segments it, or a NIC with segmentation offload does.
  void send_frame(const Frame& f) override {
    if (!f.is_super()) {
      send(f.data, f.len);
      return;
    }
    if (!tx_thread_) flush();  // frames queued before it leave before it (the ring keeps the order)
    VirtioNetHdr vh = super_frame_vnet_header(f);
    if (tx_thread_ && !tx_thread_->drained()) {
      // Behind frames still queued: keep the order.
      if (!tx_thread_->push(&vh, f.data, f.len, f.payload, f.payload_len)) counters.tx_dropped++;
      return;
    }
    // Sent from here, without copying 64 KB into the transmit ring: with segmentation offload the
    // receiver's cost per byte is low, and the copy measured slower than the parallelism it buys
    // (TCP with offloads on, bench/switch: 15.0 Gb/s sent here vs 12.2 through the thread).
    iovec iov[3] = {{&vh, kVnetHdrSize}, {f.data, f.len}, {const_cast<uint8_t*>(f.payload), f.payload_len}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = 3;
    if (sendmsg(tx_fd_.valid() ? tx_fd_.get() : fd_.get(), &msg, MSG_DONTWAIT) == ssize_t(kVnetHdrSize + f.wire_len())) {
      counters.tx_packets++;
      counters.tx_bytes += f.wire_len();
    } else {
      counters.tx_dropped++;
    }
  }

  // The transmit thread counts what it sent and what failed; the datapath counts what it dropped
  // for lack of ring space into tx_dropped directly.
  void sync_counters() override {
    if (!tx_thread_) return;
    uint64_t packets = tx_thread_->sent_packets(), bytes = tx_thread_->sent_bytes(),
             failures = tx_thread_->send_failures();
    counters.tx_packets += packets - seen_.tx_packets;
    counters.tx_bytes += bytes - seen_.tx_bytes;
    counters.tx_dropped += failures - seen_.tx_dropped;
    seen_ = {.tx_packets = packets, .tx_bytes = bytes, .tx_dropped = failures};
  }

  bool link_up() const override { return interface_running(name_); }
  MacAddress mac() const override {
    auto m = interface_mac(name_);
    return m ? *m : MacAddress{};
  }

private:
  static constexpr size_t kTxSlot = 10240 - Frame::kHeadroom;
  // Super-frames kept whole: one slot per frame of a batch (the bridge is done with a batch before
  // it asks for the next), each kHead bytes of room plus the largest IP packet.
  static constexpr size_t kHead = kSuperHeadersMax, kSuperSlot = kHead + 65536 + 64;
  // Segments waiting for a batch: enough for a batch of super-frames (32 x 45 MSS-sized segments).
  static constexpr size_t kMaxPending = 1536;

  // Finishes an ordinary frame already in `f` (the next slot of the batch): completes a partial
  // checksum, re-inserts the VLAN tag. Returns 1 when the frame joined the batch.
  size_t accept(PacketBatch& batch, Frame& f, const VirtioNetHdr& vh, int tci, uint16_t tpid) {
    if (f.len < 14 || ((vh.flags & vhost::kVirtioNetHdrFNeedsCsum) &&
                       !finish_partial_checksum(f.data, f.len, vh.csum_start, vh.csum_offset))) {
      counters.rx_errors++;
      return 0;
    }
    if (tci >= 0) frame_push_vlan(f, tpid, uint16_t(tci));
    batch.set_size(batch.size() + 1);
    return 1;
  }

  // A frame the ring could not hold, from the socket queue.
  // A frame the ring could not hold, from the socket queue. Its first kHead bytes land in the batch
  // frame, the rest in a super-frame slot behind kHead bytes of room: a TCP super-frame stays whole
  // (headers in the frame, payload contiguous in the slot); any other frame is joined in the frame.
  size_t receive_queued(PacketBatch& batch, int tci, uint16_t tpid) {
    Frame& f = batch[batch.size()];
    f.reset_to_headroom();
    uint8_t* slot = super_slots_.get() + super_used_ * kSuperSlot;
    copy_iov_[1] = {f.data, kHead};
    copy_iov_[2] = {slot + kHead, kSuperSlot - kHead};
    copy_msg_.msg_hdr.msg_flags = 0;
    ssize_t n = recvmsg(fd_.get(), &copy_msg_.msg_hdr, MSG_DONTWAIT);
    // A pending socket error (ENETDOWN from a link change) is reported, and cleared, before any
    // frame: the frame is still queued behind it.
    if (n < 0 && errno != EAGAIN && errno != EINTR) n = recvmsg(fd_.get(), &copy_msg_.msg_hdr, MSG_DONTWAIT);
    if (n < ssize_t(kVnetHdrSize) + 14 || (copy_msg_.msg_hdr.msg_flags & MSG_TRUNC)) {
      if (n >= 0) counters.rx_errors++;
      return 0;
    }
    size_t total = size_t(n) - kVnetHdrSize;
    size_t in_frame = std::min(total, kHead);
    const VirtioNetHdr& vh = copy_vnet_;
    if (vh.gso_type != vhost::kVirtioNetHdrGsoNone) {
      size_t hdr = super_frame_headers(f.data, total, vh);  // reads the first kHead bytes only
      if (hdr == 0) {
        counters.rx_errors++;
        return 0;
      }
      // The payload's first bytes came into the frame: move them in front of the rest.
      std::memcpy(slot + hdr, f.data + hdr, in_frame - hdr);
      f.len = uint32_t(hdr);
      f.payload = slot + hdr;
      f.payload_len = uint32_t(total - hdr);
      f.offload.gso_type = vh.gso_type;
      f.offload.gso_size = vh.gso_size;
      ++super_used_;
      if (tci >= 0) frame_push_vlan(f, tpid, uint16_t(tci));
      batch.set_size(batch.size() + 1);
      return 1;
    }
    if (total > f.capacity_after_data()) {
      counters.rx_errors++;
      return 0;
    }
    if (total > kHead) std::memcpy(f.data + kHead, slot + kHead, total - kHead);
    f.len = uint32_t(total);
    return accept(batch, f, vh, tci, tpid);
  }

  // The kernel flagged that the ring overflowed: fetch (and reset) its drop count.
  void account_ring_drops() {
    tpacket_stats st{};
    socklen_t len = sizeof st;
    if (getsockopt(fd_.get(), SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0) counters.rx_dropped += st.tp_drops;
  }

  // TCP segmentation of a super-frame (untagged bytes `d`), as the sender's NIC would have done;
  // the segments wait in `pending_`.
  bool segment(const uint8_t* d, size_t len, const VirtioNetHdr& vh, int tci, uint16_t tpid) {
    size_t hdr = super_frame_headers(d, len, vh);
    if (hdr == 0) return false;
    size_t mss = vh.gso_size, count = (len - hdr + mss - 1) / mss;
    if (pending_count_ + count > kMaxPending) {
      counters.rx_dropped++;  // the sender will retransmit what did not fit
      return true;
    }
    return cut_super_frame(d, hdr, d + hdr, len - hdr, mss, seg_scratch_.get(), kTxSlot,
                           [&](const uint8_t* seg, size_t n) {
                             auto& p = pending_[pending_count_++];
                             p.frame.assign(seg, seg + n);
                             p.tci = tci;
                             p.tpid = tpid;
                           });
  }

  size_t drain_pending(PacketBatch& batch) {
    size_t added = 0;
    while (pending_head_ < pending_count_ && batch.size() < PacketBatch::kCapacity) {
      auto& seg = pending_[pending_head_++];
      Frame& f = batch[batch.size()];
      f.reset_to_headroom();
      std::memcpy(f.data, seg.frame.data(), seg.frame.size());
      f.len = uint32_t(seg.frame.size());
      if (seg.tci >= 0) frame_push_vlan(f, seg.tpid, uint16_t(seg.tci));
      batch.set_size(batch.size() + 1);
      ++added;
    }
    if (pending_head_ == pending_count_) pending_head_ = pending_count_ = 0;
    return added;
  }

  struct Segment {
    std::vector<uint8_t> frame;  // capacity kept across uses
    int tci = -1;
    uint16_t tpid = 0x8100;
  };

  UniqueFd fd_;
  UniqueFd tx_fd_;
  std::string name_;
  Mapping ring_;       // kSlots slots of kSlotSize bytes
  size_t rx_head_ = 0;  // the next slot the kernel fills
  mmsghdr copy_msg_{};
  iovec copy_iov_[3]{};
  VirtioNetHdr copy_vnet_{};
  std::unique_ptr<uint8_t[]> super_slots_{new uint8_t[PacketBatch::kCapacity * kSuperSlot]};
  size_t super_used_ = 0;  // slots given out in this receive()
  std::unique_ptr<uint8_t[]> seg_scratch_{new uint8_t[kTxSlot]};
  std::vector<Segment> pending_ = std::vector<Segment>(kMaxPending);
  size_t pending_head_ = 0, pending_count_ = 0;
  std::unique_ptr<uint8_t[]> tx_buf_{new uint8_t[PacketBatch::kCapacity * kTxSlot]};
  VirtioNetHdr tx_vnet_{};  // always empty: we only send finished frames
  mmsghdr tx_msgs_[PacketBatch::kCapacity]{};
  iovec tx_iov_[PacketBatch::kCapacity][2]{};
  size_t tx_count_ = 0;
  std::unique_ptr<TransmitThread> tx_thread_;  // declared last: stopped first, while the rest exists
  PortCounters seen_;  // the transmit thread's counts already added to `counters`
};

// A socket that only transmits on interface `index` (bound with protocol 0, it receives nothing).
Result<UniqueFd> open_transmit_socket(unsigned index, const std::string& ifname) {
  int raw = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
  if (raw < 0) return fail_errno("socket(AF_PACKET)");
  UniqueFd fd(raw);
  int one = 1, bufsize = 4 << 20;
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) return fail_errno("PACKET_VNET_HDR");
  setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize);
  setsockopt(fd.get(), SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = 0;
  sll.sll_ifindex = int(index);
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0) return fail_errno("bind " + ifname);
  return fd;
}

}  // namespace

Result<std::unique_ptr<Port>> open_afpacket_port(const std::string& ifname) {
  unsigned index = if_nametoindex(ifname.c_str());
  if (index == 0) return fail_errno("interface " + ifname);
  // Protocol 0: the socket receives nothing until bound, after its ring exists.
  int raw = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (raw < 0) return fail_errno("socket(AF_PACKET)");
  UniqueFd fd(raw);
  int one = 1;
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0)
    return fail_errno("PACKET_VNET_HDR");
  // Our own transmissions must not come back to us as receptions.
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0)
    return fail_errno("PACKET_IGNORE_OUTGOING");
  int bufsize = 4 << 20;
  setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof bufsize);  // frames too large for a slot
  setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof bufsize);
  int version = TPACKET_V2;
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_VERSION, &version, sizeof version) < 0)
    return fail_errno("PACKET_VERSION");
  // Frames larger than a slot go whole to the socket queue instead of being cut at the slot's end.
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_COPY_THRESH, &one, sizeof one) < 0)
    return fail_errno("PACKET_COPY_THRESH");
  tpacket_req req{};
  req.tp_block_size = unsigned(AfPacketPort::kSlotSize * AfPacketPort::kSlotsPerBlock);
  req.tp_block_nr = unsigned(AfPacketPort::kBlocks);
  req.tp_frame_size = unsigned(AfPacketPort::kSlotSize);
  req.tp_frame_nr = unsigned(AfPacketPort::kSlots);
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_RX_RING, &req, sizeof req) < 0)
    return fail_errno("PACKET_RX_RING");
  Mapping ring = TRY(Mapping::map_fd(fd.get(), AfPacketPort::kSlots * AfPacketPort::kSlotSize, 0,
                                     PROT_READ | PROT_WRITE, MAP_SHARED));
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(ETH_P_ALL);
  sll.sll_ifindex = int(index);
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0) return fail_errno("bind " + ifname);
  packet_mreq mr{};
  mr.mr_ifindex = int(index);
  mr.mr_type = PACKET_MR_PROMISC;
  if (setsockopt(fd.get(), SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) < 0)
    return fail_errno("promiscuous mode on " + ifname);
  // Transmissions skip the qdisc layer (veths and most uplinks have none worth going through).
  setsockopt(fd.get(), SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
  TRY(set_interface_up(ifname));
  // Binding to an interface that was still down left ENETDOWN pending on the socket: clear it.
  int err = 0;
  socklen_t errlen = sizeof err;
  getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &errlen);
  UniqueFd tx_fd;
  if (TransmitThread::enabled()) tx_fd = TRY(open_transmit_socket(index, ifname));
  return std::unique_ptr<Port>(new AfPacketPort(std::move(fd), ifname, std::move(ring), std::move(tx_fd)));
}

// ---------------------------------------------------------------------------------------------------

namespace {

// QEMU's -netdev stream / dgram peer. We listen; QEMU connects (stream) or sends to us (dgram, and we
// reply to the last sender's address).
class SocketPort final : public Port {
public:
  SocketPort(UniqueFd listen_or_dgram, SocketFraming framing, std::string path)
      : sock_(std::move(listen_or_dgram)), framing_(framing), path_(std::move(path)) {}
  ~SocketPort() override { unlink(path_.c_str()); }
  std::string_view type() const override { return framing_ == SocketFraming::Stream ? "stream" : "dgram"; }
  int poll_fd() const override { return peer_.valid() ? peer_.get() : sock_.get(); }

  size_t receive(PacketBatch& batch) override {
    if (framing_ == SocketFraming::Dgram) return receive_dgram(batch);
    if (!peer_.valid()) {
      int fd = accept4(sock_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0) {
        peer_.reset(fd);
        fd_changed = true;
      }
      return 0;
    }
    // Fill the reassembly buffer, then cut frames out of it.
    ssize_t n = read(peer_.get(), rx_.data() + rx_len_, rx_.size() - rx_len_);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
      peer_.reset();
      rx_len_ = 0;
      fd_changed = true;
      return 0;
    }
    if (n > 0) rx_len_ += size_t(n);
    size_t added = 0, off = 0;
    while (batch.size() < PacketBatch::kCapacity && rx_len_ - off >= 4) {
      uint32_t flen = uint32_t(rx_[off]) << 24 | uint32_t(rx_[off + 1]) << 16 | uint32_t(rx_[off + 2]) << 8 |
                      rx_[off + 3];
      if (flen > Frame::kBufferSize - Frame::kHeadroom) {
        // A peer that sends a frame we cannot hold is broken: drop the connection.
        counters.rx_errors++;
        peer_.reset();
        rx_len_ = 0;
        fd_changed = true;
        return added;
      }
      if (rx_len_ - off - 4 < flen) break;
      Frame& f = batch[batch.size()];
      f.reset_to_headroom();
      std::memcpy(f.data, rx_.data() + off + 4, flen);
      f.len = flen;
      batch.set_size(batch.size() + 1);
      ++added;
      off += 4 + flen;
    }
    std::memmove(rx_.data(), rx_.data() + off, rx_len_ - off);
    rx_len_ -= off;
    return added;
  }

  void send(const uint8_t* frame, size_t len) override {
    if (framing_ == SocketFraming::Dgram) {
      if (peer_addr_len_ == 0 ||
          sendto(sock_.get(), frame, len, MSG_DONTWAIT, reinterpret_cast<sockaddr*>(&peer_addr_),
                 peer_addr_len_) != ssize_t(len)) {
        counters.tx_dropped++;
        return;
      }
    } else {
      if (!peer_.valid()) {
        counters.tx_dropped++;
        return;
      }
      uint8_t hdr[4] = {uint8_t(len >> 24), uint8_t(len >> 16), uint8_t(len >> 8), uint8_t(len)};
      iovec iov[2] = {{hdr, 4}, {const_cast<uint8_t*>(frame), len}};
      // A partial write would desynchronise the framing; the socket is large enough that this only
      // happens when the peer stops reading, and then we drop the whole frame before writing any of it.
      ssize_t n = writev(peer_.get(), iov, 2);
      if (n != ssize_t(len + 4)) {
        if (n > 0) {
          // Finish the frame blocking-free is impossible; close the peer to resynchronise.
          peer_.reset();
          fd_changed = true;
        }
        counters.tx_dropped++;
        return;
      }
    }
    counters.tx_packets++;
    counters.tx_bytes += len;
  }
  bool link_up() const override { return framing_ == SocketFraming::Dgram || peer_.valid(); }
  bool take_poll_fd_changed() override { return std::exchange(fd_changed, false); }

  bool fd_changed = false;

private:
  size_t receive_dgram(PacketBatch& batch) {
    size_t added = 0;
    while (batch.size() < PacketBatch::kCapacity) {
      Frame& f = batch[batch.size()];
      f.reset_to_headroom();
      sockaddr_un from{};
      socklen_t fromlen = sizeof from;
      ssize_t n = recvfrom(sock_.get(), f.data, f.capacity_after_data(), MSG_DONTWAIT,
                           reinterpret_cast<sockaddr*>(&from), &fromlen);
      if (n <= 0) break;
      peer_addr_ = from;
      peer_addr_len_ = fromlen;
      f.len = uint32_t(n);
      batch.set_size(batch.size() + 1);
      ++added;
    }
    return added;
  }

  UniqueFd sock_;
  UniqueFd peer_;
  SocketFraming framing_;
  std::string path_;
  std::vector<uint8_t> rx_ = std::vector<uint8_t>(256 * 1024);
  size_t rx_len_ = 0;
  sockaddr_un peer_addr_{};
  socklen_t peer_addr_len_ = 0;
};

}  // namespace

Result<std::unique_ptr<Port>> open_socket_port(const std::string& path, SocketFraming framing) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) return fail_invalid("bad socket path '{}'", path);
  int type = framing == SocketFraming::Stream ? SOCK_STREAM : SOCK_DGRAM;
  int raw = socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (raw < 0) return fail_errno("socket(AF_UNIX)");
  UniqueFd fd(raw);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  unlink(path.c_str());
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) return fail_errno("bind " + path);
  if (framing == SocketFraming::Stream && listen(fd.get(), 1) < 0) return fail_errno("listen " + path);
  return std::unique_ptr<Port>(new SocketPort(std::move(fd), framing, path));
}

}  // namespace keel::sw
