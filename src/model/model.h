// The MoE transformer (Qwen3-MoE, Mixtral, DeepSeek-V3) on the CPU reference backend.
// Math follows ../shared/MODELS.md exactly; weights are converted to f32 at load time and
// all compute is f32.
//
// The MoE layer is computed by a MoeExecutor: the default one runs the experts held in this
// process (LocalExperts, addressed through an ExpertMap); the expert-parallel runtime plugs
// in one that dispatches tokens to other ranks. The model code never indexes experts itself.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/config.h"
#include "model/expert_map.h"
#include "model/safetensors.h"

namespace eep {

// One expert MLP in f32: rows `[gate (I×H) | up (I×H) | down (H×I)]`, contiguous.
struct ExpertWeights {
  int64_t hidden = 0, inter = 0;
  std::vector<float> data;
  const float* gate() const { return data.data(); }
  const float* up() const { return data.data() + inter * hidden; }
  const float* down() const { return data.data() + 2 * inter * hidden; }
};

// Runs y = down(silu(gate x) * up x) for `num_tokens` rows of x into y. `scratch` grows as needed.
void RunExpertMlp(const ExpertWeights& w, const float* x, int64_t num_tokens, float* y,
                  std::vector<float>* scratch);

// Computes, for every token t, out[t] = Σ_j weights[t,j] · Expert_{ids[t,j]}(x[t]), with the
// terms added in j order so the result does not depend on where experts live.
class MoeExecutor {
 public:
  virtual ~MoeExecutor() = default;
  virtual Status Run(int64_t moe_layer, const float* x, int64_t num_tokens, int64_t top_k,
                     const int32_t* ids, const float* weights, float* out) = 0;
};

// Physical expert slots held in this process, addressed through an ExpertMap. Slots outside
// [slot_begin, slot_end) are not held. Not thread-safe: one owner drives it.
class LocalExperts : public MoeExecutor {
 public:
  LocalExperts(const ModelConfig& config, ExpertMap map, int64_t slot_begin, int64_t slot_end);

  // Loads every held slot's expert from the checkpoint (converting to f32).
  Status LoadFromCheckpoint(const Checkpoint& ckpt);
  // Loads one expert from raw checkpoint-dtype bytes of gate, up and down into `slot`.
  Status SetSlot(int64_t moe_layer, int64_t slot, DType dtype, const void* gate, const void* up,
                 const void* down);
  // Replaces the map (after a rebalance); the caller has filled the slots that changed.
  void SetMap(ExpertMap map) { map_ = std::move(map); }
  // Re-numbers the held slots as [slot_begin, slot_end) under `map` (a membership change):
  // local slot i keeps what it held; slots past the old count start empty, slots past the
  // new count are dropped. The caller then fills the slots that changed.
  void Relayout(ExpertMap map, int64_t slot_begin, int64_t slot_end);
  int64_t slot_begin() const { return slot_begin_; }
  int64_t slot_end() const { return slot_end_; }
  const ExpertMap& map() const { return map_; }
  bool Holds(int64_t slot) const { return slot >= slot_begin_ && slot < slot_end_; }
  ExpertWeights& Slot(int64_t moe_layer, int64_t slot);
  // y[n,H] = expert in `slot` applied to x[n,H]. The slot must be held and filled.
  Status RunSlot(int64_t moe_layer, int64_t slot, const float* x, int64_t num_tokens, float* y);

  Status Run(int64_t moe_layer, const float* x, int64_t num_tokens, int64_t top_k,
             const int32_t* ids, const float* weights, float* out) override;

 private:
  const ModelConfig& config_;
  ExpertMap map_;
  int64_t slot_begin_, slot_end_;
  std::vector<std::vector<ExpertWeights>> slots_;  // [moe_layer][slot - slot_begin]
  std::vector<float> scratch_, gathered_, results_;
};

// Per-sequence attention cache. K/V rows per layer: [position][kv_head][dim].
class KvCache {
 public:
  int64_t length() const { return length_; }
  void Clear() { length_ = 0; }
  // Forgets positions from n on (rolls back a step that was aborted part-way).
  void Truncate(int64_t n) { length_ = std::min(length_, std::max<int64_t>(0, n)); }

 private:
  friend class Model;
  int64_t length_ = 0;
  int64_t capacity_ = 0;
  std::vector<std::vector<float>> k_, v_;  // [layer]
};

struct ModelLoadOptions {
  // Load routed experts into a LocalExperts executor (all slots). The EP runtime turns this
  // off and supplies its own executor.
  bool load_experts = true;
  // Show a progress line while converting weights.
  bool show_progress = false;
};

// One sequence's share of a forward step: its new tokens are appended to its cache.
struct SeqStep {
  KvCache* cache = nullptr;
  std::span<const int64_t> ids;
  // Logits for every new token ([T,V]) when true, else only for the last one ([V]).
  bool all_logits = false;
  std::vector<float>* logits = nullptr;  // may be null: no logits
};

// Per-layer hidden states of a forward (MODELS.md §5 convention), for tests and debugging.
struct ForwardTrace {
  std::vector<std::vector<float>> hidden;  // [num_layers+1][T*H] of the first sequence
};

class Model {
 public:
  // Loads DIR (config.json + safetensors). Errors name the file/tensor; a checkpoint that
  // lacks tensors lists what was expected.
  static Result<std::unique_ptr<Model>> Load(const std::string& dir, const ModelLoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const Checkpoint& checkpoint() const { return *ckpt_; }
  std::unique_ptr<KvCache> NewCache() const { return std::make_unique<KvCache>(); }

  // The executor of the MoE layers; defaults to the LocalExperts loaded with the model.
  // Not owned; must outlive forwards.
  void SetMoeExecutor(MoeExecutor* executor) { moe_ = executor; }
  LocalExperts* local_experts() { return local_experts_.get(); }

  // Called with the routed logical expert ids of every MoE layer (num_tokens × top_k), for
  // load statistics. Runs on the forward's thread.
  using RouteObserver = std::function<void(int64_t moe_layer, const int32_t* ids, int64_t count)>;
  void SetRouteObserver(RouteObserver observer) { route_observer_ = std::move(observer); }

  // Runs one step over a batch of sequences. Token ids are checked against the vocabulary.
  // Thread-compatible: one forward at a time per Model.
  Status Forward(std::span<SeqStep> batch, ForwardTrace* trace = nullptr);

  int64_t num_moe_layers() const { return static_cast<int64_t>(moe_layer_ids_.size()); }
  int64_t MoeIndexOfLayer(int64_t layer) const { return moe_index_[static_cast<size_t>(layer)]; }

  // Routing of one MoE layer (exposed for tests): writes top_k ids and weights per token.
  void Route(int64_t moe_layer, const float* x, int64_t num_tokens, int32_t* ids, float* weights) const;

  struct Mlp {
    int64_t inter = 0;
    std::vector<float> gate, up, down;
  };
  struct Layer {
    std::vector<float> input_norm, post_norm;
    // Qwen3 / Mixtral attention.
    std::vector<float> q_proj, k_proj, v_proj, o_proj, q_bias, k_bias, v_bias, o_bias, q_norm, k_norm;
    // DeepSeek MLA.
    std::vector<float> q_a_proj, q_a_norm, q_b_proj, kv_a_proj, kv_a_norm, kv_b_proj;
    bool is_moe = false;
    Mlp dense;                      // dense FFN
    std::vector<float> router;      // [E,H]
    std::vector<float> score_bias;  // [E] DeepSeek e_score_correction_bias
    Mlp shared;                     // DeepSeek shared experts (inter 0: none)
  };

 private:
  Model() = default;
  Status LoadWeights(const ModelLoadOptions& options);
  void Attention(const Layer& layer, int64_t layer_idx, std::span<SeqStep> batch, const float* x,
                 int64_t num_tokens, float* out);
  Status Ffn(const Layer& layer, int64_t layer_idx, const float* x, int64_t num_tokens, float* out);
  void RopeTables(int64_t position, float* cos, float* sin) const;

  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::vector<float> embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  std::vector<int64_t> moe_layer_ids_;  // model layer of each MoE index
  std::vector<int64_t> moe_index_;      // MoE index of each layer, -1 for dense
  std::vector<float> inv_freq_;
  float rope_attention_factor_ = 1.0f;
  float attn_scale_ = 1.0f;
  std::unique_ptr<LocalExperts> local_experts_;
  MoeExecutor* moe_ = nullptr;
  RouteObserver route_observer_;
};

}  // namespace eep
