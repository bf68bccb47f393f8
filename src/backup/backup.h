// Expert weight backup: a per-node sidecar keeps that node's share of the routed-expert weights in
// host memory and serves one-sided batched reads, so a rank that lost experts (failure, scale-up,
// rebalance) restores them at link speed instead of reloading safetensors from disk.
// After SGLang's ExpertBackupManager/ExpertBackupClient and vLLM's "Expert Weight Backup" RFC.
//
// clang-format off
//   eep backup-manager (one per node)            runtime rank (ExpertBackupClient)
//   ---------------------------------            ---------------------------------
//   loads node K's experts into ONE     <-- ZeroMQ REQ/REP "describe" --  Connect(): every manager's
//   exportable region (transfer engine)                                   descriptor, fingerprint check
//   serves the descriptor, progresses   <-- one-sided READs (shm/ucx) --  FetchLogicalExperts(...)
//   the engine
// clang-format on
//
// The backup is dormant on the happy path and synchronous when used (during a stop-the-world
// rebalance). The runtime never depends on it: an unreachable manager makes Connect/Fetch return
// kUnavailable, IsReady() false and Health() say why; callers fall back to the checkpoint.
//
// Assignment rule (which node holds what): expert e of EVERY MoE layer is held by the nodes
//   (e + j) mod N,  j = 0 .. R-1     (N = --num-nodes, R = --replicas, 1 <= R <= N)
// so with R = 1 each expert lives on exactly one node, with R = N on all of them. Only routed
// experts are backed up (shared experts and dense weights are on every rank anyway).
// That "stripe" rule ignores where experts are served, so losing a whole node can take an
// expert's only GPU copy and its only DRAM copy together. The "anti-affinity" rule (what
// `eep node` uses on several hosts) keeps each expert's DRAM copy off the node that serves it:
//   home(e) = min(N - 1, floor(e / K))    the node holding e's primary replica: slot e of K
//                                         physical slots per node (ranks fill nodes in order,
//                                         every node runs as many ranks; `eep node` passes K,
//                                         else K = ceil(E / N))
//   copies on (home(e) + 1 + j) mod N,   j = 0 .. R-1,  1 <= R <= N-1
// so a node's death never takes an expert's DRAM copy with its primary replicas, as long as
// the expert is still served from its home node. EPLB or an earlier failover may move an
// expert onto one of its backup nodes; losing that node then loses both, and the survivors
// reload that expert from the checkpoint (counted as `disk` in /metrics). R = N - 1 puts a
// copy on every other node and holds whatever EPLB does. With one node there is no other node:
// the node backs up everything itself (it protects against rank loss, not node loss).
//
// Region layout on a manager (one contiguous allocation of the chosen transport):
//   // [layer][expert][gate|up|down] bytes, ascending layer, then expert, only the experts this
//   // node holds; each tensor's bytes exactly as stored in the checkpoint (BF16 raw, no
//   // conversion), each tensor starting at a 64-byte aligned offset (zero padding between).
//
// Descriptor (what "describe" returns; BackupDescriptor::ToJson):
//   {"protocol": 1, "node_rank": K, "num_nodes": N, "replicas": R, "fingerprint": F,
//    "model_dir": DIR, "region_base": ADDR, "region_bytes": BYTES,
//    "transport": {"backend": "shm"|"ucx", "region": RegionDescriptor JSON (transfer.h)},
//    "params": {CHECKPOINT_NAME: {"layer", "expert", "role": gate|up|down, "offset", "nbytes",
//                                 "shape", "dtype"}, ...}}
// F is Checkpoint::Fingerprint() of the served checkpoint; clients refuse a manager whose
// fingerprint differs from the one they expect (or from the other managers').
//
// Operations: run each manager under a supervisor that restarts it (systemd Restart=on-failure,
// a Kubernetes sidecar). With --transport ucx and UCX 1.13 a client that dies in the middle of
// its Connect() can abort the manager (see transfer/ucx/ucx_engine.h); a restarted manager on
// the same --listen endpoint is picked up by the clients' next Connect().
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"
#include "transfer/transfer.h"

namespace eep::backup {

inline constexpr int kBackupProtocolVersion = 1;
inline constexpr uint64_t kBackupTensorAlignment = 64;

// ---- Assignment -----------------------------------------------------------------------------

// kInvalidArgument naming the flag unless 0 <= node_rank < num_nodes and 1 <= replicas <=
// num_nodes.
Status ValidateAssignment(int node_rank, int num_nodes, int replicas);
// Nodes holding `expert`, in order (e mod N first).
std::vector<int> NodesHoldingExpert(int64_t expert, int num_nodes, int replicas);
bool NodeHoldsExpert(int64_t expert, int node_rank, int num_nodes, int replicas);

enum class BackupPlacement { kStripe, kAntiAffinity };
// "stripe" | "anti-affinity"; kInvalidArgument naming --backup-placement otherwise.
Result<BackupPlacement> ParseBackupPlacement(const std::string& text);
const char* BackupPlacementName(BackupPlacement p);
// kInvalidArgument naming the flag when the rule cannot hold (anti-affinity: R <= N - 1 when
// N > 1), on top of ValidateAssignment.
Status ValidatePlacement(BackupPlacement p, int num_nodes, int replicas);
// Nodes holding `expert` (of num_experts) under placement `p`, in order. slots_per_node: K
// above (0: ceil(E / N)).
std::vector<int> BackupNodesOf(BackupPlacement p, int64_t expert, int64_t num_experts, int num_nodes, int replicas,
                               int64_t slots_per_node = 0);

// ---- Descriptor -----------------------------------------------------------------------------

// Where one checkpoint tensor lives inside a manager's region.
struct ParamLocation {
  std::string name;  // checkpoint tensor name, e.g. model.layers.3.mlp.experts.17.up_proj.weight
  int64_t layer = 0;
  int64_t expert = 0;
  std::string role;  // "gate", "up" or "down"
  uint64_t offset = 0;
  uint64_t num_bytes = 0;
  std::vector<int64_t> shape;
  DType dtype = DType::kBF16;
};

struct BackupDescriptor {
  int protocol = kBackupProtocolVersion;
  int node_rank = 0;
  int num_nodes = 1;
  int replicas = 1;
  BackupPlacement placement = BackupPlacement::kStripe;
  std::string fingerprint;
  std::string model_dir;
  transfer::RegionDescriptor region;  // region.base_address / num_bytes: the region base and size
  std::map<std::string, ParamLocation> params;  // by checkpoint name

  nlohmann::json ToJson() const;
  // Validates types and that every param lies inside the region; errors name the field/param.
  static Result<BackupDescriptor> FromJson(const nlohmann::json& j);
};

// ---- Manager --------------------------------------------------------------------------------

struct BackupManagerOptions {
  std::string model_dir;
  int node_rank = 0;
  int num_nodes = 1;
  int replicas = 1;
  BackupPlacement placement = BackupPlacement::kStripe;
  int64_t slots_per_node = 0;  // anti-affinity: physical expert slots per node (0: ceil(E / N))
  // ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:0 (port 0: any free port) or ipc:///tmp/x.
  std::string listen_endpoint = "tcp://127.0.0.1:0";
  std::string transport = "shm";  // a transfer backend name (transfer::BackendNames())
  transfer::EngineOptions transport_options;
  bool pin_memory = false;  // lock the region in RAM (transfer::MemoryKind::kPinnedHost)
  // Set (from any thread or a signal handler) to abandon loading early with kCancelled.
  const std::atomic<bool>* cancel = nullptr;
};

// Owns the transfer engine, the region with the node's experts and the control socket.
// Create on one thread; Serve on one thread (may be another); endpoint()/descriptor() are
// immutable after Create and safe from any thread.
class ExpertBackupManager {
 public:
  // Binds the control socket, loads this node's experts (progress on stderr), registers the
  // region. Errors name the file or tensor at fault: a truncated checkpoint or a missing or
  // misshapen expert tensor refuses to serve (kCorruption / kNotFound / kInvalidArgument).
  static Result<std::unique_ptr<ExpertBackupManager>> Create(const BackupManagerOptions& options);
  ~ExpertBackupManager();
  ExpertBackupManager(const ExpertBackupManager&) = delete;
  ExpertBackupManager& operator=(const ExpertBackupManager&) = delete;

  // The bound endpoint with the real port, e.g. tcp://127.0.0.1:41234.
  const std::string& endpoint() const { return endpoint_; }
  const BackupDescriptor& descriptor() const { return descriptor_; }

  // Answers control requests and progresses the transfer engine until `stop` is true (checked
  // at least every 100 ms; no busy waiting). Returns OK on stop.
  Status Serve(const std::atomic<bool>& stop);

 private:
  ExpertBackupManager();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string endpoint_;
  BackupDescriptor descriptor_;
};

// ---- Client ---------------------------------------------------------------------------------

struct BackupClientOptions {
  std::vector<std::string> endpoints;  // one per manager
  // Checkpoint::Fingerprint() of the checkpoint the runtime serves. Empty: accept any, but all
  // managers must agree with the first one that answers.
  std::string expected_fingerprint;
  // Deadline of each Connect() and each FetchLogicalExperts() call, all waits included.
  int64_t timeout_ms = 5000;
  // Engine options per transfer backend name (e.g. {"ucx", {{"tls", "tcp"}}}).
  std::map<std::string, transfer::EngineOptions> transport_options;
};

// Where one fetched tensor goes: caller-owned memory of exactly the tensor's size.
struct FetchTarget {
  void* data = nullptr;
  uint64_t num_bytes = 0;
  transfer::MemoryKind kind = transfer::MemoryKind::kHost;
};
// By checkpoint tensor name (ModelConfig::ExpertTensorNames, or ListExpertParams()).
using FetchDestinations = std::map<std::string, FetchTarget>;

// What ListExpertParams reports for each tensor a fetch would move.
struct ExpertParamInfo {
  std::string name;
  int64_t layer = 0;
  int64_t expert = 0;
  std::string role;  // gate | up | down
  std::vector<int64_t> shape;
  DType dtype = DType::kBF16;
  uint64_t num_bytes = 0;
  std::string manager;  // endpoint that would serve it
};

// A selected tensor read in place: where it lies in this process's mapping of its manager's
// region (the shm transport maps it; others do not).
struct MappedExpertParam {
  std::string name;
  const uint8_t* data = nullptr;
  uint64_t num_bytes = 0;
  DType dtype = DType::kBF16;
  const uint8_t* region_base = nullptr;  // the whole mapping, e.g. to register it with CUDA once
  uint64_t region_bytes = 0;
  uint64_t region_generation = 0;  // changes whenever the mapping is replaced (reconnect)
};

// Connects to managers and fetches experts from them. All public methods are thread-safe
// (serialised by one mutex); a fetch blocks its caller until done or the deadline.
class ExpertBackupClient {
 public:
  explicit ExpertBackupClient(BackupClientOptions options);
  ~ExpertBackupClient();
  ExpertBackupClient(const ExpertBackupClient&) = delete;
  ExpertBackupClient& operator=(const ExpertBackupClient&) = delete;

  // Asks every manager not yet ready for its descriptor and imports its region. OK when all are
  // ready. Otherwise the ones that answered stay usable and the status says what failed:
  // kInvalidArgument for a fingerprint mismatch (refused), else kUnavailable (no answer within
  // the deadline, transport import failed). Safe to call again to retry failed managers.
  Status Connect();
  // True when every configured manager is connected and verified, and no transport has seen one
  // go since (cheap; no network round trip).
  bool IsReady() const;
  size_t NumReadyManagers() const;
  // One line: "ready: 2/2 backup managers (...)" or "degraded: 1/2 ...; tcp://..: <error>".
  std::string Health() const;
  // Descriptors of the ready managers.
  std::vector<BackupDescriptor> Descriptors() const;

  // The tensors FetchLogicalExperts(layer_id, expert_ids, name_filter, ...) would move, in order.
  // name_filter: empty for all, else an ECMAScript regex searched in the checkpoint name
  // (e.g. "gate_proj|up_proj", "w1|w3").
  Result<std::vector<ExpertParamInfo>> ListExpertParams(
      int64_t layer_id, const std::vector<int64_t>& logical_expert_ids,
      const std::string& name_filter) const;

  // Reads the selected tensors of the given experts of one layer into `destinations`, one
  // batched request per manager (all posted, then awaited). Every selected tensor needs a
  // destination of exactly its size. Errors: kUnavailable (not connected / holder unreachable),
  // kNotFound (layer/expert held by no manager: names them), kInvalidArgument (destinations,
  // filter), kRemoteDisconnect / kTimeout (a manager died or stalled; it is then marked failed
  // until Connect() succeeds again). On error the destinations' contents are unspecified.
  Status FetchLogicalExperts(int64_t layer_id, const std::vector<int64_t>& logical_expert_ids,
                             const std::string& name_filter, const FetchDestinations& destinations);

  // The selected tensors' addresses in this process's mappings of the managers' regions, for a
  // reader that copies them itself (e.g. a GPU DMA straight out of the mirror: see
  // cuda::CudaModel::RestoreExperts). kUnimplemented when a holder's transport does not map
  // its region here (ucx); errors as ListExpertParams otherwise. The pointers stay valid until
  // the manager is marked failed or reconnected (Connect() after a failure; region_generation
  // changes then), so use them only while no other thread fetches or connects.
  Result<std::vector<MappedExpertParam>> MapExpertParams(int64_t layer_id,
                                                         const std::vector<int64_t>& logical_expert_ids,
                                                         const std::string& name_filter) const;

 private:
  struct Manager;
  struct Selection;
  // Ready and not known to be gone (its transport may have seen the peer exit since).
  static bool Usable(const Manager& m);
  Result<std::vector<Selection>> Select(int64_t layer_id, const std::vector<int64_t>& expert_ids,
                                        const std::string& name_filter) const;  // needs mu_
  std::string HealthLocked() const;

  BackupClientOptions options_;  // immutable
  mutable std::mutex mu_;
  std::string reference_fingerprint_;                                 // GUARDED_BY(mu_)
  std::map<std::string, std::unique_ptr<transfer::Engine>> engines_;  // GUARDED_BY(mu_), by backend
  std::vector<std::unique_ptr<Manager>> managers_;  // GUARDED_BY(mu_), one per endpoint
};

// ---- Control plane helpers (exposed for tools and tests) -----------------------------------

// Sends one JSON request to a manager and returns its JSON reply; kUnavailable if no reply
// arrives before the deadline, kInternal for a malformed reply. Never throws.
Result<nlohmann::json> ControlRequest(const std::string& endpoint, const nlohmann::json& request,
                                      transfer::Deadline deadline);
// The same request to several managers at once (one REQ socket each, polled together), so one
// dead manager does not eat the others' share of the deadline. Results in endpoint order.
std::vector<Result<nlohmann::json>> ControlRequestAll(const std::vector<std::string>& endpoints,
                                                      const nlohmann::json& request,
                                                      transfer::Deadline deadline);

}  // namespace eep::backup
