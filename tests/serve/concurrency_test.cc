// 16 concurrent requests all complete, each with exactly its single-request result: continuous
// batching must not change outputs (greedy, and seeded sampling too).
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "serve_test_util.h"
#include "test_util.h"

namespace eep::serve::test {
namespace {

struct Setup {
  int ep;
  bool eplb;  // rebalance every 4 steps, with redundant experts: placement changes under load
};

class ConcurrencyTest : public ::testing::TestWithParam<Setup> {};

TEST_P(ConcurrencyTest, SixteenConcurrentRequestsEqualTheirSingleResults) {
  const int ep = GetParam().ep;
  std::vector<std::string> args{
      "--model", eep::test::ModelDir("qwen3moe-tiny"), "--ep", std::to_string(ep), "--max-num-seqs",
      "16",      "--max-num-batched-tokens",           "512"};
  if (GetParam().eplb)
    args.insert(args.end(), {"--eplb-interval", "4", "--num-redundant-experts", "2"});
  std::string error;
  auto server = ServerProcess::Start(args, &error);
  ASSERT_TRUE(server) << error;
  const auto golden = LoadGolden("qwen3moe-tiny");
  std::vector<nlohmann::json> bodies;
  for (int i = 0; i < 16; ++i) {
    nlohmann::json b{
        {"max_tokens", 24 + 4 * (i % 5)}, {"ignore_eos", true}, {"return_token_ids", true}};
    const auto& g = golden[static_cast<size_t>(i) % golden.size()];
    if (i < 5) {
      b["prompt"] = g.ids;
    } else {
      b["prompt"] =
          g.text.substr(0, g.text.size() - static_cast<size_t>(i % 4)) + " #" + std::to_string(i);
    }
    if (i % 3 == 2) {
      b["temperature"] = 0.8;
      b["top_k"] = 50;
      b["seed"] = 1000 + i;
    } else {
      b["temperature"] = 0;
    }
    bodies.push_back(b);
  }
  // One at a time.
  std::vector<nlohmann::json> single(bodies.size());
  int64_t tokens = 0;
  auto client = server->Client();
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < bodies.size(); ++i) {
    HttpReply r = PostJson(*client, "/v1/completions", bodies[i]);
    ASSERT_EQ(r.status, 200) << r.body;
    single[i] = r.json["choices"][0];
    tokens += r.json["usage"]["completion_tokens"].get<int64_t>();
  }
  const double sequential_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Golden prompts, greedy: the transformers tokens (first 16).
  for (size_t i = 0; i < 5; ++i) {
    if (bodies[i]["temperature"] != 0) continue;
    auto ids = single[i]["token_ids"].get<std::vector<int64_t>>();
    ids.resize(16);
    EXPECT_EQ(ids, golden[i].greedy) << i;
  }
  // All at once.
  std::vector<HttpReply> concurrent(bodies.size());
  std::vector<std::thread> threads;
  const auto t1 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < bodies.size(); ++i)
    threads.emplace_back([&, i] {
      auto c = server->Client();
      concurrent[i] = PostJson(*c, "/v1/completions", bodies[i]);
    });
  for (auto& t : threads) t.join();
  const double concurrent_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  for (size_t i = 0; i < bodies.size(); ++i) {
    ASSERT_EQ(concurrent[i].status, 200) << i << ": " << concurrent[i].body;
    const auto& c = concurrent[i].json["choices"][0];
    EXPECT_EQ(c["token_ids"], single[i]["token_ids"]) << "request " << i << " " << bodies[i].dump();
    EXPECT_EQ(c["text"], single[i]["text"]) << i;
  }
  // The batch really was shared: far fewer steps than tokens.
  HttpReply m = Get(*client, "/metrics");
  const double steps = MetricValue(m.body, "eep_engine_steps_total");
  EXPECT_LT(steps, 2.0 * static_cast<double>(tokens)) << "no batching happened";
  std::printf(
      "[ ep=%d%s ] 16 requests, %lld tokens: one at a time %.2f s (%.1f req/s, %.0f tok/s); "
      "16 concurrent %.2f s (%.1f req/s, %.0f tok/s); engine steps %.0f for %lld tokens\n",
      ep, GetParam().eplb ? " eplb" : "", static_cast<long long>(tokens), sequential_s,
      16 / sequential_s, tokens / sequential_s, concurrent_s, 16 / concurrent_s,
      tokens / concurrent_s, steps, static_cast<long long>(2 * tokens));
  RecordProperty("concurrent_tokens_per_s", std::to_string(tokens / concurrent_s));
  // The expert placement moved while serving, and /metrics and /v1/cluster agree on it.
  HttpReply c = Get(*client, "/v1/cluster");
  const double rebalances = MetricValue(m.body, "eep_eplb_rebalances_total");
  EXPECT_EQ(c.json["map_version"].get<double>(), MetricValue(m.body, "eep_expert_map_version"));
  if (GetParam().eplb) {
    EXPECT_GT(rebalances, 0);
    EXPECT_GT(MetricValue(m.body, "eep_eplb_moved_experts_total"), 0);
  } else {
    EXPECT_EQ(rebalances, 0);
  }
  EXPECT_EQ(server->Signal(SIGTERM, 30), 0) << server->Log();
}

INSTANTIATE_TEST_SUITE_P(Ep, ConcurrencyTest,
                         ::testing::Values(Setup{1, false}, Setup{2, false}, Setup{2, true}),
                         [](const auto& info) {
                           return "ep" + std::to_string(info.param.ep) +
                                  (info.param.eplb ? "_eplb" : "");
                         });

}  // namespace
}  // namespace eep::serve::test
