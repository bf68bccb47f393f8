#include "model/rope.h"

#include <algorithm>
#include <cmath>

namespace eep {

namespace {

float YarnMscale(double factor, double mscale) {
  if (factor <= 1) return 1.0f;
  return static_cast<float>(0.1 * mscale * std::log(factor) + 1.0);
}

}  // namespace

RopeParams ComputeRopeParams(const ModelConfig& c) {
  RopeParams r;
  const bool mla = c.arch == Arch::kDeepseekV3;
  const int64_t rope_dim = mla ? c.qk_rope_head_dim : c.head_dim;
  std::vector<float>& inv = r.inv_freq;
  inv.resize(static_cast<size_t>(rope_dim / 2));
  for (int64_t i = 0; i < rope_dim / 2; ++i)
    inv[static_cast<size_t>(i)] =
        1.0f / std::pow(static_cast<float>(c.rope.theta), static_cast<float>(2 * i) / static_cast<float>(rope_dim));
  if (c.rope.type == "linear") {
    for (auto& f : inv) f /= static_cast<float>(c.rope.factor);
  } else if (c.rope.type == "yarn") {
    const double D = static_cast<double>(rope_dim), theta = c.rope.theta;
    const double L0 = c.rope.original_max_position_embeddings > 0 ? c.rope.original_max_position_embeddings
                                                                  : static_cast<double>(c.max_position_embeddings);
    auto cd = [&](double rot) { return D * std::log(L0 / (2 * M_PI * rot)) / (2 * std::log(theta)); };
    double lo = std::max(0.0, std::floor(cd(c.rope.beta_fast)));
    double hi = std::min(D - 1, std::ceil(cd(c.rope.beta_slow)));
    if (lo == hi) hi += 0.001;
    for (int64_t i = 0; i < rope_dim / 2; ++i) {
      float extra = inv[static_cast<size_t>(i)];
      float inter = extra / static_cast<float>(c.rope.factor);
      float ramp = static_cast<float>(std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0));
      // MODELS.md: inv_freq = inv_inter·ramp + inv_extra·(1−ramp)
      inv[static_cast<size_t>(i)] = inter * ramp + extra * (1 - ramp);
    }
    if (c.rope.attention_factor) {
      r.attention_factor = static_cast<float>(*c.rope.attention_factor);
    } else if (c.rope.mscale != 0 && c.rope.mscale_all_dim != 0) {
      r.attention_factor = YarnMscale(c.rope.factor, c.rope.mscale) / YarnMscale(c.rope.factor, c.rope.mscale_all_dim);
    } else {
      r.attention_factor = YarnMscale(c.rope.factor, 1.0);
    }
  }
  if (mla) {
    r.attn_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.qk_nope_head_dim + c.qk_rope_head_dim)));
    if (c.rope.type != "default" && c.rope.mscale_all_dim != 0) {
      float m = YarnMscale(c.rope.factor, c.rope.mscale_all_dim);
      r.attn_scale *= m * m;
    }
  } else {
    r.attn_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));
  }
  return r;
}

}  // namespace eep
