// The CPU runtime against transformers' float64 references (tests/data/models/*/golden.*):
// logits within 1e-3 × max(1, max|ref|) element-wise, per-layer hidden states of prompt 0,
// and greedy tokens exactly — through the library and through the `eep` binary.
#include <gtest/gtest.h>

#include <cmath>
#include <fmt/format.h>

#include "core/util.h"
#include "model/generate.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace eep {
namespace {

using test::GoldenPrompt;
using test::RelErr;

std::vector<GoldenPrompt> LoadPrompts(const std::string& model) { return test::LoadGoldenPrompts(model); }

std::vector<float> ReadRef(const SafetensorsFile& f, const std::string& name) {
  auto v = test::ReadTensorF32(f, name);
  EXPECT_FALSE(v.empty()) << name;
  return v;
}

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, LogitsHiddenAndGreedyMatchTransformers) {
  const std::string name = GetParam();
  auto model = Model::Load(test::ModelDir(name));
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto ref = SafetensorsFile::Open(test::ModelDir(name) + "/golden.safetensors");
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  auto prompts = LoadPrompts(name);
  ASSERT_EQ(prompts.size(), 5u);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto cache = (*model)->NewCache();
    std::vector<float> logits;
    SeqStep step{cache.get(), prompts[i].ids, true, &logits};
    ForwardTrace trace;
    ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&step, 1), i == 0 ? &trace : nullptr).ok());
    double err = RelErr(logits, ReadRef(**ref, fmt::format("p{}.logits", i)));
    EXPECT_LT(err, 1e-3) << name << " prompt " << i;
    fmt::print("{} prompt {}: {} tokens, logits rel err {:.3g}\n", name, i, prompts[i].ids.size(), err);
    if (i == 0) {
      ASSERT_EQ(trace.hidden.size(), static_cast<size_t>((*model)->config().num_layers + 1));
      for (size_t k = 0; k < trace.hidden.size(); ++k)
        EXPECT_LT(RelErr(trace.hidden[k], ReadRef(**ref, fmt::format("p0.hidden.{}", k))), 1e-3)
            << name << " hidden " << k;
    }
    // Greedy with the KV cache must equal the reference (full recompute) exactly.
    GenerateOptions g;
    g.max_new_tokens = static_cast<int64_t>(prompts[i].greedy.size());
    auto out = Generate(**model, prompts[i].ids, g);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_EQ(*out, prompts[i].greedy) << name << " prompt " << i;
  }
}

TEST_P(GoldenTest, CliLogitsAndGenerate) {
  const std::string name = GetParam();
  auto prompts = LoadPrompts(name);
  const std::string dir = test::TempDir("logits");
  for (size_t i : {size_t{0}, size_t{3}}) {
    std::string ids;
    for (int64_t id : prompts[i].ids) ids += (ids.empty() ? "" : ",") + std::to_string(id);
    auto r = test::RunEep(fmt::format("logits --model {} --prompt-ids {} --out {}/l.safetensors",
                                      test::ModelDir(name), ids, dir));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto got = SafetensorsFile::Open(dir + "/l.safetensors");
    ASSERT_TRUE(got.ok());
    auto ref = SafetensorsFile::Open(test::ModelDir(name) + "/golden.safetensors");
    const auto& t = (*got)->tensors().at("logits");
    EXPECT_EQ(t.dtype, DType::kF32);
    EXPECT_EQ(t.shape, (std::vector<int64_t>{static_cast<int64_t>(prompts[i].ids.size()), 512}));
    EXPECT_LT(RelErr(ReadRef(**got, "logits"), ReadRef(**ref, fmt::format("p{}.logits", i))), 1e-3);

    r = test::RunEep(fmt::format("generate --model {} --prompt-ids {} --max-new-tokens 16 --json",
                                 test::ModelDir(name), ids));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["prompt_ids"].get<std::vector<int64_t>>(), prompts[i].ids);
    EXPECT_EQ(j["output_ids"].get<std::vector<int64_t>>(), prompts[i].greedy);
    EXPECT_TRUE(j["text"].is_string());
  }
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenTest,
                         ::testing::Values("qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"));

}  // namespace
}  // namespace eep
