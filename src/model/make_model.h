// Random-weight checkpoints of any size in Hugging Face layout (config.json, safetensors
// shards + index, tokenizer.json), for tests and benchmarks. Deterministic in the seed.
#pragma once

#include <cstdint>
#include <string>

#include "core/status.h"
#include <nlohmann/json.hpp>

#include "model/config.h"

namespace eep {

struct MakeModelOptions {
  Arch arch = Arch::kQwen3Moe;
  int64_t num_layers = 2;
  int64_t hidden_size = 128;
  int64_t num_experts = 16;
  int64_t num_experts_per_tok = 4;
  int64_t moe_intermediate_size = 64;  // Mixtral: the expert size (its intermediate_size)
  int64_t intermediate_size = 256;     // dense layers
  int64_t num_heads = 4;
  int64_t num_kv_heads = 2;
  int64_t head_dim = 32;
  int64_t vocab_size = 512;  // >= 503, the bundled tokenizer's size
  // DeepSeek-V3 only.
  int64_t first_k_dense_replace = 1;
  int64_t n_group = 4, topk_group = 2, n_shared_experts = 1;
  int64_t q_lora_rank = 64, kv_lora_rank = 32, qk_nope_head_dim = 16, qk_rope_head_dim = 16, v_head_dim = 16;
  uint64_t seed = 0;
  // Shards of at most this many bytes, with model.safetensors.index.json when more than one.
  uint64_t max_shard_bytes = 4ull << 30;
  bool show_progress = false;
};

// The config.json object for these options.
nlohmann::json MakeModelConfigJson(const MakeModelOptions& options);

// Writes the checkpoint into `out_dir` (created if needed).
Status MakeModel(const MakeModelOptions& options, const std::string& out_dir);

}  // namespace eep
