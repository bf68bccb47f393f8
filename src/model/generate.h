// Single-sequence generation on a model: prefill the prompt, then decode token by token
// with the KV cache. The server's scheduler batches many of these; this is the simple path
// used by `eep generate` and tests.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "core/status.h"
#include "model/model.h"
#include "model/sampling.h"

namespace eep {

class ComputeModel;  // model/compute.h

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
// The same on any compute backend (defined in model/compute.cc).
Result<std::vector<int64_t>> Generate(ComputeModel& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options);

// One step of a single sequence on any backend: runs `ids` (the prompt, then one token at a
// time) through the model with its cache and returns the last token's logits [vocab_size],
// valid until the next call.
using ForwardLastLogits = std::function<Result<const float*>(std::span<const int64_t> ids)>;
// The prefill/decode/sample loop of Generate, shared by the backends (cuda::Generate).
Result<std::vector<int64_t>> GenerateWith(const ForwardLastLogits& forward, int64_t vocab_size,
                                          const std::vector<int64_t>& prompt_ids, const GenerateOptions& options);

// GenerateWith over a backend's model M (Model, cuda::CudaModel, ComputeModel) and its step
// type Step (SeqStep, cuda::CudaSeqStep, ComputeStep): one cache, last-token logits to the
// host each step.
template <typename Step, typename M>
Result<std::vector<int64_t>> GenerateOneSequence(M& model, const std::vector<int64_t>& prompt_ids,
                                                 const GenerateOptions& options) {
  auto cache = model.NewCache();
  std::vector<float> logits;
  return GenerateWith(
      [&](std::span<const int64_t> ids) -> Result<const float*> {
        Step step{cache.get(), ids, false, &logits};
        EEP_RETURN_IF_ERROR(model.Forward(std::span<Step>(&step, 1)));
        return static_cast<const float*>(logits.data());
      },
      model.config().vocab_size, prompt_ids, options);
}

}  // namespace eep
