// The compute backend interface (ggml's model): a loaded MoE transformer and its per-sequence
// KV caches behind one abstract class, so that callers (the CLI, the EP rank, generation)
// drive the CPU reference (`Model`, model/model.h) and the CUDA backend (`cuda::CudaModel`,
// cuda/cuda_model.h) through the same calls. Both backends follow the same forward contract;
// the CPU is the reference the others are tested against.
//
// Backends are opened by name with OpenComputeModel (cuda/compute_cuda.h, which sees every
// backend); OpenCpuComputeModel below opens the CPU one directly.
//
// What is not here, on purpose: traces, expert slots, restores and kernel tuning differ per
// backend and only backend-aware callers need them. Those callers reach the backend's own
// class through a typed accessor that returns null for any other backend
// (cuda::CudaModelOf in cuda/compute_cuda.h), rather than this interface growing methods
// that one backend would have to stub out.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/config.h"
#include "model/model.h"

namespace eep {

class ComputeModel;

// One sequence's attention cache on one backend (host or device memory). Made by
// ComputeModel::NewCache and usable only with the model that made it; one owner drives it.
class ComputeCache {
 public:
  virtual ~ComputeCache() = default;
  ComputeCache(const ComputeCache&) = delete;
  ComputeCache& operator=(const ComputeCache&) = delete;

  // Positions held.
  virtual int64_t length() const = 0;
  // Forgets positions from n on (rolls back a step that was aborted part-way).
  virtual void Truncate(int64_t n) = 0;
  void Clear() { Truncate(0); }

  // The model that made this cache.
  const ComputeModel* owner() const { return owner_; }

 protected:
  explicit ComputeCache(const ComputeModel* owner) : owner_(owner) {}

 private:
  const ComputeModel* owner_;
};

// One sequence's share of a forward step: its new tokens are appended to its cache.
struct ComputeStep {
  ComputeCache* cache = nullptr;
  std::span<const int64_t> ids;
  // Logits for every new token ([T,V]) when true, else only for the last one ([V]).
  bool all_logits = false;
  std::vector<float>* logits = nullptr;  // may be null: no logits
  // May be null. Receives the argmax of the last token's logits, the lowest index on ties
  // (greedy decoding; CUDA computes it on the device, without copying [V] floats back).
  int64_t* greedy_token = nullptr;
};

struct ComputeOptions {
  // Load every routed expert (identity map). The EP rank turns this off and supplies its
  // own MoeExecutor over the experts it holds.
  bool load_experts = true;
  // Show a progress line while loading (CPU: converting weights).
  bool show_progress = false;
  // The accelerator to compute on (CUDA device index); the CPU ignores it.
  int device = 0;
};

class ComputeModel {
 public:
  virtual ~ComputeModel() = default;

  // The backend's --backend name: "cpu" or "cuda".
  virtual const char* name() const = 0;
  virtual const ModelConfig& config() const = 0;
  // A new, empty cache for one sequence; owned by the caller, valid while this model lives.
  virtual std::unique_ptr<ComputeCache> NewCache() const = 0;

  // Runs one step over a batch of sequences. Token ids are checked against the vocabulary;
  // every cache must have been made by this model (kInvalidArgument otherwise). On error
  // the caches may hold part of the step: Truncate them to roll it back.
  // Thread-compatible: one forward at a time per model.
  Status Forward(std::span<ComputeStep> batch);

  // The executor of the MoE layers' routed experts (expert parallelism). Not owned; must
  // outlive forwards. Null: the experts loaded with the model (ComputeOptions::load_experts;
  // without them, a forward fails). The CUDA backend hands it host rows and may be called
  // back from it (cuda::CudaModel::RunExpertRows) inside Forward.
  virtual void SetMoeExecutor(MoeExecutor* executor) = 0;

  // Called inside Forward, on its thread, with each MoE layer's routed logical expert ids
  // (num_tokens × top_k, batch order), for load statistics. Empty: none.
  using RouteObserver = std::function<void(int64_t moe_layer, const int32_t* ids, int64_t count)>;
  virtual void SetRouteObserver(RouteObserver observer) = 0;
  // The same for an observer that only counts the ids: they may come in any order, and at the
  // end of the step (CUDA counts them on the device and keeps decode steps in CUDA graphs).
  virtual void SetRouteCounter(RouteObserver observer) { SetRouteObserver(std::move(observer)); }

 protected:
  // Forward after the checks above: every step has a cache of this model.
  virtual Status ForwardChecked(std::span<ComputeStep> batch) = 0;
};

// Loads DIR (config.json + safetensors) on the CPU reference backend (`Model`). Errors name
// the file or tensor.
Result<std::unique_ptr<ComputeModel>> OpenCpuComputeModel(const std::string& dir, const ComputeOptions& options = {});

}  // namespace eep
