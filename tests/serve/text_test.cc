// Incremental detokenization (UTF-8 split across tokens, stop strings) and request parsing.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "serve/internal.h"
#include "test_util.h"

namespace eep::serve {
namespace {

std::unique_ptr<Tokenizer> LoadTok() {
  auto t = Tokenizer::FromFile(eep::test::ModelDir("qwen3moe-tiny") + "/tokenizer.json");
  EXPECT_TRUE(t.ok());
  return std::move(*t);
}

// Feeds ids one by one; returns the concatenated deltas and the detokenizer's final text.
std::pair<std::string, std::string> Stream(const Tokenizer* tok, const std::vector<int64_t>& ids,
                                           std::vector<std::string> stop,
                                           size_t* consumed = nullptr) {
  IncrementalDetokenizer d(tok, std::move(stop), nullptr);
  std::string joined;
  size_t n = 0;
  for (int64_t id : ids) {
    ++n;
    const bool stopped = d.Push(id);
    if (stopped) break;
    const std::string delta = d.TakeDelta();
    // Every delta is valid UTF-8 on its own (it becomes a JSON string).
    EXPECT_EQ(nlohmann::json(delta).dump(-1, ' ', false, nlohmann::json::error_handler_t::ignore),
              nlohmann::json(delta).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    joined += delta;
  }
  joined += d.Finish();
  if (consumed) *consumed = n;
  return {joined, d.text()};
}

TEST(DetokenizerTest, MultiByteCharactersSplitAcrossTokens) {
  auto tok = LoadTok();
  const std::string text = "专家并行 🤖 résilience, 1234 tokens; they'll recover.";
  auto ids = tok->Encode(text);
  ASSERT_TRUE(ids.ok());
  auto [joined, final_text] = Stream(tok.get(), *ids, {});
  EXPECT_EQ(final_text, text);
  EXPECT_EQ(joined, text);
}

TEST(DetokenizerTest, RandomTokensDeltasConcatenateToTheText) {
  auto tok = LoadTok();
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> ids(1 + rng() % 40);
    for (auto& id : ids) id = static_cast<int64_t>(rng() % 500);
    auto full = tok->Decode(ids);
    ASSERT_TRUE(full.ok());
    auto [joined, final_text] = Stream(tok.get(), ids, {});
    EXPECT_EQ(final_text, *full) << trial;
    EXPECT_EQ(joined, *full) << trial;
    // A stop string taken from the middle of the text cuts it at its first occurrence.
    if (full->size() > 6) {
      const size_t at = 2 + rng() % (full->size() - 4);
      const size_t len = std::min<size_t>(1 + rng() % 3, full->size() - at);
      auto boundary = [&](size_t i) {
        return i == full->size() || (static_cast<unsigned char>((*full)[i]) & 0xC0) != 0x80;
      };
      if (!boundary(at) || !boundary(at + len)) continue;  // stop strings are whole characters
      std::string stop = full->substr(at, len);
      if (stop.find("\xEF\xBF\xBD") != std::string::npos) continue;
      auto [j2, t2] = Stream(tok.get(), ids, {"zzzz-not-there", stop});
      // What is cut is the first occurrence of the stop string in the text before it
      // completes; characters still incomplete at that point cannot match.
      EXPECT_EQ(j2, t2) << trial;
      EXPECT_EQ(full->find(stop), t2.size()) << trial << " stop '" << stop << "'";
    }
  }
}

TEST(DetokenizerTest, StopStringsAreCutAndHeldBack) {
  auto tok = LoadTok();
  auto ids = tok->Encode("Hello world, hello experts");
  ASSERT_TRUE(ids.ok());
  size_t consumed = 0;
  auto [joined, text] = Stream(tok.get(), *ids, {"lo ex"}, &consumed);
  EXPECT_EQ(text, "Hello world, hel");
  EXPECT_EQ(joined, text);
  EXPECT_LT(consumed, ids->size());
  // Held back: while the text ends in a prefix of a stop string, that part is not handed out.
  IncrementalDetokenizer d(tok.get(), {"world"}, nullptr);
  const std::vector<int64_t> partial = *tok->Encode("Hello wor");
  for (int64_t id : partial) d.Push(id);
  EXPECT_EQ(d.TakeDelta(), "Hello ");
  EXPECT_EQ(d.Finish(), "wor");
}

TEST(DetokenizerTest, HiddenAndOutOfVocabularyIdsAddNoText) {
  auto tok = LoadTok();
  std::set<int64_t> hidden{*tok->TokenToId("<|im_end|>")};
  IncrementalDetokenizer d(tok.get(), {}, &hidden);
  auto ids = *tok->Encode("ab");
  d.Push(ids[0]);
  d.Push(*tok->TokenToId("<|im_end|>"));
  d.Push(505);  // a model row past the tokenizer's vocabulary
  for (size_t i = 1; i < ids.size(); ++i) d.Push(ids[i]);
  d.Finish();
  EXPECT_EQ(d.text(), "ab");
}

TEST(ChatTemplateTest, DefaultChatML) {
  auto t = ChatTemplate::Load(eep::test::ModelDir("qwen3moe-tiny"));
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->Render({{"system", "Be brief."}, {"user", "Hi"}}, true),
            "<|im_start|>system\nBe "
            "brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

class ParseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tok_ = LoadTok();
    auto t = ChatTemplate::Load(eep::test::ModelDir("qwen3moe-tiny"));
    ASSERT_TRUE(t.ok());
    tmpl_ = *t;
    info_ = {tok_.get(), &tmpl_, "m", 512, 64};
  }
  std::optional<ApiError> Parse(const std::string& body, bool chat = false) {
    return ParseCompletionRequest(nlohmann::json::parse(body), chat, info_, &params_);
  }
  std::unique_ptr<Tokenizer> tok_;
  ChatTemplate tmpl_;
  ModelInfo info_;
  CompletionParams params_;
};

TEST_F(ParseTest, Defaults) {
  ASSERT_FALSE(Parse(R"({"prompt": "Hello"})"));
  EXPECT_EQ(params_.max_tokens, 16);
  EXPECT_EQ(params_.sampling.temperature, 1.0);
  EXPECT_EQ(params_.prompt_ids, *tok_->Encode("Hello"));
  ASSERT_FALSE(Parse(R"({"prompt": [[1, 2, 3]], "unknown_field": {"x": 1}, "model": "m"})"));
  EXPECT_EQ(params_.prompt_ids, (std::vector<int64_t>{1, 2, 3}));
  ASSERT_FALSE(Parse(R"({"messages": [{"role": "user", "content": "Hi"}]})", true));
  EXPECT_EQ(params_.max_tokens, 64 - static_cast<int64_t>(params_.prompt_ids.size()));
  EXPECT_EQ(params_.prompt_ids.front(), *tok_->TokenToId("<|im_start|>"));
}

TEST_F(ParseTest, Errors) {
  struct Case {
    const char* body;
    bool chat;
    const char* param;
  };
  const Case cases[] = {
      {R"({"prompt": "x", "max_tokens": -1})", false, "max_tokens"},
      {R"({"prompt": "x", "max_tokens": "16"})", false, "max_tokens"},
      {R"({"prompt": "x", "max_tokens": 1.5})", false, "max_tokens"},
      {R"({"prompt": "x", "max_tokens": 100})", false, "max_tokens"},
      {R"({"prompt": "x", "temperature": -0.5})", false, "temperature"},
      {R"({"prompt": "x", "temperature": "hot"})", false, "temperature"},
      {R"({"prompt": "x", "top_p": 0})", false, "top_p"},
      {R"({"prompt": "x", "top_p": 1.5})", false, "top_p"},
      {R"({"prompt": "x", "top_k": -2})", false, "top_k"},
      {R"({"prompt": "x", "seed": "1"})", false, "seed"},
      {R"({"prompt": "x", "stream": 1})", false, "stream"},
      {R"({"prompt": "x", "stop": 5})", false, "stop"},
      {R"({"prompt": "x", "stop": ["a", 1]})", false, "stop"},
      {R"({"prompt": "x", "n": 2})", false, "n"},
      {R"({"prompt": "x", "model": "other"})", false, "model"},
      {R"({"prompt": [1, 512]})", false, "prompt"},
      {R"({"prompt": [1, -1]})", false, "prompt"},
      {R"({"prompt": [1, true]})", false, "prompt"},
      {R"({"prompt": []})", false, "prompt"},
      {R"({"prompt": ""})", false, "prompt"},
      {R"({"prompt": ["a", "b"]})", false, "prompt"},
      {R"({"prompt": 3})", false, "prompt"},
      {R"({"max_tokens": 3})", false, "prompt"},
      {R"({"prompt": "x", "ignore_eos": "yes"})", false, "ignore_eos"},
      {R"({"prompt": "x", "return_token_ids": 1})", false, "return_token_ids"},
      {R"({"messages": "hi"})", true, "messages"},
      {R"({"messages": []})", true, "messages"},
      {R"({"messages": [{"role": 1, "content": "x"}]})", true, "messages"},
      {R"({"messages": [{"role": "user", "content": 5}]})", true, "messages"},
      {R"({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0})", true,
       "max_completion_tokens"},
  };
  for (const auto& c : cases) {
    auto err = Parse(c.body, c.chat);
    ASSERT_TRUE(err) << c.body;
    EXPECT_EQ(err->param, c.param) << c.body;
    EXPECT_FALSE(err->message.empty());
    EXPECT_EQ(err->status, std::string(c.param) == "model" ? 404 : 400) << c.body;
  }
  // A prompt as long as the context leaves no room for a token.
  std::vector<int64_t> ids(64, 5);
  EXPECT_TRUE(ParseCompletionRequest({{"prompt", ids}}, false, info_, &params_));
  ids.resize(63);
  EXPECT_FALSE(
      ParseCompletionRequest({{"prompt", ids}, {"max_tokens", 1}}, false, info_, &params_));
}

}  // namespace
}  // namespace eep::serve

namespace eep::serve {
namespace {

TEST(ChatTemplateTest, TokenizerConfigTemplates) {
  const std::string dir = eep::test::TempDir("chat-template");
  auto write = [&](const nlohmann::json& j) {
    std::ofstream(dir + "/tokenizer_config.json") << j.dump();
  };
  write({{"chat_template",
          "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor "
          "%}"}});
  auto t = ChatTemplate::Load(dir);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->description().rfind("ChatML (", 0), 0u) << t->description();
  write({{"chat_template",
          nlohmann::json::array({{{"name", "default"}, {"template", "<|im_start|>..."}}})}});
  ASSERT_TRUE(ChatTemplate::Load(dir).ok());
  // Another style is reported and ChatML used instead.
  write({{"chat_template",
          "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"}});
  t = ChatTemplate::Load(dir);
  ASSERT_TRUE(t.ok());
  EXPECT_NE(t->description().find("not ChatML"), std::string::npos);
  EXPECT_EQ(t->Render({{"user", "x"}}, true),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
  write({{"chat_template", 5}});
  EXPECT_FALSE(ChatTemplate::Load(dir).ok());
  write({{"model_max_length", 10}});
  ASSERT_TRUE(ChatTemplate::Load(dir).ok());
  EXPECT_EQ(ChatTemplate::Load(dir)->description(), "default ChatML");
}

}  // namespace
}  // namespace eep::serve
