// `eep node`: one per host. See ep/node.h for its role, etcd keys and wire protocol.
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fmt/format.h>
#include <map>
#include <optional>

#include "backup/backup.h"
#include "backup/sidecar.h"
#include "cluster/etcd.h"
#include "core/logging.h"
#include "core/util.h"
#include "ep/control.h"
#include "ep/ep.h"
#include "ep/internal.h"
#include "ep/node.h"
#include "model/config.h"

extern char** environ;

namespace eep::ep {

nlohmann::json NodeRecord::ToJson() const {
  return {{"name", name},         {"address", address}, {"endpoint", endpoint},
          {"capacity", capacity}, {"backup", backup},   {"node_rank", node_rank}};
}

Result<NodeRecord> NodeRecord::FromJson(const std::string& text) {
  NodeRecord r;
  try {
    const auto j = nlohmann::json::parse(text);
    r.name = j.at("name").get<std::string>();
    r.address = j.at("address").get<std::string>();
    r.endpoint = j.at("endpoint").get<std::string>();
    r.capacity = j.at("capacity").get<int>();
    r.backup = j.value("backup", std::string());
    r.node_rank = j.value("node_rank", 0);
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(fmt::format("malformed node record: {}", e.what()));
  }
  return r;
}

Result<std::vector<NodeRecord>> ListNodes(const std::string& coordinator_url, const std::string& cluster) {
  EEP_ASSIGN_OR_RETURN(auto etcd, cluster::EtcdClient::Connect(coordinator_url));
  ClusterKeys keys{cluster};
  EEP_ASSIGN_OR_RETURN(auto kvs, etcd->GetPrefix(keys.Nodes()));
  std::vector<NodeRecord> nodes;
  for (const auto& kv : kvs) {
    auto r = NodeRecord::FromJson(kv.value);
    if (!r.ok()) return r.status().WithContext(kv.key);
    nodes.push_back(std::move(*r));
  }
  return nodes;
}

Result<int64_t> CampaignForLeader(cluster::EtcdClient& etcd, const ClusterKeys& keys, int64_t lease,
                                  const LeaderRecord& me, const std::atomic<bool>& stop) {
  bool announced = false;
  while (!stop.load()) {
    std::optional<cluster::EtcdKv> current;
    int64_t rev = 0;
    EEP_ASSIGN_OR_RETURN(bool won, etcd.PutIf(keys.Leader(), me.ToJson().dump(), 0, lease, &current, &rev));
    if (won) return rev;
    if (!current) continue;  // released between the two reads: try again at once
    if (!announced) {
      EEP_LOG_INFO("coordinator {}: standing by; the active coordinator is {}", me.id, current->value);
      announced = true;
    }
    // Wakes when the key changes (deleted when its holder's lease lapses); bounded so that
    // `stop` is seen.
    constexpr int64_t kWaitMs = 500;
    auto changed = etcd.WaitForChange(keys.Leader(), current->mod_revision, kWaitMs);
    if (!changed.ok() && changed.status().code() != StatusCode::kTimeout) return changed.status();
  }
  return Status::Cancelled("stopped while standing by");
}

namespace {

struct LocalRank {
  pid_t pid = -1;
  int pidfd = -1;
  int gpu = -1;  // the GPU it was given (--gpus)
};

class NodeAgent {
 public:
  explicit NodeAgent(const NodeAgentOptions& o) : o_(o) {}

  ~NodeAgent() {
    for (auto& [id, r] : ranks_) Kill(r);
  }

  Status Run(const std::atomic<bool>& stop, const std::function<void(const NodeRecord&)>& on_ready) {
    if (o_.name.empty()) return Status::InvalidArgument("--name: empty node name");
    if (!o_.gpus.empty()) o_.capacity = static_cast<int>(o_.gpus.size());
    if (o_.capacity < 1) return Status::InvalidArgument(fmt::format("--ranks must be >= 1, got {}", o_.capacity));
    EEP_ASSIGN_OR_RETURN(etcd_, cluster::EtcdClient::Connect(o_.coordinator));
    // Fail before minutes of loading when the name is taken (registration checks it again).
    EEP_ASSIGN_OR_RETURN_CTX(auto taken, etcd_->Get(ClusterKeys{o_.cluster}.Node(o_.name)),
                             "--coordinator " + o_.coordinator);
    if (taken)
      return Status::AlreadyExists(fmt::format("--name {}: a live node of cluster '{}' already has this name ({})", o_.name,
                                               o_.cluster, taken->value));
    try {
      router_.set(zmq::sockopt::linger, 0);
      router_.bind(fmt::format("tcp://{}:*", o_.address));
      record_.endpoint = router_.get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      return Status::IOError(fmt::format("--address {}: cannot bind the node socket: {}", o_.address, e.what()));
    }
    record_.name = o_.name;
    record_.address = o_.address;
    record_.capacity = o_.capacity;
    record_.node_rank = o_.node_rank;
    const std::string binary = o_.worker_binary.empty() ? "/proc/self/exe" : o_.worker_binary;
    if (o_.expert_backup) {
      EEP_ASSIGN_OR_RETURN(auto placement, backup::ParseBackupPlacement(o_.backup_placement));
      EEP_RETURN_IF_ERROR(backup::ValidateAssignment(o_.node_rank, o_.num_nodes, o_.backup_replicas));
      EEP_RETURN_IF_ERROR(backup::ValidatePlacement(placement, o_.num_nodes, o_.backup_replicas));
      // Physical slots per node as the coordinator lays them out when every node runs
      // `capacity` ranks: the anti-affinity rule keeps each expert's copy off its primary's node.
      EEP_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(o_.model_dir));
      EEP_ASSIGN_OR_RETURN(SlotLayout layout, MakeSlotLayout(config.num_experts, o_.num_redundant_experts,
                                                             o_.num_nodes * o_.capacity));
      const int64_t slots_per_node = layout.slots_per_rank * o_.capacity;
      constexpr int64_t kBackupStartMs = 600000;  // loading every expert of a large checkpoint
      EEP_ASSIGN_OR_RETURN(
          sidecar_, backup::BackupSidecar::Start(binary, o_.model_dir, o_.node_rank, o_.num_nodes, o_.backup_transport,
                                                 {"--listen", fmt::format("tcp://{}:0", o_.address), "--replicas",
                                                  std::to_string(o_.backup_replicas), "--backup-placement",
                                                  o_.backup_placement, "--slots-per-node", std::to_string(slots_per_node)},
                                                 kBackupStartMs));
      record_.backup = sidecar_->endpoint();
      backup_record_ = {{"endpoint", record_.backup},        {"node_rank", o_.node_rank},
                        {"num_nodes", o_.num_nodes},          {"replicas", o_.backup_replicas},
                        {"placement", o_.backup_placement},   {"slots_per_node", slots_per_node},
                        {"model", o_.model_dir}};
      EEP_LOG_INFO("node {}: DRAM expert backup (node {} of {}, {}) at {}", o_.name, o_.node_rank, o_.num_nodes,
                   o_.backup_placement, record_.backup);
    }
    // The node is alive in the cluster's eyes while this lease is kept.
    EEP_ASSIGN_OR_RETURN(lease_, cluster::LeaseKeeper::Start(o_.coordinator, o_.lease_ttl_s));
    ClusterKeys keys{o_.cluster};
    std::optional<cluster::EtcdKv> holder;
    EEP_ASSIGN_OR_RETURN(bool registered, etcd_->PutIf(keys.Node(o_.name), record_.ToJson().dump(), 0, lease_->id(), &holder));
    if (!registered)
      return Status::AlreadyExists(fmt::format("--name {}: a live node of cluster '{}' already has this name ({})", o_.name,
                                               o_.cluster, holder ? holder->value : std::string("?")));
    if (sidecar_)
      EEP_RETURN_IF_ERROR(etcd_->Put(keys.Backup(o_.name), backup_record_.dump(), lease_->id()).status());
    EEP_LOG_INFO("node {}: registered at {} ({} rank slot(s)), control {}", o_.name, keys.Node(o_.name), o_.capacity,
                 record_.endpoint);
    if (on_ready) on_ready(record_);
    double next_register = 0;
    while (!stop.load()) {
      // etcd was away past the lease: the ranks keep serving (the coordinator goes by their
      // heartbeats); the node registers again with a new lease once etcd answers.
      if (lease_->lost() && NowSeconds() >= next_register) {
        if (Reregister().ok()) {
          EEP_LOG_INFO("node {}: registered again after losing its etcd lease", o_.name);
        } else {
          next_register = NowSeconds() + 1.0;
        }
      }
      std::vector<zmq::pollitem_t> items{{router_.handle(), 0, ZMQ_POLLIN, 0}};
      std::vector<int> ids;
      for (auto& [id, r] : ranks_) {
        items.push_back({nullptr, r.pidfd, ZMQ_POLLIN, 0});
        ids.push_back(id);
      }
      constexpr int64_t kPollMs = 100;
      try {
        zmq::poll(items.data(), items.size(), std::chrono::milliseconds(kPollMs));
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        return Status::IOError(fmt::format("node poll: {}", e.what()));
      }
      for (size_t i = 1; i < items.size(); ++i)
        if (items[i].revents & ZMQ_POLLIN) Reap(ids[i - 1]);
      if (items[0].revents & ZMQ_POLLIN) Handle();
    }
    EEP_LOG_INFO("node {}: stopping {} rank(s)", o_.name, ranks_.size());
    for (auto& [id, r] : ranks_) Kill(r);
    ranks_.clear();
    sidecar_.reset();
    lease_.reset();  // revokes: the node leaves at once instead of after its TTL
    return Status::Ok();
  }

 private:
  void Handle() {
    std::string who;
    auto m = RecvControl(router_, &who, 0);
    if (!m.ok()) return;
    coordinator_ = who;  // the coordinator that spoke last is the one to report to
    const std::string type = m->header.value("type", "");
    const int rank = m->header.value("rank", -1);
    if (type == "hello") {
      nlohmann::json ranks = nlohmann::json::array();
      for (const auto& [id, r] : ranks_) ranks.push_back({id, r.pid});
      (void)SendControl(router_, who, {{{"type", "node"}, {"name", o_.name}, {"ranks", ranks}}, ""});
    } else if ((type == "spawn" || type == "kill") && !Current(*m)) {
      (void)SendControl(router_, who, {{{"type", "refused"}, {"rank", rank}}, ""});
    } else if (type == "spawn") {
      Status st = Spawn(*m);
      if (st.ok())
        (void)SendControl(router_, who, {{{"type", "spawned"}, {"rank", rank}, {"pid", ranks_[rank].pid}}, ""});
      else
        (void)SendControl(router_, who, {{{"type", "exited"}, {"rank", rank}, {"why", st.message()}}, ""});
    } else if (type == "kill") {
      auto it = ranks_.find(rank);
      if (it != ranks_.end()) {
        Kill(it->second);
        ranks_.erase(it);
        (void)etcd_->Delete(ClusterKeys{o_.cluster}.Rank(rank));
        EEP_LOG_INFO("node {}: rank {} killed (fenced by the coordinator)", o_.name, rank);
      }
    }
  }

  // Commands of a coordinator older than the epoch recorded in etcd (one that was replaced but
  // does not know yet) are refused: it must not kill ranks that serve its successor.
  bool Current(const ControlMessage& m) {
    const int64_t epoch = m.header.value("epoch", int64_t{0});
    auto kv = etcd_->Get(ClusterKeys{o_.cluster}.State());
    if (!kv.ok() || !*kv) return true;  // nothing recorded (or etcd away): nothing to protect
    auto j = nlohmann::json::parse((*kv)->value, nullptr, false);
    const int64_t recorded = j.is_object() ? j.value("epoch", int64_t{0}) : 0;
    if (epoch >= recorded) return true;
    EEP_LOG_WARN("node {}: refused '{}' of rank {} from a coordinator at epoch {} (epoch {} is recorded)", o_.name,
                 m.header.value("type", ""), m.header.value("rank", -1), epoch, recorded);
    return false;
  }

  Status Reregister() {
    if (lease_->lost()) {
      EEP_LOG_WARN("node {}: lost its etcd lease; its {} rank(s) keep running; registering again", o_.name, ranks_.size());
      EEP_ASSIGN_OR_RETURN(auto fresh, cluster::LeaseKeeper::Start(o_.coordinator, o_.lease_ttl_s));
      lease_ = std::move(fresh);
    }
    ClusterKeys keys{o_.cluster};
    EEP_RETURN_IF_ERROR(etcd_->Put(keys.Node(o_.name), record_.ToJson().dump(), lease_->id()).status());
    if (!backup_record_.is_null()) EEP_RETURN_IF_ERROR(etcd_->Put(keys.Backup(o_.name), backup_record_.dump(), lease_->id()).status());
    for (const auto& [id, r] : ranks_)
      EEP_RETURN_IF_ERROR(etcd_->Put(keys.Rank(id), nlohmann::json{{"node", o_.name}, {"pid", r.pid}, {"gpu", r.gpu}}.dump(),
                                     lease_->id()).status());
    return Status::Ok();
  }

  Status Spawn(const ControlMessage& m) {
    const int rank = m.header.value("rank", -1);
    if (rank < 0) return Status::InvalidArgument("spawn without a rank");
    if (ranks_.count(rank)) return Status::AlreadyExists(fmt::format("rank {} already runs on node {}", rank, o_.name));
    if (static_cast<int>(ranks_.size()) >= o_.capacity)
      return Status::ResourceExhausted(fmt::format("node {} already runs {} rank(s) (--ranks {})", o_.name, ranks_.size(), o_.capacity));
    std::vector<std::string> args =
        RankWorkerArgs(m.header.value("log_level", o_.log_level), m.header.value("control", ""),
                       m.header.value("heartbeat", ""), rank, m.header.value("session", ""));
    args.insert(args.end(), {"--coordinator", o_.coordinator, "--cluster", o_.cluster});
    const std::string binary = o_.worker_binary.empty() ? "/proc/self/exe" : o_.worker_binary;
    // With --gpus, the lowest listed GPU no rank of this node uses, and only it visible.
    int gpu = -1;
    std::vector<std::string> env_storage;
    for (char** e = environ; *e != nullptr; ++e)
      if (o_.gpus.empty() || std::string(*e).rfind("CUDA_VISIBLE_DEVICES=", 0) != 0) env_storage.emplace_back(*e);
    if (!o_.gpus.empty()) {
      for (int g : o_.gpus) {
        bool used = false;
        for (const auto& [id, r] : ranks_) used |= r.gpu == g;
        if (!used) {
          gpu = g;
          break;
        }
      }
      env_storage.push_back(fmt::format("CUDA_VISIBLE_DEVICES={}", gpu));
    }
    std::vector<char*> envp;
    for (auto& e : env_storage) envp.push_back(e.data());
    envp.push_back(nullptr);
    auto pid = SpawnUnblocked(binary, args, envp.data());
    if (!pid.ok()) return pid.status().WithContext(fmt::format("node {}: rank {}", o_.name, rank));
    LocalRank r;
    r.pid = *pid;
    r.pidfd = static_cast<int>(syscall(SYS_pidfd_open, *pid, 0));
    r.gpu = gpu;
    ranks_[rank] = r;
    (void)etcd_->Put(ClusterKeys{o_.cluster}.Rank(rank), nlohmann::json{{"node", o_.name}, {"pid", *pid}, {"gpu", gpu}}.dump(),
                     lease_->id());
    EEP_LOG_INFO("node {}: started rank {} (pid {}{})", o_.name, rank, *pid, gpu >= 0 ? fmt::format(", GPU {}", gpu) : "");
    return Status::Ok();
  }

  void Reap(int id) {
    auto it = ranks_.find(id);
    if (it == ranks_.end()) return;
    int status = 0;
    if (waitpid(it->second.pid, &status, WNOHANG) != it->second.pid) return;
    const std::string why = WIFSIGNALED(status) ? fmt::format("rank {} exited on signal {}", id, WTERMSIG(status))
                                                : fmt::format("rank {} exited with code {}", id, WEXITSTATUS(status));
    EEP_LOG_INFO("node {}: {}", o_.name, why);
    close(it->second.pidfd);
    ranks_.erase(it);
    (void)etcd_->Delete(ClusterKeys{o_.cluster}.Rank(id));
    if (!coordinator_.empty())
      (void)SendControl(router_, coordinator_, {{{"type", "exited"}, {"rank", id}, {"why", why}, {"clean", WIFEXITED(status) && WEXITSTATUS(status) == 0}}, ""});
  }

  static void Kill(LocalRank& r) {
    KillAndReap(r.pid);
    r.pid = -1;
    if (r.pidfd >= 0) close(r.pidfd);
    r.pidfd = -1;
  }

  NodeAgentOptions o_;
  NodeRecord record_;
  nlohmann::json backup_record_;
  std::unique_ptr<cluster::EtcdClient> etcd_;
  std::unique_ptr<cluster::LeaseKeeper> lease_;
  std::unique_ptr<backup::BackupSidecar> sidecar_;
  zmq::context_t ctx_{1};
  zmq::socket_t router_{ctx_, zmq::socket_type::router};
  std::string coordinator_;
  std::map<int, LocalRank> ranks_;
};

}  // namespace

Status RunNodeAgent(const NodeAgentOptions& options, const std::atomic<bool>& stop,
                    const std::function<void(const NodeRecord&)>& on_ready) {
  NodeAgent agent(options);
  return agent.Run(stop, on_ready);
}

}  // namespace eep::ep
