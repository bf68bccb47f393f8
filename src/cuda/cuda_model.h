// The CUDA backend of the MoE transformer: the same forward contract as the CPU reference
// `Model` (src/model/model.h), with weights resident on the GPU in BF16 as stored, cuBLAS GEMMs
// accumulating in f32, activations and the KV cache in f32, and routed experts in device
// slots addressed through an ExpertMap. Math follows MODELS.md exactly like the CPU model.
//
// This header needs no CUDA headers: without EEP_ENABLE_CUDA the library is a stub whose
// Available() is false and whose Load() says the build has no CUDA.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/config.h"
#include "model/expert_map.h"
#include "model/generate.h"
#include "model/model.h"

namespace eep::backup {
class ExpertBackupClient;
}  // namespace eep::backup

namespace eep::cuda {

// True when eep was built with CUDA and a CUDA device is visible.
bool Available();
// Visible CUDA devices (0 without CUDA).
int DeviceCount();
// "NVIDIA H100 80GB HBM3 (sm_90)" or why there is none.
std::string DeviceDescription();
// The compute backend for a --backend value: "auto" gives "cuda" when a CUDA device is visible
// (cudaGetDeviceCount > 0 in a CUDA build), else "cpu", and logs the choice once per process
// (cuda at info level, the cpu fallback at debug level, so that output without a GPU is as before);
// "cpu" and "cuda" are returned as given, "cuda" after checking that a device is visible.
// kUnavailable for "cuda" without CUDA or a GPU, kInvalidArgument for any other name.
// Thread-safe.
Result<std::string> ResolveBackend(const std::string& requested);

struct CudaLoadOptions {
  int device = 0;
  // Split each activation row into hi + lo BF16 rows before GEMMs (see kernels/cuda/ops.h):
  // f32-level accuracy for one extra GEMM column per token. Off: plain BF16 activations.
  bool split_activations = true;
  // Load every routed expert into the slots of the identity map. An EP rank turns this off
  // and holds only its share (ConfigureExpertSlots, then SetSlot).
  bool load_experts = true;
  // Decode regime. Steps of at most this many tokens run every dense projection (and the LM
  // head's rows) as a GEMV kernel on f32 activations instead of cuBLAS. -1: the
  // EEP_CUDA_GEMV_MAX environment variable, else 8.
  int64_t gemv_max_tokens = -1;
  // Steps of at most this many tokens run the MoE layers on the device with no host sync:
  // router, top-k and grouping by slot in one kernel, then one grouped gate/up (+SwiGLU) and
  // one grouped down kernel over every touched slot, and the combine. The grouped kernels are
  // GEMVs on CUDA cores below 32 tokens (EEP_CUDA_MOE_MMA_MIN) and tensor-core GEMMs
  // (kernels/cuda/moe_mma.h) from there. Larger steps permute on the host and run a cuBLAS GEMM
  // pair per touched slot. -1: the EEP_CUDA_MOE_FUSED_MAX environment variable, else 256.
  int64_t fused_moe_max_tokens = -1;
  // Decode steps (every sequence one new token) that take the fused path are captured in a
  // CUDA graph per (tokens, logits rows) shape and replayed. EEP_CUDA_GRAPHS=0 turns it off.
  // (Also read from the environment, for measurements: EEP_CUDA_PDL=0, plain launches instead
  // of programmatic dependent launch; EEP_CUDA_FUSE_ATTN_NORM=1 / EEP_CUDA_FUSE_NEXT_NORM=1,
  // RMSNorms fused into the q/k/v GEMV / the MoE combine, measured slower on an H100.)
  bool cuda_graphs = true;
};

// Per-sequence attention cache in device memory (f32, [position][kv_head][dim] per layer).
class CudaKvCache {
 public:
  CudaKvCache();
  ~CudaKvCache();
  int64_t length() const;
  void Clear();
  // Forgets positions from n on (rolls back a step that was aborted part-way).
  void Truncate(int64_t n);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One sequence's share of a forward step (as eep::SeqStep, with a device cache).
struct CudaSeqStep {
  CudaKvCache* cache = nullptr;
  std::span<const int64_t> ids;
  bool all_logits = false;               // logits for every new token, else the last one only
  std::vector<float>* logits = nullptr;  // may be null
  // May be null. Receives the argmax (lowest index on ties) of the last token's logits, computed
  // on the device: greedy decoding without copying [vocab] floats to the host.
  int64_t* greedy_token = nullptr;
};

// Per-layer hidden states and routing decisions of a forward, for tests and debugging.
struct CudaForwardTrace {
  // [num_layers+1][T*H] of the first sequence, in eep::ForwardTrace's (MODELS.md §5) convention.
  std::vector<std::vector<float>> hidden;
  // Per MoE layer, every token of the batch in batch order: the router logits [N*E] (f32, as
  // the router GEMM produced them) and the experts chosen [N*top_k] (selection order).
  std::vector<std::vector<float>> router_logits;
  std::vector<std::vector<int32_t>> route_ids;
};

class CudaModel {
 public:
  // Loads DIR onto the GPU: config, dense weights and every routed expert (identity map).
  static Result<std::unique_ptr<CudaModel>> Load(const std::string& dir, const CudaLoadOptions& options = {});
  ~CudaModel();

  const ModelConfig& config() const;
  std::unique_ptr<CudaKvCache> NewCache() const { return std::make_unique<CudaKvCache>(); }
  // Runs one step over a batch of sequences; one forward at a time per model. A trace costs
  // a host sync per layer (and a route observer one per MoE layer). Without them, a step of
  // at most fused_moe_max_tokens tokens syncs with the host only at its end (logits/argmax),
  // and a decode step is replayed from a CUDA graph.
  Status Forward(std::span<CudaSeqStep> batch, CudaForwardTrace* trace = nullptr);

  // Decode with the host off the critical path (greedy only): Submit queues a step and returns
  // without waiting for it, so the host queues step n+1 while step n runs and the GPU goes from
  // one to the next without idling on the host; Collect waits for the oldest queued step and
  // writes its greedy tokens. Step n+1 gives each sequence kDeviceToken as its one id: the
  // greedy token step n left on the device. At most two steps are queued (Submit collects the
  // older one first); Forward collects every queued step. Steps that want logits need Forward.
  // Caches and greedy_token pointers must stay valid until their step is collected.
  static constexpr int64_t kDeviceToken = -1;
  Status Submit(std::span<CudaSeqStep> batch);
  Status Collect();
  size_t queued_steps() const;

  // Expert slots: device buffers [gate | up | down] in BF16 per (MoE layer, physical slot).
  const ExpertMap& expert_map() const;
  // Loads one expert from raw host bytes (BF16, or F32/F16 converted) into `slot`.
  Status SetSlot(int64_t moe_layer, int64_t slot, DType dtype, const void* gate, const void* up, const void* down);
  // Replaces the map; slots whose logical expert changed must be refilled by the caller.
  Status SetExpertMap(ExpertMap map);
  // Holds device slots [slot_begin, slot_end) of `map` (a map of any slot count with the
  // model's MoE layers): local slot i keeps what it held (its device bytes are copied), slots
  // past the old count start empty and must be filled (SetSlot) before a forward uses them.
  // Waits for queued forward work. Not thread-safe with Forward.
  Status ConfigureExpertSlots(ExpertMap map, int64_t slot_begin, int64_t slot_end);
  // The MoE layers' routed experts run through `executor` (host rows in and out: expert
  // parallelism) instead of the local slots; shared experts stay on the GPU. Null: local.
  // Not owned; it may call RunExpertRows on this model from inside Forward.
  void SetMoeExecutor(MoeExecutor* executor);
  // Called inside Forward with each MoE layer's routed logical expert ids (num_tokens × top_k).
  // counts_only: the caller only counts them (load statistics), so they may come grouped by
  // expert, at the end of the step: steps that route on the device then count on the device
  // (one small launch per MoE layer), keep their CUDA graph and sync with the host only at
  // their end, instead of once per MoE layer.
  using RouteObserver = std::function<void(int64_t moe_layer, const int32_t* ids, int64_t count)>;
  void SetRouteObserver(RouteObserver observer, bool counts_only = false);
  // y[i,:] = expert in slot slots[i] applied to x[i,:] (host f32 rows of hidden_size, n rows,
  // no routing weight): one upload, per-slot grouped GEMMs, one download. Every slot must be
  // held and filled. Rows of one slot may be anywhere; their results do not depend on order.
  Status RunExpertRows(int64_t moe_layer, const int32_t* slots, const float* x, int64_t n, float* y);
  // The CUDA device the model lives on.
  int device() const;
  // Device bytes held by weights and expert slots.
  int64_t weight_bytes() const;
  // Bytes of one expert slot ([gate | up | down] BF16).
  int64_t slot_bytes() const;
  // Checkpoint layer id of MoE layer `moe_layer` (what the backup client calls layer_id).
  int64_t MoeLayerId(int64_t moe_layer) const;

  // Restores logical experts from the DRAM backup managers straight into device slots, by one
  // of two paths, both copying with cudaMemcpyAsync on a side stream:
  //   direct  (default, when the managers' regions are mapped into this process, i.e. shm):
  //           the mapping is registered with CUDA once (cudaHostRegister, kept for later
  //           calls) and each tensor is DMA'd from the mirror into its slot: no CPU copy;
  //   staged  (ucx, a failed registration, or set_restore_direct(false)): each chunk of a
  //           layer's experts is fetched (FetchLogicalExperts) into a pinned staging buffer,
  //           whose two halves alternate so that the copies of chunk k overlap the fetch of
  //           chunk k+1. Copies start after the
  // model's queued forward work (no slot is overwritten under a running forward) and are
  // complete when this returns. Several slots may take the same expert (fetched once).
  // Checkpoint dtypes other than BF16 are converted on the host. The map is not changed: the
  // caller sets it (SetExpertMap) so that each slot's logical expert matches what was restored.
  // Not thread-safe with Forward or other calls on this model.
  struct SlotRestore {
    int64_t moe_layer = 0;
    int64_t slot = 0;
    int64_t logical_expert = 0;
  };
  struct RestoreStats {
    uint64_t bytes = 0;   // bytes written to device slots
    double fetch_s = 0;   // time inside FetchLogicalExperts (staged path)
    bool direct = false;  // every layer took the direct path
    double total_s = 0;   // the whole call
  };
  Status RestoreExperts(backup::ExpertBackupClient& client, std::span<const SlotRestore> slots,
                        RestoreStats* stats = nullptr);
  // Registers with CUDA, now, every backup mirror mapped into this process (the direct path's
  // one-time cost, a page-locking pass of roughly 0.2 s per GiB), and makes the side stream and
  // the pinned staging buffer, so that a later RestoreExperts inside a failover pays neither. Returns the bytes of the mirrors registered; a mirror CUDA
  // refuses is left to the staged path. Not thread-safe with RestoreExperts.
  Result<uint64_t> PrepareRestore(backup::ExpertBackupClient& client);
  // Size of the reused pinned staging buffer (two halves); takes effect at the next restore.
  void set_restore_staging_bytes(uint64_t bytes);
  // false: always take the staged path.
  void set_restore_direct(bool direct);
  // Copies slot `slot` of MoE layer `moe_layer` back to the host (tests, checks).
  Status ReadSlot(int64_t moe_layer, int64_t slot, std::vector<uint16_t>* bf16) const;

  // Slots as device memory, for the EPLB weight exchange between ranks (GPU to GPU, or BF16
  // through the host where the communicator has no device path).
  // Device address of a held slot's slot_bytes() bytes; valid until ConfigureExpertSlots.
  Result<void*> SlotAddress(int64_t moe_layer, int64_t slot) const;
  // Fills a held slot from slot_bytes() bytes of device memory of this model's GPU (a staged
  // slot received from a peer). Ordered after queued forward work; `src` must stay valid until
  // that work and the copy are done (DeviceMemory waits for the device before it frees).
  Status SetSlotFromDevice(int64_t moe_layer, int64_t slot, const void* src);
  // Fills a slot's device bytes with zeros (tests: proves a restore wrote it).
  Status ClearSlot(int64_t moe_layer, int64_t slot);

  struct Impl;

 private:
  CudaModel();
  std::unique_ptr<Impl> impl_;
};

// Page-locks host memory for the CUDA driver (cudaHostRegister) for the object's lifetime, so
// that device copies from it run at full DMA speed. read_only: the mapping is PROT_READ (e.g. a
// client's view of a backup mirror; cudaHostRegisterReadOnly). kUnavailable without CUDA or a GPU.
// Copies between host and device memory of any GPU (the direction follows from the
// addresses), queued on one stream of its own (it does not wait for the models' streams:
// callable beside running steps) and waited for once. Pageable host memory goes through
// pinned bounce buffers in pipelined chunks, so it moves at DMA speed rather than through the
// driver's small staging. Thread-safe (one batch at a time).
struct CopyItem {
  void* dst = nullptr;
  const void* src = nullptr;
  uint64_t bytes = 0;
};
Status CopyBatch(std::span<const CopyItem> items);
// Makes CopyBatch's stream and bounce buffers on `device` now (tens of ms: page-locking), so
// that a first batch inside a latency-critical window does not pay for them.
Status PrepareCopyBatch(int device);

// Device memory on one GPU (cudaMalloc), freed with the object after the device's queued work
// (every stream) is done. Staging for expert slots received from peers.
class DeviceMemory {
 public:
  static Result<std::unique_ptr<DeviceMemory>> Allocate(int device, uint64_t num_bytes);
  ~DeviceMemory();
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* data() const { return data_; }
  uint64_t size() const { return size_; }
  // Synchronous host → device copy into [offset, offset + n).
  Status CopyFromHost(uint64_t offset, const void* src, uint64_t n);

 private:
  DeviceMemory(int device, void* data, uint64_t size) : device_(device), data_(data), size_(size) {}
  int device_ = 0;
  void* data_ = nullptr;
  uint64_t size_ = 0;
};

class HostRegistration {
 public:
  static Result<std::unique_ptr<HostRegistration>> Register(void* data, uint64_t num_bytes, bool read_only = false);
  ~HostRegistration();
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;

 private:
  HostRegistration(void* data) : data_(data) {}
  void* data_ = nullptr;
};

// Bandwidth ceilings measured on device 0, medians of `repeat` timed copies (events) after one
// warm-up: pinned host → device (cudaMemcpyAsync from cudaHostAlloc memory), and device →
// device counted as bytes read plus bytes written (the memory roofline of MODELS/METHOD).
// GB/s (1e9 bytes).
Result<double> MeasurePinnedH2DGBps(uint64_t num_bytes, int repeat);
Result<double> MeasureDeviceCopyGBps(uint64_t num_bytes, int repeat);

// eep::Generate over a CudaModel: prefill, then decode token by token with the device cache.
Result<std::vector<int64_t>> Generate(CudaModel& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options);

}  // namespace eep::cuda
