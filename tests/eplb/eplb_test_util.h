// Shared helpers of the eplb tests: golden-case loading, load perturbation, running the CLI.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eplb/eplb.h"

namespace eep::eplb::testing {

// One case of tests/data/eplb/*.json, with the reference outputs flattened row-major.
struct GoldenCase {
  std::string name;
  nlohmann::json raw;
  LoadMatrix weight;
  Topology topo;
  std::vector<int32_t> phy2log;  // [L][R]
  std::vector<int32_t> log2phy;  // [L][E][max_cnt]
  int32_t max_cnt = 0;
  std::vector<int32_t> logcnt;  // [L][E]
  double balancedness = 0;
  double reference_seconds = 0;
};

// Loads tests/data/eplb/<file>; fails the calling test (ADD_FAILURE) on malformed data.
std::vector<GoldenCase> LoadGolden(const std::string& file);

// Each load times a factor drawn uniformly from [1 - noise, 1 + noise] (mt19937, fixed seed).
LoadMatrix Perturb(const LoadMatrix& w, double noise, uint32_t seed);

// Runs a shell command, returns its stdout+stderr; *exit_code gets the exit status.
std::string RunCommand(const std::string& command, int* exit_code);

// A fresh path under the temp directory for this test process.
std::string TempPath(const std::string& name);

}  // namespace eep::eplb::testing
