// eep bench restore: restoring one node's share of the experts from the DRAM backup versus
// reloading the same tensors from safetensors, versus the raw copy ceiling of the transport.
//
// What each number measures (all into destination buffers allocated and pre-faulted beforehand,
// as the runtime's expert buffers are):
//   restore   ExpertBackupClient::FetchLogicalExperts for every MoE layer (all of the share's
//             experts, one call per layer) from an `eep backup-manager` child process: BF16 bytes
//             into BF16 buffers. Connect (describe + import) happens before, off the clock.
//   ceiling   the same bytes moved with the transport and nothing else: one copy of the whole
//             mirror region from the same shm mapping, with glibc memcpy and with StreamingCopy
//             (shm), or a raw UCP ucp_get_nbx loop over the region on its own worker/endpoint,
//             in 2, 16 and 64 MiB pieces (ucx); every variant is printed, the fastest counts.
//   Restore and raw passes alternate round by round (the machine may be shared); medians.
//   reload    Checkpoint::Open (open files, parse and validate headers, mmap) and, per tensor,
//             what the CPU runtime does on load: BF16 -> F32 conversion into F32 buffers.
//             "BF16 copy" variant: the same with a plain copy (StreamingCopy, as the shm backend
//             uses), the floor of any reload.
//             warm: page cache warm; cold: after posix_fadvise(DONTNEED) on every shard, with
//             the share of pages still resident reported (a VM host may cache behind us).
//
// --backend cuda: the same share restored into a CudaModel's device expert slots by
// CudaModel::RestoreExperts from an `eep backup-manager --pin-memory` child (shm), both paths:
// direct (DMA out of the client's CUDA-registered mapping of the mirror) and staged
// (FetchLogicalExperts into a pinned staging buffer, double-buffered, cudaMemcpyAsync on a
// side stream); against
//   ceiling   pinned cudaMemcpy H2D of the same number of bytes (cudaHostAlloc buffer, events)
//   reload    Checkpoint::Open + per expert CudaModel::SetSlot (read the mmapped shard, convert
//             to BF16 on the host, pageable cudaMemcpy), warm and after DONTNEED (cold).
#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <thread>

#include "backup/backup.h"
#include "bench_buffer.h"
#include "command.h"
#include "core/util.h"
#include "cuda/cuda_model.h"
#include "model/config.h"
#include "model/make_model.h"
#include "model/safetensors.h"
#include "transfer/copy.h"
#include "transfer/transfer.h"
#include "transfer/ucx/ucx_engine.h"

extern char** environ;

namespace {

using eep::Result;
using eep::Status;

struct RestoreFlags {
  std::string model;
  double size_gib = 2.0;
  std::string transport = "all";
  int num_nodes = 2;
  int node_rank = 0;
  int repeat = 3;
  bool cold = true;
  std::string backend = "cpu";
  uint64_t staging_mib = 256;
};

constexpr uint64_t kGiB = 1ull << 30;
// Piece sizes tried by the raw UCX loop; the fastest counts as the ceiling.
constexpr uint64_t kRawPieceBytes[] = {2ull << 20, 16ull << 20, 64ull << 20};

using Buffer = eep::cli::BenchBuffer;

struct Stats {
  double median_s = 0, best_s = 0;
};
Stats Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front()};
}

std::string CpuName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// ---- checkpoint ----

Result<std::string> EnsureModel(const RestoreFlags& f) {
  if (!f.model.empty()) return f.model;
  // qwen3_moe, hidden 2048, expert size 768: 9 MiB per expert; 64 experts = 576 MiB per layer.
  eep::MakeModelOptions o;
  o.arch = eep::Arch::kQwen3Moe;
  o.hidden_size = 2048;
  o.moe_intermediate_size = 768;
  o.num_experts = 64;
  o.num_experts_per_tok = 8;
  const double layer_gib = 64 * 3.0 * 2048 * 768 * 2 / kGiB;
  o.num_layers = std::max<int64_t>(1, std::llround(f.size_gib / layer_gib));
  if (f.size_gib < layer_gib)
    o.num_experts = std::max<int64_t>(8, std::llround(f.size_gib / layer_gib * 64));
  o.seed = 1;
  o.show_progress = true;
  const char* tmp = std::getenv("TMPDIR");
  std::string dir =
      fmt::format("{}/eep-bench-restore-L{}-E{}", tmp ? tmp : "/tmp", o.num_layers, o.num_experts);
  if (std::filesystem::exists(dir + "/config.json") && eep::Checkpoint::Open(dir).ok()) {
    EEP_LOG_INFO("bench restore: reusing {}", dir);
    return dir;
  }
  EEP_LOG_INFO("bench restore: writing a {}-layer, {}-expert checkpoint into {} (~{:.2f} GiB)",
               o.num_layers, o.num_experts, dir, o.num_layers * layer_gib * o.num_experts / 64);
  EEP_RETURN_IF_ERROR(eep::MakeModel(o, dir));
  return dir;
}

std::vector<std::string> ShardFiles(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
  return files;
}

// Drops the shards from the page cache; returns the fraction of their pages still resident.
double DropPageCache(const std::vector<std::string>& files) {
  uint64_t pages = 0, resident = 0;
  const long page = sysconf(_SC_PAGESIZE);
  for (const auto& path : files) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) continue;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    struct stat st {};
    fstat(fd, &st);
    if (st.st_size > 0) {
      void* p = mmap(nullptr, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
      if (p != MAP_FAILED) {
        size_t n = (st.st_size + page - 1) / page;
        std::vector<unsigned char> vec(n);
        if (mincore(p, st.st_size, vec.data()) == 0)
          for (unsigned char c : vec) resident += c & 1;
        pages += n;
        munmap(p, st.st_size);
      }
    }
    ::close(fd);
  }
  return pages ? double(resident) / pages : 0.0;
}

// ---- the share ----

struct ShareParam {
  std::string name;
  uint64_t num_bytes;
  uint64_t dst_offset;  // in the packed BF16 destination (F32: twice)
};
struct Share {
  std::vector<int64_t> layers;
  std::vector<int64_t> experts;
  std::vector<ShareParam> params;
  uint64_t num_bytes = 0;
};

Share PlanShare(const eep::ModelConfig& config, const eep::Checkpoint& ckpt, int node_rank,
                int num_nodes) {
  Share s;
  s.layers = config.MoeLayers();
  for (int64_t e = 0; e < config.num_experts; ++e)
    if (eep::backup::NodeHoldsExpert(e, node_rank, num_nodes, 1)) s.experts.push_back(e);
  for (int64_t layer : s.layers)
    for (int64_t e : s.experts)
      for (const auto& name : config.ExpertTensorNames(layer, e)) {
        const eep::TensorInfo* t = ckpt.Find(name);
        uint64_t n = t ? t->nbytes : 0;
        s.params.push_back({name, n, s.num_bytes});
        s.num_bytes += n;
      }
  return s;
}

// Reload: open + parse + per tensor convert (or copy). Returns seconds.
Result<double> Reload(const std::string& dir, const Share& share, uint8_t* dst, bool convert) {
  double t0 = eep::NowSeconds();
  EEP_ASSIGN_OR_RETURN(auto ckpt, eep::Checkpoint::Open(dir));
  for (const ShareParam& p : share.params) {
    EEP_ASSIGN_OR_RETURN(const eep::TensorInfo* t, ckpt->Get(p.name));
    if (convert) {
      EEP_RETURN_IF_ERROR(eep::ConvertToF32(t->dtype, t->data, static_cast<size_t>(t->numel()),
                                            reinterpret_cast<float*>(dst + 2 * p.dst_offset)));
    } else {
      eep::transfer::StreamingCopy(dst + p.dst_offset, t->data, t->nbytes);
    }
  }
  return eep::NowSeconds() - t0;
}

// ---- manager child process ----

class ManagerChild {
 public:
  static Result<std::unique_ptr<ManagerChild>> Start(const std::string& model, int node_rank,
                                                     int num_nodes, const std::string& transport,
                                                     bool pin_memory = false) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return Status::Internal("pipe failed");
    std::vector<std::string> args = {"/proc/self/exe", "--log-level",
                                     "warn",           "backup-manager",
                                     "--model",        model,
                                     "--node-rank",    std::to_string(node_rank),
                                     "--num-nodes",    std::to_string(num_nodes),
                                     "--listen",       "tcp://127.0.0.1:0",
                                     "--transport",    transport};
    if (pin_memory) args.push_back("--pin-memory");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    std::unique_ptr<ManagerChild> child(new ManagerChild());
    int rc = posix_spawn(&child->pid_, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    child->fd_ = fds[0];
    if (rc != 0)
      return Status::Internal(fmt::format("cannot start backup-manager: {}", std::strerror(rc)));
    std::string line;
    double deadline = eep::NowSeconds() + 600;
    char c;
    while (eep::NowSeconds() < deadline) {
      pollfd p{child->fd_, POLLIN, 0};
      if (poll(&p, 1, 1000) <= 0) continue;
      if (read(child->fd_, &c, 1) != 1)
        return Status::Unavailable("backup-manager exited before listening");
      if (c == '\n') break;
      line += c;
    }
    if (line.rfind("listening ", 0) != 0)
      return Status::Unavailable("backup-manager did not print `listening`");
    child->endpoint_ = line.substr(10);
    return child;
  }
  ~ManagerChild() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status;
      waitpid(pid_, &status, 0);
    }
    if (fd_ >= 0) ::close(fd_);
  }
  const std::string& endpoint() const { return endpoint_; }

 private:
  ManagerChild() = default;
  pid_t pid_ = -1;
  int fd_ = -1;
  std::string endpoint_;
};

// ---- raw ceilings ----

// Moves the whole mirror region into `dst` with the bare transport, one way per variant.
class RawCeiling {
 public:
  virtual ~RawCeiling() = default;
  virtual std::vector<std::string> Variants() const = 0;
  // Seconds for one pass of variant `v`.
  virtual Result<double> Once(size_t v) = 0;
};

// shm: one copy of the region from the same mapping the backend reads, with glibc memcpy or
// with the backend's StreamingCopy.
class RawShm final : public RawCeiling {
 public:
  static Result<std::unique_ptr<RawCeiling>> Create(const eep::transfer::RegionDescriptor& region,
                                                    uint8_t* dst) {
    std::unique_ptr<RawShm> r(new RawShm());
    EEP_ASSIGN_OR_RETURN(r->engine_, eep::transfer::CreateEngine("shm"));
    EEP_ASSIGN_OR_RETURN(r->remote_, r->engine_->Import(region));
    r->dst_ = dst;
    r->num_bytes_ = region.num_bytes;
    return std::unique_ptr<RawCeiling>(std::move(r));
  }
  ~RawShm() override { remote_.reset(); }
  std::vector<std::string> Variants() const override {
    return {"one memcpy() of the region", "one streaming copy of the region"};
  }
  Result<double> Once(size_t v) override {
    double t0 = eep::NowSeconds();
    if (v == 0)
      std::memcpy(dst_, remote_->mapped_data(), num_bytes_);
    else
      eep::transfer::StreamingCopy(dst_, remote_->mapped_data(), num_bytes_);
    return eep::NowSeconds() - t0;
  }

 private:
  RawShm() = default;
  std::unique_ptr<eep::transfer::Engine> engine_;
  std::unique_ptr<eep::transfer::RemoteRegion> remote_;
  uint8_t* dst_ = nullptr;
  uint64_t num_bytes_ = 0;
};

// ucx: raw UCP on its own context/worker/endpoint: ucp_get_nbx over the whole region in pieces
// of 2, 16 or 64 MiB, all posted, then progressed to completion.
class RawUcx final : public RawCeiling {
 public:
  static Result<std::unique_ptr<RawCeiling>> Create(const eep::transfer::RegionDescriptor& region,
                                                    uint8_t* dst) {
    std::unique_ptr<RawUcx> r(new RawUcx());
    r->dst_ = dst;
    r->base_ = region.base_address;
    r->num_bytes_ = region.num_bytes;
    EEP_ASSIGN_OR_RETURN(auto blob, eep::transfer::DecodeUcxBlob(region.backend_blob));
    ucp_config_t* config = nullptr;
    if (ucp_config_read(nullptr, nullptr, &config) != UCS_OK)
      return Status::Unavailable("ucp_config_read failed");
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_RMA;
    ucs_status_t s = ucp_init(&params, config, &r->ctx_);
    ucp_config_release(config);
    if (s != UCS_OK) return Status::Unavailable("raw ucx: ucp_init failed");
    ucp_worker_params_t wp{};
    if ((s = ucp_worker_create(r->ctx_, &wp, &r->worker_)) != UCS_OK)
      return Status::Unavailable("raw ucx: ucp_worker_create failed");
    ucp_ep_params_t ep_params{};
    ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep_params.address = reinterpret_cast<const ucp_address_t*>(blob.worker_address.data());
    ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as the engine: same lanes
    if ((s = ucp_ep_create(r->worker_, &ep_params, &r->ep_)) != UCS_OK ||
        (s = ucp_ep_rkey_unpack(r->ep_, blob.packed_rkey.data(), &r->rkey_)) != UCS_OK)
      return Status::Unavailable(fmt::format("raw ucx: {}", ucs_status_string(s)));
    return std::unique_ptr<RawCeiling>(std::move(r));
  }
  ~RawUcx() override {
    if (rkey_) ucp_rkey_destroy(rkey_);
    if (ep_) {
      ucp_request_param_t cp{};
      cp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      cp.flags = UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t sp = ucp_ep_close_nbx(ep_, &cp);
      if (sp != nullptr && !UCS_PTR_IS_ERR(sp)) {
        while (ucp_request_check_status(sp) == UCS_INPROGRESS) ucp_worker_progress(worker_);
        ucp_request_free(sp);
      }
    }
    if (worker_) ucp_worker_destroy(worker_);
    if (ctx_) ucp_cleanup(ctx_);
  }
  std::vector<std::string> Variants() const override {
    std::vector<std::string> v;
    for (uint64_t piece : kRawPieceBytes)
      v.push_back(fmt::format("raw UCP get loop ({} MiB gets)", piece >> 20));
    return v;
  }
  Result<double> Once(size_t v) override {
    const uint64_t piece = kRawPieceBytes[v];
    double t0 = eep::NowSeconds();
    ucp_request_param_t p{};
    std::vector<void*> pending;
    Status result;
    for (uint64_t off = 0; off < num_bytes_; off += piece) {
      uint64_t n = std::min(piece, num_bytes_ - off);
      ucs_status_ptr_t sp = ucp_get_nbx(ep_, dst_ + off, n, base_ + off, rkey_, &p);
      if (UCS_PTR_IS_ERR(sp)) {
        result = Status::Internal(
            fmt::format("raw ucp_get_nbx: {}", ucs_status_string(UCS_PTR_STATUS(sp))));
        break;
      }
      if (sp != nullptr) pending.push_back(sp);
    }
    double give_up = eep::NowSeconds() + 120;
    for (void* req : pending) {
      while (ucp_request_check_status(req) == UCS_INPROGRESS && eep::NowSeconds() < give_up)
        ucp_worker_progress(worker_);
      if (ucp_request_check_status(req) != UCS_OK && result.ok())
        result = Status::Internal("raw ucx get failed or timed out");
      ucp_request_free(req);
    }
    if (!result.ok()) return result;
    return eep::NowSeconds() - t0;
  }

 private:
  RawUcx() = default;
  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  ucp_rkey_h rkey_ = nullptr;
  uint8_t* dst_ = nullptr;
  uint64_t base_ = 0, num_bytes_ = 0;
};

// ---- the run ----

struct TransportResult {
  std::string transport;
  double connect_s = 0;
  Stats restore;
  std::vector<std::pair<std::string, Stats>> raw;  // every raw variant
  size_t best = 0;                                 // the ceiling: fastest raw variant
  uint64_t ceiling_bytes = 0;
};

// Restore passes and raw passes are interleaved round by round, so background load on a shared
// machine hits both alike; the first round warms up and is not counted.
Result<TransportResult> RunTransport(const std::string& model, const std::string& fingerprint,
                                     const Share& share, const RestoreFlags& f, uint8_t* dst,
                                     uint8_t* raw_dst) {
  TransportResult out;
  out.transport = f.transport;
  EEP_ASSIGN_OR_RETURN(auto manager,
                       ManagerChild::Start(model, f.node_rank, f.num_nodes, out.transport));
  eep::backup::BackupClientOptions o;
  o.endpoints = {manager->endpoint()};
  o.expected_fingerprint = fingerprint;
  o.timeout_ms = 120000;
  eep::backup::ExpertBackupClient client(o);
  double t0 = eep::NowSeconds();
  EEP_RETURN_IF_ERROR(client.Connect());
  out.connect_s = eep::NowSeconds() - t0;

  const eep::transfer::RegionDescriptor region = client.Descriptors().at(0).region;
  out.ceiling_bytes = region.num_bytes;
  std::unique_ptr<RawCeiling> raw;
  if (out.transport == "shm") {
    EEP_ASSIGN_OR_RETURN(raw, RawShm::Create(region, raw_dst));
  } else {
    EEP_ASSIGN_OR_RETURN(raw, RawUcx::Create(region, raw_dst));
  }
  const auto variants = raw->Variants();

  eep::backup::FetchDestinations destinations;
  for (const ShareParam& p : share.params) destinations[p.name] = {dst + p.dst_offset, p.num_bytes};
  std::vector<double> restore_times;
  std::vector<std::vector<double>> raw_times(variants.size());
  for (int r = 0; r < f.repeat + 1; ++r) {
    double start = eep::NowSeconds();
    for (int64_t layer : share.layers)
      EEP_RETURN_IF_ERROR(client.FetchLogicalExperts(layer, share.experts, "", destinations));
    double restore_s = eep::NowSeconds() - start;
    if (r > 0) restore_times.push_back(restore_s);
    for (size_t v = 0; v < variants.size(); ++v) {
      EEP_ASSIGN_OR_RETURN(double raw_s, raw->Once(v));
      if (r > 0) raw_times[v].push_back(raw_s);
    }
  }
  out.restore = Summarize(restore_times);
  for (size_t v = 0; v < variants.size(); ++v) {
    out.raw.emplace_back(variants[v], Summarize(raw_times[v]));
    if (out.raw[v].second.median_s < out.raw[out.best].second.median_s) out.best = v;
  }
  return out;
}

// "5.3x faster" / "2.0x slower": how restore compares with a reference time.
std::string Compare(double reference_s, double restore_s) {
  double r = reference_s / restore_s;
  return r >= 1 ? fmt::format("{:.1f}x faster", r) : fmt::format("{:.1f}x slower", 1 / r);
}

std::string Fmt(const Stats& s, uint64_t bytes) {
  return fmt::format("{:8.1f} ms [best {:7.1f}]  {:6.2f} GB/s", s.median_s * 1e3, s.best_s * 1e3,
                     bytes / 1e9 / s.median_s);
}

// ---- --backend cuda ----

Result<int> RunCudaBench(const RestoreFlags& f, const std::string& model, const std::string& fingerprint,
                         const Share& share) {
  if (!eep::cuda::Available())
    return Status::Unavailable("no GPU: " + eep::cuda::DeviceDescription());
  std::printf("backend cuda: %s\n", eep::cuda::DeviceDescription().c_str());
  EEP_ASSIGN_OR_RETURN(auto gpu, eep::cuda::CudaModel::Load(model));
  eep::cuda::CudaModel& m = *gpu;
  m.set_restore_staging_bytes(f.staging_mib << 20);
  // The share's experts into the slots that hold them under the identity map.
  std::vector<eep::cuda::CudaModel::SlotRestore> slots;
  for (int64_t ml = 0; ml < m.expert_map().num_moe_layers(); ++ml)
    for (int64_t e : share.experts) slots.push_back({ml, e, e});
  const uint64_t n = slots.size() * static_cast<uint64_t>(m.slot_bytes());

  EEP_ASSIGN_OR_RETURN(auto manager, ManagerChild::Start(model, f.node_rank, f.num_nodes, "shm", true));
  eep::backup::BackupClientOptions o;
  o.endpoints = {manager->endpoint()};
  o.expected_fingerprint = fingerprint;
  o.timeout_ms = 120000;
  eep::backup::ExpertBackupClient client(o);
  EEP_RETURN_IF_ERROR(client.Connect());

  // Ceiling and both restore paths alternate round by round; the first round warms up (and
  // registers the mirror mapping with CUDA for the direct path).
  std::vector<double> restore_times, fetch_times, direct_times, ceiling_gbs;
  bool direct_taken = true;
  for (int r = 0; r < f.repeat + 1; ++r) {
    eep::cuda::CudaModel::RestoreStats st, dt;
    m.set_restore_direct(false);
    EEP_RETURN_IF_ERROR(m.RestoreExperts(client, slots, &st));
    m.set_restore_direct(true);
    EEP_RETURN_IF_ERROR(m.RestoreExperts(client, slots, &dt));
    EEP_ASSIGN_OR_RETURN(double gbs, eep::cuda::MeasurePinnedH2DGBps(n, 3));
    if (r == 0) continue;
    direct_taken = direct_taken && dt.direct;
    restore_times.push_back(st.total_s);
    fetch_times.push_back(st.fetch_s);
    direct_times.push_back(dt.total_s);
    ceiling_gbs.push_back(gbs);
  }
  // What the restore wrote is the checkpoint's bytes (first and last slot).
  {
    EEP_ASSIGN_OR_RETURN(auto ckpt, eep::Checkpoint::Open(model));
    for (const auto* r : {&slots.front(), &slots.back()}) {
      std::vector<uint16_t> got;
      EEP_RETURN_IF_ERROR(m.ReadSlot(r->moe_layer, r->slot, &got));
      size_t off = 0;
      for (const auto& name : m.config().ExpertTensorNames(m.MoeLayerId(r->moe_layer), r->logical_expert)) {
        EEP_ASSIGN_OR_RETURN(const eep::TensorInfo* t, ckpt->Get(name));
        if (t->dtype != eep::DType::kBF16 || off * 2 + t->nbytes > got.size() * 2 ||
            std::memcmp(got.data() + off, t->data, t->nbytes) != 0)
          return Status::Internal("restored slot differs from the checkpoint at " + name);
        off += t->nbytes / 2;
      }
    }
  }
  // Reload: safetensors -> host BF16 -> GPU slot, as CudaModel loads experts.
  auto reload = [&]() -> Result<double> {
    double t0 = eep::NowSeconds();
    EEP_ASSIGN_OR_RETURN(auto ckpt, eep::Checkpoint::Open(model));
    for (const auto& r : slots) {
      const auto names = m.config().ExpertTensorNames(m.MoeLayerId(r.moe_layer), r.logical_expert);
      const eep::TensorInfo* t[3];
      for (int k = 0; k < 3; ++k) {
        EEP_ASSIGN_OR_RETURN(t[k], ckpt->Get(names[static_cast<size_t>(k)]));
      }
      EEP_RETURN_IF_ERROR(m.SetSlot(r.moe_layer, r.slot, t[0]->dtype, t[0]->data, t[1]->data, t[2]->data));
    }
    return eep::NowSeconds() - t0;
  };
  std::vector<double> warm_times, cold_times;
  double resident = 0;
  for (int r = 0; r < f.repeat + 1; ++r) {
    EEP_ASSIGN_OR_RETURN(double s, reload());
    if (r > 0) warm_times.push_back(s);
  }
  if (f.cold)
    for (int r = 0; r < f.repeat; ++r) {
      resident = std::max(resident, DropPageCache(ShardFiles(model)));
      EEP_ASSIGN_OR_RETURN(double s, reload());
      cold_times.push_back(s);
    }
  std::sort(ceiling_gbs.begin(), ceiling_gbs.end());
  const double ceiling = ceiling_gbs[ceiling_gbs.size() / 2];
  const Stats restore = Summarize(restore_times), fetch = Summarize(fetch_times), warm = Summarize(warm_times);
  const Stats direct = Summarize(direct_times);
  const double restore_gbs = n / 1e9 / restore.median_s, direct_gbs = n / 1e9 / direct.median_s;
  std::printf("%zu slots x %.1f MiB = %.2f GiB into GPU slots; staging %llu MiB (two halves); %d runs, median\n",
              slots.size(), m.slot_bytes() / double(1 << 20), n / double(kGiB),
              static_cast<unsigned long long>(f.staging_mib), f.repeat);
  std::printf("  ceiling  pinned cudaMemcpy H2D (same bytes)   %6.2f GB/s\n", ceiling);
  std::printf("  restore  direct: DMA from the registered mirror %s%s\n", Fmt(direct, n).c_str(),
              direct_taken ? "" : "  (fell back to staging: see the log)");
  std::printf("  restore  staged: fetch->pinned staging->H2D  %s  (fetch into staging: %.1f ms)\n",
              Fmt(restore, n).c_str(), fetch.median_s * 1e3);
  std::printf("  reload   warm: open+read+BF16+cudaMemcpy     %s\n", Fmt(warm, n).c_str());
  if (f.cold)
    std::printf("  reload   cold: DONTNEED + the same           %s  (%.0f%% of pages still resident)\n",
                Fmt(Summarize(cold_times), n).c_str(), resident * 100);
  std::printf("  direct / ceiling: %.0f%% (target >= 90%%); staged / ceiling: %.0f%%\n", 100.0 * direct_gbs / ceiling,
              100.0 * restore_gbs / ceiling);
  std::printf("  direct vs warm reload: %s (target >= 10x); staged vs warm reload: %s\n",
              Compare(warm.median_s, direct.median_s).c_str(), Compare(warm.median_s, restore.median_s).c_str());
  if (f.cold)
    std::printf("  direct vs cold reload: %s; staged vs cold reload: %s\n",
                Compare(Summarize(cold_times).median_s, direct.median_s).c_str(),
                Compare(Summarize(cold_times).median_s, restore.median_s).c_str());
  return 0;
}

int RunBench(RestoreFlags f) {
  if (f.repeat < 1) return eep::cli::Fail(Status::InvalidArgument("--repeat must be >= 1"));
  if (Status s = eep::backup::ValidateAssignment(f.node_rank, f.num_nodes, 1); !s.ok())
    return eep::cli::Fail(s);
  auto model = EnsureModel(f);
  if (!model.ok()) return eep::cli::Fail(model.status().WithContext("bench restore"));
  auto config = eep::LoadModelConfig(*model);
  if (!config.ok()) return eep::cli::Fail(config.status());

  Share share;
  std::string fingerprint;
  uint64_t checkpoint_bytes = 0;
  {
    auto ckpt = eep::Checkpoint::Open(*model);
    if (!ckpt.ok()) return eep::cli::Fail(ckpt.status());
    share = PlanShare(*config, **ckpt, f.node_rank, f.num_nodes);
    fingerprint = (*ckpt)->Fingerprint();
    for (const auto& [name, t] : (*ckpt)->tensors()) checkpoint_bytes += t->nbytes;
  }
  std::printf("eep bench restore: %s (%.2f GiB, %zu MoE layers x %lld experts, %s)\n",
              model->c_str(), checkpoint_bytes / double(kGiB), share.layers.size(),
              static_cast<long long>(config->num_experts), eep::ArchName(config->arch));
  std::printf("share of node %d of %d: %zu layers x %zu experts x 3 = %zu tensors, %.2f GiB BF16\n",
              f.node_rank, f.num_nodes, share.layers.size(), share.experts.size(),
              share.params.size(), share.num_bytes / double(kGiB));
  std::printf("cpu: %s, %u hardware threads; %d timed runs each, median [best]\n\n",
              CpuName().c_str(), std::thread::hardware_concurrency(), f.repeat);
  std::fflush(stdout);
  if (f.backend == "cuda") {
    auto r = RunCudaBench(f, *model, fingerprint, share);
    return r.ok() ? *r : eep::cli::Fail(r.status().WithContext("bench restore --backend cuda"));
  }
  if (f.backend != "cpu")
    return eep::cli::Fail(Status::InvalidArgument("--backend must be cpu or cuda, not " + f.backend));

  Buffer bf16(share.num_bytes);
  Buffer f32(2 * share.num_bytes);
  if (!bf16.data || !f32.data)
    return eep::cli::Fail(Status::ResourceExhausted("cannot allocate destination buffers"));

  // Reload numbers first (warm): the first pass warms the page cache.
  std::vector<double> warm_convert, warm_copy;
  for (int r = 0; r < f.repeat + 1; ++r) {
    auto c = Reload(*model, share, f32.data, true);
    if (!c.ok()) return eep::cli::Fail(c.status());
    auto m = Reload(*model, share, bf16.data, false);
    if (!m.ok()) return eep::cli::Fail(m.status());
    if (r > 0) {
      warm_convert.push_back(*c);
      warm_copy.push_back(*m);
    }
  }
  Stats warm = Summarize(warm_convert), warm_memcpy = Summarize(warm_copy);

  std::vector<std::string> transports;
  if (f.transport == "all")
    transports = {"shm", "ucx"};
  else
    transports = {f.transport};
  std::vector<TransportResult> results;
  for (const auto& t : transports) {
    RestoreFlags tf = f;
    tf.transport = t;
    // The raw passes write into the (idle) F32 buffer: pre-faulted, and not the restore's.
    auto r = RunTransport(*model, fingerprint, share, tf, bf16.data, f32.data);
    if (!r.ok()) return eep::cli::Fail(r.status().WithContext("transport " + t));
    results.push_back(*r);
  }

  // Cold reload last (the managers hold their own copy; nothing of ours maps the shards now).
  Stats cold{};
  double resident = 0;
  if (f.cold) {
    std::vector<double> times;
    for (int r = 0; r < f.repeat; ++r) {
      resident = std::max(resident, DropPageCache(ShardFiles(*model)));
      auto c = Reload(*model, share, f32.data, true);
      if (!c.ok()) return eep::cli::Fail(c.status());
      times.push_back(*c);
    }
    cold = Summarize(times);
  }

  const uint64_t n = share.num_bytes;
  std::printf("reload (safetensors -> runtime buffers)\n");
  std::printf("  warm  open+parse+BF16->F32 convert       %s\n", Fmt(warm, n).c_str());
  std::printf("  warm  open+parse+copy BF16 (floor)       %s\n", Fmt(warm_memcpy, n).c_str());
  if (f.cold)
    std::printf(
        "  cold  DONTNEED + open+parse+BF16->F32    %s  (%.0f%% of pages still resident after "
        "DONTNEED)\n",
        Fmt(cold, n).c_str(), resident * 100);
  for (const auto& r : results) {
    std::printf(
        "\ntransport %s (manager in a separate process; connect took %.1f ms, off the clock)\n",
        r.transport.c_str(), r.connect_s * 1e3);
    std::printf("  restore  FetchLogicalExperts, per layer  %s\n", Fmt(r.restore, n).c_str());
    for (size_t v = 0; v < r.raw.size(); ++v)
      std::printf("  %s %-31s %s\n", v == r.best ? "ceiling " : "(raw)   ", r.raw[v].first.c_str(),
                  Fmt(r.raw[v].second, r.ceiling_bytes).c_str());
    const Stats& ceiling = r.raw[r.best].second;
    double restore_gbs = n / r.restore.median_s, ceiling_gbs = r.ceiling_bytes / ceiling.median_s;
    std::printf("  restore vs warm reload (BF16->F32): %s (target: >= 3x faster)\n",
                Compare(warm.median_s, r.restore.median_s).c_str());
    std::printf("  restore vs warm reload (BF16 copy floor): %s\n",
                Compare(warm_memcpy.median_s, r.restore.median_s).c_str());
    if (f.cold)
      std::printf("  restore vs cold reload: %s\n",
                  Compare(cold.median_s, r.restore.median_s).c_str());
    std::printf("  restore throughput / raw ceiling: %.0f%% (target >= 90%%)\n",
                100.0 * restore_gbs / ceiling_gbs);
  }
  return 0;
}

}  // namespace

EEP_REGISTER_BENCH(
    restore, "restore",
    "expert restore from the DRAM backup vs reload from safetensors vs the transport's raw ceiling",
    [](CLI::App* app) -> std::function<int()> {
      auto f = std::make_shared<RestoreFlags>();
      app->add_option("--model", f->model, "checkpoint dir (default: generate one of --size-gib)");
      app->add_option("--size-gib", f->size_gib, "size of the generated checkpoint")
          ->default_val(2.0);
      app->add_option("--transport", f->transport, "shm | ucx | all")->default_val("all");
      app->add_option("--num-nodes", f->num_nodes, "nodes sharing the backup")->default_val(2);
      app->add_option("--node-rank", f->node_rank, "whose share to restore")->default_val(0);
      app->add_option("--repeat", f->repeat, "timed runs per measurement")->default_val(5);
      app->add_flag("!--no-cold", f->cold, "skip the cold (page cache dropped) reload");
      app->add_option("--backend", f->backend,
                      "cpu: into host buffers; cuda: into GPU expert slots (pinned mirror, vs pinned "
                      "cudaMemcpy and safetensors-to-GPU reload)")
          ->default_val("cpu");
      app->add_option("--staging-mib", f->staging_mib, "--backend cuda: pinned staging buffer size")
          ->default_val(256);
      return [f] { return RunBench(*f); };
    });
