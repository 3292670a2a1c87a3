#include "synthetic_frontend.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

namespace keel::vhost::testing {

namespace {

constexpr uint64_t kSplitGap = 0x10000000;  // 256 MiB hole in guest-physical space

bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event_idx - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

Result<sockaddr_un> address_of(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return fail_invalid("socket path too long");
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

Result<UniqueFd> make_eventfd() {
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return fail_errno("eventfd");
  return UniqueFd(fd);
}

}  // namespace

std::vector<uint8_t> make_frame(size_t size, uint32_t seed) {
  std::vector<uint8_t> frame(size);
  for (size_t i = 0; i < size; ++i) frame[i] = static_cast<uint8_t>(i * 7 + seed);
  if (size >= 14) {
    std::memset(frame.data(), 0xff, 6);  // broadcast destination
    uint8_t src[6] = {0x52, 0x54, 0x00, 0x12, 0x34, static_cast<uint8_t>(seed)};
    std::memcpy(frame.data() + 6, src, 6);
    frame[12] = 0x88;  // local experimental ethertype
    frame[13] = 0xb5;
  }
  if (size >= 18) std::memcpy(frame.data() + 14, &seed, sizeof seed);
  return frame;
}

SyntheticFrontend::SyntheticFrontend(FrontendOptions options) : options_(std::move(options)) {}

SyntheticFrontend::~SyntheticFrontend() {
  if (listen_.valid()) ::unlink(listen_path_.c_str());
}

Result<std::unique_ptr<SyntheticFrontend>> SyntheticFrontend::connect(const std::string& path,
                                                                      FrontendOptions options) {
  std::unique_ptr<SyntheticFrontend> fe(new SyntheticFrontend(std::move(options)));
  TRY(fe->setup_memory());
  sockaddr_un addr = TRY(address_of(path));
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail_errno("socket");
  fe->sock_.reset(fd);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return fail_errno("connect " + path);
  return fe;
}

Result<std::unique_ptr<SyntheticFrontend>> SyntheticFrontend::listen(const std::string& path,
                                                                     FrontendOptions options) {
  std::unique_ptr<SyntheticFrontend> fe(new SyntheticFrontend(std::move(options)));
  TRY(fe->setup_memory());
  sockaddr_un addr = TRY(address_of(path));
  ::unlink(path.c_str());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail_errno("socket");
  fe->listen_.reset(fd);
  fe->listen_path_ = path;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return fail_errno("bind " + path);
  if (::listen(fd, 1) != 0) return fail_errno("listen");
  return fe;
}

Result<void> SyntheticFrontend::accept(int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{listen_.get(), POLLIN, 0};
    int n = poll(&p, 1, pump_ ? 0 : 10);
    if (n > 0) {
      int fd = accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return fail_errno("accept");
      sock_.reset(fd);
      return ok();
    }
    if (pump_) pump_();
  }
  return fail(ETIMEDOUT, "no back-end connected");
}

Result<void> SyntheticFrontend::setup_memory() {
  int fd = memfd_create("keel-synthetic-guest", MFD_CLOEXEC);
  if (fd < 0) return fail_errno("memfd_create");
  memfd_.reset(fd);
  if (ftruncate(fd, static_cast<off_t>(options_.memory_size)) != 0) return fail_errno("ftruncate");
  memory_ = TRY(Mapping::map_fd(fd, options_.memory_size, 0, PROT_READ | PROT_WRITE, MAP_SHARED));
  regions_.clear();
  if (options_.split_memory) {
    uint64_t half = options_.memory_size / 2;
    regions_.push_back({options_.guest_phys_base, half, options_.user_addr_base, 0});
    regions_.push_back({options_.guest_phys_base + half + kSplitGap, options_.memory_size - half,
                        options_.user_addr_base + half, half});
  } else {
    regions_.push_back({options_.guest_phys_base, options_.memory_size, options_.user_addr_base, 0});
  }
  setup_queues();
  return ok();
}

uint64_t SyntheticFrontend::gpa_of(size_t offset) const {
  for (const auto& r : regions_)
    if (offset >= r.mmap_offset && offset < r.mmap_offset + r.memory_size)
      return r.guest_phys_addr + (offset - r.mmap_offset);
  return ~0ull;
}

uint8_t* SyntheticFrontend::host(uint64_t gpa) {
  for (const auto& r : regions_)
    if (gpa >= r.guest_phys_addr && gpa < r.guest_phys_addr + r.memory_size)
      return memory_.data() + r.mmap_offset + (gpa - r.guest_phys_addr);
  return nullptr;
}

uint64_t SyntheticFrontend::uva_of(uint64_t gpa) const {
  for (const auto& r : regions_)
    if (gpa >= r.guest_phys_addr && gpa < r.guest_phys_addr + r.memory_size)
      return r.userspace_addr + (gpa - r.guest_phys_addr);
  return ~0ull;
}

uint64_t SyntheticFrontend::memory_end_gpa() const {
  const auto& r = regions_.back();
  return r.guest_phys_addr + r.memory_size;
}

uint64_t SyntheticFrontend::alloc(size_t size, size_t align) {
  size_t offset = (alloc_offset_ + align - 1) / align * align;
  // Keep each allocation inside one region.
  for (const auto& r : regions_) {
    if (offset >= r.mmap_offset && offset < r.mmap_offset + r.memory_size &&
        offset + size > r.mmap_offset + r.memory_size)
      offset = r.mmap_offset + r.memory_size;
  }
  KEEL_CHECK(offset + size <= options_.memory_size);
  alloc_offset_ = offset + size;
  return gpa_of(offset);
}

void SyntheticFrontend::setup_queues() {
  uint32_t n = options_.queue_size;
  queues_.resize(2u * options_.queue_pairs);
  for (auto& q : queues_) {
    q.desc_gpa = alloc(desc_table_bytes(n), 16);
    q.avail_gpa = alloc(avail_ring_bytes(n), 2);
    q.used_gpa = alloc(used_ring_bytes(n), 4096);
    q.buffers_gpa = alloc(uint64_t{n} * options_.buffer_size, 64);
    q.indirect_gpa = alloc(uint64_t{n} * 64, 16);
    q.free.clear();
    for (uint32_t i = n; i-- > 0;) q.free.push_back(static_cast<uint16_t>(i));
    q.chain_of.assign(n, {});
  }
}

bool SyntheticFrontend::event_idx() const {
  return (acked_features_ & feature_bit(kVirtioFRingEventIdx)) != 0;
}

size_t SyntheticFrontend::header_size() const {
  bool long_header = acked_features_ & (feature_bit(kVirtioFVersion1) | feature_bit(15));
  return long_header ? 12 : 10;
}

Result<void> SyntheticFrontend::send_raw(std::span<const uint8_t> bytes, std::span<const int> fds) {
  iovec iov{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 16)];
  if (!fds.empty()) {
    KEEL_CHECK(fds.size() <= 16);
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ssize_t n = sendmsg(sock_.get(), &msg, MSG_NOSIGNAL);
  if (n < 0) return fail_errno("sendmsg");
  if (static_cast<size_t>(n) != bytes.size()) return fail_invalid("short sendmsg");
  return ok();
}

Result<std::vector<uint8_t>> SyntheticFrontend::read_reply(uint32_t request) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  MessageHeader header;
  size_t got = 0;
  auto read_exact = [&](void* dst, size_t len) -> Result<void> {
    got = 0;
    while (got < len) {
      if (std::chrono::steady_clock::now() > deadline) return fail(ETIMEDOUT, "no reply from the back-end");
      pollfd p{sock_.get(), POLLIN, 0};
      int n = poll(&p, 1, pump_ ? 0 : 10);
      if (n <= 0) {
        if (pump_) pump_();
        continue;
      }
      ssize_t r = recv(sock_.get(), static_cast<uint8_t*>(dst) + got, len - got, 0);
      if (r == 0) return fail(ECONNRESET, "back-end closed the connection");
      if (r < 0) {
        if (errno == EINTR) continue;
        return fail_errno("recv");
      }
      got += static_cast<size_t>(r);
    }
    return ok();
  };
  TRY(read_exact(&header, sizeof header));
  if (header.request != request || header.flags != (kVersion | kFlagReply) || header.size > 256)
    return fail_invalid("bad reply: request {} flags {:#x} size {}", header.request, header.flags, header.size);
  std::vector<uint8_t> payload(header.size);
  if (header.size) TRY(read_exact(payload.data(), header.size));
  return payload;
}

Result<std::vector<uint8_t>> SyntheticFrontend::request(Request request, std::span<const uint8_t> payload,
                                                        std::span<const int> fds, bool want_reply,
                                                        bool need_reply_flag) {
  std::vector<uint8_t> bytes(kHeaderSize + payload.size());
  uint32_t flags = kVersion;
  bool ack = need_reply_flag && (acked_protocol_ & feature_bit(kProtocolReplyAck));
  if (ack) flags |= kFlagNeedReply;
  MessageHeader header{static_cast<uint32_t>(request), flags, static_cast<uint32_t>(payload.size())};
  std::memcpy(bytes.data(), &header, sizeof header);
  if (!payload.empty()) std::memcpy(bytes.data() + kHeaderSize, payload.data(), payload.size());
  TRY(send_raw(bytes, fds));
  if (want_reply) return read_reply(static_cast<uint32_t>(request));
  if (ack) {
    auto reply = TRY(read_reply(static_cast<uint32_t>(request)));
    uint64_t status = 1;
    if (reply.size() == sizeof status) std::memcpy(&status, reply.data(), sizeof status);
    if (status != 0) return fail_invalid("back-end refused {}", request_name(header.request));
  }
  return std::vector<uint8_t>{};
}

Result<uint64_t> SyntheticFrontend::get_features() {
  auto reply = TRY(request(Request::GetFeatures, {}, {}, true));
  if (reply.size() != 8) return fail_invalid("GET_FEATURES reply of {} bytes", reply.size());
  uint64_t v;
  std::memcpy(&v, reply.data(), 8);
  return v;
}

Result<void> SyntheticFrontend::sync() {
  TRY(get_features());
  return ok();
}

Result<uint16_t> SyntheticFrontend::get_vring_base(uint32_t index) {
  VringState state{index, 0};
  auto reply = TRY(request(Request::GetVringBase, as_bytes_of(state), {}, true));
  if (reply.size() != sizeof state) return fail_invalid("GET_VRING_BASE reply of {} bytes", reply.size());
  std::memcpy(&state, reply.data(), sizeof state);
  return static_cast<uint16_t>(state.num);
}

Result<void> SyntheticFrontend::set_vring_enable(uint32_t index, bool enabled) {
  VringState state{index, enabled ? 1u : 0u};
  TRY(request(Request::SetVringEnable, as_bytes_of(state), {}, false, true));
  return ok();
}

Result<void> SyntheticFrontend::restart_queue(uint32_t i, uint16_t base) {
  Queue& q = queues_[i];
  VringState num{i, options_.queue_size};
  TRY(request(Request::SetVringNum, as_bytes_of(num)));
  VringState b{i, base};
  TRY(request(Request::SetVringBase, as_bytes_of(b)));
  VringAddr addr{i, 0, uva_of(q.desc_gpa), uva_of(q.used_gpa), uva_of(q.avail_gpa), 0};
  TRY(request(Request::SetVringAddr, as_bytes_of(addr), {}, false, true));
  uint64_t idx = i;
  int kick = q.kick.get(), call = q.call.get();
  TRY(request(Request::SetVringKick, as_bytes_of(idx), {&kick, 1}));
  TRY(request(Request::SetVringCall, as_bytes_of(idx), {&call, 1}));
  if (acked_features_ & feature_bit(kFeatureProtocolFeatures)) TRY(set_vring_enable(i, true));
  return sync();
}

Result<void> SyntheticFrontend::set_log_base(int fd, uint64_t size, uint64_t offset) {
  LogDesc log{size, offset};
  auto reply = TRY(request(Request::SetLogBase, as_bytes_of(log), {&fd, 1}, true));
  if (!reply.empty()) return fail_invalid("SET_LOG_BASE reply has a {}-byte payload", reply.size());
  return ok();
}

Result<void> SyntheticFrontend::set_logging(bool on) {
  uint64_t features = on ? acked_features_ | feature_bit(kFeatureLogAll) : acked_features_;
  TRY(request(Request::SetFeatures, as_bytes_of(features), {}, false, true));
  for (uint32_t i = 0; i < queues_.size(); ++i) {
    const Queue& q = queues_[i];
    VringAddr addr{i, on ? kVringFLog : 0, uva_of(q.desc_gpa), uva_of(q.used_gpa), uva_of(q.avail_gpa),
                   on ? q.used_gpa : 0};
    TRY(request(Request::SetVringAddr, as_bytes_of(addr), {}, false, true));
  }
  return sync();
}

bool SyntheticFrontend::peer_closed() {
  for (int i = 0; i < 100; ++i) {
    if (pump_) pump_();
    pollfd p{sock_.get(), POLLIN, 0};
    if (poll(&p, 1, pump_ ? 0 : 10) > 0) {
      uint8_t b;
      ssize_t r = recv(sock_.get(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno == ECONNRESET)) return true;
      if (r > 0) return false;
    }
  }
  return false;
}

Result<void> SyntheticFrontend::start() {
  uint64_t offered = TRY(get_features());
  bool protocol = options_.protocol_features && (offered & feature_bit(kFeatureProtocolFeatures));
  if (protocol) {
    auto reply = TRY(request(Request::GetProtocolFeatures, {}, {}, true));
    uint64_t pf = 0;
    if (reply.size() == 8) std::memcpy(&pf, reply.data(), 8);
    uint64_t want = feature_bit(kProtocolMq) | (options_.reply_ack ? feature_bit(kProtocolReplyAck) : 0) |
                    (options_.log_shmfd ? feature_bit(kProtocolLogShmfd) : 0);
    uint64_t set = pf & want;
    TRY(request(Request::SetProtocolFeatures, as_bytes_of(set)));
    acked_protocol_ = set;
    if (set & feature_bit(kProtocolMq)) {
      auto qn = TRY(request(Request::GetQueueNum, {}, {}, true));
      if (qn.size() == 8) std::memcpy(&backend_queue_num_, qn.data(), 8);
    }
  }
  TRY(request(Request::SetOwner));
  uint64_t acked = offered & options_.wanted_features;
  if (!protocol) acked &= ~feature_bit(kFeatureProtocolFeatures);
  acked &= ~feature_bit(kFeatureLogAll);  // QEMU sets it only while migrating (set_logging())
  TRY(request(Request::SetFeatures, as_bytes_of(acked)));
  acked_features_ = acked;

  std::vector<uint8_t> table(sizeof(MemTableHeader) + regions_.size() * sizeof(MemRegionDesc));
  MemTableHeader th{static_cast<uint32_t>(regions_.size()), 0};
  std::memcpy(table.data(), &th, sizeof th);
  std::memcpy(table.data() + sizeof th, regions_.data(), regions_.size() * sizeof(MemRegionDesc));
  std::vector<int> fds(regions_.size(), memfd_.get());
  TRY(request(Request::SetMemTable, table, fds, false, true));

  for (uint32_t i = 0; i < queues_.size(); ++i) {
    Queue& q = queues_[i];
    q.kick = TRY(make_eventfd());
    q.call = TRY(make_eventfd());
    q.err = TRY(make_eventfd());
    VringState num{i, options_.queue_size};
    TRY(request(Request::SetVringNum, as_bytes_of(num)));
    VringState base{i, q.avail_idx};
    TRY(request(Request::SetVringBase, as_bytes_of(base)));
    VringAddr addr{i, 0, uva_of(q.desc_gpa), uva_of(q.used_gpa), uva_of(q.avail_gpa), 0};
    TRY(request(Request::SetVringAddr, as_bytes_of(addr), {}, false, true));
    uint64_t idx = i;
    int kick = q.kick.get(), call = q.call.get(), err = q.err.get();
    TRY(request(Request::SetVringKick, as_bytes_of(idx), {&kick, 1}));
    TRY(request(Request::SetVringCall, as_bytes_of(idx), {&call, 1}));
    TRY(request(Request::SetVringErr, as_bytes_of(idx), {&err, 1}));
    if (protocol) TRY(set_vring_enable(i, true));
  }
  return sync();
}

VringDesc* SyntheticFrontend::desc_table(uint32_t queue) {
  return reinterpret_cast<VringDesc*>(host(queues_[queue].desc_gpa));
}
uint16_t* SyntheticFrontend::avail_ring(uint32_t queue) {
  return reinterpret_cast<uint16_t*>(host(queues_[queue].avail_gpa));
}
uint8_t* SyntheticFrontend::used_ring(uint32_t queue) { return host(queues_[queue].used_gpa); }
int SyntheticFrontend::call_fd(uint32_t queue) const { return queues_[queue].call.get(); }
int SyntheticFrontend::err_fd(uint32_t queue) const { return queues_[queue].err.get(); }
size_t SyntheticFrontend::free_descriptors(uint32_t queue) const { return queues_[queue].free.size(); }

void SyntheticFrontend::publish_avail(uint32_t queue, uint16_t head) {
  Queue& q = queues_[queue];
  uint16_t* avail = avail_ring(queue);
  avail[2 + (q.avail_idx % options_.queue_size)] = head;
  ++q.avail_idx;
  __atomic_store_n(&avail[1], q.avail_idx, __ATOMIC_RELEASE);
}

bool SyntheticFrontend::kick(uint32_t queue, bool force) {
  Queue& q = queues_[queue];
  std::atomic_thread_fence(std::memory_order_seq_cst);
  uint16_t old_idx = q.kicked_at;
  q.kicked_at = q.avail_idx;
  bool need = true;
  if (!force && event_idx()) {
    uint16_t avail_event;
    std::memcpy(&avail_event, used_ring(queue) + 4 + 8 * options_.queue_size, 2);
    need = need_event(avail_event, q.avail_idx, old_idx);
  }
  if (!need) return false;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(q.kick.get(), &one, sizeof one);
  ++kicks_sent_;
  return true;
}

uint64_t SyntheticFrontend::take_calls(uint32_t queue) {
  uint64_t v = 0;
  if (::read(queues_[queue].call.get(), &v, sizeof v) != sizeof v) return 0;
  return v;
}

size_t SyntheticFrontend::post_rx_buffers(uint16_t pair, size_t count) {
  uint32_t qi = 2u * pair;
  Queue& q = queues_[qi];
  VringDesc* desc = desc_table(qi);
  size_t posted = 0;
  while (posted < count && !q.free.empty()) {
    uint16_t d = q.free.back();
    q.free.pop_back();
    desc[d] = VringDesc{buffer_gpa(q, d), options_.buffer_size, kDescFWrite, 0};
    q.chain_of[d] = {d};
    publish_avail(qi, d);
    ++posted;
  }
  return posted;
}

bool SyntheticFrontend::transmit(uint16_t pair, std::span<const uint8_t> frame, TxLayout layout,
                                 std::span<const uint8_t> given_header) {
  uint32_t qi = 2u * pair + 1;
  Queue& q = queues_[qi];
  VringDesc* desc = desc_table(qi);
  const size_t hdr = header_size();
  const uint32_t bs = options_.buffer_size;
  uint8_t header[12] = {};
  if (hdr == 12) header[10] = 1;  // num_buffers, ignored on transmit
  KEEL_CHECK(given_header.empty() || given_header.size() == hdr);
  if (!given_header.empty()) std::memcpy(header, given_header.data(), hdr);

  // Fast path (what the benchmark uses): header and frame in one buffer, no allocation.
  if (layout == TxLayout::Single && hdr + frame.size() <= bs) {
    if (q.free.empty()) return false;
    uint16_t d = q.free.back();
    q.free.pop_back();
    uint8_t* buf = host(buffer_gpa(q, d));
    std::memcpy(buf, header, hdr);
    std::memcpy(buf + hdr, frame.data(), frame.size());
    desc[d] = VringDesc{buffer_gpa(q, d), static_cast<uint32_t>(hdr + frame.size()), 0, 0};
    q.chain_of[d].assign(1, d);
    publish_avail(qi, d);
    return true;
  }

  // The pieces the frame goes in: (bytes, length) in buffer order.
  struct Piece { const uint8_t* data; size_t len; };
  std::vector<Piece> pieces;
  std::vector<uint8_t> joined;
  if (layout == TxLayout::Single || layout == TxLayout::Indirect) {
    joined.assign(header, header + hdr);
    joined.insert(joined.end(), frame.begin(), frame.end());
    for (size_t off = 0; off < joined.size(); off += bs)
      pieces.push_back({joined.data() + off, std::min<size_t>(bs, joined.size() - off)});
  } else {
    pieces.push_back({header, hdr});
    size_t chunk = layout == TxLayout::Scattered ? (frame.size() + 2) / 3 : bs;
    chunk = std::max<size_t>(1, std::min<size_t>(chunk, bs));
    for (size_t off = 0; off < frame.size(); off += chunk)
      pieces.push_back({frame.data() + off, std::min(chunk, frame.size() - off)});
  }

  if (layout == TxLayout::Indirect) {
    if (pieces.size() != 1 || joined.size() < hdr + 1 || q.free.empty()) return false;
    uint16_t d = q.free.back();
    q.free.pop_back();
    uint8_t* buf = host(buffer_gpa(q, d));
    std::memcpy(buf, joined.data(), joined.size());
    uint64_t table_gpa = q.indirect_gpa + uint64_t{d} * 64;
    VringDesc table[2] = {{buffer_gpa(q, d), static_cast<uint32_t>(hdr), kDescFNext, 1},
                          {buffer_gpa(q, d) + hdr, static_cast<uint32_t>(joined.size() - hdr), 0, 0}};
    std::memcpy(host(table_gpa), table, sizeof table);
    desc[d] = VringDesc{table_gpa, sizeof table, kDescFIndirect, 0};
    q.chain_of[d] = {d};
    publish_avail(qi, d);
    return true;
  }

  if (q.free.size() < pieces.size()) return false;
  std::vector<uint16_t> used;
  for (size_t i = 0; i < pieces.size(); ++i) {
    used.push_back(q.free.back());
    q.free.pop_back();
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    uint16_t d = used[i];
    std::memcpy(host(buffer_gpa(q, d)), pieces[i].data, pieces[i].len);
    bool last = i + 1 == pieces.size();
    desc[d] = VringDesc{buffer_gpa(q, d), static_cast<uint32_t>(pieces[i].len),
                        static_cast<uint16_t>(last ? 0 : kDescFNext), last ? uint16_t{0} : used[i + 1]};
  }
  q.chain_of[used[0]] = used;
  publish_avail(qi, used[0]);
  return true;
}

size_t SyntheticFrontend::reclaim_tx(uint16_t pair) {
  uint32_t qi = 2u * pair + 1;
  Queue& q = queues_[qi];
  uint8_t* used = used_ring(qi);
  uint16_t used_idx = __atomic_load_n(reinterpret_cast<uint16_t*>(used + 2), __ATOMIC_ACQUIRE);
  size_t done = 0;
  while (q.last_used != used_idx) {
    VringUsedElem e;
    std::memcpy(&e, used + 4 + 8 * (q.last_used % options_.queue_size), sizeof e);
    ++q.last_used;
    KEEL_CHECK(e.id < options_.queue_size);
    for (uint16_t d : q.chain_of[e.id]) q.free.push_back(d);
    q.chain_of[e.id].clear();
    ++done;
  }
  if (event_idx()) avail_ring(qi)[2 + options_.queue_size] = q.last_used;
  return done;
}

size_t SyntheticFrontend::receive(uint16_t pair, const std::function<void(std::span<const uint8_t>)>& on_frame) {
  return receive_with_header(pair, [&](std::span<const uint8_t>, std::span<const uint8_t> frame) { on_frame(frame); });
}

size_t SyntheticFrontend::receive_with_header(
    uint16_t pair, const std::function<void(std::span<const uint8_t>, std::span<const uint8_t>)>& on_frame) {
  uint32_t qi = 2u * pair;
  Queue& q = queues_[qi];
  uint8_t* used = used_ring(qi);
  uint16_t* avail = avail_ring(qi);
  VringDesc* desc = desc_table(qi);
  const size_t hdr = header_size();
  bool mergeable = acked_features_ & feature_bit(15);
  size_t frames = 0;
  std::vector<uint8_t> frame;
  for (;;) {
    uint16_t used_idx = __atomic_load_n(reinterpret_cast<uint16_t*>(used + 2), __ATOMIC_ACQUIRE);
    if (q.last_used == used_idx) break;
    VringUsedElem e;
    std::memcpy(&e, used + 4 + 8 * (q.last_used % options_.queue_size), sizeof e);
    KEEL_CHECK(e.id < options_.queue_size);
    KEEL_CHECK(e.len <= options_.buffer_size);
    uint8_t* buf = host(buffer_gpa(q, e.id));
    uint16_t num_buffers = 1;
    if (mergeable) std::memcpy(&num_buffers, buf + 10, 2);
    if (static_cast<uint16_t>(used_idx - q.last_used) < num_buffers) break;  // not all there yet
    if (num_buffers == 1) {
      // One buffer: hand out the frame where it lies.
      ++q.last_used;
      size_t skip = std::min<size_t>(hdr, e.len);
      on_frame({buf, skip}, {buf + skip, e.len - skip});
      desc[e.id] = VringDesc{buffer_gpa(q, e.id), options_.buffer_size, kDescFWrite, 0};
      publish_avail(qi, static_cast<uint16_t>(e.id));
      ++frames;
      continue;
    }
    frame.clear();
    std::vector<uint8_t> header;
    for (uint16_t b = 0; b < num_buffers; ++b) {
      VringUsedElem eb;
      std::memcpy(&eb, used + 4 + 8 * (q.last_used % options_.queue_size), sizeof eb);
      ++q.last_used;
      uint8_t* data = host(buffer_gpa(q, eb.id));
      size_t skip = b == 0 ? std::min<size_t>(hdr, eb.len) : 0;
      if (b == 0) header.assign(data, data + skip);
      frame.insert(frame.end(), data + skip, data + eb.len);
      // Re-post the buffer.
      desc[eb.id] = VringDesc{buffer_gpa(q, eb.id), options_.buffer_size, kDescFWrite, 0};
      publish_avail(qi, static_cast<uint16_t>(eb.id));
    }
    on_frame(header, frame);
    ++frames;
  }
  if (event_idx()) avail[2 + options_.queue_size] = q.last_used;
  return frames;
}

std::vector<uint8_t> virtio_net_header(uint8_t flags, uint8_t gso_type, uint16_t hdr_len, uint16_t gso_size,
                                       uint16_t csum_start, uint16_t csum_offset) {
  std::vector<uint8_t> h(12, 0);
  h[0] = flags;
  h[1] = gso_type;
  const uint16_t fields[4] = {hdr_len, gso_size, csum_start, csum_offset};
  for (int i = 0; i < 4; ++i) {
    h[2 + 2 * i] = uint8_t(fields[i]);
    h[3 + 2 * i] = uint8_t(fields[i] >> 8);
  }
  return h;
}

}  // namespace keel::vhost::testing
