#include "core/util.h"

#include <poll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

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

}  // namespace eep
