// The test-host lab (tests/cluster/netns_util.h): namespaces, addresses, reachability between
// hosts but not from the root namespace, etcd on a test host, and clean-up.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "cluster/etcd.h"
#include "core/logging.h"
#include "etcd_server_util.h"
#include "netns_util.h"

namespace eep::testing {
namespace {

// A listening TCP socket on address:0 in the calling thread's namespace; *port gets the port.
int Listen(const std::string& address, int* port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  inet_pton(AF_INET, address.c_str(), &addr.sin_addr);
  socklen_t len = sizeof addr;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 8) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return -1;
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

// Connects to address:port within timeout_ms from the calling thread's namespace; "" on
// success, else why not.
std::string TryConnect(const std::string& address, int port, int timeout_ms) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return std::strerror(errno);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, address.c_str(), &addr.sin_addr);
  std::string why;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    if (errno != EINPROGRESS) {
      why = std::strerror(errno);
    } else {
      pollfd p{fd, POLLOUT, 0};
      if (poll(&p, 1, timeout_ms) <= 0) {
        why = "timed out";
      } else {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) why = std::strerror(err);
      }
    }
  }
  close(fd);
  return why;
}

// The peer address of the next connection on `listen_fd`, or "" if none within timeout_ms.
std::string AcceptPeer(int listen_fd, int timeout_ms) {
  pollfd p{listen_fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) <= 0) return {};
  sockaddr_in peer{};
  socklen_t len = sizeof peer;
  int fd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&peer), &len, SOCK_CLOEXEC);
  if (fd < 0) return {};
  close(fd);
  char text[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &peer.sin_addr, text, sizeof text);
  return text;
}

bool NamespaceListed(const std::string& name) {
  auto listed = RunCommand({"ip", "netns", "list"});
  if (!listed.ok()) return false;
  return listed->output.find(name) != std::string::npos;
}

class NetnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    InitLogging("info");
    std::string skip;
    auto lab = NetnsLab::Create(3, &skip);
    ASSERT_TRUE(lab.ok()) << lab.status().ToString();
    if (*lab == nullptr) GTEST_SKIP() << skip;
    lab_ = std::move(*lab);
  }
  std::unique_ptr<NetnsLab> lab_;
};

TEST_F(NetnsTest, HostsHaveTheirAddresses) {
  ASSERT_EQ(lab_->num_hosts(), 3);
  for (int i = 0; i < 3; ++i) {
    // Through the exec prefix, the way processes are started on a test host.
    std::vector<std::string> argv = lab_->ExecPrefix(i);
    for (const char* a : {"ip", "-4", "-o", "addr", "show"}) argv.push_back(a);
    auto out = RunChecked(argv);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_NE(out->find(" " + lab_->address(i) + "/24"), std::string::npos) << *out;
    EXPECT_NE(out->find("127.0.0.1"), std::string::npos) << "lo is not up on host " << i << ": " << *out;
    for (int j = 0; j < 3; ++j) {
      if (j != i) {
        EXPECT_EQ(out->find(" " + lab_->address(j) + "/"), std::string::npos) << *out;
      }
    }
  }
  EXPECT_NE(lab_->address(0), lab_->address(1));
}

TEST_F(NetnsTest, HostsReachEachOtherButNotFromRoot) {
  int listen_fd = -1, port = 0;
  ASSERT_TRUE(lab_->RunIn(2, [&] { listen_fd = Listen(lab_->address(2), &port); }).ok());
  ASSERT_GE(listen_fd, 0) << "cannot listen on " << lab_->address(2) << " in host 2";

  for (int from : {0, 1}) {
    std::string why;
    ASSERT_TRUE(lab_->RunIn(from, [&] { why = TryConnect(lab_->address(2), port, 3000); }).ok());
    EXPECT_EQ(why, "") << "host " << from << " -> host 2 (" << lab_->address(2) << ":" << port << ")";
    EXPECT_EQ(AcceptPeer(listen_fd, 3000), lab_->address(from));
  }
  // The root namespace has no interface on the lab's subnet: refused, unreachable or timed out.
  std::string from_root = TryConnect(lab_->address(2), port, 300);
  EXPECT_NE(from_root, "") << "the root namespace reached " << lab_->address(2);
  EXPECT_EQ(AcceptPeer(listen_fd, 0), "");
  close(listen_fd);
}

TEST_F(NetnsTest, EtcdOnATestHostServesOtherHosts) {
  TestEtcd::Options options;
  options.host = lab_->address(0);
  options.exec_prefix = lab_->ExecPrefix(0);
  std::string skip;
  auto etcd = TestEtcd::Start(options, &skip);
  ASSERT_TRUE(etcd.ok()) << etcd.status().ToString();
  if (*etcd == nullptr) GTEST_SKIP() << skip;
  EXPECT_EQ((*etcd)->url(), "etcd://" + lab_->address(0) + ":" + std::to_string((*etcd)->client_port()));

  // From host 1: a client's sockets belong to the namespace of the thread that makes the call.
  Status put, got;
  ASSERT_TRUE(lab_->RunIn(1, [&] {
                    auto client = cluster::EtcdClient::Connect((*etcd)->url(), 1000);
                    if (!client.ok()) {
                      put = client.status();
                      return;
                    }
                    auto r = (*client)->Put("/lab/from-host-1", "hello");
                    put = r.ok() ? Status::Ok() : r.status();
                    auto g = (*client)->Get("/lab/from-host-1");
                    if (!g.ok()) got = g.status();
                    else if (!g->has_value() || (*g)->value != "hello") got = Status::Internal("wrong value");
                  })
                  .ok());
  EXPECT_TRUE(put.ok()) << put.ToString();
  EXPECT_TRUE(got.ok()) << got.ToString();

  // From the root namespace it is out of reach, and the error names the endpoint.
  auto root_client = cluster::EtcdClient::Connect((*etcd)->url(), 300);
  ASSERT_TRUE(root_client.ok());
  auto r = (*root_client)->Get("/lab/from-host-1");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find((*etcd)->endpoint()), std::string::npos) << r.status().ToString();

  // Tearing the lab down first kills etcd inside it; the etcd handle then only reaps.
  pid_t etcd_pid = (*etcd)->pid();
  lab_.reset();
  etcd->reset();
  EXPECT_NE(kill(etcd_pid, 0), 0) << "etcd pid " << etcd_pid << " survived its namespace";
}

TEST_F(NetnsTest, DestructorRemovesNamespaces) {
  std::vector<std::string> names = {lab_->switch_ns()};
  for (int i = 0; i < lab_->num_hosts(); ++i) names.push_back(lab_->host_ns(i));
  for (const auto& n : names) EXPECT_TRUE(NamespaceListed(n)) << n;
  lab_.reset();
  for (const auto& n : names) EXPECT_FALSE(NamespaceListed(n)) << n << " left behind";
}

// Without namespaces, tests fall back to distinct loopback addresses; etcd runs on those too.
TEST(NetnsFallbackTest, LoopbackAddresses) {
  InitLogging("info");
  auto addresses = NetnsLab::LoopbackAddresses(3);
  EXPECT_EQ(addresses, std::vector<std::string>({"127.0.0.2", "127.0.0.3", "127.0.0.4"}));
  TestEtcd::Options options;
  options.host = addresses[1];
  std::string skip;
  auto etcd = TestEtcd::Start(options, &skip);
  ASSERT_TRUE(etcd.ok()) << etcd.status().ToString();
  if (*etcd == nullptr) GTEST_SKIP() << skip;
  auto client = cluster::EtcdClient::Connect((*etcd)->url());
  ASSERT_TRUE(client.ok());
  auto put = (*client)->Put("/k", "v");
  EXPECT_TRUE(put.ok()) << put.status().ToString();
}

}  // namespace
}  // namespace eep::testing
