// Rank failures while generating ([fault]): 16 concurrent greedy sequences of 48 tokens on
// rank processes; ranks are killed, hung or slowed mid-generation. Every sequence must finish
// with the tokens of a run without failure (--ep 1), whose first tokens are checked against
// the golden HF greedy tokens, and the recovery must report what it did (who died, where
// orphaned experts came from).
#include <gtest/gtest.h>
#include <signal.h>

#include <cerrno>
#include <chrono>
#include <fmt/format.h>
#include <functional>
#include <map>

#include "ep/ep.h"
#include "../backup/process_util.h"
#include "test_util.h"

namespace eep {
namespace {

constexpr int kSeqs = 16;
constexpr int kNewTokens = 48;

// 16 prompts: the golden ones, then shortened variants of them (distinct sequences).
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

using Hook = std::function<void(ep::EpEngine&, int step)>;

struct Run {
  std::vector<std::vector<int64_t>> tokens;
  ep::ClusterInfo cluster;
};

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

// Continuous batching in miniature: sequence i joins at step i % 4, decodes kNewTokens
// greedy tokens, and is released; `hook` runs before every step.
Result<Run> Generate(const std::string& model, ep::EpOptions opts, const Hook& hook = {}) {
  opts.worker_binary = EEP_BIN;
  opts.log_level = "warn";
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

// The reference: one rank, no failure; its golden prompts' first tokens equal HF's.
const std::vector<std::vector<int64_t>>& Reference(const std::string& model) {
  static std::map<std::string, std::vector<std::vector<int64_t>>> cache;
  auto it = cache.find(model);
  if (it != cache.end()) return it->second;
  ep::EpOptions o;
  o.ep_size = 1;
  auto run = Generate(model, o);
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

std::vector<const ep::MembershipEvent*> Failovers(const ep::ClusterInfo& c) {
  std::vector<const ep::MembershipEvent*> out;
  for (const auto& e : c.events)
    if (e.kind == "failover") out.push_back(&e);
  return out;
}

std::string StateOf(const ep::ClusterInfo& c, int rank) {
  for (const auto& r : c.ranks)
    if (r.rank == rank) return r.state;
  return "";
}

ep::EpOptions Options(int ep, const std::string& communicator = "shm") {
  ep::EpOptions o;
  o.ep_size = ep;
  o.communicator = communicator;
  return o;
}

class KillMidGeneration : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(KillMidGeneration, AllSequencesFinishWithUnchangedTokens) {
  const auto& [model, communicator] = GetParam();
  const auto t0 = std::chrono::steady_clock::now();
  auto run = Generate(model, Options(4, communicator), [](ep::EpEngine& e, int step) {
    if (step == 12) Signal(e, 2, SIGKILL);
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, model);
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0]->dead_ranks, std::vector<int>{2});
  EXPECT_EQ(f[0]->members, (std::vector<int>{0, 1, 3}));
  EXPECT_GT(f[0]->requeued_seqs, 0) << "rank 2 held sequences that had to resume elsewhere";
  // Rank 2 held the only replica of its experts: they came from the checkpoint (no backup here).
  EXPECT_GT(f[0]->experts_from_disk, 0);
  EXPECT_EQ(StateOf(run->cluster, 2), "dead");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 60.0);
}

INSTANTIATE_TEST_SUITE_P(Models, KillMidGeneration,
                         ::testing::Values(std::make_tuple("qwen3moe-tiny", "shm"), std::make_tuple("mixtral-tiny", "shm"),
                                           std::make_tuple("deepseekv3-tiny", "shm"), std::make_tuple("qwen3moe-tiny", "ucx")),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + "_" + std::get<1>(info.param);
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(EpFailover, TwoRanksKilledOneAfterTheOther) {
  auto run = Generate("qwen3moe-tiny", Options(4), [](ep::EpEngine& e, int step) {
    if (step == 10) Signal(e, 2, SIGKILL);
    if (step == 25) Signal(e, 0, SIGKILL);
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 2u);
  EXPECT_EQ(f[0]->dead_ranks, std::vector<int>{2});
  EXPECT_EQ(f[1]->dead_ranks, std::vector<int>{0});
  EXPECT_EQ(f[1]->members, (std::vector<int>{1, 3}));
}

TEST(EpFailover, LastSurvivingRankServesAlone) {
  auto run = Generate("mixtral-tiny", Options(3), [](ep::EpEngine& e, int step) {
    if (step == 8) Signal(e, 0, SIGKILL);
    if (step == 20) Signal(e, 2, SIGKILL);
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "mixtral-tiny");
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 2u);
  EXPECT_EQ(f[1]->members, std::vector<int>{1});
}

TEST(EpFailover, RankKilledDuringEplbWeightExchange) {
  auto o = Options(4);
  o.eplb_interval = 4;
  o.num_redundant_experts = 4;
  // Rank 1 dies inside the first EPLB exchange after its 6th step (the one at step 8).
  o.inject_fault = "rank=1,after-steps=6,mode=kill,at=eplb";
  auto run = Generate("qwen3moe-tiny", o);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0]->dead_ranks, std::vector<int>{1});
}

TEST(EpFailover, HungRankIsDetectedFencedAndItsWakeUpHarmless) {
  int hung_pid = 0;
  auto o = Options(4);
  o.peer_timeout_ms = 1000;
  const auto t0 = std::chrono::steady_clock::now();
  auto run = Generate("qwen3moe-tiny", o, [&](ep::EpEngine& e, int step) {
    if (step == 10) {
      hung_pid = PidOf(e, 3);
      Signal(e, 3, SIGSTOP);  // alive but silent, like a wedged GPU
    }
    if (step == 14 && hung_pid > 0) kill(hung_pid, SIGCONT);  // the late wake-up
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0]->dead_ranks, std::vector<int>{3});
  EXPECT_LT(f[0]->detect_seconds, 5.0);
  // Fenced: the process is gone (killed and reaped), so waking it changes nothing.
  EXPECT_EQ(kill(hung_pid, 0), -1);
  EXPECT_EQ(errno, ESRCH);
  EXPECT_EQ(StateOf(run->cluster, 3), "dead");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 60.0);
}

TEST(EpFailover, SlowRankIsRetriedNotDeclaredDead) {
  auto o = Options(4);
  o.peer_timeout_ms = 500;
  o.inject_fault = "rank=1,after-steps=5,mode=slow";  // sleeps 3 × the peer timeout once
  auto run = Generate("qwen3moe-tiny", o);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto f = Failovers(run->cluster);
  ASSERT_GE(f.size(), 1u);
  for (const auto* e : f) EXPECT_TRUE(e->dead_ranks.empty());
  EXPECT_EQ(f.back()->members, (std::vector<int>{0, 1, 2, 3}));
}

class WithBackup : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = testing::StartManager(test::ModelDir("qwen3moe-tiny"), 0, 1, "shm");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    manager_ = std::move(*m);
  }
  testing::ManagerProcess manager_;
};

TEST_F(WithBackup, OrphanedExpertsComeFromTheDramBackup) {
  auto o = Options(4);
  o.backup_endpoints = {manager_.endpoint};
  auto run = Generate("qwen3moe-tiny", o, [](ep::EpEngine& e, int step) {
    if (step == 12) Signal(e, 2, SIGKILL);
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  EXPECT_TRUE(run->cluster.backup_ready);
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_GT(f[0]->experts_from_backup, 0);
  EXPECT_EQ(f[0]->experts_from_disk, 0);
  EXPECT_GT(f[0]->bytes_from_backup, 0);
}

TEST_F(WithBackup, BackupManagerKilledThenRankFallsBackToDisk) {
  auto o = Options(4);
  o.backup_endpoints = {manager_.endpoint};
  auto run = Generate("qwen3moe-tiny", o, [&](ep::EpEngine& e, int step) {
    if (step == 5) {
      manager_.process->Signal(SIGKILL);
      ASSERT_TRUE(manager_.process->Wait(10000).ok());
    }
    if (step == 12) Signal(e, 2, SIGKILL);
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto f = Failovers(run->cluster);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_GT(f[0]->experts_from_disk, 0);
  EXPECT_EQ(f[0]->experts_from_backup, 0);
  EXPECT_EQ(run->cluster.health, "ok");
}

TEST(EpFailover, TooFewSlotsIsAClearErrorNotWrongOutput) {
  auto o = Options(4);
  o.expert_slot_headroom = 0;  // no spare slot and no redundancy: a lost rank cannot be absorbed
  o.worker_binary = EEP_BIN;
  o.log_level = "error";
  auto engine = ep::EpEngine::Start(test::ModelDir("qwen3moe-tiny"), o);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  ep::SeqInput in;
  in.seq_id = 1;
  in.new_ids = {1, 2, 3};
  ASSERT_TRUE((*engine)->Step({in}).ok());
  Signal(**engine, 1, SIGKILL);
  in.new_ids = {4};
  auto r = (*engine)->Step({in});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().ToString();
  EXPECT_NE(r.status().message().find("--expert-slot-headroom"), std::string::npos) << r.status().ToString();
  EXPECT_NE((*engine)->Cluster().health.find("expert slots"), std::string::npos);
  // And it stays refused rather than serving with missing experts.
  EXPECT_FALSE((*engine)->Step({in}).ok());
}

}  // namespace
}  // namespace eep
