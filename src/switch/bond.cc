#include "switch/bond.h"

#include <sys/epoll.h>

#include <cstring>

#include "base/log.h"
#include "switch/flow.h"

namespace keel::sw {

Result<BondMode> parse_bond_mode(const std::string& s) {
  if (s == "active-backup") return BondMode::ActiveBackup;
  if (s == "balance-slb") return BondMode::BalanceSlb;
  return fail_invalid("unknown bond_mode '{}' (active-backup or balance-slb)", s);
}

const char* bond_mode_name(BondMode m) { return m == BondMode::ActiveBackup ? "active-backup" : "balance-slb"; }

Result<std::unique_ptr<BondPort>> BondPort::create(BondMode mode, std::vector<Member> members) {
  if (members.size() < 2) return fail_invalid("a bond needs at least two members");
  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) return fail_errno("epoll_create1");
  UniqueFd epoll(ep);
  for (size_t i = 0; i < members.size(); ++i) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = i;
    int fd = members[i].port->poll_fd();
    if (fd >= 0 && epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) return fail_errno("epoll_ctl " + members[i].name);
  }
  std::unique_ptr<BondPort> bond(new BondPort(mode, std::move(members), std::move(epoll)));
  bond->monitor();
  return bond;
}

int BondPort::first_live() const {
  for (size_t i = 0; i < members_.size(); ++i)
    if (members_[i].up) return int(i);
  return -1;
}

bool BondPort::monitor() {
  for (auto& m : members_) m.up = m.port->link_up();
  int before = active_;
  if (active_ < 0 || !members_[size_t(active_)].up) active_ = first_live();
  if (active_ != before)
    KEEL_LOG_INFO("bond: active member is now {}", active_ >= 0 ? members_[size_t(active_)].name : "(none)");
  return active_ != before;
}

bool BondPort::link_up() const {
  const_cast<BondPort*>(this)->monitor();
  return active_ >= 0;
}

MacAddress BondPort::mac() const { return members_.front().port->mac(); }

size_t BondPort::receive(PacketBatch& batch) {
  size_t added = 0;
  for (size_t i = 0; i < members_.size() && batch.size() < PacketBatch::kCapacity; ++i) {
    size_t before = batch.size();
    size_t n = members_[i].port->receive(batch);
    if (n == 0) continue;
    bool accept_all = int(i) == active_;
    if (mode_ == BondMode::ActiveBackup && !accept_all) {
      // Frames arriving on a backup member are not ours to switch.
      counters.rx_dropped += n;
      batch.set_size(before);
      continue;
    }
    if (mode_ == BondMode::BalanceSlb && !accept_all) {
      // Keep unicast, drop floods that the upstream switch also sent to the active member.
      size_t keep = before;
      for (size_t j = before; j < before + n; ++j) {
        if (batch[j].len >= 6 && (batch[j].data[0] & 1)) {
          counters.rx_dropped++;
          continue;
        }
        if (keep != j) std::swap(batch[keep], batch[j]);
        ++keep;
      }
      batch.set_size(keep);
      n = keep - before;
    }
    added += n;
  }
  return added;
}

void BondPort::send(const uint8_t* frame, size_t len) {
  int target = active_;
  if (mode_ == BondMode::BalanceSlb && len >= 16) {
    // Pin each (source MAC, VLAN) to one live member.
    uint64_t w[1] = {0};
    std::memcpy(&w[0], frame + 6, 6);
    if (len >= 18 && frame[12] == 0x81 && frame[13] == 0x00) w[0] ^= uint64_t((frame[14] & 0x0f) << 8 | frame[15]) << 48;
    std::vector<int> live;
    for (size_t i = 0; i < members_.size(); ++i)
      if (members_[i].up) live.push_back(int(i));
    if (!live.empty()) target = live[hash_words(w, 1) % live.size()];
  }
  if (target < 0) {
    counters.tx_dropped++;
    return;
  }
  members_[size_t(target)].port->send(frame, len);
  counters.tx_packets++;
  counters.tx_bytes += len;
}

void BondPort::flush() {
  for (auto& m : members_) m.port->flush();
}

}  // namespace keel::sw
