// The CUDA backend against transformers' float64 references (tests/data/models/*/golden.*):
// logits of every golden prompt within 2e-2 × max(1, max|ref|), greedy tokens equal to
// golden wherever the golden min_top2_margin exceeds the observed logit error; KV-cached
// decode and batching against the CPU model; expert slots moved through an ExpertMap.
// Skips (GTEST_SKIP) without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <fmt/format.h>

#include "core/util.h"
#include "cuda/cuda_model.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace eep {
namespace {

#define REQUIRE_GPU()                                                                                  \
  do {                                                                                                 \
    if (!cuda::Available())                                                                            \
      GTEST_SKIP() << "no CUDA device (" << cuda::DeviceDescription() << "): GPU model test skipped"; \
  } while (0)

struct GoldenPrompt {
  std::vector<int64_t> ids, greedy;
  double min_margin = 0;
};

std::vector<GoldenPrompt> LoadPrompts(const std::string& model) {
  auto j = ReadJsonFile(test::ModelDir(model) + "/golden.json");
  EXPECT_TRUE(j.ok()) << j.status().ToString();
  std::vector<GoldenPrompt> out;
  for (const auto& p : (*j)["prompts"])
    out.push_back({p["ids"].get<std::vector<int64_t>>(), p["greedy"].get<std::vector<int64_t>>(),
                   p["min_top2_margin"].get<double>()});
  return out;
}

std::vector<float> ReadRef(const SafetensorsFile& f, const std::string& name) {
  auto it = f.tensors().find(name);
  EXPECT_NE(it, f.tensors().end()) << name;
  std::vector<float> v(static_cast<size_t>(it->second.numel()));
  EXPECT_TRUE(ConvertToF32(it->second.dtype, it->second.data, v.size(), v.data()).ok());
  return v;
}

struct Err {
  double abs = 0, rel = 0;  // max |a-b|, and that / max(1, max|ref|)
};
Err Compare(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double max_ref = 1, max_diff = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
  }
  return {max_diff, max_diff / max_ref};
}

class CudaGoldenTest : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(CudaGoldenTest, LogitsAndGreedyMatchTransformers) {
  REQUIRE_GPU();
  const auto [name, split] = GetParam();
  auto model = cuda::CudaModel::Load(test::ModelDir(name), {.split_activations = split});
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto ref = SafetensorsFile::Open(test::ModelDir(name) + "/golden.safetensors");
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  auto prompts = LoadPrompts(name);
  ASSERT_EQ(prompts.size(), 5u);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto cache = (*model)->NewCache();
    std::vector<float> logits;
    cuda::CudaSeqStep step{cache.get(), prompts[i].ids, true, &logits};
    ASSERT_TRUE((*model)->Forward(std::span<cuda::CudaSeqStep>(&step, 1)).ok());
    const Err e = Compare(logits, ReadRef(**ref, fmt::format("p{}.logits", i)));
    // Plain BF16 activations are reported only: they miss the bound on long prompts (RESULTS.md).
    if (split) {
      EXPECT_LT(e.rel, 2e-2) << name << " prompt " << i;
    }
    GenerateOptions g;
    g.max_new_tokens = static_cast<int64_t>(prompts[i].greedy.size());
    auto out = cuda::Generate(**model, prompts[i].ids, g);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    const bool check = prompts[i].min_margin > e.abs;
    fmt::print("{} ({}) prompt {}: {} tokens, logits abs err {:.3g}, rel err {:.3g}, margin {:.3g}, greedy {}\n", name,
               split ? "split bf16" : "bf16", i, prompts[i].ids.size(), e.abs, e.rel, prompts[i].min_margin,
               check ? (*out == prompts[i].greedy ? "equal" : "DIFFERENT") : "not checked (margin <= error)");
    if (check && split) {
      EXPECT_EQ(*out, prompts[i].greedy) << name << " prompt " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGoldenTest,
                         ::testing::Combine(::testing::Values("qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"),
                                            ::testing::Values(true, false)),
                         [](const auto& info) {
                           std::string n = std::get<0>(info.param) + (std::get<1>(info.param) ? "_split" : "_bf16");
                           for (auto& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// Prefill then KV-cached decode steps for two sequences batched together, against the CPU
// model doing the same: same logits within 2e-3 relative (both far from the golden bound).
class CudaDecodeTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaDecodeTest, BatchedDecodeMatchesCpu) {
  REQUIRE_GPU();
  const std::string name = GetParam();
  auto gpu = cuda::CudaModel::Load(test::ModelDir(name));
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  auto cpu = Model::Load(test::ModelDir(name));
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  auto prompts = LoadPrompts(name);
  auto gc0 = (*gpu)->NewCache(), gc1 = (*gpu)->NewCache();
  auto cc0 = (*cpu)->NewCache(), cc1 = (*cpu)->NewCache();
  std::vector<int64_t> in0 = prompts[0].ids, in1 = prompts[2].ids;
  double worst = 0;
  for (int step = 0; step < 6; ++step) {
    std::vector<float> g0, g1, c0, c1;
    cuda::CudaSeqStep gs[2] = {{gc0.get(), in0, false, &g0}, {gc1.get(), in1, false, &g1}};
    SeqStep cs[2] = {{cc0.get(), in0, false, &c0}, {cc1.get(), in1, false, &c1}};
    ASSERT_TRUE((*gpu)->Forward(gs).ok());
    ASSERT_TRUE((*cpu)->Forward(cs).ok());
    worst = std::max({worst, Compare(g0, c0).rel, Compare(g1, c1).rel});
    // Feed both the CPU's argmax so the sequences stay identical.
    in0.assign(1, std::max_element(c0.begin(), c0.end()) - c0.begin());
    in1.assign(1, std::max_element(c1.begin(), c1.end()) - c1.begin());
  }
  fmt::print("{}: batched decode, CUDA vs CPU logits rel err {:.3g}\n", name, worst);
  EXPECT_LT(worst, 2e-3);
  EXPECT_EQ(gc0->length(), static_cast<int64_t>(prompts[0].ids.size()) + 5);
}

// Experts live in device slots addressed through the ExpertMap: reversing the placement and
// refilling the slots must not change the logits.
TEST_P(CudaDecodeTest, ExpertSlotsFollowTheMap) {
  REQUIRE_GPU();
  const std::string name = GetParam();
  auto gpu = cuda::CudaModel::Load(test::ModelDir(name));
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  auto prompts = LoadPrompts(name);
  auto run = [&] {
    auto cache = (*gpu)->NewCache();
    std::vector<float> logits;
    cuda::CudaSeqStep step{cache.get(), prompts[1].ids, true, &logits};
    EXPECT_TRUE((*gpu)->Forward(std::span<cuda::CudaSeqStep>(&step, 1)).ok());
    return logits;
  };
  const auto before = run();
  const ModelConfig& c = (*gpu)->config();
  const ExpertMap& old = (*gpu)->expert_map();
  std::vector<std::vector<int32_t>> phy2log(static_cast<size_t>(old.num_moe_layers()));
  for (auto& row : phy2log)
    for (int64_t s = 0; s < old.num_physical(); ++s) row.push_back(static_cast<int32_t>(old.num_physical() - 1 - s));
  auto map = ExpertMap::FromPhy2Log(phy2log, c.num_experts);
  ASSERT_TRUE(map.ok());
  auto ckpt = Checkpoint::Open(test::ModelDir(name));
  ASSERT_TRUE(ckpt.ok());
  const auto layers = c.MoeLayers();
  for (int64_t ml = 0; ml < map->num_moe_layers(); ++ml)
    for (int64_t s = 0; s < map->num_physical(); ++s) {
      auto names = c.ExpertTensorNames(layers[static_cast<size_t>(ml)], map->LogicalAt(ml, s));
      const TensorInfo* t[3];
      for (int i = 0; i < 3; ++i) t[i] = (*ckpt)->Find(names[static_cast<size_t>(i)]);
      ASSERT_TRUE((*gpu)->SetSlot(ml, s, t[0]->dtype, t[0]->data, t[1]->data, t[2]->data).ok());
    }
  ASSERT_TRUE((*gpu)->SetExpertMap(*map).ok());
  const auto after = run();
  EXPECT_LT(Compare(after, before).rel, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaDecodeTest, ::testing::Values("qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (auto& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

TEST(CudaBackend, LoadWithoutGpuFailsClearly) {
  if (cuda::Available()) GTEST_SKIP() << "a GPU is present; this checks the message without one";
  auto m = cuda::CudaModel::Load(test::ModelDir("qwen3moe-tiny"));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("CUDA"), std::string::npos) << m.status().ToString();
}

}  // namespace
}  // namespace eep
