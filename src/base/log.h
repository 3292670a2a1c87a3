// Logging through spdlog. Every binary calls keel::init_logging() once; code logs with
// KEEL_LOG_INFO("...{}...", x) and friends, which compile to spdlog calls on the default logger.
#pragma once

#include <string_view>

#include <spdlog/spdlog.h>

namespace keel {

enum class LogTarget { Stderr, Syslog };

// Level names as spdlog knows them: trace, debug, info, warn, error, critical, off.
// KEEL_LOG (environment) overrides `level` when set.
void init_logging(std::string_view program, std::string_view level = "info",
                  LogTarget target = LogTarget::Stderr);

}  // namespace keel

#define KEEL_LOG_TRACE(...) SPDLOG_TRACE(__VA_ARGS__)
#define KEEL_LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define KEEL_LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define KEEL_LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define KEEL_LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)
