// Helpers of the serve tests: running `eep serve` as a child process and talking to it.
#pragma once

#include <httplib.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace eep::serve::test {

// `eep serve --port 0 ARGS...` in its own process; the port comes from its first stdout line.
class ServerProcess {
 public:
  // Starts the server and waits up to timeout_s for "listening http://HOST:PORT". On failure
  // returns null and puts the reason (with the server's log) in *error.
  static std::unique_ptr<ServerProcess> Start(const std::vector<std::string>& args,
                                              std::string* error, double timeout_s = 60);
  ~ServerProcess();  // SIGKILL if still running

  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  // A fresh client with generous timeouts (CPU steps of a loaded 2-core machine).
  std::unique_ptr<httplib::Client> Client(int read_timeout_s = 120) const;
  // Sends `sig` and waits up to timeout_s for exit. Returns the wait status, or -1 on timeout
  // (the process is then killed).
  int Signal(int sig, double timeout_s);
  // The server's stderr so far.
  std::string Log() const;

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  int stdout_fd_ = -1;
  std::string log_path_;
};

struct HttpReply {
  int status = 0;  // 0: no response (connection error)
  std::string body;
  nlohmann::json json;  // the body parsed when it is JSON, else null
};
HttpReply PostJson(httplib::Client& client, const std::string& path, const nlohmann::json& body);
HttpReply PostRaw(httplib::Client& client, const std::string& path, const std::string& body);
HttpReply Get(httplib::Client& client, const std::string& path);

// A streamed (SSE) response: the JSON of each `data:` event and whether `data: [DONE]` ended it.
struct StreamReply {
  int status = 0;
  std::vector<nlohmann::json> events;
  bool done = false;
  std::string raw;
};
StreamReply PostStream(httplib::Client& client, const std::string& path,
                       const nlohmann::json& body);
// Parses an SSE body.
StreamReply ParseSse(const std::string& body);

// Incremental SSE parsing: Feed() takes bytes as they arrive and returns the complete `data:`
// events they finish (JSON; `[DONE]` sets done() instead).
class SseReader {
 public:
  std::vector<nlohmann::json> Feed(const char* data, size_t len);
  bool done() const { return done_; }
  const std::string& raw() const { return raw_; }

 private:
  std::string raw_;
  size_t parsed_ = 0;  // raw_ bytes consumed by complete events
  bool done_ = false;
};

// A streamed POST read as it arrives: `on_event` sees every JSON event when it comes (from the
// client's thread). Returns all events, as PostStream does; status 0 on a connection error.
StreamReply PostStreamWatched(httplib::Client& client, const std::string& path,
                              const nlohmann::json& body,
                              const std::function<void(const nlohmann::json&)>& on_event);

// Polls GET /v1/cluster (a fresh connection each time, every poll_ms) until `done` holds for the
// JSON or `deadline` passes. Returns whether it held; *last gets the last JSON seen (null if
// none came back).
bool WaitForCluster(const std::string& host, int port,
                    const std::function<bool(const nlohmann::json&)>& done,
                    std::chrono::steady_clock::time_point deadline, nlohmann::json* last,
                    int poll_ms = 20);

// The value of a Prometheus sample "name{labels}" (labels exactly as printed, "" for none), or
// -1 if absent.
double MetricValue(const std::string& metrics_text, const std::string& name,
                   const std::string& labels = "");

// Golden prompts of a test model: prompt ids and the 16 greedy tokens of HF transformers.
struct GoldenPrompt {
  std::string text;
  std::vector<int64_t> ids;
  std::vector<int64_t> greedy;
};
std::vector<GoldenPrompt> LoadGolden(const std::string& model);

}  // namespace eep::serve::test
