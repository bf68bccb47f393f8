// Expert-parallel runtime: one coordinator (the process the user started) and one process
// per rank (`eep` re-executes itself as `eep rank-worker`).
//
// A rank holds every non-expert weight (data-parallel attention) and its share of physical
// expert slots: slots [r·S, (r+1)·S) of every MoE layer, S = num_physical / ep_size. Each
// step every rank runs the dense part for its own sequences; in each MoE layer the tokens'
// top-k choices are dispatched to the ranks holding a replica (local replica first, then a
// fixed spread), computed there, and combined back in top-k order, so the output does not
// depend on placement. Ranks with no tokens still take part in every exchange.
//
// Control plane: ZeroMQ between coordinator and ranks (JSON headers + binary frames).
// Data plane: a Communicator chosen by name (ep/communicator.h).
// EPLB: ranks report per-layer expert load every step; every `eplb_interval` steps the
// coordinator re-plans (min-move by default), sends the transfer plan, and all ranks execute
// it in one AllToAllV and switch to the new map at the same step boundary.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/expert_map.h"
#include "model/model.h"
#include "model/sampling.h"
#include "ep/communicator.h"

namespace eep::ep {

// A host whose node agent (`eep node`, ep/node.h) runs ranks for this engine.
struct RemoteNode {
  std::string name;
  std::string endpoint;  // the agent's ZeroMQ socket
  int capacity = 0;      // ranks it may run
};

struct EpOptions {
  int ep_size = 1;
  int num_redundant_experts = 0;
  std::string communicator = "shm";
  std::string backend = "cpu";            // cpu | cuda: where each rank computes (cuda: every
                                          // rank owns a CudaModel, on GPU 0 shared by all ranks
                                          // over shm/ucx, on GPU rank mod visible over nccl)
  int64_t eplb_interval = 0;              // steps between rebalances; 0 = off
  std::string eplb_policy = "min-move";   // min-move | deepseek
  int64_t eplb_window = 32;               // steps of load history the planner sees
  bool eplb_async = false;                // exchange in the background, switch at a step boundary
  int64_t peer_timeout_ms = 1000;         // data-plane deadline between ranks; also how long
                                          // a rank's heartbeats may be missing before it is dead
  int64_t heartbeat_interval_ms = 100;    // rank → coordinator heartbeats
  // Spare expert slots per rank for taking over a dead rank's experts. -1 = unbounded
  // (the CPU backend allocates on demand); a plan needing more fails clearly.
  int64_t expert_slot_headroom = -1;
  int max_recovery_attempts = 8;          // failures during one recovery before giving up
  int64_t step_timeout_ms = 120000;       // coordinator's bound on one step (long CPU prefills)
  std::string control_host = "127.0.0.1"; // where the coordinator's control socket binds
  std::string log_level = "info";
  std::string worker_binary;              // the `eep` binary ranks run; empty = this executable
  // DRAM backup managers (`eep backup-manager` endpoints). The engine never depends on them:
  // a rank that cannot reach them logs it, reports it in its health, and goes on without.
  std::vector<std::string> backup_endpoints;
  std::string eplb_source = "peers";      // peers | backup: where moved experts come from
  // Many hosts (ep/node.h). With `nodes`, ranks run on those hosts (filled in order, as many
  // as each takes) instead of as children of this process, and `control_host` must be an
  // address they reach. With `coordinator_url` (etcd://...), membership, epoch and expert map
  // are stored there after every change with compare-and-swap: a coordinator that finds a
  // newer epoch written by another one stops (deposed) without touching the ranks.
  std::vector<RemoteNode> nodes;
  std::string coordinator_url;
  std::string cluster = "default";
  // Adopt the running ranks recorded in etcd instead of starting new ones (a standby
  // coordinator taking over). Their sequences are dropped (clients retry); experts stay.
  bool take_over = false;
  // Called once the control sockets are bound, with their endpoints (control, heartbeat):
  // the caller publishes them (the leader record) so that ranks can find this coordinator.
  std::function<Status(const std::string&, const std::string&)> publish_endpoints;
  // Fault injection for tests and demos:
  // "rank=R,after-steps=N,mode=kill|hang|slow[,at=step|eplb]".
  std::string inject_fault;
};

struct FaultSpec {
  int rank = -1;
  int64_t after_steps = 0;
  std::string mode;        // kill | hang | slow
  std::string at = "step"; // step: at the start of a step; eplb: inside the first EPLB
                           // weight exchange after `after_steps` steps
};
// Parses --inject-fault; errors name the flag and the bad part.
Result<FaultSpec> ParseFaultSpec(const std::string& text);

// How physical slots map to ranks. num_physical is num_logical + redundant, rounded up to
// a multiple of ep_size: the extra slots become further redundant replicas, so every rank
// has the same slot count (EPLB and the NCCL path need equal shares).
struct SlotLayout {
  int64_t num_logical = 0;
  int64_t num_physical = 0;
  int ep_size = 1;
  int64_t slots_per_rank = 0;
  int RankOfSlot(int64_t slot) const { return static_cast<int>(slot / slots_per_rank); }
  int64_t FirstSlot(int rank) const { return rank * slots_per_rank; }
};
Result<SlotLayout> MakeSlotLayout(int64_t num_logical, int64_t num_redundant, int ep_size);

// Initial placement: slot s holds expert s for s < E, redundant slots hold s mod E.
ExpertMap InitialPlacement(const SlotLayout& layout, int64_t num_moe_layers);

// Computes y[i,:] = expert in slots[i] applied to x[i,:] for n host rows (no routing weight);
// every slot is held by this rank. The CUDA backend runs them on the GPU in one batch.
using ExpertRowRunner =
    std::function<Status(int64_t moe_layer, const int32_t* slots, const float* x, int64_t n, float* y)>;

// The MoE executor of a rank: dispatch over the communicator, local compute, combine.
// `experts` says what this rank holds (its map); the rows are computed by `runner` when
// given (device compute, all received rows in one call), else by experts->RunSlot per slot.
class EpMoeExecutor : public MoeExecutor {
 public:
  EpMoeExecutor(const ModelConfig& config, LocalExperts* experts, Communicator* comm,
                const SlotLayout& layout, ExpertRowRunner runner = nullptr);
  Status Run(int64_t moe_layer, const float* x, int64_t num_tokens, int64_t top_k,
             const int32_t* ids, const float* weights, float* out) override;

 private:
  const ModelConfig& config_;
  LocalExperts* experts_;
  Communicator* comm_;
  SlotLayout layout_;
  ExpertRowRunner runner_;
  std::vector<float> rows_, results_;
  std::vector<int32_t> row_slots_;
};

// One sequence's part of a step.
struct SeqInput {
  int64_t seq_id = 0;
  std::vector<int64_t> new_ids;  // tokens appended this step (prompt on the first step)
  bool return_logits = false;    // send logits back
  bool all_logits = false;       // logits of every new token, not just the last
  SamplingParams sampling;       // seed used on the sequence's first step
};

struct SeqOutput {
  int64_t seq_id = 0;
  int64_t token = -1;          // sampled next token
  std::vector<float> logits;   // when requested: [T or 1][vocab]
};

struct RebalanceStats {
  int64_t step = 0;              // step after which the new map took effect
  int64_t moved_experts = 0;
  int64_t bytes = 0;             // moved between ranks
  std::vector<int> source_ranks; // ranks that sent experts to peers
  int64_t from_backup = 0;       // experts read from the DRAM backup managers
  double seconds = 0;            // plan to switch
  double stall_seconds = 0;      // time serving was blocked by it
  bool async = false;
};

// One membership change (a failure recovery or a scaling step), phase by phase.
struct MembershipEvent {
  int64_t epoch = 0;             // the epoch it produced
  std::string kind;              // failover | scale-up | scale-down | takeover
  std::string reason;            // what was detected / asked
  std::vector<int> dead_ranks;   // declared dead (and fenced)
  std::vector<int> members;      // serving ranks afterwards
  double detect_seconds = 0;     // failing step start → failure confirmed (failover)
  double abort_seconds = 0;      // survivors stopped, rolled back, holdings reported
  double plan_seconds = 0;       // EPLB over the new members
  double restore_seconds = 0;    // communicator rebuilt, experts moved, switched
  double blocking_seconds = 0;   // whole window in which no step completed (for a failover,
                                 // from the failing step's start: detection included)
  double resume_seconds = 0;     // end of the switch → next step done
  int64_t experts_from_peers = 0, experts_from_backup = 0, experts_from_disk = 0;
  int64_t bytes_from_peers = 0, bytes_from_backup = 0, bytes_from_disk = 0;
  int64_t requeued_seqs = 0;     // sequences resumed on another rank (re-prefill)
  int attempts = 1;              // >1 when more ranks failed during the recovery
};

struct RankInfo {
  int rank = 0;
  int pid = 0;
  std::string state;  // alive | joining | draining | dead | left
  int64_t num_seqs = 0;
  std::string node;   // host (node agent) it runs on; empty: a child of this process
};

struct ClusterInfo {
  int64_t epoch = 0;            // membership epoch
  int64_t steps = 0;
  int64_t map_version = 0;      // bumps with every applied rebalance or membership change
  bool backup_ready = false;    // every rank reached the backup managers
  std::string backup_health;    // why not, when not
  std::string health = "ok";    // "ok", or why the engine cannot serve
  int target_size = 0;          // ep size asked by the last Scale (= serving size when idle)
  std::vector<RankInfo> ranks;
  std::vector<MembershipEvent> events;
};

class EpEngine {
 public:
  // Spawns ep_size rank processes, loads the model in each, wires the communicator.
  static Result<std::unique_ptr<EpEngine>> Start(const std::string& model_dir, const EpOptions& options);
  ~EpEngine();

  // Runs one step over all ranks. New sequences are placed on the least-loaded rank; a
  // sequence stays on its rank until Release. Errors name the rank at fault.
  Result<std::vector<SeqOutput>> Step(const std::vector<SeqInput>& inputs);
  // Moves to the given placement ([moe_layer][slot] → logical expert) now (synchronously),
  // whatever EPLB would choose; for benchmarks and tests.
  // With async the exchange runs in the background and the next Step switches (stats then
  // land in rebalances()).
  Result<RebalanceStats> ApplyPlacement(const std::vector<std::vector<int32_t>>& phy2log, bool async = false);
  // The communicator's raw ceiling for a ring pattern: every rank sends `bytes` to the next
  // rank in one AllToAllV, `rounds` times. Returns the slowest rank's seconds per round.
  Result<double> BenchRing(int64_t bytes, int rounds);
  // Frees a sequence's KV cache on its rank (sent with the next step).
  void Release(int64_t seq_id);
  // Handles what happened while no step ran: rank deaths (recovered at once) and ranks that
  // finished joining (switched in). Cheap; a serving loop calls it when idle.
  Status Poll();
  // Grows or shrinks the serving ranks to `ep_size`. New ranks start and load in the
  // background while steps go on; the switch (and a scale-down) happens at the next step
  // boundary, or here when `wait` is true. Sequences on leaving ranks resume elsewhere.
  Status Scale(int ep_size, bool wait = false);
  // Stops every rank. Idempotent.
  void Shutdown();

  const ModelConfig& config() const;
  const ExpertMap& expert_map() const;
  const SlotLayout& layout() const;
  const std::vector<RebalanceStats>& rebalances() const;
  ClusterInfo Cluster() const;
  // Per-MoE-layer, per-logical-expert token counts over the EPLB window, [L][E] row-major.
  std::vector<int64_t> ExpertLoad() const;

  class Impl;

 private:
  explicit EpEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Entry point of `eep rank-worker`: connects to the coordinator and serves until told to stop.
// With `coordinator_url` (ranks started by a node agent) the rank follows the leader record in
// etcd: when another coordinator takes over, it reconnects to it and keeps its experts.
int RunRankWorker(const std::string& control_endpoint, const std::string& heartbeat_endpoint, int rank,
                  const std::string& session, const std::string& coordinator_url = "",
                  const std::string& cluster = "default");

}  // namespace eep::ep
