#include "model/generate.h"

#include <algorithm>

namespace eep {

Result<std::vector<int64_t>> Generate(Model& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options) {
  if (prompt_ids.empty()) return Status::InvalidArgument("prompt is empty");
  EEP_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  std::mt19937_64 rng(options.sampling.seed);
  auto cache = model.NewCache();
  std::vector<int64_t> out;
  std::vector<float> logits;
  std::vector<int64_t> next = prompt_ids;
  const int64_t V = model.config().vocab_size;
  while (static_cast<int64_t>(out.size()) < options.max_new_tokens) {
    SeqStep step{cache.get(), next, false, &logits};
    EEP_RETURN_IF_ERROR(model.Forward(std::span<SeqStep>(&step, 1)));
    int64_t tok = SampleToken(logits.data(), V, options.sampling, &rng);
    out.push_back(tok);
    if (options.on_token && !options.on_token(tok)) break;
    if (std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), tok) != options.stop_token_ids.end())
      break;
    next.assign(1, tok);
  }
  return out;
}

}  // namespace eep
