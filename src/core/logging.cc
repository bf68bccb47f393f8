#include "core/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <unistd.h>

#include <cstdio>

#include "core/util.h"

namespace eep {

void SetLogLevel(const std::string& level) {
  spdlog::set_level(spdlog::level::from_str(level));
}

void InitLogging(const std::string& level) {
  static bool done = false;
  if (!done) {
    auto logger = spdlog::stderr_color_mt("eep");
    spdlog::set_default_logger(logger);
    spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    done = true;
  }
  SetLogLevel(level);
}

Progress::Progress(std::string what, size_t total)
    : what_(std::move(what)), total_(total), last_log_s_(NowSeconds()), tty_(isatty(STDERR_FILENO) != 0) {}

Progress::~Progress() { Finish(); }

void Progress::Update(size_t done) {
  if (total_ == 0 || finished_) return;
  if (tty_) {
    // A redrawn terminal line is the one place we write to stderr without the logger.
    std::fprintf(stderr, "\r%s %zu/%zu (%zu%%)", what_.c_str(), done, total_, done * 100 / total_);
    std::fflush(stderr);
  } else {
    constexpr double kLogEverySeconds = 5.0;
    double now = NowSeconds();
    if (now - last_log_s_ >= kLogEverySeconds) {
      last_log_s_ = now;
      EEP_LOG_INFO("{} {}/{} ({}%)", what_, done, total_, done * 100 / total_);
    }
  }
}

void Progress::Finish() {
  if (finished_) return;
  finished_ = true;
  if (tty_ && total_ > 0) {
    std::fprintf(stderr, "\r%s %zu/%zu (100%%)\n", what_.c_str(), total_, total_);
    std::fflush(stderr);
  }
}

}  // namespace eep
