// The compute backend interface (model/compute.h) on the CPU reference backend, against
// transformers' float64 references (tests/data/models/*/golden.*): logits within
// 1e-3 × max(1, max|ref|), greedy_token equal to the argmax of the golden logits and to the
// golden greedy tokens, batching, cache truncation, the MoE executor and route observer
// hooks, and the backend factory's errors (--backend bogus, cuda without a GPU).
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "cuda/compute_cuda.h"
#include "model/compute.h"
#include "model/generate.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace eep {
namespace {

using test::GoldenPrompt;
using test::RelErr;

constexpr double kCpuBound = 1e-3;  // as tests/model/golden_test.cc

std::vector<float> ReadRef(const SafetensorsFile& f, const std::string& name) {
  auto v = test::ReadTensorF32(f, name);
  EXPECT_FALSE(v.empty()) << name;
  return v;
}

// Rows [begin, end) of a [., width] matrix.
std::vector<float> Rows(const std::vector<float>& m, int64_t begin, int64_t end, int64_t width) {
  return {m.begin() + begin * width, m.begin() + end * width};
}

// The reference's own argmax (lowest index on ties), written here rather than taken from the
// code under test.
int64_t RefArgMax(const std::vector<float>& row) {
  int64_t best = 0;
  for (size_t i = 1; i < row.size(); ++i)
    if (row[i] > row[static_cast<size_t>(best)]) best = static_cast<int64_t>(i);
  return best;
}

struct Golden {
  std::string name;
  std::unique_ptr<SafetensorsFile> ref;
  std::vector<GoldenPrompt> prompts;
  std::vector<float> Logits(size_t i) const { return ReadRef(*ref, fmt::format("p{}.logits", i)); }
};

Golden LoadGolden(const std::string& name) {
  Golden g;
  g.name = name;
  auto ref = SafetensorsFile::Open(test::ModelDir(name) + "/golden.safetensors");
  EXPECT_TRUE(ref.ok()) << ref.status().ToString();
  if (ref.ok()) g.ref = std::move(*ref);
  g.prompts = test::LoadGoldenPrompts(name);
  EXPECT_EQ(g.prompts.size(), 5u) << name;
  return g;
}

std::unique_ptr<ComputeModel> OpenCpu(const std::string& name, const ComputeOptions& options = {}) {
  auto m = OpenComputeModel("cpu", test::ModelDir(name), options);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(*m) : nullptr;
}

class ComputeCpuTest : public ::testing::TestWithParam<std::string> {};

// Prefill of every golden prompt, then greedy decoding on greedy_token alone (no logits to
// the caller), and Generate over the interface.
TEST_P(ComputeCpuTest, LogitsAndGreedyMatchTransformers) {
  const Golden g = LoadGolden(GetParam());
  ASSERT_TRUE(g.ref);
  auto model = OpenCpu(g.name);
  ASSERT_TRUE(model);
  EXPECT_STREQ(model->name(), "cpu");
  EXPECT_EQ(cuda::CudaModelOf(*model), nullptr);
  const int64_t V = model->config().vocab_size;
  for (size_t i = 0; i < g.prompts.size(); ++i) {
    const GoldenPrompt& p = g.prompts[i];
    const int64_t T = static_cast<int64_t>(p.ids.size());
    const auto golden = g.Logits(i);
    auto cache = model->NewCache();
    std::vector<float> logits;
    int64_t greedy = -1;
    ComputeStep step{cache.get(), p.ids, true, &logits, &greedy};
    ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&step, 1)).ok());
    EXPECT_EQ(cache->length(), T);
    ASSERT_EQ(logits.size(), static_cast<size_t>(T * V));
    EXPECT_LT(RelErr(logits, golden), kCpuBound) << g.name << " prompt " << i;
    EXPECT_EQ(greedy, RefArgMax(Rows(golden, T - 1, T, V))) << g.name << " prompt " << i;
    EXPECT_EQ(greedy, p.greedy.at(0)) << g.name << " prompt " << i;

    // Decode with greedy_token only: the caller's logits vector stays untouched.
    std::vector<int64_t> out{greedy};
    while (out.size() < p.greedy.size()) {
      const int64_t last = out.back();
      ComputeStep d{cache.get(), std::span<const int64_t>(&last, 1), false, nullptr, &greedy};
      ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&d, 1)).ok());
      out.push_back(greedy);
    }
    EXPECT_EQ(out, p.greedy) << g.name << " prompt " << i;
    EXPECT_EQ(cache->length(), T + static_cast<int64_t>(p.greedy.size()) - 1);

    GenerateOptions go;
    go.max_new_tokens = static_cast<int64_t>(p.greedy.size());
    auto gen = Generate(*model, p.ids, go);
    ASSERT_TRUE(gen.ok()) << gen.status().ToString();
    EXPECT_EQ(*gen, p.greedy) << g.name << " prompt " << i;
  }
}

// Two sequences of different lengths in one batch (prefill, then decode steps together) give
// what each gives alone: the golden logits and greedy tokens.
TEST_P(ComputeCpuTest, BatchOfTwoEqualsEachAlone) {
  const Golden g = LoadGolden(GetParam());
  ASSERT_TRUE(g.ref);
  auto model = OpenCpu(g.name);
  ASSERT_TRUE(model);
  const int64_t V = model->config().vocab_size;
  const size_t a = 0, b = 3;
  const GoldenPrompt& pa = g.prompts[a];
  const GoldenPrompt& pb = g.prompts[b];
  const int64_t Tb = static_cast<int64_t>(pb.ids.size());
  // Alone, for the batched run to equal (besides golden).
  std::vector<float> alone_a, alone_b;
  {
    auto c = model->NewCache();
    ComputeStep s{c.get(), pa.ids, true, &alone_a};
    ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&s, 1)).ok());
    c->Clear();
    EXPECT_EQ(c->length(), 0);
    ComputeStep t{c.get(), pb.ids, false, &alone_b};
    ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&t, 1)).ok());
  }
  auto ca = model->NewCache(), cb = model->NewCache();
  std::vector<float> la, lb;
  int64_t ga = -1, gb = -1;
  // a: every row; b: the last row only.
  std::vector<ComputeStep> batch{{ca.get(), pa.ids, true, &la, &ga}, {cb.get(), pb.ids, false, &lb, &gb}};
  ASSERT_TRUE(model->Forward(batch).ok());
  EXPECT_LT(RelErr(la, g.Logits(a)), kCpuBound) << g.name;
  ASSERT_EQ(lb.size(), static_cast<size_t>(V));
  EXPECT_LT(RelErr(lb, Rows(g.Logits(b), Tb - 1, Tb, V)), kCpuBound) << g.name;
  EXPECT_LT(RelErr(la, alone_a), 1e-5) << g.name;
  EXPECT_LT(RelErr(lb, alone_b), 1e-5) << g.name;
  std::vector<int64_t> out_a{ga}, out_b{gb};
  while (out_a.size() < pa.greedy.size()) {
    const int64_t xa = out_a.back(), xb = out_b.back();
    std::vector<ComputeStep> step{{ca.get(), std::span<const int64_t>(&xa, 1), false, nullptr, &ga},
                                  {cb.get(), std::span<const int64_t>(&xb, 1), false, nullptr, &gb}};
    ASSERT_TRUE(model->Forward(step).ok());
    out_a.push_back(ga);
    out_b.push_back(gb);
  }
  EXPECT_EQ(out_a, pa.greedy) << g.name;
  EXPECT_EQ(out_b, pb.greedy) << g.name;
}

// Truncate forgets positions: re-running the forgotten tokens gives the golden rows again.
TEST_P(ComputeCpuTest, TruncateThenRerunGivesTheSameLogits) {
  const Golden g = LoadGolden(GetParam());
  ASSERT_TRUE(g.ref);
  auto model = OpenCpu(g.name);
  ASSERT_TRUE(model);
  const int64_t V = model->config().vocab_size;
  const size_t i = 0;
  const GoldenPrompt& p = g.prompts[i];
  const int64_t T = static_cast<int64_t>(p.ids.size());
  const auto golden = g.Logits(i);
  auto cache = model->NewCache();
  std::vector<float> logits;
  ComputeStep step{cache.get(), p.ids, true, &logits};
  ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&step, 1)).ok());
  for (int64_t keep : {T / 2, T - 1, int64_t{0}}) {
    cache->Truncate(keep);
    EXPECT_EQ(cache->length(), keep);
    std::vector<float> again;
    ComputeStep rerun{cache.get(), std::span<const int64_t>(p.ids).subspan(static_cast<size_t>(keep)), true, &again};
    ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&rerun, 1)).ok());
    EXPECT_EQ(cache->length(), T);
    EXPECT_LT(RelErr(again, Rows(golden, keep, T, V)), kCpuBound) << g.name << " after Truncate(" << keep << ")";
  }
  // Truncating past the end changes nothing.
  cache->Truncate(T + 5);
  EXPECT_EQ(cache->length(), T);
}

INSTANTIATE_TEST_SUITE_P(Models, ComputeCpuTest, ::testing::Values("qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"));

// Counts calls and fails them: proves the model runs its MoE layers through the executor set.
class FailingExecutor : public MoeExecutor {
 public:
  Status Run(int64_t, const float*, int64_t, int64_t, const int32_t*, const float*, float*) override {
    ++calls;
    return Status::Unavailable("injected executor failure");
  }
  int calls = 0;
};

TEST(ComputeCpu, MoeExecutorAndRouteObserver) {
  const Golden g = LoadGolden("qwen3moe-tiny");
  ASSERT_TRUE(g.ref);
  auto model = OpenCpu(g.name);
  ASSERT_TRUE(model);
  const ModelConfig& c = model->config();
  const GoldenPrompt& p = g.prompts[0];
  const int64_t T = static_cast<int64_t>(p.ids.size());
  std::vector<int64_t> routed(c.MoeLayers().size(), 0);
  model->SetRouteObserver([&](int64_t ml, const int32_t* ids, int64_t count) {
    ASSERT_LT(static_cast<size_t>(ml), routed.size());
    for (int64_t j = 0; j < count; ++j) {
      EXPECT_GE(ids[j], 0);
      EXPECT_LT(ids[j], c.num_experts);
    }
    routed[static_cast<size_t>(ml)] += count;
  });
  FailingExecutor failing;
  model->SetMoeExecutor(&failing);
  auto cache = model->NewCache();
  std::vector<float> logits;
  ComputeStep step{cache.get(), p.ids, true, &logits};
  Status st = model->Forward(std::span<ComputeStep>(&step, 1));
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st.ToString();
  EXPECT_NE(st.message().find("injected executor failure"), std::string::npos) << st.ToString();
  EXPECT_EQ(failing.calls, 1);
  // Null: back to the experts loaded with the model; the failed step is rolled back first.
  model->SetMoeExecutor(nullptr);
  cache->Truncate(0);
  std::fill(routed.begin(), routed.end(), 0);
  ASSERT_TRUE(model->Forward(std::span<ComputeStep>(&step, 1)).ok());
  EXPECT_LT(RelErr(logits, g.Logits(0)), kCpuBound);
  for (int64_t n : routed) EXPECT_EQ(n, T * c.num_experts_per_tok);
}

TEST(ComputeCpu, WithoutExpertsAForwardNeedsAnExecutor) {
  auto model = OpenCpu("mixtral-tiny", {.load_experts = false});
  ASSERT_TRUE(model);
  auto cache = model->NewCache();
  const std::vector<int64_t> ids{1, 2, 3};
  std::vector<float> logits;
  ComputeStep step{cache.get(), ids, false, &logits};
  EXPECT_FALSE(model->Forward(std::span<ComputeStep>(&step, 1)).ok());
}

TEST(ComputeCpu, BadStepsAreRefused) {
  auto model = OpenCpu("qwen3moe-tiny");
  auto other = OpenCpu("qwen3moe-tiny");
  ASSERT_TRUE(model && other);
  const std::vector<int64_t> ids{1, 2, 3};
  std::vector<float> logits;
  ComputeStep none{nullptr, ids, false, &logits};
  Status st = model->Forward(std::span<ComputeStep>(&none, 1));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  auto foreign = other->NewCache();
  ComputeStep wrong{foreign.get(), ids, false, &logits};
  st = model->Forward(std::span<ComputeStep>(&wrong, 1));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("another model"), std::string::npos) << st.ToString();
  EXPECT_EQ(foreign->length(), 0);
  auto cache = model->NewCache();
  const std::vector<int64_t> out_of_vocab{1, model->config().vocab_size};
  ComputeStep bad{cache.get(), out_of_vocab, false, &logits};
  st = model->Forward(std::span<ComputeStep>(&bad, 1));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
}

TEST(ComputeFactory, UnknownBackendNamesTheFlag) {
  auto m = OpenComputeModel("bogus", test::ModelDir("qwen3moe-tiny"));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument) << m.status().ToString();
  EXPECT_NE(m.status().message().find("--backend"), std::string::npos) << m.status().ToString();
  EXPECT_NE(m.status().message().find("bogus"), std::string::npos) << m.status().ToString();
}

TEST(ComputeFactory, MissingCheckpointNamesTheDirectory) {
  const std::string dir = test::DataDir() + "/models/no-such-model";
  auto m = OpenComputeModel("cpu", dir);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("no-such-model"), std::string::npos) << m.status().ToString();
}

TEST(ComputeFactory, CudaWithoutAGpuIsUnavailable) {
  if (cuda::Available()) GTEST_SKIP() << "a CUDA device is visible (" << cuda::DeviceDescription() << ")";
  auto m = OpenComputeModel("cuda", test::ModelDir("qwen3moe-tiny"));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kUnavailable) << m.status().ToString();
  EXPECT_NE(m.status().message().find("--backend cuda"), std::string::npos) << m.status().ToString();
  fmt::print("--backend cuda here: {}\n", m.status().ToString());
  // The CUDA backend's own entry point says the same, and auto falls back to the CPU.
  auto direct = cuda::OpenCudaComputeModel(test::ModelDir("qwen3moe-tiny"));
  ASSERT_FALSE(direct.ok());
  EXPECT_NE(direct.status().message().find("--backend cuda"), std::string::npos) << direct.status().ToString();
  auto fallback = OpenComputeModel("auto", test::ModelDir("qwen3moe-tiny"));
  ASSERT_TRUE(fallback.ok()) << fallback.status().ToString();
  EXPECT_STREQ((*fallback)->name(), "cpu");
}

}  // namespace
}  // namespace eep
