// Test helpers: run the eep binary (EEP_BIN) as child processes, the way operators do.
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep::testing {

// A child `eep ARGS...` with stdout on a pipe and stderr in a file. SIGKILLed and reaped on
// destruction if still running.
class ChildProcess {
 public:
  // `env` entries are added to (or override) this process's environment. A non-empty `prefix`
  // runs `PREFIX... eep ARGS...` instead (PREFIX[0] looked up in PATH), e.g. on a test host:
  // {"ip", "netns", "exec", NAME}.
  static Result<std::unique_ptr<ChildProcess>> Spawn(
      const std::vector<std::string>& args, const std::map<std::string, std::string>& env = {},
      const std::vector<std::string>& prefix = {});
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  // Reads stdout until a full line is available; kTimeout after `timeout_ms`, kRemoteDisconnect
  // if stdout closed first (child exited).
  Result<std::string> ReadLine(int64_t timeout_ms);
  void Signal(int sig);
  // Waits for the exit: the exit code, or 128 + signal number. kTimeout if still running.
  Result<int> Wait(int64_t timeout_ms);
  // Everything the child wrote to stderr so far.
  std::string Stderr() const;
  // Polls stderr until it contains `needle`; false after `timeout_ms` or if the child exited.
  bool WaitForStderr(const std::string& needle, int64_t timeout_ms);

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  std::string stderr_path_;
  std::string pending_;  // stdout bytes after the last returned line
  bool exited_ = false;
  int exit_code_ = 0;
};

// Result of running `eep ARGS...` to completion.
struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
RunResult RunEep(const std::vector<std::string>& args, int64_t timeout_ms,
                 const std::map<std::string, std::string>& env = {});

// A running `eep backup-manager` and the endpoint from its `listening ENDPOINT` line.
struct ManagerProcess {
  std::unique_ptr<ChildProcess> process;
  std::string endpoint;
};
Result<ManagerProcess> StartManager(const std::string& model_dir, int node_rank, int num_nodes,
                                    const std::string& transport,
                                    const std::vector<std::string>& extra_args = {},
                                    const std::map<std::string, std::string>& env = {});

// A fresh temporary directory (removed by the caller or left for inspection on failure).
std::string MakeTempDir(const std::string& prefix);

}  // namespace eep::testing
