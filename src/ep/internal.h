// Private to src/ep: registration hooks of the built-in communicators.
#pragma once

#include <string>
#include <vector>

namespace eep::ep {
void RegisterShmCommunicator();
void RegisterUcxCommunicator();
void RegisterNcclCommunicator();  // nccl/: the real one with CUDA, else a stub saying why not

// argv of `eep rank-worker` (argv[0] first), as the coordinator and the node agents start it.
inline std::vector<std::string> RankWorkerArgs(const std::string& log_level, const std::string& control,
                                               const std::string& heartbeat, int rank, const std::string& session) {
  return {"eep",         "--log-level", log_level, "rank-worker", "--control", control,
          "--heartbeat", heartbeat,     "--rank",  std::to_string(rank), "--session", session};
}
}  // namespace eep::ep
