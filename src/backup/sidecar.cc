#include "backup/sidecar.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fmt/format.h>
#include <fstream>

#include "core/util.h"

extern char** environ;

namespace eep::backup {
namespace {

std::string LastLine(const std::string& path) {
  std::ifstream f(path);
  std::string line, last;
  while (std::getline(f, line))
    if (!line.empty()) last = line;
  return last;
}

}  // namespace

Result<std::unique_ptr<BackupSidecar>> BackupSidecar::Start(const std::string& binary, const std::string& model_dir,
                                                            int node_rank, int num_nodes, const std::string& transport,
                                                            const std::vector<std::string>& extra_args,
                                                            int64_t timeout_ms) {
  auto s = std::unique_ptr<BackupSidecar>(new BackupSidecar());
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return Status::IOError(std::string("pipe: ") + std::strerror(errno));
  char tmpl[] = "/tmp/eep-backup-XXXXXX";
  const int err_fd = mkstemp(tmpl);
  if (err_fd < 0) return Status::IOError(std::string("mkstemp: ") + std::strerror(errno));
  s->stderr_path_ = tmpl;
  std::vector<std::string> args{"eep", "backup-manager", "--model", model_dir, "--node-rank", std::to_string(node_rank),
                                "--num-nodes", std::to_string(num_nodes), "--transport", transport};
  // Loopback unless the caller names the address other hosts reach this node at.
  if (std::find(extra_args.begin(), extra_args.end(), "--listen") == extra_args.end())
    args.insert(args.end(), {"--listen", "tcp://127.0.0.1:0"});
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, err_fd, STDERR_FILENO);
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);  // (as SpawnUnblocked's default)
  // The manager handles SIGTERM itself, whatever the caller blocks (eep serve blocks it).
  auto pid = SpawnUnblocked(binary, args, nullptr, &fa);
  posix_spawn_file_actions_destroy(&fa);
  close(out[1]);
  close(err_fd);
  if (!pid.ok()) {
    close(out[0]);
    return pid.status().WithContext("the backup manager");
  }
  s->pid_ = *pid;
  // Read until the `listening` line, the child's exit, or the deadline.
  std::string buf;
  const double deadline = NowSeconds() + static_cast<double>(timeout_ms) / 1000.0;
  while (buf.find('\n') == std::string::npos) {
    const double left = deadline - NowSeconds();
    struct pollfd p {out[0], POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) {
      close(out[0]);
      return Status::Timeout(fmt::format("backup manager did not start within {} ms: {}", timeout_ms, LastLine(s->stderr_path_)));
    }
    char chunk[256];
    const ssize_t n = read(out[0], chunk, sizeof chunk);
    if (n <= 0) {
      close(out[0]);
      return Status::Unavailable(fmt::format("backup manager exited during start-up: {}", LastLine(s->stderr_path_)));
    }
    buf.append(chunk, static_cast<size_t>(n));
  }
  close(out[0]);
  const std::string line = buf.substr(0, buf.find('\n'));
  constexpr std::string_view kPrefix = "listening ";
  if (line.rfind(kPrefix, 0) != 0) return Status::Corruption("backup manager printed '" + line + "'");
  s->endpoint_ = line.substr(kPrefix.size());
  return s;
}

BackupSidecar::~BackupSidecar() {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    int status;
    constexpr int64_t kGraceMs = 5000;
    if (!WaitChild(pid_, kGraceMs, &status)) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
    }
  }
  if (!stderr_path_.empty()) unlink(stderr_path_.c_str());
}

}  // namespace eep::backup
