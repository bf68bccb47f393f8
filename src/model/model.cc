#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

#include "core/logging.h"
#include "kernels/cpu/ops.h"
#include "model/rope.h"
#include "model/routing.h"

namespace eep {

// ---------------------------------------------------------------------------------------
// Experts

void RunExpertMlp(const ExpertWeights& w, const float* x, int64_t num_tokens, float* y,
                  std::vector<float>* scratch) {
  const int64_t n = num_tokens, inter = w.inter, hidden = w.hidden;
  scratch->resize(static_cast<size_t>(2 * n * inter));
  float* g = scratch->data();
  float* u = g + n * inter;
  cpu::Linear(x, n, hidden, w.gate(), inter, nullptr, g);
  cpu::Linear(x, n, hidden, w.up(), inter, nullptr, u);
  cpu::SiluMul(g, u, n * inter, g);
  cpu::Linear(g, n, inter, w.down(), hidden, nullptr, y);
}

LocalExperts::LocalExperts(const ModelConfig& config, ExpertMap map, int64_t slot_begin,
                           int64_t slot_end)
    : config_(config), map_(std::move(map)), slot_begin_(slot_begin), slot_end_(slot_end) {
  slots_.resize(static_cast<size_t>(map_.num_moe_layers()));
  for (auto& layer : slots_) {
    layer.resize(static_cast<size_t>(slot_end_ - slot_begin_));
    for (auto& w : layer) {
      w.hidden = config_.hidden_size;
      w.inter = config_.ExpertIntermediate();
    }
  }
}

void LocalExperts::Relayout(ExpertMap map, int64_t slot_begin, int64_t slot_end) {
  map_ = std::move(map);
  for (auto& layer : slots_) {
    layer.resize(static_cast<size_t>(slot_end - slot_begin));
    for (auto& w : layer) {
      w.hidden = config_.hidden_size;
      w.inter = config_.ExpertIntermediate();
    }
  }
  slot_begin_ = slot_begin;
  slot_end_ = slot_end;
}

ExpertWeights& LocalExperts::Slot(int64_t moe_layer, int64_t slot) {
  return slots_[static_cast<size_t>(moe_layer)][static_cast<size_t>(slot - slot_begin_)];
}

Status LocalExperts::RunSlot(int64_t moe_layer, int64_t slot, const float* x, int64_t num_tokens, float* y) {
  if (!Holds(slot) || moe_layer < 0 || moe_layer >= map_.num_moe_layers())
    return Status::OutOfRange(fmt::format("slot {} of MoE layer {} is not held here", slot, moe_layer));
  const ExpertWeights& w = Slot(moe_layer, slot);
  if (w.data.empty())
    return Status::Internal(fmt::format("MoE layer {}: slot {} has no weights", moe_layer, slot));
  RunExpertMlp(w, x, num_tokens, y, &scratch_);
  return Status::Ok();
}

Status LocalExperts::SetSlot(int64_t moe_layer, int64_t slot, DType dtype, const void* gate,
                             const void* up, const void* down) {
  if (!Holds(slot) || moe_layer < 0 || moe_layer >= map_.num_moe_layers())
    return Status::OutOfRange(fmt::format("slot {} of MoE layer {} is not held here", slot, moe_layer));
  ExpertWeights& w = Slot(moe_layer, slot);
  const size_t mat = static_cast<size_t>(w.inter * w.hidden);
  w.data.resize(3 * mat);
  EEP_RETURN_IF_ERROR(ConvertToF32(dtype, gate, mat, w.data.data()));
  EEP_RETURN_IF_ERROR(ConvertToF32(dtype, up, mat, w.data.data() + mat));
  EEP_RETURN_IF_ERROR(ConvertToF32(dtype, down, mat, w.data.data() + 2 * mat));
  return Status::Ok();
}

Status LocalExperts::LoadFromCheckpoint(const Checkpoint& ckpt) {
  const auto moe_layers = config_.MoeLayers();
  const auto shapes = config_.ExpertTensorShapes();
  for (int64_t ml = 0; ml < map_.num_moe_layers(); ++ml) {
    for (int64_t slot = slot_begin_; slot < slot_end_; ++slot) {
      int32_t logical = map_.LogicalAt(ml, slot);
      if (logical < 0) continue;
      auto names = config_.ExpertTensorNames(moe_layers[static_cast<size_t>(ml)], logical);
      const TensorInfo* t[3];
      for (int i = 0; i < 3; ++i) {
        EEP_ASSIGN_OR_RETURN(t[i], ckpt.GetChecked(names[i], shapes[i]));
        if (t[i]->dtype != t[0]->dtype)
          return Status::InvalidArgument(fmt::format("{}: tensor '{}' has dtype {}, but '{}' has {}", t[i]->file,
                                                     names[i], DTypeName(t[i]->dtype), names[0],
                                                     DTypeName(t[0]->dtype)));
      }
      EEP_RETURN_IF_ERROR(SetSlot(ml, slot, t[0]->dtype, t[0]->data, t[1]->data, t[2]->data));
    }
  }
  return Status::Ok();
}

Status LocalExperts::Run(int64_t moe_layer, const float* x, int64_t num_tokens, int64_t top_k,
                         const int32_t* ids, const float* weights, float* out) {
  const int64_t hidden = config_.hidden_size;
  const int64_t num_held = slot_end_ - slot_begin_;
  std::vector<std::vector<int32_t>> buckets(static_cast<size_t>(num_held));  // (t*k+j) per slot
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      int32_t e = ids[t * top_k + j];
      const auto& reps = map_.Replicas(moe_layer, e);
      // A fixed spread over held replicas: the result is the same whichever is used.
      int64_t held = 0;
      for (int32_t s : reps) held += Holds(s);
      if (held == 0)
        return Status::NotFound(fmt::format("MoE layer {}: no local slot holds expert {}", moe_layer, e));
      int64_t pick = t % held;
      for (int32_t s : reps) {
        if (!Holds(s)) continue;
        if (pick-- == 0) {
          buckets[static_cast<size_t>(s - slot_begin_)].push_back(static_cast<int32_t>(t * top_k + j));
          break;
        }
      }
    }
  }
  results_.resize(static_cast<size_t>(num_tokens * top_k * hidden));
  for (int64_t b = 0; b < num_held; ++b) {
    const auto& rows = buckets[static_cast<size_t>(b)];
    if (rows.empty()) continue;
    const int64_t n = static_cast<int64_t>(rows.size());
    gathered_.resize(static_cast<size_t>(2 * n * hidden));
    float* in = gathered_.data();
    float* y = in + n * hidden;
    for (int64_t r = 0; r < n; ++r)
      std::copy_n(x + (rows[static_cast<size_t>(r)] / top_k) * hidden, hidden, in + r * hidden);
    EEP_RETURN_IF_ERROR(RunSlot(moe_layer, b + slot_begin_, in, n, y));
    for (int64_t r = 0; r < n; ++r)
      std::copy_n(y + r * hidden, hidden, results_.data() + rows[static_cast<size_t>(r)] * hidden);
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* o = out + t * hidden;
    std::fill(o, o + hidden, 0.0f);
    for (int64_t j = 0; j < top_k; ++j) {
      const float wj = weights[t * top_k + j];
      const float* r = results_.data() + (t * top_k + j) * hidden;
      for (int64_t i = 0; i < hidden; ++i) o[i] += wj * r[i];
    }
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Loading

namespace {

// Reads tensors into f32 vectors, keeping the first error (shape, dtype) and showing progress.
class WeightLoader {
 public:
  WeightLoader(const Checkpoint& ckpt, bool show_progress, size_t total) : ckpt_(ckpt) {
    if (show_progress) progress_ = std::make_unique<Progress>("loading weights", total);
  }

  void Need(const std::string& name, std::vector<int64_t> shape, std::vector<float>* out) {
    ++done_;
    if (progress_) progress_->Update(done_);
    if (!error_.ok()) return;
    auto r = ckpt_.ReadF32(name, shape);
    if (!r.ok()) {
      error_ = r.status();
      return;
    }
    *out = std::move(r).value();
  }
  void NeedIf(bool present, const std::string& name, std::vector<int64_t> shape, std::vector<float>* out) {
    if (present) Need(name, std::move(shape), out);
  }

  Status Finish() {
    if (progress_) progress_->Finish();
    return error_;
  }

 private:
  const Checkpoint& ckpt_;
  std::unique_ptr<Progress> progress_;
  size_t done_ = 0;
  Status error_;
};

}  // namespace

Result<std::unique_ptr<Model>> Model::Load(const std::string& dir, const ModelLoadOptions& options) {
  std::unique_ptr<Model> m(new Model());
  EEP_ASSIGN_OR_RETURN(m->config_, LoadModelConfig(dir));
  EEP_ASSIGN_OR_RETURN(m->ckpt_, Checkpoint::Open(dir));
  EEP_RETURN_IF_ERROR(m->LoadWeights(options));
  return m;
}

Status Model::LoadWeights(const ModelLoadOptions& options) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_layers;
  const bool mla = c.arch == Arch::kDeepseekV3;
  // One error lists every missing tensor; routed experts are loaded later by LocalExperts.
  std::vector<std::string> missing;
  for (const auto& t : ExpectedTensors(c))
    if (!ckpt_->Find(t.name)) missing.push_back(t.name);
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 8; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 8) list += fmt::format(", ... ({} more)", missing.size() - 8);
    return Status::NotFound(fmt::format("{}: checkpoint lacks {} tensor(s) expected by {}: {}", ckpt_->dir(),
                                        missing.size(), ArchName(c.arch), list));
  }
  WeightLoader w(*ckpt_, options.show_progress, ckpt_->tensors().size());
  w.Need("model.embed_tokens.weight", {V, H}, &embed_);
  w.Need("model.norm.weight", {H}, &final_norm_);
  if (!c.tie_word_embeddings) w.Need("lm_head.weight", {V, H}, &lm_head_);
  layers_.resize(static_cast<size_t>(L));
  moe_index_.assign(static_cast<size_t>(L), -1);
  for (int64_t l = 0; l < L; ++l) {
    Layer& ly = layers_[static_cast<size_t>(l)];
    const std::string p = fmt::format("model.layers.{}.", l);
    w.Need(p + "input_layernorm.weight", {H}, &ly.input_norm);
    w.Need(p + "post_attention_layernorm.weight", {H}, &ly.post_norm);
    const std::string a = p + "self_attn.";
    if (!mla) {
      const int64_t d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
      w.Need(a + "q_proj.weight", {nh * d, H}, &ly.q_proj);
      w.Need(a + "k_proj.weight", {nkv * d, H}, &ly.k_proj);
      w.Need(a + "v_proj.weight", {nkv * d, H}, &ly.v_proj);
      w.Need(a + "o_proj.weight", {H, nh * d}, &ly.o_proj);
      w.NeedIf(c.attention_bias, a + "q_proj.bias", {nh * d}, &ly.q_bias);
      w.NeedIf(c.attention_bias, a + "k_proj.bias", {nkv * d}, &ly.k_bias);
      w.NeedIf(c.attention_bias, a + "v_proj.bias", {nkv * d}, &ly.v_bias);
      w.NeedIf(c.attention_bias && ckpt_->Find(a + "o_proj.bias"), a + "o_proj.bias", {H}, &ly.o_bias);
      w.NeedIf(c.arch == Arch::kQwen3Moe, a + "q_norm.weight", {d}, &ly.q_norm);
      w.NeedIf(c.arch == Arch::kQwen3Moe, a + "k_norm.weight", {d}, &ly.k_norm);
    } else {
      const int64_t nh = c.num_heads, qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
      if (c.q_lora_rank > 0) {
        w.Need(a + "q_a_proj.weight", {c.q_lora_rank, H}, &ly.q_a_proj);
        w.Need(a + "q_a_layernorm.weight", {c.q_lora_rank}, &ly.q_a_norm);
        w.Need(a + "q_b_proj.weight", {nh * qk, c.q_lora_rank}, &ly.q_b_proj);
      } else {
        w.Need(a + "q_proj.weight", {nh * qk, H}, &ly.q_proj);
      }
      w.Need(a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, H}, &ly.kv_a_proj);
      w.Need(a + "kv_a_layernorm.weight", {c.kv_lora_rank}, &ly.kv_a_norm);
      w.Need(a + "kv_b_proj.weight", {nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, &ly.kv_b_proj);
      w.Need(a + "o_proj.weight", {H, nh * c.v_head_dim}, &ly.o_proj);
    }
    ly.is_moe = c.IsMoeLayer(l);
    if (!ly.is_moe) {
      const int64_t F = c.intermediate_size;
      ly.dense.inter = F;
      w.Need(p + "mlp.gate_proj.weight", {F, H}, &ly.dense.gate);
      w.Need(p + "mlp.up_proj.weight", {F, H}, &ly.dense.up);
      w.Need(p + "mlp.down_proj.weight", {H, F}, &ly.dense.down);
      continue;
    }
    moe_index_[static_cast<size_t>(l)] = static_cast<int64_t>(moe_layer_ids_.size());
    moe_layer_ids_.push_back(l);
    const std::string mp = c.MoePrefix(l) + ".";
    w.Need(mp + "gate.weight", {c.num_experts, H}, &ly.router);
    if (mla) {
      w.Need(mp + "gate.e_score_correction_bias", {c.num_experts}, &ly.score_bias);
      if (c.n_shared_experts > 0) {
        const int64_t S = c.moe_intermediate_size * c.n_shared_experts;
        ly.shared.inter = S;
        w.Need(mp + "shared_experts.gate_proj.weight", {S, H}, &ly.shared.gate);
        w.Need(mp + "shared_experts.up_proj.weight", {S, H}, &ly.shared.up);
        w.Need(mp + "shared_experts.down_proj.weight", {H, S}, &ly.shared.down);
      }
    }
  }
  EEP_RETURN_IF_ERROR(w.Finish());

  // RoPE (MODELS.md §3): inv_freq in f32 as transformers computes it (model/rope.h).
  RopeParams rope = ComputeRopeParams(c);
  inv_freq_ = std::move(rope.inv_freq);
  rope_attention_factor_ = rope.attention_factor;
  attn_scale_ = rope.attn_scale;

  if (options.load_experts && !moe_layer_ids_.empty()) {
    local_experts_ = std::make_unique<LocalExperts>(
        config_, ExpertMap::Identity(num_moe_layers(), c.num_experts), 0, c.num_experts);
    EEP_RETURN_IF_ERROR(local_experts_->LoadFromCheckpoint(*ckpt_));
    moe_ = local_experts_.get();
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------
// Forward

void Model::RopeTables(int64_t position, float* cos, float* sin) const {
  for (size_t i = 0; i < inv_freq_.size(); ++i) {
    double angle = static_cast<double>(position) * static_cast<double>(inv_freq_[i]);
    cos[i] = static_cast<float>(std::cos(angle)) * rope_attention_factor_;
    sin[i] = static_cast<float>(std::sin(angle)) * rope_attention_factor_;
  }
}

void Model::Route(int64_t moe_layer, const float* x, int64_t num_tokens, int32_t* ids, float* weights) const {
  const Layer& ly = layers_[static_cast<size_t>(moe_layer_ids_[static_cast<size_t>(moe_layer)])];
  RouteTokens(config_, ly.router.data(), ly.score_bias.empty() ? nullptr : ly.score_bias.data(), x, num_tokens, ids,
              weights);
}

void Model::Attention(const Layer& ly, int64_t layer_idx, std::span<SeqStep> batch, const float* x,
                      int64_t num_tokens, float* out) {
  const ModelConfig& c = config_;
  const bool mla = c.arch == Arch::kDeepseekV3;
  const int64_t H = c.hidden_size, nh = c.num_heads;
  const int64_t nkv = mla ? nh : c.num_kv_heads;
  const int64_t dk = mla ? c.qk_nope_head_dim + c.qk_rope_head_dim : c.head_dim;
  const int64_t dv = mla ? c.v_head_dim : c.head_dim;
  const int64_t rope_dim = mla ? c.qk_rope_head_dim : c.head_dim;
  const int64_t N = num_tokens;

  std::vector<float> q(static_cast<size_t>(N * nh * dk)), k(static_cast<size_t>(N * nkv * dk)),
      v(static_cast<size_t>(N * nkv * dv));
  if (!mla) {
    cpu::Linear(x, N, H, ly.q_proj.data(), nh * dk, ly.q_bias.empty() ? nullptr : ly.q_bias.data(), q.data());
    cpu::Linear(x, N, H, ly.k_proj.data(), nkv * dk, ly.k_bias.empty() ? nullptr : ly.k_bias.data(), k.data());
    cpu::Linear(x, N, H, ly.v_proj.data(), nkv * dv, ly.v_bias.empty() ? nullptr : ly.v_bias.data(), v.data());
    if (!ly.q_norm.empty()) {
      const float eps = static_cast<float>(c.rms_norm_eps);
      cpu::RmsNorm(q.data(), ly.q_norm.data(), N * nh, dk, eps, q.data());
      cpu::RmsNorm(k.data(), ly.k_norm.data(), N * nkv, dk, eps, k.data());
    }
  } else {
    const int64_t nope = c.qk_nope_head_dim, kvr = c.kv_lora_rank;
    if (c.q_lora_rank > 0) {
      std::vector<float> qa(static_cast<size_t>(N * c.q_lora_rank));
      cpu::Linear(x, N, H, ly.q_a_proj.data(), c.q_lora_rank, nullptr, qa.data());
      cpu::RmsNorm(qa.data(), ly.q_a_norm.data(), N, c.q_lora_rank, 1e-6f, qa.data());
      cpu::Linear(qa.data(), N, c.q_lora_rank, ly.q_b_proj.data(), nh * dk, nullptr, q.data());
    } else {
      cpu::Linear(x, N, H, ly.q_proj.data(), nh * dk, nullptr, q.data());
    }
    const int64_t ca = kvr + rope_dim;
    std::vector<float> cmp(static_cast<size_t>(N * ca)), latent(static_cast<size_t>(N * kvr)),
        kv(static_cast<size_t>(N * nh * (nope + dv)));
    cpu::Linear(x, N, H, ly.kv_a_proj.data(), ca, nullptr, cmp.data());
    for (int64_t t = 0; t < N; ++t)
      cpu::RmsNorm(cmp.data() + t * ca, ly.kv_a_norm.data(), 1, kvr, 1e-6f, latent.data() + t * kvr);
    cpu::Linear(latent.data(), N, kvr, ly.kv_b_proj.data(), nh * (nope + dv), nullptr, kv.data());
    // Assemble per-head k = [k_nope_h, k_rope] and v_h; k_rope is rotated below with q.
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t h = 0; h < nh; ++h) {
        const float* src = kv.data() + (t * nh + h) * (nope + dv);
        float* kd = k.data() + (t * nh + h) * dk;
        std::copy_n(src, nope, kd);
        std::copy_n(cmp.data() + t * ca + kvr, rope_dim, kd + nope);
        std::copy_n(src + nope, dv, v.data() + (t * nh + h) * dv);
      }
    }
  }

  // RoPE, cache append, attention — per sequence.
  const int64_t rope_off = mla ? c.qk_nope_head_dim : 0;
  auto rope = (mla && c.rope_interleave) ? cpu::RopeInterleaved : cpu::RopeRotateHalf;
  std::vector<float> cos(static_cast<size_t>(rope_dim / 2)), sin(static_cast<size_t>(rope_dim / 2));
  std::vector<float> attn(static_cast<size_t>(N * nh * dv));
  int64_t tok = 0;
  for (SeqStep& s : batch) {
    KvCache& cache = *s.cache;
    const int64_t T = static_cast<int64_t>(s.ids.size()), start = cache.length_;
    float* kc = cache.k_[static_cast<size_t>(layer_idx)].data();
    float* vc = cache.v_[static_cast<size_t>(layer_idx)].data();
    for (int64_t i = 0; i < T; ++i) {
      const int64_t t = tok + i, pos = start + i;
      RopeTables(pos, cos.data(), sin.data());
      for (int64_t h = 0; h < nh; ++h) rope(q.data() + (t * nh + h) * dk + rope_off, rope_dim, cos.data(), sin.data());
      for (int64_t h = 0; h < nkv; ++h) rope(k.data() + (t * nkv + h) * dk + rope_off, rope_dim, cos.data(), sin.data());
      std::copy_n(k.data() + t * nkv * dk, nkv * dk, kc + pos * nkv * dk);
      std::copy_n(v.data() + t * nkv * dv, nkv * dv, vc + pos * nkv * dv);
    }
    const int64_t group = nh / nkv;
    const int64_t work = T * nh;
    auto one = [&, T, start, tok](int64_t w) {
      const int64_t i = w / nh, h = w % nh, pos = start + i;
      int64_t first = 0;
      if (c.sliding_window) first = std::max<int64_t>(0, pos - *c.sliding_window + 1);
      const int64_t kvh = h / group;
      std::vector<float> scratch(static_cast<size_t>(pos + 1));
      cpu::AttendOneHead(q.data() + ((tok + i) * nh + h) * dk, kc + (first * nkv + kvh) * dk, nkv * dk,
                         vc + (first * nkv + kvh) * dv, nkv * dv, pos + 1 - first, dk, dv, attn_scale_,
                         scratch.data(), attn.data() + ((tok + i) * nh + h) * dv);
    };
    // Threads pay only when there is real work: long prompts or long contexts.
    if (work * (start + T) * dk > (1 << 18)) {
      cpu::ParallelFor(0, work, one);
    } else {
      for (int64_t w = 0; w < work; ++w) one(w);
    }
    tok += T;
  }
  cpu::Linear(attn.data(), N, nh * dv, ly.o_proj.data(), H, ly.o_bias.empty() ? nullptr : ly.o_bias.data(), out);
}

namespace {
void RunDenseMlp(const Model::Mlp& m, int64_t hidden, const float* x, int64_t n, float* y) {
  std::vector<float> g(static_cast<size_t>(n * m.inter)), u(static_cast<size_t>(n * m.inter));
  cpu::Linear(x, n, hidden, m.gate.data(), m.inter, nullptr, g.data());
  cpu::Linear(x, n, hidden, m.up.data(), m.inter, nullptr, u.data());
  cpu::SiluMul(g.data(), u.data(), n * m.inter, g.data());
  cpu::Linear(g.data(), n, m.inter, m.down.data(), hidden, nullptr, y);
}
}  // namespace

Status Model::Ffn(const Layer& ly, int64_t layer_idx, const float* x, int64_t N, float* out) {
  const int64_t H = config_.hidden_size;
  if (!ly.is_moe) {
    RunDenseMlp(ly.dense, H, x, N, out);
    return Status::Ok();
  }
  const int64_t ml = moe_index_[static_cast<size_t>(layer_idx)], k = config_.num_experts_per_tok;
  std::vector<int32_t> ids(static_cast<size_t>(N * k));
  std::vector<float> w(static_cast<size_t>(N * k));
  Route(ml, x, N, ids.data(), w.data());
  if (route_observer_) route_observer_(ml, ids.data(), N * k);
  if (moe_ == nullptr) return Status::Internal("no MoE executor set (model loaded without experts)");
  EEP_RETURN_IF_ERROR_CTX(moe_->Run(ml, x, N, k, ids.data(), w.data(), out), fmt::format("layer {}", layer_idx));
  if (ly.shared.inter > 0) {
    std::vector<float> s(static_cast<size_t>(N * H));
    RunDenseMlp(ly.shared, H, x, N, s.data());
    for (int64_t i = 0; i < N * H; ++i) out[i] += s[static_cast<size_t>(i)];
  }
  return Status::Ok();
}

Status Model::Forward(std::span<SeqStep> batch, ForwardTrace* trace) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const bool mla = c.arch == Arch::kDeepseekV3;
  const int64_t nkv = mla ? c.num_heads : c.num_kv_heads;
  const int64_t dk = mla ? c.qk_nope_head_dim + c.qk_rope_head_dim : c.head_dim;
  const int64_t dv = mla ? c.v_head_dim : c.head_dim;
  int64_t N = 0;
  for (const SeqStep& s : batch) {
    if (s.cache == nullptr) return Status::InvalidArgument("forward: sequence without a KV cache");
    for (int64_t id : s.ids)
      if (id < 0 || id >= V)
        return Status::InvalidArgument(fmt::format("token id {} is out of the vocabulary [0, {})", id, V));
    N += static_cast<int64_t>(s.ids.size());
  }
  if (N == 0) {
    // A rank with no tokens still takes part in every MoE layer's exchange.
    if (moe_ != nullptr)
      for (int64_t ml = 0; ml < num_moe_layers(); ++ml)
        EEP_RETURN_IF_ERROR(moe_->Run(ml, nullptr, 0, config_.num_experts_per_tok, nullptr, nullptr, nullptr));
    return Status::Ok();
  }
  // Grow caches (doubling) to hold the new tokens.
  for (SeqStep& s : batch) {
    KvCache& kc = *s.cache;
    const int64_t need = kc.length_ + static_cast<int64_t>(s.ids.size());
    if (c.max_position_embeddings > 0 && need > c.max_position_embeddings)
      return Status::OutOfRange(fmt::format("sequence of {} tokens exceeds max_position_embeddings {}", need,
                                            c.max_position_embeddings));
    if (need > kc.capacity_) {
      int64_t cap = std::max<int64_t>(need, std::max<int64_t>(64, kc.capacity_ * 2));
      kc.k_.resize(static_cast<size_t>(c.num_layers));
      kc.v_.resize(static_cast<size_t>(c.num_layers));
      for (int64_t l = 0; l < c.num_layers; ++l) {
        kc.k_[static_cast<size_t>(l)].resize(static_cast<size_t>(cap * nkv * dk));
        kc.v_[static_cast<size_t>(l)].resize(static_cast<size_t>(cap * nkv * dv));
      }
      kc.capacity_ = cap;
    }
  }

  std::vector<float> x(static_cast<size_t>(N * H)), h(static_cast<size_t>(N * H)), o(static_cast<size_t>(N * H));
  {
    int64_t t = 0;
    for (const SeqStep& s : batch)
      for (int64_t id : s.ids) std::copy_n(embed_.data() + id * H, H, x.data() + (t++) * H);
  }
  const int64_t T0 = static_cast<int64_t>(batch[0].ids.size());
  if (trace) {
    trace->hidden.clear();
    trace->hidden.emplace_back(x.begin(), x.begin() + T0 * H);
  }
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Layer& ly = layers_[static_cast<size_t>(l)];
    cpu::RmsNorm(x.data(), ly.input_norm.data(), N, H, eps, h.data());
    Attention(ly, l, batch, h.data(), N, o.data());
    for (int64_t i = 0; i < N * H; ++i) x[static_cast<size_t>(i)] += o[static_cast<size_t>(i)];
    cpu::RmsNorm(x.data(), ly.post_norm.data(), N, H, eps, h.data());
    EEP_RETURN_IF_ERROR(Ffn(ly, l, h.data(), N, o.data()));
    for (int64_t i = 0; i < N * H; ++i) x[static_cast<size_t>(i)] += o[static_cast<size_t>(i)];
    if (trace) trace->hidden.emplace_back(x.begin(), x.begin() + T0 * H);
  }
  for (SeqStep& s : batch) s.cache->length_ += static_cast<int64_t>(s.ids.size());
  cpu::RmsNorm(x.data(), final_norm_.data(), N, H, eps, h.data());
  if (trace) trace->hidden.back().assign(h.begin(), h.begin() + T0 * H);

  const float* head = c.tie_word_embeddings ? embed_.data() : lm_head_.data();
  int64_t t = 0;
  for (SeqStep& s : batch) {
    const int64_t T = static_cast<int64_t>(s.ids.size());
    if (s.logits != nullptr) {
      const int64_t first = s.all_logits ? t : t + T - 1;
      const int64_t rows = s.all_logits ? T : 1;
      s.logits->resize(static_cast<size_t>(rows * V));
      cpu::Linear(h.data() + first * H, rows, H, head, V, nullptr, s.logits->data());
    }
    t += T;
  }
  return Status::Ok();
}

}  // namespace eep
