// QmpClient: QEMU Machine Protocol over a unix socket.
//
// A reader thread owns the receive side: replies complete the matching execute() (matched by "id"),
// events go to the event callback, and EOF (QEMU exited) to the close callback. execute() may be
// called from any thread, concurrently. Callbacks run on the reader thread and must not destroy the
// client (post the work elsewhere).
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "base/unique_fd.h"

namespace keel::qemu {

struct QmpEvent {
  std::string name;          // "SHUTDOWN", "STOP", "RESUME", "DEVICE_DELETED", ...
  nlohmann::json data;       // may be null
  double timestamp = 0;      // seconds since the epoch, from QEMU
};

// Splits a byte stream into QMP messages (one JSON object per line) and classifies them. Separate
// from the socket so it can be fuzzed and unit-tested.
class QmpMessageBuffer {
public:
  static constexpr size_t kMaxMessage = 16 << 20;
  // Appends bytes; returns an error if a message grows past kMaxMessage.
  Result<void> append(std::string_view bytes);
  // The next complete message, parsed; nullopt if none yet. A malformed line is an error.
  Result<std::optional<nlohmann::json>> next();

private:
  std::string buffer_;
};

class QmpClient {
public:
  using EventCallback = std::function<void(const QmpEvent&)>;
  using CloseCallback = std::function<void()>;

  // Connects, reads the greeting and negotiates capabilities. Retries connecting until `timeout`
  // (the socket appears shortly after QEMU starts).
  static Result<std::unique_ptr<QmpClient>> connect(const std::string& socket_path,
                                                    std::chrono::milliseconds timeout,
                                                    EventCallback on_event = {},
                                                    CloseCallback on_close = {});
  ~QmpClient();
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  // Runs a command and waits for its reply. QMP errors come back as Error with QEMU's description.
  // `pass_fd` >= 0 is sent along with the command (SCM_RIGHTS), as getfd/add-fd expect.
  Result<nlohmann::json> execute(const std::string& command, const nlohmann::json& arguments = nullptr,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(30),
                                 int pass_fd = -1);

  bool connected() const;
  // The greeting's QEMU version, e.g. "7.2.0".
  const std::string& qemu_version() const { return version_; }

private:
  QmpClient(UniqueFd fd, EventCallback on_event, CloseCallback on_close);
  void reader_loop();

  UniqueFd fd_;
  EventCallback on_event_;
  CloseCallback on_close_;
  std::string version_;
  std::thread reader_;

  mutable std::mutex mutex_;
  std::condition_variable replied_;
  std::mutex write_mutex_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::optional<nlohmann::json>> pending_;
  bool closed_ = false;
};

}  // namespace keel::qemu
