// eep: one binary, many subcommands (see command.h for how they register).
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <map>

#include "command.h"
#include "core/logging.h"

namespace eep::cli {
std::vector<CommandInfo>& Registry() {
  static std::vector<CommandInfo> registry;
  return registry;
}
std::vector<CommandInfo>& BenchRegistry() {
  static std::vector<CommandInfo> registry;
  return registry;
}
std::FILE* ReserveStdout() {
  std::fflush(stdout);
  int fd = dup(STDOUT_FILENO);
  if (fd < 0) return stdout;
  dup2(STDERR_FILENO, STDOUT_FILENO);
  std::FILE* out = fdopen(fd, "w");
  return out != nullptr ? out : stdout;
}
}  // namespace eep::cli

int main(int argc, char** argv) {
  eep::InitLogging("info");
  CLI::App app{"eep: elastic expert-parallel inference for MoE models"};
  app.require_subcommand(1);
  app.fallthrough();  // global flags (--log-level) may follow the subcommand
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off")->envname("EEP_LOG_LEVEL");
  std::map<CLI::App*, std::function<int()>> runners;
  for (auto& info : eep::cli::Registry()) {
    CLI::App* sub = app.add_subcommand(info.name, info.help);
    runners[sub] = info.setup(sub);
  }
  if (!eep::cli::BenchRegistry().empty()) {
    CLI::App* bench = app.add_subcommand("bench", "benchmarks, each against a reference measured in the same run");
    bench->require_subcommand(1);
    for (auto& info : eep::cli::BenchRegistry()) {
      CLI::App* sub = bench->add_subcommand(info.name, info.help);
      runners[sub] = info.setup(sub);
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  eep::SetLogLevel(log_level);
  for (auto& [sub, run] : runners) {
    if (sub->parsed()) return run();
  }
  return 2;
}
