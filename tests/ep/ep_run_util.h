// Helpers of the EP failure and scaling tests: a miniature continuous-batching generation loop
// over ep::EpEngine with a hook before every step, and the no-failure reference it is
// compared against.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/status.h"
#include "ep/ep.h"

namespace eep::eptest {

constexpr int kSeqs = 16;
constexpr int kNewTokens = 48;

// 16 prompts: the golden ones, then shortened variants of them (distinct sequences).
std::vector<std::vector<int64_t>> Prompts(const std::string& model);

using Hook = std::function<void(ep::EpEngine&, int step)>;

struct Run {
  std::vector<std::vector<int64_t>> tokens;
  ep::ClusterInfo cluster;
};

// Continuous batching in miniature: sequence i joins at step i % 4, decodes kNewTokens greedy
// tokens, and is released; `hook` runs before every step. Ranks run the built eep binary.
Result<Run> Generate(const std::string& model, ep::EpOptions opts, const Hook& hook = {});

// The reference: one rank, no failure, cached per model. Its golden prompts' first tokens are
// checked against HF's greedy tokens (gtest expectations) when it is computed.
const std::vector<std::vector<int64_t>>& Reference(const std::string& model);
// gtest expectations: every sequence of `run` equals the reference.
void ExpectSameTokens(const Run& run, const std::string& model);

int PidOf(const ep::EpEngine& e, int rank);
// Sends `sig` to rank's process (gtest assertion if it has none).
void Signal(ep::EpEngine& e, int rank, int sig);
std::vector<const ep::MembershipEvent*> EventsOf(const ep::ClusterInfo& c, const std::string& kind);
std::string StateOf(const ep::ClusterInfo& c, int rank);
ep::EpOptions Options(int ep, const std::string& communicator = "shm");

}  // namespace eep::eptest
