#include "base/log.h"

#include <cstdlib>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/syslog_sink.h>

namespace keel {

void init_logging(std::string_view program, std::string_view level, LogTarget target) {
  std::string name(program);
  std::shared_ptr<spdlog::logger> logger;
  if (target == LogTarget::Syslog) {
    logger = spdlog::syslog_logger_mt(name, name, LOG_PID);
  } else {
    logger = spdlog::stderr_color_mt(name);
  }
  // Logs go to stderr, which tests and supervisors capture; keep lines short and greppable.
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %n: %v");
  spdlog::set_default_logger(logger);
  std::string wanted(level);
  if (const char* env = std::getenv("KEEL_LOG")) wanted = env;
  spdlog::set_level(spdlog::level::from_str(wanted));
}

}  // namespace keel
