// The planner against DeepSeek's reference outputs (tests/data/eplb/*.json): identical
// phy2log, log2phy and logcnt on every case, and the reference's balancedness.
#include <gtest/gtest.h>

#include "eplb/eplb.h"
#include "eplb_test_util.h"

namespace eep::eplb {
namespace {

using testing::GoldenCase;
using testing::LoadGolden;

void ExpectMatchesGolden(const GoldenCase& g) {
  SCOPED_TRACE(g.name);
  auto plan = RebalanceExperts(g.weight, g.topo);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  const int32_t R = g.topo.num_replicas, E = g.weight.num_experts;
  ASSERT_EQ(plan->phy2log.size(), g.phy2log.size());
  for (int32_t l = 0; l < g.weight.num_layers; ++l) {
    for (int32_t s = 0; s < R; ++s) {
      ASSERT_EQ(plan->slot(l, s), g.phy2log[static_cast<size_t>(l) * R + s])
          << "phy2log[" << l << "][" << s << "]";
    }
  }
  EXPECT_EQ(plan->logcnt, g.logcnt);
  EXPECT_EQ(plan->max_replicas, g.max_cnt);
  ASSERT_EQ(plan->log2phy.size(), g.log2phy.size());
  for (size_t i = 0; i < g.log2phy.size(); ++i) {
    ASSERT_EQ(plan->log2phy[i], g.log2phy[i])
        << "log2phy[" << i / (static_cast<size_t>(E) * g.max_cnt) << "][" << (i / g.max_cnt) % E
        << "][" << i % g.max_cnt << "]";
  }
  auto b = Balancedness(g.weight, g.topo, *plan);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_NEAR(*b, g.balancedness, 1e-12);
}

TEST(EplbGolden, SmallCasesMatchReference) {
  const auto cases = LoadGolden("eplb_small.json");
  ASSERT_GE(cases.size(), 5u);
  for (const auto& g : cases) ExpectMatchesGolden(g);
}

TEST(EplbGolden, LargeCasesMatchReference) {
  const auto cases = LoadGolden("eplb_large.json");
  ASSERT_GE(cases.size(), 3u);
  for (const auto& g : cases) ExpectMatchesGolden(g);
}

// The golden plans themselves, rebuilt from phy2log alone, give the reference balancedness:
// checks Balancedness() independently of the planner.
TEST(EplbGolden, BalancednessOfReferencePlans) {
  for (const char* file : {"eplb_small.json", "eplb_large.json"}) {
    for (const auto& g : LoadGolden(file)) {
      auto p = PlacementFromPhy2Log(g.weight.num_layers, g.weight.num_experts, g.topo.num_replicas,
                                    g.phy2log);
      ASSERT_TRUE(p.ok()) << p.status().ToString();
      EXPECT_EQ(p->logcnt, g.logcnt) << g.name;
      auto b = Balancedness(g.weight, g.topo, *p);
      ASSERT_TRUE(b.ok());
      EXPECT_NEAR(*b, g.balancedness, 1e-12) << g.name;
    }
  }
}

TEST(EplbGolden, PlanIsAPermutationOfSlots) {
  for (const auto& g : LoadGolden("eplb_small.json")) {
    auto plan = RebalanceExperts(g.weight, g.topo);
    ASSERT_TRUE(plan.ok());
    const int32_t E = g.weight.num_experts, R = g.topo.num_replicas, M = plan->max_replicas;
    for (int32_t l = 0; l < g.weight.num_layers; ++l) {
      int32_t total = 0;
      for (int32_t e = 0; e < E; ++e) {
        const int32_t c = plan->count(l, e);
        EXPECT_GE(c, 1);
        total += c;
        for (int32_t r = 0; r < M; ++r) {
          const int32_t s = plan->log2phy[(static_cast<size_t>(l) * E + e) * M + r];
          if (r < c) {
            ASSERT_GE(s, 0);
            EXPECT_EQ(plan->slot(l, s), e);
          } else {
            EXPECT_EQ(s, -1);
          }
        }
      }
      EXPECT_EQ(total, R);
    }
  }
}

}  // namespace
}  // namespace eep::eplb
