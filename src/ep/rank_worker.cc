// The rank side of the EP runtime (`eep rank-worker`): loads the model without routed
// experts, holds its expert slots, and serves the coordinator's commands.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstring>
#include <fmt/format.h>
#include <map>
#include <future>
#include <optional>
#include <random>
#include <thread>

#include "core/logging.h"
#include "core/util.h"
#include "backup/backup.h"
#include "ep/control.h"
#include "ep/ep.h"

namespace eep::ep {
namespace {

class ControlBootstrap : public Bootstrap {
 public:
  explicit ControlBootstrap(zmq::socket_t& socket) : socket_(socket) {}
  Result<std::vector<std::string>> AllGather(const std::string& mine) override {
    EEP_RETURN_IF_ERROR(SendControl(socket_, "", {{{"type", "allgather"}, {"data", mine}}, ""}));
    constexpr int64_t kBootstrapMs = 300000;
    EEP_ASSIGN_OR_RETURN(auto m, RecvControl(socket_, nullptr, kBootstrapMs));
    if (m.header.value("type", "") != "allgather_result") return Status::Corruption("expected allgather_result");
    return m.header["data"].get<std::vector<std::string>>();
  }

 private:
  zmq::socket_t& socket_;
};

struct SeqState {
  std::unique_ptr<KvCache> cache;
  std::mt19937_64 rng;
};

class RankWorker {
 public:
  RankWorker(int rank, std::string session) : rank_(rank), session_(std::move(session)) {}

  Status Init(const ControlMessage& init) {
    const auto& h = init.header;
    model_dir_ = h["model"].get<std::string>();
    ep_size_ = h["ep_size"].get<int>();
    EEP_ASSIGN_OR_RETURN(model_, Model::Load(model_dir_, {.load_experts = false, .show_progress = false}));
    const ModelConfig& c = model_->config();
    EEP_ASSIGN_OR_RETURN(layout_, MakeSlotLayout(c.num_experts, h["num_redundant"].get<int64_t>(), ep_size_));
    EEP_ASSIGN_OR_RETURN(ExpertMap map, ExpertMap::FromPhy2Log(h["phy2log"].get<std::vector<std::vector<int32_t>>>(), c.num_experts));
    const int64_t first = layout_.FirstSlot(rank_);
    experts_ = std::make_unique<LocalExperts>(model_->config(), std::move(map), first, first + layout_.slots_per_rank);
    EEP_RETURN_IF_ERROR(experts_->LoadFromCheckpoint(model_->checkpoint()));
    CommunicatorOptions co;
    co.rank = rank_;
    co.world_size = ep_size_;
    co.session = session_;
    co.peer_timeout_ms = h["peer_timeout_ms"].get<int64_t>();
    ControlBootstrap boot(socket_);
    EEP_ASSIGN_OR_RETURN(comm_, CreateCommunicator(h["communicator"].get<std::string>(), co, &boot));
    // The backup is optional: without it the rank runs and says so.
    const auto backup_endpoints = h.value("backup_endpoints", std::vector<std::string>{});
    if (!backup_endpoints.empty()) {
      backup::BackupClientOptions bo;
      bo.endpoints = backup_endpoints;
      bo.expected_fingerprint = model_->checkpoint().Fingerprint();
      backup_ = std::make_unique<backup::ExpertBackupClient>(bo);
      Status st = backup_->Connect();
      if (!st.ok()) EEP_LOG_WARN("rank {}: DRAM backup unavailable, running without it: {}", rank_, st.ToString());
    }
    if (h.value("eplb_async", false)) {
      co.session = session_ + "-x";
      EEP_ASSIGN_OR_RETURN(async_comm_, CreateCommunicator(h["communicator"].get<std::string>(), co, &boot));
    }
    executor_ = std::make_unique<EpMoeExecutor>(model_->config(), experts_.get(), comm_.get(), layout_);
    model_->SetMoeExecutor(executor_.get());
    const std::string fault = h.value("inject_fault", "");
    if (!fault.empty()) {
      EEP_ASSIGN_OR_RETURN(FaultSpec f, ParseFaultSpec(fault));
      if (f.rank == rank_) fault_ = f;
    }
    peer_timeout_ms_ = co.peer_timeout_ms;
    load_.assign(static_cast<size_t>(model_->num_moe_layers() * c.num_experts), 0);
    model_->SetRouteObserver([this, E = c.num_experts](int64_t ml, const int32_t* ids, int64_t n) {
      for (int64_t i = 0; i < n; ++i) ++load_[static_cast<size_t>(ml * E + ids[i])];
    });
    return Status::Ok();
  }

  // Injected faults fire when this rank has completed `after_steps` steps.
  void MaybeInjectFault() {
    if (!fault_ || steps_done_ != fault_->after_steps) return;
    EEP_LOG_WARN("rank {}: injecting fault '{}' after {} steps", rank_, fault_->mode, steps_done_);
    if (fault_->mode == "kill") raise(SIGKILL);
    if (fault_->mode == "hang") raise(SIGSTOP);  // alive but silent, like a wedged GPU
    if (fault_->mode == "slow") std::this_thread::sleep_for(std::chrono::milliseconds(3 * peer_timeout_ms_));
  }

  Result<ControlMessage> Step(const ControlMessage& m) {
    MaybeInjectFault();
    ++steps_done_;
    nlohmann::json eplb_report;
    if (m.header.value("switch", false)) {
      EEP_ASSIGN_OR_RETURN(auto sw, SwitchRebalance());
      eplb_report = {{"stall_s", sw.first}, {"bytes_received", sw.second}};
    }
    for (const auto& id : m.header["release"]) seqs_.erase(id.get<int64_t>());
    std::fill(load_.begin(), load_.end(), 0);
    std::vector<SeqStep> batch;
    std::vector<std::vector<int64_t>> ids;
    std::vector<std::vector<float>> logits;
    const auto& in = m.header["seqs"];
    ids.reserve(in.size());
    logits.resize(in.size());
    for (const auto& s : in) {
      const int64_t id = s["seq"].get<int64_t>();
      auto it = seqs_.find(id);
      if (it == seqs_.end()) {
        it = seqs_.emplace(id, SeqState{model_->NewCache(), std::mt19937_64(s["seed"].get<uint64_t>())}).first;
      }
      ids.push_back(s["ids"].get<std::vector<int64_t>>());
      batch.push_back({it->second.cache.get(), ids.back(), s["all_logits"].get<bool>(), &logits[batch.size()]});
    }
    EEP_RETURN_IF_ERROR(model_->Forward(batch));
    ControlMessage out;
    out.header = {{"type", "step_done"}, {"outputs", nlohmann::json::array()}, {"load", load_}};
    if (!eplb_report.is_null()) out.header["eplb"] = eplb_report;
    // The coordinator switches only once every rank's background exchange is complete.
    if (async_.valid()) out.header["eplb_ready"] = async_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
    const int64_t V = model_->config().vocab_size;
    for (size_t i = 0; i < in.size(); ++i) {
      const auto& s = in[i];
      const int64_t id = s["seq"].get<int64_t>();
      SamplingParams sp{s["temperature"].get<double>(), s["top_p"].get<double>(), s["top_k"].get<int64_t>(),
                        s["seed"].get<uint64_t>()};
      const float* last = logits[i].data() + logits[i].size() - static_cast<size_t>(V);
      const int64_t token = SampleToken(last, V, sp, &seqs_[id].rng);
      nlohmann::json o{{"seq", id}, {"token", token}};
      if (s["logits"].get<bool>()) {
        o["num_logits"] = logits[i].size();
        out.payload.append(reinterpret_cast<const char*>(logits[i].data()), logits[i].size() * sizeof(float));
      }
      out.header["outputs"].push_back(o);
    }
    return out;
  }

  // Expert data for slots of this rank that change in a rebalance, before it is applied.
  struct Staged {
    struct Slot {
      int64_t layer, slot;
      std::vector<float> data;  // local copies
      const uint8_t* bytes = nullptr;  // or a view into `received`
    };
    std::vector<Slot> slots;
    std::vector<std::vector<uint8_t>> received;
    int64_t bytes_received = 0;
  };

  // Moves the experts of a transfer plan ([layer, slot, expert, source rank] items) into
  // staging: every rank packs what it must send, one AllToAllV on `comm` moves it. Reads the
  // current slots only, so it may run beside forward passes (async EPLB).
  Result<Staged> StageTransfers(const nlohmann::json& items, Communicator* comm) {
    const ModelConfig& c = model_->config();
    const size_t expert_floats = static_cast<size_t>(3 * c.ExpertIntermediate() * c.hidden_size);
    const size_t expert_bytes = expert_floats * sizeof(float);
    const ExpertMap& old = experts_->map();
    Staged staged;
    std::vector<std::vector<uint8_t>> send(static_cast<size_t>(ep_size_));
    std::vector<size_t> send_bytes(static_cast<size_t>(ep_size_), 0);
    for (const auto& it : items)
      if (it[3].get<int>() == rank_) send_bytes[static_cast<size_t>(layout_.RankOfSlot(it[1].get<int64_t>()))] += 12 + expert_bytes;
    for (int d = 0; d < ep_size_; ++d) send[static_cast<size_t>(d)].reserve(send_bytes[static_cast<size_t>(d)]);
    for (const auto& it : items) {
      const int64_t l = it[0].get<int64_t>(), s = it[1].get<int64_t>();
      const int32_t e = it[2].get<int32_t>();
      const int src = it[3].get<int>(), dst = layout_.RankOfSlot(s);
      if (src != rank_) continue;
      const ExpertWeights* w = nullptr;
      for (int32_t os : old.Replicas(l, e))
        if (experts_->Holds(os)) w = &experts_->Slot(l, os);
      if (w == nullptr)
        return Status::Internal(fmt::format("plan names rank {} as source of expert {} (layer {}), which it lacks", rank_, e, l));
      if (dst == rank_) {
        staged.slots.push_back({l, s, w->data, nullptr});
        continue;
      }
      auto& buf = send[static_cast<size_t>(dst)];
      const int32_t head[3] = {static_cast<int32_t>(l), static_cast<int32_t>(s), e};
      buf.insert(buf.end(), reinterpret_cast<const uint8_t*>(head), reinterpret_cast<const uint8_t*>(head) + sizeof head);
      buf.insert(buf.end(), reinterpret_cast<const uint8_t*>(w->data.data()),
                 reinterpret_cast<const uint8_t*>(w->data.data()) + expert_bytes);
    }
    EEP_RETURN_IF_ERROR(StageFromBackup(items, &staged));
    std::vector<std::span<const uint8_t>> spans;
    for (const auto& b : send) spans.emplace_back(b.data(), b.size());
    std::vector<std::vector<uint8_t>>& recv = staged.received;
    EEP_RETURN_IF_ERROR_CTX(comm->AllToAllV(spans, &recv), "EPLB weight exchange");
    const size_t record = 12 + expert_bytes;
    for (int src = 0; src < ep_size_; ++src) {
      const auto& buf = recv[static_cast<size_t>(src)];
      if (buf.size() % record != 0)
        return Status::Corruption(fmt::format("EPLB exchange from rank {}: bad size {}", src, buf.size()));
      for (size_t off = 0; off < buf.size(); off += record) {
        int32_t head[3];
        std::memcpy(head, buf.data() + off, 12);
        staged.slots.push_back({head[0], head[1], {}, buf.data() + off + 12});
      }
      staged.bytes_received += static_cast<int64_t>(buf.size());
    }
    return staged;
  }

  // Plan items with source -1 that land on this rank are read from the DRAM backup managers
  // (checkpoint dtype, one batched fetch per layer) and converted into staging.
  Status StageFromBackup(const nlohmann::json& items, Staged* staged) {
    const ModelConfig& c = model_->config();
    const auto moe_layers = c.MoeLayers();
    const size_t mat = static_cast<size_t>(c.ExpertIntermediate() * c.hidden_size);
    std::map<int64_t, std::vector<std::pair<int64_t, int32_t>>> by_layer;  // layer -> (slot, expert)
    for (const auto& it : items)
      if (it[3].get<int>() == -1 && layout_.RankOfSlot(it[1].get<int64_t>()) == rank_)
        by_layer[it[0].get<int64_t>()].emplace_back(it[1].get<int64_t>(), it[2].get<int32_t>());
    if (by_layer.empty()) return Status::Ok();
    if (!backup_) return Status::Unavailable(fmt::format("rank {}: plan reads from the DRAM backup, which is not configured", rank_));
    for (const auto& [l, list] : by_layer) {
      const int64_t layer_id = moe_layers[static_cast<size_t>(l)];
      std::vector<int64_t> ids;
      for (const auto& [slot, e] : list)
        if (std::find(ids.begin(), ids.end(), e) == ids.end()) ids.push_back(e);
      const DType dtype = model_->checkpoint().Find(c.ExpertTensorNames(layer_id, ids[0])[0])->dtype;
      const size_t esize = DTypeSize(dtype);
      std::vector<std::vector<uint8_t>> raw(ids.size(), std::vector<uint8_t>(3 * mat * esize));
      backup::FetchDestinations dest;
      for (size_t i = 0; i < ids.size(); ++i) {
        const auto names = c.ExpertTensorNames(layer_id, ids[i]);
        for (int m = 0; m < 3; ++m) dest[names[static_cast<size_t>(m)]] = {raw[i].data() + m * mat * esize, mat * esize};
      }
      EEP_RETURN_IF_ERROR_CTX(backup_->FetchLogicalExperts(layer_id, ids, "", dest),
                              fmt::format("rank {}: DRAM backup fetch of layer {}", rank_, layer_id));
      for (const auto& [slot, e] : list) {
        const size_t i = static_cast<size_t>(std::find(ids.begin(), ids.end(), e) - ids.begin());
        std::vector<float> data(3 * mat);
        EEP_RETURN_IF_ERROR(ConvertToF32(dtype, raw[i].data(), 3 * mat, data.data()));
        staged->slots.push_back({l, slot, std::move(data), nullptr});
      }
    }
    return Status::Ok();
  }

  // The switch: staged experts go into their slots and the new map takes effect.
  Status ApplyStaged(Staged* staged, const nlohmann::json& phy2log) {
    EEP_ASSIGN_OR_RETURN(ExpertMap next, ExpertMap::FromPhy2Log(phy2log.get<std::vector<std::vector<int32_t>>>(),
                                                                model_->config().num_experts));
    const ModelConfig& c = model_->config();
    const size_t expert_floats = static_cast<size_t>(3 * c.ExpertIntermediate() * c.hidden_size);
    for (auto& s : staged->slots) {
      auto& data = experts_->Slot(s.layer, s.slot).data;
      if (s.bytes == nullptr) {
        data = std::move(s.data);
      } else {
        data.resize(expert_floats);
        std::memcpy(data.data(), s.bytes, expert_floats * sizeof(float));
      }
    }
    experts_->SetMap(std::move(next));
    return Status::Ok();
  }

  // Synchronous rebalance: stage and switch now (the whole exchange is stall).
  Result<ControlMessage> Rebalance(const ControlMessage& m) {
    EEP_ASSIGN_OR_RETURN(Staged staged, StageTransfers(m.header["items"], comm_.get()));
    EEP_RETURN_IF_ERROR(ApplyStaged(&staged, m.header["phy2log"]));
    return ControlMessage{{{"type", "eplb_done"}, {"bytes_received", staged.bytes_received}}, ""};
  }

  // Asynchronous rebalance: the exchange runs on a second communicator in the background
  // while steps go on; the next step carrying "switch" applies it.
  Result<ControlMessage> PrepareRebalance(const ControlMessage& m) {
    if (!async_comm_) return Status::InvalidArgument("async EPLB needs the engine started with eplb_async");
    if (async_.valid()) return Status::Internal("a rebalance is already in flight");
    pending_phy2log_ = m.header["phy2log"];
    async_ = std::async(std::launch::async, [this, items = m.header["items"]] { return StageTransfers(items, async_comm_.get()); });
    return ControlMessage{{{"type", "eplb_started"}}, ""};
  }

  // Joins the background exchange and applies it; returns the stall in seconds.
  Result<std::pair<double, int64_t>> SwitchRebalance() {
    if (!async_.valid()) return Status::Internal("switch without a rebalance in flight");
    const double t0 = NowSeconds();
    Result<Staged> staged = async_.get();
    if (!staged.ok()) return staged.status();
    EEP_RETURN_IF_ERROR(ApplyStaged(&*staged, pending_phy2log_));
    return std::make_pair(NowSeconds() - t0, staged->bytes_received);
  }

  // Raw communicator ceiling: `rounds` AllToAllV exchanges sending `bytes` to the next rank.
  Result<ControlMessage> BenchRing(const ControlMessage& m) {
    const int64_t bytes = m.header["bytes"].get<int64_t>();
    const int rounds = m.header["rounds"].get<int>();
    std::vector<uint8_t> payload(static_cast<size_t>(bytes), 0x5a);
    std::vector<std::span<const uint8_t>> send(static_cast<size_t>(ep_size_));
    if (ep_size_ > 1) send[static_cast<size_t>((rank_ + 1) % ep_size_)] = std::span<const uint8_t>(payload);
    std::vector<std::vector<uint8_t>> recv;
    const double t0 = NowSeconds();
    for (int i = 0; i < rounds; ++i) EEP_RETURN_IF_ERROR_CTX(comm_->AllToAllV(send, &recv), "ring benchmark");
    return ControlMessage{{{"type", "bench_done"}, {"seconds", NowSeconds() - t0}}, ""};
  }

  int Run(const std::string& endpoint) {
    // Ranks must not outlive the coordinator.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    try {
      socket_.set(zmq::sockopt::linger, 0);
      socket_.connect(endpoint);
    } catch (const zmq::error_t& e) {
      EEP_LOG_ERROR("rank {}: cannot connect to {}: {}", rank_, endpoint, e.what());
      return 1;
    }
    if (!SendControl(socket_, "", {{{"type", "hello"}, {"rank", rank_}, {"pid", getpid()}}, ""}).ok()) return 1;
    constexpr int64_t kIdlePollMs = 1000;
    while (true) {
      auto m = RecvControl(socket_, nullptr, kIdlePollMs);
      if (!m.ok()) {
        if (m.status().code() == StatusCode::kTimeout) continue;
        EEP_LOG_ERROR("rank {}: {}", rank_, m.status().ToString());
        return 1;
      }
      const std::string type = m->header.value("type", "");
      Result<ControlMessage> reply = Status::Internal("no reply");
      if (type == "shutdown") return 0;
      if (type == "init") {
        Status st = Init(*m);
        ControlMessage ready{{{"type", "ready"}, {"backup_ready", backup_ && backup_->IsReady()},
                              {"backup_health", backup_ ? backup_->Health() : std::string("not configured")}},
                             ""};
        reply = st.ok() ? Result<ControlMessage>(std::move(ready)) : Result<ControlMessage>(st);
      } else if (type == "step") {
        reply = Step(*m);
      } else if (type == "eplb") {
        reply = Rebalance(*m);
      } else if (type == "bench_ring") {
        reply = BenchRing(*m);
      } else if (type == "eplb_prepare") {
        reply = PrepareRebalance(*m);
      } else {
        reply = Status::InvalidArgument("unknown command '" + type + "'");
      }
      if (!reply.ok()) {
        EEP_LOG_ERROR("rank {}: {}", rank_, reply.status().ToString());
        (void)SendControl(socket_, "", {{{"type", "error"},
                                         {"code", static_cast<int>(reply.status().code())},
                                         {"message", reply.status().message()}},
                                        ""});
        continue;
      }
      if (!SendControl(socket_, "", *reply).ok()) return 1;
    }
  }

 private:
  int rank_;
  std::string session_;
  int ep_size_ = 1;
  std::string model_dir_;
  zmq::context_t ctx_{1};
  zmq::socket_t socket_{ctx_, zmq::socket_type::dealer};
  std::unique_ptr<Model> model_;
  SlotLayout layout_;
  std::unique_ptr<LocalExperts> experts_;
  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<Communicator> async_comm_;  // background EPLB exchange
  std::unique_ptr<backup::ExpertBackupClient> backup_;  // null when not configured
  std::future<Result<Staged>> async_;
  nlohmann::json pending_phy2log_;
  std::unique_ptr<EpMoeExecutor> executor_;
  std::map<int64_t, SeqState> seqs_;
  std::vector<int64_t> load_;
  std::optional<FaultSpec> fault_;
  int64_t steps_done_ = 0;
  int64_t peer_timeout_ms_ = 1000;
};

}  // namespace

int RunRankWorker(const std::string& control_endpoint, int rank, const std::string& session) {
  RankWorker w(rank, session);
  return w.Run(control_endpoint);
}

}  // namespace eep::ep
