// Small shared helpers: file reading, id-list parsing, monotonic time.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace eep {

Result<std::string> ReadFile(const std::string& path);
Status WriteFile(const std::string& path, const std::string& data);
// Parses a JSON file; errors name the file and the parse position.
Result<nlohmann::json> ReadJsonFile(const std::string& path);

// "1,2,3" -> {1,2,3}; `what` names the flag in the error message.
Result<std::vector<int64_t>> ParseIdList(const std::string& text, const std::string& what);

// Waits up to timeout_ms for child `pid` to exit (pidfd + poll, no sleeping loop). Returns
// true and stores the wait status if it exited.
bool WaitChild(int pid, int64_t timeout_ms, int* wait_status);

inline double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace eep
