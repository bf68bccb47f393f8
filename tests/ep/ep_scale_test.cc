// Elastic scaling of the EP engine ([serve] scaling, engine level): ranks join and leave while
// 16 sequences generate; outputs equal the run without scaling (whose golden prompts match
// HF's greedy tokens), and each switch is recorded with where the experts came from.
#include <gtest/gtest.h>
#include <signal.h>

#include "../backup/process_util.h"
#include "ep_run_util.h"
#include "test_util.h"

namespace eep {
namespace {

using namespace eptest;  // NOLINT: the helpers of these tests

std::vector<int> Serving(const ep::ClusterInfo& c) {
  std::vector<int> ids;
  for (const auto& r : c.ranks)
    if (r.state == "alive") ids.push_back(r.rank);
  return ids;
}

TEST(EpScale, TwoToFourToThreeToTwoUnderLoad) {
  size_t switched_at_step = 0;
  auto run = Generate("qwen3moe-tiny", Options(2), [&](ep::EpEngine& e, int step) {
    // Scale-up starts in the background: ranks 2 and 3 load while steps go on, and join at a
    // step boundary once ready.
    if (step == 4) {
      ASSERT_TRUE(e.Scale(4).ok());
    }
    if (step > 4 && switched_at_step == 0 && e.Cluster().events.size() == 1) switched_at_step = static_cast<size_t>(step);
    if (step == 24) {
      ASSERT_TRUE(e.Scale(4, /*wait=*/true).ok());  // (if it has not switched yet)
      ASSERT_EQ(Serving(e.Cluster()), (std::vector<int>{0, 1, 2, 3}));
      ASSERT_TRUE(e.Scale(3, /*wait=*/true).ok());
      ASSERT_EQ(Serving(e.Cluster()), (std::vector<int>{0, 1, 2}));
    }
    if (step == 36) {
      ASSERT_TRUE(e.Scale(2, /*wait=*/true).ok());
    }
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto& ev = run->cluster.events;
  ASSERT_EQ(ev.size(), 3u);
  EXPECT_EQ(ev[0].kind, "scale-up");
  EXPECT_EQ(ev[0].members, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_GT(ev[0].experts_from_peers + ev[0].experts_from_backup, 0) << "new ranks got experts";
  EXPECT_EQ(ev[0].experts_from_disk, 0) << "scale-up never reloads experts from disk";
  EXPECT_EQ(ev[1].kind, "scale-down");
  EXPECT_EQ(ev[1].members, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(ev[2].kind, "scale-down");
  EXPECT_EQ(ev[2].members, (std::vector<int>{0, 1}));
  EXPECT_EQ(StateOf(run->cluster, 3), "left");
  EXPECT_EQ(StateOf(run->cluster, 2), "left");
  EXPECT_EQ(run->cluster.epoch, 4);
}

TEST(EpScale, ScaleDownMovesTheLeavingRanksSequences) {
  auto run = Generate("deepseekv3-tiny", Options(4), [](ep::EpEngine& e, int step) {
    if (step == 20) {
      ASSERT_TRUE(e.Scale(2, /*wait=*/true).ok());
    }
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "deepseekv3-tiny");
  const auto& ev = run->cluster.events;
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].kind, "scale-down");
  EXPECT_EQ(ev[0].members, (std::vector<int>{0, 1}));
  EXPECT_EQ(ev[0].requeued_seqs, 8) << "ranks 2 and 3 held 8 of the 16 sequences";
  EXPECT_EQ(ev[0].experts_from_disk, 0);
}

// With a DRAM backup, the ranks that stay read the leaving ranks' experts in the background
// while steps go on; the switch then moves nothing between ranks.
TEST(EpScale, ScaleDownPrefetchesFromTheBackupWhileServing) {
  auto m = testing::StartManager(test::ModelDir("qwen3moe-tiny"), 0, 1, "shm");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto o = Options(4);
  o.backup_endpoints = {m->endpoint};
  int asked_at = -1, switched_at = -1;
  auto run = Generate("qwen3moe-tiny", o, [&](ep::EpEngine& e, int step) {
    if (step == 10) {
      ASSERT_TRUE(e.Scale(2).ok());  // not waiting: the steps go on
      asked_at = step;
    }
    if (asked_at >= 0 && switched_at < 0 && !e.Cluster().events.empty()) switched_at = step;
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "qwen3moe-tiny");
  const auto& ev = run->cluster.events;
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].kind, "scale-down");
  EXPECT_EQ(ev[0].members, (std::vector<int>{0, 1}));
  EXPECT_GT(switched_at, asked_at + 1) << "steps were served while the experts were prefetched";
  EXPECT_GT(ev[0].experts_from_backup, 0) << "the leaving ranks' experts came from the DRAM backup";
  EXPECT_EQ(ev[0].experts_from_peers, 0) << "nothing moved between ranks in the switch";
  EXPECT_EQ(ev[0].experts_from_disk, 0);
}

TEST(EpScale, DeadRankIsReplacedByScalingUp) {
  auto m = testing::StartManager(test::ModelDir("mixtral-tiny"), 0, 1, "shm");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto o = Options(4);
  o.backup_endpoints = {m->endpoint};
  o.eplb_source = "backup";
  auto run = Generate("mixtral-tiny", o, [](ep::EpEngine& e, int step) {
    if (step == 8) Signal(e, 1, SIGKILL);
    if (step == 20) {
      ASSERT_TRUE(e.Scale(4, /*wait=*/true).ok());
    }
  });
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  ExpectSameTokens(*run, "mixtral-tiny");
  const auto& ev = run->cluster.events;
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].kind, "failover");
  EXPECT_EQ(ev[1].kind, "scale-up");
  EXPECT_EQ(ev[1].members, (std::vector<int>{0, 2, 3, 4}));
  // With --eplb-source backup the new rank's experts come from the DRAM mirror.
  EXPECT_GT(ev[1].experts_from_backup, 0);
  EXPECT_EQ(ev[1].experts_from_disk, 0);
  EXPECT_EQ(StateOf(run->cluster, 1), "dead");
  EXPECT_EQ(StateOf(run->cluster, 4), "alive");
}

TEST(EpScale, BadSizesAreRefused) {
  auto o = Options(2);
  o.worker_binary = EEP_BIN;
  o.log_level = "error";
  auto e = ep::EpEngine::Start(test::ModelDir("qwen3moe-tiny"), o);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ((*e)->Scale(0).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE((*e)->Scale(3).ok());
  // Another target while one is in progress: refused, the first goes on.
  EXPECT_EQ((*e)->Scale(1).code(), StatusCode::kUnavailable);
  ASSERT_TRUE((*e)->Scale(3, true).ok());
  EXPECT_EQ(Serving((*e)->Cluster()).size(), 3u);
}

}  // namespace
}  // namespace eep
