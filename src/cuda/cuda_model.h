// The CUDA backend of the MoE transformer: the same forward contract as the CPU reference
// `Model` (src/model/model.h), with weights resident on the GPU in BF16 as stored, cuBLAS GEMMs
// accumulating in f32, activations and the KV cache in f32, and routed experts in device
// slots addressed through an ExpertMap. Math follows MODELS.md exactly like the CPU model.
//
// This header needs no CUDA headers: without EEP_ENABLE_CUDA the library is a stub whose
// Available() is false and whose Load() says the build has no CUDA.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/config.h"
#include "model/expert_map.h"
#include "model/generate.h"

namespace eep::cuda {

// True when eep was built with CUDA and a CUDA device is visible.
bool Available();
// "NVIDIA H100 80GB HBM3 (sm_90)" or why there is none.
std::string DeviceDescription();

struct CudaLoadOptions {
  int device = 0;
  // Split each activation row into hi + lo BF16 rows before GEMMs (see kernels/cuda/ops.h):
  // f32-level accuracy for one extra GEMM column per token. Off: plain BF16 activations.
  bool split_activations = true;
};

// Per-sequence attention cache in device memory (f32, [position][kv_head][dim] per layer).
class CudaKvCache {
 public:
  CudaKvCache();
  ~CudaKvCache();
  int64_t length() const;
  void Clear();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One sequence's share of a forward step (as eep::SeqStep, with a device cache).
struct CudaSeqStep {
  CudaKvCache* cache = nullptr;
  std::span<const int64_t> ids;
  bool all_logits = false;               // logits for every new token, else the last one only
  std::vector<float>* logits = nullptr;  // may be null
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
  // a host sync per layer.
  Status Forward(std::span<CudaSeqStep> batch, CudaForwardTrace* trace = nullptr);

  // Expert slots: device buffers [gate | up | down] in BF16 per (MoE layer, physical slot).
  const ExpertMap& expert_map() const;
  // Loads one expert from raw host bytes (BF16, or F32/F16 converted) into `slot`.
  Status SetSlot(int64_t moe_layer, int64_t slot, DType dtype, const void* gate, const void* up, const void* down);
  // Replaces the map; slots whose logical expert changed must be refilled by the caller.
  Status SetExpertMap(ExpertMap map);
  // Device bytes held by weights and expert slots.
  int64_t weight_bytes() const;

  struct Impl;

 private:
  CudaModel();
  std::unique_ptr<Impl> impl_;
};

// eep::Generate over a CudaModel: prefill, then decode token by token with the device cache.
Result<std::vector<int64_t>> Generate(CudaModel& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options);

}  // namespace eep::cuda
