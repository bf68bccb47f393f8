// eplb: the expert-parallel load balancer. Decides which logical expert lives in which
// physical slot ("replica") on which GPU, from per-expert load statistics.
//
// Vocabulary (per MoE layer):
//   logical expert  one of the E experts of the model (ids 0..E-1).
//   physical slot   one of num_replicas slots; slot s lives on GPU s / (num_replicas / num_gpus),
//                   and GPU g on node g / (num_gpus / num_nodes). A slot holds one logical
//                   expert, or -1 when its GPU is failed.
//   GPU load        sum over the GPU's slots of weight[expert] / logcnt[expert]: an expert's
//                   tokens are split evenly over its replicas.
//   balancedness    mean over layers of (mean live-GPU load / max live-GPU load), in (0, 1].
//
// Entry points:
//   RebalanceExperts  DeepSeek's rebalance_experts (github.com/deepseek-ai/EPLB), reproduced
//                     bit-for-bit (same float32 arithmetic and ordering of equal loads: torch's
//                     CPU sort is libstdc++'s unstable std::sort, torch.max takes the first
//                     maximum, Python's min the first minimum), plus optional failed GPUs.
//   RebalanceMinMove  a plan within a tolerance of the fresh plan's balancedness that keeps
//                     experts where an existing placement has them.
//   LoadRecorder      hot-path token counting over a sliding window of forward passes, whose
//                     Snapshot() feeds the planners.
//   ParsePlanRequest / PlanToJson: the JSON contract of `eep eplb`.
//
// Threading: the planning functions are pure (no shared state) and may run concurrently.
// LoadRecorder is documented on the class. All functions return Status instead of throwing.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep::eplb {

// Per-layer, per-logical-expert load (token counts), row-major [num_layers][num_experts].
// float32 like the reference, so that ties and rounding come out the same.
struct LoadMatrix {
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  std::vector<float> values;  // size num_layers * num_experts

  float at(int32_t layer, int32_t expert) const {
    return values[static_cast<size_t>(layer) * num_experts + expert];
  }
  // Builds a matrix from rows; fails (naming `weight`) on empty or ragged input, or on
  // negative / non-finite values.
  static Result<LoadMatrix> FromRows(const std::vector<std::vector<double>>& rows);
};

// Cluster shape, as in DeepSeek's rebalance_experts, plus failures.
struct Topology {
  int32_t num_replicas = 0;  // physical slots per layer; a multiple of num_gpus, >= experts
  int32_t num_groups = 1;    // expert groups (group-limited routing); divides num_experts
  int32_t num_nodes = 1;     // divides num_gpus
  int32_t num_gpus = 1;
  // GPUs that are down (any order, duplicates allowed). A node whose GPUs are all listed is down.
  std::vector<int32_t> failed_gpus;

  int32_t slots_per_gpu() const { return num_replicas / num_gpus; }
  int32_t gpus_per_node() const { return num_gpus / num_nodes; }
};

// A placement of logical experts on physical slots, for every layer.
struct Placement {
  int32_t num_layers = 0;
  int32_t num_experts = 0;
  int32_t num_replicas = 0;
  int32_t max_replicas = 0;      // max over layers and experts of logcnt; the log2phy width
  std::vector<int32_t> phy2log;  // [L][num_replicas]: logical expert of each slot, -1 if dead
  std::vector<int32_t> log2phy;  // [L][E][max_replicas]: slots of each expert, ascending by
                                 // replica rank, padded with -1
  std::vector<int32_t> logcnt;   // [L][E]: number of live replicas of each expert

  int32_t slot(int32_t layer, int32_t s) const {
    return phy2log[static_cast<size_t>(layer) * num_replicas + s];
  }
  int32_t count(int32_t layer, int32_t e) const {
    return logcnt[static_cast<size_t>(layer) * num_experts + e];
  }
};

// Checks the topology against the loads: every field that is wrong is named in the message
// (num_replicas, num_groups, num_nodes, num_gpus, failed_gpus).
Status ValidateTopology(const LoadMatrix& weight, const Topology& topo);

// DeepSeek's policy: hierarchical (pack expert groups to nodes, replicate within nodes, pack
// physical experts to GPUs) when num_groups % num_nodes == 0, else global. Without failed GPUs
// the result equals the reference exactly.
//
// With failed GPUs the plan is made for the live GPUs only (hierarchically when every live
// node has the same number of live GPUs and the groups divide over the live nodes, else
// globally) and laid onto the original slot numbering: slots on failed GPUs hold -1 and
// every logical expert keeps at least one live replica. Fails with ResourceExhausted, saying
// how many slots are missing, when the live slots cannot hold every logical expert.
Result<Placement> RebalanceExperts(const LoadMatrix& weight, const Topology& topo);

// Mean over layers of mean/max live-GPU load (see the top of this file). Fails if the
// placement does not match the weight / topology shapes.
Result<double> Balancedness(const LoadMatrix& weight, const Topology& topo,
                            const Placement& placement);
// The same, per layer.
Result<std::vector<double>> LayerBalancedness(const LoadMatrix& weight, const Topology& topo,
                                              const Placement& placement);

// Number of slots (over all layers) whose logical expert differs between the two
// [L][num_replicas] maps; a slot that becomes -1 or stops being -1 counts too.
int64_t CountMovedExperts(std::span<const int32_t> old_phy2log,
                          std::span<const int32_t> new_phy2log);

// Builds a Placement (log2phy, logcnt, max_replicas) from a phy2log map. Fails, naming
// `what`, if its size is not L * num_replicas or an entry is outside [-1, E).
Result<Placement> PlacementFromPhy2Log(int32_t num_layers, int32_t num_experts,
                                       int32_t num_replicas, std::vector<int32_t> phy2log,
                                       const std::string& what = "phy2log");

struct MinMoveOptions {
  // Each layer's balancedness stays >= the fresh plan's × (1 − tolerance), so the mean does too.
  double tolerance = 0.01;
};

struct MinMoveResult {
  Placement plan;  // the min-move placement
  double balancedness = 0;
  int64_t moved_experts = 0;  // slots of `plan` that differ from old_phy2log
  Placement fresh;            // RebalanceExperts(weight, topo), for comparison
  double fresh_balancedness = 0;
  int64_t fresh_moved_experts = 0;  // slots of `fresh` that differ from old_phy2log
};

// Minimal-move rebalancing: starts from old_phy2log ([L][num_replicas], entries in [-1, E)),
// clears slots on failed GPUs, gives every logical expert a live replica, then changes as few
// slots as it can (single-slot replacements, which also change replica counts, and swaps)
// until each layer reaches the fresh plan's balancedness within the tolerance. Per layer it
// falls back to the fresh plan with GPUs and slots renumbered to best overlap the old one
// whenever that moves fewer experts. Always meets the tolerance. The result is not bound to
// the hierarchical policy's group-to-node locality: only balancedness and moves are targeted.
Result<MinMoveResult> RebalanceMinMove(const LoadMatrix& weight, const Topology& topo,
                                       std::span<const int32_t> old_phy2log,
                                       const MinMoveOptions& options = {});

// ---- JSON contract of `eep eplb` -------------------------------------------------------

enum class PlanMode { kFresh, kMinMove };

struct PlanRequest {
  LoadMatrix weight;
  Topology topo;
  bool has_old = false;
  std::vector<int32_t> old_phy2log;  // [L][num_replicas] when has_old
  PlanMode mode = PlanMode::kFresh;
  MinMoveOptions min_move;
};

// Keys: weight, num_replicas, num_groups, num_nodes, num_gpus, optional failed_gpus,
// failed_nodes (all GPUs of those nodes), old_phy2log, mode ("fresh" | "min-move"; min-move
// needs old_phy2log), tolerance. Errors are InvalidArgument and start with the field name.
Result<PlanRequest> ParsePlanRequest(const nlohmann::json& input);

// Runs the request: phy2log, log2phy, logcnt, balancedness; with old_phy2log also
// moved_experts, fresh_moved_experts and fresh_balancedness.
Result<nlohmann::json> RunPlanRequest(const PlanRequest& request);

// ---- load statistics ------------------------------------------------------------------

// Accumulates per-layer, per-logical-expert token counts over a sliding window of the last
// `window_steps` forward passes.
//
// Threading: Record / RecordCounts are lock-free (one relaxed atomic add per token into the
// live step's counters) and may be called from any number of threads. AdvanceStep and
// Snapshot take a mutex and are meant for one driver thread between forward passes; they may
// run concurrently with Record. A Record that races with AdvanceStep is never lost: it counts
// toward the step being closed or a later one.
// Memory: two live buffers plus window_steps closed steps of L × E 32-bit counters.
class LoadRecorder {
 public:
  static Result<std::unique_ptr<LoadRecorder>> Create(int32_t num_layers, int32_t num_experts,
                                                      int32_t window_steps);

  // Hot path: one token routed to each of `expert_ids` at `layer`. Ids outside [0, E) (such as
  // -1 padding) and an out-of-range layer are ignored and counted in dropped().
  void Record(int32_t layer, std::span<const int32_t> expert_ids);
  // Adds a per-expert histogram (size E) for `layer`, e.g. from a router kernel.
  void RecordCounts(int32_t layer, std::span<const int64_t> counts);

  // Closes the current forward pass: its counts enter the window, the oldest step leaves it.
  void AdvanceStep();

  // Window sums over the last min(steps, window_steps) closed steps; the open step is excluded.
  LoadMatrix Snapshot() const;
  std::vector<int64_t> SnapshotCounts() const;  // the same, as exact integers [L][E]

  int64_t steps() const;  // number of AdvanceStep calls
  int64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
  int32_t num_layers() const { return num_layers_; }
  int32_t num_experts() const { return num_experts_; }
  int32_t window_steps() const { return window_; }

  LoadRecorder(const LoadRecorder&) = delete;
  LoadRecorder& operator=(const LoadRecorder&) = delete;

 private:
  LoadRecorder(int32_t num_layers, int32_t num_experts, int32_t window_steps);

  const int32_t num_layers_;
  const int32_t num_experts_;
  const int32_t window_;
  const size_t cells_;  // num_layers * num_experts
  // Two live buffers; Record adds into live_[live_index_]. AdvanceStep flips the index and
  // drains the closed one with exchange(0), so late writers count toward a later step.
  std::unique_ptr<std::atomic<uint32_t>[]> live_[2];
  std::atomic<int> live_index_{0};
  std::atomic<int64_t> dropped_{0};

  mutable std::mutex mu_;        // guards everything below
  std::vector<uint32_t> ring_;   // window_ closed steps × cells_
  std::vector<int64_t> totals_;  // sum of the ring
  int64_t steps_ = 0;
};

}  // namespace eep::eplb
