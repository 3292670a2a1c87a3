// OpenFlow connections: framing, HELLO/version negotiation and echo over a stream socket, plus the
// passive listeners (ptcp:PORT[:IP], punix:PATH) and active controller connections (tcp:HOST:PORT,
// reconnecting) that produce them. Everything else a message asks for is the Bridge's business.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/event_loop.h"
#include "base/result.h"
#include "base/unique_fd.h"

namespace keel::sw {

class Bridge;

enum class OfRole : uint32_t { NoChange = 0, Equal = 1, Master = 2, Slave = 3 };

// When any OpenFlow connection of this process last received bytes. The daemon's main loop polls
// rather than sleeps for a short while after it (see keel_switch_main.cc).
std::chrono::steady_clock::time_point last_openflow_input();

class OfConnection {
public:
  // on_closed runs (on the loop) after the connection has detached itself; the owner destroys it then.
  OfConnection(Bridge& bridge, UniqueFd fd, std::string peer, std::function<void(OfConnection*)> on_closed);
  ~OfConnection();
  OfConnection(const OfConnection&) = delete;
  OfConnection& operator=(const OfConnection&) = delete;

  Result<void> start();
  uint8_t version() const { return version_; }
  bool negotiated() const { return version_ != 0; }
  const std::string& peer() const { return peer_; }
  OfRole role() const { return role_; }
  void set_role(OfRole r) { role_ = r; }
  // Passive (service) connections default to 0, controllers to 128, as in Open vSwitch.
  uint16_t miss_send_len = 0;
  uint16_t config_flags = 0;
  // OpenFlow 1.0 peer chose Nicira's NXM flow format (NXT_SET_FLOW_FORMAT).
  bool nxm_flow_format = false;
  void send(std::span<const uint8_t> msg);
  void send(const std::vector<uint8_t>& msg) { send(std::span<const uint8_t>(msg)); }
  // Feeds raw bytes as if read from the socket (fuzzing and tests).
  void feed(std::span<const uint8_t> bytes);
  bool closed() const { return closed_; }
  void close();

  // For tests: when set, outgoing messages go here instead of the socket.
  std::vector<uint8_t>* capture = nullptr;

private:
  void on_events(uint32_t events);
  void process_input();
  void handle_hello(std::span<const uint8_t> msg);
  void flush_output();

  Bridge& bridge_;
  UniqueFd fd_;
  std::string peer_;
  std::function<void(OfConnection*)> on_closed_;
  uint8_t version_ = 0;
  OfRole role_ = OfRole::Equal;
  std::vector<uint8_t> in_;
  std::vector<uint8_t> out_;
  size_t out_sent_ = 0;
  bool closed_ = false;
  bool watching_out_ = false;
  bool registered_ = false;
};

// Owns the listeners and controller connections of one bridge.
class OfAgent {
public:
  explicit OfAgent(Bridge& bridge) : bridge_(bridge) {}
  ~OfAgent();
  // "ptcp:PORT[:IP]", "punix:PATH" or "tcp:HOST:PORT". Replaces all previous targets.
  Result<void> set_targets(const std::vector<std::string>& targets);
  const std::vector<std::string>& targets() const { return targets_; }
  size_t connection_count() const { return connections_.size(); }

private:
  struct Listener {
    UniqueFd fd;
    std::string target;
    std::string unix_path;
  };
  struct Active {
    std::string target, host;
    uint16_t port = 0;
    OfConnection* conn = nullptr;
    EventLoop::TimerId retry = 0;
  };
  Result<void> add_listener(const std::string& target);
  void accept_from(Listener& l);
  void connect_active(Active& a);
  void adopt(UniqueFd fd, std::string peer, Active* active);
  void closed(OfConnection* c);
  void clear();

  Bridge& bridge_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::vector<std::string> targets_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<std::unique_ptr<Active>> actives_;
  std::vector<std::unique_ptr<OfConnection>> connections_;
};

}  // namespace keel::sw
