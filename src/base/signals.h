// Signal handling for daemons and long-running tools: signals are turned into fd readiness
// (signalfd) so an EventLoop handles them like any other event, and nothing runs in a signal
// handler.
#pragma once

#include <csignal>
#include <functional>
#include <initializer_list>

#include "base/event_loop.h"
#include "base/result.h"
#include "base/unique_fd.h"

namespace keel {

// Blocks `signals` in the calling thread (and threads it creates later) and returns a signalfd
// that becomes readable when one arrives. Call before starting other threads.
Result<UniqueFd> block_signals_to_fd(std::initializer_list<int> signals);

// Reads one pending signal number from a signalfd, or 0 if none is pending.
Result<int> read_signal(int signal_fd);

// Watches `signal_fd` on `loop` and calls `handler(signo)` for each signal.
Result<void> watch_signals(EventLoop& loop, int signal_fd, std::function<void(int)> handler);

// Ignores SIGPIPE so a closed socket gives EPIPE instead of killing the process.
void ignore_sigpipe();

}  // namespace keel
