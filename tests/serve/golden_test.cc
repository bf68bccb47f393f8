// Greedy completions through the HTTP server equal the golden tokens of HF transformers, for
// every test model on two expert-parallel ranks.
#include <gtest/gtest.h>

#include <thread>

#include "model/tokenizer.h"
#include "serve_test_util.h"
#include "test_util.h"

namespace eep::serve::test {
namespace {

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, GreedyTokensMatchTransformers) {
  const std::string model = GetParam();
  std::string error;
  auto server = ServerProcess::Start({"--model", eep::test::ModelDir(model), "--ep", "2"}, &error);
  ASSERT_TRUE(server) << error;
  auto client = server->Client();
  auto tok = Tokenizer::FromFile(eep::test::ModelDir(model) + "/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  for (const auto& g : LoadGolden(model)) {
    nlohmann::json body{{"model", model},   {"prompt", g.ids},          {"max_tokens", 16},
                        {"temperature", 0}, {"return_token_ids", true}, {"ignore_eos", true}};
    HttpReply r = PostJson(*client, "/v1/completions", body);
    ASSERT_EQ(r.status, 200) << r.body << "\n" << server->Log();
    const auto& choice = r.json["choices"][0];
    EXPECT_EQ(choice["token_ids"].get<std::vector<int64_t>>(), g.greedy) << model << ": " << g.text;
    EXPECT_EQ(choice["finish_reason"], "length");
    EXPECT_EQ(r.json["usage"]["prompt_tokens"], g.ids.size());
    EXPECT_EQ(r.json["usage"]["completion_tokens"], 16);
    EXPECT_EQ(r.json["usage"]["total_tokens"], g.ids.size() + 16);
    EXPECT_EQ(r.json["object"], "text_completion");
    EXPECT_EQ(r.json["model"], model);
    EXPECT_EQ(r.json["id"].get<std::string>().rfind("cmpl-", 0), 0u);
    // The text is the golden tokens' text (special tokens and ids past the tokenizer's
    // vocabulary add none).
    std::vector<int64_t> shown;
    for (int64_t id : g.greedy)
      if (id < (*tok)->vocab_size() && !(*tok)->IdToToken(id).value_or("").starts_with("<|"))
        shown.push_back(id);
    auto text = (*tok)->Decode(shown);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(choice["text"], *text);
  }
  // The text prompt gives the same as its ids.
  const auto g = LoadGolden(model).front();
  HttpReply r = PostJson(*client, "/v1/completions",
                         {{"prompt", g.text},
                          {"max_tokens", 16},
                          {"temperature", 0},
                          {"return_token_ids", true},
                          {"ignore_eos", true}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.json["choices"][0]["token_ids"].get<std::vector<int64_t>>(), g.greedy);
  EXPECT_EQ(server->Signal(SIGTERM, 30), 0) << server->Log();
}

INSTANTIATE_TEST_SUITE_P(Models, GoldenTest,
                         ::testing::Values("qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (c == '-') c = '_';
                           return n;
                         });

}  // namespace
}  // namespace eep::serve::test

namespace eep::serve::test {
namespace {

// A token budget smaller than some prompts: those prefill in a step of their own, the rest
// batch around them, and every output is still the golden one.
TEST(GoldenBudgetTest, PromptsLongerThanTheBudgetRunAloneAndStayExact) {
  std::string error;
  auto server = ServerProcess::Start({"--model", eep::test::ModelDir("qwen3moe-tiny"), "--ep", "2",
                                      "--max-num-seqs", "4", "--max-num-batched-tokens", "40"},
                                     &error);
  ASSERT_TRUE(server) << error;
  const auto golden = LoadGolden("qwen3moe-tiny");
  std::vector<HttpReply> replies(golden.size() * 2);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < replies.size(); ++i)
    threads.emplace_back([&, i] {
      auto c = server->Client();
      replies[i] = PostJson(*c, "/v1/completions",
                            {{"prompt", golden[i % golden.size()].ids},
                             {"max_tokens", 16},
                             {"temperature", 0},
                             {"return_token_ids", true},
                             {"ignore_eos", true}});
    });
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < replies.size(); ++i) {
    ASSERT_EQ(replies[i].status, 200) << replies[i].body;
    EXPECT_EQ(replies[i].json["choices"][0]["token_ids"].get<std::vector<int64_t>>(),
              golden[i % golden.size()].greedy)
        << i;
  }
  EXPECT_EQ(server->Signal(SIGTERM, 30), 0) << server->Log();
}

}  // namespace
}  // namespace eep::serve::test
