// Checkpoints outside the golden set (other sizes and head layouts, sharded files) and
// properties of the runtime that must hold whatever the weights: the KV cache gives the same
// logits as a full forward, batching does not change results, and the expert map's
// placement (including redundant replicas) does not change results.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fmt/format.h>

#include "model/make_model.h"
#include "model/model.h"
#include "test_util.h"

namespace eep {
namespace {

double MaxRelDiff(const float* a, const float* b, size_t n) {
  double max_ref = 1, max_diff = 0;
  for (size_t i = 0; i < n; ++i) {
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(b[i])));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return max_diff / max_ref;
}

struct Variant {
  std::string label;
  MakeModelOptions options;
};
void PrintTo(const Variant& v, std::ostream* os) { *os << v.label; }

std::vector<Variant> Variants() {
  std::vector<Variant> v;
  MakeModelOptions q;
  q.arch = Arch::kQwen3Moe;
  q.num_layers = 3, q.hidden_size = 96, q.num_heads = 6, q.num_kv_heads = 2, q.head_dim = 24;
  q.num_experts = 12, q.num_experts_per_tok = 3, q.moe_intermediate_size = 40, q.vocab_size = 520, q.seed = 7;
  v.push_back({"qwen3_gqa3_headdim24", q});
  MakeModelOptions m;
  m.arch = Arch::kMixtral;
  m.num_layers = 2, m.hidden_size = 64, m.num_heads = 8, m.num_kv_heads = 8, m.head_dim = 8;
  m.num_experts = 6, m.num_experts_per_tok = 2, m.moe_intermediate_size = 72, m.seed = 8;
  v.push_back({"mixtral_mha", m});
  MakeModelOptions d;
  d.arch = Arch::kDeepseekV3;
  d.num_layers = 3, d.hidden_size = 64, d.num_heads = 2, d.first_k_dense_replace = 2;
  d.num_experts = 8, d.num_experts_per_tok = 2, d.n_group = 2, d.topk_group = 1, d.moe_intermediate_size = 32;
  d.q_lora_rank = 0, d.kv_lora_rank = 16, d.qk_nope_head_dim = 8, d.qk_rope_head_dim = 8, d.v_head_dim = 12;
  d.seed = 9;
  v.push_back({"deepseek_no_qlora", d});
  return v;
}

class RuntimeTest : public ::testing::TestWithParam<Variant> {
 protected:
  static std::string Make(const MakeModelOptions& o, const std::string& tag) {
    std::string dir = test::TempDir(tag);
    Status st = MakeModel(o, dir);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return dir;
  }
};

std::vector<int64_t> Prompt(int64_t n, int64_t salt) {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back((i * 37 + salt * 11 + 5) % 500);
  return ids;
}

TEST_P(RuntimeTest, KvCacheEqualsFullForward) {
  auto dir = Make(GetParam().options, "rt");
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const int64_t V = (*model)->config().vocab_size;
  auto ids = Prompt(20, 1);
  auto full_cache = (*model)->NewCache();
  std::vector<float> full;
  SeqStep s{full_cache.get(), ids, true, &full};
  ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&s, 1)).ok());
  // Prefill 7 tokens, then one at a time.
  auto cache = (*model)->NewCache();
  std::vector<float> logits;
  SeqStep p{cache.get(), std::span<const int64_t>(ids.data(), 7), false, &logits};
  ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&p, 1)).ok());
  EXPECT_LT(MaxRelDiff(logits.data(), full.data() + 6 * V, static_cast<size_t>(V)), 1e-5);
  for (size_t t = 7; t < ids.size(); ++t) {
    SeqStep d{cache.get(), std::span<const int64_t>(ids.data() + t, 1), false, &logits};
    ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&d, 1)).ok());
    EXPECT_LT(MaxRelDiff(logits.data(), full.data() + t * V, static_cast<size_t>(V)), 1e-5) << "position " << t;
  }
  EXPECT_EQ(cache->length(), 20);
}

TEST_P(RuntimeTest, BatchEqualsSeparate) {
  auto dir = Make(GetParam().options, "rt");
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok());
  auto a = Prompt(9, 2), b = Prompt(4, 3);
  std::vector<float> la, lb, ba, bb;
  {
    auto ca = (*model)->NewCache(), cb = (*model)->NewCache();
    SeqStep x{ca.get(), a, true, &la}, y{cb.get(), b, true, &lb};
    ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&x, 1)).ok());
    ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&y, 1)).ok());
  }
  auto ca = (*model)->NewCache(), cb = (*model)->NewCache();
  std::vector<SeqStep> batch{{ca.get(), a, true, &ba}, {cb.get(), b, true, &bb}};
  ASSERT_TRUE((*model)->Forward(batch).ok());
  EXPECT_LT(MaxRelDiff(ba.data(), la.data(), la.size()), 1e-5);
  EXPECT_LT(MaxRelDiff(bb.data(), lb.data(), lb.size()), 1e-5);
}

TEST_P(RuntimeTest, ShardedCheckpointEqualsSingleFile) {
  MakeModelOptions o = GetParam().options;
  auto single = Make(o, "single");
  o.max_shard_bytes = 64 << 10;  // many shards
  auto sharded = Make(o, "sharded");
  ASSERT_TRUE(std::filesystem::exists(sharded + "/model.safetensors.index.json"));
  auto m1 = Model::Load(single), m2 = Model::Load(sharded);
  ASSERT_TRUE(m1.ok() && m2.ok()) << m2.status().ToString();
  auto ids = Prompt(6, 4);
  std::vector<float> l1, l2;
  auto c1 = (*m1)->NewCache(), c2 = (*m2)->NewCache();
  SeqStep s1{c1.get(), ids, true, &l1}, s2{c2.get(), ids, true, &l2};
  ASSERT_TRUE((*m1)->Forward(std::span<SeqStep>(&s1, 1)).ok());
  ASSERT_TRUE((*m2)->Forward(std::span<SeqStep>(&s2, 1)).ok());
  EXPECT_EQ(l1, l2);
}

TEST_P(RuntimeTest, PlacementDoesNotChangeOutput) {
  auto dir = Make(GetParam().options, "rt");
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok());
  const ModelConfig& c = (*model)->config();
  auto ids = Prompt(11, 5);
  std::vector<float> ref, got;
  auto c1 = (*model)->NewCache();
  SeqStep s1{c1.get(), ids, true, &ref};
  ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&s1, 1)).ok());
  // Reversed placement plus 3 redundant replicas of experts 0, 1, 2.
  std::vector<std::vector<int32_t>> p2l((*model)->num_moe_layers());
  for (auto& row : p2l) {
    for (int64_t e = c.num_experts - 1; e >= 0; --e) row.push_back(static_cast<int32_t>(e));
    row.insert(row.end(), {0, 1, 2});
  }
  auto map = ExpertMap::FromPhy2Log(p2l, c.num_experts);
  ASSERT_TRUE(map.ok());
  LocalExperts experts(c, *map, 0, map->num_physical());
  ASSERT_TRUE(experts.LoadFromCheckpoint((*model)->checkpoint()).ok());
  (*model)->SetMoeExecutor(&experts);
  auto c2 = (*model)->NewCache();
  SeqStep s2{c2.get(), ids, true, &got};
  ASSERT_TRUE((*model)->Forward(std::span<SeqStep>(&s2, 1)).ok());
  // Equal up to float rounding: BLAS may round a differently sized token group differently.
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_LT(MaxRelDiff(got.data(), ref.data(), ref.size()), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, RuntimeTest, ::testing::ValuesIn(Variants()),
                         [](const auto& info) { return info.param.label; });

TEST(MakeModelCli, WritesLoadableCheckpoint) {
  std::string dir = test::TempDir("mm");
  auto r = test::RunEep(fmt::format(
      "make-model --arch deepseek_v3 --layers 2 --hidden 64 --experts 8 --experts-per-tok 2 --n-group 2 "
      "--topk-group 1 --seed 3 --out {}",
      dir));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = test::RunEep(fmt::format("generate --model {} --prompt hello --max-new-tokens 4 --json", dir));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["output_ids"].size(), 4u);
  r = test::RunEep(fmt::format("make-model --arch gpt2 --out {}/x", dir));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--arch"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace eep
