// The rank side of the EP runtime (`eep rank-worker`): loads the model without routed
// experts, holds its expert slots, and serves the coordinator's commands.
//
// Membership changes (a failure, scaling) arrive as four commands, each answered before the
// next is sent, all tagged with the new epoch:
//   hold    stop what is in flight (abort exchanges, roll back the aborted step), report
//           which experts this rank holds
//   comm    build a communicator over a member list (bootstrap through the coordinator)
//   stage   move the planned experts into staging (from peers, the DRAM backup, or disk)
//   commit  re-number the slots for the new layout, fill them, switch map and communicator
// Until commit nothing that serves requests changes, so a failure in the middle leaves every
// rank consistent with what it reports at the next hold.
//
// A heartbeat thread keeps telling the coordinator this rank is alive, and takes "abort"
// orders that unblock exchanges stuck on a dead peer.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <functional>
#include <fmt/format.h>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "backup/backup.h"
#include "cluster/etcd.h"
#include "core/logging.h"
#include "core/util.h"
#include "cuda/compute_cuda.h"
#include "ep/control.h"
#include "ep/ep.h"
#include "ep/node.h"

namespace eep::ep {
namespace {

// Plan item sources besides a rank id.
// Records of the expert exchange: int32 {layer, slot, expert, kind}, then the f32 host copy
// (kRecordF32), or nothing: the device slot follows in a second round, in record order
// (kRecordDevice; GPU to GPU where the communicator can, else through the host).
enum ExchangeRecord : int32_t { kRecordF32 = 0, kRecordDevice = 1 };
constexpr size_t kRecordHead = 4 * sizeof(int32_t);
constexpr int kFromBackup = -1;
constexpr double kSlowStepMs = 20;  // a forward this long is logged (debug)
constexpr int64_t kWarmUpTokens = 32;  // prefill length and expert rows of a CUDA rank's warm-up
constexpr int kFromDisk = -2;

// All-gathers through the coordinator. A command that arrives instead of the result (the
// coordinator gave up on this round because a rank failed) is kept for the main loop.
class ControlBootstrap : public Bootstrap {
 public:
  ControlBootstrap(zmq::socket_t& socket, int64_t epoch, std::deque<ControlMessage>* deferred)
      : socket_(socket), epoch_(epoch), deferred_(deferred) {}
  Result<std::vector<std::string>> AllGather(const std::string& mine) override {
    EEP_RETURN_IF_ERROR(SendControl(socket_, "", {{{"type", "allgather"}, {"data", mine}, {"epoch", epoch_}}, ""}));
    constexpr int64_t kBootstrapMs = 300000;
    const double deadline = NowSeconds() + kBootstrapMs / 1000.0;
    while (true) {
      const int64_t left = static_cast<int64_t>((deadline - NowSeconds()) * 1000);
      if (left <= 0) return Status::Timeout("communicator bootstrap: no all-gather result");
      EEP_ASSIGN_OR_RETURN(auto m, RecvControl(socket_, nullptr, left));
      const std::string type = m.header.value("type", "");
      if (type == "allgather_result") {
        if (m.header.value("epoch", int64_t{-1}) != epoch_) continue;  // a stale round
        return m.header["data"].get<std::vector<std::string>>();
      }
      deferred_->push_back(std::move(m));
      return Status::Cancelled(fmt::format("communicator bootstrap interrupted by '{}'", type));
    }
  }

 private:
  zmq::socket_t& socket_;
  int64_t epoch_;
  std::deque<ControlMessage>* deferred_;
};

// A sequence's cache lives where the rank computes: host (cpu) or device (cuda).
struct SeqState {
  std::unique_ptr<ComputeCache> cache;
  std::mt19937_64 rng;
  int64_t length() const { return cache->length(); }
  void Truncate(int64_t n) { cache->Truncate(n); }
};

// What a step changed, so that an aborted step can be undone.
struct SeqSnapshot {
  bool existed = false;
  int64_t length = 0;
  std::mt19937_64 rng;
};

// Expert data for slots of this rank, before it is applied.
struct Staged {
  struct Slot {
    int64_t layer, slot;
    std::vector<float> data;         // local copies
    const uint8_t* bytes = nullptr;  // or a view into `received`
  };
  std::vector<Slot> slots;
  // CUDA ranks: slots whose expert is BF16 in a DRAM backup mirror mapped into this process;
  // their device slots are DMA'd straight from the mirror (CudaModel::RestoreExperts) at the
  // switch, with no host copy. (MoE layer, slot, logical expert.)
  std::vector<std::tuple<int64_t, int64_t, int32_t>> device_direct;
  // CUDA ranks: experts that come from device slots, a peer's (GPU to GPU through the
  // communicator's ExchangeDevice, or through the host) or this rank's own (a move between its
  // slots), parked in device_staging: (MoE layer, slot, index in the staging). Copied into
  // their slots at the switch.
  std::vector<std::tuple<int64_t, int64_t, int64_t>> device_staged;
  std::shared_ptr<cuda::DeviceMemory> device_staging;
  std::vector<std::vector<uint8_t>> received;
  int64_t bytes_peers = 0, bytes_backup = 0, bytes_disk = 0;
  int64_t experts_peers = 0, experts_backup = 0, experts_disk = 0;
  double seconds = 0;
  nlohmann::json Report() const {
    return {{"bytes_peers", bytes_peers},     {"bytes_backup", bytes_backup},     {"bytes_disk", bytes_disk},
            {"experts_peers", experts_peers}, {"experts_backup", experts_backup}, {"experts_disk", experts_disk},
            {"bytes_received", bytes_peers},  {"seconds", seconds}};
  }
};

// fn(0 .. n-1) on up to 8 threads (this one included); the first error wins.
Status ParallelFor(size_t n, const std::function<Status(size_t)>& fn) {
  const size_t workers = std::min<size_t>({n, 8, std::max(1u, std::thread::hardware_concurrency())});
  std::atomic<size_t> next{0};
  auto run = [&]() -> Status {
    for (size_t i = next++; i < n; i = next++) EEP_RETURN_IF_ERROR(fn(i));
    return Status::Ok();
  };
  std::vector<std::future<Status>> others;
  for (size_t w = 1; w < workers; ++w) others.push_back(std::async(std::launch::async, run));
  Status first = run();
  for (auto& f : others) {
    Status st = f.get();
    if (first.ok() && !st.ok()) first = st;
  }
  return first;
}

int PositionOf(const std::vector<int>& members, int id) {
  for (size_t i = 0; i < members.size(); ++i)
    if (members[i] == id) return static_cast<int>(i);
  return -1;
}

SlotLayout LayoutFor(int64_t num_logical, size_t num_members, int64_t slots_per_rank) {
  SlotLayout l;
  l.num_logical = num_logical;
  l.ep_size = static_cast<int>(num_members);
  l.slots_per_rank = slots_per_rank;
  l.num_physical = slots_per_rank * static_cast<int64_t>(num_members);
  return l;
}

class RankWorker {
 public:
  RankWorker(int id, std::string session, std::string coordinator_url, std::string cluster)
      : id_(id), session_(std::move(session)), coordinator_url_(std::move(coordinator_url)) {
    keys_.cluster = std::move(cluster);
  }

  // ---- following the leader (ranks started by a node agent) ------------------------------

  // The leader record's endpoints, or nullopt when it cannot be read.
  std::optional<std::pair<std::string, std::string>> ReadLeader(cluster::EtcdClient& etcd) {
    auto kv = etcd.Get(keys_.Leader());
    if (!kv.ok() || !*kv) return std::nullopt;
    auto j = nlohmann::json::parse((*kv)->value, nullptr, false);
    if (!j.is_object()) return std::nullopt;
    std::string control = j.value("control", std::string()), heartbeat = j.value("heartbeat", std::string());
    // A coordinator that just won the election publishes its endpoints a moment later.
    if (control.empty() || heartbeat.empty()) return std::nullopt;
    return std::make_pair(control, heartbeat);
  }

  // Main thread, between commands: a new coordinator (seen by the heartbeat thread) gets this
  // rank's control connection and a hello that says it is initialised already.
  void MaybeReconnect() {
    std::string next;
    {
      std::lock_guard<std::mutex> lock(leader_mu_);
      next.swap(new_control_);
    }
    if (next.empty() || next == control_endpoint_) return;
    try {
      socket_.disconnect(control_endpoint_);
      socket_.connect(next);
    } catch (const zmq::error_t& e) {
      EEP_LOG_WARN("rank {}: cannot reconnect to coordinator {}: {}", id_, next, e.what());
      return;
    }
    EEP_LOG_INFO("rank {}: following the new coordinator at {}", id_, next);
    control_endpoint_ = next;
    deferred_.clear();
    (void)SendControl(socket_, "", {{{"type", "hello"}, {"rank", id_}, {"pid", getpid()}, {"adopt", true}, {"epoch", epoch_.load()}}, ""});
  }

  // ---- heartbeats ------------------------------------------------------------------------

  void StartHeartbeat(const std::string& endpoint, int64_t interval_ms) {
    hb_thread_ = std::thread([this, endpoint, interval_ms] {
      zmq::socket_t hb(ctx_, zmq::socket_type::dealer);
      try {
        hb.set(zmq::sockopt::linger, 0);
        hb.set(zmq::sockopt::routing_id, fmt::format("hb-{}", id_));
        hb.connect(endpoint);
      } catch (const zmq::error_t& e) {
        EEP_LOG_ERROR("rank {}: heartbeat socket: {}", id_, e.what());
        return;
      }
      double next = 0;
      std::string hb_endpoint = endpoint;
      std::unique_ptr<cluster::EtcdClient> etcd;
      if (!coordinator_url_.empty()) {
        auto c = cluster::EtcdClient::Connect(coordinator_url_);
        if (c.ok()) etcd = std::move(*c);
        else EEP_LOG_WARN("rank {}: etcd: {}; will not follow a new coordinator", id_, c.status().ToString());
      }
      constexpr double kLeaderCheckSeconds = 0.25;
      double next_leader_check = NowSeconds() + kLeaderCheckSeconds;
      while (!hb_stop_.load()) {
        const double now = NowSeconds();
        if (etcd && now >= next_leader_check) {
          next_leader_check = now + kLeaderCheckSeconds;
          if (auto leader = ReadLeader(*etcd); leader && leader->second != hb_endpoint) {
            try {
              hb.disconnect(hb_endpoint);
              hb.connect(leader->second);
              hb_endpoint = leader->second;
              std::lock_guard<std::mutex> lock(leader_mu_);
              new_control_ = leader->first;
            } catch (const zmq::error_t& e) {
              EEP_LOG_WARN("rank {}: cannot reach the new coordinator's heartbeat socket {}: {}", id_, leader->second, e.what());
            }
          }
        }
        std::vector<int> suspects;
        {
          std::lock_guard<std::mutex> lock(outbox_mu_);
          suspects.swap(suspects_out_);
        }
        if (!suspects.empty())
          (void)SendControl(hb, "", {{{"type", "suspect"}, {"rank", id_}, {"epoch", epoch_.load()}, {"suspects", suspects}}, ""});
        if (now >= next) {
          (void)SendControl(hb, "", {{{"type", "hb"}, {"rank", id_}, {"epoch", epoch_.load()}}, ""});
          next = now + static_cast<double>(interval_ms) / 1000.0;
        }
        const double wake = etcd ? std::min(next, next_leader_check) : next;
        auto m = RecvControl(hb, nullptr, std::max<int64_t>(1, static_cast<int64_t>((wake - NowSeconds()) * 1000)));
        if (m.ok() && m->header.value("type", "") == "abort") AbortBefore(m->header.value("epoch", int64_t{0}));
      }
    });
  }

  void StopHeartbeat() {
    hb_stop_.store(true);
    if (hb_thread_.joinable()) hb_thread_.join();
  }

  // Unblocks every exchange on a communicator older than `epoch`. Any thread.
  void AbortBefore(int64_t epoch) {
    std::lock_guard<std::mutex> lock(comm_mu_);
    for (auto& [comm, e] : live_comms_)
      if (e < epoch) comm->Abort();
  }

  // ---- communicators ---------------------------------------------------------------------

  Result<std::shared_ptr<Communicator>> MakeComm(const std::vector<int>& members, int64_t epoch, const std::string& tag) {
    CommunicatorOptions co;
    co.rank = PositionOf(members, id_);
    co.world_size = static_cast<int>(members.size());
    co.session = fmt::format("{}-e{}-{}", session_, epoch, tag);
    co.peer_timeout_ms = peer_timeout_ms_;
    // nccl: the GPU this rank computes on.
    if (cuda::CudaModel* gpu = cuda::CudaModelOf(*model_)) co.device = gpu->device();
    ControlBootstrap boot(socket_, epoch, &deferred_);
    EEP_ASSIGN_OR_RETURN(auto comm, CreateCommunicator(communicator_, co, &boot));
    return AdoptComm(std::move(comm), members, epoch);
  }

  // The survivors' communicator made from `from` (whose positions are `from_members`) when
  // `members` are some of them in the same order: Shrink, no new bootstrap. Null when that does
  // not apply or the backend cannot (it then says so the same way on every rank).
  Result<std::shared_ptr<Communicator>> ShrinkComm(Communicator* from, const std::vector<int>& from_members,
                                                   const std::vector<int>& members, int64_t epoch) {
    if (from == nullptr || members.size() >= from_members.size() || PositionOf(members, id_) < 0)
      return std::shared_ptr<Communicator>();
    std::vector<int> excluded;
    size_t k = 0;
    for (size_t p = 0; p < from_members.size(); ++p) {
      if (k < members.size() && from_members[p] == members[k]) ++k;
      else excluded.push_back(static_cast<int>(p));
    }
    if (k != members.size()) return std::shared_ptr<Communicator>();  // not a subsequence
    const double t0 = NowSeconds();
    auto shrunk = from->Shrink(excluded);
    if (!shrunk.ok()) {
      if (shrunk.status().code() == StatusCode::kUnimplemented) return std::shared_ptr<Communicator>();
      return shrunk.status();
    }
    EEP_LOG_INFO("rank {}: communicator shrunk to {} ranks in {:.1f} ms", id_, members.size(), (NowSeconds() - t0) * 1e3);
    return AdoptComm(std::move(*shrunk), members, epoch);
  }

  Result<std::shared_ptr<Communicator>> AdoptComm(std::unique_ptr<Communicator> comm, const std::vector<int>& members,
                                                  int64_t epoch) {
    // A silent peer is reported to the coordinator (heartbeat channel) and waited for: only the
    // coordinator decides it is dead (process gone, stopped, heartbeats lost) and aborts us.
    comm->SetSilenceHandler([this, members](const std::vector<int>& peers) {
      std::lock_guard<std::mutex> lock(outbox_mu_);
      for (int p : peers)
        if (p >= 0 && p < static_cast<int>(members.size())) suspects_out_.push_back(members[static_cast<size_t>(p)]);
      return true;
    });
    std::shared_ptr<Communicator> shared(std::move(comm));
    std::lock_guard<std::mutex> lock(comm_mu_);
    live_comms_.emplace_back(shared, epoch);
    return shared;
  }

  // Forgets communicators no longer referenced by this rank.
  void PruneComms() {
    std::lock_guard<std::mutex> lock(comm_mu_);
    std::erase_if(live_comms_, [](const auto& e) { return e.first.use_count() == 1; });
  }

  void InstallExecutor() {
    cuda::CudaModel* gpu = cuda::CudaModelOf(*model_);
    if (gpu != nullptr && comm_->world_size() == 1 && experts_->slot_begin() == 0 &&
        experts_->slot_end() == experts_->map().num_physical()) {
      // The only rank holds every slot on its GPU: the model's own device MoE (routing, grouped
      // experts and combine on the GPU, decode steps in CUDA graphs) instead of host rows
      // through the communicator. A rank that joins later brings the executor back.
      if (executor_ != nullptr || !local_moe_logged_)
        EEP_LOG_INFO("rank {}: sole rank, MoE layers run on the device without the exchange", id_);
      local_moe_logged_ = true;
      model_->SetMoeExecutor(nullptr);
      executor_.reset();
      return;
    }
    if (gpu != nullptr) {
      // Received rows are computed on the GPU in one batch per layer (D2H/H2D staging around
      // the host-side exchange).
      executor_ = std::make_unique<EpMoeExecutor>(
          config(), experts_.get(), comm_.get(), layout_,
          [gpu, id = id_](int64_t ml, const int32_t* slots, const float* x, int64_t n, float* y) {
            const double t0 = NowSeconds();
            Status st = gpu->RunExpertRows(ml, slots, x, n, y);
            if (const double ms = (NowSeconds() - t0) * 1e3; ms > kSlowStepMs / 4)
              EEP_LOG_DEBUG("rank {}: expert rows of MoE layer {} took {:.1f} ms ({} rows)", id, ml, ms, n);
            return st;
          });
    } else {
      executor_ = std::make_unique<EpMoeExecutor>(config(), experts_.get(), comm_.get(), layout_);
    }
    model_->SetMoeExecutor(executor_.get());
  }

  const ModelConfig& config() const { return model_->config(); }
  const Checkpoint& checkpoint() const { return *ckpt_; }

  // CUDA ranks: re-shapes the device slots to the held range and map (kept slots keep their
  // bytes), copies in `staged`'s slots parked on the device (device_staged), DMAs its
  // device_direct ones from the mapped backup mirror (with the host copies as their fallback)
  // and uploads the listed (layer, slot) pairs that have a host copy. Then the host copies are
  // dropped: the device slots are the record, and the source of exchanges.
  Status SyncDeviceSlots(const std::vector<std::pair<int64_t, int64_t>>& upload, const Staged* staged = nullptr) {
    cuda::CudaModel* gpu = cuda::CudaModelOf(*model_);
    if (gpu == nullptr) return Status::Ok();
    EEP_RETURN_IF_ERROR_CTX(gpu->ConfigureExpertSlots(experts_->map(), experts_->slot_begin(), experts_->slot_end()),
                            "device expert slots");
    // Slots parked in the device staging: one device copy each.
    if (staged != nullptr && !staged->device_staged.empty()) {
      const auto* base = static_cast<const uint8_t*>(staged->device_staging->data());
      for (const auto& [l, slot, i] : staged->device_staged)
        EEP_RETURN_IF_ERROR_CTX(gpu->SetSlotFromDevice(l, slot, base + i * gpu->slot_bytes()),
                                fmt::format("slot {} of MoE layer {} from the device staging", slot, l));
    }
    std::set<std::pair<int64_t, int64_t>> restored;
    static const std::vector<std::tuple<int64_t, int64_t, int32_t>> kNone;
    const auto& direct = staged != nullptr ? staged->device_direct : kNone;
    if (!direct.empty() && backup_) {
      std::vector<cuda::CudaModel::SlotRestore> list;
      for (const auto& [l, slot, e] : direct) list.push_back({l, slot, e});
      cuda::CudaModel::RestoreStats st;
      Status rs = gpu->RestoreExperts(*backup_, list, &st);
      if (rs.ok()) {
        for (const auto& [l, slot, e] : direct) restored.emplace(l, slot);
        EEP_LOG_DEBUG("rank {}: {} expert slot(s) DMA'd from the DRAM mirror ({} MiB, {:.1f} ms, direct {})", id_,
                      list.size(), st.bytes >> 20, st.total_s * 1e3, st.direct);
      } else {
        EEP_LOG_WARN("rank {}: restoring device slots from the mirror failed ({}); uploading the host copies", id_,
                     rs.ToString());
        EEP_RETURN_IF_ERROR(FillHostCopies(direct));
      }
    }
    for (const auto& [l, slot] : upload) {
      if (restored.count({l, slot}) != 0) continue;
      const ExpertWeights& w = experts_->Slot(l, slot);
      if (w.data.empty()) continue;
      EEP_RETURN_IF_ERROR_CTX(gpu->SetSlot(l, slot, DType::kF32, w.gate(), w.up(), w.down()),
                              fmt::format("uploading slot {} of MoE layer {}", slot, l));
    }
    // The device slots are the record now: a CUDA rank keeps no f32 host copy of its experts
    // (it would cost twice the experts' BF16 bytes of host memory, and refreshing it after every
    // exchange). Exchanges read the device slots.
    std::vector<std::vector<float>> copies;
    for (const auto& [l, slot] : AllHeldSlots())
      if (auto& data = experts_->Slot(l, slot).data; !data.empty()) copies.push_back(std::exchange(data, {}));
    DiscardLater(std::move(copies));
    return Status::Ok();
  }
  // Expert e of MoE layer l as f32 [gate | up | down] from the checkpoint; *bytes (may be null)
  // gets the stored bytes read.
  Result<std::vector<float>> ReadExpertFromDisk(int64_t l, int32_t e, int64_t* bytes = nullptr) const {
    const ModelConfig& c = config();
    const auto names = c.ExpertTensorNames(c.MoeLayers()[static_cast<size_t>(l)], e);
    const auto shapes = c.ExpertTensorShapes();
    std::vector<float> data;
    data.reserve(static_cast<size_t>(3 * c.ExpertIntermediate() * c.hidden_size));
    for (size_t m = 0; m < 3; ++m) {
      EEP_ASSIGN_OR_RETURN(auto part, checkpoint().ReadF32(names[m], shapes[m]));
      data.insert(data.end(), part.begin(), part.end());
      if (bytes != nullptr) *bytes += static_cast<int64_t>(checkpoint().Find(names[m])->nbytes);
    }
    return data;
  }
  // Mapped backup tensors by name; those not of `bytes` bytes are null.
  static std::map<std::string, const uint8_t*> MappedByName(const std::vector<backup::MappedExpertParam>& mapped,
                                                            size_t bytes) {
    std::map<std::string, const uint8_t*> where;
    for (const auto& m : mapped) where[m.name] = m.num_bytes == bytes ? m.data : nullptr;
    return where;
  }
  // The three tensors `names` of one expert (mat values of dtype each, in `where`) as f32 into
  // out [gate | up | down]. Read-only on `where` (called from several threads).
  static Status ConvertExpert(const std::array<std::string, 3>& names, const std::map<std::string, const uint8_t*>& where,
                              DType dtype, size_t mat, float* out) {
    for (size_t m = 0; m < 3; ++m) {
      auto it = where.find(names[m]);
      if (it == where.end() || it->second == nullptr)
        return Status::NotFound(fmt::format("'{}' is not in the mapped DRAM mirror", names[m]));
      EEP_RETURN_IF_ERROR(ConvertToF32(dtype, it->second, mat, out + m * mat));
    }
    return Status::Ok();
  }
  // Makes the host copy of each listed (MoE layer, slot, logical expert) whose copy is empty:
  // converted from the mapped DRAM mirror, else read from the checkpoint.
  Status FillHostCopies(const std::vector<std::tuple<int64_t, int64_t, int32_t>>& list) {
    const ModelConfig& c = config();
    const auto moe_layers = c.MoeLayers();
    const size_t mat = static_cast<size_t>(c.ExpertIntermediate() * c.hidden_size);
    std::vector<std::tuple<int64_t, int64_t, int32_t>> todo;
    for (const auto& t : list)
      if (experts_->Slot(std::get<0>(t), std::get<1>(t)).data.empty()) todo.push_back(t);
    return ParallelFor(todo.size(), [&](size_t i) -> Status {
      const auto& [l, slot, e] = todo[i];
      const int64_t layer_id = moe_layers[static_cast<size_t>(l)];
      const auto names = c.ExpertTensorNames(layer_id, e);
      std::vector<float> data(3 * mat);
      bool done = false;
      if (backup_) {
        auto mapped = backup_->MapExpertParams(layer_id, {e}, "");
        if (mapped.ok() && mapped->size() == 3) {
          const DType dtype = mapped->front().dtype;
          done = ConvertExpert(names, MappedByName(*mapped, mat * DTypeSize(dtype)), dtype, mat, data.data()).ok();
        }
      }
      if (!done) {
        EEP_ASSIGN_OR_RETURN(data, ReadExpertFromDisk(l, e));
      }
      experts_->Slot(l, slot).data = std::move(data);
      return Status::Ok();
    });
  }
  // Frees large host buffers on a thread: returning gigabytes to the OS takes tens of ms,
  // which a switch's blocking window must not pay.
  template <typename T>
  static void DiscardLater(T&& junk) {
    std::thread([j = std::forward<T>(junk)]() mutable { T drop = std::move(j); }).detach();
  }
  std::vector<std::pair<int64_t, int64_t>> AllHeldSlots() const {
    std::vector<std::pair<int64_t, int64_t>> all;
    for (int64_t l = 0; l < experts_->map().num_moe_layers(); ++l)
      for (int64_t s = experts_->slot_begin(); s < experts_->slot_end(); ++s) all.emplace_back(l, s);
    return all;
  }

  // ---- commands --------------------------------------------------------------------------

  Status Init(const ControlMessage& init) {
    const auto& h = init.header;
    model_dir_ = h["model"].get<std::string>();
    communicator_ = h["communicator"].get<std::string>();
    peer_timeout_ms_ = h["peer_timeout_ms"].get<int64_t>();
    eplb_async_ = h.value("eplb_async", false);
    epoch_.store(h["epoch"].get<int64_t>());
    members_ = h["members"].get<std::vector<int>>();
    const std::string backend = h.value("backend", std::string("cpu"));
    // The routed experts are this rank's share (LocalExperts below), not the model's.
    ComputeOptions co{.load_experts = false, .show_progress = false};
    // nccl needs one rank per GPU: the coordinator hands out device slots (a replacement rank
    // gets the dead rank's GPU), rank i on GPU slot i mod visible. shm/ucx ranks may share
    // GPU 0.
    if (backend == "cuda" && communicator_ == "nccl" && cuda::DeviceCount() > 0)
      co.device = h.value("device_slot", id_) % cuda::DeviceCount();
    EEP_ASSIGN_OR_RETURN_CTX(model_, OpenComputeModel(backend, model_dir_, co), fmt::format("rank {}", id_));
    // Experts are read from disk into the host LocalExperts on either backend.
    EEP_ASSIGN_OR_RETURN(ckpt_, Checkpoint::Open(model_dir_));
    const ModelConfig& c = config();
    layout_ = LayoutFor(c.num_experts, members_.size(), h["slots_per_rank"].get<int64_t>());
    EEP_ASSIGN_OR_RETURN(ExpertMap map, ExpertMap::FromPhy2Log(h["phy2log"].get<std::vector<std::vector<int32_t>>>(), c.num_experts));
    // A joining rank holds no slot until its first commit.
    const int pos = PositionOf(members_, id_);
    const int64_t first = pos < 0 ? 0 : layout_.FirstSlot(pos);
    experts_ = std::make_unique<LocalExperts>(config(), std::move(map), first, pos < 0 ? 0 : first + layout_.slots_per_rank);
    if (pos >= 0) EEP_RETURN_IF_ERROR(experts_->LoadFromCheckpoint(checkpoint()));
    EEP_RETURN_IF_ERROR(SyncDeviceSlots(AllHeldSlots()));
    // The copier of expert exchanges (a stream and pinned bounce buffers) is made now, not
    // inside a failover's blocking window.
    if (cuda::CudaModel* gpu = cuda::CudaModelOf(*model_)) {
      EEP_RETURN_IF_ERROR_CTX(cuda::PrepareCopyBatch(gpu->device()), fmt::format("rank {}", id_));
      // Only an optimisation: a failed warm-up is reported and serving goes on (a sticky CUDA
      // error would fail the first step anyway, and say so).
      const char* warm = std::getenv("EEP_RANK_WARMUP");  // 0: skip (measurements)
      if (warm == nullptr || std::string(warm) != "0")
        if (Status st = WarmUp(gpu); !st.ok()) EEP_LOG_WARN("rank {}: warm-up failed, going on: {}", id_, st.ToString());
    }
    // The backup is optional: without it the rank runs and says so.
    const auto backup_endpoints = h.value("backup_endpoints", std::vector<std::string>{});
    if (!backup_endpoints.empty()) {
      backup::BackupClientOptions bo;
      bo.endpoints = backup_endpoints;
      bo.expected_fingerprint = checkpoint().Fingerprint();
      backup_ = std::make_unique<backup::ExpertBackupClient>(bo);
      Status st = backup_->Connect();
      if (!st.ok()) EEP_LOG_WARN("rank {}: DRAM backup unavailable, running without it: {}", id_, st.ToString());
      // CUDA: the mirrors this process maps are registered with CUDA now, so that restoring into
      // device slots by DMA costs no page-locking inside a failover's blocking window.
      if (cuda::CudaModel* gpu = cuda::CudaModelOf(*model_); st.ok() && gpu != nullptr) {
        const double t0 = NowSeconds();
        auto reg = gpu->PrepareRestore(*backup_);
        if (reg.ok())
          EEP_LOG_INFO("rank {}: {:.2f} GiB of backup mirror registered with CUDA in {:.0f} ms", id_,
                        static_cast<double>(*reg) / (1ull << 30), (NowSeconds() - t0) * 1e3);
        else
          EEP_LOG_WARN("rank {}: backup mirror not registered with CUDA ({}); restores will stage", id_,
                       reg.status().ToString());
      }
    }
    if (pos >= 0) {
      EEP_ASSIGN_OR_RETURN(comm_, MakeComm(members_, epoch_.load(), "serve"));
      if (eplb_async_) {
        EEP_ASSIGN_OR_RETURN(async_comm_, MakeComm(members_, epoch_.load(), "async"));
      }
      InstallExecutor();
    }
    const std::string fault = h.value("inject_fault", "");
    if (!fault.empty()) {
      EEP_ASSIGN_OR_RETURN(FaultSpec f, ParseFaultSpec(fault));
      if (f.rank == id_) fault_ = f;
    }
    load_.assign(c.MoeLayers().size() * static_cast<size_t>(c.num_experts), 0);
    auto observer = [this, E = c.num_experts](int64_t ml, const int32_t* ids, int64_t n) {
      for (int64_t i = 0; i < n; ++i) ++load_[static_cast<size_t>(ml * E + ids[i])];
    };
    model_->SetRouteCounter(observer);  // only counted: CUDA may count on the device
    return Status::Ok();
  }

  // A CUDA rank's first prefill, decode step and expert rows pay one-time costs (scratch
  // buffers, cuBLAS's first BF16 GEMMs, first launches of kernels): 70-230 ms measured, which a
  // rank joining a scale-up paid inside the first steps after its switch, every other rank
  // waiting for it. Paid here, at start-up, on dummy data: a prefill and a decode step with
  // the routed experts answered by zeros (no peers involved), then expert rows on a zeroed
  // slot of MoE layer 0 (held for the purpose if this rank holds none yet).
  Status WarmUp(cuda::CudaModel* gpu) {
    const ModelConfig& c = config();
    if (c.MoeLayers().empty()) return Status::Ok();
    const double t0 = NowSeconds();
    struct Zeros : MoeExecutor {
      int64_t hidden = 0;
      Status Run(int64_t, const float*, int64_t num_tokens, int64_t, const int32_t*, const float*, float* out) override {
        std::fill(out, out + num_tokens * hidden, 0.0f);
        return Status::Ok();
      }
    } zeros;
    zeros.hidden = c.hidden_size;
    model_->SetMoeExecutor(&zeros);
    auto cache = model_->NewCache();
    std::vector<int64_t> prompt(kWarmUpTokens);
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int64_t>(i % static_cast<size_t>(c.vocab_size));
    std::vector<int64_t> next = {1};
    std::vector<float> logits;
    Status st;
    for (const auto* ids : {&prompt, &next}) {
      ComputeStep step{cache.get(), *ids, false, &logits};
      if (st.ok()) st = model_->Forward(std::span<ComputeStep>(&step, 1));
    }
    model_->SetMoeExecutor(nullptr);
    EEP_RETURN_IF_ERROR_CTX(st, "forward");
    // Expert rows (zero inputs: the slot is only read) on a held slot, or on slot 0 held for
    // the purpose (zeroed) by a rank that holds none yet.
    const ExpertMap& map = experts_->map();
    const bool borrowed = experts_->slot_begin() == experts_->slot_end();
    const int64_t slot = experts_->slot_begin();
    const auto rows = [&]() -> Status {
      if (borrowed) {
        EEP_RETURN_IF_ERROR(gpu->ConfigureExpertSlots(map, slot, slot + 1));
        EEP_ASSIGN_OR_RETURN(auto zero, cuda::DeviceMemory::Allocate(gpu->device(), static_cast<uint64_t>(gpu->slot_bytes())));
        const std::vector<uint8_t> host_zeros(static_cast<size_t>(gpu->slot_bytes()), 0);
        EEP_RETURN_IF_ERROR(zero->CopyFromHost(0, host_zeros.data(), host_zeros.size()));
        EEP_RETURN_IF_ERROR(gpu->SetSlotFromDevice(0, slot, zero->data()));
      }
      const std::vector<int32_t> slots(kWarmUpTokens, static_cast<int32_t>(slot));
      std::vector<float> x(static_cast<size_t>(kWarmUpTokens * c.hidden_size), 0.0f), y(x.size());
      return gpu->RunExpertRows(0, slots.data(), x.data(), kWarmUpTokens, y.data());
    };
    st = rows();
    // The borrowed slot is given back whatever happened.
    if (borrowed) {
      Status back = gpu->ConfigureExpertSlots(map, slot, slot);
      if (st.ok()) st = back;
    }
    EEP_RETURN_IF_ERROR_CTX(st, "expert rows");
    EEP_LOG_INFO("rank {}: warmed up in {:.0f} ms", id_, (NowSeconds() - t0) * 1e3);
    return Status::Ok();
  }

  // Injected faults fire once this rank has completed `after_steps` steps, at the start of
  // the next step (at=step) or inside the next EPLB weight exchange (at=eplb).
  void MaybeInjectFault(const std::string& where) {
    if (!fault_ || fault_->at != where || steps_done_ < fault_->after_steps) return;
    if (where == "step" && steps_done_ != fault_->after_steps) return;
    const FaultSpec f = *fault_;
    fault_.reset();
    EEP_LOG_WARN("rank {}: injecting fault '{}' at {} after {} steps", id_, f.mode, where, steps_done_);
    if (f.mode == "kill") raise(SIGKILL);
    if (f.mode == "hang") raise(SIGSTOP);  // alive but silent, like a wedged GPU
    if (f.mode == "slow") std::this_thread::sleep_for(std::chrono::milliseconds(3 * peer_timeout_ms_));
  }

  // Whether `m` continues the run-ahead step: the same sequences in the same order, each fed
  // the token this rank sent for it, greedy, no logits, nothing released or switched.
  bool ContinuesRunAhead(const ControlMessage& m) const {
    const auto& h = m.header;
    if (h.value("type", "") != "step" || h.value("switch", false) || !h.value("release", nlohmann::json::array()).empty())
      return false;
    const auto& in = h["seqs"];
    if (in.size() != ahead_.seqs.size()) return false;
    for (size_t i = 0; i < in.size(); ++i) {
      const auto& s = in[i];
      if (s["seq"].get<int64_t>() != ahead_.seqs[i] || s.value("replay", false) || s["logits"].get<bool>() ||
          s["all_logits"].get<bool>() || s["temperature"].get<double>() > 0 ||
          s["ids"] != nlohmann::json::array({ahead_.fed[i]}))
        return false;
    }
    return true;
  }

  // Waits for the run-ahead step, if one is queued; true when `next` (null: a command other than
  // a step) continues it: its tokens are then in ahead_.tokens and its expert load in load_.
  // Otherwise it is undone: each cache forgets the position it wrote.
  Result<bool> SettleRunAhead(const ControlMessage* next) {
    if (!ahead_.active) return false;
    ahead_.active = false;
    std::fill(load_.begin(), load_.end(), 0);
    Status st = cuda::CudaModelOf(*model_)->Collect();
    const bool use = st.ok() && next != nullptr && ContinuesRunAhead(*next);
    if (!use) {
      for (size_t i = 0; i < ahead_.seqs.size(); ++i) {
        auto it = seqs_.find(ahead_.seqs[i]);
        if (it != seqs_.end()) it->second.cache->Truncate(it->second.length() - 1);
      }
      std::fill(load_.begin(), load_.end(), 0);
    }
    EEP_RETURN_IF_ERROR_CTX(st, "run-ahead step");
    return use;
  }

  // After a step whose sequences all decode greedily on a sole CUDA rank: the next step, each
  // fed the token just produced (still on the device), is queued at once, so the GPU computes
  // it while the reply goes to the coordinator and its next step comes back (vLLM's and
  // SGLang's overlapped scheduling, for the one case where the next input is known).
  void StartRunAhead(const nlohmann::json& in, const std::vector<int64_t>& tokens, const std::vector<bool>& greedy_only) {
    cuda::CudaModel* gpu = cuda::CudaModelOf(*model_);
    if (!run_ahead_ || gpu == nullptr || executor_ != nullptr || fault_ || in.empty()) return;
    std::vector<cuda::CudaSeqStep> steps;
    ahead_.seqs.clear();
    ahead_.fed.clear();
    ahead_.tokens.assign(in.size(), -1);
    static constexpr int64_t kDev[1] = {cuda::CudaModel::kDeviceToken};
    for (size_t i = 0; i < in.size(); ++i) {
      if (!greedy_only[i] || in[i]["all_logits"].get<bool>()) return;
      auto it = seqs_.find(in[i]["seq"].get<int64_t>());
      cuda::CudaKvCache* kv = it != seqs_.end() ? cuda::CudaKvCacheOf(*it->second.cache) : nullptr;
      if (kv == nullptr) return;
      ahead_.seqs.push_back(it->first);
      ahead_.fed.push_back(tokens[i]);
      steps.push_back({kv, kDev, false, nullptr, &ahead_.tokens[i]});
    }
    if (Status st = gpu->Submit(steps); !st.ok()) {
      EEP_LOG_DEBUG("rank {}: no run-ahead step: {}", id_, st.ToString());
      return;
    }
    ahead_.active = true;
  }

  Result<ControlMessage> Step(const ControlMessage& m) {
    if (!comm_) return Status::Internal(fmt::format("rank {} got a step before joining", id_));
    MaybeInjectFault("step");
    EEP_ASSIGN_OR_RETURN(const bool ahead, SettleRunAhead(&m));
    nlohmann::json eplb_report;
    if (m.header.value("switch", false)) {
      EEP_ASSIGN_OR_RETURN(auto sw, SwitchRebalance());
      eplb_report = {{"stall_s", sw.first}, {"bytes_received", sw.second}};
    }
    for (const auto& id : m.header["release"]) seqs_.erase(id.get<int64_t>());
    if (!ahead) std::fill(load_.begin(), load_.end(), 0);  // (else: the run-ahead step's load)
    const auto& in = m.header["seqs"];
    // Remember what this step changes, for a rollback if it is aborted.
    snapshot_.clear();
    snapshot_step_ = m.header["step"].get<int64_t>();
    for (const auto& s : in) {
      const int64_t id = s["seq"].get<int64_t>();
      auto it = seqs_.find(id);
      SeqSnapshot snap;
      // (A run-ahead step has already appended this step's position.)
      if (it != seqs_.end()) snap = {true, it->second.length() - (ahead ? 1 : 0), it->second.rng};
      snapshot_[id] = std::move(snap);
    }
    std::vector<ComputeStep> batch;
    std::vector<std::vector<int64_t>> ids;
    std::vector<std::vector<float>> logits;
    // Greedy sequences that return no logits take the argmax the backend computes (CUDA: on the
    // device, so [vocab] floats per sequence neither cross PCIe nor get scanned on the host).
    std::vector<int64_t> greedy(in.size(), -1);
    std::vector<bool> greedy_only(in.size(), false);
    ids.reserve(in.size());
    logits.resize(in.size());
    for (const auto& s : in) {
      const int64_t id = s["seq"].get<int64_t>();
      auto it = seqs_.find(id);
      if (it == seqs_.end() || s.value("replay", false)) {
        // A new sequence, or one resumed here after its rank failed or left: prompt and the
        // tokens produced so far are prefilled, and the sampler continues where it was.
        std::mt19937_64 rng(s["seed"].get<uint64_t>());
        rng.discard(s.value("rng_skip", uint64_t{0}));
        SeqState state;
        state.rng = rng;
        state.cache = model_->NewCache();
        it = seqs_.insert_or_assign(id, std::move(state)).first;
      }
      ids.push_back(s["ids"].get<std::vector<int64_t>>());
      const size_t i = ids.size() - 1;
      greedy_only[i] = s["temperature"].get<double>() <= 0 && !s["logits"].get<bool>();
      batch.push_back({it->second.cache.get(), ids.back(), s["all_logits"].get<bool>(),
                       greedy_only[i] ? nullptr : &logits[i], greedy_only[i] ? &greedy[i] : nullptr});
    }
    const double t_fwd = NowSeconds();
    if (ahead)
      greedy = ahead_.tokens;  // computed while this step's message was on its way
    else
      EEP_RETURN_IF_ERROR(model_->Forward(batch));
    if (const double ms = (NowSeconds() - t_fwd) * 1e3; ms > kSlowStepMs)
      EEP_LOG_DEBUG("rank {}: step {} forward took {:.1f} ms ({} sequence(s), {} token(s))", id_, snapshot_step_, ms,
                    batch.size(), [&] {
                      size_t n = 0;
                      for (const auto& b : batch) n += b.ids.size();
                      return n;
                    }());
    ++steps_done_;
    ControlMessage out;
    out.header = {{"type", "step_done"}, {"outputs", nlohmann::json::array()}};
    // The expert load: (index, count) pairs when most experts got no token (decode at small
    // batch: 64 of 1024 entries for Qwen3-30B-A3B's 8 layers at batch 1), else every count.
    const auto nonzero = std::count_if(load_.begin(), load_.end(), [](int64_t v) { return v != 0; });
    if (2 * static_cast<size_t>(nonzero) < load_.size()) {
      nlohmann::json nz = nlohmann::json::array();
      for (size_t i = 0; i < load_.size(); ++i)
        if (load_[i] != 0) nz.push_back(i), nz.push_back(load_[i]);
      out.header["load_nz"] = std::move(nz);
    } else {
      out.header["load"] = load_;
    }
    if (!eplb_report.is_null()) out.header["eplb"] = eplb_report;
    // The coordinator switches only once every rank's background exchange is complete.
    if (async_.valid()) out.header["eplb_ready"] = async_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
    const int64_t V = config().vocab_size;
    std::vector<int64_t> sent(in.size(), -1);
    for (size_t i = 0; i < in.size(); ++i) {
      const auto& s = in[i];
      const int64_t id = s["seq"].get<int64_t>();
      SamplingParams sp{s["temperature"].get<double>(), s["top_p"].get<double>(), s["top_k"].get<int64_t>(),
                        s["seed"].get<uint64_t>()};
      int64_t token = greedy[i];
      if (!greedy_only[i]) {
        const float* last = logits[i].data() + logits[i].size() - static_cast<size_t>(V);
        token = SampleToken(last, V, sp, &seqs_[id].rng);
      }
      sent[i] = token;
      nlohmann::json o{{"seq", id}, {"token", token}};
      if (s["logits"].get<bool>()) {
        // A replayed sequence returns only the rows of this step's own tokens.
        const size_t skip = std::min(logits[i].size() / static_cast<size_t>(V) - 1, s.value("logits_skip", size_t{0}));
        const size_t n = logits[i].size() - skip * static_cast<size_t>(V);
        o["num_logits"] = n;
        out.payload.append(reinterpret_cast<const char*>(logits[i].data() + skip * static_cast<size_t>(V)), n * sizeof(float));
      }
      out.header["outputs"].push_back(o);
    }
    StartRunAhead(in, sent, greedy_only);
    return out;
  }

  // Undoes the step `step` if it was the last one run here (idempotent).
  void Rollback(int64_t step) {
    if (step < 0 || step != snapshot_step_) return;
    for (auto& [id, snap] : snapshot_) {
      if (!snap.existed) {
        seqs_.erase(id);
        continue;
      }
      auto it = seqs_.find(id);
      if (it == seqs_.end()) continue;
      it->second.Truncate(snap.length);
      it->second.rng = snap.rng;
    }
  }

  Result<ControlMessage> Hold(const ControlMessage& m) {
    const int64_t epoch = m.header["epoch"].get<int64_t>();
    epoch_.store(epoch);
    AbortBefore(epoch);
    if (async_.valid()) {
      (void)async_.get();  // aborted above: returns promptly
      async_ = {};
    }
    staged_.reset();
    next_comms_.clear();
    PruneComms();
    (void)FinishPrefetch(true);  // what it read counts as held (cached) below
    Rollback(m.header.value("rollback_step", int64_t{-1}));
    if (m.header.value("drop_seqs", false)) {
      // A new coordinator: the sequences of the old one are gone with its clients.
      seqs_.clear();
      snapshot_.clear();
      snapshot_step_ = -1;
    }
    // What each held slot holds, local slot order, per MoE layer.
    nlohmann::json holdings = nlohmann::json::array();
    const ExpertMap& map = experts_->map();
    for (int64_t l = 0; l < map.num_moe_layers(); ++l) {
      std::vector<int32_t> row;
      for (int64_t s = experts_->slot_begin(); s < experts_->slot_end(); ++s) row.push_back(map.LogicalAt(l, s));
      holdings.push_back(row);
    }
    nlohmann::json cached = nlohmann::json::array();
    for (const auto& [key, data] : prefetched_) cached.push_back({key.first, key.second});
    return ControlMessage{{{"type", "holding"}, {"holdings", holdings}, {"cached", cached}}, ""};
  }

  // A joining rank reads the experts it is planned to hold from the DRAM backup (the
  // checkpoint if the backup fails) while the others go on serving, so that the switch
  // itself moves (almost) nothing.
  // Reads the experts this rank is planned to hold after a scaling step (a joining rank, or a
  // serving one that takes over a leaving rank's experts) from the DRAM backup in the
  // background, while steps go on; "prefetched" is sent when done (FinishPrefetch).
  Result<ControlMessage> Prefetch(const ControlMessage& m) {
    std::vector<std::tuple<int64_t, int64_t, int32_t, int>> fetch;  // (layer, index, expert, source)
    for (const auto& it : m.header["experts"])
      fetch.emplace_back(it[0].get<int64_t>(), static_cast<int64_t>(fetch.size()), it[1].get<int32_t>(), kFromBackup);
    if (prefetch_.valid()) (void)prefetch_.get();  // a previous plan's: superseded
    prefetch_epoch_ = m.header.value("epoch", epoch_.load());
    prefetch_ = std::async(std::launch::async, [this, fetch]() -> Result<Prefetched> {
      const double t0 = NowSeconds();
      Prefetched out;
      Staged staged;
      EEP_RETURN_IF_ERROR(StageFetched(fetch, &staged));
      for (auto& slot : staged.slots) {
        const auto& f = fetch[static_cast<size_t>(slot.slot)];
        out.experts[{std::get<0>(f), std::get<2>(f)}] = std::move(slot.data);
      }
      staged.seconds = NowSeconds() - t0;
      out.report = staged.Report();
      return out;
    });
    return ControlMessage{{{"type", "none"}}, ""};  // answered later
  }

  // Takes in a finished background prefetch (or waits for it when `wait`). Returns the message
  // that reports it, if one is due.
  std::optional<ControlMessage> FinishPrefetch(bool wait) {
    if (!prefetch_.valid()) return std::nullopt;
    if (!wait && prefetch_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return std::nullopt;
    auto done = prefetch_.get();
    nlohmann::json header{{"type", "prefetched"}, {"epoch", prefetch_epoch_}};
    if (done.ok()) {
      for (auto& [key, data] : done->experts) prefetched_[key] = std::move(data);
      header["restore"] = done->report;
    } else {
      header["error"] = done.status().ToString();  // only costs the switch more
    }
    return ControlMessage{header, ""};
  }

  Result<ControlMessage> BuildComm(const ControlMessage& m) {
    const int64_t epoch = m.header["epoch"].get<int64_t>();
    const auto members = m.header["members"].get<std::vector<int>>();
    const std::string tag = m.header["tag"].get<std::string>();
    // After a death the survivors' communicators are shrunk from the current ones where the
    // backend can (nccl with EEP_NCCL_SHRINK=1), else made anew.
    EEP_ASSIGN_OR_RETURN(auto shrunk, ShrinkComm(comm_.get(), members_, members, epoch));
    if (shrunk) {
      next_comms_[tag] = std::move(shrunk);
    } else {
      EEP_ASSIGN_OR_RETURN(next_comms_[tag], MakeComm(members, epoch, tag));
    }
    if (m.header.value("async", false)) {
      EEP_ASSIGN_OR_RETURN(auto shrunk_async, ShrinkComm(async_comm_.get(), members_, members, epoch));
      if (shrunk_async) {
        next_comms_[tag + "-async"] = std::move(shrunk_async);
      } else {
        EEP_ASSIGN_OR_RETURN(next_comms_[tag + "-async"], MakeComm(members, epoch, tag + "-async"));
      }
    }
    return ControlMessage{{{"type", "comm_ready"}}, ""};
  }

  Result<ControlMessage> Stage(const ControlMessage& m) {
    const std::string tag = m.header["comm"].get<std::string>();
    Communicator* comm = nullptr;
    std::vector<int> ex_members;
    if (tag == "current") {
      comm = comm_.get();
      ex_members = members_;
    } else {
      auto it = next_comms_.find(tag);
      if (it == next_comms_.end()) return Status::Internal(fmt::format("stage over unknown communicator '{}'", tag));
      comm = it->second.get();
      ex_members = m.header["comm_members"].get<std::vector<int>>();
    }
    const double t0 = NowSeconds();
    EEP_ASSIGN_OR_RETURN(Staged staged, StageTransfers(m.header["items"], comm, ex_members,
                                                       m.header["members"].get<std::vector<int>>(),
                                                       m.header["slots_per_rank"].get<int64_t>()));
    staged.seconds = NowSeconds() - t0;
    ControlMessage reply{{{"type", "staged"}, {"restore", staged.Report()}}, ""};
    staged_ = std::make_unique<Staged>(std::move(staged));
    return reply;
  }

  // Returns false when this rank is not among the new members (it leaves).
  Result<bool> Commit(const ControlMessage& m, ControlMessage* reply) {
    const auto members = m.header["members"].get<std::vector<int>>();
    const int pos = PositionOf(members, id_);
    if (pos < 0) {
      *reply = {{{"type", "bye"}}, ""};
      return false;
    }
    const int64_t S = m.header["slots_per_rank"].get<int64_t>();
    EEP_ASSIGN_OR_RETURN(ExpertMap next, ExpertMap::FromPhy2Log(m.header["phy2log"].get<std::vector<std::vector<int32_t>>>(),
                                                                config().num_experts));
    const std::string tag = m.header["comm"].get<std::string>();
    auto it = next_comms_.find(tag);
    if (it == next_comms_.end()) return Status::Internal(fmt::format("commit to unknown communicator '{}'", tag));
    layout_ = LayoutFor(config().num_experts, members.size(), S);
    experts_->Relayout(std::move(next), layout_.FirstSlot(pos), layout_.FirstSlot(pos) + S);
    std::vector<std::pair<int64_t, int64_t>> filled;
    // Kept to the end of the switch: its device staging is read by SyncDeviceSlots.
    std::unique_ptr<Staged> staged = std::move(staged_);
    if (staged) filled = FillStaged(staged.get());
    DiscardLater(std::exchange(prefetched_, {}));
    const double t_sync = NowSeconds();
    EEP_RETURN_IF_ERROR(SyncDeviceSlots(filled, staged.get()));
    if (cuda::CudaModelOf(*model_) != nullptr)
      EEP_LOG_INFO("rank {}: device slots at the switch in {:.1f} ms ({} slot(s), {} by DMA from the mirror)", id_,
                   (NowSeconds() - t_sync) * 1e3, filled.size(), staged ? staged->device_direct.size() : 0);
    comm_ = it->second;
    auto ait = next_comms_.find(tag + "-async");
    async_comm_ = ait == next_comms_.end() ? nullptr : ait->second;
    next_comms_.clear();
    members_ = members;
    PruneComms();
    InstallExecutor();
    *reply = {{{"type", "committed"}}, ""};
    return true;
  }

  // Device buffers to and from peers: the communicator's own GPU-to-GPU path where it has one,
  // else staged through the host in one AllToAllV (collective: every rank of `comm` calls it).
  // For each ordered pair the k-th send lands in the k-th receive; sizes must agree.
  Status ExchangeDeviceSpans(Communicator* comm, const std::vector<Communicator::DeviceSpan>& sends,
                                    const std::vector<Communicator::DeviceSpan>& recvs) {
    if (comm->SupportsDeviceExchange()) return comm->ExchangeDevice(sends, recvs);
    const size_t world = static_cast<size_t>(comm->world_size());
    std::vector<size_t> out_bytes(world, 0);
    for (const auto& d : sends) out_bytes.at(static_cast<size_t>(d.peer)) += d.bytes;
    std::vector<std::vector<uint8_t>> out(world), in;
    std::vector<cuda::CopyItem> copies;
    for (size_t p = 0; p < world; ++p) out[p].resize(out_bytes[p]);
    std::fill(out_bytes.begin(), out_bytes.end(), 0);
    for (const auto& d : sends) {
      const size_t p = static_cast<size_t>(d.peer);
      copies.push_back({out[p].data() + out_bytes[p], d.data, d.bytes});
      out_bytes[p] += d.bytes;
    }
    const double t0 = NowSeconds();
    EEP_RETURN_IF_ERROR(cuda::CopyBatch(copies));
    const double t1 = NowSeconds();
    std::vector<std::span<const uint8_t>> spans(out.begin(), out.end());
    EEP_RETURN_IF_ERROR(comm->AllToAllV(spans, &in));
    const double t2 = NowSeconds();
    copies.clear();
    std::vector<size_t> taken(world, 0);
    for (const auto& d : recvs) {
      const size_t p = static_cast<size_t>(d.peer);
      if (p >= in.size() || in[p].size() - taken[p] < d.bytes)
        return Status::Corruption(fmt::format("device exchange: rank {} sent {} bytes, fewer than announced", d.peer,
                                              p < in.size() ? in[p].size() : 0));
      copies.push_back({d.data, in[p].data() + taken[p], d.bytes});
      taken[p] += d.bytes;
    }
    for (size_t p = 0; p < in.size(); ++p)
      if (taken[p] != in[p].size())
        return Status::Corruption(fmt::format("device exchange: rank {} sent {} bytes, {} announced", p, in[p].size(), taken[p]));
    EEP_RETURN_IF_ERROR(cuda::CopyBatch(copies));
    EEP_LOG_DEBUG("rank {}: device slots through the host: out {:.1f} ms, exchange {:.1f} ms, in {:.1f} ms", id_,
                  (t1 - t0) * 1e3, (t2 - t1) * 1e3, (NowSeconds() - t2) * 1e3);
    return Status::Ok();
  }

  // Moves the experts of a transfer plan ([layer, slot, expert, source] items; slot in the
  // layout of `dst_members` with S slots each; source a rank id, or -1 = DRAM backup, -2 =
  // checkpoint) into staging: every rank packs what it must send, one AllToAllV over `comm`
  // (whose positions are `ex_members`) moves it. Reads the current slots only, so it may run
  // beside forward passes (async EPLB).
  Result<Staged> StageTransfers(const nlohmann::json& items, Communicator* comm, const std::vector<int>& ex_members,
                                const std::vector<int>& dst_members, int64_t S) {
    const ModelConfig& c = config();
    const size_t expert_floats = static_cast<size_t>(3 * c.ExpertIntermediate() * c.hidden_size);
    const size_t expert_bytes = expert_floats * sizeof(float);
    const ExpertMap& old = experts_->map();
    auto dst_of = [&](int64_t slot) { return dst_members[static_cast<size_t>(slot / S)]; };
    const double t0 = NowSeconds();
    Staged staged;
    const size_t world = ex_members.size();
    // CUDA ranks send experts they hold straight from their device slots (BF16): GPU to GPU
    // where the communicator can (nccl), else through the host (half the bytes of the f32 copy).
    cuda::CudaModel* gpu = cuda::CudaModelOf(*model_);
    const size_t slot_bytes = gpu != nullptr ? static_cast<size_t>(gpu->slot_bytes()) : 0;
    std::vector<Communicator::DeviceSpan> dev_sends;
    struct LocalMove {
      int64_t layer, slot, from;
    };
    std::vector<LocalMove> local_moves;
    std::vector<std::vector<uint8_t>> send(world);
    std::vector<size_t> send_bytes(world, 0);
    for (const auto& it : items)
      if (it[3].get<int>() == id_) {
        const int d = PositionOf(ex_members, dst_of(it[1].get<int64_t>()));
        if (d >= 0) send_bytes[static_cast<size_t>(d)] += kRecordHead + (gpu == nullptr ? expert_bytes : 0);
      }
    for (size_t d = 0; d < world; ++d) send[d].reserve(send_bytes[d]);
    std::vector<std::tuple<int64_t, int64_t, int32_t, int>> fetch;  // (layer, slot, expert, source) read here
    std::map<std::pair<int64_t, int32_t>, int> cache_uses;  // local uses of each prefetched expert
    const bool device_from_mirror = [&] {
      if (!backup_ || gpu == nullptr || c.MoeLayers().empty()) return false;
      const TensorInfo* t = checkpoint().Find(c.ExpertTensorNames(c.MoeLayers()[0], 0)[0]);
      return t != nullptr && t->dtype == DType::kBF16;
    }();
    for (const auto& it : items)
      if (it[3].get<int>() == id_ && dst_of(it[1].get<int64_t>()) == id_) ++cache_uses[{it[0].get<int64_t>(), it[2].get<int32_t>()}];
    for (const auto& it : items) {
      const int64_t l = it[0].get<int64_t>(), s = it[1].get<int64_t>();
      const int32_t e = it[2].get<int32_t>();
      const int src = it[3].get<int>(), dst = dst_of(s);
      if ((src == kFromBackup || src == kFromDisk) && dst == id_) fetch.emplace_back(l, s, e, src);
      if (src != id_) continue;
      const std::vector<float>* w = nullptr;
      int64_t held = -1;  // a slot of this rank holding the expert
      for (int32_t os : old.Replicas(l, e))
        if (experts_->Holds(os)) {
          w = &experts_->Slot(l, os).data;
          held = os;
        }
      auto cached = prefetched_.end();
      if (w == nullptr) {
        cached = prefetched_.find({l, e});  // a joining rank's prefetched expert
        if (cached != prefetched_.end()) w = &cached->second;
      }
      // On a CUDA rank a held expert's device slot is its only copy.
      const bool from_slot = gpu != nullptr && held >= 0;
      if (!from_slot && (w == nullptr || w->empty()))
        return Status::Internal(fmt::format("plan names rank {} as source of expert {} (layer {}), which it lacks", id_, e, l));
      // A move between this rank's own slots: DMA'd from the DRAM mirror at the switch where
      // one is mapped here (no staging to allocate and free inside a blocking window), else
      // slot to slot through the device staging.
      if (dst == id_ && from_slot && !device_from_mirror) {
        local_moves.push_back({l, s, held});
        continue;
      }
      if (dst == id_) {
        // CUDA, a BF16 mirror mapped here: the slot is DMA'd from the mirror at the switch (a
        // prefetched host copy is not uploaded).
        if (device_from_mirror) {
          staged.slots.push_back({l, s, {}, nullptr});
          staged.device_direct.emplace_back(l, s, e);
          continue;
        }
        // A prefetched expert moves into its slot (copied only for a further replica here).
        if (cached != prefetched_.end() && --cache_uses[{l, e}] == 0) staged.slots.push_back({l, s, std::move(cached->second), nullptr});
        else staged.slots.push_back({l, s, *w, nullptr});
        continue;
      }
      const int d = PositionOf(ex_members, dst);
      if (d < 0) return Status::Internal(fmt::format("plan sends expert {} to rank {}, not in the exchange", e, dst));
      auto& buf = send[static_cast<size_t>(d)];
      const int32_t kind = from_slot ? kRecordDevice : kRecordF32;
      const int32_t head[4] = {static_cast<int32_t>(l), static_cast<int32_t>(s), e, kind};
      buf.insert(buf.end(), reinterpret_cast<const uint8_t*>(head), reinterpret_cast<const uint8_t*>(head) + sizeof head);
      if (kind == kRecordF32) {
        buf.insert(buf.end(), reinterpret_cast<const uint8_t*>(w->data()),
                   reinterpret_cast<const uint8_t*>(w->data()) + expert_bytes);
      } else {
        EEP_ASSIGN_OR_RETURN(void* addr, gpu->SlotAddress(l, held));
        dev_sends.push_back({d, addr, slot_bytes});
      }
    }
    const double t_packed = NowSeconds();
    EEP_RETURN_IF_ERROR(StageFetched(fetch, &staged, /*no_host=*/gpu != nullptr));
    const double t_fetched = NowSeconds();
    std::vector<std::span<const uint8_t>> spans;
    for (const auto& b : send) spans.emplace_back(b.data(), b.size());
    std::vector<std::vector<uint8_t>>& recv = staged.received;
    EEP_RETURN_IF_ERROR_CTX(comm->AllToAllV(spans, &recv), "expert weight exchange");
    const double t_records = NowSeconds();
    // Parse the records; device slots go to one staging buffer in arrival order.
    struct DevRecord {
      int64_t layer, slot;
      int32_t expert;
      int peer;
    };
    std::vector<DevRecord> dev_records;
    for (size_t src = 0; src < recv.size(); ++src) {
      const auto& buf = recv[src];
      const auto bad = [&](const std::string& why) {
        return Status::Corruption(fmt::format("expert exchange from rank {}: {} ({} bytes)", ex_members[src], why, buf.size()));
      };
      for (size_t off = 0; off < buf.size();) {
        if (buf.size() - off < kRecordHead) return bad("truncated record");
        int32_t head[4];
        std::memcpy(head, buf.data() + off, kRecordHead);
        off += kRecordHead;
        if (head[3] == kRecordF32) {
          if (buf.size() - off < expert_bytes) return bad("truncated expert");
          staged.slots.push_back({head[0], head[1], {}, buf.data() + off});
          off += expert_bytes;
          staged.bytes_peers += static_cast<int64_t>(expert_bytes);
        } else if (head[3] == kRecordDevice) {
          if (gpu == nullptr) return bad("a device slot sent to a rank without a GPU");
          dev_records.push_back({head[0], head[1], head[2], static_cast<int>(src)});
          staged.bytes_peers += static_cast<int64_t>(slot_bytes);
        } else {
          return bad(fmt::format("unknown record kind {}", head[3]));
        }
        ++staged.experts_peers;
      }
    }
    // Round two (CUDA ranks, every one of the exchange: over a host communicator it is a
    // collective): the device slots, into one staging buffer in record order, after this rank's
    // own slot-to-slot moves.
    if (gpu != nullptr) {
      const size_t staged_count = local_moves.size() + dev_records.size();
      if (staged_count > 0) {
        EEP_ASSIGN_OR_RETURN(auto mem, cuda::DeviceMemory::Allocate(gpu->device(), staged_count * slot_bytes));
        staged.device_staging = std::move(mem);
      }
      auto* base = staged_count > 0 ? static_cast<uint8_t*>(staged.device_staging->data()) : nullptr;
      std::vector<cuda::CopyItem> moves;
      for (size_t i = 0; i < local_moves.size(); ++i) {
        const LocalMove& m = local_moves[i];
        EEP_ASSIGN_OR_RETURN(void* from, gpu->SlotAddress(m.layer, m.from));
        moves.push_back({base + i * slot_bytes, from, slot_bytes});
        staged.device_staged.emplace_back(m.layer, m.slot, static_cast<int64_t>(i));
      }
      EEP_RETURN_IF_ERROR_CTX(cuda::CopyBatch(moves), "expert moves between slots");
      std::vector<Communicator::DeviceSpan> dev_recvs;
      for (size_t k = 0; k < dev_records.size(); ++k) {
        const DevRecord& r = dev_records[k];
        const size_t i = local_moves.size() + k;
        dev_recvs.push_back({r.peer, base + i * slot_bytes, slot_bytes});
        staged.device_staged.emplace_back(r.layer, r.slot, static_cast<int64_t>(i));
      }
      const double t_dev = NowSeconds();
      EEP_RETURN_IF_ERROR_CTX(ExchangeDeviceSpans(comm, dev_sends, dev_recvs), "expert weight exchange (device slots)");
      EEP_LOG_DEBUG("rank {}: exchange phases: pack {:.1f} ms, fetch {:.1f} ms, records {:.1f} ms, staging + local moves "
                    "{:.1f} ms, device slots {:.1f} ms ({} out, {} in, {})",
                    id_, (t_packed - t0) * 1e3, (t_fetched - t_packed) * 1e3, (t_records - t_fetched) * 1e3,
                    (t_dev - t_records) * 1e3, (NowSeconds() - t_dev) * 1e3, dev_sends.size(), dev_recvs.size(),
                    comm->SupportsDeviceExchange() ? "GPU to GPU" : "through the host");
    }
    return staged;
  }

  // Experts this rank reads itself: from the DRAM backup managers (checkpoint dtype, one
  // batched fetch per layer), falling back to the checkpoint on disk when the backup cannot
  // serve them (logged: it is the slow path).
  // no_host (CUDA ranks' switches): experts the device restores by DMA from the mapped mirror
  // get no host copy (Staged::device_direct).
  Status StageFetched(const std::vector<std::tuple<int64_t, int64_t, int32_t, int>>& fetch, Staged* staged,
                      bool no_host = false) {
    if (fetch.empty()) return Status::Ok();
    const ModelConfig& c = config();
    const auto moe_layers = c.MoeLayers();
    const size_t mat = static_cast<size_t>(c.ExpertIntermediate() * c.hidden_size);
    std::map<int64_t, std::vector<std::pair<int64_t, int32_t>>> from_backup;  // layer -> (slot, expert)
    std::vector<std::tuple<int64_t, int64_t, int32_t>> from_disk;
    for (const auto& [l, s, e, src] : fetch) {
      if (src == kFromBackup) from_backup[l].emplace_back(s, e);
      else from_disk.emplace_back(l, s, e);
    }
    for (const auto& [l, list] : from_backup) {
      const int64_t layer_id = moe_layers[static_cast<size_t>(l)];
      std::vector<int64_t> ids;
      for (const auto& [slot, e] : list)
        if (std::find(ids.begin(), ids.end(), e) == ids.end()) ids.push_back(e);
      const DType dtype = checkpoint().Find(c.ExpertTensorNames(layer_id, ids[0])[0])->dtype;
      const size_t esize = DTypeSize(dtype);
      // Same host (shm): convert straight out of this process's mapping of the mirror, with no
      // intermediate copy of the stored bytes.
      if (backup_) {
        auto mapped = backup_->MapExpertParams(layer_id, ids, "");
        if (mapped.ok() && mapped->size() == 3 * ids.size()) {
          const auto where = MappedByName(*mapped, mat * esize);
          bool complete = true;
          for (int64_t e : ids)
            for (const auto& name : c.ExpertTensorNames(layer_id, e)) {
              auto it = where.find(name);
              complete = complete && it != where.end() && it->second != nullptr;
            }
          const bool direct = dtype == DType::kBF16 && cuda::CudaModelOf(*model_) != nullptr;
          if (complete && direct && no_host) {
            for (const auto& [slot, e] : list) {
              staged->slots.push_back({l, slot, {}, nullptr});
              staged->device_direct.emplace_back(l, slot, e);
              ++staged->experts_backup;
            }
            staged->bytes_backup += static_cast<int64_t>(ids.size() * 3 * mat * esize);
            continue;
          }
          if (complete) {
            // The host copies (the record, and the source of peer transfers), converted on a few
            // threads: one thread converts ~2 GB/s, and this is inside a failover's blocking window.
            std::vector<std::vector<float>> datas(list.size());
            EEP_RETURN_IF_ERROR(ParallelFor(list.size(), [&](size_t i) -> Status {
              datas[i].resize(3 * mat);
              return ConvertExpert(c.ExpertTensorNames(layer_id, list[i].second), where, dtype, mat, datas[i].data());
            }));
            for (size_t i = 0; i < list.size(); ++i) {
              const auto& [slot, e] = list[i];
              staged->slots.push_back({l, slot, std::move(datas[i]), nullptr});
              if (direct) staged->device_direct.emplace_back(l, slot, e);
              ++staged->experts_backup;
            }
            staged->bytes_backup += static_cast<int64_t>(ids.size() * 3 * mat * esize);
            continue;
          }
        }
      }
      std::vector<std::vector<uint8_t>> raw(ids.size(), std::vector<uint8_t>(3 * mat * esize));
      backup::FetchDestinations dest;
      for (size_t i = 0; i < ids.size(); ++i) {
        const auto names = c.ExpertTensorNames(layer_id, ids[i]);
        for (int m = 0; m < 3; ++m) dest[names[static_cast<size_t>(m)]] = {raw[i].data() + m * mat * esize, mat * esize};
      }
      Status st = backup_ ? backup_->FetchLogicalExperts(layer_id, ids, "", dest)
                          : Status::Unavailable("the DRAM backup is not configured");
      if (!st.ok()) {
        EEP_LOG_WARN("rank {}: DRAM backup cannot serve layer {} ({}); reading {} expert(s) from the checkpoint", id_,
                     layer_id, st.ToString(), list.size());
        for (const auto& [slot, e] : list) from_disk.emplace_back(l, slot, e);
        continue;
      }
      for (const auto& [slot, e] : list) {
        const size_t i = static_cast<size_t>(std::find(ids.begin(), ids.end(), e) - ids.begin());
        std::vector<float> data(3 * mat);
        EEP_RETURN_IF_ERROR(ConvertToF32(dtype, raw[i].data(), 3 * mat, data.data()));
        staged->slots.push_back({l, slot, std::move(data), nullptr});
        ++staged->experts_backup;
      }
      staged->bytes_backup += static_cast<int64_t>(ids.size() * 3 * mat * esize);
    }
    if (!from_disk.empty())
      EEP_LOG_WARN("rank {}: restoring {} expert(s) from the checkpoint on disk", id_, from_disk.size());
    for (const auto& [l, slot, e] : from_disk) {
      EEP_ASSIGN_OR_RETURN(auto data, ReadExpertFromDisk(l, e, &staged->bytes_disk));
      staged->slots.push_back({l, slot, std::move(data), nullptr});
      ++staged->experts_disk;
    }
    return Status::Ok();
  }

  // Staged experts go into their slots (the map was set by the caller). Returns the
  // (layer, slot) pairs filled.
  std::vector<std::pair<int64_t, int64_t>> FillStaged(Staged* staged) {
    std::vector<std::pair<int64_t, int64_t>> filled;
    const ModelConfig& c = config();
    const size_t expert_floats = static_cast<size_t>(3 * c.ExpertIntermediate() * c.hidden_size);
    for (auto& s : staged->slots) {
      auto& data = experts_->Slot(s.layer, s.slot).data;
      if (s.bytes == nullptr) {
        data = std::move(s.data);
      } else {
        data.resize(expert_floats);
        std::memcpy(data.data(), s.bytes, expert_floats * sizeof(float));
      }
      filled.emplace_back(s.layer, s.slot);
    }
    // Slots that come from the device staging: their host copies are made after the switch.
    for (const auto& [l, slot, i] : staged->device_staged) {
      auto& data = experts_->Slot(l, slot).data;
      data.clear();
      data.shrink_to_fit();
    }
    return filled;
  }

  // The switch of a rebalance (same members and layout): staged experts go into their slots
  // and the new map takes effect.
  Status ApplyStaged(Staged* staged, const nlohmann::json& phy2log) {
    EEP_ASSIGN_OR_RETURN(ExpertMap next, ExpertMap::FromPhy2Log(phy2log.get<std::vector<std::vector<int32_t>>>(),
                                                                config().num_experts));
    const auto filled = FillStaged(staged);
    experts_->SetMap(std::move(next));
    const double t0 = NowSeconds();
    EEP_RETURN_IF_ERROR(SyncDeviceSlots(filled, staged));
    if (cuda::CudaModelOf(*model_) != nullptr)
      EEP_LOG_DEBUG("rank {}: rebalance switch: device slots in {:.1f} ms ({} from device staging, {} uploaded)", id_,
                    (NowSeconds() - t0) * 1e3, staged->device_staged.size(), filled.size());
    return Status::Ok();
  }

  Result<Staged> StageRebalance(const nlohmann::json& items, Communicator* comm) {
    MaybeInjectFault("eplb");
    return StageTransfers(items, comm, members_, members_, layout_.slots_per_rank);
  }

  // Synchronous rebalance: stage and switch now (the whole exchange is stall).
  Result<ControlMessage> Rebalance(const ControlMessage& m) {
    EEP_ASSIGN_OR_RETURN(Staged staged, StageRebalance(m.header["items"], comm_.get()));
    EEP_RETURN_IF_ERROR(ApplyStaged(&staged, m.header["phy2log"]));
    return ControlMessage{{{"type", "eplb_done"}, {"restore", staged.Report()}, {"bytes_received", staged.bytes_peers}}, ""};
  }

  // Asynchronous rebalance: the exchange runs on a second communicator in the background
  // while steps go on; the next step carrying "switch" applies it.
  Result<ControlMessage> PrepareRebalance(const ControlMessage& m) {
    if (!async_comm_) return Status::InvalidArgument("async EPLB needs the engine started with eplb_async");
    if (async_.valid()) return Status::Internal("a rebalance is already in flight");
    pending_phy2log_ = m.header["phy2log"];
    async_ = std::async(std::launch::async,
                        [this, items = m.header["items"], comm = async_comm_] { return StageRebalance(items, comm.get()); });
    return ControlMessage{{{"type", "eplb_started"}}, ""};
  }

  // Joins the background exchange and applies it; returns the stall in seconds.
  Result<std::pair<double, int64_t>> SwitchRebalance() {
    if (!async_.valid()) return Status::Internal("switch without a rebalance in flight");
    const double t0 = NowSeconds();
    Result<Staged> staged = async_.get();
    if (!staged.ok()) return staged.status();
    EEP_RETURN_IF_ERROR(ApplyStaged(&*staged, pending_phy2log_));
    return std::make_pair(NowSeconds() - t0, staged->bytes_peers);
  }

  // Raw communicator ceiling: `rounds` AllToAllV exchanges sending `bytes` to the next rank.
  Result<ControlMessage> BenchRing(const ControlMessage& m) {
    const int64_t bytes = m.header["bytes"].get<int64_t>();
    const int rounds = m.header["rounds"].get<int>();
    const int world = comm_->world_size(), me = comm_->rank();
    cuda::CudaModel* gpu = cuda::CudaModelOf(*model_);
    if (gpu != nullptr && comm_->SupportsDeviceExchange()) {
      // GPU to GPU: the raw send/recv of the communicator between device buffers.
      EEP_ASSIGN_OR_RETURN(auto out, cuda::DeviceMemory::Allocate(gpu->device(), static_cast<uint64_t>(bytes)));
      EEP_ASSIGN_OR_RETURN(auto in, cuda::DeviceMemory::Allocate(gpu->device(), static_cast<uint64_t>(bytes)));
      std::vector<Communicator::DeviceSpan> sends, recvs;
      if (world > 1) {
        sends.push_back({(me + 1) % world, out->data(), static_cast<size_t>(bytes)});
        recvs.push_back({(me + world - 1) % world, in->data(), static_cast<size_t>(bytes)});
      }
      const double t0 = NowSeconds();
      for (int i = 0; i < rounds; ++i) EEP_RETURN_IF_ERROR_CTX(comm_->ExchangeDevice(sends, recvs), "ring benchmark");
      return ControlMessage{{{"type", "bench_done"}, {"seconds", NowSeconds() - t0}, {"device", true}}, ""};
    }
    std::vector<uint8_t> payload(static_cast<size_t>(bytes), 0x5a);
    std::vector<std::span<const uint8_t>> send(static_cast<size_t>(world));
    if (world > 1) send[static_cast<size_t>((me + 1) % world)] = std::span<const uint8_t>(payload);
    std::vector<std::vector<uint8_t>> recv;
    const double t0 = NowSeconds();
    for (int i = 0; i < rounds; ++i) EEP_RETURN_IF_ERROR_CTX(comm_->AllToAllV(send, &recv), "ring benchmark");
    return ControlMessage{{{"type", "bench_done"}, {"seconds", NowSeconds() - t0}}, ""};
  }

  Result<ControlMessage> NextCommand() {
    if (!deferred_.empty()) {
      ControlMessage m = std::move(deferred_.front());
      deferred_.pop_front();
      return m;
    }
    // Ranks that follow a leader look for a new coordinator between commands.
    // A background prefetch is reported as soon as it ends: poll often while one runs.
    const int64_t idle_poll_ms = prefetch_.valid() ? 5 : coordinator_url_.empty() ? 1000 : 100;
    MaybeReconnect();
    if (auto done = FinishPrefetch(false)) (void)SendControl(socket_, "", *done);
    return RecvControl(socket_, nullptr, idle_poll_ms);
  }

  int Run(const std::string& endpoint, const std::string& hb_endpoint) {
    // Ranks must not outlive the process that started them (the coordinator, or on many
    // hosts the node agent: a rank then outlives a coordinator and follows the next one).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    control_endpoint_ = endpoint;
    try {
      socket_.set(zmq::sockopt::linger, 0);
      socket_.connect(endpoint);
    } catch (const zmq::error_t& e) {
      EEP_LOG_ERROR("rank {}: cannot connect to {}: {}", id_, endpoint, e.what());
      return 1;
    }
    if (!SendControl(socket_, "", {{{"type", "hello"}, {"rank", id_}, {"pid", getpid()}}, ""}).ok()) return 1;
    int rc = Serve(hb_endpoint);
    StopHeartbeat();
    return rc;
  }

  int Serve(const std::string& hb_endpoint) {
    bool heartbeating = false;
    while (true) {
      auto m = NextCommand();
      if (!m.ok()) {
        if (m.status().code() == StatusCode::kTimeout) continue;
        EEP_LOG_ERROR("rank {}: {}", id_, m.status().ToString());
        return 1;
      }
      const std::string type = m->header.value("type", "");
      const int64_t epoch = m->header.value("epoch", epoch_.load());
      Result<ControlMessage> reply = Status::Internal("no reply");
      bool leave = false;
      // Any other command may touch the slots, the map or the caches: the run-ahead step first.
      if (type != "step" && type != "allgather_result")
        if (auto settled = SettleRunAhead(nullptr); !settled.ok())
          EEP_LOG_WARN("rank {}: {}", id_, settled.status().ToString());
      if (type == "shutdown") return 0;
      if (type == "allgather_result") continue;  // of a round given up
      if (type == "init") {
        if (!heartbeating) {
          StartHeartbeat(hb_endpoint, m->header.value("heartbeat_interval_ms", int64_t{100}));
          heartbeating = true;
        }
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
      } else if (type == "hold") {
        reply = Hold(*m);
      } else if (type == "comm") {
        reply = BuildComm(*m);
      } else if (type == "stage") {
        reply = Stage(*m);
      } else if (type == "prefetch") {
        reply = Prefetch(*m);
      } else if (type == "commit") {
        ControlMessage out;
        auto stay = Commit(*m, &out);
        if (stay.ok()) {
          leave = !*stay;
          reply = std::move(out);
        } else {
          reply = stay.status();
        }
      } else {
        reply = Status::InvalidArgument("unknown command '" + type + "'");
      }
      if (!reply.ok()) {
        EEP_LOG_DEBUG("rank {}: {} (epoch {}): {}", id_, type, epoch, reply.status().ToString());
        nlohmann::json err{{"type", "error"},
                           {"code", static_cast<int>(reply.status().code())},
                           {"message", reply.status().message()},
                           {"epoch", epoch}};
        // Peers an exchange waited on in vain, by rank id: suspects for the coordinator.
        std::vector<int> suspects;
        if (comm_)
          for (int p : comm_->silent_peers())
            if (p >= 0 && p < static_cast<int>(members_.size())) suspects.push_back(members_[static_cast<size_t>(p)]);
        err["suspects"] = suspects;
        (void)SendControl(socket_, "", {err, ""});
        continue;
      }
      if (reply->header.value("type", "") == "none") continue;
      reply->header["epoch"] = epoch;
      if (!SendControl(socket_, "", *reply).ok()) return 1;
      if (leave) return 0;
    }
  }

 private:
  int id_;
  std::string session_;
  std::string coordinator_url_;  // etcd://...: follow the leader record
  ClusterKeys keys_;
  std::string control_endpoint_;
  std::mutex leader_mu_;
  std::string new_control_;  // GUARDED_BY(leader_mu_): set by the heartbeat thread
  std::atomic<int64_t> epoch_{0};
  std::vector<int> members_;
  std::string model_dir_, communicator_;
  bool eplb_async_ = false;
  zmq::context_t ctx_{1};
  zmq::socket_t socket_{ctx_, zmq::socket_type::dealer};
  std::deque<ControlMessage> deferred_;
  std::thread hb_thread_;
  std::atomic<bool> hb_stop_{false};
  std::mutex outbox_mu_;
  std::vector<int> suspects_out_;  // GUARDED_BY(outbox_mu_): silent peers to report
  std::mutex comm_mu_;
  std::vector<std::pair<std::shared_ptr<Communicator>, int64_t>> live_comms_;  // GUARDED_BY(comm_mu_)
  std::unique_ptr<ComputeModel> model_;  // cpu or cuda (cuda::CudaModelOf: the device slots)
  std::unique_ptr<Checkpoint> ckpt_;      // expert sources (disk)
  SlotLayout layout_;
  std::unique_ptr<LocalExperts> experts_;
  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<Communicator> async_comm_;  // background EPLB exchange
  std::map<std::string, std::shared_ptr<Communicator>> next_comms_;  // built for a membership change
  std::unique_ptr<Staged> staged_;
  // Host copies deferred at the last switch (Commit); joined before experts_ goes.
  std::map<std::pair<int64_t, int32_t>, std::vector<float>> prefetched_;  // (layer, expert), joining rank
  std::unique_ptr<backup::ExpertBackupClient> backup_;  // null when not configured
  std::future<Result<Staged>> async_;
  struct Prefetched {
    std::map<std::pair<int64_t, int32_t>, std::vector<float>> experts;
    nlohmann::json report;
  };
  std::future<Result<Prefetched>> prefetch_;  // background prefetch of a scaling step
  int64_t prefetch_epoch_ = 0;
  nlohmann::json pending_phy2log_;
  std::unique_ptr<EpMoeExecutor> executor_;
  // The run-ahead decode step (StartRunAhead): on unless EEP_RANK_RUN_AHEAD=0.
  struct RunAhead {
    bool active = false;
    std::vector<int64_t> seqs, fed;  // sequence ids, and the token each was fed
    std::vector<int64_t> tokens;     // its greedy tokens (written by Collect)
  };
  RunAhead ahead_;
  bool run_ahead_ = [] {
    const char* v = std::getenv("EEP_RANK_RUN_AHEAD");
    return v == nullptr || std::string(v) != "0";
  }();
  bool local_moe_logged_ = false;
  std::map<int64_t, SeqState> seqs_;
  std::map<int64_t, SeqSnapshot> snapshot_;
  int64_t snapshot_step_ = -1;
  std::vector<int64_t> load_;
  std::optional<FaultSpec> fault_;
  int64_t steps_done_ = 0;
  int64_t peer_timeout_ms_ = 1000;
};

}  // namespace

int RunRankWorker(const std::string& control_endpoint, const std::string& heartbeat_endpoint, int rank,
                  const std::string& session, const std::string& coordinator_url, const std::string& cluster) {
  RankWorker w(rank, session, coordinator_url, cluster);
  return w.Run(control_endpoint, heartbeat_endpoint);
}

}  // namespace eep::ep
