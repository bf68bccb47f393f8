// eep logits: one forward pass over a prompt; writes logits [T, vocab] as F32 safetensors.
#include <fmt/format.h>

#include "command.h"
#include "core/util.h"
#include "model/model.h"

namespace {

struct LogitsOptions {
  std::string model_dir, prompt_ids, out;
};

int RunLogits(const LogitsOptions& o) {
  auto ids = eep::ParseIdList(o.prompt_ids, "--prompt-ids");
  if (!ids.ok()) return eep::cli::Fail(ids.status());
  if (ids->empty()) return eep::cli::Fail(eep::Status::InvalidArgument("--prompt-ids: empty prompt"));
  auto model = eep::Model::Load(o.model_dir);
  if (!model.ok()) return eep::cli::Fail(model.status());
  auto cache = (*model)->NewCache();
  std::vector<float> logits;
  eep::SeqStep step{cache.get(), *ids, true, &logits};
  eep::Status st = (*model)->Forward(std::span<eep::SeqStep>(&step, 1));
  if (!st.ok()) return eep::cli::Fail(st.WithContext("--prompt-ids"));
  const int64_t T = static_cast<int64_t>(ids->size());
  st = eep::WriteSafetensors(o.out, {{"logits", eep::DType::kF32, {T, (*model)->config().vocab_size}, logits.data()}});
  if (!st.ok()) return eep::cli::Fail(st);
  EEP_LOG_INFO("wrote logits [{}, {}] to {}", T, (*model)->config().vocab_size, o.out);
  return 0;
}

EEP_REGISTER_COMMAND(logits, "logits", "one forward pass over --prompt-ids; logits to a safetensors file",
                     [](CLI::App* app) -> std::function<int()> {
                       auto o = std::make_shared<LogitsOptions>();
                       app->add_option("--model", o->model_dir, "checkpoint directory")->required();
                       app->add_option("--prompt-ids", o->prompt_ids, "comma-separated token ids")->required();
                       app->add_option("--out", o->out, "output .safetensors file")->required();
                       return [o] { return RunLogits(*o); };
                     });

}  // namespace
