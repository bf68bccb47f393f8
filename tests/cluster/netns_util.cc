#include "netns_util.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <regex>
#include <sstream>
#include <thread>

#include "core/logging.h"

extern char** environ;

namespace eep::testing {

namespace {

std::string JoinArgv(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) out += (out.empty() ? "" : " ") + a;
  return out;
}

bool IsExecutable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

}  // namespace

std::string FindExecutable(const std::string& name) {
  if (name.find('/') != std::string::npos) return IsExecutable(name) ? name : std::string();
  std::string path = std::getenv("PATH") ? std::getenv("PATH") : "";
  path += ":/usr/sbin:/sbin:/usr/bin:/bin";
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string candidate = dir + "/" + name;
    if (IsExecutable(candidate)) return candidate;
  }
  return {};
}

Result<CommandOutput> RunCommand(const std::vector<std::string>& argv, int64_t timeout_ms) {
  if (argv.empty()) return Status::InvalidArgument("RunCommand: empty argv");
  std::string exe = FindExecutable(argv[0]);
  if (exe.empty()) return Status::NotFound("RunCommand: " + argv[0] + " not found in PATH, /usr/sbin or /sbin");
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return Status::Internal(std::string("pipe2: ") + std::strerror(errno));
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
  std::vector<std::string> storage = argv;
  std::vector<char*> cargv;
  for (auto& a : storage) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    return Status::NotFound("RunCommand: cannot run " + exe + ": " + std::strerror(rc));
  }
  CommandOutput out;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  bool timed_out = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    int n = poll(&p, 1, static_cast<int>(left));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;  // deadline re-checked above
    char buf[4096];
    ssize_t got = read(fds[0], buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;  // EOF: the child (and anything it started) closed the pipe
    out.output.append(buf, static_cast<size_t>(got));
  }
  close(fds[0]);
  if (timed_out) kill(pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out)
    return Status::Timeout("`" + JoinArgv(argv) + "` did not finish within " + std::to_string(timeout_ms) + " ms");
  out.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return out;
}

Result<std::string> RunChecked(const std::vector<std::string>& argv, int64_t timeout_ms) {
  EEP_ASSIGN_OR_RETURN(CommandOutput out, RunCommand(argv, timeout_ms));
  if (out.exit_code != 0) {
    std::string text = out.output;
    while (!text.empty() && text.back() == '\n') text.pop_back();
    return Status::Internal("`" + JoinArgv(argv) + "` exited with " + std::to_string(out.exit_code) + ": " + text);
  }
  return out.output;
}

Status RunInNetns(const std::string& ns_path, const std::function<void()>& fn) {
  Status result;
  // setns(CLONE_NEWNET) changes only the calling thread's namespace: a throwaway thread keeps
  // the caller (and the rest of the test process) where it was.
  std::thread worker([&] {
    int fd = open(ns_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      result = Status::NotFound("open " + ns_path + ": " + std::strerror(errno));
      return;
    }
    int rc = setns(fd, CLONE_NEWNET);
    int err = errno;
    close(fd);
    if (rc != 0) {
      result = Status::Internal("setns " + ns_path + ": " + std::strerror(err));
      return;
    }
    fn();
  });
  worker.join();
  return result;
}

// ---- NetnsLab ----------------------------------------------------------------------------

namespace {

std::atomic<int> g_lab_counter{0};

// Namespaces a crashed earlier run left behind: our naming, and a pid that no longer runs.
void RemoveStaleNamespaces(const std::string& ip) {
  auto listed = RunCommand({ip, "netns", "list"}, 5000);
  if (!listed.ok() || listed->exit_code != 0) return;
  static const std::regex kOurs(R"(^(eep(\d+)l\d+(?:h\d+|sw))(?:\s|$))");
  std::stringstream ss(listed->output);
  std::string line;
  while (std::getline(ss, line)) {
    std::smatch m;
    if (!std::regex_search(line, m, kOurs)) continue;
    pid_t owner = static_cast<pid_t>(std::stol(m[2].str()));
    if (owner == getpid() || kill(owner, 0) == 0 || errno != ESRCH) continue;
    EEP_LOG_WARN("removing stale network namespace {} (pid {} is gone)", m[1].str(), owner);
    (void)RunCommand({ip, "netns", "del", m[1].str()}, 5000);
  }
}

}  // namespace

std::vector<std::string> NetnsLab::LoopbackAddresses(int n) {
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.push_back("127.0.0." + std::to_string(2 + i));
  return out;
}

Result<std::unique_ptr<NetnsLab>> NetnsLab::Create(int num_hosts, std::string* skip_reason) {
  if (num_hosts < 1 || num_hosts > 250)
    return Status::InvalidArgument("NetnsLab: num_hosts must be in 1..250, got " + std::to_string(num_hosts));
  auto skip = [&](const std::string& why) -> Result<std::unique_ptr<NetnsLab>> {
    if (skip_reason != nullptr) *skip_reason = "no network namespaces for test hosts: " + why;
    return std::unique_ptr<NetnsLab>();
  };
  if (geteuid() != 0) return skip("not running as root (needs CAP_NET_ADMIN and CAP_SYS_ADMIN)");
  std::unique_ptr<NetnsLab> lab(new NetnsLab());
  lab->ip_ = FindExecutable("ip");
  if (lab->ip_.empty()) return skip("iproute2's `ip` is not installed (apt-get install iproute2)");
  const std::string& ip = lab->ip_;
  RemoveStaleNamespaces(ip);

  const int pid = static_cast<int>(getpid());
  const int k = g_lab_counter.fetch_add(1);
  const std::string base = "eep" + std::to_string(pid) + "l" + std::to_string(k);
  // Private 10.A.B.0/24 per lab; it exists only inside the lab's namespaces, so a clash with
  // another lab or the machine's own 10/8 routes could not cross-connect anything anyway.
  const int subnet_a = 100 + (pid / 256) % 100;
  const int subnet_b = (pid + 31 * k) % 256;

  lab->switch_ = base + "sw";
  if (auto made = RunCommand({ip, "netns", "add", lab->switch_}); !made.ok() || made->exit_code != 0)
    return skip("`ip netns add` failed: " + (made.ok() ? made->output : made.status().ToString()));
  lab->created_.push_back(lab->switch_);

  auto run = [&](std::vector<std::string> argv) -> Status {
    argv.insert(argv.begin(), ip);
    auto out = RunChecked(argv);
    return out.ok() ? Status::Ok() : out.status().WithContext("building network namespaces");
  };
  const std::string& sw = lab->switch_;
  EEP_RETURN_IF_ERROR(run({"-n", sw, "link", "set", "lo", "up"}));
  EEP_RETURN_IF_ERROR(run({"-n", sw, "link", "add", "br0", "type", "bridge"}));
  EEP_RETURN_IF_ERROR(run({"-n", sw, "link", "set", "br0", "up"}));
  for (int i = 0; i < num_hosts; ++i) {
    std::string host = base + "h" + std::to_string(i);
    std::string port = "vh" + std::to_string(i);  // the switch's end; names are per-namespace
    std::string address = "10." + std::to_string(subnet_a) + "." + std::to_string(subnet_b) + "." + std::to_string(1 + i);
    EEP_RETURN_IF_ERROR(run({"netns", "add", host}));
    lab->created_.push_back(host);
    lab->hosts_.push_back(host);
    lab->addresses_.push_back(address);
    EEP_RETURN_IF_ERROR(run({"-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host}));
    EEP_RETURN_IF_ERROR(run({"-n", sw, "link", "set", port, "master", "br0"}));
    EEP_RETURN_IF_ERROR(run({"-n", sw, "link", "set", port, "up"}));
    EEP_RETURN_IF_ERROR(run({"-n", host, "link", "set", "lo", "up"}));
    EEP_RETURN_IF_ERROR(run({"-n", host, "addr", "add", address + "/24", "dev", "eth0"}));
    EEP_RETURN_IF_ERROR(run({"-n", host, "link", "set", "eth0", "up"}));
  }
  EEP_LOG_INFO("network namespaces {}h0..h{} on 10.{}.{}.0/24 via switch {}", base, num_hosts - 1, subnet_a, subnet_b,
               lab->switch_);
  return lab;
}

NetnsLab::~NetnsLab() { Destroy(); }

void NetnsLab::Destroy() {
  // Hosts first, then the switch; processes first so that each namespace dies with its name.
  for (auto it = created_.rbegin(); it != created_.rend(); ++it) {
    auto pids = RunCommand({ip_, "netns", "pids", *it}, 5000);
    if (pids.ok() && pids->exit_code == 0) {
      std::stringstream ss(pids->output);
      std::string line;
      while (std::getline(ss, line)) {
        if (line.empty() || line.find_first_not_of("0123456789") != std::string::npos) continue;
        pid_t pid = static_cast<pid_t>(std::stol(line));
        if (pid > 1 && pid != getpid()) kill(pid, SIGKILL);
      }
    }
    auto del = RunCommand({ip_, "netns", "del", *it}, 5000);
    if (!del.ok() || del->exit_code != 0)
      EEP_LOG_WARN("could not delete network namespace {}: {}", *it, del.ok() ? del->output : del.status().ToString());
  }
  created_.clear();
}

std::vector<std::string> NetnsLab::ExecPrefix(int i) const { return {ip_, "netns", "exec", hosts_.at(i)}; }

std::string NetnsLab::NetnsPath(int i) const { return "/var/run/netns/" + hosts_.at(i); }

Status NetnsLab::RunIn(int i, const std::function<void()>& fn) const { return RunInNetns(NetnsPath(i), fn); }

}  // namespace eep::testing
