// /metrics and /v1/cluster reflect what was served; client disconnects release their
// sequences; SIGTERM lets requests in flight finish.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "serve_test_util.h"
#include "test_util.h"

namespace eep::serve::test {
namespace {

using namespace std::chrono_literals;

// Polls /metrics until `pred` holds (bounded). Returns the last text.
std::string WaitMetrics(httplib::Client& c, const std::function<bool(const std::string&)>& pred,
                        std::chrono::seconds timeout = 30s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string text;
  while (std::chrono::steady_clock::now() < deadline) {
    text = Get(c, "/metrics").body;
    if (pred(text)) return text;
    std::this_thread::sleep_for(20ms);  // polling interval of a deadline-bounded wait
  }
  return text;
}

TEST(ServeMetricsTest, MetricsAndClusterReflectRequests) {
  std::string error;
  auto server = ServerProcess::Start(
      {"--model", eep::test::ModelDir("deepseekv3-tiny"), "--ep", "2"}, &error);
  ASSERT_TRUE(server) << error;
  auto client = server->Client();
  HttpReply m0 = Get(*client, "/metrics");
  ASSERT_EQ(m0.status, 200);
  EXPECT_NE(m0.body.find("# TYPE eep_requests_total counter"), std::string::npos);
  EXPECT_EQ(MetricValue(m0.body, "eep_requests_total", "status=\"ok\""), 0);
  EXPECT_EQ(MetricValue(m0.body, "eep_rank_up", "rank=\"0\""), 1);
  EXPECT_EQ(MetricValue(m0.body, "eep_rank_up", "rank=\"1\""), 1);
  HttpReply c0 = Get(*client, "/v1/cluster");
  ASSERT_EQ(c0.status, 200);
  ASSERT_EQ(c0.json["ranks"].size(), 2u);
  int64_t prompt = 0, generated = 0;
  const std::vector<std::vector<int64_t>> prompts{
      {1, 2, 3, 4}, {10, 20, 30}, {7, 8, 9, 10, 11, 12}};
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t n = 3 + static_cast<int64_t>(i);
    HttpReply r = PostJson(
        *client, "/v1/completions",
        {{"prompt", prompts[i]}, {"max_tokens", n}, {"temperature", 0}, {"ignore_eos", true}});
    ASSERT_EQ(r.status, 200) << r.body;
    prompt += static_cast<int64_t>(prompts[i].size());
    generated += n;
  }
  ASSERT_EQ(PostJson(*client, "/v1/completions", {{"prompt", "x"}, {"top_p", 2}}).status, 400);
  HttpReply m = Get(*client, "/metrics");
  ASSERT_EQ(m.status, 200);
  EXPECT_EQ(m.json, nullptr);  // text, not JSON
  const std::string& t = m.body;
  EXPECT_EQ(MetricValue(t, "eep_requests_total", "status=\"ok\""), 3);
  EXPECT_EQ(MetricValue(t, "eep_requests_total", "status=\"invalid\""), 1);
  EXPECT_EQ(MetricValue(t, "eep_request_success_total", "finish_reason=\"length\""), 3);
  EXPECT_EQ(MetricValue(t, "eep_prompt_tokens_total"), static_cast<double>(prompt));
  EXPECT_EQ(MetricValue(t, "eep_generation_tokens_total"), static_cast<double>(generated));
  EXPECT_EQ(MetricValue(t, "eep_request_latency_seconds_count"), 3);
  EXPECT_EQ(MetricValue(t, "eep_request_latency_seconds_bucket", "le=\"+Inf\""), 3);
  EXPECT_GT(MetricValue(t, "eep_request_latency_seconds_sum"), 0);
  EXPECT_EQ(MetricValue(t, "eep_time_to_first_token_seconds_count"), 3);
  EXPECT_EQ(MetricValue(t, "eep_running_requests"), 0);
  EXPECT_EQ(MetricValue(t, "eep_waiting_requests"), 0);
  EXPECT_EQ(MetricValue(t, "eep_eplb_rebalances_total"), 0);
  EXPECT_EQ(MetricValue(t, "eep_eplb_moved_experts_total"), 0);
  // Expert load: DeepSeek-V3-tiny's MoE layers start after its dense ones; the counts add up to
  // top-k routings per token over the window.
  double load = 0;
  size_t samples = 0;
  std::istringstream in(t);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("eep_expert_load{", 0) == 0) {
      ++samples;
      load += std::stod(line.substr(line.rfind(' ') + 1));
    }
  EXPECT_GT(samples, 0u);
  EXPECT_GT(load, 0);
  // Histogram buckets are cumulative.
  double prev = 0;
  std::istringstream in2(t);
  while (std::getline(in2, line))
    if (line.rfind("eep_request_latency_seconds_bucket{", 0) == 0) {
      const double v = std::stod(line.substr(line.rfind(' ') + 1));
      EXPECT_GE(v, prev);
      prev = v;
    }
  HttpReply c = Get(*client, "/v1/cluster");
  ASSERT_EQ(c.status, 200);
  EXPECT_GE(c.json["epoch"].get<int64_t>(), 1);
  EXPECT_EQ(c.json["steps"].get<int64_t>(),
            static_cast<int64_t>(MetricValue(t, "eep_engine_steps_total")));
  EXPECT_GE(c.json["steps"].get<int64_t>(), 3 + 4 + 5 - 2);
  EXPECT_EQ(c.json["map_version"], 0);
  ASSERT_EQ(c.json["ranks"].size(), 2u);
  for (size_t r = 0; r < 2; ++r) {
    const auto& rank = c.json["ranks"][r];
    EXPECT_EQ(rank["id"], r);
    EXPECT_GT(rank["pid"].get<int>(), 0);
    EXPECT_NE(rank["pid"].get<int>(), server->pid());
    EXPECT_EQ(rank["state"], "alive");
    EXPECT_GE(rank["num_seqs"].get<int64_t>(), 0);
  }
  EXPECT_EQ(server->Signal(SIGTERM, 30), 0) << server->Log();
}

TEST(ServeMetricsTest, ClientDisconnectReleasesTheSequence) {
  std::string error;
  auto server =
      ServerProcess::Start({"--model", eep::test::ModelDir("qwen3moe-tiny"), "--ep", "2"}, &error);
  ASSERT_TRUE(server) << error;
  auto client = server->Client();
  const nlohmann::json long_body{
      {"prompt", "Hello"}, {"max_tokens", 1000}, {"temperature", 0}, {"ignore_eos", true}};
  // Streaming: the client hangs up after the first event.
  {
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.set_header("Content-Type", "application/json");
    nlohmann::json b = long_body;
    b["stream"] = true;
    req.body = b.dump();
    req.content_receiver = [](const char*, size_t, uint64_t, uint64_t) { return false; };
    httplib::Response res;
    httplib::Error err;
    auto c = server->Client();
    c->send(req, res, err);
  }
  std::string t = WaitMetrics(*client, [](const std::string& m) {
    return MetricValue(m, "eep_requests_total", "status=\"aborted\"") == 1 &&
           MetricValue(m, "eep_running_requests") == 0;
  });
  EXPECT_EQ(MetricValue(t, "eep_requests_total", "status=\"aborted\""), 1) << t;
  EXPECT_EQ(MetricValue(t, "eep_running_requests"), 0);
  EXPECT_LT(MetricValue(t, "eep_generation_tokens_total"), 1000);
  // Non-streaming: the client closes its socket while waiting for the body.
  {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(server->port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const std::string body = long_body.dump();
    const std::string http =
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: " +
        std::to_string(body.size()) + "\r\n\r\n" + body;
    ASSERT_EQ(write(fd, http.data(), http.size()), static_cast<ssize_t>(http.size()));
    // Wait until it runs, then hang up.
    WaitMetrics(*client,
                [](const std::string& m) { return MetricValue(m, "eep_running_requests") == 1; });
    close(fd);
  }
  t = WaitMetrics(*client, [](const std::string& m) {
    return MetricValue(m, "eep_requests_total", "status=\"aborted\"") == 2 &&
           MetricValue(m, "eep_running_requests") == 0;
  });
  EXPECT_EQ(MetricValue(t, "eep_requests_total", "status=\"aborted\""), 2) << t;
  EXPECT_EQ(MetricValue(t, "eep_running_requests"), 0);
  EXPECT_LT(MetricValue(t, "eep_generation_tokens_total"), 2000);
  // The released sequences' caches are gone from the ranks (applied with the next step).
  HttpReply r = PostJson(*client, "/v1/completions",
                         {{"prompt", "x"}, {"max_tokens", 2}, {"temperature", 0}});
  ASSERT_EQ(r.status, 200);
  HttpReply c = Get(*client, "/v1/cluster");
  int64_t seqs = 0;
  for (const auto& rank : c.json["ranks"]) seqs += rank["num_seqs"].get<int64_t>();
  EXPECT_LE(seqs, 1);  // at most the last request's, released with the next step
  EXPECT_EQ(server->Signal(SIGTERM, 30), 0) << server->Log();
}

TEST(ServeMetricsTest, SigtermFinishesRequestsInFlight) {
  std::string error;
  auto server =
      ServerProcess::Start({"--model", eep::test::ModelDir("qwen3moe-tiny"), "--ep", "2"}, &error);
  ASSERT_TRUE(server) << error;
  auto client = server->Client();
  HttpReply in_flight;
  std::thread t([&] {
    auto c = server->Client();
    in_flight = PostJson(
        *c, "/v1/completions",
        {{"prompt", "Hello"}, {"max_tokens", 300}, {"temperature", 0}, {"ignore_eos", true}});
  });
  WaitMetrics(*client,
              [](const std::string& m) { return MetricValue(m, "eep_running_requests") == 1; });
  const int status = server->Signal(SIGTERM, 60);
  t.join();
  EXPECT_EQ(status, 0) << server->Log();
  ASSERT_EQ(in_flight.status, 200) << in_flight.body;
  EXPECT_EQ(in_flight.json["usage"]["completion_tokens"], 300);
  EXPECT_EQ(in_flight.json["choices"][0]["finish_reason"], "length");
  const std::string log = server->Log();
  EXPECT_NE(log.find("SIGTERM received"), std::string::npos) << log;
  EXPECT_NE(log.find("serve: stopped"), std::string::npos) << log;
}

}  // namespace
}  // namespace eep::serve::test
