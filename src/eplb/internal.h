// Private helpers shared by the eplb implementation files; not part of the public API.
#pragma once

#include <cstdint>
#include <vector>

#include "eplb/eplb.h"

namespace eep::eplb::internal {

// Output of the DeepSeek planner for a set of GPUs that it sees as 0..num_gpus-1.
struct RawPlan {
  std::vector<int32_t> phy2log;  // [L][num_replicas]
  std::vector<int32_t> phyrank;  // [L][num_replicas]: replica rank of each slot
  std::vector<int32_t> logcnt;   // [L][E]
};

// rebalance_experts_hierarchical of the reference, for all layers. Preconditions (checked by
// the caller): E % num_groups == 0, num_groups % num_nodes == 0, num_gpus % num_nodes == 0,
// num_replicas % num_gpus == 0, num_replicas >= E.
void RebalanceHierarchical(const LoadMatrix& weight, int32_t num_replicas, int32_t num_groups,
                           int32_t num_nodes, int32_t num_gpus, RawPlan* out);

// Fills log2phy / max_replicas of `p` from phy2log and per-slot replica ranks.
void FillLog2Phy(const std::vector<int32_t>& phyrank, Placement* p);

// Live-GPU view of a topology: which GPUs are live, in order.
struct LiveView {
  std::vector<char> gpu_live;      // [num_gpus]
  std::vector<int32_t> live_gpus;  // ascending physical ids of live GPUs
  int32_t live_nodes = 0;          // nodes with at least one live GPU
  bool uniform = true;             // every live node has the same number of live GPUs
};
LiveView MakeLiveView(const Topology& topo);

}  // namespace eep::eplb::internal
