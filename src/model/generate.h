// Single-sequence generation on a Model: prefill the prompt, then decode token by token
// with the KV cache. The server's scheduler batches many of these; this is the simple path
// used by `eep generate` and tests.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/status.h"
#include "model/model.h"
#include "model/sampling.h"

namespace eep {

struct GenerateOptions {
  int64_t max_new_tokens = 16;
  SamplingParams sampling;
  std::vector<int64_t> stop_token_ids;  // generation ends after emitting one of these
  // Called with each new token as it is produced; return false to stop early.
  std::function<bool(int64_t)> on_token;
};

// Returns the generated ids (prompt excluded).
Result<std::vector<int64_t>> Generate(Model& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options);

}  // namespace eep
