// `eep bench decode`: KV-cached greedy decode tokens/s of the CUDA backend against the CPU
// reference backend, both measured in this run on the same checkpoint and prompt. Prints one
// line per configuration and the ratio cuda / cpu; --json adds a machine-readable line.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "command.h"
#include "cuda/cuda_model.h"
#include "kernels/cpu/ops.h"
#include "model/model.h"

namespace {

struct DecodeBenchFlags {
  std::string model_dir;
  int64_t prompt_len = 32;
  int64_t tokens = 32;      // decode steps timed on the GPU
  int64_t cpu_tokens = 16;  // decode steps timed on the CPU (slower)
  std::vector<int64_t> batches = {1, 8, 32};
  bool skip_cpu = false, json = false;
  uint64_t seed = 1;
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t Argmax(const std::vector<float>& v, int64_t row, int64_t V) {
  auto b = v.begin() + row * V;
  return std::max_element(b, b + V) - b;
}

std::vector<int64_t> RandomPrompt(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (auto& t : p) t = static_cast<int64_t>(rng() % static_cast<uint64_t>(std::min<int64_t>(V, 500)));
  return p;
}

// Tokens/s of `steps` greedy decode steps after a prefill, on the CPU model (batch 1).
eep::Result<double> CpuDecode(eep::Model& m, const std::vector<int64_t>& prompt, int64_t steps) {
  auto cache = m.NewCache();
  std::vector<float> logits;
  std::vector<int64_t> next = prompt;
  const int64_t V = m.config().vocab_size;
  double t0 = 0;
  for (int64_t s = 0; s <= steps; ++s) {
    if (s == 1) t0 = Now();  // step 0 is the prefill
    eep::SeqStep step{cache.get(), next, false, &logits};
    EEP_RETURN_IF_ERROR(m.Forward(std::span<eep::SeqStep>(&step, 1)));
    next.assign(1, Argmax(logits, 0, V));
  }
  return static_cast<double>(steps) / (Now() - t0);
}

// Tokens/s (summed over the batch) of `steps` decode steps of `batch` sequences on the GPU.
eep::Result<double> CudaDecode(eep::cuda::CudaModel& m, const std::vector<int64_t>& prompt, int64_t steps,
                               int64_t batch) {
  const int64_t V = m.config().vocab_size;
  std::vector<std::unique_ptr<eep::cuda::CudaKvCache>> caches;
  std::vector<std::vector<float>> logits(static_cast<size_t>(batch));
  std::vector<std::vector<int64_t>> next(static_cast<size_t>(batch), prompt);
  for (int64_t b = 0; b < batch; ++b) caches.push_back(m.NewCache());
  double t0 = 0;
  const int64_t warmup = 2;
  for (int64_t s = 0; s < steps + warmup; ++s) {
    if (s == warmup) t0 = Now();
    std::vector<eep::cuda::CudaSeqStep> steps_in;
    for (int64_t b = 0; b < batch; ++b)
      steps_in.push_back({caches[static_cast<size_t>(b)].get(), next[static_cast<size_t>(b)], false,
                          &logits[static_cast<size_t>(b)]});
    EEP_RETURN_IF_ERROR(m.Forward(steps_in));
    for (int64_t b = 0; b < batch; ++b)
      next[static_cast<size_t>(b)].assign(1, Argmax(logits[static_cast<size_t>(b)], 0, V));
  }
  return static_cast<double>(steps * batch) / (Now() - t0);
}

int RunDecodeBench(const DecodeBenchFlags& f) {
  auto config = eep::LoadModelConfig(f.model_dir);
  if (!config.ok()) return eep::cli::Fail(config.status());
  const auto prompt = RandomPrompt(f.prompt_len, config->vocab_size, f.seed);
  nlohmann::ordered_json j{{"model", f.model_dir}, {"prompt_len", f.prompt_len}};
  double cpu_tps = 0;
  if (!f.skip_cpu) {
    auto m = eep::Model::Load(f.model_dir, {.load_experts = true, .show_progress = false});
    if (!m.ok()) return eep::cli::Fail(m.status());
    auto r = CpuDecode(**m, prompt, f.cpu_tokens);
    if (!r.ok()) return eep::cli::Fail(r.status());
    cpu_tps = *r;
    fmt::print("cpu  batch 1: {:9.1f} tokens/s ({} threads, {} decode steps)\n", cpu_tps, eep::cpu::NumThreads(),
               f.cpu_tokens);
    j["cpu_tokens_per_s"] = cpu_tps;
  }
  if (!eep::cuda::Available()) {
    fmt::print("cuda: unavailable ({}); no ratio\n", eep::cuda::DeviceDescription());
    if (f.json) fmt::print("{}\n", j.dump());
    return 0;
  }
  j["device"] = eep::cuda::DeviceDescription();
  fmt::print("cuda device: {}\n", eep::cuda::DeviceDescription());
  for (bool split : {true, false}) {
    auto m = eep::cuda::CudaModel::Load(f.model_dir, {.split_activations = split});
    if (!m.ok()) return eep::cli::Fail(m.status());
    const char* mode = split ? "split-bf16" : "bf16";
    for (int64_t b : f.batches) {
      auto r = CudaDecode(**m, prompt, f.tokens, b);
      if (!r.ok()) return eep::cli::Fail(r.status());
      const double ratio = cpu_tps > 0 ? *r / cpu_tps : 0;
      fmt::print("cuda batch {:3} ({:10}): {:9.1f} tokens/s  ratio vs cpu batch 1: {:.1f}x\n", b, mode, *r, ratio);
      j["cuda"].push_back({{"mode", mode}, {"batch", b}, {"tokens_per_s", *r}, {"ratio_vs_cpu", ratio}});
    }
  }
  if (f.json) fmt::print("{}\n", j.dump());
  return 0;
}

EEP_REGISTER_BENCH(decode, "decode", "decode tokens/s: CUDA backend vs the CPU backend, same run",
                   [](CLI::App* app) -> std::function<int()> {
                     auto f = std::make_shared<DecodeBenchFlags>();
                     app->add_option("--model", f->model_dir, "checkpoint directory")->required();
                     app->add_option("--prompt-len", f->prompt_len, "prompt tokens (prefill, untimed)");
                     app->add_option("--tokens", f->tokens, "decode steps timed on the GPU");
                     app->add_option("--cpu-tokens", f->cpu_tokens, "decode steps timed on the CPU");
                     app->add_option("--batch", f->batches, "GPU batch sizes (sequences decoded together)");
                     app->add_flag("--skip-cpu", f->skip_cpu, "no CPU reference (no ratio)");
                     app->add_flag("--json", f->json, "also print one JSON line");
                     app->add_option("--seed", f->seed, "prompt seed");
                     return [f] { return RunDecodeBench(*f); };
                   });

}  // namespace
