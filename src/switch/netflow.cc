#include "switch/netflow.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <time.h>

#include <charconv>

#include "switch/bytes.h"

namespace keel::sw {

Result<std::unique_ptr<NetFlowExporter>> NetFlowExporter::create(const std::string& collector,
                                                                 std::chrono::seconds active,
                                                                 std::chrono::seconds inactive,
                                                                 uint8_t engine_type, uint8_t engine_id) {
  auto colon = collector.rfind(':');
  if (colon == std::string::npos) return fail_invalid("NetFlow collector '{}' must be IP:PORT", collector);
  std::string ip = collector.substr(0, colon);
  unsigned port = 0;
  auto ps = std::string_view(collector).substr(colon + 1);
  auto [p, ec] = std::from_chars(ps.data(), ps.data() + ps.size(), port);
  if (ec != std::errc() || p != ps.data() + ps.size() || port == 0 || port > 65535)
    return fail_invalid("bad NetFlow collector port in '{}'", collector);
  std::unique_ptr<NetFlowExporter> e(new NetFlowExporter());
  e->to_.sin_family = AF_INET;
  e->to_.sin_port = htons(uint16_t(port));
  if (inet_pton(AF_INET, ip.c_str(), &e->to_.sin_addr) != 1)
    return fail_invalid("bad NetFlow collector address '{}'", ip);
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return fail_errno("socket");
  e->sock_.reset(fd);
  e->collector_ = collector;
  e->active_ = active;
  e->inactive_ = inactive;
  e->engine_type_ = engine_type;
  e->engine_id_ = engine_id;
  return e;
}

void NetFlowExporter::account(const FlowKey& k, uint32_t in_port, uint32_t out_port, uint32_t ip_bytes,
                              uint8_t tcp_flags, Clock::time_point now) {
  Key key{k.ipv4_src, k.ipv4_dst, 0, 0, k.ip_proto, uint8_t(k.ip_dscp << 2 | k.ip_ecn), uint16_t(in_port)};
  if (k.ip_proto == IPPROTO_TCP || k.ip_proto == IPPROTO_UDP || k.ip_proto == IPPROTO_SCTP) {
    key.sport = be16(k.tp_src);
    key.dport = be16(k.tp_dst);
  } else if (k.ip_proto == IPPROTO_ICMP) {
    key.dport = uint16_t(k.icmp_type << 8 | k.icmp_code);  // as NetFlow v5 exporters report ICMP
  }
  auto [it, fresh] = flows_.try_emplace(key);
  Record& r = it->second;
  if (fresh) r.first = now;
  r.last = now;
  r.packets++;
  r.bytes += ip_bytes;
  r.tcp_flags |= tcp_flags;
  if (out_port) r.out_port = uint16_t(out_port);
  if (now - r.first >= active_) {
    // Long-lived flows are reported every active timeout.
    send({{key, r}}, now);
    flows_.erase(it);
  }
}

void NetFlowExporter::expire(Clock::time_point now, bool all) {
  std::vector<std::pair<Key, Record>> out;
  for (auto it = flows_.begin(); it != flows_.end();) {
    if (all || now - it->second.last >= inactive_ || now - it->second.first >= active_) {
      out.emplace_back(it->first, it->second);
      it = flows_.erase(it);
    } else {
      ++it;
    }
  }
  if (!out.empty()) send(out, now);
}

void NetFlowExporter::send(const std::vector<std::pair<Key, Record>>& records, Clock::time_point now) {
  auto uptime_ms = [&](Clock::time_point t) {
    return uint32_t(std::chrono::duration_cast<std::chrono::milliseconds>(t - boot_).count());
  };
  timespec wall{};
  clock_gettime(CLOCK_REALTIME, &wall);
  for (size_t start = 0; start < records.size(); start += 30) {
    size_t n = std::min<size_t>(30, records.size() - start);
    std::vector<uint8_t> pkt;
    ByteWriter w(pkt);
    w.u16(5);
    w.u16(uint16_t(n));
    w.u32(uptime_ms(now));
    w.u32(uint32_t(wall.tv_sec));
    w.u32(uint32_t(wall.tv_nsec));
    w.u32(sequence_);
    w.u8(engine_type_);
    w.u8(engine_id_);
    w.u16(0);  // no sampling
    for (size_t i = start; i < start + n; ++i) {
      const auto& [k, r] = records[i];
      w.bytes(&k.src, 4);
      w.bytes(&k.dst, 4);
      w.u32(0);  // next hop
      w.u16(k.in_port);
      w.u16(r.out_port);
      w.u32(uint32_t(std::min<uint64_t>(r.packets, UINT32_MAX)));
      w.u32(uint32_t(std::min<uint64_t>(r.bytes, UINT32_MAX)));
      w.u32(uptime_ms(r.first));
      w.u32(uptime_ms(r.last));
      w.u16(k.sport);
      w.u16(k.dport);
      w.u8(0);
      w.u8(r.tcp_flags);
      w.u8(k.proto);
      w.u8(k.tos);
      w.u16(0);
      w.u16(0);
      w.u8(0);
      w.u8(0);
      w.u16(0);
    }
    sequence_ += uint32_t(n);
    (void)sendto(sock_.get(), pkt.data(), pkt.size(), MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&to_),
                 sizeof to_);
  }
}

}  // namespace keel::sw
