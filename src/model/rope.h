// RoPE tables shared by the CPU reference (Model) and the CUDA backend (CudaModel): inv_freq
// in f32 as transformers computes it (MODELS.md §3), the YaRN attention factor that scales
// cos/sin, and the softmax scale of attention (MLA's mscale² included).
#pragma once

#include <vector>

#include "model/config.h"

namespace eep {

struct RopeParams {
  std::vector<float> inv_freq;         // [rope_dim / 2]
  float attention_factor = 1.0f;       // multiplies cos and sin
  float attn_scale = 1.0f;             // 1/sqrt(qk dim), × mscale² for MLA with YaRN
};

// Pure function of the config (default, linear and yarn rope types).
RopeParams ComputeRopeParams(const ModelConfig& c);

}  // namespace eep
