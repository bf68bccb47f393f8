// Fault-aware planning: property tests over random cases with 1..num_gpus/2 failed GPUs.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "eplb/eplb.h"
#include "eplb_test_util.h"

namespace eep::eplb {
namespace {

struct RandomCase {
  LoadMatrix weight;
  Topology topo;
};

RandomCase MakeCase(std::mt19937& rng) {
  static const int32_t kExperts[] = {8, 12, 16, 24, 32, 64};
  std::uniform_int_distribution<int> pick(0, 5);
  RandomCase c;
  const int32_t E = kExperts[pick(rng)];
  // num_groups: a divisor of E.
  std::vector<int32_t> divisors;
  for (int32_t d = 1; d <= E; ++d) {
    if (E % d == 0) divisors.push_back(d);
  }
  c.topo.num_groups = divisors[std::uniform_int_distribution<size_t>(0, divisors.size() - 1)(rng)];
  c.topo.num_nodes = std::uniform_int_distribution<int32_t>(1, 4)(rng);
  const int32_t gpus_per_node = std::uniform_int_distribution<int32_t>(1, 4)(rng);
  c.topo.num_gpus = c.topo.num_nodes * gpus_per_node;
  const int32_t min_per_gpu = (E + c.topo.num_gpus - 1) / c.topo.num_gpus;
  const int32_t per_gpu =
      min_per_gpu + std::uniform_int_distribution<int32_t>(0, min_per_gpu + 2)(rng);
  c.topo.num_replicas = per_gpu * c.topo.num_gpus;
  const int32_t L = std::uniform_int_distribution<int32_t>(1, 4)(rng);
  std::vector<std::vector<double>> rows(L, std::vector<double>(E));
  std::lognormal_distribution<double> load(5.0, 1.0);
  for (auto& row : rows) {
    for (double& v : row) v = std::round(load(rng) * 16) / 16;  // some exact ties too
  }
  c.weight = LoadMatrix::FromRows(rows).value();
  const int32_t max_failed = std::max(1, c.topo.num_gpus / 2);
  const int32_t failed = std::uniform_int_distribution<int32_t>(1, max_failed)(rng);
  std::vector<int32_t> gpus(c.topo.num_gpus);
  std::iota(gpus.begin(), gpus.end(), 0);
  std::shuffle(gpus.begin(), gpus.end(), rng);
  c.topo.failed_gpus.assign(gpus.begin(), gpus.begin() + failed);
  return c;
}

// Checks every fault-aware constraint with code independent of the planner; returns the
// balancedness recomputed here.
double CheckPlan(const RandomCase& c, const Placement& p) {
  const int32_t L = c.weight.num_layers, E = c.weight.num_experts, R = c.topo.num_replicas;
  const int32_t per_gpu = R / c.topo.num_gpus;
  const std::set<int32_t> failed(c.topo.failed_gpus.begin(), c.topo.failed_gpus.end());
  const int32_t live = c.topo.num_gpus - static_cast<int32_t>(failed.size());
  EXPECT_EQ(p.phy2log.size(), static_cast<size_t>(L) * R);
  double sum_b = 0;
  for (int32_t l = 0; l < L; ++l) {
    std::vector<int32_t> cnt(E, 0);
    for (int32_t s = 0; s < R; ++s) {
      const int32_t e = p.slot(l, s);
      if (failed.count(s / per_gpu)) {
        EXPECT_EQ(e, -1) << "slot " << s << " on failed GPU " << s / per_gpu;
      } else {
        EXPECT_GE(e, 0) << "live slot " << s << " left empty";
        EXPECT_LT(e, E);
        if (e >= 0 && e < E) ++cnt[e];
      }
    }
    for (int32_t e = 0; e < E; ++e) {
      EXPECT_GE(cnt[e], 1) << "layer " << l << " expert " << e << " has no live replica";
      EXPECT_EQ(p.count(l, e), cnt[e]);
      // log2phy lists exactly the live slots of e.
      std::vector<int32_t> listed;
      for (int32_t r = 0; r < p.max_replicas; ++r) {
        const int32_t s = p.log2phy[(static_cast<size_t>(l) * E + e) * p.max_replicas + r];
        if (r < cnt[e]) {
          EXPECT_GE(s, 0);
          if (s >= 0) {
            EXPECT_EQ(p.slot(l, s), e);
            listed.push_back(s);
          }
        } else {
          EXPECT_EQ(s, -1);
        }
      }
      EXPECT_EQ(std::set<int32_t>(listed.begin(), listed.end()).size(), listed.size());
    }
    double total = 0, max = 0;
    for (int32_t g = 0; g < c.topo.num_gpus; ++g) {
      if (failed.count(g)) continue;
      double load = 0;
      for (int32_t k = 0; k < per_gpu; ++k) {
        const int32_t e = p.slot(l, g * per_gpu + k);
        if (e >= 0) load += static_cast<double>(c.weight.at(l, e)) / cnt[e];
      }
      total += load;
      max = std::max(max, load);
    }
    sum_b += max > 0 ? total / live / max : 1.0;
  }
  return sum_b / L;
}

TEST(EplbFault, RandomCasesKeepConstraints) {
  std::mt19937 rng(20240611);
  int planned = 0, refused = 0;
  for (int i = 0; i < 400; ++i) {
    const RandomCase c = MakeCase(rng);
    SCOPED_TRACE(::testing::Message()
                 << "case " << i << ": E=" << c.weight.num_experts << " R=" << c.topo.num_replicas
                 << " G=" << c.topo.num_groups << " N=" << c.topo.num_nodes
                 << " P=" << c.topo.num_gpus << " failed=" << c.topo.failed_gpus.size());
    const int32_t per_gpu = c.topo.num_replicas / c.topo.num_gpus;
    const int32_t live_slots =
        (c.topo.num_gpus - static_cast<int32_t>(c.topo.failed_gpus.size())) * per_gpu;
    auto plan = RebalanceExperts(c.weight, c.topo);
    if (live_slots < c.weight.num_experts) {
      ASSERT_FALSE(plan.ok());
      EXPECT_EQ(plan.status().code(), StatusCode::kResourceExhausted);
      EXPECT_NE(plan.status().message().find(std::to_string(c.weight.num_experts - live_slots) +
                                             " slots missing"),
                std::string::npos)
          << plan.status().message();
      ++refused;
      continue;
    }
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    const double mine = CheckPlan(c, *plan);
    auto b = Balancedness(c.weight, c.topo, *plan);
    ASSERT_TRUE(b.ok());
    EXPECT_NEAR(*b, mine, 1e-12);
    EXPECT_GT(*b, 0.0);
    EXPECT_LE(*b, 1.0 + 1e-12);
    ++planned;
  }
  EXPECT_GT(planned, 150);
  EXPECT_GT(refused, 0);
}

// Losing whole nodes: the live part is planned exactly like the reference plans a cluster of
// the surviving nodes (compared against the planner on that smaller, failure-free topology,
// which the golden tests pin to the reference).
TEST(EplbFault, WholeNodeFailureEqualsSmallerCluster) {
  for (const auto& g : testing::LoadGolden("eplb_small.json")) {
    if (g.topo.num_nodes < 2 || g.topo.num_groups % g.topo.num_nodes != 0) continue;
    SCOPED_TRACE(g.name);
    const int32_t gpn = g.topo.num_gpus / g.topo.num_nodes;
    const int32_t per_gpu = g.topo.num_replicas / g.topo.num_gpus;
    Topology topo = g.topo;
    for (int32_t k = 0; k < gpn; ++k) topo.failed_gpus.push_back(k);  // node 0 is down
    Topology smaller = g.topo;
    smaller.num_nodes = g.topo.num_nodes - 1;
    smaller.num_gpus = g.topo.num_gpus - gpn;
    smaller.num_replicas = smaller.num_gpus * per_gpu;
    if (smaller.num_replicas < g.weight.num_experts || g.topo.num_groups % smaller.num_nodes) {
      continue;
    }
    auto plan = RebalanceExperts(g.weight, topo);
    auto want = RebalanceExperts(g.weight, smaller);
    ASSERT_TRUE(plan.ok()) << plan.status().ToString();
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    const int32_t offset = gpn * per_gpu;
    for (int32_t l = 0; l < g.weight.num_layers; ++l) {
      for (int32_t s = 0; s < offset; ++s) EXPECT_EQ(plan->slot(l, s), -1);
      for (int32_t s = 0; s < smaller.num_replicas; ++s) {
        EXPECT_EQ(plan->slot(l, offset + s), want->slot(l, s)) << "layer " << l << " slot " << s;
      }
    }
    EXPECT_EQ(plan->logcnt, want->logcnt);
  }
}

TEST(EplbFault, NotEnoughLiveSlotsSaysHowManyAreMissing) {
  auto w = LoadMatrix::FromRows({std::vector<double>(16, 1.0)}).value();
  Topology topo;
  topo.num_replicas = 16;
  topo.num_groups = 4;
  topo.num_nodes = 2;
  topo.num_gpus = 8;
  topo.failed_gpus = {3, 5};
  auto plan = RebalanceExperts(w, topo);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(plan.status().message().find("4 slots missing"), std::string::npos)
      << plan.status().message();
}

TEST(EplbFault, FailedGpuOutOfRangeIsRejected) {
  auto w = LoadMatrix::FromRows({std::vector<double>(8, 1.0)}).value();
  Topology topo;
  topo.num_replicas = 8;
  topo.num_gpus = 4;
  topo.failed_gpus = {4};
  auto plan = RebalanceExperts(w, topo);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.status().message().find("failed_gpus"), std::string::npos);
}

// Min-move after a failure: start from the plan of the healthy cluster, lose GPUs, and move as
// little as possible while every expert stays live and the tolerance holds.
TEST(EplbFault, MinMoveAfterFailureKeepsConstraints) {
  std::mt19937 rng(7);
  int checked = 0;
  for (int i = 0; i < 150; ++i) {
    RandomCase c = MakeCase(rng);
    Topology healthy = c.topo;
    healthy.failed_gpus.clear();
    auto before = RebalanceExperts(c.weight, healthy);
    ASSERT_TRUE(before.ok());
    auto r = RebalanceMinMove(c.weight, c.topo, before->phy2log);
    const int32_t per_gpu = c.topo.num_replicas / c.topo.num_gpus;
    const int32_t live_slots =
        (c.topo.num_gpus - static_cast<int32_t>(c.topo.failed_gpus.size())) * per_gpu;
    if (live_slots < c.weight.num_experts) {
      EXPECT_FALSE(r.ok());
      continue;
    }
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    SCOPED_TRACE(::testing::Message() << "case " << i);
    const double mine = CheckPlan(c, r->plan);
    EXPECT_NEAR(r->balancedness, mine, 1e-12);
    EXPECT_GE(r->balancedness, r->fresh_balancedness * (1 - 0.01) - 1e-12);
    EXPECT_LE(r->moved_experts, r->fresh_moved_experts);
    EXPECT_EQ(r->moved_experts, CountMovedExperts(before->phy2log, r->plan.phy2log));
    ++checked;
  }
  EXPECT_GT(checked, 50);
}

}  // namespace
}  // namespace eep::eplb
