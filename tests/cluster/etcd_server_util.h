// A real single-member etcd for tests: a child process on free ports with a temporary data dir
// and fast raft timings (heartbeat 50 ms, election 500 ms; leases then have a 1 s minimum TTL).
//
//   std::string skip;
//   auto etcd = TestEtcd::Start({}, &skip);
//   ASSERT_TRUE(etcd.ok()) << etcd.status().ToString();
//   if (*etcd == nullptr) GTEST_SKIP() << skip;
//   auto client = cluster::EtcdClient::Connect((*etcd)->url());
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep::testing {

class TestEtcd {
 public:
  struct Options {
    std::string host = "127.0.0.1";  // listen address for clients and peers
    // Prepended to etcd's command line, e.g. NetnsLab::ExecPrefix(i) to run it on a test host.
    std::vector<std::string> exec_prefix;
    std::string name = "eep-test";  // member name
  };

  // Starts etcd and waits (at most 10 s) until GET /health says true. Returns nullptr with
  // *skip_reason set when no etcd binary exists (PATH, /usr/bin/etcd); an error naming the
  // log's tail when etcd exits or stays unhealthy.
  static Result<std::unique_ptr<TestEtcd>> Start(const Options& options, std::string* skip_reason);
  // The etcd binary's path, or "" if none.
  static std::string FindBinary();

  // SIGKILLs etcd (if running) and removes the data dir.
  ~TestEtcd();

  std::string url() const { return "etcd://" + endpoint(); }
  std::string endpoint() const { return options_.host + ":" + std::to_string(client_port_); }
  const std::string& host() const { return options_.host; }
  int client_port() const { return client_port_; }
  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }

  // SIGKILLs etcd's process group and reaps it; no-op when not running.
  void Kill();
  // Starts etcd again on the same ports and data dir (after Kill) and waits for health.
  Status Restart();
  // The last `max_bytes` of etcd's log (stdout and stderr).
  std::string LogTail(size_t max_bytes = 3000) const;

 private:
  TestEtcd() = default;
  Status Launch();
  Status WaitHealthy(int64_t timeout_ms);

  Options options_;
  std::string binary_;
  std::string dir_;  // temp dir: data/ and etcd.log
  int client_port_ = 0;
  int peer_port_ = 0;
  pid_t pid_ = -1;
};

// A TCP port that was free on `host` a moment ago (bind port 0, read it, close). Falls back to
// 127.0.0.1 when `host` is not an address of this namespace (a test host's address).
int PickFreePort(const std::string& host = "127.0.0.1");

}  // namespace eep::testing
