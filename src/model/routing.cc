#include "model/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/ops.h"

namespace eep {

namespace {

bool Selected(const int32_t* ids, int64_t k, int64_t e) { return std::find(ids, ids + k, e) != ids + k; }

// values[ids[k-1]] minus the best value of an index not in ids (and, with `allowed`, allowed).
float SelectionGap(const float* values, int64_t n, const int32_t* ids, int64_t k, const std::vector<bool>* allowed) {
  float best_out = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < n; ++e)
    if (!Selected(ids, k, e) && (allowed == nullptr || (*allowed)[static_cast<size_t>(e)]))
      best_out = std::max(best_out, values[e]);
  if (best_out == -std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::infinity();
  return values[ids[k - 1]] - best_out;
}

}  // namespace

void RouteWeights(const ModelConfig& c, const float* scores, const int32_t* ids, float* weights) {
  const int64_t k = c.num_experts_per_tok;
  double sum = 0;
  for (int64_t j = 0; j < k; ++j) sum += scores[ids[j]];
  if (c.arch != Arch::kDeepseekV3) {
    for (int64_t j = 0; j < k; ++j)
      weights[j] = c.norm_topk_prob ? static_cast<float>(scores[ids[j]] / sum) : scores[ids[j]];
    return;
  }
  for (int64_t j = 0; j < k; ++j) {
    double v = scores[ids[j]];
    if (c.norm_topk_prob) v /= (sum + 1e-20);
    weights[j] = static_cast<float>(v * c.routed_scaling_factor);
  }
}

void RouteLogits(const ModelConfig& c, const float* score_bias, float* logits, int64_t num_tokens, int32_t* ids,
                 float* weights, float* margins) {
  const int64_t E = c.num_experts, k = c.num_experts_per_tok;
  std::vector<float> sel(static_cast<size_t>(E)), raw;
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* zt = logits + t * E;
    int32_t* it = ids + t * k;
    if (c.arch != Arch::kDeepseekV3) {
      if (margins) raw.assign(zt, zt + E);
      cpu::Softmax(zt, E);
      cpu::TopK(zt, E, k, it);
      RouteWeights(c, zt, it, weights + t * k);
      if (margins) margins[t] = SelectionGap(raw.data(), E, it, k, nullptr);
      continue;
    }
    // DeepSeek-V3: sigmoid scores, bias for selection only, grouped top-k.
    for (int64_t e = 0; e < E; ++e) {
      zt[e] = 1.0f / (1.0f + std::exp(-zt[e]));
      sel[static_cast<size_t>(e)] = zt[e] + score_bias[e];
    }
    const int64_t G = c.n_group, per = E / G;
    std::vector<float> group_score(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
      int32_t top2[2];
      const int64_t take = std::min<int64_t>(2, per);
      cpu::TopK(sel.data() + g * per, per, take, top2);
      float s = 0;
      for (int64_t i = 0; i < take; ++i) s += sel[static_cast<size_t>(g * per + top2[i])];
      group_score[static_cast<size_t>(g)] = s;
    }
    std::vector<int32_t> groups(static_cast<size_t>(c.topk_group));
    cpu::TopK(group_score.data(), G, c.topk_group, groups.data());
    std::vector<float> masked(static_cast<size_t>(E), -INFINITY);
    std::vector<bool> kept(static_cast<size_t>(E), false);
    for (int32_t g : groups)
      for (int64_t i = 0; i < per; ++i) {
        masked[static_cast<size_t>(g * per + i)] = sel[static_cast<size_t>(g * per + i)];
        kept[static_cast<size_t>(g * per + i)] = true;
      }
    cpu::TopK(masked.data(), E, k, it);
    RouteWeights(c, zt, it, weights + t * k);
    if (margins)
      margins[t] = std::min(SelectionGap(sel.data(), E, it, k, &kept),
                            SelectionGap(group_score.data(), G, groups.data(), c.topk_group, nullptr));
  }
}

void RouteTokens(const ModelConfig& c, const float* router, const float* score_bias, const float* x,
                 int64_t num_tokens, int32_t* ids, float* weights, float* margins) {
  const int64_t E = c.num_experts;
  std::vector<float> z(static_cast<size_t>(num_tokens * E));
  cpu::Linear(x, num_tokens, c.hidden_size, router, E, nullptr, z.data());
  RouteLogits(c, score_bias, z.data(), num_tokens, ids, weights, margins);
}

}  // namespace eep
