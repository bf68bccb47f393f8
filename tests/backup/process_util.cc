#include "process_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

extern char** environ;

namespace eep::testing {

std::string MakeTempDir(const std::string& prefix) {
  std::string tmpl =
      (std::getenv("TMPDIR") ? std::string(std::getenv("TMPDIR")) : std::string("/tmp")) + "/" +
      prefix + "XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* dir = mkdtemp(buf.data());
  return dir ? std::string(dir) : std::string();
}

Result<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(
    const std::vector<std::string>& args, const std::map<std::string, std::string>& env,
    const std::vector<std::string>& prefix) {
  std::unique_ptr<ChildProcess> child(new ChildProcess());
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) return Status::Internal("pipe failed");
  std::string dir = MakeTempDir("eep-child-");
  child->stderr_path_ = dir + "/stderr";

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, child->stderr_path_.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<std::string> argv_storage = prefix;
  argv_storage.push_back(EEP_BIN);
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);

  std::map<std::string, std::string> merged;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string kv(*e);
    auto eq = kv.find('=');
    if (eq != std::string::npos) merged[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  for (const auto& [k, v] : env) merged[k] = v;
  std::vector<std::string> env_storage;
  for (const auto& [k, v] : merged) env_storage.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);

  // With a prefix (e.g. `ip netns exec NS`, which execs in place) its first word is the program.
  const std::string program = prefix.empty() ? std::string(EEP_BIN) : prefix.front();
  int rc = prefix.empty() ? posix_spawn(&child->pid_, program.c_str(), &actions, nullptr, argv.data(), envp.data())
                          : posix_spawnp(&child->pid_, program.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  close(pipe_fds[1]);
  if (rc != 0) {
    close(pipe_fds[0]);
    return Status::Internal("posix_spawn of " + program + " failed: " + std::strerror(rc));
  }
  child->stdout_fd_ = pipe_fds[0];
  return child;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !exited_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (stdout_fd_ >= 0) close(stdout_fd_);
  if (!stderr_path_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(stderr_path_).parent_path(), ec);
  }
}

Result<std::string> ChildProcess::ReadLine(int64_t timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto nl = pending_.find('\n');
    if (nl != std::string::npos) {
      std::string line = pending_.substr(0, nl);
      pending_.erase(0, nl + 1);
      return line;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) return Status::Timeout("no stdout line from the child in time");
    pollfd p{stdout_fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    char buf[4096];
    ssize_t n = read(stdout_fd_, buf, sizeof buf);
    if (n <= 0) return Status::RemoteDisconnect("child closed stdout (exited?)");
    pending_.append(buf, static_cast<size_t>(n));
  }
}

void ChildProcess::Signal(int sig) {
  if (pid_ > 0 && !exited_) kill(pid_, sig);
}

Result<int> ChildProcess::Wait(int64_t timeout_ms) {
  if (exited_) return exit_code_;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int status = 0;
    pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return exit_code_;
    }
    if (std::chrono::steady_clock::now() >= deadline) return Status::Timeout("child still running");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

std::string ChildProcess::Stderr() const {
  std::ifstream in(stderr_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool ChildProcess::WaitForStderr(const std::string& needle, int64_t timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (Stderr().find(needle) != std::string::npos) return true;
    if (exited_ || std::chrono::steady_clock::now() >= deadline) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return Stderr().find(needle) != std::string::npos;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

RunResult RunEep(const std::vector<std::string>& args, int64_t timeout_ms,
                 const std::map<std::string, std::string>& env) {
  RunResult result;
  auto child = ChildProcess::Spawn(args, env);
  if (!child.ok()) {
    result.err = child.status().ToString();
    return result;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    auto line = (*child)->ReadLine(std::max<int64_t>(left, 1));
    if (line.ok()) {
      result.out += *line + "\n";
      continue;
    }
    break;  // stdout closed or timed out
  }
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                  deadline - std::chrono::steady_clock::now())
                  .count();
  auto code = (*child)->Wait(std::max<int64_t>(left, 1));
  result.exit_code = code.ok() ? *code : -1;  // -1: killed by the destructor after the timeout
  result.err = (*child)->Stderr();
  return result;
}

Result<ManagerProcess> StartManager(const std::string& model_dir, int node_rank, int num_nodes,
                                    const std::string& transport,
                                    const std::vector<std::string>& extra_args,
                                    const std::map<std::string, std::string>& env) {
  std::vector<std::string> args = {"backup-manager",
                                   "--model",
                                   model_dir,
                                   "--node-rank",
                                   std::to_string(node_rank),
                                   "--num-nodes",
                                   std::to_string(num_nodes),
                                   "--listen",
                                   "tcp://127.0.0.1:0",
                                   "--transport",
                                   transport};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  EEP_ASSIGN_OR_RETURN(auto child, ChildProcess::Spawn(args, env));
  auto line = child->ReadLine(30000);
  if (!line.ok()) return line.status().WithContext("backup-manager stderr:\n" + child->Stderr());
  const std::string prefix = "listening ";
  if (line->rfind(prefix, 0) != 0)
    return Status::Internal("unexpected first stdout line: " + *line);
  ManagerProcess m;
  m.endpoint = line->substr(prefix.size());
  m.process = std::move(child);
  return m;
}

}  // namespace eep::testing
