// SwitchDaemon: keel-switch's configuration and control plane. The configuration is one JSON document
// (DIR/config.json) shaped like a small OVSDB: bridges, their ports and interfaces, controllers. Control
// commands (ovs-vsctl-like argv, from keel-switch-ctl over a unix socket) edit a copy of it; the daemon
// then reconciles the running bridges with the result and saves it. Changes apply live.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/event_loop.h"
#include "base/result.h"
#include "switch/bridge.h"
#include "switch/of_connection.h"

namespace keel::sw {

class SwitchDaemon {
public:
  SwitchDaemon(EventLoop& loop, std::string state_dir);
  ~SwitchDaemon();

  // Loads DIR/config.json (if any) and brings the bridges up.
  Result<void> load();
  // Runs one ovs-vsctl-style command line ("add-br br0 -- set-controller br0 ptcp:6653"); returns its output.
  Result<std::string> execute(const std::vector<std::string>& argv);
  // Serves keel-switch-ctl on a unix socket.
  Result<void> listen_control(const std::string& path);

  Bridge* bridge(const std::string& name);

private:
  struct LiveBridge {
    std::unique_ptr<Bridge> bridge;
    std::unique_ptr<OfAgent> agent;
    nlohmann::json applied;  // the bridge's config as last applied
  };
  // `known` is the configuration already accepted (null at start-up): a port it already had that
  // cannot be opened (its interface vanished) is logged and retried later rather than failing the
  // whole change; a port the change adds or alters must open, or the change fails.
  Result<void> reconcile(const nlohmann::json& config, const nlohmann::json* known);
  Result<void> reconcile_bridge(LiveBridge& lb, const nlohmann::json& want, const nlohmann::json* known);
  Result<void> save();
  Result<std::string> apply_command(nlohmann::json& config, const std::vector<std::string>& cmd);
  std::string show(const nlohmann::json& config);
  void on_control_client(int fd);

  EventLoop& loop_;
  std::string state_dir_;
  nlohmann::json config_;
  std::map<std::string, LiveBridge> bridges_;
  bool known_given_ = false;
  UniqueFd control_;
  std::string control_path_;
};

}  // namespace keel::sw
