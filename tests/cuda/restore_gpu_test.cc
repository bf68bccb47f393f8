// Restore into GPU memory: an `eep backup-manager --pin-memory` child process (shm) holds a
// golden tiny model's experts; device slots of a CudaModel are zeroed, then
// CudaModel::RestoreExperts refills them through the pinned staging buffer and the side
// stream. Checked against independent references: every restored slot byte for byte against
// the checkpoint's tensors (read through Checkpoint), for the staged and the direct path, and the logits of a golden prompt
// against the CPU reference backend (2e-2 × max(1, max|ref|), the CUDA golden bound) and
// against the same GPU model before its slots were zeroed. Skips (GTEST_SKIP) without a GPU.
#include <gtest/gtest.h>

#include <cstring>

#include "../backup/process_util.h"
#include "backup/backup.h"
#include "cuda/cuda_model.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "gpu_test_util.h"
#include "test_util.h"

namespace eep {
namespace {

#define REQUIRE_GPU() EEP_REQUIRE_GPU("restore")

std::vector<float> CpuLogits(const std::string& dir, const std::vector<int64_t>& ids) {
  auto m = Model::Load(dir, {.load_experts = true, .show_progress = false});
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  if (!m.ok()) return {};
  auto cache = (*m)->NewCache();
  std::vector<float> logits;
  SeqStep step{cache.get(), ids, true, &logits};
  Status s = (*m)->Forward(std::span<SeqStep>(&step, 1));
  EXPECT_TRUE(s.ok()) << s.ToString();
  return logits;
}

std::vector<float> GpuLogits(cuda::CudaModel& m, const std::vector<int64_t>& ids) {
  auto cache = m.NewCache();
  std::vector<float> logits;
  cuda::CudaSeqStep step{cache.get(), ids, true, &logits};
  Status s = m.Forward(std::span<cuda::CudaSeqStep>(&step, 1));
  EXPECT_TRUE(s.ok()) << s.ToString();
  return logits;
}

// The checkpoint's bytes of an expert as a slot holds them: [gate | up | down] BF16.
std::vector<uint16_t> CheckpointSlot(const Checkpoint& ckpt, const ModelConfig& c, int64_t layer, int64_t expert) {
  std::vector<uint16_t> out;
  for (const auto& name : c.ExpertTensorNames(layer, expert)) {
    const TensorInfo* t = ckpt.Find(name);
    EXPECT_NE(t, nullptr) << name;
    if (t == nullptr) return {};
    EXPECT_EQ(t->dtype, DType::kBF16) << name;
    const auto* p = reinterpret_cast<const uint16_t*>(t->data);
    out.insert(out.end(), p, p + t->numel());
  }
  return out;
}

class CudaRestoreTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRestoreTest, RestoredSlotsMatchCheckpointAndLogitsMatchCpu) {
  REQUIRE_GPU();
  const std::string dir = test::ModelDir(GetParam());
  auto prompts = test::LoadGoldenPrompts(GetParam());
  ASSERT_GE(prompts.size(), 2u);
  const std::vector<int64_t> ids = prompts[1].ids;  // prompt 0 of qwen3moe-tiny has a router near-tie

  auto manager = testing::StartManager(dir, 0, 1, "shm", {"--pin-memory"});
  ASSERT_TRUE(manager.ok()) << manager.status().ToString();
  EXPECT_TRUE(manager->process->WaitForStderr("registered with CUDA", 5000)) << manager->process->Stderr();
  backup::BackupClientOptions o;
  o.endpoints = {manager->endpoint};
  o.timeout_ms = 30000;
  backup::ExpertBackupClient client(o);
  ASSERT_TRUE(client.Connect().ok()) << client.Health();

  auto model = cuda::CudaModel::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  cuda::CudaModel& m = **model;
  const ModelConfig& c = m.config();
  const std::vector<float> cpu = CpuLogits(dir, ids);
  const std::vector<float> before = GpuLogits(m, ids);
  ASSERT_FALSE(cpu.empty());
  EXPECT_LE(test::CompareMax(before, cpu).rel, 2e-2);

  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  const ExpertMap& map = m.expert_map();
  // Both paths: staged (a staging buffer of two experts, so one expert per half and every
  // chunk alternates halves), then direct (DMA out of the registered shm mapping).
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct" : "staged");
    // Zero every slot of MoE layer 0 and every third slot of the others; the logits must move.
    std::vector<cuda::CudaModel::SlotRestore> todo;
    for (int64_t ml = 0; ml < map.num_moe_layers(); ++ml)
      for (int64_t slot = 0; slot < map.num_physical(); ++slot)
        if (ml == 0 || slot % 3 == 1) {
          ASSERT_TRUE(m.ClearSlot(ml, slot).ok());
          todo.push_back({ml, slot, map.LogicalAt(ml, slot)});
        }
    const std::vector<float> zeroed = GpuLogits(m, ids);
    EXPECT_GT(test::CompareMax(zeroed, cpu).rel, 2e-2) << "zeroing expert slots did not change the logits";

    m.set_restore_direct(direct);
    m.set_restore_staging_bytes(static_cast<uint64_t>(2 * m.slot_bytes()));
    cuda::CudaModel::RestoreStats stats;
    Status s = m.RestoreExperts(client, todo, &stats);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(stats.direct, direct);
    EXPECT_EQ(stats.bytes, todo.size() * static_cast<uint64_t>(m.slot_bytes()));
    for (const auto& r : todo) {
      std::vector<uint16_t> got;
      ASSERT_TRUE(m.ReadSlot(r.moe_layer, r.slot, &got).ok());
      const auto want = CheckpointSlot(**ckpt, c, m.MoeLayerId(r.moe_layer), r.logical_expert);
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 2), 0)
          << "MoE layer " << r.moe_layer << " slot " << r.slot << " expert " << r.logical_expert;
    }
    const std::vector<float> after = GpuLogits(m, ids);
    EXPECT_LE(test::CompareMax(after, cpu).rel, 2e-2);
    EXPECT_LE(test::CompareMax(after, before).rel, 1e-6);
  }

  // Larger staging (all of a layer in one chunk), and one expert into two slots at once:
  // slot 0 of MoE layer 0 takes the expert of slot 1 (then back, so the model stays intact).
  m.set_restore_direct(false);
  m.set_restore_staging_bytes(64ull << 20);
  const int64_t e1 = map.LogicalAt(0, 1);
  std::vector<cuda::CudaModel::SlotRestore> dup = {{0, 0, e1}, {0, 1, e1}};
  ASSERT_TRUE(m.RestoreExperts(client, dup).ok());
  std::vector<uint16_t> s0, s1;
  ASSERT_TRUE(m.ReadSlot(0, 0, &s0).ok());
  ASSERT_TRUE(m.ReadSlot(0, 1, &s1).ok());
  EXPECT_TRUE(s0 == s1 && s0 == CheckpointSlot(**ckpt, c, m.MoeLayerId(0), e1));
  std::vector<cuda::CudaModel::SlotRestore> back = {{0, 0, map.LogicalAt(0, 0)}};
  ASSERT_TRUE(m.RestoreExperts(client, back).ok());
  EXPECT_LE(test::CompareMax(GpuLogits(m, ids), before).rel, 1e-6);

  // An expert no manager holds is an error naming it, and leaves the model usable.
  std::vector<cuda::CudaModel::SlotRestore> bad = {{0, 0, c.num_experts}};
  EXPECT_EQ(m.RestoreExperts(client, bad).code(), StatusCode::kOutOfRange);
}

TEST(CudaRestore, GreedyTokenOnDeviceMatchesHostArgmax) {
  REQUIRE_GPU();
  const std::string dir = test::ModelDir("qwen3moe-tiny");
  auto model = cuda::CudaModel::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto prompts = test::LoadGoldenPrompts("qwen3moe-tiny");
  ASSERT_GE(prompts.size(), 3u);
  // Two sequences batched: one wants all logits and the greedy token, one only the token.
  auto c1 = (*model)->NewCache(), c2 = (*model)->NewCache();
  std::vector<float> l1;
  int64_t g1 = -1, g2 = -1;
  std::vector<cuda::CudaSeqStep> batch = {{c1.get(), prompts[1].ids, true, &l1, &g1},
                                          {c2.get(), prompts[2].ids, false, nullptr, &g2}};
  ASSERT_TRUE((*model)->Forward(batch).ok());
  const int64_t V = (*model)->config().vocab_size;
  const int64_t T = static_cast<int64_t>(prompts[1].ids.size());
  ASSERT_EQ(static_cast<int64_t>(l1.size()), T * V);
  EXPECT_EQ(g1, std::max_element(l1.end() - V, l1.end()) - (l1.end() - V));
  auto c3 = (*model)->NewCache();
  std::vector<float> l2;
  cuda::CudaSeqStep alone{c3.get(), prompts[2].ids, false, &l2};
  ASSERT_TRUE((*model)->Forward(std::span<cuda::CudaSeqStep>(&alone, 1)).ok());
  EXPECT_EQ(g2, std::max_element(l2.begin(), l2.end()) - l2.begin());
}

INSTANTIATE_TEST_SUITE_P(Models, CudaRestoreTest, ::testing::Values("qwen3moe-tiny", "deepseekv3-tiny"));

}  // namespace
}  // namespace eep
