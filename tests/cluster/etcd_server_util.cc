#include "etcd_server_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/logging.h"
#include "netns_util.h"

extern char** environ;

namespace eep::testing {

namespace {

std::string MakeTempDirectory(const std::string& prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp != nullptr ? tmp : "/tmp") + "/" + prefix + "XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  return mkdtemp(buf.data()) != nullptr ? std::string(buf.data()) : std::string();
}

int BoundPort(const std::string& host) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  int port = 0;
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1 &&
      bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    socklen_t len = sizeof addr;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

}  // namespace

int PickFreePort(const std::string& host) {
  int port = BoundPort(host);
  // A test host's address lives in another namespace; any port is free in a fresh one, so a
  // number the kernel hands out here is as good as any.
  return port != 0 ? port : BoundPort("127.0.0.1");
}

std::string TestEtcd::FindBinary() {
  std::string found = FindExecutable("etcd");
  if (found.empty() && access("/usr/bin/etcd", X_OK) == 0) found = "/usr/bin/etcd";
  return found;
}

Result<std::unique_ptr<TestEtcd>> TestEtcd::Start(const Options& options, std::string* skip_reason) {
  std::unique_ptr<TestEtcd> etcd(new TestEtcd());
  etcd->options_ = options;
  etcd->binary_ = FindBinary();
  if (etcd->binary_.empty()) {
    if (skip_reason != nullptr)
      *skip_reason = "no etcd binary on PATH or at /usr/bin/etcd (apt-get install etcd-server)";
    return std::unique_ptr<TestEtcd>();
  }
  etcd->dir_ = MakeTempDirectory("eep-etcd-");
  if (etcd->dir_.empty()) return Status::IOError(std::string("mkdtemp for etcd's data dir: ") + std::strerror(errno));
  Status last;
  // The ports were free when picked; another process may take one before etcd binds it.
  for (int attempt = 0; attempt < 3; ++attempt) {
    etcd->client_port_ = PickFreePort(options.host);
    etcd->peer_port_ = PickFreePort(options.host);
    if (etcd->client_port_ == 0 || etcd->peer_port_ == 0 || etcd->client_port_ == etcd->peer_port_) {
      last = Status::Internal("could not pick free ports on " + options.host);
      continue;
    }
    last = etcd->Launch();
    if (last.ok()) last = etcd->WaitHealthy(10000);
    if (last.ok()) return etcd;
    bool port_clash = etcd->LogTail(100000).find("address already in use") != std::string::npos;
    etcd->Kill();
    if (!port_clash) break;
    std::error_code ec;
    std::filesystem::remove_all(etcd->dir_ + "/data", ec);
  }
  return last;
}

Status TestEtcd::Launch() {
  const std::string& h = options_.host;
  std::string client_url = "http://" + h + ":" + std::to_string(client_port_);
  std::string peer_url = "http://" + h + ":" + std::to_string(peer_port_);
  std::vector<std::string> args = options_.exec_prefix;
  for (std::string a : {binary_, std::string("--name"), options_.name, std::string("--data-dir"), dir_ + "/data",
                        std::string("--listen-client-urls"), client_url, std::string("--advertise-client-urls"),
                        client_url, std::string("--listen-peer-urls"), peer_url,
                        std::string("--initial-advertise-peer-urls"), peer_url, std::string("--initial-cluster"),
                        options_.name + "=" + peer_url, std::string("--initial-cluster-state"), std::string("new"),
                        std::string("--heartbeat-interval"), std::string("50"), std::string("--election-timeout"),
                        std::string("500"), std::string("--logger"), std::string("zap"),
                        std::string("--log-outputs"), std::string("stderr")})
    args.push_back(a);
  std::string exe = FindExecutable(args[0]);
  if (exe.empty()) return Status::NotFound("cannot run " + args[0] + " (not found)");

  std::string log_path = dir_ + "/etcd.log";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Its own process group, so Kill() also takes anything an exec prefix forked.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int rc = posix_spawn(&pid_, exe.c_str(), &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    pid_ = -1;
    return Status::Internal("posix_spawn " + exe + ": " + std::strerror(rc));
  }
  EEP_LOG_INFO("started etcd pid {} on {} (data {})", pid_, endpoint(), dir_);
  return Status::Ok();
}

Status TestEtcd::WaitHealthy(int64_t timeout_ms) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::milliseconds(timeout_ms);
  // A pidfd turns "wait a little before the next probe" into "... unless etcd exits".
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
  std::string last_error = "no answer yet";
  Status result = Status::Timeout("");
  for (;;) {
    auto probe = [&] {
      httplib::Client client(options_.host, client_port_);
      client.set_connection_timeout(0, 300 * 1000);
      client.set_read_timeout(1, 0);
      auto res = client.Get("/health");
      if (!res) {
        last_error = httplib::to_string(res.error());
      } else if (res->status != 200 || res->body.find("\"true\"") == std::string::npos) {
        last_error = "HTTP " + std::to_string(res->status) + ": " + res->body;
      } else {
        last_error.clear();
      }
    };
    if (options_.exec_prefix.empty()) {
      probe();
    } else {
      // etcd may run in another network namespace (a test host): probe from inside it.
      Status st = RunInNetns("/proc/" + std::to_string(pid_) + "/ns/net", probe);
      if (!st.ok()) last_error = st.ToString();
    }
    if (last_error.empty()) {
      result = Status::Ok();
      break;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      result = Status::Unavailable("etcd exited during start-up (" +
                                   (WIFEXITED(status) ? "code " + std::to_string(WEXITSTATUS(status))
                                                      : "signal " + std::to_string(WTERMSIG(status))) +
                                   "); log tail:\n" + LogTail());
      break;
    }
    if (left <= 0) {
      result = Status::Timeout("etcd on " + endpoint() + " not healthy within " + std::to_string(timeout_ms) +
                               " ms (" + last_error + "); log tail:\n" + LogTail());
      break;
    }
    pollfd p{pidfd, POLLIN, 0};
    poll(pidfd >= 0 ? &p : nullptr, pidfd >= 0 ? 1 : 0, static_cast<int>(std::min<int64_t>(left, 50)));
  }
  if (pidfd >= 0) close(pidfd);
  if (result.ok()) {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
    EEP_LOG_INFO("etcd on {} healthy after {} ms", endpoint(), ms);
  }
  return result;
}

void TestEtcd::Kill() {
  if (pid_ <= 0) return;
  kill(-pid_, SIGKILL);
  kill(pid_, SIGKILL);
  while (waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
  EEP_LOG_INFO("killed etcd pid {} on {}", pid_, endpoint());
  pid_ = -1;
}

Status TestEtcd::Restart() {
  Kill();
  EEP_RETURN_IF_ERROR(Launch());
  return WaitHealthy(10000);
}

std::string TestEtcd::LogTail(size_t max_bytes) const {
  std::ifstream in(dir_ + "/etcd.log", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string all = ss.str();
  return all.size() > max_bytes ? all.substr(all.size() - max_bytes) : all;
}

TestEtcd::~TestEtcd() {
  Kill();
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

}  // namespace eep::testing
