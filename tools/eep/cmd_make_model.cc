// eep make-model: random-weight checkpoints of any size, for tests and benchmarks.
#include "command.h"
#include "model/make_model.h"

namespace {

struct MakeModelCli {
  std::string arch = "qwen3_moe", out;
  eep::MakeModelOptions o;
  double shard_gib = 4.0;
};

int RunMakeModel(MakeModelCli& c) {
  auto arch = eep::ParseArch(c.arch);
  if (!arch.ok()) return eep::cli::Fail(arch.status().WithContext("--arch"));
  c.o.arch = *arch;
  c.o.max_shard_bytes = static_cast<uint64_t>(c.shard_gib * (1ull << 30));
  c.o.show_progress = true;
  eep::Status st = eep::MakeModel(c.o, c.out);
  if (!st.ok()) return eep::cli::Fail(st);
  EEP_LOG_INFO("wrote {}", c.out);
  return 0;
}

EEP_REGISTER_COMMAND(make_model, "make-model", "write a random-weight HF checkpoint of any size",
                     [](CLI::App* app) -> std::function<int()> {
                       auto c = std::make_shared<MakeModelCli>();
                       auto& o = c->o;
                       app->add_option("--arch", c->arch, "qwen3_moe | mixtral | deepseek_v3");
                       app->add_option("--out", c->out, "output directory")->required();
                       app->add_option("--seed", o.seed, "random seed");
                       app->add_option("--layers", o.num_layers, "decoder layers")->check(CLI::PositiveNumber);
                       app->add_option("--hidden", o.hidden_size, "hidden size")->check(CLI::PositiveNumber);
                       app->add_option("--experts", o.num_experts, "routed experts per MoE layer")->check(CLI::PositiveNumber);
                       app->add_option("--experts-per-tok", o.num_experts_per_tok, "top-k")->check(CLI::PositiveNumber);
                       app->add_option("--moe-intermediate", o.moe_intermediate_size, "expert hidden size")->check(CLI::PositiveNumber);
                       app->add_option("--intermediate", o.intermediate_size, "dense MLP hidden size")->check(CLI::PositiveNumber);
                       app->add_option("--heads", o.num_heads, "attention heads")->check(CLI::PositiveNumber);
                       app->add_option("--kv-heads", o.num_kv_heads, "key/value heads")->check(CLI::PositiveNumber);
                       app->add_option("--head-dim", o.head_dim, "attention head dim")->check(CLI::PositiveNumber);
                       app->add_option("--vocab", o.vocab_size, "vocabulary size (>= 503)");
                       app->add_option("--first-dense", o.first_k_dense_replace, "deepseek_v3: first dense layers");
                       app->add_option("--n-group", o.n_group, "deepseek_v3: expert groups");
                       app->add_option("--topk-group", o.topk_group, "deepseek_v3: groups kept");
                       app->add_option("--q-lora-rank", o.q_lora_rank, "deepseek_v3: 0 = plain q_proj");
                       app->add_option("--shard-gib", c->shard_gib, "max shard size in GiB")->check(CLI::PositiveNumber);
                       return [c] { return RunMakeModel(*c); };
                     });

}  // namespace
