// eep logits: one forward pass over a prompt; writes logits [T, vocab] as F32 safetensors.
#include <fmt/format.h>

#include "command.h"
#include "ep_flags.h"
#include "core/util.h"
#include "cuda/compute_cuda.h"

namespace {

struct LogitsOptions {
  std::string model_dir, prompt_ids, out;
  std::string backend = "auto";
  eep::cli::EpFlags ep;
};

eep::Result<std::vector<float>> LogitsEp(const LogitsOptions& o, const std::string& backend,
                                         const std::vector<int64_t>& ids) {
  EEP_ASSIGN_OR_RETURN(auto engine, eep::ep::EpEngine::Start(o.model_dir, eep::cli::EpOptionsFor(o.ep, backend)));
  eep::ep::SeqInput in;
  in.new_ids = ids;
  in.return_logits = true;
  in.all_logits = true;
  EEP_ASSIGN_OR_RETURN(auto res, engine->Step({in}));
  engine->Shutdown();
  return std::move(res.at(0).logits);
}

int RunLogits(const LogitsOptions& o) {
  auto ids = eep::ParseIdList(o.prompt_ids, "--prompt-ids");
  if (!ids.ok()) return eep::cli::Fail(ids.status());
  if (ids->empty()) return eep::cli::Fail(eep::Status::InvalidArgument("--prompt-ids: empty prompt"));
  auto config = eep::LoadModelConfig(o.model_dir);
  if (!config.ok()) return eep::cli::Fail(config.status());
  const int64_t V = config->vocab_size;
  for (int64_t id : *ids)
    if (id < 0 || id >= V)
      return eep::cli::Fail(eep::Status::InvalidArgument(
          fmt::format("--prompt-ids: token id {} is out of the vocabulary [0, {})", id, V)));
  std::vector<float> logits;
  auto resolved = eep::cuda::ResolveBackend(o.backend);
  if (!resolved.ok()) return eep::cli::Fail(resolved.status());
  const std::string backend = *resolved;
  if (o.ep.ep > 0) {
    auto r = LogitsEp(o, backend, *ids);
    if (!r.ok()) return eep::cli::Fail(r.status());
    logits = std::move(*r);
  } else {
    auto model = eep::OpenComputeModel(backend, o.model_dir);
    if (!model.ok()) return eep::cli::Fail(model.status());
    auto cache = (*model)->NewCache();
    eep::ComputeStep step{cache.get(), *ids, true, &logits};
    eep::Status st = (*model)->Forward(std::span<eep::ComputeStep>(&step, 1));
    if (!st.ok()) return eep::cli::Fail(st.WithContext("--prompt-ids"));
  }
  const int64_t T = static_cast<int64_t>(ids->size());
  eep::Status st = eep::WriteSafetensors(o.out, {{"logits", eep::DType::kF32, {T, V}, logits.data()}});
  if (!st.ok()) return eep::cli::Fail(st);
  EEP_LOG_INFO("wrote logits [{}, {}] to {}", T, V, o.out);
  return 0;
}

EEP_REGISTER_COMMAND(logits, "logits", "one forward pass over --prompt-ids; logits to a safetensors file",
                     [](CLI::App* app) -> std::function<int()> {
                       auto o = std::make_shared<LogitsOptions>();
                       app->add_option("--model", o->model_dir, "checkpoint directory")->required();
                       app->add_option("--prompt-ids", o->prompt_ids, "comma-separated token ids")->required();
                       app->add_option("--out", o->out, "output .safetensors file")->required();
                       app->add_option("--backend", o->backend, "auto (default: cuda when a GPU is visible, else cpu) | cpu | cuda")
                           ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
                       eep::cli::AddEpFlags(app, &o->ep);
                       return [o] { return RunLogits(*o); };
                     });

}  // namespace
