// Subcommand registry of the `eep` binary. Each subcommand lives in its own cmd_*.cc and
// registers itself with one EEP_REGISTER_COMMAND line; main.cc knows none of them by name.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "core/logging.h"
#include "core/status.h"

namespace eep::cli {

// Called with the subcommand's CLI::App to declare flags; returns the function that runs
// the command after parsing (its return value is the process exit code).
using CommandSetup = std::function<std::function<int()>(CLI::App*)>;

struct CommandInfo {
  std::string name;
  std::string help;
  CommandSetup setup;
};

// Top-level subcommands (`eep generate`) and benchmarks (`eep bench eplb`).
std::vector<CommandInfo>& Registry();
std::vector<CommandInfo>& BenchRegistry();

struct CommandRegistrar {
  CommandRegistrar(std::vector<CommandInfo>& registry, std::string name, std::string help,
                   CommandSetup setup) {
    registry.push_back({std::move(name), std::move(help), std::move(setup)});
  }
};

// For commands whose stdout is parsed (`backup-manager`'s `listening ENDPOINT`, `backup-fetch`'s
// result): returns a stream on the real stdout and points fd 1 at stderr, so that libraries
// that print to stdout (UCX logs there by default) cannot mix into it. Call before any library
// starts.
std::FILE* ReserveStdout();

// Logs a failed status as one line and returns the exit code for it (1).
inline int Fail(const Status& status) {
  EEP_LOG_ERROR("{}", status.ToString());
  return 1;
}

}  // namespace eep::cli

// The setup lambda is variadic so commas inside it need no extra parentheses.
#define EEP_REGISTER_COMMAND(ident, name, help, ...)                                          \
  static ::eep::cli::CommandRegistrar eep_command_##ident(::eep::cli::Registry(), name, help, \
                                                          __VA_ARGS__)

// A benchmark: `eep bench NAME`. Each prints a ratio against a reference measured in the same run.
#define EEP_REGISTER_BENCH(ident, name, help, ...)                                                \
  static ::eep::cli::CommandRegistrar eep_bench_##ident(::eep::cli::BenchRegistry(), name, help, \
                                                        __VA_ARGS__)
