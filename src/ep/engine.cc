// The coordinator side of the EP runtime: spawns ranks, drives steps, runs EPLB.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fmt/format.h>
#include <map>
#include <random>

#include "core/logging.h"
#include "core/util.h"
#include "ep/control.h"
#include "ep/ep.h"
#include "eplb/eplb.h"

extern char** environ;

namespace eep::ep {

// Source rank of a plan item that the destination reads from the DRAM backup.
constexpr int kFromBackup = -1;

class EpEngine::Impl {
 public:
  EpOptions opts;
  std::string model_dir;
  ModelConfig config;
  SlotLayout layout;
  ExpertMap map;
  int64_t num_moe_layers = 0;
  zmq::context_t ctx{1};
  zmq::socket_t router{ctx, zmq::socket_type::router};
  std::string endpoint, session;
  std::vector<pid_t> pids;
  std::vector<std::string> identity;  // zmq identity of each rank
  std::map<int64_t, int> seq_rank;
  std::vector<int64_t> rank_seqs;
  std::vector<int64_t> to_release;
  std::unique_ptr<eplb::LoadRecorder> recorder;
  int64_t step = 0;
  int64_t epoch = 1;
  bool backup_ready = false;
  std::string backup_health;
  std::vector<RebalanceStats> rebalances;
  bool shut_down = false;
  // An async rebalance whose exchange runs on the ranks; the next step switches to it.
  struct PendingSwitch {
    ExpertMap next;
    RebalanceStats stats;
    double t0;
    bool ready = false;  // every rank reported its exchange complete
  };
  std::unique_ptr<PendingSwitch> pending;

  ~Impl() { Shutdown(); }

  // Describes a rank whose process has exited, or "" while all live.
  std::string DeadRank() {
    for (size_t r = 0; r < pids.size(); ++r) {
      if (pids[r] <= 0) continue;
      int status = 0;
      if (waitpid(pids[r], &status, WNOHANG) == pids[r]) {
        pids[r] = -1;
        return WIFSIGNALED(status) ? fmt::format("rank {} exited on signal {}", r, WTERMSIG(status))
                                   : fmt::format("rank {} exited with code {}", r, WEXITSTATUS(status));
      }
    }
    return "";
  }

  // Receives one message from any rank within timeout_ms, watching for rank death.
  Result<std::pair<int, ControlMessage>> RecvAny(int64_t timeout_ms, const std::string& waiting_for) {
    const double deadline = NowSeconds() + static_cast<double>(timeout_ms) / 1000.0;
    while (true) {
      const double left = deadline - NowSeconds();
      if (left <= 0) return Status::Timeout(fmt::format("ranks did not answer {} within {} ms", waiting_for, timeout_ms));
      std::string id;
      auto m = RecvControl(router, &id, std::min<int64_t>(100, static_cast<int64_t>(left * 1000) + 1));
      if (!m.ok()) {
        if (m.status().code() != StatusCode::kTimeout) return m.status();
        std::string dead = DeadRank();
        if (!dead.empty()) return Status::RemoteDisconnect(dead + " while waiting for " + waiting_for);
        continue;
      }
      int rank = -1;
      for (size_t r = 0; r < identity.size(); ++r)
        if (identity[r] == id) rank = static_cast<int>(r);
      if (rank < 0 && m->header.value("type", "") == "hello") {
        rank = m->header.value("rank", -1);
        if (rank < 0 || rank >= opts.ep_size) return Status::Corruption("hello from an unknown rank");
        identity[static_cast<size_t>(rank)] = id;
      }
      if (rank < 0) continue;  // not one of ours (a fenced or stale peer): ignored
      if (m->header.value("type", "") == "error")
        return Status(static_cast<StatusCode>(m->header.value("code", static_cast<int>(StatusCode::kInternal))),
                      fmt::format("rank {}: {}", rank, m->header.value("message", "")));
      return std::make_pair(rank, std::move(*m));
    }
  }

  // Collects one message of `type` from every rank.
  Result<std::vector<ControlMessage>> Gather(const std::string& type, int64_t timeout_ms) {
    std::vector<ControlMessage> out(static_cast<size_t>(opts.ep_size));
    std::vector<bool> have(static_cast<size_t>(opts.ep_size), false);
    int missing = opts.ep_size;
    const double deadline = NowSeconds() + static_cast<double>(timeout_ms) / 1000.0;
    while (missing > 0) {
      int64_t left_ms = std::max<int64_t>(1, static_cast<int64_t>((deadline - NowSeconds()) * 1000));
      std::string who;
      for (int r = 0; r < opts.ep_size; ++r)
        if (!have[static_cast<size_t>(r)]) who += (who.empty() ? "" : ", ") + std::to_string(r);
      auto m = RecvAny(left_ms, fmt::format("'{}' (rank(s) {})", type, who));
      if (!m.ok()) return m.status();
      auto& [rank, msg] = *m;
      if (msg.header.value("type", "") != type) {
        EEP_LOG_WARN("rank {}: unexpected '{}' while gathering '{}'", rank, msg.header.value("type", ""), type);
        continue;
      }
      if (!have[static_cast<size_t>(rank)]) {
        have[static_cast<size_t>(rank)] = true;
        --missing;
      }
      out[static_cast<size_t>(rank)] = std::move(msg);
    }
    return out;
  }

  Status Broadcast(const nlohmann::json& header) {
    for (int r = 0; r < opts.ep_size; ++r)
      EEP_RETURN_IF_ERROR(SendControl(router, identity[static_cast<size_t>(r)], {header, ""}));
    return Status::Ok();
  }

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
    map = InitialPlacement(layout, num_moe_layers);
    EEP_ASSIGN_OR_RETURN(recorder, eplb::LoadRecorder::Create(static_cast<int32_t>(num_moe_layers),
                                                              static_cast<int32_t>(config.num_experts),
                                                              static_cast<int32_t>(std::max<int64_t>(1, opts.eplb_window))));
    std::random_device rd;
    session = fmt::format("{}-{:08x}", getpid(), rd());
    try {
      router.set(zmq::sockopt::linger, 0);
      router.bind(fmt::format("tcp://{}:*", opts.control_host));
      endpoint = router.get(zmq::sockopt::last_endpoint);
    } catch (const zmq::error_t& e) {
      return Status::IOError(fmt::format("control socket on {}: {}", opts.control_host, e.what()));
    }
    identity.assign(static_cast<size_t>(opts.ep_size), "");
    rank_seqs.assign(static_cast<size_t>(opts.ep_size), 0);
    for (int r = 0; r < opts.ep_size; ++r) {
      std::vector<std::string> args{"eep", "--log-level", opts.log_level, "rank-worker", "--control", endpoint,
                                    "--rank", std::to_string(r), "--session", session};
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      pid_t pid = 0;
      int rc = posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ);
      if (rc != 0) return Status::IOError(fmt::format("cannot start rank {}: {}", r, std::strerror(rc)));
      pids.push_back(pid);
    }
    EEP_LOG_INFO("ep: started {} rank(s), {} physical slots per MoE layer ({} per rank), communicator {}", opts.ep_size,
                 layout.num_physical, layout.slots_per_rank, opts.communicator);
    constexpr int64_t kStartupMs = 300000;  // loading a large checkpoint on CPU
    EEP_RETURN_IF_ERROR(Gather("hello", kStartupMs).status());
    nlohmann::json init{{"type", "init"},
                        {"model", model_dir},
                        {"ep_size", opts.ep_size},
                        {"communicator", opts.communicator},
                        {"peer_timeout_ms", opts.peer_timeout_ms},
                        {"num_redundant", opts.num_redundant_experts},
                        {"phy2log", map.phy2log()},
                        {"inject_fault", opts.inject_fault},
                        {"eplb_async", opts.eplb_async},
                        {"backup_endpoints", opts.backup_endpoints}};
    EEP_RETURN_IF_ERROR(Broadcast(init));
    // Serve the communicator's bootstrap all-gathers until every rank is ready.
    while (true) {
      std::vector<ControlMessage> msgs(static_cast<size_t>(opts.ep_size));
      int got = 0;
      std::string kind;
      while (got < opts.ep_size) {
        auto m = RecvAny(kStartupMs, "start-up");
        if (!m.ok()) return m.status();
        kind = m->second.header.value("type", "");
        msgs[static_cast<size_t>(m->first)] = std::move(m->second);
        ++got;
      }
      if (kind == "ready") {
        backup_ready = !opts.backup_endpoints.empty();
        for (auto& m : msgs) {
          if (m.header.value("backup_ready", false)) continue;
          backup_ready = false;
          if (backup_health.empty()) backup_health = m.header.value("backup_health", "");
        }
        if (!opts.backup_endpoints.empty())
          EEP_LOG_INFO("ep: DRAM backup {}", backup_ready ? "ready on every rank" : "unavailable (" + backup_health + "); using peers");
        break;
      }
      nlohmann::json all = nlohmann::json::array();
      for (auto& m : msgs) all.push_back(m.header.value("data", ""));
      EEP_RETURN_IF_ERROR(Broadcast({{"type", "allgather_result"}, {"data", all}}));
    }
    EEP_LOG_INFO("ep: all {} rank(s) ready", opts.ep_size);
    return Status::Ok();
  }

  Result<std::vector<SeqOutput>> Step(const std::vector<SeqInput>& inputs) {
    if (shut_down) return Status::Unavailable("engine is shut down");
    std::vector<nlohmann::json> per_rank(static_cast<size_t>(opts.ep_size), nlohmann::json::array());
    for (const SeqInput& in : inputs) {
      auto it = seq_rank.find(in.seq_id);
      if (it == seq_rank.end()) {
        int best = static_cast<int>(std::min_element(rank_seqs.begin(), rank_seqs.end()) - rank_seqs.begin());
        it = seq_rank.emplace(in.seq_id, best).first;
        ++rank_seqs[static_cast<size_t>(best)];
      }
      per_rank[static_cast<size_t>(it->second)].push_back(
          {{"seq", in.seq_id}, {"ids", in.new_ids}, {"logits", in.return_logits}, {"all_logits", in.all_logits},
           {"temperature", in.sampling.temperature}, {"top_p", in.sampling.top_p}, {"top_k", in.sampling.top_k},
           {"seed", in.sampling.seed}});
    }
    std::vector<nlohmann::json> release(static_cast<size_t>(opts.ep_size), nlohmann::json::array());
    for (int64_t id : to_release) {
      auto it = seq_rank.find(id);
      if (it == seq_rank.end()) continue;
      release[static_cast<size_t>(it->second)].push_back(id);
      --rank_seqs[static_cast<size_t>(it->second)];
      seq_rank.erase(it);
    }
    to_release.clear();
    ++step;
    const bool switching = pending != nullptr && pending->ready;
    for (int r = 0; r < opts.ep_size; ++r)
      EEP_RETURN_IF_ERROR(SendControl(router, identity[static_cast<size_t>(r)],
                                      {{{"type", "step"}, {"step", step}, {"seqs", per_rank[static_cast<size_t>(r)]},
                                        {"release", release[static_cast<size_t>(r)]}, {"switch", switching}},
                                       ""}));
    EEP_ASSIGN_OR_RETURN(auto replies, Gather("step_done", opts.step_timeout_ms));
    if (switching) {
      // Ranks switched before computing this step; the stall is the slowest rank's wait.
      RebalanceStats stats = std::move(pending->stats);
      for (const auto& rep : replies) {
        if (!rep.header.contains("eplb")) continue;
        stats.bytes += rep.header["eplb"].value("bytes_received", int64_t{0});
        stats.stall_seconds = std::max(stats.stall_seconds, rep.header["eplb"].value("stall_s", 0.0));
      }
      stats.seconds = NowSeconds() - pending->t0;
      map = std::move(pending->next);
      pending.reset();
      Record(std::move(stats));
    } else if (pending) {
      bool ready = true;
      for (const auto& rep : replies) ready = ready && rep.header.value("eplb_ready", false);
      pending->ready = ready;
    }
    std::vector<SeqOutput> outputs;
    std::vector<int64_t> load(static_cast<size_t>(num_moe_layers * config.num_experts), 0);
    for (auto& rep : replies) {
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
      const auto& l = rep.header["load"];
      for (size_t i = 0; i < l.size() && i < load.size(); ++i) load[i] += l[i].get<int64_t>();
    }
    for (int64_t ml = 0; ml < num_moe_layers; ++ml)
      recorder->RecordCounts(static_cast<int32_t>(ml),
                             std::span<const int64_t>(load.data() + ml * config.num_experts, static_cast<size_t>(config.num_experts)));
    recorder->AdvanceStep();
    if (opts.eplb_interval > 0 && step % opts.eplb_interval == 0 && num_moe_layers > 0 && !pending)
      EEP_RETURN_IF_ERROR(Rebalance());
    // Keep the caller's order.
    std::map<int64_t, size_t> pos;
    for (size_t i = 0; i < inputs.size(); ++i) pos[inputs[i].seq_id] = i;
    std::sort(outputs.begin(), outputs.end(), [&](const SeqOutput& a, const SeqOutput& b) { return pos[a.seq_id] < pos[b.seq_id]; });
    return outputs;
  }

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
    topo.num_gpus = opts.ep_size;
    std::vector<int32_t> old_flat;
    for (const auto& row : map.phy2log()) old_flat.insert(old_flat.end(), row.begin(), row.end());
    std::vector<int32_t> new_flat;
    if (opts.eplb_source != "peers" && opts.eplb_source != "backup")
      return Status::InvalidArgument("--eplb-source must be peers or backup, got '" + opts.eplb_source + "'");
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

  // Turns a new placement into a transfer plan, [moe_layer, slot, expert, source rank] for
  // every slot that changes (source: the destination rank itself when it already holds the
  // expert, else the holder with the fewest sends so far), and executes it.
  Result<RebalanceStats> Apply(const std::vector<std::vector<int32_t>>& new_rows, bool async, double t0) {
    if (pending) return Status::Unavailable("a rebalance is already in flight");
    nlohmann::json items = nlohmann::json::array();
    std::vector<int64_t> sends_by_rank(static_cast<size_t>(opts.ep_size), 0);
    RebalanceStats stats;
    stats.async = async;
    if (static_cast<int64_t>(new_rows.size()) != num_moe_layers)
      return Status::InvalidArgument(fmt::format("placement has {} layers, the model {}", new_rows.size(), num_moe_layers));
    for (int64_t l = 0; l < num_moe_layers; ++l) {
      const auto& row = new_rows[static_cast<size_t>(l)];
      if (static_cast<int64_t>(row.size()) != layout.num_physical)
        return Status::InvalidArgument(fmt::format("placement layer {} has {} slots, expected {}", l, row.size(), layout.num_physical));
      for (int64_t s = 0; s < layout.num_physical; ++s) {
        const int32_t e = row[static_cast<size_t>(s)];
        if (e < 0 || e == map.LogicalAt(l, s)) continue;
        const int dst = layout.RankOfSlot(s);
        int src = -1;
        for (int32_t old_slot : map.Replicas(l, e))
          if (layout.RankOfSlot(old_slot) == dst) src = dst;
        if (src < 0 && opts.eplb_source == "backup" && backup_ready) {
          src = kFromBackup;
          ++stats.from_backup;
        } else if (src < 0) {
          for (int32_t old_slot : map.Replicas(l, e)) {
            int r = layout.RankOfSlot(old_slot);
            if (src < 0 || sends_by_rank[static_cast<size_t>(r)] < sends_by_rank[static_cast<size_t>(src)]) src = r;
          }
          ++sends_by_rank[static_cast<size_t>(src)];
          if (std::find(stats.source_ranks.begin(), stats.source_ranks.end(), src) == stats.source_ranks.end())
            stats.source_ranks.push_back(src);
        }
        items.push_back({l, s, e, src});
        ++stats.moved_experts;
      }
    }
    std::sort(stats.source_ranks.begin(), stats.source_ranks.end());
    if (items.empty()) return stats;
    EEP_ASSIGN_OR_RETURN(ExpertMap next, ExpertMap::FromPhy2Log(new_rows, layout.num_logical));
    if (async) {
      EEP_RETURN_IF_ERROR(Broadcast({{"type", "eplb_prepare"}, {"phy2log", new_rows}, {"items", items}}));
      EEP_RETURN_IF_ERROR(Gather("eplb_started", opts.step_timeout_ms).status());
      pending = std::make_unique<PendingSwitch>(PendingSwitch{std::move(next), std::move(stats), t0, false});
      return pending->stats;
    }
    EEP_RETURN_IF_ERROR(Broadcast({{"type", "eplb"}, {"phy2log", new_rows}, {"items", items}}));
    EEP_ASSIGN_OR_RETURN(auto replies, Gather("eplb_done", opts.step_timeout_ms));
    for (const auto& r : replies) stats.bytes += r.header.value("bytes_received", int64_t{0});
    map = std::move(next);
    stats.seconds = NowSeconds() - t0;
    stats.stall_seconds = stats.seconds;
    Record(stats);
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

  void Shutdown() {
    if (shut_down) return;
    shut_down = true;
    for (int r = 0; r < opts.ep_size && r < static_cast<int>(identity.size()); ++r)
      if (!identity[static_cast<size_t>(r)].empty())
        (void)SendControl(router, identity[static_cast<size_t>(r)], {{{"type", "shutdown"}}, ""});
    // Give ranks a moment to exit cleanly, then make sure.
    constexpr int64_t kExitGraceMs = 2000;
    for (pid_t& pid : pids) {
      if (pid <= 0) continue;
      int status;
      if (!WaitChild(pid, kExitGraceMs, &status)) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
      }
      pid = -1;
    }
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
void EpEngine::Shutdown() { impl_->Shutdown(); }
const ModelConfig& EpEngine::config() const { return impl_->config; }
const ExpertMap& EpEngine::expert_map() const { return impl_->map; }
const SlotLayout& EpEngine::layout() const { return impl_->layout; }
const std::vector<RebalanceStats>& EpEngine::rebalances() const { return impl_->rebalances; }
Result<RebalanceStats> EpEngine::ApplyPlacement(const std::vector<std::vector<int32_t>>& phy2log, bool async) {
  return impl_->Apply(phy2log, async, NowSeconds());
}
Result<double> EpEngine::BenchRing(int64_t bytes, int rounds) {
  EEP_RETURN_IF_ERROR(impl_->Broadcast({{"type", "bench_ring"}, {"bytes", bytes}, {"rounds", rounds}}));
  EEP_ASSIGN_OR_RETURN(auto replies, impl_->Gather("bench_done", impl_->opts.step_timeout_ms));
  double worst = 0;
  for (const auto& r : replies) worst = std::max(worst, r.header.value("seconds", 0.0));
  return worst / std::max(1, rounds);
}
std::vector<int64_t> EpEngine::ExpertLoad() const { return impl_->recorder->SnapshotCounts(); }
ClusterInfo EpEngine::Cluster() const {
  ClusterInfo c;
  c.epoch = impl_->epoch;
  c.steps = impl_->step;
  c.map_version = static_cast<int64_t>(impl_->rebalances.size());
  c.backup_ready = impl_->backup_ready;
  c.backup_health = impl_->backup_health;
  for (int r = 0; r < impl_->opts.ep_size; ++r) {
    RankInfo info;
    info.rank = r;
    info.pid = r < static_cast<int>(impl_->pids.size()) ? impl_->pids[static_cast<size_t>(r)] : 0;
    info.state = info.pid > 0 ? "alive" : "dead";
    info.num_seqs = impl_->rank_seqs[static_cast<size_t>(r)];
    c.ranks.push_back(info);
  }
  return c;
}

}  // namespace eep::ep
