#include "core/util.h"

#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

extern char** environ;

namespace eep {

Result<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound("cannot open file " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Status::IOError("error reading file " + path);
  return ss.str();
}

Status WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Status::IOError("cannot open " + path + " for writing");
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!out) return Status::IOError("error writing " + path);
  return Status::Ok();
}

Result<nlohmann::json> ReadJsonFile(const std::string& path) {
  EEP_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    return Status::InvalidArgument(path + ": invalid JSON: " + e.what());
  }
}

Result<std::vector<int64_t>> ParseIdList(const std::string& text, const std::string& what) {
  std::vector<int64_t> ids;
  size_t pos = 0;
  if (text.empty()) return ids;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    // Trim spaces so "1, 2" works.
    size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    if (b == std::string::npos) return Status::InvalidArgument(what + ": empty item in '" + text + "'");
    item = item.substr(b, e - b + 1);
    try {
      size_t used = 0;
      long long v = std::stoll(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
      ids.push_back(v);
    } catch (const std::exception&) {
      return Status::InvalidArgument(what + ": '" + item + "' is not an integer");
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

bool WaitChild(int pid, int64_t timeout_ms, int* wait_status) {
  if (waitpid(pid, wait_status, WNOHANG) == pid) return true;
  int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (fd >= 0) {
    struct pollfd p {fd, POLLIN, 0};
    poll(&p, 1, static_cast<int>(timeout_ms));
    close(fd);
  }
  return waitpid(pid, wait_status, WNOHANG) == pid;
}

// ---- base64 (RFC 4648, padded) ---------------------------------------------------------------------------------

namespace {
constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}

std::string Base64Encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  size_t rest = bytes.size() - i;
  if (rest > 0) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    if (rest == 2) v |= uint8_t(bytes[i + 1]) << 8;
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += rest == 2 ? kB64[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

Result<std::string> Base64Decode(std::string_view text) {
  if (text.size() % 4 != 0)
    return Status::InvalidArgument(
        fmt::format("base64 length {} is not a multiple of 4", text.size()));
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (size_t i = 0; i < text.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      char c = text[i + k];
      if (c == '=' && i + 4 == text.size() && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad > 0 || (v[k] = value(c)) < 0)
        return Status::InvalidArgument(fmt::format("invalid base64 character at offset {}", i + k));
    }
    uint32_t bits = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out += char(bits >> 16);
    if (pad < 2) out += char((bits >> 8) & 0xff);
    if (pad < 1) out += char(bits & 0xff);
  }
  return out;
}

void KillAndReap(int pid) {
  if (pid <= 0) return;
  kill(pid, SIGKILL);
  int status;
  waitpid(pid, &status, 0);
}

Result<int> SpawnUnblocked(const std::string& binary, const std::vector<std::string>& args, char* const* envp,
                           const posix_spawn_file_actions_t* actions) {
  std::vector<std::string> storage = args;
  std::vector<char*> argv;
  for (auto& a : storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  // Without actions of the caller's, only stdin/out/err are inherited (no listening sockets or
  // shared-memory descriptors of this process live on in the child).
  posix_spawn_file_actions_t own;
  if (actions == nullptr) {
    posix_spawn_file_actions_init(&own);
    posix_spawn_file_actions_addclosefrom_np(&own, 3);
  }
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, binary.c_str(), actions != nullptr ? actions : &own, &attr, argv.data(),
                             envp != nullptr ? envp : environ);
  if (actions == nullptr) posix_spawn_file_actions_destroy(&own);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return Status::IOError(fmt::format("cannot start {}: {}", binary, std::strerror(rc)));
  return static_cast<int>(pid);
}

}  // namespace eep
