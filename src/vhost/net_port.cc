#include "vhost/net_port.h"

#include <cstring>

#include "base/log.h"

namespace keel::vhost {

namespace {

// The bytes a frame is sent as: the virtio-net header, then the frame's head and payload (a plain
// frame is all head).
struct OutStream {
  std::span<const uint8_t> parts[3];
  size_t size() const { return parts[0].size() + parts[1].size() + parts[2].size(); }
};

// Copies the stream from byte `pos` on into `segments`, starting at the beginning of the
// segments. Returns how many bytes it wrote (bounded by the segments' room).
size_t write_stream(std::span<const BufferSegment> segments, const OutStream& stream, size_t pos) {
  const size_t total = stream.size();
  size_t written = 0;
  for (const BufferSegment& seg : segments) {
    size_t seg_off = 0;
    while (seg_off < seg.len && pos < total) {
      // The part `pos` lies in, and how far into it.
      size_t part = 0, in_part = pos;
      while (in_part >= stream.parts[part].size()) in_part -= stream.parts[part++].size();
      size_t n = std::min<size_t>(stream.parts[part].size() - in_part, seg.len - seg_off);
      std::memcpy(seg.data + seg_off, stream.parts[part].data() + in_part, n);
      seg_off += n;
      pos += n;
      written += n;
    }
    if (pos == total) break;
  }
  return written;
}

// Reads the first `n` bytes of a chain's readable segments into `out` (the virtio-net header, which
// a guest may split over descriptors).
void read_prefix(std::span<const BufferSegment> segments, uint8_t* out, size_t n) {
  for (const BufferSegment& seg : segments) {
    if (n == 0) break;
    size_t k = std::min<size_t>(seg.len, n);
    std::memcpy(out, seg.data, k);
    out += k;
    n -= k;
  }
}

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
void put_le16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// The header's wire form (little-endian), `size` bytes of it (10 or 12).
void encode_header(const VirtioNetHdr& h, uint8_t* out) {
  out[0] = h.flags;
  out[1] = h.gso_type;
  put_le16(out + 2, h.hdr_len);
  put_le16(out + 4, h.gso_size);
  put_le16(out + 6, h.csum_start);
  put_le16(out + 8, h.csum_offset);
  put_le16(out + 10, h.num_buffers);
}

// Live migration: marks the first `bytes` bytes of `segments` (what write_stream() filled) dirty.
void log_written(DirtyLog& log, const GuestMemory& memory, std::span<const BufferSegment> segments,
                 size_t bytes) {
  for (const BufferSegment& seg : segments) {
    if (bytes == 0) break;
    size_t n = std::min<size_t>(seg.len, bytes);
    log.mark_host(memory, seg.data, n);
    bytes -= n;
  }
}

}  // namespace

VhostNetPort::VhostNetPort(VhostNetOptions options) : options_(std::move(options)) {}

VhostNetPort::~VhostNetPort() = default;

Result<std::unique_ptr<VhostNetPort>> VhostNetPort::create(VhostNetOptions options) {
  if (options.queue_pairs == 0 || options.queue_pairs > kMaxQueues / 2)
    return fail_invalid("vhost-net: {} queue pairs (must be 1..{})", options.queue_pairs, kMaxQueues / 2);
  std::unique_ptr<VhostNetPort> port(new VhostNetPort(std::move(options)));
  port->scratch_.reset(new uint8_t[kScratchSize]);
  BackendOptions backend_options;
  backend_options.socket_path = port->options_.socket_path;
  backend_options.mode = port->options_.mode;
  backend_options.reconnect_interval = port->options_.reconnect_interval;
  port->backend_ = TRY(VhostUserBackend::create(*port, std::move(backend_options)));
  return port;
}

uint64_t VhostNetPort::device_features() const {
  uint64_t f = feature_bit(kVirtioFVersion1) | feature_bit(kVirtioFRingEventIdx) |
               feature_bit(kVirtioFRingIndirectDesc) | feature_bit(kVirtioFAnyLayout) |
               feature_bit(kVirtioNetFStatus);
  if (options_.mergeable_rx_buffers) f |= feature_bit(kVirtioNetFMrgRxbuf);
  if (options_.queue_pairs > 1) f |= feature_bit(kVirtioNetFMq);
  if (options_.offloads)
    f |= feature_bit(kVirtioNetFCsum) | feature_bit(kVirtioNetFGuestCsum) | feature_bit(kVirtioNetFHostTso4) |
         feature_bit(kVirtioNetFHostTso6) | feature_bit(kVirtioNetFGuestTso4) | feature_bit(kVirtioNetFGuestTso6) |
         feature_bit(kVirtioNetFGuestEcn);
  return f;
}

void VhostNetPort::on_features(uint64_t features) {
  mergeable_ = (features & feature_bit(kVirtioNetFMrgRxbuf)) != 0;
  bool long_header = mergeable_ || (features & feature_bit(kVirtioFVersion1));
  header_size_ = long_header ? sizeof(VirtioNetHdr) : kVirtioNetHdrLegacySize;
}

void VhostNetPort::on_queue_ready(uint32_t index, bool ready) {
  // Receive buffers are only looked for when a frame is there to deliver: no kicks wanted.
  if (ready && index % 2 == 0) backend_->queue(index).set_kicks_wanted(false);
  update_link();
}

void VhostNetPort::on_disconnect() {
  held_count_ = 0;
  update_link();
}

void VhostNetPort::update_link() {
  uint16_t active = 0;
  for (uint16_t p = 0; p < options_.queue_pairs; ++p)
    if (backend_->queue(2 * p).ready() && backend_->queue(2 * p + 1).ready()) ++active;
  active_pairs_ = active;
  bool up = backend_->connected() && backend_->queue(0).ready() && backend_->queue(1).ready();
  if (up != link_up_) {
    link_up_ = up;
    KEEL_LOG_INFO("vhost-net {}: link {}", options_.socket_path, up ? "up" : "down");
    if (link_callback_) link_callback_(up);
  }
}

Result<void> VhostNetPort::handle_events() {
  release();
  TRY(backend_->handle_events());
  // Kicks were drained by the backend; receive_batch() looks at every queue anyway.
  (void)backend_->take_kicked();
  return ok();
}

Result<void> VhostNetPort::wait_and_handle(std::chrono::milliseconds timeout) {
  release();
  TRY(backend_->wait_and_handle(timeout));
  (void)backend_->take_kicked();
  return ok();
}

void VhostNetPort::count_broken(VirtQueue&) {
  ++counters_.device_errors;
  update_link();
}

void VhostNetPort::release() {
  if (held_count_ == 0) return;
  // Chains were held in pop order per queue, so completing them in array order keeps each queue
  // in order.
  uint64_t touched = 0;
  for (size_t i = 0; i < held_count_; ++i) {
    VirtQueue& q = backend_->queue(held_[i].queue);
    if (!q.mapped()) continue;
    q.push_used(held_[i].head, 0);
    touched |= 1ull << (held_[i].queue / 2 % 64);
  }
  held_count_ = 0;
  for (uint16_t p = 0; p < options_.queue_pairs; ++p) {
    if (!(touched & (1ull << (p % 64)))) continue;
    VirtQueue& q = backend_->queue(2 * p + 1);
    q.publish_used();
    if (q.notify_if_needed()) ++counters_.guest_notifications;
  }
}

size_t VhostNetPort::receive_batch(RxBatch& batch) {
  release();
  batch.count_ = 0;
  batch.more_ = false;
  const GuestMemory& memory = backend_->memory();
  size_t scratch_used = 0;
  uint16_t pairs = options_.queue_pairs;
  uint16_t start = next_rx_pair_;
  next_rx_pair_ = static_cast<uint16_t>((start + 1) % pairs);

  for (uint16_t step = 0; step < pairs; ++step) {
    uint16_t pair = static_cast<uint16_t>((start + step) % pairs);
    uint16_t qi = static_cast<uint16_t>(2 * pair + 1);
    VirtQueue& q = backend_->queue(qi);
    while (q.ready()) {
      if (batch.count_ == RxBatch::kMaxFrames || held_count_ == kMaxHeld) {
        batch.more_ = q.available() != 0;
        if (batch.more_) {
          backend_->wake();  // keep poll_fd() readable for a caller that waits instead of looping
          return batch.count_;
        }
        break;
      }
      auto status = q.pop(memory, chain_);
      if (status == VirtQueue::PopStatus::Empty) break;
      if (status == VirtQueue::PopStatus::Broken) {
        count_broken(q);
        break;
      }
      held_[held_count_++] = HeldChain{qi, chain_.head};

      uint64_t total = chain_.readable_bytes;
      if (total < header_size_ + 14 || total - header_size_ > kMaxFrameSize) {
        ++counters_.rx_dropped;
        continue;
      }
      size_t frame_len = static_cast<size_t>(total - header_size_);
      VirtioNetHdr header{};
      if (host_offloads()) {
        uint8_t raw[sizeof(VirtioNetHdr)] = {};
        read_prefix(chain_.readable(), raw, header_size_);
        header = VirtioNetHdr{raw[0], raw[1], le16(raw + 2), le16(raw + 4), le16(raw + 6), le16(raw + 8), 0};
      }
      // Find where the frame starts, past the header.
      size_t skip = header_size_;
      size_t seg = 0;
      auto readable = chain_.readable();
      while (seg < readable.size() && skip >= readable[seg].len) {
        skip -= readable[seg].len;
        ++seg;
      }
      std::span<const uint8_t> frame;
      if (readable[seg].len - skip >= frame_len) {
        frame = {readable[seg].data + skip, frame_len};
      } else {
        if (kScratchSize - scratch_used < frame_len) {
          // No room to gather this one: leave it for the next batch.
          --held_count_;
          q.unpop(1);
          batch.more_ = true;
          backend_->wake();
          return batch.count_;
        }
        uint8_t* dst = scratch_.get() + scratch_used;
        size_t copied = 0;
        for (size_t s = seg; s < readable.size() && copied < frame_len; ++s) {
          size_t off = s == seg ? skip : 0;
          size_t n = std::min<size_t>(readable[s].len - off, frame_len - copied);
          std::memcpy(dst + copied, readable[s].data + off, n);
          copied += n;
        }
        frame = {dst, frame_len};
        scratch_used += frame_len;
      }
      batch.frames_[batch.count_++] = RxBatch::Entry{frame, pair, header};
      ++counters_.rx_frames;
      counters_.rx_bytes += frame_len;
    }
  }
  return batch.count_;
}

bool VhostNetPort::send_one(VirtQueue& q, const VirtioNetHdr& header, std::span<const uint8_t> head,
                            std::span<const uint8_t> payload) {
  const GuestMemory& memory = backend_->memory();
  DirtyLog* const log = backend_->dirty_log();  // non-null only while the guest is migrating
  uint8_t header_bytes[sizeof(VirtioNetHdr)];
  encode_header(header, header_bytes);
  const OutStream stream{{{header_bytes, header_size_}, head, payload}};
  const size_t need = stream.size();

  if (!mergeable_) {
    put_le16(header_bytes + 10, 1);  // num_buffers (only in the 12-byte header)
    auto status = q.pop(memory, chain_);
    if (status == VirtQueue::PopStatus::Broken) {
      count_broken(q);
      return false;
    }
    if (status == VirtQueue::PopStatus::Empty) {
      ++counters_.tx_dropped_no_buffers;
      return false;
    }
    if (chain_.writable_bytes < need) {
      // Too small for the frame: the guest gets it back empty (it counts a length error).
      q.push_used(chain_.head, 0);
      ++counters_.tx_dropped_no_buffers;
      return false;
    }
    write_stream(chain_.writable(), stream, 0);
    if (log != nullptr) [[unlikely]]
      log_written(*log, memory, chain_.writable(), need);
    q.push_used(chain_.head, static_cast<uint32_t>(need));
    return true;
  }

  // Mergeable buffers: spread header + frame over as many chains as it takes, then tell the guest
  // how many in the first header.
  size_t pos = 0;
  size_t count = 0;
  uint8_t* num_buffers_at[2] = {nullptr, nullptr};
  while (pos < need) {
    if (count == kMaxMergedBuffers) {
      q.unpop(static_cast<uint16_t>(count));
      ++counters_.tx_dropped_too_big;
      return false;
    }
    auto status = q.pop(memory, chain_);
    if (status == VirtQueue::PopStatus::Broken) {
      count_broken(q);
      return false;
    }
    if (status == VirtQueue::PopStatus::Empty) {
      q.unpop(static_cast<uint16_t>(count));
      ++counters_.tx_dropped_no_buffers;
      return false;
    }
    if (chain_.writable_bytes == 0) {
      q.mark_broken("receive buffer with no device-writable part");
      count_broken(q);
      return false;
    }
    if (count == 0) {
      // Remember where num_buffers (header bytes 10 and 11) lands; it may straddle segments.
      const size_t off = offsetof(VirtioNetHdr, num_buffers);
      size_t base = 0;
      for (const BufferSegment& seg : chain_.writable()) {
        for (size_t b = 0; b < 2; ++b)
          if (!num_buffers_at[b] && off + b >= base && off + b < base + seg.len)
            num_buffers_at[b] = seg.data + (off + b - base);
        base += seg.len;
      }
    }
    size_t n = write_stream(chain_.writable(), stream, pos);
    // Logged even if the frame is dropped later (unpop): the bytes in guest memory changed.
    if (log != nullptr) [[unlikely]]
      log_written(*log, memory, chain_.writable(), n);
    pos += n;
    merge_heads_[count] = chain_.head;
    merge_lens_[count] = static_cast<uint32_t>(n);
    ++count;
  }
  uint16_t nb = static_cast<uint16_t>(count);
  if (num_buffers_at[0]) *num_buffers_at[0] = static_cast<uint8_t>(nb & 0xff);
  if (num_buffers_at[1]) *num_buffers_at[1] = static_cast<uint8_t>(nb >> 8);
  for (size_t i = 0; i < count; ++i) q.push_used(merge_heads_[i], merge_lens_[i]);
  return true;
}

VirtQueue* VhostNetPort::send_queue(uint16_t queue_pair, size_t frames) {
  uint16_t pair = static_cast<uint16_t>(queue_pair % options_.queue_pairs);
  if (!backend_->queue(2 * pair).ready()) pair = 0;
  VirtQueue& q = backend_->queue(2 * pair);
  if (!q.ready()) {
    counters_.tx_dropped_link_down += frames;
    return nullptr;
  }
  return &q;
}

void VhostNetPort::finish_send(VirtQueue& q) {
  q.publish_used();
  if (q.notify_if_needed()) ++counters_.guest_notifications;
}

size_t VhostNetPort::send_batch(std::span<const std::span<const uint8_t>> frames, uint16_t queue_pair) {
  VirtQueue* q = send_queue(queue_pair, frames.size());
  if (!q) return 0;
  const VirtioNetHdr plain{};
  size_t delivered = 0;
  for (auto frame : frames) {
    if (frame.size() > kMaxFrameSize) {
      ++counters_.tx_dropped_too_big;
      continue;
    }
    if (!q->ready()) {
      ++counters_.tx_dropped_link_down;
      continue;
    }
    if (send_one(*q, plain, frame, {})) {
      ++delivered;
      ++counters_.tx_frames;
      counters_.tx_bytes += frame.size();
    }
  }
  finish_send(*q);
  return delivered;
}

bool VhostNetPort::send(std::span<const uint8_t> frame, uint16_t queue_pair) {
  std::span<const uint8_t> one[1] = {frame};
  return send_batch(one, queue_pair) == 1;
}

bool VhostNetPort::guest_accepts(uint8_t gso_type) const {
  const uint64_t f = negotiated_features();
  auto has = [f](int bit) { return (f & feature_bit(bit)) != 0; };
  if (!has(kVirtioNetFGuestCsum)) return false;
  if ((gso_type & kVirtioNetHdrGsoEcn) && !has(kVirtioNetFGuestEcn)) return false;
  switch (gso_type & ~kVirtioNetHdrGsoEcn) {
    case kVirtioNetHdrGsoNone: return true;
    case kVirtioNetHdrGsoTcpv4: return has(kVirtioNetFGuestTso4);
    case kVirtioNetHdrGsoTcpv6: return has(kVirtioNetFGuestTso6);
    default: return false;
  }
}

bool VhostNetPort::send_offloaded(const VirtioNetHdr& header, std::span<const uint8_t> head,
                                  std::span<const uint8_t> payload, uint16_t queue_pair) {
  VirtQueue* q = send_queue(queue_pair, 1);
  if (!q) return false;
  const size_t size = head.size() + payload.size();
  bool delivered = false;
  if (size > kMaxFrameSize) {
    ++counters_.tx_dropped_too_big;
  } else if (send_one(*q, header, head, payload)) {
    delivered = true;
    ++counters_.tx_frames;
    counters_.tx_bytes += size;
  }
  finish_send(*q);
  return delivered;
}

}  // namespace keel::vhost
