// CudaModel: the MoE transformer on one GPU. The order of operations follows Model::Forward
// (src/model/model.cc) step for step so that the two backends differ only by rounding.
#include "cuda/cuda_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <random>

#include "backup/backup.h"
#include "core/logging.h"
#include "cuda/cuda_util.h"
#include "kernels/cuda/attention_gqa.h"
#include "kernels/cuda/moe_mma.h"
#include "kernels/cuda/ops.h"
#include "model/rope.h"
#include "model/safetensors.h"
#include "model/sampling.h"

namespace eep::cuda {

bool Available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

std::string DeviceDescription() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return fmt::format("none ({})", cudaGetErrorString(e));
  if (n == 0) return "none (no CUDA device)";
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "unknown CUDA device";
  return fmt::format("{} (sm_{}{}, {} SMs, {:.0f} GiB)", p.name, p.major, p.minor, p.multiProcessorCount,
                     static_cast<double>(p.totalGlobalMem) / (1 << 30));
}

Result<std::string> ResolveBackend(const std::string& requested) {
  if (requested == "cpu") return std::string("cpu");
  if (requested == "cuda") {
    if (!Available()) return Status::Unavailable("--backend cuda: " + DeviceDescription());
    return std::string("cuda");
  }
  if (requested != "auto")
    return Status::InvalidArgument(fmt::format("--backend must be auto, cpu or cuda, not '{}'", requested));
  static const std::string chosen = [] {
    // The CPU fallback logs at debug level: on a machine without a GPU the commands' output
    // (errors are one line) stays as it was before "auto" became the default.
    const bool gpu = Available();
    if (gpu)
      EEP_LOG_INFO("backend auto: cuda ({})", DeviceDescription());
    else
      EEP_LOG_DEBUG("backend auto: cpu ({})", DeviceDescription());
    return std::string(gpu ? "cuda" : "cpu");
  }();
  return chosen;
}

// ---------------------------------------------------------------------------------------
// KV cache

struct CudaKvCache::Impl {
  int64_t length = 0, capacity = 0;
  std::vector<DevicePtr<float>> k, v;  // [layer]
  // The greedy token of this sequence's last step: row greedy_row of the argmax of step
  // greedy_serial (0: none), and its value once the host has it (-1 until then).
  uint64_t greedy_serial = 0;
  int64_t greedy_row = -1, greedy_token = -1;
  void ForgetGreedy() {
    greedy_serial = 0;
    greedy_row = greedy_token = -1;
  }
};

CudaKvCache::CudaKvCache() : impl_(std::make_unique<Impl>()) {}
CudaKvCache::~CudaKvCache() = default;
int64_t CudaKvCache::length() const { return impl_->length; }
void CudaKvCache::Clear() {
  impl_->length = 0;
  impl_->ForgetGreedy();
}
void CudaKvCache::Truncate(int64_t n) {
  if (n >= impl_->length) return;
  impl_->length = std::max<int64_t>(0, n);
  impl_->ForgetGreedy();
}

// ---------------------------------------------------------------------------------------
// Weights

namespace {

struct Mat {
  DevicePtr<bf16_t> w;  // [out, in] row-major
  int64_t out = 0, in = 0;
};

struct Mlp {
  Mat gate_up;  // [2F, H]: gate rows, then up rows (one GEMM for both)
  Mat down;     // [H, F]
  int64_t inter = 0;
};

struct Layer {
  DevicePtr<float> input_norm, post_norm, q_norm, k_norm, q_bias, k_bias, v_bias, o_bias;
  Mat q, k, v, o;
  DevicePtr<float> q_a_norm, kv_a_norm;
  Mat q_a, q_b, kv_a, kv_b;
  bool is_moe = false;
  Mlp dense, shared;
  DevicePtr<float> router;      // [E, H] f32: routing decisions stay as exact as the CPU's
  DevicePtr<float> score_bias;  // [E]
};

std::vector<uint16_t> ToBf16Host(DType dtype, const void* src, size_t n, Status* st) {
  std::vector<uint16_t> out(n);
  if (dtype == DType::kBF16) {
    std::memcpy(out.data(), src, n * 2);
    return out;
  }
  std::vector<float> f(n);
  *st = ConvertToF32(dtype, src, n, f.data());
  for (size_t i = 0; i < n; ++i) out[i] = F32ToBF16(f[i]);
  return out;
}

struct PinnedFree {
  void operator()(void* p) const { cudaFreeHost(p); }
};
using PinnedPtr = std::unique_ptr<uint8_t, PinnedFree>;

struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using EventPtr = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroy>;

Result<EventPtr> NewEvent(unsigned flags = cudaEventDisableTiming) {
  cudaEvent_t e = nullptr;
  EEP_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, flags));
  return EventPtr(e);
}

}  // namespace

struct CudaModel::Impl {
  ModelConfig c;
  CudaLoadOptions opt;
  int splits = 2;
  std::unique_ptr<Checkpoint> ckpt;
  StreamPtr stream;
  CublasPtr blas;
  int64_t bytes = 0;

  DevicePtr<bf16_t> embed;  // [V, H]
  DevicePtr<float> final_norm;
  Mat lm_head;  // aliases embed when tied (w empty, see head())
  std::vector<Layer> layers;
  std::vector<int64_t> moe_layer_ids, moe_index;
  DevicePtr<float> inv_freq;
  float rope_factor = 1.0f, attn_scale = 1.0f;

  // Experts: [moe_layer] → [num_slots][gate (I×H) | up (I×H) | down (H×I)] BF16.
  // Only slots [slot_begin, slot_end) of the map are held (all of them unless an EP rank
  // configured its share): slots[ml] is [slot_end - slot_begin][expert elems].
  ExpertMap map;
  int64_t slot_begin = 0, slot_end = 0;
  std::vector<DevicePtr<bf16_t>> slots;
  std::vector<std::vector<bool>> filled;
  bool HoldsSlot(int64_t slot) const { return slot >= slot_begin && slot < slot_end; }
  bf16_t* SlotPtr(int64_t ml, int64_t slot) const {
    return slots[static_cast<size_t>(ml)].get() + (slot - slot_begin) * ExpertElems();
  }
  std::vector<bool>::reference Filled(int64_t ml, int64_t slot) {
    return filled[static_cast<size_t>(ml)][static_cast<size_t>(slot - slot_begin)];
  }
  // Host-side MoE executor (expert parallelism) and routing observer; null: none.
  MoeExecutor* moe_executor = nullptr;
  CudaModel::RouteObserver route_observer;
  bool route_counts_only = false;  // SetRouteObserver(.., counts_only)
  // Fused steps with a counting observer: per (MoE layer, expert) counts in b_sums (cleared by
  // the embedding), set by Launch; the host copy per step slot.
  int32_t* route_hist = nullptr;
  PinnedPtr h_hist[2];
  size_t h_hist_bytes[2] = {0, 0};
  bool CountsOnDevice() const { return route_observer && route_counts_only; }
  // b_sums for a step of M LM-head rows, in 8-byte words: the norm sums [2·layers + 1][8] f64,
  // the argmax keys [M + 1] (ArgmaxRowsWide's scratch), then the route counts (int32 pairs).
  int64_t ArgKeysWord() const { return (2 * c.num_layers + 1) * kSumTokens; }
  int64_t HistWord(int64_t M) const { return ArgKeysWord() + M + 1; }
  int64_t SumsWords(int64_t M) const {
    return HistWord(M) + (CountsOnDevice() ? (map.num_moe_layers() * c.num_experts + 1) / 2 : 0);
  }
  std::vector<float> h_x, h_w, h_out;
  // Scratch of RunExpertRows (separate from the forward's: it runs inside a forward).
  DeviceBuffer e_x, e_x16, e_g16, e_gu, e_act16, e_y, e_src, e_rows, e_w, e_out;

  // Decode regime (CudaLoadOptions): thresholds resolved at load, and whether every dim the
  // GEMV kernels read is a multiple of 8.
  int64_t gemv_max = 8, fused_max = 256;
  // Fused MoE steps of at least this many tokens run the tensor-core grouped kernels (moe_mma.h)
  // instead of the CUDA-core GEMV ones (efficient up to a few tokens per expert).
  int64_t mma_min = 32;
  // Decode steps of at least this many tokens take the grouped-query attention kernel
  // (attention_gqa.h). EEP_CUDA_GQA_MIN.
  int64_t gqa_min = 16;
  bool use_graphs = true, gemv_dims_ok = false, batched_attn = false, fuse_attn_norm = false,
       fuse_next_norm = false;
  bool norm_sums = true;  // EEP_CUDA_NORM_SUMS (Body)
  // EEP_CUDA_GATE_UP_ONE: steps of one token take MoeGateUp's one-assignment kernel (H100, batch
  // 1: +1.8%).
  bool gate_up_one = true;
  // EEP_CUDA_FUSE_ROUTER: at one token the o-proj GEMV also takes the router's dot products and
  // its last block routes (GemvRouter): one launch and one pass over x fewer per MoE layer. (H100,
  // batch 1, 8 layers: +0.4% tokens/s in three interleaved rounds; the trace's o-proj + router
  // share of a layer 13.7 µs against 15.8.)
  bool fuse_router = true;
  // EEP_CUDA_RESIDUAL_EARLY (default on): the routing o-proj reads the residual before its wait.
  bool residual_early = true;
  static constexpr int64_t kSumTokens = 8;  // rows per norm-sum slot (GemvNormFusable's limit)
  bool UseGemv(int64_t n) const { return gemv_dims_ok && n <= gemv_max; }
  // Per MoE layer, where each logical expert lives (MoeSlotTable), uploaded when the map,
  // the slots or their filling changed (tables_dirty). tables_ok: every expert has a held,
  // filled replica (else the host path, which reports what is missing).
  DeviceBuffer b_table;
  std::vector<uint8_t> h_table;
  int64_t table_layer_bytes = 0, table_max_reps = 1;
  bool tables_dirty = true, tables_ok = false;
  Status BuildTables();
  MoeSlotTable Table(int64_t ml) const {
    const uint8_t* base = b_table.as<uint8_t>() + ml * table_layer_bytes;
    const int64_t P = map.num_physical(), E = c.num_experts;
    MoeSlotTable t;
    t.slot_ptr = reinterpret_cast<const bf16_t* const*>(base);
    t.num_slots = P;
    t.rep_count = reinterpret_cast<const int32_t*>(base + P * 8);
    t.rep_slot = t.rep_count + E;
    t.max_replicas = table_max_reps;
    return t;
  }
  // Step inputs, uploaded in one copy from pinned memory: [tokens N][positions N][LM head rows
  // M] int32, then (8-aligned) per-token cache pointers [k|v][layer][N]. Two of each host
  // buffer, alternating by step, so that the host fills step n+1's while step n runs; h_tok
  // receives a step's argmax rows, step_done marks the step's end.
  PinnedPtr h_in[2], h_tok[2];
  size_t h_in_bytes[2] = {0, 0}, h_tok_bytes[2] = {0, 0};
  EventPtr step_done[2];
  // Steps queued and not yet collected (at most two: the slots above), oldest first.
  struct PendingStep {
    uint64_t serial = 0;
    int slot = 0;
    std::vector<int64_t*> outs;                 // greedy_token of each sequence (may be null)
    std::vector<CudaKvCache::Impl*> caches;     // the sequences' caches
    std::vector<int64_t> rows;                  // each sequence's row in h_tok[slot]
    bool counts = false;                        // route counts in h_hist[slot] for the observer
  };
  std::deque<PendingStep> pending;
  uint64_t serial = 0;          // steps launched
  uint64_t launch_gen = 0;      // DeviceBuffer::generation() when the last step was launched
  Status Collect();
  DeviceBuffer b_in;
  int64_t in_N = 0, in_M = 0, in_ptr_off = 0;
  const int32_t* TokD() const { return b_in.as<int32_t>(); }
  const int32_t* PosD() const { return b_in.as<int32_t>() + in_N; }
  const int32_t* SelD() const { return b_in.as<int32_t>() + 2 * in_N; }
  float* const* KPtrD(int64_t l) const {
    return reinterpret_cast<float* const*>(b_in.as<uint8_t>() + in_ptr_off) + l * in_N;
  }
  float* const* VPtrD(int64_t l) const {
    return reinterpret_cast<float* const*>(b_in.as<uint8_t>() + in_ptr_off) + (c.num_layers + l) * in_N;
  }
  // Captured decode steps, by shape; stale when any DeviceBuffer moved (generation).
  struct StepGraph {
    int64_t N = 0, M = 0;
    bool greedy = false;
    uint64_t generation = 0;
    cudaGraphExec_t exec = nullptr;
  };
  std::vector<StepGraph> graphs;
  void DropGraphs() {
    for (auto& g : graphs) cudaGraphExecDestroy(g.exec);
    graphs.clear();
  }
  ~Impl() { DropGraphs(); }
  DeviceBuffer b_actf, b_act, b_plan, b_slot_of, b_rpart;
  // Fused MoE steps of more tokens than this route a warp per token over many blocks
  // (MoeRoutePlanWide) instead of in the router kernel's last block.
  static constexpr int64_t kWideRouteMin = 16;
  bool step_is_decode = false;  // this forward brings one token per sequence
  // Two device words for the kernels whose last block finishes the work (router + plan, and
  // combine + next norm); zero between launches.
  DevicePtr<unsigned> counters;

  DeviceBuffer blas_workspace;
  // Per-forward scratch.
  // b_sums: Σ x² of the residual rows ahead of each norm (norm_sums), the argmax keys and the
  // route counts (SumsWords).
  DeviceBuffer b_sums;
  DeviceBuffer b_x, b_h16, b_hf, b_o, b_o2, b_q, b_k, b_v, b_attn, b_a16, b_gemm, b_qa, b_cmp, b_kv, b_gu, b_act16,
      b_logits, b_ids, b_w, b_g16, b_y, b_src, b_rows, b_head16, b_out;
  DeviceBuffer b_hsel, b_argmax;
  std::vector<int32_t> h_ids, h_src, h_rows;

  // Restore: a side stream, a pinned staging buffer of two halves, one event per half
  // (its last copy), and one recorded on the compute stream before the first copy.
  StreamPtr restore_stream;
  PinnedPtr staging;
  uint64_t staging_bytes = 0, staging_request_bytes = 256ull << 20;
  EventPtr half_done[2], compute_done;
  bool restore_direct = true;
  // Managers' regions mapped here and registered with CUDA for the direct path.
  struct MirrorRegistration {
    const uint8_t* base = nullptr;
    uint64_t generation = 0;
    std::unique_ptr<HostRegistration> registration;
  };
  std::vector<MirrorRegistration> mirrors;
  // Registers the mapping of `p`'s region unless already done; false if CUDA refuses it.
  // The restore's side stream, events and pinned staging buffer, made once (PrepareRestore, or
  // the first RestoreExperts) and reused.
  Status EnsureRestoreResources() {
    if (!restore_stream) {
      cudaStream_t st = nullptr;
      EEP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      restore_stream.reset(st);
      for (auto& e : half_done) {
        EEP_ASSIGN_OR_RETURN(e, NewEvent());
      }
      EEP_ASSIGN_OR_RETURN(compute_done, NewEvent());
    }
    const uint64_t expert_bytes = 3 * static_cast<uint64_t>(I() * c.hidden_size) * 2;
    const uint64_t want = std::max<uint64_t>(staging_request_bytes, 2 * expert_bytes);
    if (!staging || staging_bytes != want) {
      EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(restore_stream.get()));
      staging.reset();
      void* p = nullptr;
      EEP_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p, want, cudaHostAllocDefault));
      staging.reset(static_cast<uint8_t*>(p));
      staging_bytes = want;
    }
    return Status::Ok();
  }
  bool EnsureMirrorRegistered(const backup::MappedExpertParam& p) {
    for (const auto& m : mirrors)
      if (m.base == p.region_base && m.generation == p.region_generation) return m.registration != nullptr;
    // A region replaced since (reconnect) at the same address: forget the old registration.
    std::erase_if(mirrors, [&](const MirrorRegistration& m) { return m.base == p.region_base; });
    auto reg = HostRegistration::Register(const_cast<uint8_t*>(p.region_base), p.region_bytes, /*read_only=*/true);
    if (!reg.ok())
      EEP_LOG_WARN("restore: cannot register the backup mirror mapping ({:.2f} GiB) with CUDA, staging instead: {}",
                   p.region_bytes / double(1ull << 30), reg.status().ToString());
    mirrors.push_back({p.region_base, p.region_generation, reg.ok() ? std::move(*reg) : nullptr});
    return mirrors.back().registration != nullptr;
  }
  std::vector<int64_t> bucket_count, bucket_off;

  cudaStream_t s() const { return stream.get(); }
  int64_t I() const { return c.ExpertIntermediate(); }
  int64_t ExpertElems() const { return 3 * I() * c.hidden_size; }

  // --- loading ---
  Result<const TensorInfo*> Tensor(const std::string& name, const std::vector<int64_t>& shape) {
    return ckpt->GetChecked(name, shape);
  }
  Status UploadBf16(const std::string& name, const std::vector<int64_t>& shape, bf16_t* dst) {
    EEP_ASSIGN_OR_RETURN(const TensorInfo* t, Tensor(name, shape));
    Status st;
    auto host = ToBf16Host(t->dtype, t->data, static_cast<size_t>(t->numel()), &st);
    EEP_RETURN_IF_ERROR_CTX(st, name);
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    return Status::Ok();
  }
  // Loads tensors stacked along rows into one matrix.
  Status LoadMat(const std::vector<std::string>& names, const std::vector<int64_t>& rows, int64_t in, Mat* m) {
    m->in = in;
    m->out = 0;
    for (int64_t r : rows) m->out += r;
    EEP_ASSIGN_OR_RETURN(m->w, DeviceAlloc<bf16_t>(static_cast<size_t>(m->out * in)));
    bytes += m->out * in * 2;
    int64_t off = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      EEP_RETURN_IF_ERROR(UploadBf16(names[i], {rows[i], in}, m->w.get() + off * in));
      off += rows[i];
    }
    return Status::Ok();
  }
  Status LoadF32(const std::string& name, const std::vector<int64_t>& shape, DevicePtr<float>* out) {
    EEP_ASSIGN_OR_RETURN(auto host, ckpt->ReadF32(name, shape));
    EEP_ASSIGN_OR_RETURN(*out, DeviceAlloc<float>(host.size()));
    bytes += static_cast<int64_t>(host.size()) * 4;
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(out->get(), host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    return Status::Ok();
  }
  Status LoadWeights();

  // --- compute ---
  // y[rows, m.out] = x16[rows, m.in] · Wᵀ (BF16 in, f32 out and accumulation).
  Status Gemm(const bf16_t* x16, int64_t rows, const bf16_t* w, int64_t out, int64_t in, float* y,
              int batch = 1, int64_t x_stride = 0, int64_t y_stride = 0) {
    if (rows == 0) return Status::Ok();
    const float one = 1.0f, zero = 0.0f;
    if (batch == 1) {
      EEP_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out),
                                              static_cast<int>(rows), static_cast<int>(in), &one, w, CUDA_R_16BF,
                                              static_cast<int>(in), x16, CUDA_R_16BF, static_cast<int>(in), &zero, y,
                                              CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F,
                                              CUBLAS_GEMM_DEFAULT));
    } else {
      // The hi and lo halves of a split expert batch share the weights (stride 0).
      EEP_CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
          blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows), static_cast<int>(in),
          &one, w, CUDA_R_16BF, static_cast<int>(in), 0, x16, CUDA_R_16BF, static_cast<int>(in), x_stride, &zero, y,
          CUDA_R_32F, static_cast<int>(out), y_stride, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return Status::Ok();
  }
  // y[T, out] = x·Wᵀ (+ bias) for split input x16 [splits·T, in].
  Status Linear(const bf16_t* x16, int64_t T, const bf16_t* w, int64_t out, int64_t in, const float* bias,
                float* y) {
    if (splits == 1 && bias == nullptr) return Gemm(x16, T, w, out, in, y);
    EEP_RETURN_IF_ERROR(b_gemm.Reserve(static_cast<size_t>(splits * T * out) * 4));
    EEP_RETURN_IF_ERROR(Gemm(x16, splits * T, w, out, in, b_gemm.as<float>()));
    EEP_CUDA_RETURN_IF_ERROR(SumSplits(b_gemm.as<float>(), T, out, splits, bias, y, s()));
    return Status::Ok();
  }
  Status Linear(const bf16_t* x16, int64_t T, const Mat& m, const float* bias, float* y) {
    return Linear(x16, T, m.w.get(), m.out, m.in, bias, y);
  }

  // Attention of layer l from the normed rows (b_hf / b_h16), its output added to x.
  // norm_in: the GEMV path normalises x itself (input_norm fused into the q/k/v GEMV).
  // in_sums (norm_in only; may be null): Σ x² per row, so the q/k/v GEMV skips the reduction;
  // sums_out (may be null): the o-proj GEMV adds Σ x² of the updated rows there.
  // route (one token, with sums_out; see Body): the o-proj GEMV also routes the MoE layer (GemvRouter).
  Status Attention(const Layer& ly, int64_t l, std::span<CudaSeqStep> batch, int64_t N, float* x, bool norm_in,
                   const double* in_sums = nullptr, double* sums_out = nullptr, bool route = false);
  Status RunMlp(const Mlp& m, int64_t N, float* out);
  // The MLP by GEMV kernels from b_hf: out = (or +=) down(silu(gate)·up).
  Status MlpGemv(const Mlp& m, int64_t N, float* out, bool accumulate);
  Status Moe(const Layer& ly, int64_t l, int64_t N, float* out);
  // logits [N, E] = x·routerᵀ in f32 (cuBLAS SGEMM; the selection must agree with the CPU's).
  Status RouterLogits(const Layer& ly, const float* x, int64_t N, float* logits);
  // The routed experts on the device (no host sync unless traced or observed); adds to x.
  // norm_in: x is not normed yet; the router GEMV applies post_norm and writes b_hf.
  // next_norm (may be null): the combine also RMSNorms the new x with it into b_hf (the next
  // layer's input norm, or the final norm).
  // post_sums (norm_in only; may be null): Σ x² per row for the router's norm; next_sums (may be
  // null): the combine adds Σ x² of the updated rows there (the next layer's input norm).
  // routed: Attention's o-proj GEMV has routed this layer already.
  Status FusedMoe(const Layer& ly, int64_t l, int64_t N, float* x, bool norm_in, const float* next_norm,
                  const double* post_sums = nullptr, double* next_sums = nullptr, bool routed = false);
  // Everything of a step from the embedding to the LM head and argmax, queued on the stream
  // (captured into a graph for decode steps).
  Status Body(std::span<CudaSeqStep> batch, int64_t N, int64_t M, bool any_greedy, bool fused);
  // Queues a step (async: no logits, no trace) and records it in `pending`.
  Status Launch(std::span<CudaSeqStep> batch, CudaForwardTrace* trace, bool async);
  Status Forward(std::span<CudaSeqStep> batch, CudaForwardTrace* trace) {
    EEP_RETURN_IF_ERROR(Launch(batch, trace, false));
    while (!pending.empty()) EEP_RETURN_IF_ERROR(Collect());
    return Status::Ok();
  }
  // Appends the first sequence's T0 rows of x [., H] to the trace (synchronous).
  Status TraceHidden(const float* x, int64_t T0, CudaForwardTrace* trace);
  CudaForwardTrace* trace = nullptr;  // set for the duration of a traced Forward
};

Status CudaModel::Impl::LoadWeights() {
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_layers;
  const bool mla = c.arch == Arch::kDeepseekV3;
  std::vector<std::string> missing;
  for (const auto& t : ExpectedTensors(c))
    if (!ckpt->Find(t.name)) missing.push_back(t.name);
  if (!missing.empty())
    return Status::NotFound(fmt::format("{}: checkpoint lacks {} tensor(s), first '{}'", ckpt->dir(), missing.size(),
                                        missing[0]));
  EEP_ASSIGN_OR_RETURN(embed, DeviceAlloc<bf16_t>(static_cast<size_t>(V * H)));
  bytes += V * H * 2;
  EEP_RETURN_IF_ERROR(UploadBf16("model.embed_tokens.weight", {V, H}, embed.get()));
  EEP_RETURN_IF_ERROR(LoadF32("model.norm.weight", {H}, &final_norm));
  if (!c.tie_word_embeddings) EEP_RETURN_IF_ERROR(LoadMat({"lm_head.weight"}, {V}, H, &lm_head));
  layers.resize(static_cast<size_t>(L));
  moe_index.assign(static_cast<size_t>(L), -1);
  for (int64_t l = 0; l < L; ++l) {
    Layer& ly = layers[static_cast<size_t>(l)];
    const std::string p = fmt::format("model.layers.{}.", l), a = p + "self_attn.";
    EEP_RETURN_IF_ERROR(LoadF32(p + "input_layernorm.weight", {H}, &ly.input_norm));
    EEP_RETURN_IF_ERROR(LoadF32(p + "post_attention_layernorm.weight", {H}, &ly.post_norm));
    if (!mla) {
      const int64_t d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
      EEP_RETURN_IF_ERROR(LoadMat({a + "q_proj.weight"}, {nh * d}, H, &ly.q));
      EEP_RETURN_IF_ERROR(LoadMat({a + "k_proj.weight"}, {nkv * d}, H, &ly.k));
      EEP_RETURN_IF_ERROR(LoadMat({a + "v_proj.weight"}, {nkv * d}, H, &ly.v));
      EEP_RETURN_IF_ERROR(LoadMat({a + "o_proj.weight"}, {H}, nh * d, &ly.o));
      if (c.attention_bias) {
        EEP_RETURN_IF_ERROR(LoadF32(a + "q_proj.bias", {nh * d}, &ly.q_bias));
        EEP_RETURN_IF_ERROR(LoadF32(a + "k_proj.bias", {nkv * d}, &ly.k_bias));
        EEP_RETURN_IF_ERROR(LoadF32(a + "v_proj.bias", {nkv * d}, &ly.v_bias));
        if (ckpt->Find(a + "o_proj.bias")) EEP_RETURN_IF_ERROR(LoadF32(a + "o_proj.bias", {H}, &ly.o_bias));
      }
      if (c.arch == Arch::kQwen3Moe) {
        EEP_RETURN_IF_ERROR(LoadF32(a + "q_norm.weight", {d}, &ly.q_norm));
        EEP_RETURN_IF_ERROR(LoadF32(a + "k_norm.weight", {d}, &ly.k_norm));
      }
    } else {
      const int64_t nh = c.num_heads, qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
      if (c.q_lora_rank > 0) {
        EEP_RETURN_IF_ERROR(LoadMat({a + "q_a_proj.weight"}, {c.q_lora_rank}, H, &ly.q_a));
        EEP_RETURN_IF_ERROR(LoadF32(a + "q_a_layernorm.weight", {c.q_lora_rank}, &ly.q_a_norm));
        EEP_RETURN_IF_ERROR(LoadMat({a + "q_b_proj.weight"}, {nh * qk}, c.q_lora_rank, &ly.q_b));
      } else {
        EEP_RETURN_IF_ERROR(LoadMat({a + "q_proj.weight"}, {nh * qk}, H, &ly.q));
      }
      EEP_RETURN_IF_ERROR(
          LoadMat({a + "kv_a_proj_with_mqa.weight"}, {c.kv_lora_rank + c.qk_rope_head_dim}, H, &ly.kv_a));
      EEP_RETURN_IF_ERROR(LoadF32(a + "kv_a_layernorm.weight", {c.kv_lora_rank}, &ly.kv_a_norm));
      EEP_RETURN_IF_ERROR(
          LoadMat({a + "kv_b_proj.weight"}, {nh * (c.qk_nope_head_dim + c.v_head_dim)}, c.kv_lora_rank, &ly.kv_b));
      EEP_RETURN_IF_ERROR(LoadMat({a + "o_proj.weight"}, {H}, nh * c.v_head_dim, &ly.o));
    }
    ly.is_moe = c.IsMoeLayer(l);
    if (!ly.is_moe) {
      const int64_t F = c.intermediate_size;
      ly.dense.inter = F;
      EEP_RETURN_IF_ERROR(LoadMat({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"}, {F, F}, H, &ly.dense.gate_up));
      EEP_RETURN_IF_ERROR(LoadMat({p + "mlp.down_proj.weight"}, {H}, F, &ly.dense.down));
      continue;
    }
    moe_index[static_cast<size_t>(l)] = static_cast<int64_t>(moe_layer_ids.size());
    moe_layer_ids.push_back(l);
    const std::string mp = c.MoePrefix(l) + ".";
    EEP_RETURN_IF_ERROR(LoadF32(mp + "gate.weight", {c.num_experts, H}, &ly.router));
    if (mla) {
      EEP_RETURN_IF_ERROR(LoadF32(mp + "gate.e_score_correction_bias", {c.num_experts}, &ly.score_bias));
      if (c.n_shared_experts > 0) {
        const int64_t S = c.moe_intermediate_size * c.n_shared_experts;
        ly.shared.inter = S;
        EEP_RETURN_IF_ERROR(LoadMat({mp + "shared_experts.gate_proj.weight", mp + "shared_experts.up_proj.weight"},
                                    {S, S}, H, &ly.shared.gate_up));
        EEP_RETURN_IF_ERROR(LoadMat({mp + "shared_experts.down_proj.weight"}, {H}, S, &ly.shared.down));
      }
    }
  }
  const RopeParams rope = ComputeRopeParams(c);
  rope_factor = rope.attention_factor;
  attn_scale = rope.attn_scale;
  const std::vector<float>& inv = rope.inv_freq;
  EEP_ASSIGN_OR_RETURN(inv_freq, DeviceAlloc<float>(inv.size()));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq.get(), inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));

  // Routed experts: every slot of the identity map, straight from the checkpoint's bytes.
  const int64_t ML = static_cast<int64_t>(moe_layer_ids.size());
  if (ML > 0) map = ExpertMap::Identity(ML, c.num_experts);
  if (ML > 0 && opt.load_experts) {
    slot_begin = 0;
    slot_end = map.num_physical();
    slots.resize(static_cast<size_t>(ML));
    filled.assign(static_cast<size_t>(ML), std::vector<bool>(static_cast<size_t>(c.num_experts), false));
    const auto shapes = c.ExpertTensorShapes();
    for (int64_t ml = 0; ml < ML; ++ml) {
      EEP_ASSIGN_OR_RETURN(slots[static_cast<size_t>(ml)],
                           DeviceAlloc<bf16_t>(static_cast<size_t>(map.num_physical() * ExpertElems())));
      bytes += map.num_physical() * ExpertElems() * 2;
      for (int64_t slot = 0; slot < map.num_physical(); ++slot) {
        auto names = c.ExpertTensorNames(moe_layer_ids[static_cast<size_t>(ml)], map.LogicalAt(ml, slot));
        bf16_t* dst = slots[static_cast<size_t>(ml)].get() + slot * ExpertElems();
        const int64_t mat = I() * c.hidden_size;
        for (int i = 0; i < 3; ++i) EEP_RETURN_IF_ERROR(UploadBf16(names[static_cast<size_t>(i)], shapes[static_cast<size_t>(i)], dst + i * mat));
        filled[static_cast<size_t>(ml)][static_cast<size_t>(slot)] = true;
      }
    }
  } else if (ML > 0) {
    // Slots come later (ConfigureExpertSlots): an EP rank holds only its share.
    slots.resize(static_cast<size_t>(ML));
    filled.assign(static_cast<size_t>(ML), {});
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Forward

Status CudaModel::Impl::Attention(const Layer& ly, int64_t l, std::span<CudaSeqStep> batch, int64_t N, float* x,
                                   bool norm_in, const double* in_sums, double* sums_out, bool route) {
  const bool mla = c.arch == Arch::kDeepseekV3;
  const int64_t H = c.hidden_size, nh = c.num_heads;
  const int64_t nkv = mla ? nh : c.num_kv_heads;
  const int64_t dk = mla ? c.qk_nope_head_dim + c.qk_rope_head_dim : c.head_dim;
  const int64_t dv = mla ? c.v_head_dim : c.head_dim;
  const int64_t rope_dim = mla ? c.qk_rope_head_dim : c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);
  float* q = b_q.as<float>();
  float* k = b_k.as<float>();
  float* v = b_v.as<float>();
  const bf16_t* h16 = b_h16.as<bf16_t>();
  const bool gemv = UseGemv(N);
  if (!mla) {
    if (gemv) {
      // q, k and v in one launch, straight from the f32 normed rows.
      GemvSegments sg;
      sg.seg[0] = {ly.q.w.get(), q, ly.q_bias.get(), ly.q.out};
      sg.seg[1] = {ly.k.w.get(), k, ly.k_bias.get(), ly.k.out};
      sg.seg[2] = {ly.v.w.get(), v, ly.v_bias.get(), ly.v.out};
      sg.count = 3;
      if (norm_in)
        EEP_CUDA_RETURN_IF_ERROR(Gemv(sg, H, x, H, N, false, s(), ly.input_norm.get(), eps, nullptr, in_sums));
      else
        EEP_CUDA_RETURN_IF_ERROR(Gemv(sg, H, b_hf.as<float>(), H, N, false, s()));
    } else {
      EEP_RETURN_IF_ERROR(Linear(h16, N, ly.q, ly.q_bias.get(), q));
      EEP_RETURN_IF_ERROR(Linear(h16, N, ly.k, ly.k_bias.get(), k));
      EEP_RETURN_IF_ERROR(Linear(h16, N, ly.v, ly.v_bias.get(), v));
    }
  } else {
    const int64_t nope = c.qk_nope_head_dim, kvr = c.kv_lora_rank, ca = kvr + rope_dim;
    bf16_t* a16 = b_a16.as<bf16_t>();
    if (c.q_lora_rank > 0) {
      float* qa = b_qa.as<float>();
      EEP_RETURN_IF_ERROR(Linear(h16, N, ly.q_a, nullptr, qa));
      EEP_CUDA_RETURN_IF_ERROR(
          RmsNorm(qa, c.q_lora_rank, ly.q_a_norm.get(), N, c.q_lora_rank, 1e-6f, nullptr, 0, a16, splits, s()));
      EEP_RETURN_IF_ERROR(Linear(a16, N, ly.q_b, nullptr, q));
    } else {
      EEP_RETURN_IF_ERROR(Linear(h16, N, ly.q, nullptr, q));
    }
    float* cmp = b_cmp.as<float>();
    EEP_RETURN_IF_ERROR(Linear(h16, N, ly.kv_a, nullptr, cmp));
    EEP_CUDA_RETURN_IF_ERROR(RmsNorm(cmp, ca, ly.kv_a_norm.get(), N, kvr, 1e-6f, nullptr, 0, a16, splits, s()));
    float* kv = b_kv.as<float>();
    EEP_RETURN_IF_ERROR(Linear(a16, N, ly.kv_b, nullptr, kv));
    EEP_CUDA_RETURN_IF_ERROR(MlaExpandKv(kv, cmp, N, nh, nope, rope_dim, dv, ca, kvr, k, v, s()));
  }
  const int64_t rope_off = mla ? c.qk_nope_head_dim : 0;
  const bool interleaved = mla && c.rope_interleave;
  const int32_t* pos = PosD();
  const int64_t window = c.sliding_window ? *c.sliding_window : 0;
  float* attn = b_attn.as<float>();
  // Whether the attention releases the next kernel only after its own wait (AttentionDecode at one
  // token): then everything two launches back, x's writer included, has completed when it starts.
  bool attn_late = false;
  if (batched_attn && step_is_decode) {
    // Every token is its sequence's only new one: norms, RoPE, cache writes and attention in
    // one launch; positions and cache pointers come from device memory (graph-safe).
    // From gqa_min tokens a block per KV head serves its group of q heads (each K/V row read once
    // per group); below that a block per q head keeps more SMs busy.
    auto* decode = N >= gqa_min && AttentionDecodeGqaSupported(nh, nkv, dk, dv) ? AttentionDecodeGqa : AttentionDecode;
    attn_late = decode == AttentionDecode && AttnLateTrigger(N);
    EEP_CUDA_RETURN_IF_ERROR(decode(q, k, v, N, nh, nkv, dk, dv, ly.q_norm.get(), ly.k_norm.get(), eps, rope_off,
                                    rope_dim, pos, inv_freq.get(), rope_factor, interleaved, KPtrD(l), VPtrD(l), window,
                                    attn_scale, attn, s()));
  } else if (batched_attn) {
    // One launch for q/k norms, RoPE and the cache writes, one for every token's attention.
    EEP_CUDA_RETURN_IF_ERROR(QkNormRopeKv(q, k, v, N, nh, nkv, dk, dv, ly.q_norm.get(), ly.k_norm.get(), eps, rope_off,
                                          rope_dim, pos, inv_freq.get(), rope_factor, interleaved, KPtrD(l), VPtrD(l),
                                          s()));
    EEP_CUDA_RETURN_IF_ERROR(
        AttentionBatched(q, KPtrD(l), VPtrD(l), pos, N, nh, nkv, dk, dv, window, attn_scale, attn, s()));
  } else {
    if (ly.q_norm) {
      EEP_CUDA_RETURN_IF_ERROR(RmsNorm(q, dk, ly.q_norm.get(), N * nh, dk, eps, q, dk, nullptr, 1, s()));
      EEP_CUDA_RETURN_IF_ERROR(RmsNorm(k, dk, ly.k_norm.get(), N * nkv, dk, eps, k, dk, nullptr, 1, s()));
    }
    EEP_CUDA_RETURN_IF_ERROR(
        Rope(q, N, nh, nh * dk, dk, rope_off, rope_dim, pos, inv_freq.get(), rope_factor, interleaved, s()));
    EEP_CUDA_RETURN_IF_ERROR(
        Rope(k, N, nkv, nkv * dk, dk, rope_off, rope_dim, pos, inv_freq.get(), rope_factor, interleaved, s()));
    int64_t tok = 0;
    for (CudaSeqStep& st : batch) {
      CudaKvCache::Impl& cache = *st.cache->impl_;
      const int64_t T = static_cast<int64_t>(st.ids.size()), start = cache.length;
      float* kc = cache.k[static_cast<size_t>(l)].get();
      float* vc = cache.v[static_cast<size_t>(l)].get();
      EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(kc + start * nkv * dk, k + tok * nkv * dk,
                                               static_cast<size_t>(T * nkv * dk) * 4, cudaMemcpyDeviceToDevice, s()));
      EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(vc + start * nkv * dv, v + tok * nkv * dv,
                                               static_cast<size_t>(T * nkv * dv) * 4, cudaMemcpyDeviceToDevice, s()));
      EEP_CUDA_RETURN_IF_ERROR(eep::cuda::Attention(q + tok * nh * dk, kc, vc, T, start, nh, nkv, dk, dv, window,
                                                    attn_scale, attn + tok * nh * dv, s()));
      tok += T;
    }
  }
  if (gemv) {
    // x += attn·Woᵀ (+ bias): the residual add rides on the GEMV. At one token its weights go to
    // shared memory while the attention (a latency chain) runs.
    if (route) {
      // ... and the router's dot products; its last block routes (GemvRouter, see Body).
      const int64_t E = c.num_experts, k = c.num_experts_per_tok, P = map.num_physical();
      GemvRouterArgs r;
      r.router = ly.router.get();
      r.norm_w = ly.post_norm.get();
      r.eps = eps;
      r.norm_sums = sums_out;
      r.norm_out = b_hf.as<float>();
      r.logits = b_logits.as<float>();
      r.partial = b_rpart.as<float>();
      r.counter = counters.get();
      r.num_experts = E;
      r.top_k = k;
      r.norm_topk = c.norm_topk_prob;
      r.table = Table(moe_index[static_cast<size_t>(l)]);
      r.ids = b_ids.as<int32_t>();
      r.weights = b_w.as<float>();
      r.plan = MoePlanIn(b_plan.as<int32_t>(), MoeMaxGroups(N * k, P));
      r.residual_early = residual_early && attn_late;
      EEP_CUDA_RETURN_IF_ERROR(GemvRouter(ly.o.w.get(), ly.o_bias.get(), H, nh * dv, attn, x, r, s()));
      return Status::Ok();
    }
    GemvSegments sg;
    sg.seg[0] = {ly.o.w.get(), x, ly.o_bias.get(), H};
    sg.count = 1;
    sg.stage = true;
    EEP_CUDA_RETURN_IF_ERROR(Gemv(sg, nh * dv, attn, nh * dv, N, true, s(), nullptr, 0, nullptr, nullptr, sums_out));
    return Status::Ok();
  }
  bf16_t* attn16 = b_a16.as<bf16_t>();
  EEP_CUDA_RETURN_IF_ERROR(SplitBf16(attn, N, nh * dv, splits, attn16, s()));
  EEP_RETURN_IF_ERROR(Linear(attn16, N, ly.o, ly.o_bias.get(), b_o.as<float>()));
  EEP_CUDA_RETURN_IF_ERROR(Add(x, b_o.as<float>(), N * H, s()));
  return Status::Ok();
}

Status CudaModel::Impl::RunMlp(const Mlp& m, int64_t N, float* out) {
  float* gu = b_gu.as<float>();
  bf16_t* act16 = b_act16.as<bf16_t>();
  EEP_RETURN_IF_ERROR(Gemm(b_h16.as<bf16_t>(), splits * N, m.gate_up.w.get(), m.gate_up.out, m.gate_up.in, gu));
  EEP_CUDA_RETURN_IF_ERROR(SiluMul(gu, N, m.inter, splits, nullptr, act16, s()));
  return Linear(act16, N, m.down, nullptr, out);
}

Status CudaModel::Impl::MlpGemv(const Mlp& m, int64_t N, float* out, bool accumulate) {
  const int64_t H = c.hidden_size, F = m.inter;
  float* gu = b_gu.as<float>();
  float* act = b_actf.as<float>();
  GemvSegments sg;
  sg.seg[0] = {m.gate_up.w.get(), gu, nullptr, 2 * F};
  sg.count = 1;
  EEP_CUDA_RETURN_IF_ERROR(Gemv(sg, H, b_hf.as<float>(), H, N, false, s()));
  EEP_CUDA_RETURN_IF_ERROR(SiluMul(gu, N, F, 1, act, nullptr, s()));
  sg.seg[0] = {m.down.w.get(), out, nullptr, H};
  EEP_CUDA_RETURN_IF_ERROR(Gemv(sg, F, act, F, N, accumulate, s()));
  return Status::Ok();
}

Status CudaModel::Impl::BuildTables() {
  tables_dirty = false;
  tables_ok = false;
  const int64_t ML = map.num_moe_layers(), E = c.num_experts, P = map.num_physical();
  if (ML == 0 || static_cast<int64_t>(slots.size()) != ML) return Status::Ok();
  int64_t reps_max = 1;
  for (int64_t ml = 0; ml < ML; ++ml)
    for (int64_t e = 0; e < E; ++e) {
      const auto& reps = map.Replicas(ml, e);
      if (reps.empty()) return Status::Ok();  // the host path says which expert has no slot
      for (int32_t slot : reps)
        if (!HoldsSlot(slot) || !Filled(ml, slot)) return Status::Ok();
      reps_max = std::max<int64_t>(reps_max, static_cast<int64_t>(reps.size()));
    }
  // [layer]: slot pointers [P] | replica counts [E] | replica slots [E][reps_max], 16-aligned.
  table_max_reps = reps_max;
  table_layer_bytes = (P * 8 + E * 4 + E * reps_max * 4 + 15) / 16 * 16;
  h_table.assign(static_cast<size_t>(ML * table_layer_bytes), 0);
  for (int64_t ml = 0; ml < ML; ++ml) {
    uint8_t* base = h_table.data() + ml * table_layer_bytes;
    auto* ptrs = reinterpret_cast<const bf16_t**>(base);
    for (int64_t slot = 0; slot < P; ++slot) ptrs[slot] = HoldsSlot(slot) ? SlotPtr(ml, slot) : nullptr;
    auto* count = reinterpret_cast<int32_t*>(base + P * 8);
    int32_t* rep = count + E;
    for (int64_t e = 0; e < E; ++e) {
      const auto& reps = map.Replicas(ml, e);
      count[e] = static_cast<int32_t>(reps.size());
      for (size_t r = 0; r < reps.size(); ++r) rep[e * reps_max + static_cast<int64_t>(r)] = reps[r];
    }
  }
  EEP_RETURN_IF_ERROR(b_table.Reserve(h_table.size()));
  // h_table stays alive until the next rebuild, which comes after this forward's final sync.
  EEP_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(b_table.as<uint8_t>(), h_table.data(), h_table.size(), cudaMemcpyHostToDevice, s()));
  tables_ok = true;
  return Status::Ok();
}

Status CudaModel::Impl::RouterLogits(const Layer& ly, const float* x, int64_t N, float* logits) {
  const int64_t H = c.hidden_size, E = c.num_experts;
  const float one = 1.0f, zero = 0.0f;
  EEP_CUBLAS_RETURN_IF_ERROR(cublasSgemm(blas.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(E), static_cast<int>(N),
                                         static_cast<int>(H), &one, ly.router.get(), static_cast<int>(H), x,
                                         static_cast<int>(H), &zero, logits, static_cast<int>(E)));
  return Status::Ok();
}

Status CudaModel::Impl::FusedMoe(const Layer& ly, int64_t l, int64_t N, float* x, bool norm_in,
                                 const float* next_norm, const double* post_sums, double* next_sums,
                                 bool routed) {
  const int64_t H = c.hidden_size, E = c.num_experts, k = c.num_experts_per_tok, A = N * k;
  const int64_t ml = moe_index[static_cast<size_t>(l)], inter = I(), P = map.num_physical();
  const int64_t G = MoeMaxGroups(A, P);
  float* logits = b_logits.as<float>();
  float* hf = b_hf.as<float>();
  int32_t* ids = b_ids.as<int32_t>();
  float* w = b_w.as<float>();
  int32_t* pl = b_plan.as<int32_t>();
  const MoePlan plan = MoePlanIn(pl, G);
  const MoeSlotTable table = Table(ml);
  const bool ds = c.arch == Arch::kDeepseekV3;
  const bool norm_topk = c.norm_topk_prob;  // (set for Mixtral by the config parser)
  const float* bias = ds ? ly.score_bias.get() : nullptr;
  const int64_t n_group = ds ? c.n_group : 1, topk_group = ds ? c.topk_group : 1;
  const float scaling = ds ? static_cast<float>(c.routed_scaling_factor) : 1.0f;
  const float eps = static_cast<float>(c.rms_norm_eps);
  if (routed) {
    // The o-proj GEMV routed (Attention).
  } else if (N > kWideRouteMin && !norm_in && MoeRoutePlanSupported(N, E, k, P)) {
    // Many tokens: the router GEMM, then routing a warp per token over many blocks (the one-block
    // plan would route them serially).
    // (f32 SGEMM: the GEMV re-reads the router weights per 8 tokens.)
    EEP_RETURN_IF_ERROR(RouterLogits(ly, hf, N, logits));
    EEP_CUDA_RETURN_IF_ERROR(MoeRoutePlanWide(logits, N, E, k, norm_topk, bias, n_group, topk_group, scaling, table,
                                              ids, w, plan, b_slot_of.as<int32_t>(), s()));
  } else if (RouterPlanSupported(N, E, k, P, H, norm_in)) {
    // Router in f32 (routing decisions follow the CPU's values), top-k and grouping: one launch.
    EEP_CUDA_RETURN_IF_ERROR(RouterPlan(ly.router.get(), H, norm_in ? x : hf, N,
                                        norm_in ? ly.post_norm.get() : nullptr, eps, norm_in ? hf : nullptr, logits,
                                        counters.get(), E, k, norm_topk, bias, n_group, topk_group, scaling, table,
                                        ids, w, plan, s(), norm_in ? post_sums : nullptr));
  } else {
    GemvSegments sg;
    sg.seg[0] = {ly.router.get(), logits, nullptr, E};
    sg.count = 1;
    if (norm_in)
      EEP_CUDA_RETURN_IF_ERROR(GemvF32(sg, H, x, H, N, false, s(), ly.post_norm.get(), eps, hf, post_sums));
    else
      EEP_CUDA_RETURN_IF_ERROR(GemvF32(sg, H, hf, H, N, false, s()));
    EEP_CUDA_RETURN_IF_ERROR(MoeRoutePlan(logits, N, E, k, norm_topk, bias, n_group, topk_group, scaling, table, ids,
                                          w, plan, s()));
  }
  if (route_hist != nullptr) EEP_CUDA_RETURN_IF_ERROR(CountRoutes(ids, A, route_hist + ml * E, s()));
  if (trace != nullptr || (route_observer && route_hist == nullptr)) {
    h_ids.resize(static_cast<size_t>(A));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_ids.data(), ids, static_cast<size_t>(A) * 4, cudaMemcpyDeviceToHost, s()));
    if (trace != nullptr) {
      auto& lg = trace->router_logits[static_cast<size_t>(ml)];
      lg.resize(static_cast<size_t>(N * E));
      EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lg.data(), logits, lg.size() * 4, cudaMemcpyDeviceToHost, s()));
    }
    EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
    if (trace != nullptr) trace->route_ids[static_cast<size_t>(ml)] = h_ids;
    if (route_observer) route_observer(ml, h_ids.data(), A);
  }
  float* act = b_act.as<float>();
  float* y = b_y.as<float>();
  if (N >= mma_min && MoeMmaSupported(H, inter)) {
    EEP_CUDA_RETURN_IF_ERROR(MoeGateUpMma(hf, H, inter, k, table, plan, G, splits > 1, act, s()));
    EEP_CUDA_RETURN_IF_ERROR(MoeDownMma(act, H, inter, table, plan, G, splits > 1, y, s()));
  } else {
    const bool one_token = N == 1 && gate_up_one;  // the one-assignment-per-group kernels
    EEP_CUDA_RETURN_IF_ERROR(MoeGateUp(hf, H, inter, k, table, plan, G, act, s(), one_token));
    // One token, no shared expert, no norm to produce: the down projection adds its results to x
    // itself (MoeDownCombine; one kernel boundary fewer a layer).
    if (one_token && ly.shared.inter == 0 && next_norm == nullptr && MoeDownCombineSupported(H, inter, k, G)) {
      EEP_CUDA_RETURN_IF_ERROR(MoeDownCombine(act, H, inter, k, table, plan, G, w, x, next_sums, s()));
      return Status::Ok();
    }
    EEP_CUDA_RETURN_IF_ERROR(MoeDown(act, H, inter, table, plan, G, y, s(), one_token));
  }
  const float* shared = nullptr;
  if (ly.shared.inter > 0) {
    float* o2 = b_o2.as<float>();
    if (UseGemv(N))
      EEP_RETURN_IF_ERROR(MlpGemv(ly.shared, N, o2, false));
    else
      EEP_RETURN_IF_ERROR(RunMlp(ly.shared, N, o2));
    shared = o2;
  }
  EEP_CUDA_RETURN_IF_ERROR(MoeCombineAdd(y, w, N, k, H, shared, x, s(), next_norm, static_cast<float>(c.rms_norm_eps),
                                         next_norm != nullptr ? hf : nullptr, counters.get() + 1, next_sums));
  return Status::Ok();
}

Status CudaModel::Impl::Moe(const Layer& ly, int64_t l, int64_t N, float* out) {
  const int64_t H = c.hidden_size, E = c.num_experts, k = c.num_experts_per_tok, A = N * k, S = splits;
  const int64_t ml = moe_index[static_cast<size_t>(l)], inter = I();
  // Router in f32 (the selection must agree with the CPU's) and the fused top-k kernel.
  float* logits = b_logits.as<float>();
  EEP_RETURN_IF_ERROR(RouterLogits(ly, b_hf.as<float>(), N, logits));
  int32_t* ids = b_ids.as<int32_t>();
  float* w = b_w.as<float>();
  const bool ds = c.arch == Arch::kDeepseekV3;
  EEP_CUDA_RETURN_IF_ERROR(Route(logits, N, E, k, c.norm_topk_prob,
                                 ds ? ly.score_bias.get() : nullptr, ds ? c.n_group : 1, ds ? c.topk_group : 1,
                                 ds ? static_cast<float>(c.routed_scaling_factor) : 1.0f, ids, w, s()));
  // Permute on the host: the ids are few (N·k), and the expert map lives here.
  h_ids.resize(static_cast<size_t>(A));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_ids.data(), ids, static_cast<size_t>(A) * 4, cudaMemcpyDeviceToHost, s()));
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
  if (trace != nullptr) {
    auto& lg = trace->router_logits[static_cast<size_t>(ml)];
    lg.resize(static_cast<size_t>(N * E));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lg.data(), logits, lg.size() * 4, cudaMemcpyDeviceToHost, s()));
    EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
    trace->route_ids[static_cast<size_t>(ml)] = h_ids;
  }
  if (route_observer) route_observer(ml, h_ids.data(), A);
  if (moe_executor != nullptr) {
    // Expert parallelism: the routed part runs through the host-side executor (dispatch to
    // the ranks holding the experts, combine in top-k order); shared experts stay here.
    h_x.resize(static_cast<size_t>(N * H));
    h_w.resize(static_cast<size_t>(A));
    h_out.resize(static_cast<size_t>(N * H));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_x.data(), b_hf.as<float>(), h_x.size() * 4, cudaMemcpyDeviceToHost, s()));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_w.data(), w, h_w.size() * 4, cudaMemcpyDeviceToHost, s()));
    EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
    EEP_RETURN_IF_ERROR(moe_executor->Run(ml, h_x.data(), N, k, h_ids.data(), h_w.data(), h_out.data()));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out, h_out.data(), h_out.size() * 4, cudaMemcpyHostToDevice, s()));
    // h_out is reused by the next layer: the copy must be done before it returns.
    EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
    if (ly.shared.inter > 0) {
      float* o2 = b_o2.as<float>();
      EEP_RETURN_IF_ERROR(RunMlp(ly.shared, N, o2));
      EEP_CUDA_RETURN_IF_ERROR(Add(out, o2, N * H, s()));
    }
    return Status::Ok();
  }
  const int64_t P = map.num_physical();
  std::vector<int32_t> slot_of(static_cast<size_t>(A));
  bucket_count.assign(static_cast<size_t>(P), 0);
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = h_ids[static_cast<size_t>(t * k + j)];
      if (e < 0 || e >= E) return Status::Internal(fmt::format("layer {}: router produced expert {}", l, e));
      const auto& reps = map.Replicas(ml, e);
      if (reps.empty()) return Status::NotFound(fmt::format("MoE layer {}: no slot holds expert {}", ml, e));
      // The same fixed spread over replicas as LocalExperts::Run.
      const int32_t slot = reps[static_cast<size_t>(t % static_cast<int64_t>(reps.size()))];
      if (!HoldsSlot(slot) || !Filled(ml, slot))
        return Status::Internal(fmt::format("MoE layer {}: slot {} has no weights", ml, slot));
      slot_of[static_cast<size_t>(t * k + j)] = slot;
      ++bucket_count[static_cast<size_t>(slot)];
    }
  }
  bucket_off.assign(static_cast<size_t>(P), 0);
  for (int64_t b = 1; b < P; ++b)
    bucket_off[static_cast<size_t>(b)] = bucket_off[static_cast<size_t>(b - 1)] + bucket_count[static_cast<size_t>(b - 1)];
  // Gathered rows: [hi rows of all assignments | lo rows], each half ordered by slot.
  h_src.resize(static_cast<size_t>(S * A));
  h_rows.resize(static_cast<size_t>(A * S));
  std::vector<int64_t> fill(bucket_off);
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t a = fill[static_cast<size_t>(slot_of[static_cast<size_t>(t * k + j)])]++;
      for (int64_t sp = 0; sp < S; ++sp) {
        h_src[static_cast<size_t>(sp * A + a)] = static_cast<int32_t>(sp * N + t);
        h_rows[static_cast<size_t>((t * k + j) * S + sp)] = static_cast<int32_t>(sp * A + a);
      }
    }
  }
  int32_t* src = b_src.as<int32_t>();
  int32_t* rows = b_rows.as<int32_t>();
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(src, h_src.data(), h_src.size() * 4, cudaMemcpyHostToDevice, s()));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(rows, h_rows.data(), h_rows.size() * 4, cudaMemcpyHostToDevice, s()));
  bf16_t* g16 = b_g16.as<bf16_t>();
  float* gu = b_gu.as<float>();
  bf16_t* act16 = b_act16.as<bf16_t>();
  float* y = b_y.as<float>();
  EEP_CUDA_RETURN_IF_ERROR(GatherRows(b_h16.as<bf16_t>(), src, S * A, H, g16, s()));
  for (int64_t b = 0; b < P; ++b) {
    const int64_t n = bucket_count[static_cast<size_t>(b)], off = bucket_off[static_cast<size_t>(b)];
    if (n == 0) continue;
    EEP_RETURN_IF_ERROR(Gemm(g16 + off * H, n, SlotPtr(ml, b), 2 * inter, H, gu + off * 2 * inter,
                             static_cast<int>(S), A * H, A * 2 * inter));
  }
  EEP_CUDA_RETURN_IF_ERROR(SiluMul(gu, A, inter, splits, nullptr, act16, s()));
  for (int64_t b = 0; b < P; ++b) {
    const int64_t n = bucket_count[static_cast<size_t>(b)], off = bucket_off[static_cast<size_t>(b)];
    if (n == 0) continue;
    EEP_RETURN_IF_ERROR(Gemm(act16 + off * inter, n, SlotPtr(ml, b) + 2 * inter * H, H, inter,
                             y + off * H, static_cast<int>(S), A * inter, A * H));
  }
  EEP_CUDA_RETURN_IF_ERROR(MoeCombine(y, rows, w, N, k, H, splits, out, s()));
  if (ly.shared.inter > 0) {
    float* o2 = b_o2.as<float>();
    EEP_RETURN_IF_ERROR(RunMlp(ly.shared, N, o2));
    EEP_CUDA_RETURN_IF_ERROR(Add(out, o2, N * H, s()));
  }
  return Status::Ok();
}

Status CudaModel::Impl::TraceHidden(const float* x, int64_t T0, CudaForwardTrace* tr) {
  std::vector<float>& h = tr->hidden.emplace_back(static_cast<size_t>(T0 * c.hidden_size));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h.data(), x, h.size() * 4, cudaMemcpyDeviceToHost, s()));
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
  return Status::Ok();
}

Status CudaModel::Impl::Body(std::span<CudaSeqStep> batch, int64_t N, int64_t M, bool any_greedy, bool fused) {
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const bool mla = c.arch == Arch::kDeepseekV3;
  const bool gemv = UseGemv(N);
  float* x = b_x.as<float>();
  float* hf = b_hf.as<float>();
  bf16_t* h16 = b_h16.as<bf16_t>();
  const float eps = static_cast<float>(c.rms_norm_eps);
  CudaForwardTrace* tr = trace;
  const int64_t T0 = static_cast<int64_t>(batch[0].ids.size());
  // Norm sums (EEP_CUDA_NORM_SUMS, few tokens, every layer a fused-MoE one): the kernel that
  // updates the residual (embedding, o-proj GEMV, MoE combine) also adds up Σ x² per row, so
  // the input norm rides on the q/k/v GEMV and the post-attention norm on the router without
  // a reduction of their own: no RmsNorm launches in the layers. Slots [2l]: layer l's input
  // norm, [2l + 1]: its post-attention norm; zeroed once per step. (H100, batch 1: +2.6%
  // tokens/s; a q/k/v GEMV normalising x in shared memory in every block instead was no faster
  // than the RmsNorm launch it replaced, and neither were per-row atomics into the sums.)
  bool all_moe = true;
  for (const Layer& ly : layers) all_moe = all_moe && ly.is_moe;
  const bool sums = norm_sums && gemv && !mla && fused && all_moe && tr == nullptr && !fuse_next_norm &&
                    GemvNormFusable(N, H) && RouterPlanSupported(N, c.num_experts, c.num_experts_per_tok,
                                                                 map.num_physical(), H, true);
  double* sum_base = b_sums.as<double>();
  auto in_sums = [&](int64_t l) { return sums ? sum_base + 2 * l * kSumTokens : nullptr; };
  auto post_sums = [&](int64_t l) { return sums ? sum_base + (2 * l + 1) * kSumTokens : nullptr; };
  // The embedding writes slot 0 of the norm sums and clears the rest and the argmax keys after
  // them (later kernels add into them; no memset nodes in a captured step).
  const int64_t sum_words = SumsWords(M);
  EEP_CUDA_RETURN_IF_ERROR(Embed(embed.get(), TokD(), N, H, x, s(), in_sums(0), b_argmax.as<int32_t>(),
                                 sums ? sum_base + kSumTokens : sum_base, sums ? sum_words - kSumTokens : sum_words));
  if (tr != nullptr) EEP_RETURN_IF_ERROR(TraceHidden(x, T0, tr));
  bool hf_ready = false;  // the previous layer's combine already wrote this layer's normed rows
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Layer& ly = layers[static_cast<size_t>(l)];
    // f32 rows for the GEMV kernels, split BF16 rows for cuBLAS.
    const bool attn_gemv = gemv && !mla;
    // Few tokens: the norms ride on the GEMVs that read them (one launch less each).
    // (Measured on an H100 at batch 1: the q/k/v GEMV with the norm fused in, 640 blocks each
    // normalising, took longer than RmsNorm + GEMV; the 16-block router GEMV gained.)
    const bool attn_norm_in = attn_gemv && (fuse_attn_norm || sums) && GemvNormFusable(N, H);
    if (!attn_norm_in && !hf_ready)
      EEP_CUDA_RETURN_IF_ERROR(RmsNorm(x, H, ly.input_norm.get(), N, H, eps, attn_gemv ? hf : nullptr, H,
                                       attn_gemv ? nullptr : h16, splits, s()));
    hf_ready = false;
    const bool need16 = !gemv || (ly.is_moe && !fused);
    const bool moe_norm_in = ly.is_moe && fused && !need16 && GemvNormFusable(N, H);
    // One token with the norm sums: the o-proj GEMV routes as well (GemvRouter; softmax routing
    // without bias, shapes it takes).
    const bool route_in_oproj = fuse_router && sums && N == 1 && ly.is_moe && fused && moe_norm_in && attn_gemv &&
                                c.arch != Arch::kDeepseekV3 &&
                                GemvRouterBlocks(H, c.num_heads * c.head_dim, c.num_experts, c.num_experts_per_tok,
                                                 map.num_physical(), table_max_reps) > 0;
    EEP_RETURN_IF_ERROR_CTX(Attention(ly, l, batch, N, x, attn_norm_in, in_sums(l), post_sums(l), route_in_oproj),
                            fmt::format("layer {} attention", l));
    if (!moe_norm_in)
      EEP_CUDA_RETURN_IF_ERROR(
          RmsNorm(x, H, ly.post_norm.get(), N, H, eps, hf, H, need16 ? h16 : nullptr, splits, s()));
    if (ly.is_moe && fused) {
      // The combine's last block can produce what the next RmsNorm would (f32 rows only).
      const bool last = l + 1 == c.num_layers;
      // (Measured on an H100 at batch 1: the combine's single last block doing the norm took
      // longer than a separate RmsNorm launch, so this is off unless EEP_CUDA_FUSE_NEXT_NORM=1.)
      const bool next_f32_only = fuse_next_norm && (last || (attn_gemv && !fuse_attn_norm));
      const float* next_norm =
          next_f32_only ? (last ? final_norm.get() : layers[static_cast<size_t>(l + 1)].input_norm.get()) : nullptr;
      EEP_RETURN_IF_ERROR_CTX(FusedMoe(ly, l, N, x, moe_norm_in, next_norm, post_sums(l),
                                       l + 1 < c.num_layers ? in_sums(l + 1) : nullptr, route_in_oproj),
                              fmt::format("layer {} MoE", l));
      hf_ready = next_norm != nullptr;
    } else if (ly.is_moe) {
      EEP_RETURN_IF_ERROR_CTX(Moe(ly, l, N, b_o.as<float>()), fmt::format("layer {} MoE", l));
      EEP_CUDA_RETURN_IF_ERROR(Add(x, b_o.as<float>(), N * H, s()));
    } else if (gemv) {
      EEP_RETURN_IF_ERROR_CTX(MlpGemv(ly.dense, N, x, true), fmt::format("layer {} MLP", l));
    } else {
      EEP_RETURN_IF_ERROR_CTX(RunMlp(ly.dense, N, b_o.as<float>()), fmt::format("layer {} MLP", l));
      EEP_CUDA_RETURN_IF_ERROR(Add(x, b_o.as<float>(), N * H, s()));
    }
    if (tr != nullptr) EEP_RETURN_IF_ERROR(TraceHidden(x, T0, tr));
  }
  // Without a trace only the selected rows need the final norm: gathered and normed in one
  // launch below.
  const bool norm_in_gather = !hf_ready && tr == nullptr;
  if (!hf_ready && !norm_in_gather)
    EEP_CUDA_RETURN_IF_ERROR(RmsNorm(x, H, final_norm.get(), N, H, eps, hf, H, nullptr, 1, s()));
  if (tr != nullptr) {
    // MODELS.md §5: the last entry is the normed final state, not the raw last-layer output.
    tr->hidden.pop_back();
    EEP_RETURN_IF_ERROR(TraceHidden(hf, T0, tr));
  }
  if (M == 0) return Status::Ok();
  // LM head once for the whole batch over the rows any sequence wants (its last token, or all
  // of them), then argmax on the device.
  const bf16_t* head = c.tie_word_embeddings ? embed.get() : lm_head.w.get();
  // (Measured on an H100 at batch 1: the LM head GEMV norming x itself in each of its ~19k
  // blocks, with the Σ x² the last combine leaves, took 255 us against 202 plus a 5 us gather.)
  if (norm_in_gather)
    EEP_CUDA_RETURN_IF_ERROR(GatherRmsNormF32(x, SelD(), M, H, final_norm.get(), eps, b_hsel.as<float>(), s()));
  else
    EEP_CUDA_RETURN_IF_ERROR(GatherRowsF32(hf, SelD(), M, H, b_hsel.as<float>(), s()));
  if (UseGemv(M)) {
    GemvSegments sg;
    sg.seg[0] = {head, b_out.as<float>(), nullptr, V};
    sg.count = 1;
    EEP_CUDA_RETURN_IF_ERROR(Gemv(sg, H, b_hsel.as<float>(), H, M, false, s()));
  } else {
    EEP_CUDA_RETURN_IF_ERROR(SplitBf16(b_hsel.as<float>(), M, H, splits, b_head16.as<bf16_t>(), s()));
    EEP_RETURN_IF_ERROR(Linear(b_head16.as<bf16_t>(), M, head, V, H, nullptr, b_out.as<float>()));
  }
  if (any_greedy)
    EEP_CUDA_RETURN_IF_ERROR(ArgmaxRowsWide(b_out.as<float>(), M, V,
                                            reinterpret_cast<unsigned long long*>(sum_base + ArgKeysWord()),
                                            b_argmax.as<int32_t>(), s(), true));
  return Status::Ok();
}

Status CudaModel::Impl::Collect() {
  if (pending.empty()) return Status::Ok();
  PendingStep p = std::move(pending.front());
  pending.pop_front();
  EEP_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(step_done[p.slot].get()));
  const auto* out = reinterpret_cast<const int32_t*>(h_tok[p.slot].get());
  for (size_t i = 0; i < p.rows.size(); ++i) {
    const int64_t tok = out[p.rows[i]];
    if (p.outs[i] != nullptr) *p.outs[i] = tok;
    if (p.caches[i]->greedy_serial == p.serial) p.caches[i]->greedy_token = tok;
  }
  if (p.counts && route_observer) {
    // The observer takes ids: each expert as often as it was routed to.
    const auto* counts = reinterpret_cast<const int32_t*>(h_hist[p.slot].get());
    std::vector<int32_t> ids;
    for (int64_t ml = 0; ml < map.num_moe_layers(); ++ml) {
      ids.clear();
      for (int64_t e = 0; e < c.num_experts; ++e) ids.insert(ids.end(), counts[ml * c.num_experts + e], static_cast<int32_t>(e));
      route_observer(ml, ids.data(), static_cast<int64_t>(ids.size()));
    }
  }
  return Status::Ok();
}

Status CudaModel::Impl::Launch(std::span<CudaSeqStep> batch, CudaForwardTrace* tr, bool async) {
  const int64_t H = c.hidden_size, V = c.vocab_size, S = splits, L = c.num_layers;
  const bool mla = c.arch == Arch::kDeepseekV3;
  const int64_t nh = c.num_heads, nkv = mla ? nh : c.num_kv_heads;
  const int64_t dk = mla ? c.qk_nope_head_dim + c.qk_rope_head_dim : c.head_dim;
  const int64_t dv = mla ? c.v_head_dim : c.head_dim;
  int64_t N = 0;
  bool decode = true;  // every sequence brings one token
  for (const CudaSeqStep& st : batch) {
    if (st.cache == nullptr) return Status::InvalidArgument("forward: sequence without a KV cache");
    if (async && st.logits != nullptr)
      return Status::InvalidArgument("submit: a step that wants logits needs Forward (they are copied to the host)");
    for (size_t i = 0; i < st.ids.size(); ++i) {
      const int64_t id = st.ids[i];
      if (id == CudaModel::kDeviceToken) {
        if (st.ids.size() != 1)
          return Status::InvalidArgument("forward: kDeviceToken must be the only id of a decode step");
        if (st.cache->impl_->greedy_serial == 0)
          return Status::InvalidArgument("forward: kDeviceToken, but the sequence's last step made no greedy token");
        continue;
      }
      if (id < 0 || id >= V)
        return Status::InvalidArgument(fmt::format("token id {} is out of the vocabulary [0, {})", id, V));
    }
    N += static_cast<int64_t>(st.ids.size());
    decode = decode && st.ids.size() == 1;
  }
  if (N == 0) {
    // A rank with no tokens still takes part in every MoE layer's exchange.
    if (moe_executor != nullptr)
      for (int64_t ml = 0; ml < static_cast<int64_t>(moe_layer_ids.size()); ++ml)
        EEP_RETURN_IF_ERROR(moe_executor->Run(ml, nullptr, 0, c.num_experts_per_tok, nullptr, nullptr, nullptr));
    return Status::Ok();
  }
  // Grow caches (doubling), copying what they hold.
  for (CudaSeqStep& st : batch) {
    CudaKvCache::Impl& kc = *st.cache->impl_;
    const int64_t need = kc.length + static_cast<int64_t>(st.ids.size());
    if (c.max_position_embeddings > 0 && need > c.max_position_embeddings)
      return Status::OutOfRange(fmt::format("sequence of {} tokens exceeds max_position_embeddings {}", need,
                                            c.max_position_embeddings));
    if (!batched_attn && need > MaxAttentionKeys())
      return Status::OutOfRange(fmt::format("sequence of {} tokens exceeds the CUDA attention limit {}", need,
                                            MaxAttentionKeys()));
    if (need <= kc.capacity) continue;
    const int64_t cap = std::max<int64_t>(need, std::max<int64_t>(64, kc.capacity * 2));
    kc.k.resize(static_cast<size_t>(c.num_layers));
    kc.v.resize(static_cast<size_t>(c.num_layers));
    for (int64_t l = 0; l < c.num_layers; ++l) {
      EEP_ASSIGN_OR_RETURN(auto nk, DeviceAlloc<float>(static_cast<size_t>(cap * nkv * dk)));
      EEP_ASSIGN_OR_RETURN(auto nv, DeviceAlloc<float>(static_cast<size_t>(cap * nkv * dv)));
      if (kc.length > 0) {
        EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(nk.get(), kc.k[static_cast<size_t>(l)].get(),
                                                 static_cast<size_t>(kc.length * nkv * dk) * 4,
                                                 cudaMemcpyDeviceToDevice, s()));
        EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(nv.get(), kc.v[static_cast<size_t>(l)].get(),
                                                 static_cast<size_t>(kc.length * nkv * dv) * 4,
                                                 cudaMemcpyDeviceToDevice, s()));
        EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
      }
      kc.k[static_cast<size_t>(l)] = std::move(nk);
      kc.v[static_cast<size_t>(l)] = std::move(nv);
    }
    kc.capacity = cap;
  }
  if (tables_dirty) EEP_RETURN_IF_ERROR(BuildTables());
  const int64_t E = c.num_experts, k = c.num_experts_per_tok, P = map.num_physical();
  const bool fused = moe_executor == nullptr && N <= fused_max && tables_ok && GemvSupported(H) &&
                     GemvSupported(I()) && MoeRoutePlanSupported(N, E, k, P);
  // LM head rows: the last token of each sequence that wants logits or a greedy token, or
  // all of its tokens.
  std::vector<int64_t> sel_first(batch.size(), -1);
  int64_t M = 0;
  bool any_greedy = false;
  for (size_t i = 0; i < batch.size(); ++i) {
    const CudaSeqStep& st = batch[i];
    any_greedy |= st.greedy_token != nullptr;
    if (st.logits == nullptr && st.greedy_token == nullptr) continue;
    sel_first[i] = M;
    M += st.all_logits && st.logits != nullptr ? static_cast<int64_t>(st.ids.size()) : 1;
  }
  // Scratch, sized for this step before any launch (a growing Reserve waits for the device first).
  const int64_t A = N * k;
  const int64_t F = std::max<int64_t>({c.intermediate_size, I(), c.moe_intermediate_size * c.n_shared_experts, 1});
  const int64_t wide = std::max<int64_t>({H, nh * dk, nh * dv, nh * (c.qk_nope_head_dim + c.v_head_dim),
                                          c.q_lora_rank, c.kv_lora_rank + c.qk_rope_head_dim});
  auto R = [](DeviceBuffer& b, int64_t bytes) { return b.Reserve(static_cast<size_t>(std::max<int64_t>(bytes, 16))); };
  EEP_RETURN_IF_ERROR(R(b_x, N * H * 4));
  EEP_RETURN_IF_ERROR(R(b_h16, S * N * H * 2));
  EEP_RETURN_IF_ERROR(R(b_hf, N * H * 4));
  EEP_RETURN_IF_ERROR(R(b_sums, SumsWords(M) * 8));
  EEP_RETURN_IF_ERROR(R(b_o, N * H * 4));
  EEP_RETURN_IF_ERROR(R(b_o2, N * H * 4));
  EEP_RETURN_IF_ERROR(R(b_q, N * nh * dk * 4));
  EEP_RETURN_IF_ERROR(R(b_k, N * nkv * dk * 4));
  EEP_RETURN_IF_ERROR(R(b_v, N * nkv * dv * 4));
  EEP_RETURN_IF_ERROR(R(b_attn, N * nh * dv * 4));
  EEP_RETURN_IF_ERROR(R(b_a16, S * N * wide * 2));
  EEP_RETURN_IF_ERROR(R(b_gemm, S * N * std::max<int64_t>({wide, 2 * F, V}) * 4));
  EEP_RETURN_IF_ERROR(R(b_qa, N * std::max<int64_t>(c.q_lora_rank, 1) * 4));
  EEP_RETURN_IF_ERROR(R(b_cmp, N * (c.kv_lora_rank + c.qk_rope_head_dim) * 4));
  EEP_RETURN_IF_ERROR(R(b_kv, N * nh * (c.qk_nope_head_dim + c.v_head_dim) * 4));
  EEP_RETURN_IF_ERROR(R(b_gu, S * std::max(A, N) * 2 * F * 4));
  EEP_RETURN_IF_ERROR(R(b_act16, S * std::max(A, N) * F * 2));
  EEP_RETURN_IF_ERROR(R(b_actf, N * F * 4));
  EEP_RETURN_IF_ERROR(R(b_logits, N * std::max<int64_t>(E, 1) * 4));
  EEP_RETURN_IF_ERROR(R(b_ids, A * 4));
  EEP_RETURN_IF_ERROR(R(b_slot_of, A * 4));
  EEP_RETURN_IF_ERROR(R(b_w, A * 4));
  EEP_RETURN_IF_ERROR(R(b_g16, S * A * H * 2));
  EEP_RETURN_IF_ERROR(R(b_y, S * A * H * 4));
  EEP_RETURN_IF_ERROR(R(b_src, S * A * 4));
  EEP_RETURN_IF_ERROR(R(b_rows, S * A * 4));
  if (fused) {
    EEP_RETURN_IF_ERROR(R(b_act, A * I() * 4));
    EEP_RETURN_IF_ERROR(R(b_plan, MoePlanInts(MoeMaxGroups(A, P), A) * 4));
    if (N == 1) EEP_RETURN_IF_ERROR(R(b_rpart, std::max(SmCount(), 1) * std::max<int64_t>(E, 1) * 4));
  }
  if (M > 0) {
    EEP_RETURN_IF_ERROR(R(b_hsel, M * H * 4));
    EEP_RETURN_IF_ERROR(R(b_head16, S * M * H * 2));
    EEP_RETURN_IF_ERROR(R(b_out, M * V * 4));
    EEP_RETURN_IF_ERROR(R(b_argmax, M * 4));
  }
  // Step inputs: one pinned buffer, one copy. This step's host buffers are free once the step
  // two back (the same slot) is collected.
  const uint64_t this_serial = serial + 1;
  const int slot = static_cast<int>(this_serial & 1);
  while (std::any_of(pending.begin(), pending.end(), [&](const PendingStep& p) { return p.slot == slot; }))
    EEP_RETURN_IF_ERROR(Collect());
  // A kDeviceToken is read on the device from the argmax rows of the step just before, unless
  // the host already has it, or those rows may have moved (a buffer grew since: the device is
  // idle then) or been overwritten by a later step: then the host waits for it.
  for (const CudaSeqStep& st : batch) {
    CudaKvCache::Impl& kc = *st.cache->impl_;
    if (st.ids.size() != 1 || st.ids[0] != CudaModel::kDeviceToken || kc.greedy_token >= 0) continue;
    if (kc.greedy_serial != serial || launch_gen != DeviceBuffer::generation())
      while (kc.greedy_token < 0 && !pending.empty()) EEP_RETURN_IF_ERROR(Collect());
    if (kc.greedy_serial != serial && kc.greedy_token < 0)
      return Status::InvalidArgument("forward: kDeviceToken, but the sequence's greedy token is gone");
  }
  in_N = N;
  in_M = M;
  in_ptr_off = ((2 * N + M) * 4 + 15) / 16 * 16;
  const size_t in_bytes = static_cast<size_t>(in_ptr_off + 2 * L * N * 8);
  EEP_RETURN_IF_ERROR(R(b_in, static_cast<int64_t>(in_bytes)));
  auto pinned = [](PinnedPtr& buf, size_t& have, size_t want) -> Status {
    if (have >= want) return Status::Ok();
    buf.reset();
    void* p = nullptr;
    EEP_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&p, want, cudaHostAllocDefault));
    buf.reset(static_cast<uint8_t*>(p));
    have = want;
    return Status::Ok();
  };
  EEP_RETURN_IF_ERROR(pinned(h_in[slot], h_in_bytes[slot], in_bytes));
  EEP_RETURN_IF_ERROR(pinned(h_tok[slot], h_tok_bytes[slot], static_cast<size_t>(std::max<int64_t>(M, 1)) * 4));
  if (step_done[slot] == nullptr) {
    cudaEvent_t e = nullptr;
    EEP_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    step_done[slot].reset(e);
  }
  {
    auto* ids32 = reinterpret_cast<int32_t*>(h_in[slot].get());
    int32_t* pos32 = ids32 + N;
    int32_t* sel = ids32 + 2 * N;
    auto* ptrs = reinterpret_cast<float**>(h_in[slot].get() + in_ptr_off);
    int64_t t = 0, m = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      const CudaSeqStep& st = batch[i];
      CudaKvCache::Impl& kc = *st.cache->impl_;
      const int64_t T = static_cast<int64_t>(st.ids.size());
      for (int64_t j = 0; j < T; ++j, ++t) {
        const int64_t id = st.ids[static_cast<size_t>(j)];
        ids32[t] = static_cast<int32_t>(id != CudaModel::kDeviceToken ? id
                                        : kc.greedy_token >= 0      ? kc.greedy_token
                                                                    : -1 - kc.greedy_row);
        pos32[t] = static_cast<int32_t>(kc.length + j);
        for (int64_t l = 0; l < L; ++l) {
          ptrs[l * N + t] = kc.k[static_cast<size_t>(l)].get();
          ptrs[(L + l) * N + t] = kc.v[static_cast<size_t>(l)].get();
        }
      }
      if (sel_first[i] < 0) continue;
      const bool all = st.all_logits && st.logits != nullptr;
      for (int64_t r = all ? 0 : T - 1; r < T; ++r) sel[m++] = static_cast<int32_t>(t - T + r);
    }
  }
  EEP_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(b_in.as<uint8_t>(), h_in[slot].get(), in_bytes, cudaMemcpyHostToDevice, s()));

  trace = tr;
  step_is_decode = decode;
  if (tr != nullptr) {
    tr->hidden.clear();
    tr->router_logits.assign(static_cast<size_t>(map.num_moe_layers()), {});
    tr->route_ids.assign(static_cast<size_t>(map.num_moe_layers()), {});
  }
  // (Set before the body runs or a captured step replays: the counts' place in b_sums.)
  route_hist = CountsOnDevice() && tr == nullptr && fused
                   ? reinterpret_cast<int32_t*>(b_sums.as<double>() + HistWord(M))
                   : nullptr;
  const bool graphable =
      use_graphs && fused && decode && batched_attn && tr == nullptr && (!route_observer || route_counts_only);
  if (graphable) {
    const uint64_t gen = DeviceBuffer::generation();
    std::erase_if(graphs, [&](const StepGraph& g) {
      if (g.generation == gen) return false;
      cudaGraphExecDestroy(g.exec);
      return true;
    });
    auto it = std::find_if(graphs.begin(), graphs.end(),
                           [&](const StepGraph& g) { return g.N == N && g.M == M && g.greedy == any_greedy; });
    if (it == graphs.end()) {
      if (graphs.size() >= 8) {
        cudaGraphExecDestroy(graphs.front().exec);
        graphs.erase(graphs.begin());
      }
      EEP_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(s(), cudaStreamCaptureModeThreadLocal));
      Status body = Body(batch, N, M, any_greedy, fused);
      cudaGraph_t graph = nullptr;
      const cudaError_t end = cudaStreamEndCapture(s(), &graph);
      if (!body.ok()) {
        if (graph != nullptr) cudaGraphDestroy(graph);
        return body.WithContext("capturing a decode step");
      }
      EEP_CUDA_RETURN_IF_ERROR(end);
      cudaGraphExec_t exec = nullptr;
      const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      EEP_CUDA_RETURN_IF_ERROR(inst);
      graphs.push_back({N, M, any_greedy, gen, exec});
      it = graphs.end() - 1;
    }
#ifdef EEP_PDL_TRACE
    // Measurement builds: the timeline of the process's graph replay number EEP_PDL_TRACE_STEP
    // (default 20, whatever its shape), to EEP_PDL_TRACE_OUT (time ns, kind, sm, grid, block per
    // line).
    static int replays = 0;
    static const int trace_at = std::getenv("EEP_PDL_TRACE_STEP") ? std::atoi(std::getenv("EEP_PDL_TRACE_STEP")) : 20;
    const char* trace_out = std::getenv("EEP_PDL_TRACE_OUT");
    if (trace_out != nullptr && ++replays == trace_at) {
      constexpr unsigned kCap = 1u << 20;
      EEP_ASSIGN_OR_RETURN(auto ev, DeviceAlloc<unsigned long long>(2 * kCap));
      EEP_ASSIGN_OR_RETURN(auto cnt, DeviceAlloc<unsigned>(1));
      EEP_CUDA_RETURN_IF_ERROR(cudaMemset(cnt.get(), 0, 4));
      EEP_CUDA_RETURN_IF_ERROR(PdlTraceSet(ev.get(), cnt.get(), kCap));
      EEP_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->exec, s()));
      EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s()));
      EEP_CUDA_RETURN_IF_ERROR(PdlTraceSet(nullptr, nullptr, 0));
      unsigned n = 0;
      EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(&n, cnt.get(), 4, cudaMemcpyDeviceToHost));
      n = std::min(n, kCap);
      std::vector<unsigned long long> h(2 * static_cast<size_t>(n));
      EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(h.data(), ev.get(), h.size() * 8, cudaMemcpyDeviceToHost));
      std::FILE* f = std::fopen(trace_out, "w");
      if (f == nullptr) return Status::IOError(fmt::format("{}: cannot write the PDL trace", trace_out));
      for (unsigned i = 0; i < n; ++i) {
        const unsigned long long m = h[2 * i + 1];
        std::fprintf(f, "%llu %llu %llu %llu %llu\n", h[2 * i], m >> 62, (m >> 48) & 0xff, (m >> 24) & 0xffffff,
                     m & 0xffffff);
      }
      std::fclose(f);
    } else {
      EEP_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->exec, s()));
    }
#else
    EEP_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->exec, s()));
#endif
  } else {
    Status body = Body(batch, N, M, any_greedy, fused);
    trace = nullptr;
    EEP_RETURN_IF_ERROR(body);
  }
  trace = nullptr;
  for (CudaSeqStep& st : batch) st.cache->impl_->length += static_cast<int64_t>(st.ids.size());
  PendingStep p;
  p.serial = this_serial;
  p.slot = slot;
  if (route_hist != nullptr) {
    const size_t bytes = static_cast<size_t>(map.num_moe_layers() * c.num_experts) * 4;
    EEP_RETURN_IF_ERROR(pinned(h_hist[slot], h_hist_bytes[slot], bytes));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_hist[slot].get(), route_hist, bytes, cudaMemcpyDeviceToHost, s()));
    p.counts = true;
    route_hist = nullptr;
  }
  if (M > 0 && any_greedy)
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h_tok[slot].get(), b_argmax.as<int32_t>(), static_cast<size_t>(M) * 4,
                                             cudaMemcpyDeviceToHost, s()));
  for (size_t i = 0; i < batch.size(); ++i) {
    const CudaSeqStep& st = batch[i];
    CudaKvCache::Impl& kc = *st.cache->impl_;
    if (!any_greedy || sel_first[i] < 0) {
      kc.ForgetGreedy();
      continue;
    }
    const int64_t rows = st.all_logits && st.logits != nullptr ? static_cast<int64_t>(st.ids.size()) : 1;
    kc.greedy_serial = this_serial;
    kc.greedy_row = sel_first[i] + rows - 1;
    kc.greedy_token = -1;
    p.outs.push_back(st.greedy_token);
    p.caches.push_back(&kc);
    p.rows.push_back(kc.greedy_row);
  }
  for (size_t i = 0; i < batch.size() && !async; ++i) {
    const CudaSeqStep& st = batch[i];
    if (st.logits == nullptr || sel_first[i] < 0) continue;
    const int64_t rows = st.all_logits ? static_cast<int64_t>(st.ids.size()) : 1;
    st.logits->resize(static_cast<size_t>(rows * V));
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(st.logits->data(), b_out.as<float>() + sel_first[i] * V,
                                             static_cast<size_t>(rows * V) * 4, cudaMemcpyDeviceToHost, s()));
  }
  EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(step_done[slot].get(), s()));
  serial = this_serial;
  launch_gen = DeviceBuffer::generation();
  pending.push_back(std::move(p));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// CudaModel

CudaModel::CudaModel() : impl_(std::make_unique<Impl>()) {}
CudaModel::~CudaModel() = default;

Result<std::unique_ptr<CudaModel>> CudaModel::Load(const std::string& dir, const CudaLoadOptions& options) {
  if (!Available()) return Status::Unavailable("no CUDA device is visible (--backend cuda needs a GPU)");
  std::unique_ptr<CudaModel> m(new CudaModel());
  Impl& im = *m->impl_;
  im.opt = options;
  im.splits = options.split_activations ? 2 : 1;
  EEP_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  EEP_ASSIGN_OR_RETURN(im.c, LoadModelConfig(dir));
  EEP_ASSIGN_OR_RETURN(im.ckpt, Checkpoint::Open(dir));
  cudaStream_t st = nullptr;
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  im.stream.reset(st);
  cublasHandle_t h = nullptr;
  EEP_CUBLAS_RETURN_IF_ERROR(cublasCreate(&h));
  im.blas.reset(h);
  EEP_CUBLAS_RETURN_IF_ERROR(cublasSetStream(h, st));
  // Default math: the router's SGEMM stays f32 (TF32 needs opting in), so routing decisions
  // follow the same values as on the CPU; BF16 GEMMs still use the tensor cores.
  EEP_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  // An explicit workspace: cuBLAS must not allocate while a decode step is being captured.
  EEP_RETURN_IF_ERROR(im.blas_workspace.Reserve(32u << 20));
  EEP_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(h, im.blas_workspace.as<void>(), 32u << 20));
  auto env_int = [](const char* name, int64_t fallback) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? std::strtoll(v, nullptr, 10) : fallback;
  };
  im.gemv_max = options.gemv_max_tokens >= 0 ? options.gemv_max_tokens : env_int("EEP_CUDA_GEMV_MAX", 8);
  im.fused_max = options.fused_moe_max_tokens >= 0 ? options.fused_moe_max_tokens : env_int("EEP_CUDA_MOE_FUSED_MAX", 256);
  im.mma_min = env_int("EEP_CUDA_MOE_MMA_MIN", 32);
  im.gqa_min = env_int("EEP_CUDA_GQA_MIN", 16);
  im.use_graphs = options.cuda_graphs && env_int("EEP_CUDA_GRAPHS", 1) != 0;
  im.fuse_attn_norm = env_int("EEP_CUDA_FUSE_ATTN_NORM", 0) != 0;
  im.fuse_next_norm = env_int("EEP_CUDA_FUSE_NEXT_NORM", 0) != 0;
  im.norm_sums = env_int("EEP_CUDA_NORM_SUMS", 1) != 0;
  im.gate_up_one = env_int("EEP_CUDA_GATE_UP_ONE", 1) != 0;
  im.fuse_router = env_int("EEP_CUDA_FUSE_ROUTER", 1) != 0;
  im.residual_early = env_int("EEP_CUDA_RESIDUAL_EARLY", 1) != 0;
  EEP_RETURN_IF_ERROR_CTX(im.LoadWeights(), dir);
  EEP_ASSIGN_OR_RETURN(im.counters, DeviceAlloc<unsigned>(2));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemset(im.counters.get(), 0, 2 * sizeof(unsigned)));
  {
    const ModelConfig& c = im.c;
    const bool mla = c.arch == Arch::kDeepseekV3;
    const int64_t dk = mla ? c.qk_nope_head_dim + c.qk_rope_head_dim : c.head_dim;
    const int64_t dv = mla ? c.v_head_dim : c.head_dim;
    im.batched_attn = dk <= kMaxBatchedHeadDim && dv <= kMaxBatchedHeadDim;
    bool ok = GemvSupported(c.hidden_size) && GemvSupported(c.num_heads * dv);
    for (const Layer& ly : im.layers) {
      if (!ly.is_moe) ok = ok && GemvSupported(ly.dense.inter);
      if (ly.shared.inter > 0) ok = ok && GemvSupported(ly.shared.inter);
    }
    im.gemv_dims_ok = ok;
  }
  im.ckpt.reset();  // everything is on the GPU; drop the shards' mappings
  EEP_LOG_INFO("CUDA model {} on {}: {:.1f} MiB of weights on the GPU", dir, DeviceDescription(),
               static_cast<double>(im.bytes) / (1 << 20));
  return m;
}

const ModelConfig& CudaModel::config() const { return impl_->c; }
Status CudaModel::Forward(std::span<CudaSeqStep> batch, CudaForwardTrace* trace) {
  return impl_->Forward(batch, trace);
}
Status CudaModel::Submit(std::span<CudaSeqStep> batch) { return impl_->Launch(batch, nullptr, true); }
Status CudaModel::Collect() { return impl_->Collect(); }
size_t CudaModel::queued_steps() const { return impl_->pending.size(); }
const ExpertMap& CudaModel::expert_map() const { return impl_->map; }
int64_t CudaModel::weight_bytes() const { return impl_->bytes; }
int CudaModel::device() const { return impl_->opt.device; }

Status CudaModel::SetSlot(int64_t moe_layer, int64_t slot, DType dtype, const void* gate, const void* up,
                          const void* down) {
  Impl& im = *impl_;
  EEP_ASSIGN_OR_RETURN(void* held, SlotAddress(moe_layer, slot));
  const size_t mat = static_cast<size_t>(im.I() * im.c.hidden_size);
  bf16_t* dst = static_cast<bf16_t*>(held);
  const void* srcs[3] = {gate, up, down};
  for (int i = 0; i < 3; ++i) {
    Status st;
    auto host = ToBf16Host(dtype, srcs[i], mat, &st);
    EEP_RETURN_IF_ERROR(st);
    EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst + i * mat, host.data(), mat * 2, cudaMemcpyHostToDevice));
  }
  im.Filled(moe_layer, slot) = true;
  im.tables_dirty = true;
  return Status::Ok();
}

Status CudaModel::SetExpertMap(ExpertMap map) {
  Impl& im = *impl_;
  if (map.num_moe_layers() != im.map.num_moe_layers() || map.num_physical() != im.map.num_physical())
    return Status::InvalidArgument(fmt::format("expert map of {}×{} slots does not fit the {}×{} device slots",
                                               map.num_moe_layers(), map.num_physical(), im.map.num_moe_layers(),
                                               im.map.num_physical()));
  im.map = std::move(map);
  im.tables_dirty = true;
  return Status::Ok();
}

Status CudaModel::ConfigureExpertSlots(ExpertMap map, int64_t slot_begin, int64_t slot_end) {
  Impl& im = *impl_;
  const int64_t ML = static_cast<int64_t>(im.moe_layer_ids.size());
  if (map.num_moe_layers() != ML)
    return Status::InvalidArgument(fmt::format("expert map has {} MoE layers, the model {}", map.num_moe_layers(), ML));
  if (slot_begin < 0 || slot_end < slot_begin || slot_end > map.num_physical())
    return Status::InvalidArgument(fmt::format("slots [{}, {}) do not fit a map of {} slots", slot_begin, slot_end,
                                               map.num_physical()));
  if (slot_begin == im.slot_begin && slot_end == im.slot_end && im.slots.size() == static_cast<size_t>(ML)) {
    im.map = std::move(map);  // same slots held: nothing moves
    im.tables_dirty = true;
    return Status::Ok();
  }
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(im.s()));
  if (im.restore_stream) EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(im.restore_stream.get()));
  const int64_t old_count = im.slot_end - im.slot_begin, count = slot_end - slot_begin;
  const int64_t keep = std::min(old_count, count);
  const size_t elems = static_cast<size_t>(im.ExpertElems());
  for (int64_t ml = 0; ml < ML; ++ml) {
    auto& dev = im.slots[static_cast<size_t>(ml)];
    DevicePtr<bf16_t> next;
    if (count > 0) {
      EEP_ASSIGN_OR_RETURN(next, DeviceAlloc<bf16_t>(static_cast<size_t>(count) * elems));
      if (keep > 0)
        EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(next.get(), dev.get(), static_cast<size_t>(keep) * elems * 2,
                                            cudaMemcpyDeviceToDevice));
    }
    dev = std::move(next);
    auto& f = im.filled[static_cast<size_t>(ml)];
    f.resize(static_cast<size_t>(count), false);
  }
  im.bytes += (count - old_count) * ML * im.ExpertElems() * 2;
  im.map = std::move(map);
  im.slot_begin = slot_begin;
  im.slot_end = slot_end;
  im.tables_dirty = true;
  return Status::Ok();
}

void CudaModel::SetMoeExecutor(MoeExecutor* executor) { impl_->moe_executor = executor; }
void CudaModel::SetRouteObserver(RouteObserver observer, bool counts_only) {
  impl_->route_observer = std::move(observer);
  impl_->route_counts_only = counts_only;
  impl_->DropGraphs();  // captured steps count or not
}

Status CudaModel::RunExpertRows(int64_t moe_layer, const int32_t* slot_ids, const float* x, int64_t n, float* y) {
  Impl& im = *impl_;
  if (n == 0) return Status::Ok();
  if (moe_layer < 0 || moe_layer >= im.map.num_moe_layers())
    return Status::OutOfRange(fmt::format("MoE layer {} does not exist", moe_layer));
  for (int64_t i = 0; i < n; ++i)
    if (!im.HoldsSlot(slot_ids[i]) || !im.Filled(moe_layer, slot_ids[i]))
      return Status::Internal(fmt::format("MoE layer {}: slot {} is not held here or has no weights", moe_layer,
                                          slot_ids[i]));
  const int64_t H = im.c.hidden_size, inter = im.I(), S = im.splits;
  // Rows grouped by slot (stable): position a of the grouped order holds row order[a].
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return slot_ids[a] < slot_ids[b]; });
  std::vector<int32_t> src(static_cast<size_t>(S * n)), rows(static_cast<size_t>(n * S));
  for (int64_t a = 0; a < n; ++a)
    for (int64_t sp = 0; sp < S; ++sp) {
      src[static_cast<size_t>(sp * n + a)] = static_cast<int32_t>(sp * n + order[static_cast<size_t>(a)]);
      rows[static_cast<size_t>(order[static_cast<size_t>(a)] * S + sp)] = static_cast<int32_t>(sp * n + a);
    }
  const std::vector<float> ones(static_cast<size_t>(n), 1.0f);
  auto R = [](DeviceBuffer& b, int64_t bytes) { return b.Reserve(static_cast<size_t>(std::max<int64_t>(bytes, 16))); };
  EEP_RETURN_IF_ERROR(R(im.e_x, n * H * 4));
  EEP_RETURN_IF_ERROR(R(im.e_x16, S * n * H * 2));
  EEP_RETURN_IF_ERROR(R(im.e_g16, S * n * H * 2));
  EEP_RETURN_IF_ERROR(R(im.e_gu, S * n * 2 * inter * 4));
  EEP_RETURN_IF_ERROR(R(im.e_act16, S * n * inter * 2));
  EEP_RETURN_IF_ERROR(R(im.e_y, S * n * H * 4));
  EEP_RETURN_IF_ERROR(R(im.e_src, S * n * 4));
  EEP_RETURN_IF_ERROR(R(im.e_rows, S * n * 4));
  EEP_RETURN_IF_ERROR(R(im.e_w, n * 4));
  EEP_RETURN_IF_ERROR(R(im.e_out, n * H * 4));
  cudaStream_t st = im.s();
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.e_x.as<float>(), x, static_cast<size_t>(n * H) * 4, cudaMemcpyHostToDevice, st));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.e_src.as<int32_t>(), src.data(), src.size() * 4, cudaMemcpyHostToDevice, st));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.e_rows.as<int32_t>(), rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, st));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(im.e_w.as<float>(), ones.data(), ones.size() * 4, cudaMemcpyHostToDevice, st));
  EEP_CUDA_RETURN_IF_ERROR(SplitBf16(im.e_x.as<float>(), n, H, static_cast<int>(S), im.e_x16.as<bf16_t>(), st));
  EEP_CUDA_RETURN_IF_ERROR(GatherRows(im.e_x16.as<bf16_t>(), im.e_src.as<int32_t>(), S * n, H, im.e_g16.as<bf16_t>(), st));
  bf16_t* g16 = im.e_g16.as<bf16_t>();
  float* gu = im.e_gu.as<float>();
  bf16_t* act16 = im.e_act16.as<bf16_t>();
  float* yd = im.e_y.as<float>();
  std::vector<std::pair<int64_t, int64_t>> buckets;  // (offset, count) in grouped order
  for (int64_t a = 0; a < n;) {
    int64_t e = a;
    while (e < n && slot_ids[order[static_cast<size_t>(e)]] == slot_ids[order[static_cast<size_t>(a)]]) ++e;
    buckets.emplace_back(a, e - a);
    a = e;
  }
  for (const auto& [off, cnt] : buckets)
    EEP_RETURN_IF_ERROR(im.Gemm(g16 + off * H, cnt, im.SlotPtr(moe_layer, slot_ids[order[static_cast<size_t>(off)]]),
                                2 * inter, H, gu + off * 2 * inter, static_cast<int>(S), n * H, n * 2 * inter));
  EEP_CUDA_RETURN_IF_ERROR(SiluMul(gu, n, inter, static_cast<int>(S), nullptr, act16, st));
  for (const auto& [off, cnt] : buckets)
    EEP_RETURN_IF_ERROR(im.Gemm(act16 + off * inter, cnt,
                                im.SlotPtr(moe_layer, slot_ids[order[static_cast<size_t>(off)]]) + 2 * inter * H, H,
                                inter, yd + off * H, static_cast<int>(S), n * inter, n * H));
  // Un-permute and add the split halves (weight 1: exact).
  EEP_CUDA_RETURN_IF_ERROR(MoeCombine(yd, im.e_rows.as<int32_t>(), im.e_w.as<float>(), n, 1, H, static_cast<int>(S),
                                      im.e_out.as<float>(), st));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(y, im.e_out.as<float>(), static_cast<size_t>(n * H) * 4, cudaMemcpyDeviceToHost, st));
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(st));
  return Status::Ok();
}

int64_t CudaModel::slot_bytes() const { return impl_->ExpertElems() * 2; }

int64_t CudaModel::MoeLayerId(int64_t moe_layer) const {
  const Impl& im = *impl_;
  if (moe_layer < 0 || moe_layer >= static_cast<int64_t>(im.moe_layer_ids.size())) return -1;
  return im.moe_layer_ids[static_cast<size_t>(moe_layer)];
}

void CudaModel::set_restore_staging_bytes(uint64_t bytes) { impl_->staging_request_bytes = bytes; }
void CudaModel::set_restore_direct(bool direct) { impl_->restore_direct = direct; }

Status CudaModel::ReadSlot(int64_t moe_layer, int64_t slot, std::vector<uint16_t>* bf16) const {
  const Impl& im = *impl_;
  EEP_ASSIGN_OR_RETURN(void* src, SlotAddress(moe_layer, slot));
  bf16->resize(static_cast<size_t>(im.ExpertElems()));
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(im.s()));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(bf16->data(), src, bf16->size() * 2, cudaMemcpyDeviceToHost));
  return Status::Ok();
}

Result<void*> CudaModel::SlotAddress(int64_t moe_layer, int64_t slot) const {
  const Impl& im = *impl_;
  if (moe_layer < 0 || moe_layer >= im.map.num_moe_layers() || !im.HoldsSlot(slot))
    return Status::OutOfRange(fmt::format("slot {} of MoE layer {} is not held here", slot, moe_layer));
  return static_cast<void*>(im.SlotPtr(moe_layer, slot));
}

Status CudaModel::SetSlotFromDevice(int64_t moe_layer, int64_t slot, const void* src) {
  Impl& im = *impl_;
  EEP_ASSIGN_OR_RETURN(void* dst, SlotAddress(moe_layer, slot));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, static_cast<size_t>(slot_bytes()), cudaMemcpyDeviceToDevice, im.s()));
  im.Filled(moe_layer, slot) = true;
  im.tables_dirty = true;
  return Status::Ok();
}

Result<std::unique_ptr<DeviceMemory>> DeviceMemory::Allocate(int device, uint64_t num_bytes) {
  EEP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<uint64_t>(num_bytes, 1));
  if (e != cudaSuccess) {
    cudaGetLastError();
    return Status::ResourceExhausted(
        fmt::format("cudaMalloc of {} bytes on GPU {}: {}", num_bytes, device, cudaGetErrorString(e)));
  }
  return std::unique_ptr<DeviceMemory>(new DeviceMemory(device, p, num_bytes));
}

DeviceMemory::~DeviceMemory() {
  if (data_ == nullptr) return;
  cudaSetDevice(device_);
  // Copies out of it may still be queued on non-blocking streams (SetSlotFromDevice), which
  // cudaFree is not guaranteed to wait for.
  cudaDeviceSynchronize();
  cudaFree(data_);
}

Status DeviceMemory::CopyFromHost(uint64_t offset, const void* src, uint64_t n) {
  if (offset > size_ || n > size_ - offset)
    return Status::OutOfRange(fmt::format("device copy of {} bytes at {} past {} bytes", n, offset, size_));
  EEP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemcpy(static_cast<uint8_t*>(data_) + offset, src, n, cudaMemcpyHostToDevice));
  return Status::Ok();
}

Status CudaModel::ClearSlot(int64_t moe_layer, int64_t slot) {
  Impl& im = *impl_;
  EEP_ASSIGN_OR_RETURN(void* dst, SlotAddress(moe_layer, slot));
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(im.s()));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemset(dst, 0, static_cast<size_t>(im.ExpertElems()) * 2));
  return Status::Ok();  // still "filled": a zero expert is a valid (if useless) one
}

Result<uint64_t> CudaModel::PrepareRestore(backup::ExpertBackupClient& client) {
  Impl& im = *impl_;
  EEP_RETURN_IF_ERROR(im.EnsureRestoreResources());
  uint64_t registered = 0;
  std::set<const uint8_t*> seen;
  for (int64_t ml = 0; ml < static_cast<int64_t>(im.moe_layer_ids.size()); ++ml) {
    const int64_t layer_id = im.moe_layer_ids[static_cast<size_t>(ml)];
    for (int64_t e = 0; e < im.c.num_experts; ++e) {
      // One expert at a time: a batch fails whole when one expert is not mapped here.
      auto mapped = client.MapExpertParams(layer_id, {e}, "");
      if (!mapped.ok()) continue;
      for (const auto& p : *mapped) {
        if (!seen.insert(p.region_base).second) continue;
        if (im.EnsureMirrorRegistered(p)) registered += p.region_bytes;
      }
    }
  }
  return registered;
}

Status CudaModel::RestoreExperts(backup::ExpertBackupClient& client, std::span<const SlotRestore> slots,
                                 RestoreStats* stats) {
  Impl& im = *impl_;
  const auto t_start = std::chrono::steady_clock::now();
  double fetch_s = 0;
  uint64_t copied_bytes = 0;
  const int64_t ML = im.map.num_moe_layers();
  for (const SlotRestore& r : slots) {
    if (r.moe_layer < 0 || r.moe_layer >= ML || !im.HoldsSlot(r.slot))
      return Status::OutOfRange(fmt::format("restore: slot {} of MoE layer {} is not held here", r.slot, r.moe_layer));
    if (r.logical_expert < 0 || r.logical_expert >= im.c.num_experts)
      return Status::OutOfRange(fmt::format("restore: logical expert {} (of {}) for slot {} of MoE layer {}",
                                            r.logical_expert, im.c.num_experts, r.slot, r.moe_layer));
  }
  if (slots.empty()) return Status::Ok();
  const uint64_t mat_elems = static_cast<uint64_t>(im.I() * im.c.hidden_size);
  const uint64_t expert_bytes = 3 * mat_elems * 2;  // BF16 [gate | up | down], as a slot
  EEP_RETURN_IF_ERROR(im.EnsureRestoreResources());
  const uint64_t experts_per_half = (im.staging_bytes / 2) / expert_bytes;
  cudaStream_t side = im.restore_stream.get();
  // No slot is overwritten while queued forward work may still read it.
  EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(im.compute_done.get(), im.s()));
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(side, im.compute_done.get(), 0));

  // Per MoE layer (ascending): the distinct experts, each with the slots that take it.
  std::map<int64_t, std::map<int64_t, std::vector<int64_t>>> plan;  // [moe_layer][expert] -> slots
  for (const SlotRestore& r : slots) plan[r.moe_layer][r.logical_expert].push_back(r.slot);
  int half = 0;
  bool half_used[2] = {false, false};
  bool all_direct = true;
  for (const auto& [ml, experts] : plan) {
    const int64_t layer_id = im.moe_layer_ids[static_cast<size_t>(ml)];
    std::vector<int64_t> ids;
    for (const auto& [e, unused] : experts) ids.push_back(e);
    if (im.restore_direct) {
      // Direct: every tensor BF16 of a slot's size, in a mapping CUDA accepted.
      auto mapped = client.MapExpertParams(layer_id, ids, "");
      bool ok = mapped.ok() && mapped->size() == 3 * ids.size();
      if (ok)
        for (const auto& p : *mapped)
          ok = ok && p.dtype == DType::kBF16 && p.num_bytes == mat_elems * 2 && im.EnsureMirrorRegistered(p);
      if (ok) {
        std::map<std::string, const backup::MappedExpertParam*> by_name;
        for (const auto& p : *mapped) by_name[p.name] = &p;
        for (size_t i = 0; i < ids.size(); ++i) {
          const auto names = im.c.ExpertTensorNames(layer_id, ids[i]);  // gate, up, down
          for (int64_t slot : experts.at(ids[i])) {
            bf16_t* dst = im.SlotPtr(ml, slot);
            for (size_t k = 0; k < 3; ++k) {
              auto it = by_name.find(names[k]);
              if (it == by_name.end())
                return Status::NotFound(fmt::format("restore: no backup manager lists '{}'", names[k]));
              EEP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst + k * mat_elems, it->second->data, it->second->num_bytes,
                                                       cudaMemcpyHostToDevice, side));
            }
            copied_bytes += expert_bytes;
          }
        }
        for (const auto& [e, ss] : experts)
          for (int64_t slot : ss) im.Filled(ml, slot) = true;
        continue;
      }
    }
    all_direct = false;
    EEP_ASSIGN_OR_RETURN(auto params, client.ListExpertParams(layer_id, ids, ""));
    std::map<std::string, const backup::ExpertParamInfo*> by_name;
    for (const auto& p : params) by_name[p.name] = &p;
    for (size_t begin = 0; begin < ids.size(); begin += experts_per_half) {
      const size_t end = std::min(ids.size(), begin + static_cast<size_t>(experts_per_half));
      const std::vector<int64_t> chunk(ids.begin() + static_cast<std::ptrdiff_t>(begin),
                                       ids.begin() + static_cast<std::ptrdiff_t>(end));
      uint8_t* base = im.staging.get() + static_cast<uint64_t>(half) * (im.staging_bytes / 2);
      // The previous copies out of this half must be done before the fetch overwrites it.
      if (half_used[half]) EEP_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(im.half_done[half].get()));
      // Destinations: expert i of the chunk at base + i·expert_bytes, gate | up | down.
      backup::FetchDestinations dests;
      std::vector<std::pair<const backup::ExpertParamInfo*, uint8_t*>> to_convert;
      std::vector<std::vector<uint8_t>> raw;  // non-BF16 tensors land here first
      for (size_t i = 0; i < chunk.size(); ++i) {
        const auto names = im.c.ExpertTensorNames(layer_id, chunk[i]);
        for (size_t k = 0; k < 3; ++k) {
          auto it = by_name.find(names[k]);
          if (it == by_name.end())
            return Status::NotFound(fmt::format("restore: no backup manager lists '{}'", names[k]));
          const backup::ExpertParamInfo& p = *it->second;
          uint8_t* dst = base + i * expert_bytes + k * mat_elems * 2;
          if (p.dtype == DType::kBF16 && p.num_bytes == mat_elems * 2) {
            dests[p.name] = {dst, p.num_bytes, transfer::MemoryKind::kPinnedHost};
          } else {
            if (static_cast<uint64_t>(p.num_bytes) != mat_elems * DTypeSize(p.dtype))
              return Status::InvalidArgument(fmt::format("restore: '{}' has {} bytes of {}, a slot needs {} values",
                                                         p.name, p.num_bytes, DTypeName(p.dtype), mat_elems));
            raw.emplace_back(p.num_bytes);
            dests[p.name] = {raw.back().data(), p.num_bytes, transfer::MemoryKind::kHost};
            to_convert.emplace_back(&p, dst);
          }
        }
      }
      const auto t_fetch = std::chrono::steady_clock::now();
      EEP_RETURN_IF_ERROR_CTX(client.FetchLogicalExperts(layer_id, chunk, "", dests),
                              fmt::format("restoring {} experts of layer {}", chunk.size(), layer_id));
      fetch_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_fetch).count();
      for (auto& [p, dst] : to_convert) {
        Status st;
        auto host = ToBf16Host(p->dtype, dests[p->name].data, static_cast<size_t>(mat_elems), &st);
        EEP_RETURN_IF_ERROR_CTX(st, p->name);
        std::memcpy(dst, host.data(), mat_elems * 2);
      }
      for (size_t i = 0; i < chunk.size(); ++i)
        for (int64_t slot : experts.at(chunk[i])) {
          bf16_t* dst = im.SlotPtr(ml, slot);
          EEP_CUDA_RETURN_IF_ERROR(
              cudaMemcpyAsync(dst, base + i * expert_bytes, expert_bytes, cudaMemcpyHostToDevice, side));
          copied_bytes += expert_bytes;
        }
      EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(im.half_done[half].get(), side));
      half_used[half] = true;
      half ^= 1;
    }
    for (const auto& [e, ss] : experts)
      for (int64_t slot : ss) im.Filled(ml, slot) = true;
  }
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(side));
  im.tables_dirty = true;
  if (stats != nullptr) {
    stats->bytes = copied_bytes;
    stats->fetch_s = fetch_s;
    stats->direct = all_direct;
    stats->total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Host registration and bandwidth ceilings

Result<std::unique_ptr<HostRegistration>> HostRegistration::Register(void* data, uint64_t num_bytes, bool read_only) {
  if (!Available()) return Status::Unavailable("no CUDA device is visible");
  const cudaError_t e = cudaHostRegister(data, num_bytes, read_only ? cudaHostRegisterReadOnly : cudaHostRegisterDefault);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: later launches must not report it
    return Status::Internal(fmt::format("cudaHostRegister of {} bytes at {}{} failed: {}", num_bytes, data,
                                        read_only ? " (read-only)" : "", cudaGetErrorString(e)));
  }
  return std::unique_ptr<HostRegistration>(new HostRegistration(data));
}

HostRegistration::~HostRegistration() {
  if (data_ != nullptr) cudaHostUnregister(data_);
}

namespace {

// Median seconds of `repeat` timed runs of `copy` on `stream`, after one warm-up.
template <typename F>
Result<double> TimeCopies(int repeat, cudaStream_t stream, F&& copy) {
  EEP_ASSIGN_OR_RETURN(EventPtr a, NewEvent(cudaEventDefault));
  EEP_ASSIGN_OR_RETURN(EventPtr b, NewEvent(cudaEventDefault));
  std::vector<double> times;
  for (int r = 0; r < repeat + 1; ++r) {
    EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(a.get(), stream));
    EEP_CUDA_RETURN_IF_ERROR(copy());
    EEP_CUDA_RETURN_IF_ERROR(cudaEventRecord(b.get(), stream));
    EEP_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(b.get()));
    float ms = 0;
    EEP_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, a.get(), b.get()));
    if (r > 0) times.push_back(ms * 1e-3);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

Result<double> MeasurePinnedH2DGBps(uint64_t num_bytes, int repeat) {
  if (!Available()) return Status::Unavailable("no CUDA device is visible");
  void* host = nullptr;
  EEP_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&host, num_bytes, cudaHostAllocDefault));
  PinnedPtr owner(static_cast<uint8_t*>(host));
  std::memset(host, 1, num_bytes);
  EEP_ASSIGN_OR_RETURN(auto dev, DeviceAlloc<uint8_t>(num_bytes));
  cudaStream_t st = nullptr;
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  StreamPtr stream(st);
  EEP_ASSIGN_OR_RETURN(double s, TimeCopies(std::max(1, repeat), st, [&] {
                         return cudaMemcpyAsync(dev.get(), host, num_bytes, cudaMemcpyHostToDevice, st);
                       }));
  return num_bytes / 1e9 / s;
}

Result<double> MeasureDeviceCopyGBps(uint64_t num_bytes, int repeat) {
  if (!Available()) return Status::Unavailable("no CUDA device is visible");
  EEP_ASSIGN_OR_RETURN(auto a, DeviceAlloc<uint8_t>(num_bytes));
  EEP_ASSIGN_OR_RETURN(auto b, DeviceAlloc<uint8_t>(num_bytes));
  EEP_CUDA_RETURN_IF_ERROR(cudaMemset(a.get(), 1, num_bytes));
  cudaStream_t st = nullptr;
  EEP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  StreamPtr stream(st);
  EEP_ASSIGN_OR_RETURN(double s, TimeCopies(std::max(1, repeat), st, [&] {
                         return cudaMemcpyAsync(b.get(), a.get(), num_bytes, cudaMemcpyDeviceToDevice, st);
                       }));
  return 2.0 * num_bytes / 1e9 / s;  // read + write
}

// ---------------------------------------------------------------------------------------
// Generate

Result<std::vector<int64_t>> Generate(CudaModel& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options) {
  return GenerateOneSequence<CudaSeqStep>(model, prompt_ids, options);
}

}  // namespace eep::cuda
