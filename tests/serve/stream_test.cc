// Streaming (SSE) deltas concatenate to the non-streamed result; stop strings and stop tokens;
// chat completions with the ChatML template.
#include <gtest/gtest.h>

#include "model/tokenizer.h"
#include "serve/internal.h"
#include "serve_test_util.h"
#include "test_util.h"

namespace eep::serve::test {
namespace {

class StreamTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string error;
    server_ =
        ServerProcess::Start({"--model", eep::test::ModelDir("qwen3moe-tiny"), "--ep", "2"}, &error)
            .release();
    ASSERT_NE(server_, nullptr) << error;
  }
  static void TearDownTestSuite() {
    if (server_) {
      EXPECT_EQ(server_->Signal(SIGTERM, 30), 0) << server_->Log();
    }
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    client_ = server_->Client();
  }
  static ServerProcess* server_;
  std::unique_ptr<httplib::Client> client_;
};
ServerProcess* StreamTest::server_ = nullptr;

struct Joined {
  std::string text;
  std::vector<int64_t> ids;
  std::string finish;
  nlohmann::json usage;
};

Joined Join(const StreamReply& s, bool chat) {
  Joined j;
  for (const auto& e : s.events) {
    if (e.contains("usage") && !e["usage"].is_null()) j.usage = e["usage"];
    if (e["choices"].empty()) continue;
    const auto& c = e["choices"][0];
    j.text += chat ? c["delta"].value("content", "") : c["text"].get<std::string>();
    if (c.contains("token_ids"))
      for (const auto& t : c["token_ids"]) j.ids.push_back(t.get<int64_t>());
    if (!c["finish_reason"].is_null()) {
      EXPECT_TRUE(j.finish.empty()) << "finish_reason twice";
      j.finish = c["finish_reason"].get<std::string>();
    }
  }
  return j;
}

TEST_F(StreamTest, DeltasConcatenateToTheNonStreamedText) {
  for (const std::string prompt :
       {"Hello", "专家并行 🤖 résilience", "def forward(self, x):"}) {
    for (const nlohmann::json& sampling :
         {nlohmann::json{{"temperature", 0}},
          nlohmann::json{{"temperature", 0.9}, {"top_p", 0.9}, {"seed", 11}}}) {
      nlohmann::json body{
          {"prompt", prompt}, {"max_tokens", 40}, {"ignore_eos", true}, {"return_token_ids", true}};
      body.update(sampling);
      HttpReply plain = PostJson(*client_, "/v1/completions", body);
      ASSERT_EQ(plain.status, 200) << plain.body;
      body["stream"] = true;
      body["stream_options"] = {{"include_usage", true}};
      StreamReply s = PostStream(*client_, "/v1/completions", body);
      ASSERT_EQ(s.status, 200);
      EXPECT_TRUE(s.done) << s.raw;
      Joined j = Join(s, false);
      const auto& c = plain.json["choices"][0];
      EXPECT_EQ(j.text, c["text"].get<std::string>()) << prompt << " " << sampling.dump();
      EXPECT_EQ(j.ids, c["token_ids"].get<std::vector<int64_t>>());
      EXPECT_EQ(j.finish, "length");
      EXPECT_EQ(j.usage, plain.json["usage"]);
      EXPECT_EQ(j.usage["completion_tokens"], 40);
      // The usage comes in its own last event with no choices.
      ASSERT_FALSE(s.events.empty());
      EXPECT_TRUE(s.events.back()["choices"].empty());
      for (const auto& e : s.events) {
        EXPECT_EQ(e["object"], "text_completion");
        EXPECT_EQ(e["id"], s.events.front()["id"]);
      }
    }
  }
}

TEST_F(StreamTest, StopStrings) {
  // A greedy text to cut.
  nlohmann::json body{{"prompt", "def forward(self, x):"},
                      {"max_tokens", 40},
                      {"temperature", 0},
                      {"ignore_eos", true},
                      {"return_token_ids", true}};
  HttpReply full = PostJson(*client_, "/v1/completions", body);
  ASSERT_EQ(full.status, 200);
  const std::string text = full.json["choices"][0]["text"];
  ASSERT_GE(text.size(), 12u) << text;
  // Stops taken from the text at character boundaries.
  std::vector<std::string> stops;
  for (size_t at : {text.size() / 3, text.size() / 2, size_t{3}}) {
    while (at > 0 && (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80) --at;
    size_t end = at + 2;
    while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
    stops.push_back(text.substr(at, end - at));
  }
  for (const auto& stop : stops) {
    const std::string expected = text.substr(0, text.find(stop));
    body["stop"] = stop;
    body.erase("stream");
    HttpReply r = PostJson(*client_, "/v1/completions", body);
    ASSERT_EQ(r.status, 200);
    EXPECT_EQ(r.json["choices"][0]["text"], expected) << "stop '" << stop << "'";
    EXPECT_EQ(r.json["choices"][0]["finish_reason"], "stop");
    const int64_t n = r.json["usage"]["completion_tokens"];
    EXPECT_LE(n, 40);
    EXPECT_EQ(r.json["choices"][0]["token_ids"].size(), static_cast<size_t>(n));
    body["stream"] = true;
    StreamReply s = PostStream(*client_, "/v1/completions", body);
    Joined j = Join(s, false);
    EXPECT_EQ(j.text, expected) << "stop '" << stop << "'";
    EXPECT_EQ(j.finish, "stop");
    EXPECT_TRUE(s.done);
  }
  // A list: the earliest match wins.
  body.erase("stream");
  body["stop"] = nlohmann::json::array({stops[0], stops[2], "not in the text at all"});
  HttpReply r = PostJson(*client_, "/v1/completions", body);
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.json["choices"][0]["text"],
            text.substr(0, std::min(text.find(stops[0]), text.find(stops[2]))));
  // A stop string that never occurs changes nothing.
  body["stop"] = "not in the text at all";
  r = PostJson(*client_, "/v1/completions", body);
  EXPECT_EQ(r.json["choices"][0]["text"], text);
  EXPECT_EQ(r.json["choices"][0]["finish_reason"], "length");
}

TEST_F(StreamTest, StopTokenIdsEndWithoutTheirText) {
  nlohmann::json body{{"prompt", "Hello"},
                      {"max_tokens", 30},
                      {"temperature", 0},
                      {"ignore_eos", true},
                      {"return_token_ids", true}};
  HttpReply full = PostJson(*client_, "/v1/completions", body);
  ASSERT_EQ(full.status, 200);
  const auto ids = full.json["choices"][0]["token_ids"].get<std::vector<int64_t>>();
  const int64_t stop_id = ids[5];
  const size_t at = std::find(ids.begin(), ids.end(), stop_id) - ids.begin();
  body["stop_token_ids"] = {stop_id};
  HttpReply r = PostJson(*client_, "/v1/completions", body);
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.json["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r.json["choices"][0]["token_ids"].get<std::vector<int64_t>>(),
            std::vector<int64_t>(ids.begin(), ids.begin() + static_cast<ptrdiff_t>(at) + 1));
  EXPECT_EQ(r.json["usage"]["completion_tokens"], at + 1);
  // The text is that of the tokens before the stop token.
  auto tok = Tokenizer::FromFile(eep::test::ModelDir("qwen3moe-tiny") + "/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  IncrementalDetokenizer d(tok->get(), {}, nullptr);
  for (size_t i = 0; i < at; ++i) d.Push(ids[i]);
  d.Finish();
  EXPECT_EQ(r.json["choices"][0]["text"], d.text());
}

TEST_F(StreamTest, ChatCompletions) {
  nlohmann::json body{{"model", "qwen3moe-tiny"},
                      {"messages",
                       {{{"role", "system"}, {"content", "You are terse."}},
                        {{"role", "user"}, {"content", "Hello there"}}}},
                      {"max_tokens", 24},
                      {"temperature", 0},
                      {"ignore_eos", true},
                      {"return_token_ids", true}};
  HttpReply plain = PostJson(*client_, "/v1/chat/completions", body);
  ASSERT_EQ(plain.status, 200) << plain.body;
  EXPECT_EQ(plain.json["object"], "chat.completion");
  EXPECT_EQ(plain.json["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  const auto& msg = plain.json["choices"][0]["message"];
  EXPECT_EQ(msg["role"], "assistant");
  // The same as a completion of the ChatML-rendered prompt.
  const std::string rendered =
      "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello "
      "there<|im_end|>\n<|im_start|>assistant\n";
  HttpReply comp = PostJson(*client_, "/v1/completions",
                            {{"prompt", rendered},
                             {"max_tokens", 24},
                             {"temperature", 0},
                             {"ignore_eos", true},
                             {"return_token_ids", true}});
  ASSERT_EQ(comp.status, 200);
  EXPECT_EQ(msg["content"], comp.json["choices"][0]["text"]);
  EXPECT_EQ(plain.json["prompt_token_ids"], comp.json["choices"][0]["prompt_token_ids"]);
  EXPECT_EQ(plain.json["usage"]["prompt_tokens"], comp.json["usage"]["prompt_tokens"]);
  // Streamed: the role first, then content deltas that add up to the message.
  body["stream"] = true;
  StreamReply s = PostStream(*client_, "/v1/chat/completions", body);
  ASSERT_EQ(s.status, 200);
  ASSERT_FALSE(s.events.empty());
  EXPECT_EQ(s.events[0]["choices"][0]["delta"]["role"], "assistant");
  for (const auto& e : s.events) EXPECT_EQ(e["object"], "chat.completion.chunk");
  Joined j = Join(s, true);
  EXPECT_EQ(j.text, msg["content"].get<std::string>());
  EXPECT_EQ(j.ids, plain.json["choices"][0]["token_ids"].get<std::vector<int64_t>>());
  EXPECT_EQ(j.finish, "length");
  EXPECT_TRUE(s.done);
  // Content given as a list of text parts is the same message.
  body.erase("stream");
  body["messages"][1]["content"] = {{{"type", "text"}, {"text", "Hello "}},
                                    {{"type", "text"}, {"text", "there"}}};
  HttpReply parts = PostJson(*client_, "/v1/chat/completions", body);
  ASSERT_EQ(parts.status, 200);
  EXPECT_EQ(parts.json["choices"][0]["message"]["content"], msg["content"]);
}

TEST_F(StreamTest, TokensArriveWhileGenerating) {
  // The first event must arrive long before the last token: read the stream incrementally.
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.set_header("Accept-Encoding", "gzip, deflate, br");  // must not make the stream buffer
  req.body = nlohmann::json{
      {"prompt", "Hello"},
      {"max_tokens", 400},
      {"temperature", 0},
      {"ignore_eos", true},
      {"stream",
       true}}.dump();
  std::string got;
  bool saw_event_before_end = false;
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
    got.append(data, len);
    if (got.find("\n\n") != std::string::npos && got.find("[DONE]") == std::string::npos)
      saw_event_before_end = true;
    return true;
  };
  httplib::Response res;
  httplib::Error err;
  ASSERT_TRUE(client_->send(req, res, err));
  EXPECT_EQ(res.status, 200);
  EXPECT_EQ(res.get_header_value("Content-Type"), "text/event-stream");
  EXPECT_TRUE(saw_event_before_end);
  StreamReply s = ParseSse(got);
  EXPECT_TRUE(s.done);
  // Many events, not one at the end (a slow reader gets several tokens per event, so no exact
  // count).
  EXPECT_GT(s.events.size(), 2u);
}

}  // namespace
}  // namespace eep::serve::test
