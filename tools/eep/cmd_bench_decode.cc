// `eep bench decode`: KV-cached greedy decode tokens/s of the CUDA backend against the CPU
// reference backend and against the memory roofline, all measured in this run on the same
// checkpoint and prompt. Roofline of a step at batch B: bytes of weights it touches (every
// dense weight, the LM head, and the distinct experts the step's routing chose, counted from a
// traced step) over the device-copy bandwidth (cudaMemcpy D2D, read + write) measured here;
// KV-cache and activation bytes are left out. Greedy tokens come from the device argmax
// (CudaSeqStep::greedy_token), so no logits cross PCIe. --json adds a machine-readable line.
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
  std::vector<int64_t> batches = {1, 16, 64, 256};
  std::string mode = "both";  // split | bf16 | both
  bool skip_cpu = false, json = false, no_graphs = false, sync_steps = false;
  int64_t gemv_max_tokens = -1, fused_moe_max_tokens = -1;  // -1: CudaLoadOptions' defaults
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

struct CudaDecodeResult {
  double tokens_per_s = 0;
  double step_ms = 0;
  int64_t experts_touched = 0;  // distinct (MoE layer, slot) pairs of one traced step
  std::vector<int64_t> tokens;  // the timed steps' greedy tokens, [step][batch]
};

// Tokens/s (summed over the batch) of `steps` decode steps of `batch` sequences on the GPU,
// then one traced step (untimed) that counts the experts a step touches. Queued: each step is
// queued (Submit) while the one before runs, its tokens left on the device; else the host waits
// for every step's tokens before it queues the next (Forward).
// Sequence b starts from its own random prompt (seed + b), so that the batch routes like
// independent requests rather than B copies of one.
eep::Result<CudaDecodeResult> CudaDecode(eep::cuda::CudaModel& m, int64_t prompt_len, uint64_t seed, int64_t steps,
                                         int64_t batch, bool queued) {
  std::vector<std::unique_ptr<eep::cuda::CudaKvCache>> caches;
  std::vector<int64_t> greedy(static_cast<size_t>(batch));
  std::vector<std::vector<int64_t>> next;
  for (int64_t b = 0; b < batch; ++b) {
    caches.push_back(m.NewCache());
    next.push_back(RandomPrompt(prompt_len, m.config().vocab_size, seed + static_cast<uint64_t>(b)));
  }
  double t0 = 0;
  const int64_t warmup = 2;  // the prefill and one decode step
  // A forward takes at most this many new tokens (the prefill of a large batch goes in chunks of
  // sequences, as a server's token budget would: its scratch grows with the tokens of a step, and
  // a 48-layer 30B-shaped model leaves ~20 GiB of an H100 for it).
  constexpr int64_t kMaxStepTokens = 2048;
  auto step = [&](eep::cuda::CudaForwardTrace* trace) -> eep::Status {
    std::vector<eep::cuda::CudaSeqStep> steps_in;
    int64_t tokens = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t n = static_cast<int64_t>(next[static_cast<size_t>(b)].size());
      if (!steps_in.empty() && tokens + n > kMaxStepTokens) {
        EEP_RETURN_IF_ERROR(m.Forward(steps_in, trace));
        steps_in.clear();
        tokens = 0;
      }
      steps_in.push_back({caches[static_cast<size_t>(b)].get(), next[static_cast<size_t>(b)], false, nullptr,
                          &greedy[static_cast<size_t>(b)]});
      tokens += n;
    }
    EEP_RETURN_IF_ERROR(m.Forward(steps_in, trace));
    for (int64_t b = 0; b < batch; ++b) next[static_cast<size_t>(b)].assign(1, greedy[static_cast<size_t>(b)]);
    return eep::Status::Ok();
  };
  CudaDecodeResult r;
  r.tokens.resize(static_cast<size_t>(steps * batch));
  for (int64_t s = 0; s < warmup; ++s) EEP_RETURN_IF_ERROR(step(nullptr));
  t0 = Now();
  if (queued) {
    static constexpr int64_t kDev[1] = {eep::cuda::CudaModel::kDeviceToken};
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<eep::cuda::CudaSeqStep> steps_in;
      for (int64_t b = 0; b < batch; ++b)
        steps_in.push_back({caches[static_cast<size_t>(b)].get(), kDev, false, nullptr,
                            &r.tokens[static_cast<size_t>(s * batch + b)]});
      EEP_RETURN_IF_ERROR(m.Submit(steps_in));
      if (m.queued_steps() > 1) EEP_RETURN_IF_ERROR(m.Collect());
    }
    while (m.queued_steps() > 0) EEP_RETURN_IF_ERROR(m.Collect());
    for (int64_t b = 0; b < batch; ++b)
      next[static_cast<size_t>(b)].assign(1, r.tokens[static_cast<size_t>((steps - 1) * batch + b)]);
  } else {
    for (int64_t s = 0; s < steps; ++s) {
      EEP_RETURN_IF_ERROR(step(nullptr));
      for (int64_t b = 0; b < batch; ++b) r.tokens[static_cast<size_t>(s * batch + b)] = greedy[static_cast<size_t>(b)];
    }
  }
  const double elapsed = Now() - t0;
  r.tokens_per_s = static_cast<double>(steps * batch) / elapsed;
  r.step_ms = elapsed / static_cast<double>(steps) * 1e3;
  eep::cuda::CudaForwardTrace trace;
  EEP_RETURN_IF_ERROR(step(&trace));
  for (const auto& ids : trace.route_ids) {
    std::vector<int32_t> u(ids);
    std::sort(u.begin(), u.end());
    r.experts_touched += std::unique(u.begin(), u.end()) - u.begin();
  }
  return r;
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
  auto bw = eep::cuda::MeasureDeviceCopyGBps(1ull << 30, 10);
  if (!bw.ok()) return eep::cli::Fail(bw.status());
  fmt::print("device copy bandwidth (cudaMemcpy D2D 1 GiB, read + write): {:.0f} GB/s\n", *bw);
  j["device_copy_gbps"] = *bw;
  j["cuda_graphs"] = !f.no_graphs;
  j["gemv_max_tokens"] = f.gemv_max_tokens;
  j["fused_moe_max_tokens"] = f.fused_moe_max_tokens;
  std::vector<bool> modes;
  if (f.mode == "split" || f.mode == "both") modes.push_back(true);
  if (f.mode == "bf16" || f.mode == "both") modes.push_back(false);
  if (modes.empty()) return eep::cli::Fail(eep::Status::InvalidArgument("--mode must be split, bf16 or both"));
  for (bool split : modes) {
    auto m = eep::cuda::CudaModel::Load(f.model_dir, {.split_activations = split,
                                                      .gemv_max_tokens = f.gemv_max_tokens,
                                                      .fused_moe_max_tokens = f.fused_moe_max_tokens,
                                                      .cuda_graphs = !f.no_graphs});
    if (!m.ok()) return eep::cli::Fail(m.status());
    const char* mode = split ? "split-bf16" : "bf16";
    const eep::ModelConfig& c = (*m)->config();
    const eep::ExpertMap& map = (*m)->expert_map();
    const int64_t slot_bytes = (*m)->slot_bytes();
    const int64_t all_slots = map.num_moe_layers() * map.num_physical() * slot_bytes;
    // Dense bytes a step reads: all weights but the expert slots and, when the LM head is
    // separate, the embedding table (a step reads B of its rows).
    const int64_t dense = (*m)->weight_bytes() - all_slots - (c.tie_word_embeddings ? 0 : c.vocab_size * c.hidden_size * 2);
    fmt::print("{}: {:.2f} GiB on the GPU, {:.2f} GiB of it expert slots ({} MoE layers x {} slots x {:.1f} MiB)\n",
               mode, (*m)->weight_bytes() / double(1ull << 30), all_slots / double(1ull << 30), map.num_moe_layers(),
               map.num_physical(), slot_bytes / double(1 << 20));
    for (int64_t b : f.batches) {
      auto r = CudaDecode(**m, f.prompt_len, f.seed, f.tokens, b, !f.sync_steps);
      if (!r.ok()) return eep::cli::Fail(r.status());
      // The same steps with the host waiting for each one's tokens (what a plain generate loop
      // does): the queued steps' gain, and a check that they decode the same tokens.
      eep::Result<CudaDecodeResult> sync = r;
      if (!f.sync_steps) sync = CudaDecode(**m, f.prompt_len, f.seed, f.tokens, b, false);
      if (!sync.ok()) return eep::cli::Fail(sync.status());
      int64_t differ = 0;
      for (size_t i = 0; i < r->tokens.size(); ++i) differ += r->tokens[i] != sync->tokens[i];
      const double ratio = cpu_tps > 0 ? r->tokens_per_s / cpu_tps : 0;
      const double step_bytes = static_cast<double>(dense + r->experts_touched * slot_bytes);
      const double roofline_tps = static_cast<double>(b) / (step_bytes / (*bw * 1e9));
      fmt::print(
          "cuda batch {:3} ({:10}): {:9.1f} tokens/s, {:7.2f} ms/step | weights/step {:6.2f} GB ({:4} experts) -> "
          "roofline {:9.1f} tokens/s: {:5.1f}% of roofline{}{}\n",
          b, mode, r->tokens_per_s, r->step_ms, step_bytes / 1e9, r->experts_touched, roofline_tps,
          100.0 * r->tokens_per_s / roofline_tps,
          cpu_tps > 0 ? fmt::format(" | {:.1f}x cpu batch 1", ratio) : std::string(),
          f.sync_steps ? std::string(" | host-synchronous steps")
                       : fmt::format(" | host-synchronous steps {:.1f} tokens/s ({:.1f}%), tokens {}", sync->tokens_per_s,
                                     100.0 * sync->tokens_per_s / roofline_tps,
                                     differ == 0 ? std::string("equal")
                                                 : fmt::format("differ at {} of {}", differ, r->tokens.size())));
      j["cuda"].push_back({{"mode", mode},
                           {"batch", b},
                           {"tokens_per_s", r->tokens_per_s},
                           {"step_ms", r->step_ms},
                           {"weight_bytes_per_step", step_bytes},
                           {"experts_touched", r->experts_touched},
                           {"roofline_tokens_per_s", roofline_tps},
                           {"fraction_of_roofline", r->tokens_per_s / roofline_tps},
                           {"ratio_vs_cpu", ratio},
                           {"queued_steps", !f.sync_steps},
                           {"sync_tokens_per_s", sync->tokens_per_s},
                           {"tokens_differ_from_sync", differ}});
    }
  }
  if (f.json) fmt::print("{}\n", j.dump());
  return 0;
}

EEP_REGISTER_BENCH(decode, "decode", "decode tokens/s: CUDA backend vs its memory roofline and the CPU backend, same run",
                   [](CLI::App* app) -> std::function<int()> {
                     auto f = std::make_shared<DecodeBenchFlags>();
                     app->add_option("--model", f->model_dir, "checkpoint directory")->required();
                     app->add_option("--prompt-len", f->prompt_len, "prompt tokens (prefill, untimed)");
                     app->add_option("--tokens", f->tokens, "decode steps timed on the GPU");
                     app->add_option("--cpu-tokens", f->cpu_tokens, "decode steps timed on the CPU");
                     app->add_option("--batch", f->batches, "GPU batch sizes (sequences decoded together)");
                     app->add_flag("--skip-cpu", f->skip_cpu, "no CPU reference (no ratio)");
                     app->add_option("--mode", f->mode,
                                     "GPU activations: split (hi+lo BF16, f32-level), bf16, or both");
                     app->add_flag("--json", f->json, "also print one JSON line");
                     app->add_flag("--no-graphs", f->no_graphs, "run decode steps without CUDA graphs");
                     app->add_flag("--sync-steps", f->sync_steps,
                                   "the host waits for each step's tokens before it queues the next (default: "
                                   "each step is queued while the one before runs, and this is measured beside it)");
                     app->add_option("--gemv-max-tokens", f->gemv_max_tokens,
                                     "steps of at most this many tokens use GEMV kernels for dense layers");
                     app->add_option("--fused-moe-max-tokens", f->fused_moe_max_tokens,
                                     "steps of at most this many tokens run the device-side grouped MoE");
                     app->add_option("--seed", f->seed, "prompt seed");
                     return [f] { return RunDecodeBench(*f); };
                   });

}  // namespace
