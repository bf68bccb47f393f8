#include "model/make_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <thread>
#include <fmt/format.h>

#include "core/logging.h"
#include "core/util.h"
#include "model/default_tokenizer.h"
#include "model/safetensors.h"

namespace eep {

nlohmann::json MakeModelConfigJson(const MakeModelOptions& o) {
  nlohmann::json j;
  j["model_type"] = ArchName(o.arch);
  j["vocab_size"] = o.vocab_size;
  j["hidden_size"] = o.hidden_size;
  j["num_hidden_layers"] = o.num_layers;
  j["num_attention_heads"] = o.num_heads;
  j["num_experts_per_tok"] = o.num_experts_per_tok;
  j["max_position_embeddings"] = 4096;
  j["rms_norm_eps"] = 1e-6;
  j["tie_word_embeddings"] = false;
  j["bos_token_id"] = 0;
  j["eos_token_id"] = 0;
  j["dtype"] = "bfloat16";
  j["hidden_act"] = "silu";
  switch (o.arch) {
    case Arch::kQwen3Moe:
      j["architectures"] = {"Qwen3MoeForCausalLM"};
      j["num_key_value_heads"] = o.num_kv_heads;
      j["head_dim"] = o.head_dim;
      j["num_experts"] = o.num_experts;
      j["moe_intermediate_size"] = o.moe_intermediate_size;
      j["intermediate_size"] = o.intermediate_size;
      j["norm_topk_prob"] = true;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = nlohmann::json::array();
      j["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
      break;
    case Arch::kMixtral:
      j["architectures"] = {"MixtralForCausalLM"};
      j["num_key_value_heads"] = o.num_kv_heads;
      j["head_dim"] = o.head_dim;
      j["num_local_experts"] = o.num_experts;
      j["intermediate_size"] = o.moe_intermediate_size;
      j["rms_norm_eps"] = 1e-5;
      j["sliding_window"] = nullptr;
      j["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
      break;
    case Arch::kDeepseekV3:
      j["architectures"] = {"DeepseekV3ForCausalLM"};
      j["num_key_value_heads"] = o.num_heads;
      j["n_routed_experts"] = o.num_experts;
      j["moe_intermediate_size"] = o.moe_intermediate_size;
      j["intermediate_size"] = o.intermediate_size;
      j["first_k_dense_replace"] = o.first_k_dense_replace;
      j["n_group"] = o.n_group;
      j["topk_group"] = o.topk_group;
      j["n_shared_experts"] = o.n_shared_experts;
      j["routed_scaling_factor"] = 2.5;
      j["norm_topk_prob"] = true;
      j["q_lora_rank"] = o.q_lora_rank > 0 ? nlohmann::json(o.q_lora_rank) : nlohmann::json(nullptr);
      j["kv_lora_rank"] = o.kv_lora_rank;
      j["qk_nope_head_dim"] = o.qk_nope_head_dim;
      j["qk_rope_head_dim"] = o.qk_rope_head_dim;
      j["v_head_dim"] = o.v_head_dim;
      j["rope_interleave"] = true;
      j["rope_parameters"] = {{"rope_theta", 1e4}, {"rope_type", "default"}};
      break;
  }
  return j;
}

namespace {

// splitmix64: fast, seedable, good enough for random weights.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Uniform() { return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0); }
};

uint64_t HashName(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

// Norm weights near 1, routers with a wider spread (so routing is not degenerate), other
// matrices uniform with std ≈ 1/sqrt(fan_in) so activations stay O(1) through the layers.
void FillTensor(const TensorShape& t, uint64_t seed, uint16_t* out) {
  Rng rng{HashName(t.name, seed)};
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  const bool is_norm = t.name.find("norm") != std::string::npos;
  const bool is_bias = t.name.find("bias") != std::string::npos;
  const bool is_router = t.name.find(".gate.weight") != std::string::npos;
  const bool is_embed = t.name.find("embed_tokens") != std::string::npos;
  float scale;
  if (is_norm) scale = 0.1f;
  else if (is_bias) scale = 0.0f;
  else if (is_embed) scale = 1.0f;
  else {
    int64_t fan_in = t.shape.size() > 1 ? t.shape[1] : 1;
    scale = static_cast<float>(std::sqrt(3.0 / static_cast<double>(fan_in))) * (is_router ? 4.0f : 1.0f);
  }
  for (int64_t i = 0; i < n; ++i) {
    float v = rng.Uniform() * scale + (is_norm ? 1.0f : 0.0f);
    out[i] = F32ToBF16(v);
  }
}

}  // namespace

Status MakeModel(const MakeModelOptions& o, const std::string& out_dir) {
  if (o.vocab_size < 503)
    return Status::InvalidArgument(fmt::format("--vocab must be >= 503 (the bundled tokenizer's size), got {}", o.vocab_size));
  nlohmann::json cj = MakeModelConfigJson(o);
  EEP_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(cj, "make-model options"));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Status::IOError(fmt::format("{}: cannot create directory ({})", out_dir, ec.message()));

  const auto tensors = ExpectedTensors(config);
  // Greedy sharding in checkpoint order.
  std::vector<std::vector<size_t>> shards(1);
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    uint64_t n = 2;
    for (int64_t d : tensors[i].shape) n *= static_cast<uint64_t>(d);
    if (shard_bytes > 0 && shard_bytes + n > o.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += n;
    total_bytes += n;
  }
  EEP_LOG_INFO("make-model: {} {} tensors, {:.2f} GiB in {} shard(s) -> {}", ArchName(o.arch), tensors.size(),
               static_cast<double>(total_bytes) / (1ull << 30), shards.size(), out_dir);
  std::unique_ptr<Progress> progress;
  if (o.show_progress) progress = std::make_unique<Progress>("writing tensors", tensors.size());
  size_t done = 0;
  std::mutex progress_mu;
  // Each tensor's values depend only on its name and the seed, so filling on every core
  // writes the same bytes as one thread (the random fill, not the disk, bounds large models).
  const int fill_threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
  nlohmann::ordered_json weight_map;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shards.size() == 1 ? "model.safetensors"
                                                : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
    std::vector<TensorToWrite> specs;
    for (size_t i : shards[s]) {
      specs.push_back({tensors[i].name, DType::kBF16, tensors[i].shape, nullptr});
      weight_map[tensors[i].name] = file;
    }
    EEP_RETURN_IF_ERROR(WriteSafetensorsWith(
        out_dir + "/" + file, specs,
        [&](size_t k, uint8_t* buf) {
          FillTensor(tensors[shards[s][k]], o.seed, reinterpret_cast<uint16_t*>(buf));
          std::lock_guard<std::mutex> lock(progress_mu);
          if (progress) progress->Update(++done);
          return Status::Ok();
        },
        {{"format", "pt"}}, fill_threads));
  }
  if (progress) progress->Finish();
  if (shards.size() > 1) {
    nlohmann::ordered_json index{{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    EEP_RETURN_IF_ERROR(WriteFile(out_dir + "/model.safetensors.index.json", index.dump(2)));
  }
  EEP_RETURN_IF_ERROR(WriteFile(out_dir + "/config.json", cj.dump(2)));
  EEP_RETURN_IF_ERROR(WriteFile(out_dir + "/tokenizer.json", DefaultTokenizerJson()));
  return Status::Ok();
}

}  // namespace eep
