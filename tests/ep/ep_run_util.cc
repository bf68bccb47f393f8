#include "ep_run_util.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <map>

#include "test_util.h"

namespace eep::eptest {

std::vector<std::vector<int64_t>> Prompts(const std::string& model) {
  const auto golden = test::LoadGoldenPrompts(model);
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < kSeqs && !golden.empty(); ++i) {
    const auto& ids = golden[static_cast<size_t>(i) % golden.size()].ids;
    const size_t cut = std::min(ids.size() - 1, static_cast<size_t>(i / static_cast<int>(golden.size())) * 3);
    out.emplace_back(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(cut));
  }
  return out;
}

int PidOf(const ep::EpEngine& e, int rank) {
  for (const auto& r : e.Cluster().ranks)
    if (r.rank == rank) return r.pid;
  return 0;
}

void Signal(ep::EpEngine& e, int rank, int sig) {
  const int pid = PidOf(e, rank);
  ASSERT_GT(pid, 0) << "rank " << rank << " has no process";
  ASSERT_EQ(kill(pid, sig), 0);
}

Result<Run> Generate(const std::string& model, ep::EpOptions opts, const Hook& hook) {
  opts.worker_binary = EEP_BIN;
  if (opts.log_level == "info") opts.log_level = "warn";
  const auto prompts = Prompts(model);
  EEP_ASSIGN_OR_RETURN(auto engine, ep::EpEngine::Start(test::ModelDir(model), opts));
  Run run;
  run.tokens.resize(prompts.size());
  for (int step = 0;; ++step) {
    if (hook) hook(*engine, step);
    std::vector<ep::SeqInput> inputs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      const int start = static_cast<int>(i % 4);
      if (step < start || static_cast<int>(run.tokens[i].size()) >= kNewTokens) continue;
      ep::SeqInput in;
      in.seq_id = static_cast<int64_t>(i);
      in.new_ids = step == start ? prompts[i] : std::vector<int64_t>{run.tokens[i].back()};
      inputs.push_back(std::move(in));
    }
    if (inputs.empty()) break;
    EEP_ASSIGN_OR_RETURN(auto outs, engine->Step(inputs));
    if (outs.size() != inputs.size()) return Status::Internal("one output per input expected");
    for (const auto& o : outs) {
      auto& t = run.tokens[static_cast<size_t>(o.seq_id)];
      t.push_back(o.token);
      if (static_cast<int>(t.size()) == kNewTokens) engine->Release(o.seq_id);
    }
  }
  run.cluster = engine->Cluster();
  engine->Shutdown();
  return run;
}

const std::vector<std::vector<int64_t>>& Reference(const std::string& model) {
  static std::map<std::string, std::vector<std::vector<int64_t>>> cache;
  auto it = cache.find(model);
  if (it != cache.end()) return it->second;
  auto run = Generate(model, Options(1));
  EXPECT_TRUE(run.ok()) << run.status().ToString();
  const auto golden = test::LoadGoldenPrompts(model);
  if (run.ok())
    for (size_t i = 0; i < golden.size() && i < run->tokens.size(); ++i) {
      const size_t n = std::min(golden[i].greedy.size(), run->tokens[i].size());
      EXPECT_EQ(std::vector<int64_t>(run->tokens[i].begin(), run->tokens[i].begin() + static_cast<std::ptrdiff_t>(n)),
                std::vector<int64_t>(golden[i].greedy.begin(), golden[i].greedy.begin() + static_cast<std::ptrdiff_t>(n)))
          << model << " golden prompt " << i;
    }
  return cache[model] = run.ok() ? run->tokens : std::vector<std::vector<int64_t>>{};
}

void ExpectSameTokens(const Run& run, const std::string& model) {
  const auto& ref = Reference(model);
  ASSERT_EQ(run.tokens.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(run.tokens[i], ref[i]) << "sequence " << i;
}

std::vector<const ep::MembershipEvent*> EventsOf(const ep::ClusterInfo& c, const std::string& kind) {
  std::vector<const ep::MembershipEvent*> out;
  for (const auto& e : c.events)
    if (e.kind == kind) out.push_back(&e);
  return out;
}

std::string StateOf(const ep::ClusterInfo& c, int rank) {
  for (const auto& r : c.ranks)
    if (r.rank == rank) return r.state;
  return "";
}

ep::EpOptions Options(int ep, const std::string& communicator) {
  ep::EpOptions o;
  o.ep_size = ep;
  o.communicator = communicator;
  return o;
}

}  // namespace eep::eptest
