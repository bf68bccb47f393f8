// `eep eplb --input CASE.json --output PLAN.json`: expert placement from load statistics.
// The JSON contract is documented at ParsePlanRequest / RunPlanRequest in src/eplb/eplb.h.
#include <fmt/core.h>

#include <memory>
#include <string>

#include "command.h"
#include "core/util.h"
#include "eplb/eplb.h"

namespace {

struct EplbFlags {
  std::string input;
  std::string output = "-";
  int indent = -1;
};

int RunEplb(const EplbFlags& flags) {
  auto input = eep::ReadJsonFile(flags.input);
  if (!input.ok()) return eep::cli::Fail(input.status());
  auto request = eep::eplb::ParsePlanRequest(*input);
  if (!request.ok()) return eep::cli::Fail(request.status().WithContext(flags.input));
  auto plan = eep::eplb::RunPlanRequest(*request);
  if (!plan.ok()) return eep::cli::Fail(plan.status().WithContext(flags.input));
  std::string text = plan->dump(flags.indent);
  text += '\n';
  if (flags.output == "-") {
    fmt::print("{}", text);
  } else if (eep::Status s = eep::WriteFile(flags.output, text); !s.ok()) {
    return eep::cli::Fail(s);
  }
  const nlohmann::json& out = *plan;
  if (out.contains("moved_experts")) {
    EEP_LOG_INFO("eplb: {} layers, balancedness {:.4f}, moved {} slots (fresh plan: {:.4f}, {})",
                 request->weight.num_layers, out["balancedness"].get<double>(),
                 out["moved_experts"].get<int64_t>(), out["fresh_balancedness"].get<double>(),
                 out["fresh_moved_experts"].get<int64_t>());
  } else {
    EEP_LOG_INFO("eplb: {} layers, balancedness {:.4f}", request->weight.num_layers,
                 out["balancedness"].get<double>());
  }
  return 0;
}

}  // namespace

EEP_REGISTER_COMMAND(
    eplb, "eplb",
    "plan expert placement from per-layer expert loads (DeepSeek EPLB; fault-aware; min-move)",
    [](CLI::App* app) -> std::function<int()> {
      auto flags = std::make_shared<EplbFlags>();
      app->add_option("--input", flags->input,
                      "case JSON: weight, num_replicas, num_groups, num_nodes, num_gpus, "
                      "[failed_gpus], [failed_nodes], [old_phy2log, mode, tolerance]")
          ->required();
      app->add_option("--output", flags->output, "plan JSON path, '-' for stdout")
          ->capture_default_str();
      app->add_option("--indent", flags->indent, "JSON indentation (-1: compact)")
          ->capture_default_str();
      return [flags]() { return RunEplb(*flags); };
    });
