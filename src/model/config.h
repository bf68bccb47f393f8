// Hugging Face config.json for the three MoE architectures eep runs (see MODELS.md §1):
// qwen3_moe, mixtral, deepseek_v3. Both the transformers 4.x and 5.x spellings are accepted.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"

namespace eep {

enum class Arch { kQwen3Moe, kMixtral, kDeepseekV3 };

const char* ArchName(Arch arch);  // the model_type spelling
Result<Arch> ParseArch(const std::string& model_type);

struct RopeConfig {
  double theta = 10000.0;
  std::string type = "default";  // default | yarn | linear ...
  double factor = 1.0;
  double original_max_position_embeddings = 0;
  double beta_fast = 32, beta_slow = 1;
  double mscale = 0, mscale_all_dim = 0;
  std::optional<double> attention_factor;
};

struct ModelConfig {
  Arch arch = Arch::kQwen3Moe;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;                // Qwen3/Mixtral attention head dim
  int64_t intermediate_size = 0;       // dense MLP (Mixtral: expert size)
  int64_t moe_intermediate_size = 0;   // routed expert size
  int64_t num_experts = 0;             // routed, logical
  int64_t num_experts_per_tok = 0;
  bool norm_topk_prob = false;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  int64_t max_position_embeddings = 0;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  // Qwen3-MoE
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  std::optional<int64_t> sliding_window;  // Mixtral; Qwen3 when use_sliding_window
  // DeepSeek-V3
  int64_t first_k_dense_replace = 0;
  int64_t n_shared_experts = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  int64_t q_lora_rank = 0;  // 0: null (plain q_proj)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  bool rope_interleave = true;

  bool IsMoeLayer(int64_t layer) const;
  std::vector<int64_t> MoeLayers() const;
  // Routed expert hidden size (moe_intermediate_size, or intermediate_size for Mixtral).
  int64_t ExpertIntermediate() const;
  // "model.layers.L.mlp" or "model.layers.L.block_sparse_moe" (Mixtral).
  std::string MoePrefix(int64_t layer) const;
  // Checkpoint names of expert e of layer L, in the order gate, up, down.
  std::array<std::string, 3> ExpertTensorNames(int64_t layer, int64_t expert) const;
  // Shapes matching ExpertTensorNames: gate/up [I,H], down [H,I].
  std::array<std::vector<int64_t>, 3> ExpertTensorShapes() const;
};

struct TensorShape {
  std::string name;
  std::vector<int64_t> shape;
};
// Every tensor a checkpoint of this config must hold, in checkpoint naming (MODELS.md §2).
std::vector<TensorShape> ExpectedTensors(const ModelConfig& config);

// Parses a config object; `source` (a path) prefixes every error.
Result<ModelConfig> ParseModelConfig(const nlohmann::json& j, const std::string& source);
// Reads DIR/config.json.
Result<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace eep
