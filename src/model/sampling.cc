#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <numeric>

namespace eep {

Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature))
    return Status::InvalidArgument(fmt::format("temperature must be >= 0, got {}", p.temperature));
  if (!(p.top_p > 0 && p.top_p <= 1))
    return Status::InvalidArgument(fmt::format("top_p must be in (0, 1], got {}", p.top_p));
  if (p.top_k < 0) return Status::InvalidArgument(fmt::format("top_k must be >= 0, got {}", p.top_k));
  return Status::Ok();
}

int64_t ArgMax(const float* logits, int64_t vocab_size) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab_size; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int64_t SampleToken(const float* logits, int64_t vocab_size, const SamplingParams& params,
                    std::mt19937_64* rng) {
  if (params.temperature <= 0) return ArgMax(logits, vocab_size);
  std::vector<int64_t> order(static_cast<size_t>(vocab_size));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [logits](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  size_t keep = order.size();
  if (params.top_k > 0) keep = std::min<size_t>(keep, static_cast<size_t>(params.top_k));
  const double inv_t = 1.0 / params.temperature;
  const double max_l = logits[order[0]];
  std::vector<double> probs(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += probs[i] = std::exp((logits[order[i]] - max_l) * inv_t);
  // Nucleus: the smallest prefix whose mass reaches top_p.
  if (params.top_p < 1.0) {
    double acc = 0;
    size_t cut = keep;
    for (size_t i = 0; i < keep; ++i) {
      acc += probs[i] / sum;
      if (acc >= params.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    probs.resize(keep);
    sum = std::accumulate(probs.begin(), probs.end(), 0.0);
  }
  std::uniform_real_distribution<double> uni(0.0, sum);
  double r = uni(*rng), acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += probs[i];
    if (r < acc) return order[i];
  }
  return order[keep - 1];
}

}  // namespace eep
