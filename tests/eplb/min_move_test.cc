// Minimal-move mode on the golden cases: the old placement is the reference's plan for the
// recorded loads, the loads then drift by ±20% (fixed seed). The min-move plan must move at
// most half as many experts as the fresh plan and stay within 1% of its balancedness.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/logging.h"
#include "eplb/eplb.h"
#include "eplb_test_util.h"

namespace eep::eplb {
namespace {

using testing::GoldenCase;
using testing::LoadGolden;
using testing::Perturb;

// Balancedness and validity recomputed here, independent of the library.
double IndependentBalancedness(const LoadMatrix& w, const Topology& topo,
                               const std::vector<int32_t>& phy2log) {
  const int32_t L = w.num_layers, E = w.num_experts, R = topo.num_replicas;
  const int32_t per_gpu = R / topo.num_gpus;
  double sum = 0;
  for (int32_t l = 0; l < L; ++l) {
    std::vector<int32_t> cnt(E, 0);
    for (int32_t s = 0; s < R; ++s) {
      const int32_t e = phy2log[static_cast<size_t>(l) * R + s];
      if (e >= 0) ++cnt[e];
    }
    for (int32_t e = 0; e < E; ++e) EXPECT_GE(cnt[e], 1) << "layer " << l << " expert " << e;
    double total = 0, max = 0;
    for (int32_t g = 0; g < topo.num_gpus; ++g) {
      double load = 0;
      for (int32_t k = 0; k < per_gpu; ++k) {
        const int32_t e = phy2log[static_cast<size_t>(l) * R + g * per_gpu + k];
        if (e >= 0) load += static_cast<double>(w.at(l, e)) / cnt[e];
      }
      total += load;
      max = std::max(max, load);
    }
    sum += total / topo.num_gpus / max;
  }
  return sum / L;
}

int64_t Diff(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

void CheckMinMove(const GoldenCase& g, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << g.name << " seed " << seed);
  const LoadMatrix drifted = Perturb(g.weight, 0.2, seed);
  auto r = RebalanceMinMove(drifted, g.topo, g.phy2log);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const double bal = IndependentBalancedness(drifted, g.topo, r->plan.phy2log);
  const double fresh_bal = IndependentBalancedness(drifted, g.topo, r->fresh.phy2log);
  const int64_t moved = Diff(g.phy2log, r->plan.phy2log);
  const int64_t fresh_moved = Diff(g.phy2log, r->fresh.phy2log);
  EXPECT_NEAR(r->balancedness, bal, 1e-12);
  EXPECT_NEAR(r->fresh_balancedness, fresh_bal, 1e-12);
  EXPECT_EQ(r->moved_experts, moved);
  EXPECT_EQ(r->fresh_moved_experts, fresh_moved);
  EXPECT_GE(bal, fresh_bal * (1 - 0.01));
  EXPECT_LE(2 * moved, fresh_moved) << "moved " << moved << " vs fresh " << fresh_moved;
  EXPECT_GT(fresh_moved, 0);
  // The plan's own maps agree with each other.
  auto rebuilt = PlacementFromPhy2Log(r->plan.num_layers, r->plan.num_experts, r->plan.num_replicas,
                                      r->plan.phy2log);
  ASSERT_TRUE(rebuilt.ok());
  EXPECT_EQ(rebuilt->logcnt, r->plan.logcnt);
  EXPECT_EQ(rebuilt->log2phy, r->plan.log2phy);
  EEP_LOG_INFO("{} seed {}: moved {} (fresh {}), balancedness {:.4f} (fresh {:.4f})", g.name, seed,
               moved, fresh_moved, bal, fresh_bal);
}

TEST(EplbMinMove, SmallGoldenCasesWithDriftingLoads) {
  for (const auto& g : LoadGolden("eplb_small.json")) {
    for (uint32_t seed : {1u, 2u, 3u}) CheckMinMove(g, seed);
  }
}

TEST(EplbMinMove, LargeGoldenCasesWithDriftingLoads) {
  for (const auto& g : LoadGolden("eplb_large.json")) CheckMinMove(g, 1u);
}

TEST(EplbMinMove, UnchangedLoadsMoveNothing) {
  for (const auto& g : LoadGolden("eplb_small.json")) {
    auto r = RebalanceMinMove(g.weight, g.topo, g.phy2log);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->moved_experts, 0) << g.name;
    EXPECT_EQ(r->fresh_moved_experts, 0) << g.name;
    EXPECT_EQ(r->plan.phy2log, g.phy2log) << g.name;
  }
}

TEST(EplbMinMove, ZeroToleranceIsAtLeastAsBalancedAsFresh) {
  for (const auto& g : LoadGolden("eplb_small.json")) {
    const LoadMatrix drifted = Perturb(g.weight, 0.2, 11);
    auto r = RebalanceMinMove(drifted, g.topo, g.phy2log, MinMoveOptions{0.0});
    ASSERT_TRUE(r.ok());
    EXPECT_GE(r->balancedness, r->fresh_balancedness - 1e-12) << g.name;
    EXPECT_LE(r->moved_experts, r->fresh_moved_experts) << g.name;
  }
}

// An old placement with holes and missing experts (say, from a different model revision) is
// repaired: every expert gets a replica, and every live slot is used.
TEST(EplbMinMove, RepairsIncompleteOldPlacement) {
  const auto cases = LoadGolden("eplb_small.json");
  ASSERT_FALSE(cases.empty());
  const GoldenCase& g = cases[1];
  std::vector<int32_t> old = g.phy2log;
  const int32_t R = g.topo.num_replicas;
  for (int32_t l = 0; l < g.weight.num_layers; ++l) {
    old[static_cast<size_t>(l) * R] = -1;
    old[static_cast<size_t>(l) * R + 1] = -1;
    // expert 0 disappears: its slots take expert 1
    for (int32_t s = 0; s < R; ++s) {
      if (old[static_cast<size_t>(l) * R + s] == 0) old[static_cast<size_t>(l) * R + s] = 1;
    }
  }
  auto r = RebalanceMinMove(g.weight, g.topo, old);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  IndependentBalancedness(g.weight, g.topo, r->plan.phy2log);  // checks coverage
  for (int32_t v : r->plan.phy2log) EXPECT_GE(v, 0);
  EXPECT_GE(r->balancedness, r->fresh_balancedness * 0.99);
}

TEST(EplbMinMove, RejectsBadOldPlacement) {
  const auto cases = LoadGolden("eplb_small.json");
  ASSERT_FALSE(cases.empty());
  const GoldenCase& g = cases[0];
  std::vector<int32_t> old = g.phy2log;
  old.pop_back();
  auto r = RebalanceMinMove(g.weight, g.topo, old);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("old_phy2log"), std::string::npos);
  old = g.phy2log;
  old[3] = g.weight.num_experts;
  r = RebalanceMinMove(g.weight, g.topo, old);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("old_phy2log"), std::string::npos);
}

}  // namespace
}  // namespace eep::eplb
