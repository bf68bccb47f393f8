// Test hosts on one machine: Linux network namespaces joined by a bridge, so multi-host tests
// (etcd membership, node agents) get distinct IP addresses and can lose a whole "host".
//
//   switch netns "eep<pid>l<k>sw": bridge br0 -- vh0, vh1, ... (veth)
//                                                 |    |
//   host netns "eep<pid>l<k>h<i>":              eth0 = 10.A.B.(1+i)/24, lo up
//
// Nothing is added to the root namespace: the root cannot reach the hosts' addresses, and the
// hosts reach each other only through the switch. Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN)
// and iproute2's `ip`; without them Create() returns nullptr and a skip reason, and tests use
// LoopbackAddresses() instead (distinct 127.0.0.x addresses, no isolation).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep::testing {

struct CommandOutput {
  int exit_code = -1;  // or 128 + signal
  std::string output;  // stdout and stderr, interleaved
};

// Runs argv (argv[0] looked up in PATH, then /usr/sbin and /sbin) to completion; no shell.
// kTimeout (the child is SIGKILLed) after timeout_ms; kNotFound if argv[0] cannot be run.
Result<CommandOutput> RunCommand(const std::vector<std::string>& argv, int64_t timeout_ms = 10000);

// Like RunCommand but a non-zero exit is an error quoting the command and its output.
Result<std::string> RunChecked(const std::vector<std::string>& argv, int64_t timeout_ms = 10000);

// The absolute path of `name` found in PATH, /usr/sbin or /sbin; "" if none.
std::string FindExecutable(const std::string& name);

// Runs fn on a fresh thread that has joined the network namespace at `ns_path`
// (/var/run/netns/NAME or /proc/PID/ns/net) and returns when fn has returned. Sockets fn creates
// belong to that namespace for their whole life, whichever thread uses them later.
Status RunInNetns(const std::string& ns_path, const std::function<void()>& fn);

class NetnsLab {
 public:
  // Builds the lab, or returns nullptr with *skip_reason set when this machine cannot (not root,
  // no `ip`, namespaces not permitted). Errors after namespaces could be made are returned.
  static Result<std::unique_ptr<NetnsLab>> Create(int num_hosts, std::string* skip_reason);
  // The fallback without namespaces: 127.0.0.2, 127.0.0.3, ... (all local on Linux).
  static std::vector<std::string> LoopbackAddresses(int n);

  // Kills every process still inside the lab's namespaces, then deletes them.
  ~NetnsLab();

  int num_hosts() const { return static_cast<int>(hosts_.size()); }
  const std::string& host_ns(int i) const { return hosts_.at(i); }
  const std::string& switch_ns() const { return switch_; }
  const std::string& address(int i) const { return addresses_.at(i); }
  // Prepended to a command to run it on host i: {"ip", "netns", "exec", NAME}.
  std::vector<std::string> ExecPrefix(int i) const;
  // /var/run/netns/NAME of host i (for RunInNetns).
  std::string NetnsPath(int i) const;
  // RunInNetns(NetnsPath(i), fn).
  Status RunIn(int i, const std::function<void()>& fn) const;

 private:
  NetnsLab() = default;
  void Destroy();

  std::string ip_;  // absolute path of `ip`
  std::string switch_;
  std::vector<std::string> hosts_;
  std::vector<std::string> addresses_;
  std::vector<std::string> created_;  // namespaces to delete, in creation order
};

}  // namespace eep::testing
