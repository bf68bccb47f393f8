#include "model/generate.h"

#include <algorithm>

namespace eep {

Result<std::vector<int64_t>> GenerateWith(const ForwardLastLogits& forward, int64_t vocab_size,
                                          const std::vector<int64_t>& prompt_ids, const GenerateOptions& options) {
  if (prompt_ids.empty()) return Status::InvalidArgument("prompt is empty");
  EEP_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  std::mt19937_64 rng(options.sampling.seed);
  std::vector<int64_t> out;
  std::vector<int64_t> next = prompt_ids;
  while (static_cast<int64_t>(out.size()) < options.max_new_tokens) {
    EEP_ASSIGN_OR_RETURN(const float* logits, forward(next));
    int64_t tok = SampleToken(logits, vocab_size, options.sampling, &rng);
    out.push_back(tok);
    if (options.on_token && !options.on_token(tok)) break;
    if (std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), tok) != options.stop_token_ids.end())
      break;
    next.assign(1, tok);
  }
  return out;
}

Result<std::vector<int64_t>> Generate(Model& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options) {
  return GenerateOneSequence<SeqStep>(model, prompt_ids, options);
}

}  // namespace eep
