// Starting a node's backup manager (`eep backup-manager`) as a child process: what `eep serve
// --expert-backup on`, the failover benchmark and the demo do when no manager is given.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep::backup {

class BackupSidecar {
 public:
  // Runs `binary backup-manager --model DIR --node-rank K --num-nodes N --listen ... args`
  // and waits (up to timeout_ms: loading takes a while) for its `listening ENDPOINT` line.
  // Errors carry the child's last stderr line.
  static Result<std::unique_ptr<BackupSidecar>> Start(const std::string& binary, const std::string& model_dir,
                                                      int node_rank, int num_nodes, const std::string& transport,
                                                      const std::vector<std::string>& extra_args, int64_t timeout_ms);
  // SIGTERM, then SIGKILL after a grace period.
  ~BackupSidecar();

  const std::string& endpoint() const { return endpoint_; }
  pid_t pid() const { return pid_; }

 private:
  BackupSidecar() = default;
  pid_t pid_ = -1;
  std::string endpoint_;
  std::string stderr_path_;
};

}  // namespace eep::backup
