// The one logger of eep: spdlog to stderr (stdout is reserved for command output that
// other tools parse, such as `listening ENDPOINT` or --json results).
#pragma once

// Debug and trace lines are compiled in (spdlog drops SPDLOG_DEBUG below its compile-time
// level, info unless set) and filtered at run time by --log-level.
#ifndef SPDLOG_ACTIVE_LEVEL
#define SPDLOG_ACTIVE_LEVEL SPDLOG_LEVEL_TRACE
#endif
#include <spdlog/spdlog.h>

#include <string>

namespace eep {

// Sets the level from a name (trace, debug, info, warn, error, off). Thread-safe.
void SetLogLevel(const std::string& level);

// Installs the stderr logger as spdlog's default; called once by the CLI and by tests.
void InitLogging(const std::string& level = "info");

// A terminal progress line ("loading 12/48 tensors"), redrawn in place when stderr is a TTY;
// otherwise logged at most every few seconds, so short work stays quiet in logs and scripts.
// Not thread-safe; one owner.
class Progress {
 public:
  Progress(std::string what, size_t total);
  ~Progress();
  void Update(size_t done);
  void Finish();

 private:
  std::string what_;
  size_t total_;
  double last_log_s_ = 0;
  bool tty_;
  bool finished_ = false;
};

}  // namespace eep

#define EEP_LOG_TRACE(...) SPDLOG_TRACE(__VA_ARGS__)
#define EEP_LOG_DEBUG(...) SPDLOG_DEBUG(__VA_ARGS__)
#define EEP_LOG_INFO(...) SPDLOG_INFO(__VA_ARGS__)
#define EEP_LOG_WARN(...) SPDLOG_WARN(__VA_ARGS__)
#define EEP_LOG_ERROR(...) SPDLOG_ERROR(__VA_ARGS__)
