// Bad requests get OpenAI-style 4xx errors naming the field, and the server keeps serving.
#include <gtest/gtest.h>

#include "serve_test_util.h"
#include "test_util.h"

namespace eep::serve::test {
namespace {

TEST(ServeErrorsTest, BadRequestsAre400AndTheServerStaysUp) {
  std::string error;
  auto server = ServerProcess::Start(
      {"--model", eep::test::ModelDir("mixtral-tiny"), "--ep", "2", "--served-model-name", "tiny"},
      &error);
  ASSERT_TRUE(server) << error;
  auto client = server->Client();
  std::vector<int64_t> too_long(1100, 5);
  std::vector<int64_t> fills_context(1024, 5);
  struct Case {
    std::string path;
    std::string body;
    int status;
    const char* param;  // nullptr: null
  };
  const std::vector<Case> cases = {
      {"/v1/completions", "{not json", 400, nullptr},
      {"/v1/completions", "", 400, nullptr},
      {"/v1/completions", "[1, 2]", 400, nullptr},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": -1})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "hi", "max_tokens": "8"})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "hi", "temperature": -1})", 400, "temperature"},
      {"/v1/completions", R"({"prompt": "hi", "top_p": 0})", 400, "top_p"},
      {"/v1/completions", R"({"prompt": "hi", "top_p": 1.01})", 400, "top_p"},
      {"/v1/completions", R"({"prompt": "hi", "stream": "yes"})", 400, "stream"},
      {"/v1/completions", R"({"prompt": "hi", "stop": {"a": 1}})", 400, "stop"},
      {"/v1/completions", R"({"prompt": [1, 2, 512]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": [1, 2, -3]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": [1, "a"]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": 42})", 400, "prompt"},
      {"/v1/completions", R"({"max_tokens": 4})", 400, "prompt"},
      {"/v1/completions", nlohmann::json{{"prompt", too_long}}.dump(), 400, "prompt"},
      {"/v1/completions", nlohmann::json{{"prompt", fills_context}}.dump(), 400, "prompt"},
      {"/v1/completions", nlohmann::json{{"prompt", {1, 2, 3}}, {"max_tokens", 1022}}.dump(), 400,
       "max_tokens"},
      {"/v1/completions", R"({"prompt": "hi", "n": 3})", 400, "n"},
      {"/v1/completions", R"({"prompt": "hi", "model": "gpt-4"})", 404, "model"},
      {"/v1/chat/completions", R"({"messages": "hi"})", 400, "messages"},
      {"/v1/chat/completions", R"({"messages": [{"content": "hi"}]})", 400, "messages"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "hi"}], "top_p": -1})",
       400, "top_p"},
      {"/v1/chat/completions", R"({"prompt": "hi"})", 400, "messages"},
  };
  for (const auto& c : cases) {
    HttpReply r = PostRaw(*client, c.path, c.body);
    ASSERT_EQ(r.status, c.status) << c.path << " " << c.body.substr(0, 80) << " -> " << r.body;
    ASSERT_TRUE(r.json.is_object()) << r.body;
    const auto& e = r.json["error"];
    EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << r.body;
    EXPECT_EQ(e["type"], "invalid_request_error") << r.body;
    if (c.param)
      EXPECT_EQ(e["param"], c.param) << r.body;
    else
      EXPECT_TRUE(e["param"].is_null()) << r.body;
    EXPECT_TRUE(e.contains("code"));
    // Still serving.
    HttpReply h = Get(*client, "/health");
    ASSERT_EQ(h.status, 200) << "after " << c.body.substr(0, 80);
    EXPECT_EQ(h.json, nlohmann::json({{"status", "ok"}}));
  }
  // Unknown fields are ignored, as OpenAI does; the served name is accepted.
  HttpReply ok =
      PostRaw(*client, "/v1/completions",
              R"({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "model": "tiny",
                             "frobnicate": {"x": [1]}, "logit_bias": null})");
  ASSERT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(ok.json["model"], "tiny");
  // Unknown routes are JSON 404s.
  HttpReply nf = Get(*client, "/v1/nothing");
  EXPECT_EQ(nf.status, 404);
  EXPECT_TRUE(nf.json["error"].is_object());
  HttpReply models = Get(*client, "/v1/models");
  ASSERT_EQ(models.status, 200);
  EXPECT_EQ(models.json["data"][0]["id"], "tiny");
  // The invalid requests are counted.
  HttpReply m = Get(*client, "/metrics");
  EXPECT_EQ(MetricValue(m.body, "eep_requests_total", "status=\"invalid\""),
            static_cast<double>(cases.size()));
  EXPECT_EQ(MetricValue(m.body, "eep_requests_total", "status=\"ok\""), 1);
  EXPECT_EQ(server->Signal(SIGTERM, 30), 0) << server->Log();
}

}  // namespace
}  // namespace eep::serve::test
