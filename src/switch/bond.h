// BondPort: several member ports (uplinks) acting as one switch port.
//   active-backup: one member carries all traffic; when its link goes down (carrier monitoring), the
//                  next live member takes over.
//   balance-slb:   each source MAC + VLAN is pinned (by hash) to one live member for transmission;
//                  unicast is accepted from every member, broadcast/multicast only from the first
//                  live member, so the upstream switch's floods are not looped back.
// Members' fds sit in one private epoll set, whose fd is the bond's poll_fd().
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "switch/port.h"

namespace keel::sw {

enum class BondMode { ActiveBackup, BalanceSlb };
Result<BondMode> parse_bond_mode(const std::string& s);
const char* bond_mode_name(BondMode m);

class BondPort final : public Port {
public:
  struct Member {
    std::string name;
    std::unique_ptr<Port> port;
    bool up = false;
  };
  static Result<std::unique_ptr<BondPort>> create(BondMode mode, std::vector<Member> members);

  std::string_view type() const override { return "bond"; }
  int poll_fd() const override { return epoll_.get(); }
  size_t receive(PacketBatch& batch) override;
  void send(const uint8_t* frame, size_t len) override;
  void flush() override;
  bool link_up() const override;  // any member up; also refreshes member link states
  MacAddress mac() const override;

  // Re-reads member link states; returns true when the active member changed.
  bool monitor();
  int active() const { return active_; }
  const std::vector<Member>& members() const { return members_; }
  BondMode mode() const { return mode_; }

private:
  BondPort(BondMode mode, std::vector<Member> members, UniqueFd epoll)
      : mode_(mode), members_(std::move(members)), epoll_(std::move(epoll)) {}
  int first_live() const;

  BondMode mode_;
  std::vector<Member> members_;
  UniqueFd epoll_;
  int active_ = -1;
};

}  // namespace keel::sw
