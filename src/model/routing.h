// MoE routing (MODELS.md §4) as free functions, shared by the CPU model (Model::Route), the
// tests that check the CUDA router against it, and anything else that has to reproduce a
// routing decision on the host.
#pragma once

#include <cstdint>

#include "model/config.h"

namespace eep {

// Routes `num_tokens` tokens from their router logits [num_tokens, E], which are overwritten
// with the routing scores (softmax probabilities; DeepSeek: sigmoid scores). Writes top_k ids
// (in selection order) and weights per token. `score_bias` [E] is DeepSeek's
// e_score_correction_bias (used for selection only); null for Qwen3-MoE and Mixtral.
//
// When `margins` is not null it receives, per token, how far the decision is from a tie: the
// k-th selected expert's selection value minus the best expert left out (router-logit units
// for softmax routing; biased sigmoid scores for DeepSeek, where the gap between the last kept
// and the best dropped group also counts). A margin within rounding noise of 0 is a near-tie
// that two correct f32 implementations may decide differently.
void RouteLogits(const ModelConfig& c, const float* score_bias, float* logits, int64_t num_tokens, int32_t* ids,
                 float* weights, float* margins = nullptr);

// The same from hidden rows x [num_tokens, H] and the router weight [E, H] (f32).
void RouteTokens(const ModelConfig& c, const float* router, const float* score_bias, const float* x,
                 int64_t num_tokens, int32_t* ids, float* weights, float* margins = nullptr);

// Weights of the given top_k experts of one token from its routing scores [E] (as left in
// `logits` by RouteLogits): renormalised if norm_topk_prob (always for Mixtral), DeepSeek's
// routed_scaling_factor applied.
void RouteWeights(const ModelConfig& c, const float* scores, const int32_t* ids, float* weights);

}  // namespace eep
