// Small shared helpers: file reading, id-list parsing, monotonic time.
#pragma once

#include <spawn.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
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

// SIGKILLs a child process and reaps it (no-op for pid <= 0).
void KillAndReap(int pid);

// posix_spawn of `binary` with `args` (argv[0] first) and no signal blocked in the child,
// whatever the caller blocks (eep serve blocks SIGINT/SIGTERM in its threads); envp null: this
// process's environment. Returns the pid; errors name the binary.
Result<int> SpawnUnblocked(const std::string& binary, const std::vector<std::string>& args, char* const* envp = nullptr,
                           const posix_spawn_file_actions_t* actions = nullptr);

// RFC 4648 base64 with padding (descriptors, etcd's JSON gateway).
std::string Base64Encode(std::string_view bytes);
Result<std::string> Base64Decode(std::string_view text);

inline double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace eep
