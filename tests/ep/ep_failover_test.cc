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

#include "ep/ep.h"
#include "../backup/process_util.h"
#include "ep_run_util.h"
#include "test_util.h"

namespace eep {
namespace {

using namespace eptest;  // NOLINT: the helpers of these tests

std::vector<const ep::MembershipEvent*> Failovers(const ep::ClusterInfo& c) { return EventsOf(c, "failover"); }

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

TEST(EpFailover, SlowRankIsWaitedForNotDeclaredDead) {
  // A slow rank (a long prefill, a GC pause) is silent in the exchange but keeps its heartbeats:
  // peers report it, the coordinator confirms it is alive, and everyone waits.
  auto o = Options(4);
  o.peer_timeout_ms = 300;
  o.inject_fault = "rank=1,after-steps=5,mode=slow";  // sleeps 3 × the peer timeout once
  auto run = Generate("qwen3moe-tiny", o);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  EXPECT_TRUE(run->cluster.events.empty());
  EXPECT_EQ(StateOf(run->cluster, 1), "alive");
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
