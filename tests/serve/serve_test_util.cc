#include "serve_test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/util.h"
#include "test_util.h"

extern char** environ;

namespace eep::serve::test {

std::unique_ptr<ServerProcess> ServerProcess::Start(const std::vector<std::string>& args,
                                                    std::string* error, double timeout_s) {
  // A client that hangs up mid-stream must not kill the test with SIGPIPE.
  signal(SIGPIPE, SIG_IGN);
  auto p = std::unique_ptr<ServerProcess>(new ServerProcess());
  p->log_path_ = eep::test::TempDir("serve-log") + "/stderr.txt";
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) {
    *error = "pipe failed";
    return nullptr;
  }
  std::vector<std::string> argv_s{EEP_BIN, "serve", "--port", "0"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_addopen(&fa, 2, p->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0644);
  // The child starts with default signal handling whatever the test process set.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t def;
  sigemptyset(&def);
  sigaddset(&def, SIGPIPE);
  posix_spawnattr_setsigdefault(&attr, &def);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
  const int rc = posix_spawn(&p->pid_, EEP_BIN, &fa, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(out[1]);
  if (rc != 0) {
    close(out[0]);
    p->pid_ = -1;
    *error = "cannot start " + std::string(EEP_BIN) + ": " + std::strerror(rc);
    return nullptr;
  }
  p->stdout_fd_ = out[0];
  // Read the first line within the deadline.
  std::string line;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (line.find('\n') == std::string::npos) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      *error = "no 'listening' line within the deadline; log:\n" + p->Log();
      return nullptr;
    }
    pollfd pfd{p->stdout_fd_, POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[256];
    const ssize_t n = read(p->stdout_fd_, buf, sizeof buf);
    if (n <= 0) {
      *error = "the server exited before listening; log:\n" + p->Log();
      return nullptr;
    }
    line.append(buf, static_cast<size_t>(n));
  }
  line.resize(line.find('\n'));
  const std::string prefix = "listening http://";
  const size_t colon = line.rfind(':');
  if (line.rfind(prefix, 0) != 0 || colon == std::string::npos) {
    *error = "unexpected first line '" + line + "'";
    return nullptr;
  }
  p->port_ = std::stoi(line.substr(colon + 1));
  return p;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    int st;
    waitpid(pid_, &st, 0);
  }
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

std::unique_ptr<httplib::Client> ServerProcess::Client(int read_timeout_s) const {
  auto c = std::make_unique<httplib::Client>("127.0.0.1", port_);
  c->set_connection_timeout(10, 0);
  c->set_read_timeout(read_timeout_s, 0);
  c->set_write_timeout(10, 0);
  return c;
}

int ServerProcess::Signal(int sig, double timeout_s) {
  if (pid_ <= 0) return -1;
  kill(pid_, sig);
  int status = 0;
  if (!eep::WaitChild(pid_, static_cast<int64_t>(timeout_s * 1000), &status)) {
    kill(pid_, SIGKILL);
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return -1;
  }
  pid_ = -1;
  return status;
}

std::string ServerProcess::Log() const {
  std::ifstream f(log_path_);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

namespace {

HttpReply ToReply(const httplib::Result& r) {
  HttpReply out;
  if (!r) return out;
  out.status = r->status;
  out.body = r->body;
  out.json = nlohmann::json::parse(r->body, nullptr, false);
  if (out.json.is_discarded()) out.json = nullptr;
  return out;
}

}  // namespace

HttpReply PostJson(httplib::Client& client, const std::string& path, const nlohmann::json& body) {
  return PostRaw(client, path, body.dump());
}

HttpReply PostRaw(httplib::Client& client, const std::string& path, const std::string& body) {
  return ToReply(client.Post(path.c_str(), body, "application/json"));
}

HttpReply Get(httplib::Client& client, const std::string& path) {
  return ToReply(client.Get(path.c_str()));
}

StreamReply ParseSse(const std::string& body) {
  StreamReply s;
  s.raw = body;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    std::string event = body.substr(pos, end - pos);
    pos = end + 2;
    if (event.rfind("data: ", 0) != 0) continue;
    std::string data = event.substr(6);
    if (data == "[DONE]") {
      s.done = true;
      continue;
    }
    auto j = nlohmann::json::parse(data, nullptr, false);
    s.events.push_back(j.is_discarded() ? nlohmann::json(nullptr) : j);
  }
  return s;
}

StreamReply PostStream(httplib::Client& client, const std::string& path,
                       const nlohmann::json& body) {
  auto r = client.Post(path.c_str(), body.dump(), "application/json");
  if (!r) return {};
  StreamReply s = ParseSse(r->body);
  s.status = r->status;
  return s;
}

std::vector<nlohmann::json> SseReader::Feed(const char* data, size_t len) {
  raw_.append(data, len);
  std::vector<nlohmann::json> out;
  while (true) {
    const size_t end = raw_.find("\n\n", parsed_);
    if (end == std::string::npos) break;
    const std::string event = raw_.substr(parsed_, end - parsed_);
    parsed_ = end + 2;
    if (event.rfind("data: ", 0) != 0) continue;
    const std::string payload = event.substr(6);
    if (payload == "[DONE]") {
      done_ = true;
      continue;
    }
    auto j = nlohmann::json::parse(payload, nullptr, false);
    out.push_back(j.is_discarded() ? nlohmann::json(nullptr) : j);
  }
  return out;
}

StreamReply PostStreamWatched(httplib::Client& client, const std::string& path,
                              const nlohmann::json& body,
                              const std::function<void(const nlohmann::json&)>& on_event) {
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.set_header("Content-Type", "application/json");
  req.body = body.dump();
  SseReader reader;
  StreamReply s;
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
    for (auto& e : reader.Feed(data, len)) {
      if (on_event) on_event(e);
      s.events.push_back(std::move(e));
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err;
  if (!client.send(req, res, err)) return {};
  s.status = res.status;
  s.done = reader.done();
  s.raw = reader.raw();
  return s;
}

bool WaitForCluster(const std::string& host, int port,
                    const std::function<bool(const nlohmann::json&)>& done,
                    std::chrono::steady_clock::time_point deadline, nlohmann::json* last,
                    int poll_ms) {
  *last = nullptr;
  while (true) {
    httplib::Client c(host, port);
    c.set_connection_timeout(5, 0);
    c.set_read_timeout(10, 0);
    HttpReply r = Get(c, "/v1/cluster");
    if (r.status == 200 && r.json.is_object()) {
      *last = r.json;
      if (done(r.json)) return true;
    }
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(poll_ms));  // poll interval
  }
}

double MetricValue(const std::string& text, const std::string& name, const std::string& labels) {
  const std::string key = labels.empty() ? name + " " : name + "{" + labels + "} ";
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size()));
  return -1;
}

std::vector<GoldenPrompt> LoadGolden(const std::string& model) {
  std::ifstream f(eep::test::ModelDir(model) + "/golden.json");
  nlohmann::json j = nlohmann::json::parse(f);
  std::vector<GoldenPrompt> out;
  for (const auto& p : j["prompts"])
    out.push_back({p["text"].get<std::string>(), p["ids"].get<std::vector<int64_t>>(),
                   p["greedy"].get<std::vector<int64_t>>()});
  return out;
}

}  // namespace eep::serve::test
