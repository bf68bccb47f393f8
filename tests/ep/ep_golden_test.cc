// The expert-parallel runtime (rank processes over a communicator) against the golden
// transformers references: logits and greedy tokens for --ep 1, 2, 4 and an uneven layout.
#include <gtest/gtest.h>

#include <cmath>
#include <fmt/format.h>

#include "core/util.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace eep {
namespace {

struct Case {
  std::string model;
  int ep;
  int redundant;
  std::string communicator;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.model << "_ep" << c.ep << "_r" << c.redundant << "_" << c.communicator; }

std::string Join(const std::vector<int64_t>& ids) {
  std::string s;
  for (int64_t id : ids) s += (s.empty() ? "" : ",") + std::to_string(id);
  return s;
}

class EpGolden : public ::testing::TestWithParam<Case> {};

TEST_P(EpGolden, LogitsAndGreedyMatchReference) {
  const Case& c = GetParam();
  const std::string dir = test::ModelDir(c.model);
  auto golden = ReadJsonFile(dir + "/golden.json");
  ASSERT_TRUE(golden.ok());
  auto ref = SafetensorsFile::Open(dir + "/golden.safetensors");
  ASSERT_TRUE(ref.ok());
  const std::string flags = fmt::format("--ep {} --num-redundant-experts {} --ep-communicator {} --log-level warn", c.ep,
                                        c.redundant, c.communicator);
  const std::string tmp = test::TempDir("ep");
  for (int p : {0, 2}) {
    const auto& prompt = (*golden)["prompts"][p];
    const auto ids = prompt["ids"].get<std::vector<int64_t>>();
    auto r = test::RunEep(fmt::format("logits --model {} --prompt-ids {} --out {}/l.safetensors {}", dir, Join(ids), tmp, flags));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto got = SafetensorsFile::Open(tmp + "/l.safetensors");
    ASSERT_TRUE(got.ok());
    const auto& g = (*got)->tensors().at("logits");
    const auto& e = (*ref)->tensors().at(fmt::format("p{}.logits", p));
    ASSERT_EQ(g.shape, e.shape);
    const float* gv = reinterpret_cast<const float*>(g.data);
    const float* ev = reinterpret_cast<const float*>(e.data);
    double max_ref = 1, max_diff = 0;
    for (int64_t i = 0; i < e.numel(); ++i) {
      max_ref = std::max(max_ref, std::fabs(static_cast<double>(ev[i])));
      max_diff = std::max(max_diff, std::fabs(static_cast<double>(gv[i]) - ev[i]));
    }
    EXPECT_LT(max_diff / max_ref, 1e-3) << "prompt " << p;

    r = test::RunEep(fmt::format("generate --model {} --prompt-ids {} --max-new-tokens 16 --json {}", dir, Join(ids), flags));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["output_ids"].get<std::vector<int64_t>>(), prompt["greedy"].get<std::vector<int64_t>>()) << "prompt " << p;
  }
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (const char* m : {"qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"}) {
    cases.push_back({m, 1, 0, "shm"});
    cases.push_back({m, 2, 0, "shm"});
    cases.push_back({m, 4, 0, "shm"});
    cases.push_back({m, 2, 0, "ucx"});
  }
  cases.push_back({"deepseekv3-tiny", 4, 2, "ucx"});
  // 16 experts + 1 redundant on 3 ranks: 17 slots round up to 18 (6 per rank).
  cases.push_back({"qwen3moe-tiny", 3, 1, "shm"});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Ep, EpGolden, ::testing::ValuesIn(Cases()), [](const auto& info) {
  const Case& c = info.param;
  std::string m = c.model.substr(0, c.model.find('-'));
  return fmt::format("{}_ep{}_r{}_{}", m, c.ep, c.redundant, c.communicator);
});

// EPLB in the loop: with redundancy and a short interval, experts move between ranks during
// a 64-token generation, and the tokens equal the single-rank run.
class EpEplb : public ::testing::TestWithParam<std::string> {};

TEST_P(EpEplb, RebalancingMovesExpertsAndKeepsOutput) {
  const std::string dir = test::ModelDir("qwen3moe-tiny");
  const std::string prompt = "39,90,82,273,86,303,290,286,274,350,85,79";
  auto one = test::RunEep(fmt::format("generate --model {} --prompt-ids {} --max-new-tokens 64 --ignore-eos --json --ep 1", dir, prompt));
  ASSERT_EQ(one.exit_code, 0) << one.err;
  auto four = test::RunEep(fmt::format(
      "generate --model {} --prompt-ids {} --max-new-tokens 64 --ignore-eos --json --ep 4 --num-redundant-experts 4 "
      "--eplb-interval 2 {}",
      dir, prompt, GetParam()));
  ASSERT_EQ(four.exit_code, 0) << four.err;
  EXPECT_EQ(nlohmann::json::parse(four.out)["output_ids"], nlohmann::json::parse(one.out)["output_ids"]);
  // The coordinator logs every rebalance: "eplb: step N: moved K expert(s), X MiB from peer rank(s) [..]".
  int moves = 0;
  size_t pos = 0;
  while ((pos = four.err.find("eplb: step", pos)) != std::string::npos) {
    size_t moved = four.err.find("moved ", pos);
    ASSERT_NE(moved, std::string::npos);
    if (std::stoi(four.err.substr(moved + 6)) > 0) ++moves;
    ++pos;
  }
  EXPECT_GE(moves, 2) << four.err;
}

INSTANTIATE_TEST_SUITE_P(Modes, EpEplb, ::testing::Values("", "--eplb-async", "--eplb-policy deepseek --ep-communicator ucx"),
                         [](const auto& info) {
                           return info.param.empty() ? std::string("sync") : info.param == "--eplb-async" ? std::string("async") : std::string("deepseek_ucx");
                         });

}  // namespace
}  // namespace eep
