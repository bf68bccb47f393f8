// LoadRecorder: window sums, dropped ids, and no lost counts under concurrent recording.
#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <thread>

#include "eplb/eplb.h"

namespace eep::eplb {
namespace {

std::unique_ptr<LoadRecorder> Make(int32_t layers, int32_t experts, int32_t window) {
  auto r = LoadRecorder::Create(layers, experts, window);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

TEST(EplbRecorder, CountsOneStep) {
  auto rec = Make(2, 4, 3);
  const int32_t ids0[] = {0, 1, 1, 3};
  const int32_t ids1[] = {2, 2, 2};
  rec->Record(0, ids0);
  rec->Record(1, ids1);
  // The open step is not in the window yet.
  EXPECT_EQ(rec->SnapshotCounts(), std::vector<int64_t>(8, 0));
  rec->AdvanceStep();
  EXPECT_EQ(rec->SnapshotCounts(), (std::vector<int64_t>{1, 2, 0, 1, 0, 0, 3, 0}));
  const LoadMatrix m = rec->Snapshot();
  EXPECT_EQ(m.num_layers, 2);
  EXPECT_EQ(m.num_experts, 4);
  EXPECT_EQ(m.at(1, 2), 3.0f);
  EXPECT_EQ(rec->steps(), 1);
}

TEST(EplbRecorder, WindowSlides) {
  auto rec = Make(1, 2, 3);
  // Step k records k tokens for expert 0 and one for expert 1.
  for (int k = 1; k <= 6; ++k) {
    std::vector<int32_t> ids(k, 0);
    ids.push_back(1);
    rec->Record(0, ids);
    rec->AdvanceStep();
    const int first = std::max(1, k - 2);
    int64_t want0 = 0;
    for (int j = first; j <= k; ++j) want0 += j;
    EXPECT_EQ(rec->SnapshotCounts(), (std::vector<int64_t>{want0, k - first + 1})) << "step " << k;
  }
}

TEST(EplbRecorder, DropsInvalidIdsAndLayers) {
  auto rec = Make(2, 4, 2);
  const int32_t ids[] = {-1, 0, 4, 3, 100};
  rec->Record(0, ids);
  rec->Record(5, ids);
  rec->Record(-1, ids);
  rec->AdvanceStep();
  EXPECT_EQ(rec->SnapshotCounts(), (std::vector<int64_t>{1, 0, 0, 1, 0, 0, 0, 0}));
  EXPECT_EQ(rec->dropped(), 3 + 5 + 5);
}

TEST(EplbRecorder, RecordCountsAddsHistograms) {
  auto rec = Make(1, 3, 4);
  const int64_t h[] = {5, 0, 7};
  rec->RecordCounts(0, h);
  rec->RecordCounts(0, h);
  rec->AdvanceStep();
  EXPECT_EQ(rec->SnapshotCounts(), (std::vector<int64_t>{10, 0, 14}));
  const int64_t wrong_size[] = {1, 2};
  rec->RecordCounts(0, wrong_size);
  EXPECT_EQ(rec->dropped(), 3);
}

TEST(EplbRecorder, CreateRejectsBadShapes) {
  EXPECT_FALSE(LoadRecorder::Create(0, 4, 1).ok());
  EXPECT_FALSE(LoadRecorder::Create(2, 0, 1).ok());
  auto r = LoadRecorder::Create(2, 4, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("window_steps"), std::string::npos);
}

// Many writers record while a driver advances steps; once writers stop and both live buffers
// have been drained, every token is in the window (it is larger than the number of steps).
TEST(EplbRecorder, ConcurrentRecordingLosesNothing) {
  constexpr int kThreads = 4, kBatches = 2000, kLayers = 3, kExperts = 16;
  auto rec = Make(kLayers, kExperts, 100000);
  std::atomic<bool> stop{false};
  std::atomic<int> steps{0};
  std::thread driver([&] {
    // Bounded so that no recorded step can leave the window.
    while (!stop.load() && steps.load() < 50000) {
      rec->AdvanceStep();
      (void)rec->SnapshotCounts();
      ++steps;
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      // Start once the driver runs, so that recording and advancing overlap even when the
      // scheduler of a loaded 2-core machine would run the writers first.
      while (steps.load() == 0) std::this_thread::yield();
      std::vector<int32_t> ids(8);
      for (int b = 0; b < kBatches; ++b) {
        for (int i = 0; i < 8; ++i) ids[i] = (t * 7 + b * 3 + i) % kExperts;
        rec->Record(b % kLayers, ids);
      }
    });
  }
  for (auto& w : writers) w.join();
  stop = true;
  driver.join();
  rec->AdvanceStep();
  rec->AdvanceStep();
  const std::vector<int64_t> counts = rec->SnapshotCounts();
  EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), int64_t{0}),
            int64_t{kThreads} * kBatches * 8);
  // Per-cell totals are deterministic too.
  std::vector<int64_t> want(kLayers * kExperts, 0);
  for (int t = 0; t < kThreads; ++t) {
    for (int b = 0; b < kBatches; ++b) {
      for (int i = 0; i < 8; ++i) ++want[(b % kLayers) * kExperts + (t * 7 + b * 3 + i) % kExperts];
    }
  }
  EXPECT_EQ(counts, want);
  EXPECT_GT(steps.load(), 0);
}

TEST(EplbRecorder, SnapshotFeedsThePlanner) {
  auto rec = Make(2, 8, 4);
  std::vector<int32_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back(i % 3 == 0 ? 0 : i % 8);
  rec->Record(0, ids);
  rec->Record(1, ids);
  rec->AdvanceStep();
  Topology topo;
  topo.num_replicas = 12;
  topo.num_groups = 2;
  topo.num_nodes = 2;
  topo.num_gpus = 4;
  auto plan = RebalanceExperts(rec->Snapshot(), topo);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  EXPECT_GE(plan->count(0, 0), 2);  // the hot expert is replicated
}

}  // namespace
}  // namespace eep::eplb
