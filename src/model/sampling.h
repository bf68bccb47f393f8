// Token sampling: greedy (temperature 0), temperature, top-k and top-p (nucleus), with a
// per-request seeded generator so a given seed always gives the same tokens.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/status.h"

namespace eep {

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // (0, 1]
  int64_t top_k = 0;         // 0: off
  uint64_t seed = 0;
};

Status ValidateSamplingParams(const SamplingParams& params);

// Argmax; ties go to the lowest id (as torch.argmax).
int64_t ArgMax(const float* logits, int64_t vocab_size);

// Picks the next token from `logits` [vocab_size]. Greedy when temperature is 0.
int64_t SampleToken(const float* logits, int64_t vocab_size, const SamplingParams& params,
                    std::mt19937_64* rng);

}  // namespace eep
