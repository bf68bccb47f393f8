// eep generate: prompt in, tokens out, on the CPU reference runtime or the CUDA backend, in
// process or over --ep N rank processes.
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "command.h"
#include "ep_flags.h"
#include "core/util.h"
#include "cuda/compute_cuda.h"
#include "model/generate.h"
#include "model/tokenizer.h"

namespace {

struct GenerateCliOptions {
  std::string model_dir, prompt, prompt_ids;
  int64_t max_new_tokens = 16;
  double temperature = 0.0, top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
  bool json = false, ignore_eos = false;
  std::string backend = "auto";
  eep::cli::EpFlags ep;
};

// The same loop as eep::Generate, over the expert-parallel engine.
eep::Result<std::vector<int64_t>> GenerateEp(const std::string& model_dir, const eep::cli::EpFlags& flags,
                                             const std::string& backend, const std::vector<int64_t>& prompt,
                                             const eep::GenerateOptions& g) {
  EEP_ASSIGN_OR_RETURN(auto engine, eep::ep::EpEngine::Start(model_dir, eep::cli::EpOptionsFor(flags, backend)));
  std::vector<int64_t> out;
  eep::ep::SeqInput in;
  in.seq_id = 0;
  in.new_ids = prompt;
  in.sampling = g.sampling;
  while (static_cast<int64_t>(out.size()) < g.max_new_tokens) {
    EEP_ASSIGN_OR_RETURN(auto res, engine->Step({in}));
    const int64_t tok = res.at(0).token;
    out.push_back(tok);
    if (std::find(g.stop_token_ids.begin(), g.stop_token_ids.end(), tok) != g.stop_token_ids.end()) break;
    in.new_ids.assign(1, tok);
  }
  engine->Shutdown();
  return out;
}

// Text of ids the tokenizer knows; ids past its vocabulary (model rows with no token) are
// skipped, as transformers' decode does.
std::string DecodeKnown(const eep::Tokenizer& tok, const std::vector<int64_t>& ids) {
  std::vector<int64_t> known;
  for (int64_t id : ids)
    if (id >= 0 && id < tok.vocab_size()) known.push_back(id);
  auto text = tok.Decode(known);
  return text.ok() ? *text : std::string();
}

int RunGenerate(const GenerateCliOptions& o) {
  if (o.prompt.empty() == o.prompt_ids.empty())
    return eep::cli::Fail(eep::Status::InvalidArgument("give exactly one of --prompt or --prompt-ids"));
  if (o.max_new_tokens < 0)
    return eep::cli::Fail(eep::Status::InvalidArgument("--max-new-tokens must be >= 0"));
  auto tok = eep::Tokenizer::FromFile(o.model_dir + "/tokenizer.json");
  if (!tok.ok()) return eep::cli::Fail(tok.status());
  std::vector<int64_t> ids;
  if (!o.prompt_ids.empty()) {
    auto parsed = eep::ParseIdList(o.prompt_ids, "--prompt-ids");
    if (!parsed.ok()) return eep::cli::Fail(parsed.status());
    ids = *parsed;
  } else {
    auto enc = (*tok)->Encode(o.prompt);
    if (!enc.ok()) return eep::cli::Fail(enc.status().WithContext("--prompt"));
    ids = *enc;
  }
  // Check the prompt against the config before the (long) weight load.
  auto config = eep::LoadModelConfig(o.model_dir);
  if (!config.ok()) return eep::cli::Fail(config.status());
  for (int64_t id : ids)
    if (id < 0 || id >= config->vocab_size)
      return eep::cli::Fail(eep::Status::InvalidArgument(
          fmt::format("--prompt-ids: token id {} is out of the vocabulary [0, {})", id, config->vocab_size)));
  eep::GenerateOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.sampling = {o.temperature, o.top_p, o.top_k, o.seed};
  if (auto st = eep::ValidateSamplingParams(g.sampling); !st.ok()) return eep::cli::Fail(st);
  if (!o.ignore_eos) g.stop_token_ids = config->eos_token_ids;
  std::vector<int64_t> out;
  auto resolved = eep::cuda::ResolveBackend(o.backend);
  if (!resolved.ok()) return eep::cli::Fail(resolved.status());
  const std::string backend = *resolved;
  if (o.max_new_tokens > 0 && o.ep.ep > 0) {
    auto r = GenerateEp(o.model_dir, o.ep, backend, ids, g);
    if (!r.ok()) return eep::cli::Fail(r.status());
    out = *r;
  } else if (o.max_new_tokens > 0) {
    auto model = eep::OpenComputeModel(backend, o.model_dir, {.load_experts = true, .show_progress = true});
    if (!model.ok()) return eep::cli::Fail(model.status());
    auto r = eep::Generate(**model, ids, g);
    if (!r.ok()) return eep::cli::Fail(r.status());
    out = *r;
  }
  std::string text = DecodeKnown(**tok, out);
  if (o.json) {
    nlohmann::ordered_json j{{"prompt_ids", ids}, {"output_ids", out}, {"text", text}};
    fmt::print("{}\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  } else {
    fmt::print("{}{}\n", DecodeKnown(**tok, ids), text);
  }
  return 0;
}

EEP_REGISTER_COMMAND(generate, "generate", "generate tokens from a prompt (greedy when --temperature is 0)",
                     [](CLI::App* app) -> std::function<int()> {
                       auto o = std::make_shared<GenerateCliOptions>();
                       app->add_option("--model", o->model_dir, "checkpoint directory")->required();
                       app->add_option("--prompt", o->prompt, "prompt text");
                       app->add_option("--prompt-ids", o->prompt_ids, "comma-separated prompt token ids");
                       app->add_option("--max-new-tokens", o->max_new_tokens, "tokens to generate");
                       app->add_option("--temperature", o->temperature, "0 = greedy");
                       app->add_option("--top-p", o->top_p, "nucleus sampling mass");
                       app->add_option("--top-k", o->top_k, "0 = off");
                       app->add_option("--seed", o->seed, "sampling seed");
                       app->add_flag("--json", o->json, "print {prompt_ids, output_ids, text}");
                       app->add_flag("--ignore-eos", o->ignore_eos, "do not stop at the EOS token");
                       app->add_option("--backend", o->backend, "auto (default: cuda when a GPU is visible, else cpu) | cpu | cuda")
                           ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
                       eep::cli::AddEpFlags(app, &o->ep);
                       return [o] { return RunGenerate(*o); };
                     });

}  // namespace
