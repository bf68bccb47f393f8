#include "model/config.h"

#include <fmt/format.h>

#include "core/util.h"

namespace eep {

const char* ArchName(Arch arch) {
  switch (arch) {
    case Arch::kQwen3Moe: return "qwen3_moe";
    case Arch::kMixtral: return "mixtral";
    case Arch::kDeepseekV3: return "deepseek_v3";
  }
  return "?";
}

Result<Arch> ParseArch(const std::string& model_type) {
  if (model_type == "qwen3_moe") return Arch::kQwen3Moe;
  if (model_type == "mixtral") return Arch::kMixtral;
  if (model_type == "deepseek_v3") return Arch::kDeepseekV3;
  return Status::InvalidArgument("unknown model_type '" + model_type +
                                 "' (expected one of: qwen3_moe, mixtral, deepseek_v3)");
}

bool ModelConfig::IsMoeLayer(int64_t layer) const {
  switch (arch) {
    case Arch::kMixtral: return true;
    case Arch::kDeepseekV3: return num_experts > 0 && layer >= first_k_dense_replace;
    case Arch::kQwen3Moe:
      for (int64_t l : mlp_only_layers)
        if (l == layer) return false;
      return num_experts > 0 && decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
  }
  return false;
}

std::vector<int64_t> ModelConfig::MoeLayers() const {
  std::vector<int64_t> layers;
  for (int64_t l = 0; l < num_layers; ++l)
    if (IsMoeLayer(l)) layers.push_back(l);
  return layers;
}

int64_t ModelConfig::ExpertIntermediate() const {
  return arch == Arch::kMixtral ? intermediate_size : moe_intermediate_size;
}

std::string ModelConfig::MoePrefix(int64_t layer) const {
  return fmt::format("model.layers.{}.{}", layer,
                     arch == Arch::kMixtral ? "block_sparse_moe" : "mlp");
}

std::array<std::string, 3> ModelConfig::ExpertTensorNames(int64_t layer, int64_t expert) const {
  std::string p = fmt::format("{}.experts.{}.", MoePrefix(layer), expert);
  if (arch == Arch::kMixtral) return {p + "w1.weight", p + "w3.weight", p + "w2.weight"};
  return {p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"};
}

std::array<std::vector<int64_t>, 3> ModelConfig::ExpertTensorShapes() const {
  int64_t i = ExpertIntermediate();
  return {std::vector<int64_t>{i, hidden_size}, std::vector<int64_t>{i, hidden_size},
          std::vector<int64_t>{hidden_size, i}};
}

std::vector<TensorShape> ExpectedTensors(const ModelConfig& c) {
  const int64_t H = c.hidden_size, V = c.vocab_size;
  std::vector<TensorShape> t;
  auto add = [&t](std::string name, std::vector<int64_t> shape) { t.push_back({std::move(name), std::move(shape)}); };
  add("model.embed_tokens.weight", {V, H});
  add("model.norm.weight", {H});
  if (!c.tie_word_embeddings) add("lm_head.weight", {V, H});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l), a = p + "self_attn.";
    add(p + "input_layernorm.weight", {H});
    add(p + "post_attention_layernorm.weight", {H});
    if (c.arch != Arch::kDeepseekV3) {
      const int64_t d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
      add(a + "q_proj.weight", {nh * d, H});
      add(a + "k_proj.weight", {nkv * d, H});
      add(a + "v_proj.weight", {nkv * d, H});
      add(a + "o_proj.weight", {H, nh * d});
      if (c.attention_bias) {
        add(a + "q_proj.bias", {nh * d});
        add(a + "k_proj.bias", {nkv * d});
        add(a + "v_proj.bias", {nkv * d});
      }
      if (c.arch == Arch::kQwen3Moe) {
        add(a + "q_norm.weight", {d});
        add(a + "k_norm.weight", {d});
      }
    } else {
      const int64_t nh = c.num_heads, qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
      if (c.q_lora_rank > 0) {
        add(a + "q_a_proj.weight", {c.q_lora_rank, H});
        add(a + "q_a_layernorm.weight", {c.q_lora_rank});
        add(a + "q_b_proj.weight", {nh * qk, c.q_lora_rank});
      } else {
        add(a + "q_proj.weight", {nh * qk, H});
      }
      add(a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, H});
      add(a + "kv_a_layernorm.weight", {c.kv_lora_rank});
      add(a + "kv_b_proj.weight", {nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank});
      add(a + "o_proj.weight", {H, nh * c.v_head_dim});
    }
    if (!c.IsMoeLayer(l)) {
      const int64_t F = c.intermediate_size;
      add(p + "mlp.gate_proj.weight", {F, H});
      add(p + "mlp.up_proj.weight", {F, H});
      add(p + "mlp.down_proj.weight", {H, F});
      continue;
    }
    const std::string mp = c.MoePrefix(l) + ".";
    add(mp + "gate.weight", {c.num_experts, H});
    if (c.arch == Arch::kDeepseekV3) {
      add(mp + "gate.e_score_correction_bias", {c.num_experts});
      if (c.n_shared_experts > 0) {
        const int64_t S = c.moe_intermediate_size * c.n_shared_experts;
        add(mp + "shared_experts.gate_proj.weight", {S, H});
        add(mp + "shared_experts.up_proj.weight", {S, H});
        add(mp + "shared_experts.down_proj.weight", {H, S});
      }
    }
    const auto shapes = c.ExpertTensorShapes();
    for (int64_t e = 0; e < c.num_experts; ++e) {
      const auto names = c.ExpertTensorNames(l, e);
      for (int i = 0; i < 3; ++i) add(names[i], shapes[i]);
    }
  }
  return t;
}

namespace {

// Typed field access with errors naming the source file and the key.
class Fields {
 public:
  Fields(const nlohmann::json& j, const std::string& source) : j_(j), source_(source) {}

  bool Has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  Status Int(const char* key, int64_t* out, bool required, int64_t min_value = 0) const {
    if (!Has(key)) {
      if (required) return Status::InvalidArgument(fmt::format("{}: missing field '{}'", source_, key));
      return Status::Ok();
    }
    const auto& v = j_[key];
    if (!v.is_number_integer())
      return Status::InvalidArgument(fmt::format("{}: field '{}' must be an integer", source_, key));
    int64_t x = v.get<int64_t>();
    if (x < min_value)
      return Status::InvalidArgument(
          fmt::format("{}: field '{}' is {}, must be >= {}", source_, key, x, min_value));
    *out = x;
    return Status::Ok();
  }

  Status Double(const char* key, double* out) const {
    if (!Has(key)) return Status::Ok();
    if (!j_[key].is_number())
      return Status::InvalidArgument(fmt::format("{}: field '{}' must be a number", source_, key));
    *out = j_[key].get<double>();
    return Status::Ok();
  }

  Status Bool(const char* key, bool* out) const {
    if (!Has(key)) return Status::Ok();
    if (!j_[key].is_boolean())
      return Status::InvalidArgument(fmt::format("{}: field '{}' must be a boolean", source_, key));
    *out = j_[key].get<bool>();
    return Status::Ok();
  }

 private:
  const nlohmann::json& j_;
  const std::string& source_;
};

Status ParseRope(const nlohmann::json& j, const std::string& source, RopeConfig* rope) {
  // 5.x: rope_parameters {rope_theta, rope_type, ...}; 4.x: top-level rope_theta + rope_scaling.
  const nlohmann::json* params = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) params = &j["rope_parameters"];
  if (j.contains("rope_theta") && j["rope_theta"].is_number()) rope->theta = j["rope_theta"].get<double>();
  const nlohmann::json* scaling = nullptr;
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) scaling = &j["rope_scaling"];
  for (const nlohmann::json* obj : {scaling, params}) {
    if (!obj) continue;
    Fields f(*obj, source);
    EEP_RETURN_IF_ERROR(f.Double("rope_theta", &rope->theta));
    for (const char* key : {"type", "rope_type"}) {
      if (obj->contains(key) && (*obj)[key].is_string()) rope->type = (*obj)[key].get<std::string>();
    }
    EEP_RETURN_IF_ERROR(f.Double("factor", &rope->factor));
    EEP_RETURN_IF_ERROR(f.Double("original_max_position_embeddings", &rope->original_max_position_embeddings));
    EEP_RETURN_IF_ERROR(f.Double("beta_fast", &rope->beta_fast));
    EEP_RETURN_IF_ERROR(f.Double("beta_slow", &rope->beta_slow));
    EEP_RETURN_IF_ERROR(f.Double("mscale", &rope->mscale));
    EEP_RETURN_IF_ERROR(f.Double("mscale_all_dim", &rope->mscale_all_dim));
    if (f.Has("attention_factor")) {
      double af = 1;
      EEP_RETURN_IF_ERROR(f.Double("attention_factor", &af));
      rope->attention_factor = af;
    }
  }
  if (rope->type != "default" && rope->type != "yarn" && rope->type != "linear")
    return Status::Unimplemented(
        fmt::format("{}: rope type '{}' is not supported (default, linear, yarn)", source, rope->type));
  return Status::Ok();
}

}  // namespace

Result<ModelConfig> ParseModelConfig(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) return Status::InvalidArgument(source + ": config must be a JSON object");
  if (!j.contains("model_type") || !j["model_type"].is_string())
    return Status::InvalidArgument(source + ": missing string field 'model_type'");
  ModelConfig c;
  EEP_ASSIGN_OR_RETURN_CTX(c.arch, ParseArch(j["model_type"].get<std::string>()), source);
  Fields f(j, source);
  EEP_RETURN_IF_ERROR(f.Int("vocab_size", &c.vocab_size, true, 1));
  EEP_RETURN_IF_ERROR(f.Int("hidden_size", &c.hidden_size, true, 1));
  EEP_RETURN_IF_ERROR(f.Int("num_hidden_layers", &c.num_layers, true, 1));
  EEP_RETURN_IF_ERROR(f.Int("num_attention_heads", &c.num_heads, true, 1));
  c.num_kv_heads = c.num_heads;
  EEP_RETURN_IF_ERROR(f.Int("num_key_value_heads", &c.num_kv_heads, false, 1));
  EEP_RETURN_IF_ERROR(f.Int("intermediate_size", &c.intermediate_size, c.arch == Arch::kMixtral, 1));
  EEP_RETURN_IF_ERROR(f.Int("num_experts_per_tok", &c.num_experts_per_tok, true, 1));
  EEP_RETURN_IF_ERROR(f.Int("max_position_embeddings", &c.max_position_embeddings, false, 1));
  EEP_RETURN_IF_ERROR(f.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  EEP_RETURN_IF_ERROR(f.Bool("attention_bias", &c.attention_bias));
  c.rms_norm_eps = c.arch == Arch::kMixtral ? 1e-5 : 1e-6;
  EEP_RETURN_IF_ERROR(f.Double("rms_norm_eps", &c.rms_norm_eps));
  c.rope.theta = c.arch == Arch::kMixtral ? 1e6 : 1e4;
  EEP_RETURN_IF_ERROR(ParseRope(j, source, &c.rope));
  EEP_RETURN_IF_ERROR(f.Int("bos_token_id", &c.bos_token_id, false));
  if (f.Has("eos_token_id")) {
    const auto& e = j["eos_token_id"];
    if (e.is_number_integer()) c.eos_token_ids.push_back(e.get<int64_t>());
    else if (e.is_array())
      for (const auto& x : e)
        if (x.is_number_integer()) c.eos_token_ids.push_back(x.get<int64_t>());
  }
  if (c.num_heads % c.num_kv_heads != 0)
    return Status::InvalidArgument(fmt::format(
        "{}: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", source,
        c.num_heads, c.num_kv_heads));

  switch (c.arch) {
    case Arch::kQwen3Moe: {
      const char* experts_key = f.Has("num_experts") ? "num_experts" : "num_local_experts";
      EEP_RETURN_IF_ERROR(f.Int(experts_key, &c.num_experts, true, 1));
      EEP_RETURN_IF_ERROR(f.Int("moe_intermediate_size", &c.moe_intermediate_size, true, 1));
      EEP_RETURN_IF_ERROR(f.Int("decoder_sparse_step", &c.decoder_sparse_step, false, 1));
      if (f.Has("mlp_only_layers")) {
        if (!j["mlp_only_layers"].is_array())
          return Status::InvalidArgument(source + ": field 'mlp_only_layers' must be a list");
        for (const auto& x : j["mlp_only_layers"]) c.mlp_only_layers.push_back(x.get<int64_t>());
      }
      c.norm_topk_prob = false;
      EEP_RETURN_IF_ERROR(f.Bool("norm_topk_prob", &c.norm_topk_prob));
      bool use_sw = false;
      EEP_RETURN_IF_ERROR(f.Bool("use_sliding_window", &use_sw));
      if (use_sw && f.Has("sliding_window")) {
        int64_t sw = 0;
        EEP_RETURN_IF_ERROR(f.Int("sliding_window", &sw, true, 1));
        c.sliding_window = sw;
      }
      c.head_dim = c.hidden_size / c.num_heads;
      EEP_RETURN_IF_ERROR(f.Int("head_dim", &c.head_dim, false, 1));
      bool any_dense = false;
      for (int64_t l = 0; l < c.num_layers; ++l) any_dense |= !c.IsMoeLayer(l);
      if (any_dense && c.intermediate_size <= 0)
        return Status::InvalidArgument(source + ": missing field 'intermediate_size' (needed by dense layers)");
      break;
    }
    case Arch::kMixtral: {
      EEP_RETURN_IF_ERROR(f.Int("num_local_experts", &c.num_experts, true, 1));
      c.moe_intermediate_size = c.intermediate_size;
      c.norm_topk_prob = true;
      if (f.Has("sliding_window")) {
        int64_t sw = 0;
        EEP_RETURN_IF_ERROR(f.Int("sliding_window", &sw, true, 1));
        c.sliding_window = sw;
      }
      c.head_dim = c.hidden_size / c.num_heads;
      EEP_RETURN_IF_ERROR(f.Int("head_dim", &c.head_dim, false, 1));
      break;
    }
    case Arch::kDeepseekV3: {
      EEP_RETURN_IF_ERROR(f.Int("n_routed_experts", &c.num_experts, true, 1));
      EEP_RETURN_IF_ERROR(f.Int("moe_intermediate_size", &c.moe_intermediate_size, true, 1));
      EEP_RETURN_IF_ERROR(f.Int("first_k_dense_replace", &c.first_k_dense_replace, false, 0));
      EEP_RETURN_IF_ERROR(f.Int("n_shared_experts", &c.n_shared_experts, false, 0));
      EEP_RETURN_IF_ERROR(f.Int("n_group", &c.n_group, false, 1));
      EEP_RETURN_IF_ERROR(f.Int("topk_group", &c.topk_group, false, 1));
      EEP_RETURN_IF_ERROR(f.Double("routed_scaling_factor", &c.routed_scaling_factor));
      c.norm_topk_prob = true;
      EEP_RETURN_IF_ERROR(f.Bool("norm_topk_prob", &c.norm_topk_prob));
      EEP_RETURN_IF_ERROR(f.Int("q_lora_rank", &c.q_lora_rank, false, 1));
      EEP_RETURN_IF_ERROR(f.Int("kv_lora_rank", &c.kv_lora_rank, true, 1));
      EEP_RETURN_IF_ERROR(f.Int("qk_nope_head_dim", &c.qk_nope_head_dim, true, 0));
      EEP_RETURN_IF_ERROR(f.Int("qk_rope_head_dim", &c.qk_rope_head_dim, true, 2));
      EEP_RETURN_IF_ERROR(f.Int("v_head_dim", &c.v_head_dim, true, 1));
      EEP_RETURN_IF_ERROR(f.Bool("rope_interleave", &c.rope_interleave));
      c.head_dim = c.qk_rope_head_dim;
      if (c.num_experts % c.n_group != 0)
        return Status::InvalidArgument(fmt::format(
            "{}: n_routed_experts ({}) must be divisible by n_group ({})", source, c.num_experts, c.n_group));
      if (c.topk_group > c.n_group)
        return Status::InvalidArgument(fmt::format("{}: topk_group ({}) exceeds n_group ({})", source,
                                                   c.topk_group, c.n_group));
      if (c.num_kv_heads != c.num_heads)
        return Status::InvalidArgument(source + ": deepseek_v3 needs num_key_value_heads == num_attention_heads");
      if (c.qk_rope_head_dim % 2 != 0)
        return Status::InvalidArgument(source + ": qk_rope_head_dim must be even");
      if (c.first_k_dense_replace > 0 && c.intermediate_size <= 0)
        return Status::InvalidArgument(source + ": missing field 'intermediate_size' (needed by dense layers)");
      break;
    }
  }
  if (c.num_experts_per_tok > c.num_experts)
    return Status::InvalidArgument(fmt::format("{}: num_experts_per_tok ({}) exceeds the number of experts ({})",
                                               source, c.num_experts_per_tok, c.num_experts));
  if (c.arch != Arch::kDeepseekV3 && c.head_dim % 2 != 0)
    return Status::InvalidArgument(source + ": head_dim must be even for RoPE");
  return c;
}

Result<ModelConfig> LoadModelConfig(const std::string& dir) {
  std::string path = dir + "/config.json";
  EEP_ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(path));
  return ParseModelConfig(j, path);
}

}  // namespace eep
