// Many hosts: `eep node` runs on every host. It keeps a lease in etcd (the host is alive while
// the lease is), starts the host's DRAM backup manager, and starts and stops the host's ranks
// when the coordinator asks. Ranks are its children, so a host that dies takes its ranks and
// its backup with it, and a coordinator that dies takes nothing: a standby coordinator adopts
// the running ranks.
//
// etcd layout under /eep/<cluster>/ (values are JSON):
//   leader          {"id", "http", "control", "heartbeat"}   leased: the active coordinator
//   state           {"epoch", "members", "slots_per_rank", "phy2log", "ranks", ...}
//                   written with compare-and-swap on its mod revision, so a coordinator that was
//                   replaced cannot overwrite a newer epoch
//   nodes/<name>    {"name", "address", "endpoint", "capacity", "backup", "node_rank"}  leased
//   ranks/<id>      {"node", "pid", "gpu"}  leased by its node: the rank processes running now
//   backups/<name>  {"endpoint", "node_rank", "num_nodes", "replicas", "placement",
//                    "slots_per_node", "model"}  leased: the host's backup manager; its full
//                   descriptor (every tensor's offset, size, shape, dtype, transport region)
//                   is served at "endpoint" ("describe"), too large for an etcd value
//
// Node wire protocol (ZeroMQ; the node binds a ROUTER, each coordinator connects a DEALER):
//   coordinator → node  {"type": "spawn", "rank", "control", "heartbeat", "session", "log_level"}
//                       {"type": "kill", "rank"}     {"type": "hello"}
//   node → coordinator  {"type": "spawned", "rank", "pid"}   {"type": "exited", "rank", "why"}
//                       {"type": "node", "name", "ranks": [[rank, pid], ...]}   (answer to hello)
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace eep::cluster {
class EtcdClient;
}

namespace eep::ep {

struct ClusterKeys {
  std::string cluster = "default";
  std::string Prefix() const { return "/eep/" + cluster + "/"; }
  std::string Leader() const { return Prefix() + "leader"; }
  std::string State() const { return Prefix() + "state"; }
  std::string Nodes() const { return Prefix() + "nodes/"; }
  std::string Node(const std::string& name) const { return Nodes() + name; }
  std::string Backups() const { return Prefix() + "backups/"; }
  std::string Ranks() const { return Prefix() + "ranks/"; }
  std::string Rank(int id) const { return Ranks() + std::to_string(id); }
  std::string Backup(const std::string& name) const { return Backups() + name; }
};

// A host as registered by its node agent.
struct NodeRecord {
  std::string name;
  std::string address;          // where other hosts reach it
  std::string endpoint;         // the agent's ZeroMQ ROUTER
  int capacity = 0;             // ranks it may run
  std::string backup;           // its backup manager's endpoint; empty: none
  int node_rank = 0;            // position in the backup assignment
  nlohmann::json ToJson() const;
  static Result<NodeRecord> FromJson(const std::string& text);
};

// Reads every registered node (sorted by name). Errors name the key at fault.
Result<std::vector<NodeRecord>> ListNodes(const std::string& coordinator_url, const std::string& cluster);

struct NodeAgentOptions {
  std::string coordinator;             // etcd://HOST:PORT[,...]
  std::string cluster = "default";
  std::string name;                    // unique per host; default: the host name
  std::string address = "127.0.0.1";  // this host's address as the others see it
  int capacity = 1;                    // --ranks
  std::vector<int> gpus;               // --gpus: one rank per listed GPU (capacity = their count);
                                       // each rank sees only its GPU (CUDA_VISIBLE_DEVICES)
  std::string model_dir;
  bool expert_backup = true;
  int node_rank = 0, num_nodes = 1, backup_replicas = 1;
  int64_t num_redundant_experts = 0;   // as the coordinator's: the backup rule needs the slot layout
  std::string backup_placement = "anti-affinity";
  std::string backup_transport = "ucx";
  std::string worker_binary;           // empty: this executable
  std::string log_level = "info";
  int64_t lease_ttl_s = 2;
};

// The active coordinator's record (`leader` key).
struct LeaderRecord {
  std::string id;         // unique per coordinator process
  std::string http;       // its HTTP address, once serving
  std::string control, heartbeat;  // its ZeroMQ endpoints (ranks connect there)
  nlohmann::json ToJson() const { return {{"id", id}, {"http", http}, {"control", control}, {"heartbeat", heartbeat}}; }
};

// Campaigns for the `leader` key: creates it (bound to `lease`) if absent, else waits for it to
// go (its holder's lease lapses when that process dies) and tries again, until `stop`.
// Returns the key's mod revision once this process holds it; kCancelled on stop.
Result<int64_t> CampaignForLeader(cluster::EtcdClient& etcd, const ClusterKeys& keys, int64_t lease,
                                  const LeaderRecord& me, const std::atomic<bool>& stop);

// Runs the agent until `stop` turns true (checked at least every 100 ms), then stops its ranks
// and its backup manager and revokes its lease. `on_ready` (optional) runs once the node is
// registered.
Status RunNodeAgent(const NodeAgentOptions& options, const std::atomic<bool>& stop,
                    const std::function<void(const NodeRecord&)>& on_ready = nullptr);

}  // namespace eep::ep
