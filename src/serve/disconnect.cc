// Client-disconnect detection: epoll on the connections of requests in flight.
#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/logging.h"
#include "serve/internal.h"

namespace eep::serve {
namespace {

// Numeric host and port of a socket address, as cpp-httplib formats remote_addr.
bool HostPort(const sockaddr_storage& addr, socklen_t len, std::string* host, int* port) {
  char buf[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, buf, sizeof buf, nullptr, 0,
                  NI_NUMERICHOST) != 0)
    return false;
  *host = buf;
  if (addr.ss_family == AF_INET)
    *port = ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  else if (addr.ss_family == AF_INET6)
    *port = ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  else
    return false;
  return true;
}

}  // namespace

int FindConnectionFd(int local_port, const std::string& remote_addr, int remote_port) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  const int own = dirfd(dir);
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    const int fd = std::atoi(e->d_name);
    if (fd == own) continue;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage peer{}, local{};
    socklen_t plen = sizeof peer, llen = sizeof local;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &plen) != 0) continue;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0) continue;
    std::string phost, lhost;
    int pport = 0, lport = 0;
    if (!HostPort(peer, plen, &phost, &pport) || !HostPort(local, llen, &lhost, &lport)) continue;
    if (lport == local_port && pport == remote_port && phost == remote_addr) {
      found = fd;
      break;
    }
  }
  closedir(dir);
  return found;
}

DisconnectWatcher::~DisconnectWatcher() {
  Stop();
}

Status DisconnectWatcher::Start() {
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) return Status::IOError(std::string("epoll_create1: ") + std::strerror(errno));
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) return Status::IOError(std::string("eventfd: ") + std::strerror(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // key 0: the stop event
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, stop_fd_, &ev) != 0)
    return Status::IOError(std::string("epoll_ctl: ") + std::strerror(errno));
  thread_ = std::thread([this] { Loop(); });
  return Status::Ok();
}

void DisconnectWatcher::Stop() {
  if (thread_.joinable()) {
    const uint64_t one = 1;
    if (write(stop_fd_, &one, sizeof one) != sizeof one)
      EEP_LOG_WARN("serve: disconnect watcher: cannot signal stop");
    thread_.join();
  }
  if (stop_fd_ >= 0) close(stop_fd_);
  if (epoll_fd_ >= 0) close(epoll_fd_);
  stop_fd_ = epoll_fd_ = -1;
}

uint64_t DisconnectWatcher::Watch(int local_port, const std::string& remote_addr, int remote_port,
                                  std::function<void()> on_disconnect) {
  if (epoll_fd_ < 0) return 0;
  const int fd = FindConnectionFd(local_port, remote_addr, remote_port);
  if (fd < 0) return 0;
  std::lock_guard lk(mu_);
  const uint64_t key = next_key_++;
  epoll_event ev{};
  // One-shot: after a hang-up the socket stays "ready"; one report is all we need.
  ev.events = EPOLLRDHUP | EPOLLONESHOT;
  ev.data.u64 = key;
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) return 0;
  entries_[key] = Entry{fd, std::move(on_disconnect)};
  return key;
}

void DisconnectWatcher::Unwatch(uint64_t key) {
  if (key == 0) return;
  std::lock_guard lk(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  // Removed while the connection's fd is still open (the handler runs before httplib closes it).
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
  entries_.erase(it);
}

void DisconnectWatcher::Loop() {
  epoll_event events[64];
  while (true) {
    const int n = epoll_wait(epoll_fd_, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      EEP_LOG_ERROR("serve: disconnect watcher: epoll_wait: {}", std::strerror(errno));
      return;
    }
    for (int i = 0; i < n; ++i) {
      const uint64_t key = events[i].data.u64;
      if (key == 0) return;
      std::lock_guard lk(mu_);
      auto it = entries_.find(key);
      if (it == entries_.end()) continue;
      // Called under the lock so that it cannot run after Unwatch has returned.
      if (it->second.callback) it->second.callback();
      it->second.callback = nullptr;
    }
  }
}

}  // namespace eep::serve
