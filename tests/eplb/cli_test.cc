// `eep eplb` contract, through the real binary (EEP_BIN): golden outputs, min-move and
// failure inputs, and one-line errors naming the field for bad input.
#include <gtest/gtest.h>

#include <functional>

#include "core/util.h"
#include "eplb_test_util.h"

namespace eep::eplb {
namespace {

using nlohmann::json;
using testing::GoldenCase;
using testing::LoadGolden;
using testing::RunCommand;
using testing::TempPath;

json InputOf(const GoldenCase& g) {
  json in;
  for (const char* key : {"weight", "num_replicas", "num_groups", "num_nodes", "num_gpus"}) {
    in[key] = g.raw.at(key);
  }
  return in;
}

// Runs `eep eplb` on `input`; returns the parsed output (null on failure) and fills the exit
// code and the combined stdout/stderr text.
json RunEplb(const json& input, const std::string& name, int* exit_code, std::string* log) {
  const std::string in_path = TempPath(name + ".in.json");
  const std::string out_path = TempPath(name + ".out.json");
  std::remove(out_path.c_str());
  EXPECT_TRUE(WriteFile(in_path, input.dump()).ok());
  *log = RunCommand(std::string(EEP_BIN) + " eplb --input " + in_path + " --output " + out_path,
                    exit_code);
  if (*exit_code != 0) return json();
  auto out = ReadJsonFile(out_path);
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  return out.ok() ? *out : json();
}

std::vector<int32_t> Flatten(const json& j) {
  std::vector<int32_t> out;
  std::function<void(const json&)> rec = [&](const json& v) {
    if (v.is_array()) {
      for (const auto& x : v) rec(x);
    } else {
      out.push_back(v.get<int32_t>());
    }
  };
  rec(j);
  return out;
}

void CheckGoldenThroughCli(const std::string& file) {
  for (const auto& g : LoadGolden(file)) {
    SCOPED_TRACE(g.name);
    int rc = 0;
    std::string log;
    const json out = RunEplb(InputOf(g), g.name, &rc, &log);
    ASSERT_EQ(rc, 0) << log;
    EXPECT_EQ(out.at("phy2log"), g.raw.at("phy2log"));
    EXPECT_EQ(out.at("log2phy"), g.raw.at("log2phy"));
    EXPECT_EQ(out.at("logcnt"), g.raw.at("logcnt"));
    EXPECT_NEAR(out.at("balancedness").get<double>(), g.balancedness, 1e-12);
    EXPECT_FALSE(out.contains("moved_experts"));
  }
}

TEST(EplbCli, SmallGoldenCases) {
  CheckGoldenThroughCli("eplb_small.json");
}
TEST(EplbCli, LargeGoldenCases) {
  CheckGoldenThroughCli("eplb_large.json");
}

TEST(EplbCli, GoldenCaseFileWithExtraKeysIsAccepted) {
  const auto cases = LoadGolden("eplb_small.json");
  ASSERT_FALSE(cases.empty());
  int rc = 0;
  std::string log;
  const json out = RunEplb(cases[0].raw, "raw", &rc, &log);  // has name, phy2log, ...
  ASSERT_EQ(rc, 0) << log;
  EXPECT_EQ(out.at("phy2log"), cases[0].raw.at("phy2log"));
}

TEST(EplbCli, MinMoveReportsMovesOfBothPlans) {
  for (const auto& g : LoadGolden("eplb_small.json")) {
    SCOPED_TRACE(g.name);
    const LoadMatrix drifted = testing::Perturb(g.weight, 0.2, 5);
    json in = InputOf(g);
    json weight = json::array();
    for (int32_t l = 0; l < drifted.num_layers; ++l) {
      json row = json::array();
      for (int32_t e = 0; e < drifted.num_experts; ++e) row.push_back(drifted.at(l, e));
      weight.push_back(row);
    }
    in["weight"] = weight;
    in["old_phy2log"] = g.raw.at("phy2log");
    in["mode"] = "min-move";
    int rc = 0;
    std::string log;
    const json out = RunEplb(in, g.name + "_mm", &rc, &log);
    ASSERT_EQ(rc, 0) << log;
    const std::vector<int32_t> phy2log = Flatten(out.at("phy2log"));
    int64_t moved = 0;
    for (size_t i = 0; i < phy2log.size(); ++i) moved += phy2log[i] != g.phy2log[i];
    EXPECT_EQ(out.at("moved_experts").get<int64_t>(), moved);
    const int64_t fresh_moved = out.at("fresh_moved_experts").get<int64_t>();
    EXPECT_LE(2 * moved, fresh_moved);
    EXPECT_GE(out.at("balancedness").get<double>(),
              out.at("fresh_balancedness").get<double>() * 0.99);

    // Fresh mode with an old placement reports the fresh plan's moves.
    in.erase("mode");
    const json fresh = RunEplb(in, g.name + "_fresh", &rc, &log);
    ASSERT_EQ(rc, 0) << log;
    EXPECT_EQ(fresh.at("moved_experts").get<int64_t>(), fresh_moved);
  }
}

TEST(EplbCli, FailedGpusGetEmptySlots) {
  const auto cases = LoadGolden("eplb_small.json");
  const GoldenCase& g = cases.back();  // mid_hier: 16 GPUs
  json in = InputOf(g);
  in["failed_gpus"] = {0, 9};
  int rc = 0;
  std::string log;
  const json out = RunEplb(in, "failed", &rc, &log);
  ASSERT_EQ(rc, 0) << log;
  const int32_t per_gpu = g.topo.num_replicas / g.topo.num_gpus;
  for (const auto& row : out.at("phy2log")) {
    for (int32_t s = 0; s < g.topo.num_replicas; ++s) {
      const bool dead = s / per_gpu == 0 || s / per_gpu == 9;
      EXPECT_EQ(row[s].get<int32_t>() == -1, dead) << "slot " << s;
    }
  }
  EXPECT_GT(out.at("balancedness").get<double>(), 0.5);
}

TEST(EplbCli, WritesToStdout) {
  const auto cases = LoadGolden("eplb_small.json");
  const std::string in_path = TempPath("stdout.in.json");
  ASSERT_TRUE(WriteFile(in_path, InputOf(cases[0]).dump()).ok());
  int rc = 0;
  const std::string out = RunCommand(
      std::string(EEP_BIN) + " --log-level warn eplb --input " + in_path + " --output -", &rc);
  ASSERT_EQ(rc, 0) << out;
  const json parsed = json::parse(out);
  EXPECT_EQ(parsed.at("phy2log"), cases[0].raw.at("phy2log"));
}

struct BadInput {
  const char* name;
  std::function<void(json&)> mutate;
  const char* field;  // must appear in the error line
};

TEST(EplbCli, BadInputFailsWithOneLineNamingTheField) {
  const auto cases = LoadGolden("eplb_small.json");
  ASSERT_FALSE(cases.empty());
  const json base = InputOf(cases[0]);  // 2 x 12, R=16, G=4, N=2, P=8
  const std::vector<BadInput> bad = {
      {"ragged", [](json& j) { j["weight"][1].erase(0); }, "weight"},
      {"non_numeric", [](json& j) { j["weight"][0][3] = "lots"; }, "weight[0][3]"},
      {"bool_weight", [](json& j) { j["weight"][1][0] = true; }, "weight[1][0]"},
      {"negative_weight", [](json& j) { j["weight"][0][0] = -1; }, "weight[0][0]"},
      {"weight_not_list", [](json& j) { j["weight"] = 5; }, "weight"},
      {"empty_weight", [](json& j) { j["weight"] = json::array(); }, "weight"},
      {"missing_weight", [](json& j) { j.erase("weight"); }, "weight"},
      {"missing_replicas", [](json& j) { j.erase("num_replicas"); }, "num_replicas"},
      {"missing_groups", [](json& j) { j.erase("num_groups"); }, "num_groups"},
      {"missing_nodes", [](json& j) { j.erase("num_nodes"); }, "num_nodes"},
      {"missing_gpus", [](json& j) { j.erase("num_gpus"); }, "num_gpus"},
      {"few_replicas", [](json& j) { j["num_replicas"] = 8; }, "num_replicas"},
      {"gpus_not_dividing", [](json& j) { j["num_gpus"] = 6; }, "num_gpus"},
      {"groups_not_dividing", [](json& j) { j["num_groups"] = 5; }, "num_groups"},
      {"nodes_not_dividing", [](json& j) { j["num_nodes"] = 3; }, "num_nodes"},
      {"replicas_not_int", [](json& j) { j["num_replicas"] = "16"; }, "num_replicas"},
      {"replicas_fraction", [](json& j) { j["num_replicas"] = 16.5; }, "num_replicas"},
      {"zero_gpus", [](json& j) { j["num_gpus"] = 0; }, "num_gpus"},
      {"failed_out_of_range", [](json& j) { j["failed_gpus"] = {8}; }, "failed_gpus"},
      {"failed_negative", [](json& j) { j["failed_gpus"] = {-1}; }, "failed_gpus"},
      {"failed_not_list", [](json& j) { j["failed_gpus"] = "0,1"; }, "failed_gpus"},
      {"too_many_failed",
       [](json& j) {
         j["failed_gpus"] = {0, 1, 2};
       },
       "slots missing"},
      {"old_wrong_rows", [](json& j) { j["old_phy2log"] = json::array({json::array()}); },
       "old_phy2log"},
      {"old_wrong_cols",
       [](json& j) {
         j["old_phy2log"] = json::array({std::vector<int>(16, 0), std::vector<int>(15, 0)});
       },
       "old_phy2log[1]"},
      {"old_bad_expert",
       [](json& j) {
         j["old_phy2log"] = json::array({std::vector<int>(16, 0), std::vector<int>(16, 12)});
       },
       "old_phy2log[1][0]"},
      {"bad_mode", [](json& j) { j["mode"] = "fastest"; }, "mode"},
      {"min_move_without_old", [](json& j) { j["mode"] = "min-move"; }, "old_phy2log"},
      {"bad_tolerance", [](json& j) { j["tolerance"] = 2; }, "tolerance"},
      {"not_object",
       [](json& j) {
         j = json::array({1, 2});
       },
       "input"},
  };
  for (const BadInput& b : bad) {
    SCOPED_TRACE(b.name);
    json in = base;
    b.mutate(in);
    int rc = 0;
    std::string log;
    RunEplb(in, std::string("bad_") + b.name, &rc, &log);
    EXPECT_NE(rc, 0) << log;
    EXPECT_NE(log.find(b.field), std::string::npos) << log;
    std::string trimmed = log;
    while (!trimmed.empty() && trimmed.back() == '\n') trimmed.pop_back();
    EXPECT_EQ(trimmed.find('\n'), std::string::npos) << "more than one line:\n" << log;
  }
}

TEST(EplbCli, UnreadableInputFails) {
  int rc = 0;
  std::string log =
      RunCommand(std::string(EEP_BIN) + " eplb --input " + TempPath("does_not_exist.json") +
                     " --output " + TempPath("x.json"),
                 &rc);
  EXPECT_NE(rc, 0);
  const std::string path = TempPath("broken.json");
  ASSERT_TRUE(WriteFile(path, "{\"weight\": [[1, 2],").ok());
  log = RunCommand(
      std::string(EEP_BIN) + " eplb --input " + path + " --output " + TempPath("y.json"), &rc);
  EXPECT_NE(rc, 0) << log;
  EXPECT_NE(log.find("invalid JSON"), std::string::npos) << log;
}

}  // namespace
}  // namespace eep::eplb
