// The coordinator side of the EP runtime: spawns ranks, drives steps, runs EPLB, and keeps
// serving through rank failures and membership changes.
//
// Rank ids are stable for a process's life and never reused; the serving ranks of an epoch
// are `members` (their order is the communicator order and the slot order). Every message
// carries the epoch it belongs to, so replies of an older epoch (late, or from a fenced rank)
// are ignored, never applied.
//
// Failure handling ("stop the world, short"): a rank is dead when its process exits (pidfd),
// its heartbeats stop for the peer timeout, it is stopped (SIGSTOP: a wedged rank), or peers
// keep reporting it silent. The coordinator fences it (SIGKILL; a later message would carry a
// stale epoch anyway), opens a new epoch, and has the survivors abort the step in flight
// (heartbeat channel), roll it back, and report what they hold. It plans over the survivors
// (min-move EPLB, every expert on a live rank), rebuilds the communicator, restores orphaned
// experts (from a surviving replica, else the DRAM backup, else the checkpoint), and retries
// the step. Sequences of the dead rank resume on survivors from their prompt plus the tokens
// produced so far (re-prefill), so outputs do not change. Scaling uses the same switch.
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "cluster/etcd.h"
#include "core/logging.h"
#include "core/util.h"
#include "ep/control.h"
#include "ep/ep.h"
#include "ep/internal.h"
#include "ep/node.h"
#include "eplb/eplb.h"

extern char** environ;

namespace eep::ep {
namespace {

// Plan item sources besides a rank id.
constexpr int kFromBackup = -1;
constexpr int kFromDisk = -2;

constexpr int64_t kStartupMs = 300000;  // loading a large checkpoint on CPU

std::string FormatBytes(int64_t b) {
  if (b >= (int64_t{1} << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(b) / (1 << 30));
  if (b >= (1 << 20)) return fmt::format("{:.2f} MiB", static_cast<double>(b) / (1 << 20));
  if (b >= (1 << 10)) return fmt::format("{:.1f} KiB", static_cast<double>(b) / (1 << 10));
  return fmt::format("{} B", b);
}

// 'T' (stopped) or 't' (traced) in /proc/PID/stat: alive but wedged.
bool ProcessStopped(pid_t pid) {
  std::ifstream f(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!std::getline(f, line)) return false;
  const size_t close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return false;
  const char state = line[close + 2];
  return state == 'T' || state == 't';
}

bool Contains(const std::vector<int>& v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

}  // namespace

class EpEngine::Impl {
 public:
  struct Proc {
    int id = 0;
    pid_t pid = -1;
    int pidfd = -1;
    std::string identity;  // zmq identity of its control socket
    std::string state;     // starting | alive | joining | draining | dead | left
    bool ready = false;    // joining: loaded, waiting for the switch
    bool prefetching = false, prefetched = false;  // joining: reading its planned experts
    std::vector<std::pair<int64_t, int32_t>> cached;  // (moe_layer, expert) prefetched, from the last hold
    nlohmann::json prefetch_report;                    // what the prefetch read, and from where
    bool hb_seen = false;
    double last_hb = 0;
    int suspicions = 0;
    int device_slot = 0;  // which GPU (slot mod visible GPUs) a one-rank-per-GPU rank takes
    int node = -1;        // index in `nodes` of the host running it; -1: a child of this process
    int remote_pid = 0;   // its pid on that host (display only: `pid` stays -1 for remote ranks)
    std::vector<std::vector<int32_t>> holdings;  // [moe_layer][local slot], from the last hold
    bool Live() const { return state != "dead" && state != "left"; }
  };
  struct SeqInfo {
    int rank = -1;
    std::vector<int64_t> history;  // every token fed so far (prompt + generated, fed back)
    int64_t produced = 0;          // tokens sampled so far
    bool replay = false;           // next step re-prefills it on a new rank
  };
  struct Failure {
    std::vector<int> dead;  // confirmed dead
    std::vector<int> suspects;
    std::string what;
    double at = 0;
  };

  EpOptions opts;
  std::string model_dir;
  ModelConfig config;
  SlotLayout layout;
  int64_t initial_slots_per_rank = 0;
  ExpertMap map;
  int64_t num_moe_layers = 0;
  zmq::context_t ctx{1};
  zmq::socket_t router{ctx, zmq::socket_type::router};
  zmq::socket_t hb{ctx, zmq::socket_type::router};
  std::string endpoint, hb_endpoint, session;
  std::vector<Proc> procs;      // by rank id
  // Local ranks that left at a scale-down and are still exiting (reaped by ReapLeavers).
  struct Leaver {
    pid_t pid = -1;
    double deadline = 0;  // killed if still running then
  };
  static constexpr double kLeaverGraceSeconds = 2.0;
  std::vector<Leaver> leavers;
  std::vector<int> members;     // serving ranks, communicator order
  std::vector<int> joining, leaving;
  int target_size = 0;
  std::map<std::string, int> id_of;  // control identity -> rank id
  std::map<int64_t, SeqInfo> seqs;
  std::vector<int64_t> to_release;
  std::unique_ptr<eplb::LoadRecorder> recorder;
  int64_t step = 0;
  int64_t epoch = 1;
  bool backup_ready = false;
  std::string backup_health;
  std::vector<RebalanceStats> rebalances;
  std::vector<MembershipEvent> events;
  std::optional<size_t> awaiting_resume;  // event whose resume time the next step measures
  double switch_done_at = 0;
  std::string health = "ok";
  bool shut_down = false;
  std::optional<Failure> failure;
  double op_started = 0;  // start of the step / exchange a failure interrupts
  double last_drain = 0;  // last time heartbeats were read
  std::set<int> reported_silent;  // suspects already logged this step
  // An async rebalance whose exchange runs on the ranks; the next step switches to it.
  struct PendingSwitch {
    ExpertMap next;
    RebalanceStats stats;
    double t0;
    bool ready = false;  // every rank reported its exchange complete
  };
  std::unique_ptr<PendingSwitch> pending;
  // A scale-up planned ahead, whose joining ranks prefetch their experts.
  struct PrefetchPlan {
    std::vector<int> members;
    int64_t slots_per_rank = 0;
    std::vector<std::vector<int32_t>> next;
  };
  std::optional<PrefetchPlan> prefetch_plan;
  // Many hosts: the node agents running the ranks, and the etcd record of the membership.
  struct NodeConn {
    RemoteNode rec;
    std::unique_ptr<zmq::socket_t> sock;
    bool alive = true;
  };
  // What etcd says about the cluster, read by a background thread so that a slow or
  // unreachable etcd never stalls a step.
  struct ClusterView {
    bool valid = false;
    std::string leader_control, leader_value;  // the leader record ("" when none)
    std::vector<NodeRecord> nodes;
    std::vector<std::string> backups;
    uint64_t generation = 0;
  };

  std::vector<NodeConn> nodes;
  std::unique_ptr<cluster::EtcdClient> etcd;
  ClusterKeys keys;
  int64_t state_rev = 0;     // mod revision of the state record this coordinator last wrote
  bool deposed = false;      // another coordinator wrote a newer state: hands off
  std::thread watcher;       // reads etcd into `view` (Remote() with a coordinator URL)
  std::mutex view_mu;
  std::condition_variable view_cv;
  ClusterView view;                 // GUARDED_BY(view_mu)
  bool watcher_stop = false;        // GUARDED_BY(view_mu)
  bool view_wanted = false;         // GUARDED_BY(view_mu): read again now
  uint64_t applied_generation = 0;  // the view CheckNodes applied last (coordinator thread)

  ~Impl() {
    Shutdown();
    StopWatcher();
  }

  bool Remote() const { return !nodes.empty(); }

  double HeartbeatTimeout() const {
    return static_cast<double>(std::max(opts.peer_timeout_ms, 3 * opts.heartbeat_interval_ms)) / 1000.0;
  }

  // ---- processes -------------------------------------------------------------------------

  Status Spawn(int id, const std::string& state) {
    if (Remote()) return SpawnRemote(id, state);
    std::vector<std::string> args = RankWorkerArgs(opts.log_level, endpoint, hb_endpoint, id, session);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    const std::string binary = opts.worker_binary.empty() ? "/proc/self/exe" : opts.worker_binary;
    // Only stdin/out/err go to the rank: an inherited descriptor (the HTTP server's listening
    // socket above all) would outlive a killed server in its ranks and keep the port busy.
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    int rc = posix_spawn(&pid, binary.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return Status::IOError(fmt::format("cannot start rank {}: {}", id, std::strerror(rc)));
    Proc p;
    p.id = id;
    p.pid = pid;
    p.device_slot = FreeDeviceSlot(-1);
    p.pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
    p.state = state;
    p.last_hb = NowSeconds();
    if (static_cast<int>(procs.size()) <= id) procs.resize(static_cast<size_t>(id) + 1);
    procs[static_cast<size_t>(id)] = std::move(p);
    return Status::Ok();
  }

  // The lowest device slot no live rank of `node` (-1: this host) uses: a rank replacing a dead
  // one takes its GPU.
  int FreeDeviceSlot(int node) const {
    std::set<int> used;
    for (const Proc& q : procs)
      if (q.Live() && q.node == node && (node >= 0 || q.pid > 0)) used.insert(q.device_slot);
    int slot = 0;
    while (used.count(slot)) ++slot;
    return slot;
  }

  // On the first node (in order) with a free rank slot, so that a host's ranks hold
  // contiguous expert blocks (what the backups' anti-affinity rule assumes).
  Status SpawnRemote(int id, const std::string& state) {
    std::vector<int> used(nodes.size(), 0), dead(nodes.size(), 0);
    for (const Proc& q : procs) {
      if (q.Live() && q.node >= 0) ++used[static_cast<size_t>(q.node)];
      if (q.state == "dead" && q.node >= 0) ++dead[static_cast<size_t>(q.node)];
    }
    // Hosts where no rank has died first: a host that just lost its ranks stays registered until
    // its etcd lease lapses, and a rank sent there would never join.
    int chosen = -1;
    for (int pass = 0; pass < 2 && chosen < 0; ++pass)
      for (size_t n = 0; n < nodes.size() && chosen < 0; ++n)
        if (nodes[n].alive && used[n] < nodes[n].rec.capacity && (pass == 1 || dead[n] == 0))
          chosen = static_cast<int>(n);
    if (chosen < 0) {
      std::string all;
      for (size_t n = 0; n < nodes.size(); ++n)
        all += fmt::format("{}{} {}/{}{}", n ? ", " : "", nodes[n].rec.name, used[n], nodes[n].rec.capacity,
                           nodes[n].alive ? "" : " (lost)");
      return Status::ResourceExhausted(fmt::format("cannot start rank {}: no node has a free rank slot ({})", id, all));
    }
    NodeConn& node = nodes[static_cast<size_t>(chosen)];
    EEP_RETURN_IF_ERROR(SendControl(*node.sock, "",
                                    {{{"type", "spawn"}, {"rank", id}, {"control", endpoint}, {"heartbeat", hb_endpoint},
                                      {"session", session}, {"log_level", opts.log_level}, {"epoch", epoch}},
                                     ""}));
    Proc p;
    p.id = id;
    p.node = chosen;
    p.device_slot = FreeDeviceSlot(chosen);  // GPUs are per host
    p.state = state;
    p.last_hb = NowSeconds();
    if (static_cast<int>(procs.size()) <= id) procs.resize(static_cast<size_t>(id) + 1);
    procs[static_cast<size_t>(id)] = std::move(p);
    EEP_LOG_INFO("ep: rank {} starts on node {}", id, node.rec.name);
    return Status::Ok();
  }

  // Fences a rank: killed if it still runs, its messages ignored from now on.
  void Fence(int id, const std::string& state) {
    Proc& p = procs[static_cast<size_t>(id)];
    if (p.node >= 0 && p.Live()) {
      NodeConn& n = nodes[static_cast<size_t>(p.node)];
      if (n.alive) (void)SendControl(*n.sock, "", {{{"type", "kill"}, {"rank", id}, {"epoch", epoch}}, ""});
    }
    KillAndReap(p.pid);
    p.pid = -1;
    if (p.pidfd >= 0) close(p.pidfd);
    p.pidfd = -1;
    if (!p.identity.empty()) id_of.erase(p.identity);
    p.state = state;
    std::erase(members, id);
    std::erase(joining, id);
    std::erase(leaving, id);
  }

  void NoteDead(int id, const std::string& why) {
    if (!failure) failure = Failure{{}, {}, "", NowSeconds()};
    if (!Contains(failure->dead, id)) {
      failure->dead.push_back(id);
      failure->what += (failure->what.empty() ? "" : "; ") + why;
    }
  }

  // A joining rank that fails is simply dropped: it serves nothing yet.
  void DropJoiner(int id, const std::string& why) {
    EEP_LOG_WARN("ep: joining rank {} dropped: {}", id, why);
    Fence(id, "dead");
  }

  // Process exits, stopped processes and silent heartbeats. Returns true if a failure of a
  // serving (or leaving) rank is pending.
  bool CheckProcesses() {
    const double now = NowSeconds();
    if (Remote()) CheckNodes();
    for (Proc& p : procs) {
      if (!p.Live() || (p.pid <= 0 && p.node < 0)) continue;
      int status = 0;
      std::string why;
      // A rank on another host (node >= 0): its node agent reports its exit; heartbeats say the rest.
      if (p.node < 0 && waitpid(p.pid, &status, WNOHANG) == p.pid) {
        p.pid = -1;
        // A leaving rank exits by itself once it has handed its experts over.
        if (p.state == "draining" && WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
        why = WIFSIGNALED(status) ? fmt::format("rank {} exited on signal {}", p.id, WTERMSIG(status))
                                  : fmt::format("rank {} exited with code {}", p.id, WEXITSTATUS(status));
      } else if (p.hb_seen && now - p.last_hb > HeartbeatTimeout()) {
        why = fmt::format("rank {}{} sent no heartbeat for {:.0f} ms", p.id,
                          p.node >= 0 ? fmt::format(" (node {})", nodes[static_cast<size_t>(p.node)].rec.name) : "",
                          (now - p.last_hb) * 1000);
      } else if (p.node < 0 && now - p.last_hb > 2.0 * static_cast<double>(opts.heartbeat_interval_ms) / 1000.0 &&
                 ProcessStopped(p.pid)) {
        // (checked only once heartbeats lag, to keep the common path cheap)
        why = fmt::format("rank {} is stopped (wedged)", p.id);
      }
      if (!why.empty()) RankFailed(p, why);
    }
    return failure && !failure->dead.empty();
  }

  // A joining rank is dropped (it serves nothing yet); any other is dead.
  void RankFailed(Proc& p, const std::string& why) {
    if (p.state == "joining") {
      DropJoiner(p.id, why);
      return;
    }
    if (p.state != "starting") EEP_LOG_WARN("ep: {}", why);
    NoteDead(p.id, why);
  }

  // A node whose etcd lease lapsed is gone with every rank on it, and a leader record naming
  // another coordinator deposes this one (checked a few times a second).
  void StartWatcher() {
    watcher = std::thread([this] {
      auto client = cluster::EtcdClient::Connect(opts.coordinator_url);
      if (!client.ok()) return;
      std::unique_lock<std::mutex> lock(view_mu);
      while (!watcher_stop) {
        lock.unlock();
        ClusterView v;
        auto leader = (*client)->Get(keys.Leader());
        auto node_kvs = (*client)->GetPrefix(keys.Nodes());
        auto backup_kvs = (*client)->GetPrefix(keys.Backups());
        v.valid = leader.ok() && node_kvs.ok() && backup_kvs.ok();
        if (v.valid) {
          if (*leader) {
            v.leader_value = (*leader)->value;
            auto j = nlohmann::json::parse(v.leader_value, nullptr, false);
            if (j.is_object()) v.leader_control = j.value("control", std::string());
          }
          for (const auto& kv : *node_kvs)
            if (auto rec = NodeRecord::FromJson(kv.value); rec.ok()) v.nodes.push_back(std::move(*rec));
          for (const auto& kv : *backup_kvs) {
            auto j = nlohmann::json::parse(kv.value, nullptr, false);
            if (j.is_object() && j.contains("endpoint")) v.backups.push_back(j["endpoint"].get<std::string>());
          }
        }
        lock.lock();
        if (v.valid) {
          v.generation = view.generation + 1;
          view = std::move(v);
          view_cv.notify_all();
        }
        view_cv.wait_for(lock, std::chrono::duration<double>(HeartbeatTimeout() / 4), [this] { return watcher_stop || view_wanted; });
        view_wanted = false;
      }
    });
  }

  void StopWatcher() {
    {
      std::lock_guard<std::mutex> lock(view_mu);
      watcher_stop = true;
    }
    view_cv.notify_all();
    if (watcher.joinable()) watcher.join();
  }

  // Applies the latest view: a leader record naming another coordinator deposes this one;
  // hosts that joined can take ranks; hosts whose lease lapsed are gone with their ranks.
  // `fresh`: wait (bounded) for a view read after this call (a scale-up looking for hosts).
  void CheckNodes(bool fresh = false) {
    if (!etcd || deposed || !watcher.joinable()) return;
    ClusterView v;
    {
      std::unique_lock<std::mutex> lock(view_mu);
      if (fresh) {
        const uint64_t after = view.generation;
        view_wanted = true;
        view_cv.notify_all();
        view_cv.wait_for(lock, std::chrono::seconds(2), [&] { return view.generation > after; });
      }
      if (!view.valid || view.generation == applied_generation) return;
      applied_generation = view.generation;
      v = view;
    }
    if (!v.leader_control.empty() && v.leader_control != endpoint) {
      deposed = true;
      health = "deposed: another coordinator leads the cluster (" + v.leader_value + ")";
      EEP_LOG_ERROR("ep: {}; leaving the ranks to it", health);
      return;
    }
    std::set<std::string> present;
    for (const NodeRecord& rec : v.nodes) {
      present.insert(rec.name);
      // A host that joined since, or registered again after an etcd outage: it can run ranks.
      bool known = false;
      for (NodeConn& n : nodes) {
        if (n.rec.name != rec.name || n.rec.endpoint != rec.endpoint) continue;
        if (!n.alive) EEP_LOG_INFO("ep: node {} is registered again", rec.name);
        n.alive = known = true;
      }
      if (!known) (void)AddNode({rec.name, rec.endpoint, rec.capacity});
    }
    // Ranks started from now on reach the backup managers that exist now.
    opts.backup_endpoints = v.backups;
    // A host whose lease lapsed gets no new ranks. Its running ranks are judged by their
    // heartbeats (a dead host's stop at once): an etcd outage must not take the cluster down.
    for (size_t n = 0; n < nodes.size(); ++n) {
      if (!nodes[n].alive || present.count(nodes[n].rec.name)) continue;
      nodes[n].alive = false;
      EEP_LOG_WARN("ep: node {}'s etcd lease lapsed: no new ranks there; its ranks stay while they heartbeat",
                   nodes[n].rec.name);
    }
  }

  // A remote rank's exit (reported by its node) or its node's loss.
  void RemoteExited(int id, const std::string& why, bool clean) {
    if (id < 0 || id >= static_cast<int>(procs.size())) return;
    Proc& p = procs[static_cast<size_t>(id)];
    if (!p.Live()) return;
    if (p.state == "draining" && clean) return;  // left after handing its experts over
    RankFailed(p, why);
  }

  void DrainNodes() {
    for (NodeConn& n : nodes) {
      while (true) {
        auto m = RecvControl(*n.sock, nullptr, 0);
        if (!m.ok()) break;
        const std::string type = m->header.value("type", "");
        const int id = m->header.value("rank", -1);
        if (type == "exited") {
          RemoteExited(id, m->header.value("why", std::string("exited")) + " (node " + n.rec.name + ")",
                       m->header.value("clean", false));
        } else if (type == "spawned" && id >= 0 && id < static_cast<int>(procs.size())) {
          procs[static_cast<size_t>(id)].remote_pid = m->header.value("pid", 0);
        }
      }
    }
  }

  void DrainHeartbeats() {
    const double now = NowSeconds();
    // If this thread was away (not polling) for a while, heartbeats queued meanwhile say
    // nothing about when they were sent: give every rank the benefit of the doubt.
    if (now - last_drain > HeartbeatTimeout() / 2)
      for (Proc& p : procs) p.last_hb = std::max(p.last_hb, now);
    last_drain = now;
    while (true) {
      std::string who;
      auto m = RecvControl(hb, &who, 0);
      if (!m.ok()) return;
      const int id = m->header.value("rank", -1);
      if (id < 0 || id >= static_cast<int>(procs.size())) continue;
      Proc& p = procs[static_cast<size_t>(id)];
      if (!p.Live()) continue;
      p.hb_seen = true;
      p.last_hb = NowSeconds();
      if (m->header.value("type", "") == "suspect" && m->header.value("epoch", int64_t{-1}) == epoch)
        for (int s : m->header.value("suspects", std::vector<int>{}))
          if (s >= 0 && s < static_cast<int>(procs.size()) && procs[static_cast<size_t>(s)].Live() &&
              reported_silent.insert(s).second)
            EEP_LOG_WARN("ep: rank {} reports rank {} silent for {} ms; confirming (a slow rank is waited for)", id, s,
                         opts.peer_timeout_ms);
    }
  }

  void SendAbort(const std::vector<int>& ids) {
    for (int id : ids)
      (void)SendControl(hb, fmt::format("hb-{}", id), {{{"type", "abort"}, {"epoch", epoch}}, ""});
  }

  nlohmann::json InitMessage(int id) const {
    return {{"type", "init"},
            {"device_slot", procs[static_cast<size_t>(id)].device_slot},
            {"model", model_dir},
            {"epoch", epoch},
            {"members", members},
            {"slots_per_rank", layout.slots_per_rank},
            {"communicator", opts.communicator},
            {"backend", opts.backend},
            {"peer_timeout_ms", opts.peer_timeout_ms},
            {"heartbeat_interval_ms", opts.heartbeat_interval_ms},
            {"phy2log", map.phy2log()},
            {"inject_fault", opts.inject_fault},
            {"eplb_async", opts.eplb_async},
            {"backup_endpoints", opts.backup_endpoints}};
  }

  // ---- receiving -------------------------------------------------------------------------

  // Receives one message from a live rank by `deadline`. Hello, and the start-up replies of
  // joining ranks, are handled here. Fails with kUnavailable once a failure is confirmed
  // (`failure` says which), kTimeout at the deadline.
  Result<std::pair<int, ControlMessage>> Recv(double deadline, const std::string& waiting_for) {
    while (true) {
      DrainHeartbeats();
      DrainNodes();
      if (CheckProcesses()) return Status::Unavailable(failure->what);
      if (deposed) return Status::Unavailable(health);
      const double left = deadline - NowSeconds();
      std::vector<zmq::pollitem_t> items{{router.handle(), 0, ZMQ_POLLIN, 0}, {hb.handle(), 0, ZMQ_POLLIN, 0}};
      for (NodeConn& n : nodes) items.push_back({n.sock->handle(), 0, ZMQ_POLLIN, 0});
      for (const Proc& p : procs)
        if (p.Live() && p.pidfd >= 0) items.push_back({nullptr, p.pidfd, ZMQ_POLLIN, 0});
      const int64_t wait_ms =
          std::clamp<int64_t>(static_cast<int64_t>(left * 1000), 0, std::max<int64_t>(1, opts.heartbeat_interval_ms));
      try {
        zmq::poll(items.data(), items.size(), std::chrono::milliseconds(wait_ms));
      } catch (const zmq::error_t& e) {
        return Status::IOError(fmt::format("control poll: {}", e.what()));
      }
      if (!(items[0].revents & ZMQ_POLLIN)) {
        if (left <= 0) return Status::Timeout(fmt::format("ranks did not answer {} in time", waiting_for));
        continue;
      }
      std::string identity;
      auto m = RecvControl(router, &identity, 0);
      if (!m.ok()) {
        if (m.status().code() == StatusCode::kTimeout) continue;
        return m.status();
      }
      const std::string type = m->header.value("type", "");
      auto it = id_of.find(identity);
      if (it == id_of.end()) {
        if (type != "hello") continue;  // not one of ours (a fenced or stale peer): ignored
        const int id = m->header.value("rank", -1);
        if (id < 0 || id >= static_cast<int>(procs.size()) || !procs[static_cast<size_t>(id)].Live() ||
            !procs[static_cast<size_t>(id)].identity.empty())
          continue;
        procs[static_cast<size_t>(id)].identity = identity;
        id_of[identity] = id;
        // A rank adopted from the previous coordinator is initialised already.
        if (m->header.value("adopt", false)) {
          procs[static_cast<size_t>(id)].last_hb = NowSeconds();
          EEP_LOG_INFO("ep: rank {} reconnected (it was at epoch {})", id, m->header.value("epoch", int64_t{0}));
          continue;
        }
        EEP_RETURN_IF_ERROR(SendControl(router, identity, {InitMessage(id), ""}));
        continue;
      }
      const int id = it->second;
      Proc& p = procs[static_cast<size_t>(id)];
      if (type == "prefetched") {
        // A rank's background prefetch for a scaling step finished (an error only costs the
        // switch more: what was not read moves in the blocking window).
        if (!p.prefetching || p.prefetched) continue;  // of a plan given up
        p.prefetched = true;
        p.prefetch_report = m->header.value("restore", nlohmann::json::object());
        if (m->header.contains("error")) EEP_LOG_WARN("ep: rank {}: prefetch failed: {}", id, m->header.value("error", ""));
        else EEP_LOG_INFO("ep: rank {} prefetched its experts in {:.1f} ms", id, p.prefetch_report.value("seconds", 0.0) * 1000);
        continue;
      }
      if (p.state == "joining" && !p.ready) {
        if (type == "ready") {
          p.ready = true;
          EEP_LOG_INFO("ep: rank {} loaded and ready to join", id);
        } else if (type == "error") {
          DropJoiner(id, m->header.value("message", ""));
        }
        continue;
      }
      return std::make_pair(id, std::move(*m));
    }
  }

  // A rank reported an exchange error at the current epoch: find out who is at fault. Waits
  // (bounded) for a death to be confirmed; else the suspects were only slow, and after
  // repeated suspicion one is declared dead.
  Status Confirm(int reporter, const ControlMessage& error) {
    failure = Failure{{}, error.header.value("suspects", std::vector<int>{}),
                      fmt::format("rank {}: {}", reporter, error.header.value("message", "")), NowSeconds()};
    const double deadline = NowSeconds() + HeartbeatTimeout() + 2.0 * static_cast<double>(opts.heartbeat_interval_ms) / 1000.0;
    while (true) {
      auto m = Recv(deadline, "confirmation");
      if (!m.ok()) break;  // failure confirmed, or time is up
      if (m->second.header.value("type", "") == "error")
        for (int s : m->second.header.value("suspects", std::vector<int>{}))
          if (!Contains(failure->suspects, s)) failure->suspects.push_back(s);
    }
    if (!failure->dead.empty()) return Status::Unavailable(failure->what);
    constexpr int kMaxSuspicions = 3;
    for (int s : failure->suspects) {
      if (s < 0 || s >= static_cast<int>(procs.size()) || !procs[static_cast<size_t>(s)].Live()) continue;
      if (++procs[static_cast<size_t>(s)].suspicions >= kMaxSuspicions)
        NoteDead(s, fmt::format("rank {} missed the exchange deadline {} times", s, kMaxSuspicions));
    }
    EEP_LOG_WARN("ep: exchange failed but every rank is alive ({}); retrying", failure->what);
    return Status::Unavailable(failure->what);
  }

  // Collects one message of one of `types` at the current epoch from every rank in `group`.
  // An error reply from a rank is returned as its status, except exchange errors
  // (timeout, cancelled, disconnect), which start a confirmation.
  Result<std::map<int, ControlMessage>> Gather(const std::vector<std::string>& types, const std::vector<int>& group,
                                               int64_t timeout_ms) {
    std::map<int, ControlMessage> out;
    const double deadline = NowSeconds() + static_cast<double>(timeout_ms) / 1000.0;
    while (out.size() < group.size()) {
      std::string who;
      for (int r : group)
        if (!out.count(r)) who += (who.empty() ? "" : ", ") + std::to_string(r);
      auto m = Recv(deadline, fmt::format("'{}' (rank(s) {})", types[0], who));
      if (!m.ok() && m.status().code() == StatusCode::kTimeout) {
        // Alive (heartbeating) but not done in the bound: wedged. Fenced like a dead rank.
        for (int r : group)
          if (!out.count(r))
            NoteDead(r, fmt::format("rank {} did not answer '{}' within {} ms (wedged)", r, types[0], timeout_ms));
        return Status::Unavailable(failure->what);
      }
      if (!m.ok()) return m.status();
      auto& [id, msg] = *m;
      if (msg.header.value("epoch", int64_t{-1}) != epoch || !Contains(group, id)) continue;  // stale
      const std::string type = msg.header.value("type", "");
      if (type == "error") {
        const auto code = static_cast<StatusCode>(msg.header.value("code", static_cast<int>(StatusCode::kInternal)));
        if (code == StatusCode::kTimeout || code == StatusCode::kCancelled || code == StatusCode::kRemoteDisconnect)
          return Confirm(id, msg);
        return Status(code, fmt::format("rank {}: {}", id, msg.header.value("message", "")));
      }
      if (std::find(types.begin(), types.end(), type) == types.end()) {
        EEP_LOG_WARN("rank {}: unexpected '{}' while gathering '{}'", id, type, types[0]);
        continue;
      }
      out[id] = std::move(msg);
    }
    return out;
  }

  Status Send(int id, nlohmann::json header) {
    header["epoch"] = epoch;
    return SendControl(router, procs[static_cast<size_t>(id)].identity, {header, ""});
  }

  Status Broadcast(const nlohmann::json& header, const std::vector<int>& group) {
    for (int id : group) EEP_RETURN_IF_ERROR(Send(id, header));
    return Status::Ok();
  }

  // Serves the all-gathers of a communicator bootstrap among `group` until each sends `done`.
  // Returns the `done` messages.
  Result<std::map<int, ControlMessage>> ServeBootstrap(const std::vector<int>& group, const std::string& done,
                                                       int64_t timeout_ms) {
    while (true) {
      EEP_ASSIGN_OR_RETURN(auto msgs, Gather({"allgather", done}, group, timeout_ms));
      size_t finished = 0;
      for (auto& [id, m] : msgs) finished += m.header.value("type", "") == done;
      if (finished == msgs.size()) return msgs;
      if (finished != 0) return Status::Internal("ranks disagree during communicator set-up");
      nlohmann::json all = nlohmann::json::array();
      for (int id : group) all.push_back(msgs[id].header.value("data", ""));
      EEP_RETURN_IF_ERROR(Broadcast({{"type", "allgather_result"}, {"data", all}}, group));
    }
  }

  // ---- start-up --------------------------------------------------------------------------

  Status Start() {
    if (!opts.inject_fault.empty()) {
      EEP_ASSIGN_OR_RETURN(FaultSpec f, ParseFaultSpec(opts.inject_fault));
      if (f.rank >= opts.ep_size)
        return Status::InvalidArgument(fmt::format("--inject-fault: rank {} does not exist (--ep {})", f.rank, opts.ep_size));
    }
    EEP_ASSIGN_OR_RETURN(config, LoadModelConfig(model_dir));
    // Validate the checkpoint once here (headers only, cheap) so a bad file is one clear
    // error instead of one per rank.
    {
      EEP_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(model_dir));
      for (const auto& t : ExpectedTensors(config))
        if (!ckpt->Find(t.name)) return Status::NotFound(fmt::format("{}: checkpoint lacks tensor '{}'", model_dir, t.name));
    }
    num_moe_layers = static_cast<int64_t>(config.MoeLayers().size());
    EEP_ASSIGN_OR_RETURN(layout, MakeSlotLayout(config.num_experts, opts.num_redundant_experts, opts.ep_size));
    initial_slots_per_rank = layout.slots_per_rank;
    map = InitialPlacement(layout, num_moe_layers);
    EEP_ASSIGN_OR_RETURN(recorder, eplb::LoadRecorder::Create(static_cast<int32_t>(num_moe_layers),
                                                              static_cast<int32_t>(config.num_experts),
                                                              static_cast<int32_t>(std::max<int64_t>(1, opts.eplb_window))));
    if (opts.eplb_source != "peers" && opts.eplb_source != "backup")
      return Status::InvalidArgument("--eplb-source must be peers or backup, got '" + opts.eplb_source + "'");
    std::random_device rd;
    session = fmt::format("{}-{:08x}", getpid(), rd());
    try {
      for (auto* s : {&router, &hb}) {
        s->set(zmq::sockopt::linger, 0);
        s->bind(fmt::format("tcp://{}:*", opts.control_host));
      }
      router.set(zmq::sockopt::router_mandatory, false);
      endpoint = router.get(zmq::sockopt::last_endpoint);
      hb_endpoint = hb.get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      return Status::IOError(fmt::format("control socket on {}: {}", opts.control_host, e.what()));
    }
    EEP_RETURN_IF_ERROR(ConnectCluster());
    if (opts.publish_endpoints) EEP_RETURN_IF_ERROR(opts.publish_endpoints(endpoint, hb_endpoint));
    if (opts.take_over) return Adopt();
    for (int r = 0; r < opts.ep_size; ++r) {
      EEP_RETURN_IF_ERROR(Spawn(r, "starting"));
      members.push_back(r);
    }
    target_size = opts.ep_size;
    EEP_LOG_INFO("ep: started {} rank(s), {} physical slots per MoE layer ({} per rank), communicator {}", opts.ep_size,
                 layout.num_physical, layout.slots_per_rank, opts.communicator);
    // Hello → init happens in Recv; then serve the communicator bootstrap until all are ready.
    auto readies = ServeBootstrap(members, "ready", kStartupMs);
    if (!readies.ok()) return failure ? Status::Unavailable("rank failed during start-up: " + failure->what) : readies.status();
    NoteBackup(*readies);
    for (int id : members) procs[static_cast<size_t>(id)].state = "alive";
    EEP_LOG_INFO("ep: all {} rank(s) ready", opts.ep_size);
    return SaveState();
  }

  Status ConnectCluster() {
    keys.cluster = opts.cluster;
    if (!opts.coordinator_url.empty()) {
      EEP_ASSIGN_OR_RETURN(etcd, cluster::EtcdClient::Connect(opts.coordinator_url));
      // A fresh start replaces whatever an earlier cluster of this name left, by CAS on it.
      EEP_ASSIGN_OR_RETURN(auto cur, etcd->Get(keys.State()));
      state_rev = cur ? cur->mod_revision : 0;
      // Epochs grow over the cluster's whole life, so that node agents can refuse commands of
      // any coordinator older than the recorded epoch.
      if (cur && !opts.take_over) {
        auto j = nlohmann::json::parse(cur->value, nullptr, false);
        if (j.is_object()) epoch = std::max(epoch, j.value("epoch", int64_t{0}) + 1);
      }
    }
    if (!opts.nodes.empty() && opts.communicator == "shm")
      return Status::InvalidArgument("--ep-communicator shm cannot span hosts: use ucx (or nccl)");
    for (const RemoteNode& r : opts.nodes) EEP_RETURN_IF_ERROR(AddNode(r));
    if (etcd && !nodes.empty()) StartWatcher();
    return Status::Ok();
  }

  Status AddNode(const RemoteNode& r) {
    NodeConn n;
    n.rec = r;
    n.sock = std::make_unique<zmq::socket_t>(ctx, zmq::socket_type::dealer);
    try {
      n.sock->set(zmq::sockopt::linger, 0);
      n.sock->connect(r.endpoint);
    } catch (const zmq::error_t& e) {
      return Status::IOError(fmt::format("node {} at {}: {}", r.name, r.endpoint, e.what()));
    }
    (void)SendControl(*n.sock, "", {{{"type", "hello"}}, ""});  // makes this coordinator the one it reports to
    if (!nodes.empty()) EEP_LOG_INFO("ep: node {} joined ({} rank slot(s))", r.name, r.capacity);
    nodes.push_back(std::move(n));
    return Status::Ok();
  }

  // Writes membership, epoch and expert map to etcd, by compare-and-swap on the revision this
  // coordinator wrote last: when another coordinator wrote since, this one is deposed.
  Status SaveState() {
    if (!etcd || deposed) return Status::Ok();
    nlohmann::json ranks = nlohmann::json::array();
    for (const Proc& p : procs)
      ranks.push_back({{"id", p.id}, {"node", p.node >= 0 ? nodes[static_cast<size_t>(p.node)].rec.name : ""}, {"state", p.state},
                       {"pid", p.node >= 0 ? p.remote_pid : p.pid}});
    const nlohmann::json st{{"epoch", epoch},   {"members", members},   {"slots_per_rank", layout.slots_per_rank},
                            {"phy2log", map.phy2log()}, {"ranks", ranks}, {"target_size", target_size},
                            {"steps", step}};
    std::optional<cluster::EtcdKv> cur;
    int64_t rev = 0;
    auto applied = etcd->PutIf(keys.State(), st.dump(), state_rev, 0, &cur, &rev);
    if (!applied.ok()) {
      // etcd unreachable: serving goes on; the next change writes again.
      EEP_LOG_WARN("ep: cannot record epoch {} in etcd: {}", epoch, applied.status().ToString());
      return Status::Ok();
    }
    if (!*applied) {
      int64_t theirs = -1;
      if (cur) {
        auto j = nlohmann::json::parse(cur->value, nullptr, false);
        if (j.is_object()) theirs = j.value("epoch", int64_t{-1});
      }
      deposed = true;
      health = fmt::format("deposed: another coordinator recorded epoch {} in etcd (this one is at epoch {})", theirs, epoch);
      EEP_LOG_ERROR("ep: {}; leaving the ranks to it", health);
      return Status::Unavailable(health);
    }
    state_rev = rev;
    return Status::Ok();
  }

  // A standby coordinator taking over: the ranks recorded in etcd keep running (they are the
  // node agents' children) and reconnect here when they see the new leader record. Their
  // experts stay; the sequences of the old coordinator are dropped (its clients retry).
  Status Adopt() {
    if (!etcd) return Status::InvalidArgument("taking over needs --coordinator etcd://...");
    EEP_ASSIGN_OR_RETURN(auto kv, etcd->Get(keys.State()));
    if (!kv) return Status::NotFound(fmt::format("no cluster state at {} to take over", keys.State()));
    state_rev = kv->mod_revision;
    std::vector<std::vector<int32_t>> phy2log;
    nlohmann::json rank_records;
    try {
      const auto st = nlohmann::json::parse(kv->value);
      epoch = st.at("epoch").get<int64_t>() + 1;
      members = st.at("members").get<std::vector<int>>();
      layout.slots_per_rank = st.at("slots_per_rank").get<int64_t>();
      phy2log = st.at("phy2log").get<std::vector<std::vector<int32_t>>>();
      rank_records = st.at("ranks");
      target_size = st.value("target_size", static_cast<int>(members.size()));
    } catch (const nlohmann::json::exception& e) {
      return Status::Corruption(fmt::format("{}: malformed cluster state: {}", keys.State(), e.what()));
    }
    if (members.empty()) return Status::Unavailable(fmt::format("{}: the recorded cluster has no serving rank", keys.State()));
    layout.ep_size = static_cast<int>(members.size());
    layout.num_physical = layout.slots_per_rank * layout.ep_size;
    EEP_ASSIGN_OR_RETURN(map, ExpertMap::FromPhy2Log(phy2log, config.num_experts));
    procs.clear();
    for (const auto& r : rank_records) {
      Proc p;
      p.id = r.value("id", 0);
      p.remote_pid = r.value("pid", 0);
      const std::string node = r.value("node", std::string());
      for (size_t n = 0; n < nodes.size(); ++n)
        if (nodes[n].rec.name == node) p.node = static_cast<int>(n);
      p.state = Contains(members, p.id) ? "alive" : "left";  // a member on a lost node: declared dead below
      p.last_hb = NowSeconds();
      if (static_cast<int>(procs.size()) <= p.id) procs.resize(static_cast<size_t>(p.id) + 1);
      procs[static_cast<size_t>(p.id)] = std::move(p);
    }
    for (int id : members)
      if (id < 0 || id >= static_cast<int>(procs.size()))
        return Status::Corruption(fmt::format("{}: member {} has no rank record", keys.State(), id));
    EEP_LOG_INFO("ep: taking over epoch {}: ranks [{}], waiting for them to reconnect", epoch - 1, fmt::join(members, ","));
    // Recorded at once: from now on the old coordinator's writes and node commands are refused.
    EEP_RETURN_IF_ERROR(SaveState());
    const double deadline = NowSeconds() + std::max(5.0, 4 * HeartbeatTimeout());
    while (NowSeconds() < deadline) {
      bool all = true;
      for (int id : members) all = all && (!procs[static_cast<size_t>(id)].identity.empty() || !procs[static_cast<size_t>(id)].Live());
      if (all) break;
      // A rank may be blocked in an exchange the old coordinator left half done: unblock it.
      SendAbort(members);
      auto m = Recv(std::min(deadline, NowSeconds() + 0.1), "reconnecting ranks");
      if (!m.ok() && !failure && m.status().code() != StatusCode::kTimeout) return m.status();
    }
    for (int id : members)
      if (procs[static_cast<size_t>(id)].Live() && procs[static_cast<size_t>(id)].identity.empty())
        NoteDead(id, fmt::format("rank {} did not reconnect to the new coordinator", id));
    // Ranks the old coordinator was starting are not adopted.
    for (Proc& p : procs)
      if (p.Live() && !Contains(members, p.id)) Fence(p.id, "left");
    return ChangeMembers("takeover", "took over from the previous coordinator", -1);
  }

  // Each rank says with "ready" whether it reached the backup managers.
  void NoteBackup(const std::map<int, ControlMessage>& readies) {
    backup_ready = !opts.backup_endpoints.empty();
    for (auto& [id, m] : readies) {
      if (m.header.value("backup_ready", false)) continue;
      backup_ready = false;
      if (backup_health.empty()) backup_health = m.header.value("backup_health", "");
    }
    if (!opts.backup_endpoints.empty())
      EEP_LOG_INFO("ep: DRAM backup {}", backup_ready ? "ready on every rank" : "unavailable (" + backup_health + "); using peers");
  }

  // ---- steps -----------------------------------------------------------------------------

  int LeastLoadedMember() const {
    std::map<int, int64_t> count;
    for (int id : members) count[id] = 0;
    for (const auto& [sid, s] : seqs)
      if (count.count(s.rank)) ++count[s.rank];
    int best = members.front();
    for (int id : members)
      if (count[id] < count[best]) best = id;
    return best;
  }

  Result<std::vector<SeqOutput>> Step(const std::vector<SeqInput>& inputs) {
    if (shut_down) return Status::Unavailable("engine is shut down");
    if (health != "ok") return Status::Unavailable(health);
    EEP_RETURN_IF_ERROR(Poll());
    ++step;
    for (int attempt = 0;; ++attempt) {
      auto out = TryStep(inputs);
      if (out.ok()) {
        for (const SeqInput& in : inputs) {
          SeqInfo& s = seqs[in.seq_id];
          s.history.insert(s.history.end(), in.new_ids.begin(), in.new_ids.end());
          ++s.produced;
          s.replay = false;
        }
        for (int id : members) procs[static_cast<size_t>(id)].suspicions = 0;
        if (awaiting_resume) {
          events[*awaiting_resume].resume_seconds = NowSeconds() - switch_done_at;
          EEP_LOG_INFO("ep: epoch {}: serving again, first step after the switch took {:.1f} ms", events[*awaiting_resume].epoch,
                       events[*awaiting_resume].resume_seconds * 1000);
          awaiting_resume.reset();
        }
        if (opts.eplb_interval > 0 && step % opts.eplb_interval == 0 && num_moe_layers > 0 && !pending) {
          Status st = Rebalance();
          if (!st.ok()) EEP_LOG_WARN("eplb: step {}: rebalance abandoned: {}", step, st.ToString());
          if (health != "ok") return Status::Unavailable(health);
        }
        return out;
      }
      if (!failure) return out.status();
      if (attempt >= opts.max_recovery_attempts) {
        health = "giving up after repeated failures: " + failure->what;
        return Status::Unavailable(health);
      }
      EEP_RETURN_IF_ERROR(Recover(step));
    }
  }

  Result<std::vector<SeqOutput>> TryStep(const std::vector<SeqInput>& inputs) {
    op_started = NowSeconds();
    reported_silent.clear();
    std::map<int, nlohmann::json> per_rank, release;
    for (int id : members) {
      per_rank[id] = nlohmann::json::array();
      release[id] = nlohmann::json::array();
    }
    for (int64_t sid : to_release) {
      auto it = seqs.find(sid);
      if (it == seqs.end()) continue;
      if (release.count(it->second.rank)) release[it->second.rank].push_back(sid);
      seqs.erase(it);
    }
    to_release.clear();
    for (const SeqInput& in : inputs) {
      auto it = seqs.find(in.seq_id);
      if (it == seqs.end()) it = seqs.emplace(in.seq_id, SeqInfo{LeastLoadedMember(), {}, 0, false}).first;
      SeqInfo& s = it->second;
      if (!Contains(members, s.rank)) {
        // Its rank failed or left: resume here from everything it has seen.
        s.rank = LeastLoadedMember();
        s.replay = !s.history.empty();
      }
      nlohmann::json j{{"seq", in.seq_id}, {"ids", in.new_ids}, {"logits", in.return_logits}, {"all_logits", in.all_logits},
                       {"temperature", in.sampling.temperature}, {"top_p", in.sampling.top_p}, {"top_k", in.sampling.top_k},
                       {"seed", in.sampling.seed}};
      if (s.replay) {
        std::vector<int64_t> ids = s.history;
        ids.insert(ids.end(), in.new_ids.begin(), in.new_ids.end());
        j["ids"] = ids;
        j["replay"] = true;
        j["logits_skip"] = s.history.size();
        // Greedy sampling draws nothing; otherwise one draw per sampled token.
        j["rng_skip"] = in.sampling.temperature > 0 ? s.produced : 0;
      }
      per_rank[s.rank].push_back(std::move(j));
    }
    const bool switching = pending != nullptr && pending->ready;
    for (int id : members)
      EEP_RETURN_IF_ERROR(Send(id, {{"type", "step"}, {"step", step}, {"seqs", per_rank[id]}, {"release", release[id]},
                                    {"switch", switching}}));
    EEP_ASSIGN_OR_RETURN(auto replies, Gather({"step_done"}, members, opts.step_timeout_ms));
    if (switching) {
      // Ranks switched before computing this step; the stall is the slowest rank's wait.
      RebalanceStats stats = std::move(pending->stats);
      for (const auto& [id, rep] : replies) {
        if (!rep.header.contains("eplb")) continue;
        stats.bytes += rep.header["eplb"].value("bytes_received", int64_t{0});
        stats.stall_seconds = std::max(stats.stall_seconds, rep.header["eplb"].value("stall_s", 0.0));
      }
      stats.seconds = NowSeconds() - pending->t0;
      map = std::move(pending->next);
      pending.reset();
      Record(std::move(stats));
      EEP_RETURN_IF_ERROR(SaveState());
    } else if (pending) {
      bool ready = true;
      for (const auto& [id, rep] : replies) ready = ready && rep.header.value("eplb_ready", false);
      pending->ready = ready;
    }
    std::vector<SeqOutput> outputs;
    std::vector<int64_t> load(static_cast<size_t>(num_moe_layers * config.num_experts), 0);
    for (auto& [id, rep] : replies) {
      size_t offset = 0;
      for (const auto& o : rep.header["outputs"]) {
        SeqOutput out;
        out.seq_id = o["seq"].get<int64_t>();
        out.token = o["token"].get<int64_t>();
        const size_t n = o.value("num_logits", size_t{0});
        if (n > 0) {
          if (offset + n * sizeof(float) > rep.payload.size()) return Status::Corruption("step reply: short logits payload");
          out.logits.resize(n);
          std::memcpy(out.logits.data(), rep.payload.data() + offset, n * sizeof(float));
          offset += n * sizeof(float);
        }
        outputs.push_back(std::move(out));
      }
      if (auto nz = rep.header.find("load_nz"); nz != rep.header.end()) {
        for (size_t j = 0; j + 1 < nz->size(); j += 2) {
          const auto i = (*nz)[j].get<size_t>();
          if (i < load.size()) load[i] += (*nz)[j + 1].get<int64_t>();
        }
      } else if (auto l = rep.header.find("load"); l != rep.header.end()) {
        for (size_t i = 0; i < l->size() && i < load.size(); ++i) load[i] += (*l)[i].get<int64_t>();
      }
    }
    for (int64_t ml = 0; ml < num_moe_layers; ++ml)
      recorder->RecordCounts(static_cast<int32_t>(ml),
                             std::span<const int64_t>(load.data() + ml * config.num_experts, static_cast<size_t>(config.num_experts)));
    recorder->AdvanceStep();
    // Keep the caller's order.
    std::map<int64_t, size_t> pos;
    for (size_t i = 0; i < inputs.size(); ++i) pos[inputs[i].seq_id] = i;
    std::sort(outputs.begin(), outputs.end(), [&](const SeqOutput& a, const SeqOutput& b) { return pos[a.seq_id] < pos[b.seq_id]; });
    return outputs;
  }

  // ---- membership changes ----------------------------------------------------------------

  // Leaving ranks that have exited are reaped; one still running past its grace is killed.
  void ReapLeavers() {
    std::erase_if(leavers, [](const Leaver& l) {
      int status = 0;
      if (waitpid(l.pid, &status, WNOHANG) != 0) return true;  // reaped (or not our child any more)
      if (NowSeconds() < l.deadline) return false;
      KillAndReap(l.pid);
      return true;
    });
  }

  Status Poll() {
    if (shut_down) return Status::Unavailable("engine is shut down");
    if (health != "ok") return Status::Unavailable(health);
    op_started = NowSeconds();
    ReapLeavers();
    // Take in what arrived while idle (hellos, joiners' readiness, heartbeats, exits).
    while (true) {
      auto m = Recv(NowSeconds(), "nothing");
      if (m.ok()) {
        EEP_LOG_DEBUG("ep: rank {}: '{}' while idle, ignored", m->first, m->second.header.value("type", ""));
        continue;
      }
      if (failure) {
        EEP_RETURN_IF_ERROR(Recover(-1));
        continue;
      }
      break;
    }
    bool all_prefetched = true;
    for (const Proc& p : procs) all_prefetched = all_prefetched && (!p.Live() || !p.prefetching || p.prefetched);
    if (!joining.empty()) {
      bool all_ready = true;
      for (int id : joining) all_ready = all_ready && procs[static_cast<size_t>(id)].ready;
      if (all_ready && backup_ready && !prefetch_plan) {
        EEP_RETURN_IF_ERROR(StartPrefetch());
      } else if (all_ready && (!prefetch_plan || all_prefetched)) {
        EEP_RETURN_IF_ERROR(ChangeMembers("scale-up", "scale to " + std::to_string(target_size), -1));
      }
    } else if (!leaving.empty()) {
      // The remaining ranks read the leavers' experts from the DRAM backup first, while serving.
      if (backup_ready && !prefetch_plan) {
        EEP_RETURN_IF_ERROR(StartPrefetch());
      } else if (!prefetch_plan || all_prefetched) {
        EEP_RETURN_IF_ERROR(ChangeMembers("scale-down", "scale to " + std::to_string(target_size), -1));
      }
    }
    return Status::Ok();
  }

  Status Recover(int64_t rollback_step) { return ChangeMembers("failover", "", rollback_step); }

  Status Scale(int n, bool wait) {
    if (shut_down) return Status::Unavailable("engine is shut down");
    if (n < 1) return Status::InvalidArgument(fmt::format("ep_size must be >= 1, got {}", n));
    const bool in_progress = !joining.empty() || !leaving.empty();
    if (in_progress && n != target_size)
      return Status::Unavailable(fmt::format("a scaling step to {} rank(s) is in progress", target_size));
    target_size = n;
    const int cur = static_cast<int>(members.size());
    if (in_progress) {
      // Already on its way: only wait for it (below) if asked.
    } else if (n > cur) {
      if (Remote()) CheckNodes(true);  // hosts that joined since the last look
      for (int i = 0; i < n - cur; ++i) {
        const int id = static_cast<int>(procs.size());
        EEP_RETURN_IF_ERROR(Spawn(id, "joining"));
        joining.push_back(id);
      }
      EEP_LOG_INFO("ep: scaling {} → {}: starting rank(s) {}", cur, n, fmt::join(joining, ","));
    } else if (n < cur) {
      leaving.assign(members.end() - (cur - n), members.end());
      for (int id : leaving) procs[static_cast<size_t>(id)].state = "draining";
      EEP_LOG_INFO("ep: scaling {} → {}: draining rank(s) {}", cur, n, fmt::join(leaving, ","));
    }
    if (!wait) return Status::Ok();
    const double deadline = NowSeconds() + kStartupMs / 1000.0;
    while (!joining.empty() || !leaving.empty()) {
      EEP_RETURN_IF_ERROR(Poll());
      if (joining.empty() && leaving.empty()) break;
      if (NowSeconds() > deadline) return Status::Timeout("new ranks did not load in time");
      auto m = Recv(std::min(deadline, NowSeconds() + 0.05), "joining ranks");
      if (!m.ok() && !failure && m.status().code() != StatusCode::kTimeout) return m.status();
    }
    return Status::Ok();
  }

  struct Plan {
    int64_t slots_per_rank = 0;
    std::vector<std::vector<int32_t>> next;
    nlohmann::json items = nlohmann::json::array();
    int64_t moved = 0;
  };

  bool Holds(int id, int64_t l, int32_t e) const {
    const Proc& p = procs[static_cast<size_t>(id)];
    if (std::find(p.cached.begin(), p.cached.end(), std::make_pair(l, e)) != p.cached.end()) return true;
    const auto& h = p.holdings;
    if (l >= static_cast<int64_t>(h.size())) return false;
    const auto& row = h[static_cast<size_t>(l)];
    return std::find(row.begin(), row.end(), e) != row.end();
  }

  // EPLB over the new members' slots, starting from what they hold, so that experts move as
  // little as possible; then a source for every slot that changes.
  Result<Plan> PlanMembers(const std::vector<int>& next_members, const std::vector<int>& participants, int64_t S,
                           bool prefer_backup, bool restore_only,
                           const std::vector<std::vector<int32_t>>* forced_next = nullptr) {
    Plan plan;
    plan.slots_per_rank = S;
    const int64_t P = S * static_cast<int64_t>(next_members.size());
    std::vector<int32_t> carried(static_cast<size_t>(num_moe_layers * P), -1);
    for (size_t p = 0; p < next_members.size(); ++p) {
      const auto& h = procs[static_cast<size_t>(next_members[p])].holdings;
      for (int64_t l = 0; l < num_moe_layers && l < static_cast<int64_t>(h.size()); ++l)
        for (int64_t i = 0; i < S && i < static_cast<int64_t>(h[static_cast<size_t>(l)].size()); ++i)
          carried[static_cast<size_t>(l * P + static_cast<int64_t>(p) * S + i)] = h[static_cast<size_t>(l)][static_cast<size_t>(i)];
    }
    eplb::LoadMatrix weight = recorder->Snapshot();
    bool any = false;
    for (float v : weight.values) any |= v > 0;
    if (!any) std::fill(weight.values.begin(), weight.values.end(), 1.0f);  // no history: uniform
    eplb::Topology topo;
    topo.num_replicas = static_cast<int32_t>(P);
    topo.num_groups = config.arch == Arch::kDeepseekV3 && config.n_group > 0 && config.num_experts % config.n_group == 0
                          ? static_cast<int32_t>(config.n_group) : 1;
    topo.num_nodes = 1;
    topo.num_gpus = static_cast<int32_t>(next_members.size());
    eplb::MinMoveOptions mo;
    // A failover only restores what is missing (fewest moves, shortest interruption); the
    // periodic EPLB balances later. Scaling re-spreads the load over the new ranks.
    mo.tolerance = restore_only ? 0.999 : 0.05;
    eplb::MinMoveResult res;
    if (forced_next != nullptr) {
      for (const auto& row : *forced_next) res.plan.phy2log.insert(res.plan.phy2log.end(), row.begin(), row.end());
    } else {
      EEP_ASSIGN_OR_RETURN(res, eplb::RebalanceMinMove(weight, topo, carried, mo));
    }
    std::map<int, int64_t> sends;
    for (int64_t l = 0; l < num_moe_layers; ++l) {
      plan.next.emplace_back(res.plan.phy2log.begin() + l * P, res.plan.phy2log.begin() + (l + 1) * P);
      auto& row = plan.next.back();
      if (restore_only) {
        // Only orphans move: an empty slot the planner filled with a further copy stays empty.
        std::set<int32_t> present(carried.begin() + l * P, carried.begin() + (l + 1) * P);
        for (int64_t s = 0; s < P; ++s) {
          int32_t& e = row[static_cast<size_t>(s)];
          if (e < 0 || e == carried[static_cast<size_t>(l * P + s)]) continue;
          if (present.count(e) && carried[static_cast<size_t>(l * P + s)] < 0) e = -1;
          else present.insert(e);
        }
      }
      for (int64_t s = 0; s < P; ++s) {
        const int32_t e = row[static_cast<size_t>(s)];
        if (e < 0 || e == carried[static_cast<size_t>(l * P + s)]) continue;
        const int dst = next_members[static_cast<size_t>(s / S)];
        int src = kFromDisk;
        if (Holds(dst, l, e)) {
          src = dst;
        } else {
          for (int id : participants)
            if (Holds(id, l, e) && (src < 0 || sends[id] < sends[src])) src = id;
          if ((src < 0 || prefer_backup) && backup_ready) src = kFromBackup;
          if (src >= 0) ++sends[src];
        }
        plan.items.push_back({l, s, e, src});
        ++plan.moved;
      }
    }
    return plan;
  }

  // One membership change: a failover (dead ranks out), scale-up (joiners in) or scale-down
  // (leavers out). Retries from the start when another rank fails on the way.
  Status ChangeMembers(const std::string& kind, const std::string& reason, int64_t rollback_step) {
    MembershipEvent ev;
    ev.kind = kind;
    ev.reason = reason;
    const double t_start = NowSeconds();
    if (failure) {
      ev.detect_seconds = std::max(0.0, failure->at - op_started);
      ev.reason = failure->what;
    }
    for (int attempt = 1;; ++attempt) {
      ev.attempts = attempt;
      if (attempt > opts.max_recovery_attempts) {
        health = fmt::format("{} failed after {} attempts", kind, attempt - 1);
        return Status::Unavailable(health);
      }
      if (failure) {
        for (int id : failure->dead) {
          const bool was_member = Contains(members, id) || Contains(leaving, id);
          Fence(id, "dead");
          if (was_member && !Contains(ev.dead_ranks, id)) ev.dead_ranks.push_back(id);
        }
        if (attempt > 1 && !failure->dead.empty()) EEP_LOG_WARN("ep: {} during the switch; starting it again", failure->what);
        failure.reset();
      }
      std::vector<int> participants = members;
      for (int id : joining) {
        const Proc& p = procs[static_cast<size_t>(id)];
        if (p.ready && (!p.prefetching || p.prefetched)) participants.push_back(id);
      }
      std::vector<int> next_members;
      for (int id : participants)
        if (!Contains(leaving, id)) next_members.push_back(id);
      if (next_members.empty()) {
        health = "no live rank left: " + (ev.reason.empty() ? kind : ev.reason);
        return Status::Unavailable(health);
      }
      ++epoch;
      pending.reset();
      SendAbort(participants);
      const double t_hold = NowSeconds();
      Status st = Hold(participants, rollback_step, kind == "takeover");
      if (!st.ok()) {
        if (failure) continue;
        return st;
      }
      ev.abort_seconds = NowSeconds() - t_hold;
      const double t_plan = NowSeconds();
      const int64_t E = config.num_experts;
      const bool keep_layout = kind == "failover" || kind == "takeover";
      EEP_ASSIGN_OR_RETURN(const int64_t S, SlotsPerRank(static_cast<int>(next_members.size()), keep_layout));
      if (opts.expert_slot_headroom >= 0 && S > initial_slots_per_rank + opts.expert_slot_headroom) {
        health = fmt::format("{} live rank(s) need {} expert slots each to hold all {} experts, but ranks have {} "
                             "(--expert-slot-headroom {})",
                             next_members.size(), S, E, initial_slots_per_rank + opts.expert_slot_headroom,
                             opts.expert_slot_headroom);
        return Status::ResourceExhausted(health);
      }
      // A scale-up whose new ranks prefetched their experts follows the plan they prefetched for.
      const bool use_prefetch = prefetch_plan && ev.dead_ranks.empty() && prefetch_plan->members == next_members &&
                                prefetch_plan->slots_per_rank == S;
      EEP_ASSIGN_OR_RETURN(Plan plan, PlanMembers(next_members, participants, S,
                                                  kind != "failover" && opts.eplb_source == "backup",
                                                  keep_layout, use_prefetch ? &prefetch_plan->next : nullptr));
      ev.plan_seconds = NowSeconds() - t_plan;
      const double t_restore = NowSeconds();
      const bool same = next_members == participants;
      st = BuildComm(participants, "ex", same && opts.eplb_async);
      const double t_staging = NowSeconds();
      if (st.ok()) st = Broadcast({{"type", "stage"}, {"comm", "ex"}, {"comm_members", participants}, {"members", next_members},
                                   {"slots_per_rank", S}, {"items", plan.items}},
                                  participants);
      std::map<int, ControlMessage> staged;
      if (st.ok()) {
        auto g = Gather({"staged"}, participants, opts.step_timeout_ms);
        if (g.ok()) staged = std::move(*g);
        else st = g.status();
      }
      const double t_staged = NowSeconds();
      if (st.ok() && !same) st = BuildComm(next_members, "serve", opts.eplb_async);
      const double t_commit = NowSeconds();
      if (st.ok())
        st = Broadcast({{"type", "commit"}, {"comm", same ? "ex" : "serve"}, {"members", next_members}, {"slots_per_rank", S},
                        {"phy2log", plan.next}},
                       participants);
      if (st.ok()) st = Gather({"committed"}, next_members, opts.step_timeout_ms).status();
      if (!st.ok()) {
        if (failure) continue;
        return st;
      }
      EEP_LOG_INFO("ep: {} restore phases: exchange communicator {:.1f} ms, stage {:.1f} ms, serving communicator "
                   "{:.1f} ms, commit {:.1f} ms",
                   kind, (t_staging - t_restore) * 1e3, (t_staged - t_staging) * 1e3, (t_commit - t_staged) * 1e3,
                   (NowSeconds() - t_commit) * 1e3);
      // Switched.
      for (int id : participants) {
        Proc& p = procs[static_cast<size_t>(id)];
        if (Contains(next_members, id)) {
          p.state = "alive";
          p.ready = false;
          continue;
        }
        // A leaving rank exits after "bye" on its own; it is reaped later (ReapLeavers), off the
        // blocking window: a CUDA rank's exit (context teardown, unpinning) takes ~0.25 s.
        if (p.node < 0 && p.pid > 0) {
          leavers.push_back({p.pid, NowSeconds() + kLeaverGraceSeconds});
          p.pid = -1;
        }
        Fence(id, "left");
      }
      std::erase_if(joining, [&](int id) { return Contains(participants, id); });
      leaving.clear();
      int64_t requeued = 0;
      for (const auto& [sid, s] : seqs) requeued += !Contains(next_members, s.rank);
      members = next_members;
      layout.ep_size = static_cast<int>(members.size());
      layout.slots_per_rank = S;
      layout.num_physical = S * static_cast<int64_t>(members.size());
      EEP_ASSIGN_OR_RETURN(map, ExpertMap::FromPhy2Log(plan.next, config.num_experts));
      std::vector<nlohmann::json> reports;
      for (const auto& [id, m] : staged) reports.push_back(m.header["restore"]);
      // Experts prefetched in the background count too (not in the blocking window).
      if (use_prefetch)
        for (int id : participants)
          if (procs[static_cast<size_t>(id)].prefetched) reports.push_back(procs[static_cast<size_t>(id)].prefetch_report);
      for (const auto& r : reports) {
        ev.experts_from_peers += r.value("experts_peers", int64_t{0});
        ev.experts_from_backup += r.value("experts_backup", int64_t{0});
        ev.experts_from_disk += r.value("experts_disk", int64_t{0});
        ev.bytes_from_peers += r.value("bytes_peers", int64_t{0});
        ev.bytes_from_backup += r.value("bytes_backup", int64_t{0});
        ev.bytes_from_disk += r.value("bytes_disk", int64_t{0});
      }
      prefetch_plan.reset();
      for (Proc& p : procs) {
        p.prefetching = p.prefetched = false;
        p.prefetch_report = nlohmann::json::object();
      }
      ev.restore_seconds = NowSeconds() - t_restore;
      // For a failover the window starts at the failure (detection included): no token came out.
      ev.blocking_seconds = NowSeconds() - t_start + ev.detect_seconds;
      ev.epoch = epoch;
      ev.members = members;
      ev.requeued_seqs = requeued;
      LogEvent(ev, plan.moved);
      events.push_back(ev);
      // With sequences in flight, the next step tells how long serving took to resume.
      if (!seqs.empty()) awaiting_resume = events.size() - 1;
      switch_done_at = NowSeconds();
      return SaveState();
    }
  }

  // Expert slots per rank over `n` serving ranks: a failover keeps the current count unless the
  // survivors need more to hold every expert; scaling re-spreads the logical + redundant slots.
  Result<int64_t> SlotsPerRank(int n, bool failover) const {
    const int64_t E = config.num_experts;
    int64_t S = layout.slots_per_rank;
    if (!failover) {
      EEP_ASSIGN_OR_RETURN(auto l, MakeSlotLayout(E, opts.num_redundant_experts, n));
      S = l.slots_per_rank;
    }
    return std::max(S, (E + n - 1) / n);
  }

  // Plans the scaling step now (from the placement in force) and has every rank of the next
  // membership read the experts it will hold but does not hold yet from the DRAM backup in the
  // background (joining ranks while they wait, serving ranks between steps); the switch waits
  // for them and then moves experts only locally.
  Status StartPrefetch() {
    std::vector<int> next_members;
    for (int id : members)
      if (!Contains(leaving, id)) next_members.push_back(id);
    next_members.insert(next_members.end(), joining.begin(), joining.end());
    EEP_ASSIGN_OR_RETURN(const int64_t S, SlotsPerRank(static_cast<int>(next_members.size()), false));
    // What the serving ranks hold, as a hold would report it.
    for (size_t p = 0; p < members.size(); ++p) {
      Proc& proc = procs[static_cast<size_t>(members[p])];
      proc.holdings.assign(static_cast<size_t>(num_moe_layers), {});
      proc.cached.clear();
      for (int64_t ml = 0; ml < num_moe_layers; ++ml)
        for (int64_t i = 0; i < layout.slots_per_rank; ++i)
          proc.holdings[static_cast<size_t>(ml)].push_back(map.LogicalAt(ml, static_cast<int64_t>(p) * layout.slots_per_rank + i));
    }
    for (int id : joining) {
      procs[static_cast<size_t>(id)].holdings.clear();
      procs[static_cast<size_t>(id)].cached.clear();
    }
    EEP_ASSIGN_OR_RETURN(Plan plan, PlanMembers(next_members, members, S, true, false));
    prefetch_plan = PrefetchPlan{next_members, S, plan.next};
    std::vector<int> fetching;
    for (size_t p = 0; p < next_members.size(); ++p) {
      std::set<std::pair<int64_t, int32_t>> want;
      for (int64_t ml = 0; ml < num_moe_layers; ++ml)
        for (int64_t i = 0; i < S; ++i) {
          const int32_t e = plan.next[static_cast<size_t>(ml)][static_cast<size_t>(static_cast<int64_t>(p) * S + i)];
          if (e >= 0 && !Holds(next_members[p], ml, e)) want.emplace(ml, e);
        }
      if (want.empty()) continue;
      nlohmann::json experts = nlohmann::json::array();
      for (const auto& [ml, e] : want) experts.push_back({ml, e});
      Proc& proc = procs[static_cast<size_t>(next_members[p])];
      proc.prefetching = true;
      fetching.push_back(proc.id);
      EEP_RETURN_IF_ERROR(Send(proc.id, {{"type", "prefetch"}, {"experts", experts}}));
    }
    EEP_LOG_INFO("ep: {} planned; rank(s) [{}] prefetch their new experts from the DRAM backup while serving goes on",
                 joining.empty() ? "scale-down" : "scale-up", fmt::join(fetching, ","));
    return Status::Ok();
  }

  Status Hold(const std::vector<int>& group, int64_t rollback_step, bool drop_seqs = false) {
    EEP_RETURN_IF_ERROR(Broadcast({{"type", "hold"}, {"rollback_step", rollback_step}, {"drop_seqs", drop_seqs}}, group));
    EEP_ASSIGN_OR_RETURN(auto replies, Gather({"holding"}, group, opts.step_timeout_ms));
    for (auto& [id, m] : replies) {
      Proc& p = procs[static_cast<size_t>(id)];
      p.holdings = m.header["holdings"].get<std::vector<std::vector<int32_t>>>();
      p.cached.clear();
      for (const auto& c : m.header.value("cached", nlohmann::json::array()))
        p.cached.emplace_back(c[0].get<int64_t>(), c[1].get<int32_t>());
    }
    return Status::Ok();
  }

  Status BuildComm(const std::vector<int>& group, const std::string& tag, bool async) {
    EEP_RETURN_IF_ERROR(Broadcast({{"type", "comm"}, {"members", group}, {"tag", tag}, {"async", async}}, group));
    return ServeBootstrap(group, "comm_ready", opts.step_timeout_ms).status();
  }

  void LogEvent(const MembershipEvent& ev, int64_t moved) {
    const int64_t bytes = ev.bytes_from_peers + ev.bytes_from_backup + ev.bytes_from_disk;
    EEP_LOG_INFO(
        "ep: {} → epoch {}, ranks [{}]{}{}: detect {:.1f} ms | abort {:.1f} ms | plan {:.1f} ms | restore {:.1f} ms: {} slot(s) changed, "
        "{} ({} expert(s) from peers {}, {} from DRAM backup {}, {} from disk {}), {:.2f} GB/s | blocked {:.1f} ms | "
        "{} sequence(s) resumed elsewhere{}",
        ev.kind, ev.epoch, fmt::join(ev.members, ","), ev.dead_ranks.empty() ? "" : fmt::format(", dead [{}]", fmt::join(ev.dead_ranks, ",")),
        ev.reason.empty() ? "" : " (" + ev.reason + ")", ev.detect_seconds * 1000, ev.abort_seconds * 1000, ev.plan_seconds * 1000,
        ev.restore_seconds * 1000, moved, FormatBytes(bytes), ev.experts_from_peers, FormatBytes(ev.bytes_from_peers),
        ev.experts_from_backup, FormatBytes(ev.bytes_from_backup), ev.experts_from_disk, FormatBytes(ev.bytes_from_disk),
        ev.restore_seconds > 0 ? static_cast<double>(bytes) / ev.restore_seconds / 1e9 : 0.0, ev.blocking_seconds * 1000,
        ev.requeued_seqs, ev.attempts > 1 ? fmt::format(", {} attempts", ev.attempts) : "");
  }

  // ---- EPLB ------------------------------------------------------------------------------

  Status Rebalance() {
    const double t0 = NowSeconds();
    eplb::LoadMatrix weight = recorder->Snapshot();
    // The planner needs some load; an idle window keeps the current placement.
    bool any = false;
    for (float v : weight.values) any |= v > 0;
    if (!any) return Status::Ok();
    eplb::Topology topo;
    topo.num_replicas = static_cast<int32_t>(layout.num_physical);
    topo.num_groups = config.arch == Arch::kDeepseekV3 ? static_cast<int32_t>(config.n_group) : 1;
    topo.num_nodes = 1;
    topo.num_gpus = layout.ep_size;
    std::vector<int32_t> old_flat;
    for (const auto& row : map.phy2log()) old_flat.insert(old_flat.end(), row.begin(), row.end());
    std::vector<int32_t> new_flat;
    if (opts.eplb_policy == "deepseek") {
      EEP_ASSIGN_OR_RETURN(auto plan, eplb::RebalanceExperts(weight, topo));
      new_flat = plan.phy2log;
    } else {
      EEP_ASSIGN_OR_RETURN(auto res, eplb::RebalanceMinMove(weight, topo, old_flat));
      new_flat = res.plan.phy2log;
    }
    std::vector<std::vector<int32_t>> new_rows(static_cast<size_t>(num_moe_layers));
    const int64_t P = layout.num_physical;
    for (int64_t l = 0; l < num_moe_layers; ++l)
      new_rows[static_cast<size_t>(l)].assign(new_flat.begin() + l * P, new_flat.begin() + (l + 1) * P);
    return Apply(new_rows, opts.eplb_async, t0).status();
  }

  // Turns a new placement into a transfer plan, [moe_layer, slot, expert, source rank id] for
  // every slot that changes (source: the destination rank itself when it already holds the
  // expert, else the holder with the fewest sends so far, or the DRAM backup), and executes
  // it. A rank failure on the way abandons the rebalance and recovers.
  Result<RebalanceStats> Apply(const std::vector<std::vector<int32_t>>& new_rows, bool async, double t0) {
    if (health != "ok") return Status::Unavailable(health);
    if (pending) return Status::Unavailable("a rebalance is already in flight");
    nlohmann::json items = nlohmann::json::array();
    std::map<int, int64_t> sends_by_rank;
    RebalanceStats stats;
    stats.async = async;
    if (static_cast<int64_t>(new_rows.size()) != num_moe_layers)
      return Status::InvalidArgument(fmt::format("placement has {} layers, the model {}", new_rows.size(), num_moe_layers));
    auto rank_of = [&](int64_t slot) { return members[static_cast<size_t>(layout.RankOfSlot(slot))]; };
    for (int64_t l = 0; l < num_moe_layers; ++l) {
      const auto& row = new_rows[static_cast<size_t>(l)];
      if (static_cast<int64_t>(row.size()) != layout.num_physical)
        return Status::InvalidArgument(fmt::format("placement layer {} has {} slots, expected {}", l, row.size(), layout.num_physical));
      for (int64_t s = 0; s < layout.num_physical; ++s) {
        const int32_t e = row[static_cast<size_t>(s)];
        if (e < 0 || e == map.LogicalAt(l, s)) continue;
        const int dst = rank_of(s);
        int src = kFromDisk;
        for (int32_t old_slot : map.Replicas(l, e))
          if (rank_of(old_slot) == dst) src = dst;
        if (src < 0 && opts.eplb_source == "backup" && backup_ready) {
          src = kFromBackup;
          ++stats.from_backup;
        } else if (src < 0) {
          for (int32_t old_slot : map.Replicas(l, e)) {
            const int r = rank_of(old_slot);
            if (src < 0 || sends_by_rank[r] < sends_by_rank[src]) src = r;
          }
          ++sends_by_rank[src];
          if (!Contains(stats.source_ranks, src)) stats.source_ranks.push_back(src);
        }
        items.push_back({l, s, e, src});
        ++stats.moved_experts;
      }
    }
    std::sort(stats.source_ranks.begin(), stats.source_ranks.end());
    if (items.empty()) return stats;
    EEP_ASSIGN_OR_RETURN(ExpertMap next, ExpertMap::FromPhy2Log(new_rows, layout.num_logical));
    op_started = NowSeconds();
    auto recover = [&](Status st) -> Status {
      if (!failure) return st;
      const std::string what = failure->what;
      EEP_RETURN_IF_ERROR(Recover(-1));
      return Status::Unavailable("rebalance abandoned: " + what);
    };
    if (async) {
      Status st = Broadcast({{"type", "eplb_prepare"}, {"phy2log", new_rows}, {"items", items}}, members);
      if (st.ok()) st = Gather({"eplb_started"}, members, opts.step_timeout_ms).status();
      if (!st.ok()) return recover(st);
      pending = std::make_unique<PendingSwitch>(PendingSwitch{std::move(next), std::move(stats), t0, false});
      return pending->stats;
    }
    Status st = Broadcast({{"type", "eplb"}, {"phy2log", new_rows}, {"items", items}}, members);
    std::map<int, ControlMessage> replies;
    if (st.ok()) {
      auto g = Gather({"eplb_done"}, members, opts.step_timeout_ms);
      if (g.ok()) replies = std::move(*g);
      else st = g.status();
    }
    if (!st.ok()) return recover(st);
    for (const auto& [id, r] : replies) stats.bytes += r.header.value("bytes_received", int64_t{0});
    map = std::move(next);
    stats.seconds = NowSeconds() - t0;
    stats.stall_seconds = stats.seconds;
    Record(stats);
    EEP_RETURN_IF_ERROR(SaveState());
    return stats;
  }

  void Record(RebalanceStats stats) {
    stats.step = step;
    EEP_LOG_INFO(
        "eplb: step {}: moved {} expert(s), {:.2f} MiB from peer rank(s) [{}], {} from DRAM backup, in {:.1f} ms ({}, "
        "stall {:.2f} ms)",
        step, stats.moved_experts, static_cast<double>(stats.bytes) / (1 << 20), fmt::join(stats.source_ranks, ","),
        stats.from_backup, stats.seconds * 1000, stats.async ? "async" : "sync", stats.stall_seconds * 1000);
    rebalances.push_back(std::move(stats));
  }

  Result<double> BenchRing(int64_t bytes, int rounds) {
    EEP_RETURN_IF_ERROR(Broadcast({{"type", "bench_ring"}, {"bytes", bytes}, {"rounds", rounds}}, members));
    EEP_ASSIGN_OR_RETURN(auto replies, Gather({"bench_done"}, members, opts.step_timeout_ms));
    double worst = 0;
    for (const auto& [id, r] : replies) worst = std::max(worst, r.header.value("seconds", 0.0));
    return worst / std::max(1, rounds);
  }

  void Shutdown() {
    if (shut_down) return;
    shut_down = true;
    for (const Leaver& l : leavers) KillAndReap(l.pid);
    leavers.clear();
    if (deposed) return;  // the ranks belong to the coordinator that took over
    for (const Proc& p : procs)
      if (p.Live() && !p.identity.empty()) (void)SendControl(router, p.identity, {{{"type", "shutdown"}}, ""});
    // Give ranks a moment to exit cleanly, then make sure.
    constexpr int64_t kExitGraceMs = 2000;
    for (Proc& p : procs) {
      if (p.pid > 0) {
        int status;
        if (!WaitChild(p.pid, kExitGraceMs, &status)) {
          kill(p.pid, SIGKILL);
          waitpid(p.pid, &status, 0);
        }
        p.pid = -1;
      }
      if (p.pidfd >= 0) close(p.pidfd);
      p.pidfd = -1;
    }
  }

  ClusterInfo Cluster() const {
    ClusterInfo c;
    c.epoch = epoch;
    c.steps = step;
    c.map_version = static_cast<int64_t>(rebalances.size() + events.size());
    c.backup_ready = backup_ready;
    c.backup_health = backup_health;
    c.health = health;
    c.target_size = target_size;
    std::map<int, int64_t> count;
    for (const auto& [sid, s] : seqs) ++count[s.rank];
    for (const Proc& p : procs) {
      RankInfo info;
      info.rank = p.id;
      info.pid = p.pid > 0 ? p.pid : p.remote_pid;
      info.node = p.node >= 0 ? nodes[static_cast<size_t>(p.node)].rec.name : "";
      info.state = p.state == "starting" ? "joining" : p.state;
      info.num_seqs = Contains(members, p.id) ? count[p.id] : 0;
      c.ranks.push_back(info);
    }
    c.events = events;
    return c;
  }
};

EpEngine::EpEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EpEngine::~EpEngine() = default;

Result<std::unique_ptr<EpEngine>> EpEngine::Start(const std::string& model_dir, const EpOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->opts = options;
  impl->model_dir = model_dir;
  Status st = impl->Start();
  if (!st.ok()) {
    impl->Shutdown();
    return st;
  }
  return std::unique_ptr<EpEngine>(new EpEngine(std::move(impl)));
}

Result<std::vector<SeqOutput>> EpEngine::Step(const std::vector<SeqInput>& inputs) { return impl_->Step(inputs); }
void EpEngine::Release(int64_t seq_id) { impl_->to_release.push_back(seq_id); }
Status EpEngine::Poll() { return impl_->Poll(); }
Status EpEngine::Scale(int ep_size, bool wait) { return impl_->Scale(ep_size, wait); }
void EpEngine::Shutdown() { impl_->Shutdown(); }
const ModelConfig& EpEngine::config() const { return impl_->config; }
const ExpertMap& EpEngine::expert_map() const { return impl_->map; }
const SlotLayout& EpEngine::layout() const { return impl_->layout; }
const std::vector<RebalanceStats>& EpEngine::rebalances() const { return impl_->rebalances; }
Result<RebalanceStats> EpEngine::ApplyPlacement(const std::vector<std::vector<int32_t>>& phy2log, bool async) {
  return impl_->Apply(phy2log, async, NowSeconds());
}
Result<double> EpEngine::BenchRing(int64_t bytes, int rounds) { return impl_->BenchRing(bytes, rounds); }
std::vector<int64_t> EpEngine::ExpertLoad() const { return impl_->recorder->SnapshotCounts(); }
ClusterInfo EpEngine::Cluster() const { return impl_->Cluster(); }

}  // namespace eep::ep
