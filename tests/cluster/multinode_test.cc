// Many hosts on one machine: etcd, two `eep node` hosts with 2 CPU ranks and a DRAM backup each,
// and `eep serve` coordinators, each host in its own network namespace (10.x addresses joined
// by a bridge) when the machine allows it, else on distinct loopback addresses. Greedy
// requests must come out equal to the HF golden tokens and to the run without failure when
// (a) every process of one host is SIGKILLed under load, (b) the active coordinator is
// SIGKILLed under load and a standby takes over (clients retry).
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <dirent.h>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "../backup/process_util.h"
#include "../serve/serve_test_util.h"
#include "cluster/etcd.h"
#include "etcd_server_util.h"
#include "netns_util.h"

namespace eep {
namespace {

using serve::test::GoldenPrompt;
using serve::test::LoadGolden;
using testing::ChildProcess;
using testing::NetnsLab;
using testing::TestEtcd;

constexpr const char* kModel = "qwen3moe-tiny";
constexpr int kRequests = 8;
constexpr int kMaxTokens = 40;

std::string ModelDir() { return std::string(EEP_TEST_DATA) + "/models/" + kModel; }

// Every descendant of `pid` (from /proc), deepest last.
std::vector<pid_t> Descendants(pid_t root) {
  std::map<pid_t, std::vector<pid_t>> children;
  if (DIR* d = opendir("/proc")) {
    while (dirent* e = readdir(d)) {
      const pid_t pid = static_cast<pid_t>(atoi(e->d_name));
      if (pid <= 0) continue;
      std::ifstream f("/proc/" + std::string(e->d_name) + "/stat");
      std::string line;
      if (!std::getline(f, line)) continue;
      const size_t close = line.rfind(')');
      if (close == std::string::npos) continue;
      char state;
      int ppid = 0;
      if (sscanf(line.c_str() + close + 2, "%c %d", &state, &ppid) == 2) children[ppid].push_back(pid);
    }
    closedir(d);
  }
  std::vector<pid_t> out, todo{root};
  while (!todo.empty()) {
    const pid_t p = todo.back();
    todo.pop_back();
    for (pid_t c : children[p]) {
      out.push_back(c);
      todo.push_back(c);
    }
  }
  return out;
}

// The test hosts: 0 runs etcd and the coordinators, 1 and 2 run `eep node`.
class MultiHost {
 public:
  // Returns a skip reason, or "" when ready.
  std::string Start() {
    std::string skip = "EEP_TEST_NO_NETNS is set";
    if (getenv("EEP_TEST_NO_NETNS") == nullptr) {  // set to run the loopback variant here
      auto lab = NetnsLab::Create(3, &skip);
      if (lab.ok()) lab_ = std::move(*lab);
      else skip = lab.status().ToString();  // namespaces half-permitted: loopback below
    }
    if (lab_) {
      for (int i = 0; i < 3; ++i) addr_.push_back(lab_->address(i));
    } else {
      std::cerr << "[ multinode ] no network namespaces (" << skip << "); hosts on loopback addresses\n";
      addr_ = NetnsLab::LoopbackAddresses(3);
    }
    TestEtcd::Options eo;
    eo.host = addr_[0];
    eo.exec_prefix = Prefix(0);
    std::string etcd_skip;
    auto etcd = TestEtcd::Start(eo, &etcd_skip);
    if (!etcd.ok()) return "etcd: " + etcd.status().ToString();
    if (*etcd == nullptr) return etcd_skip;
    etcd_ = std::move(*etcd);
    return "";
  }

  std::vector<std::string> Prefix(int host) const {
    if (!lab_) return {};
    auto p = lab_->ExecPrefix(host);
    const std::string ip = testing::FindExecutable("ip");
    if (!ip.empty()) p[0] = ip;
    return p;
  }

  // `eep node` on host 1 + k (node rank k of 2), 2 ranks, DRAM backup with anti-affinity.
  Status StartNode(int k, std::string name = "") {
    if (name.empty()) name = k == 0 ? "hosta" : "hostb";
    EEP_ASSIGN_OR_RETURN(auto node, ChildProcess::Spawn({"node", "--coordinator", etcd_->url(), "--name", name, "--address",
                                                         addr_[1 + k], "--ranks", "2", "--model", ModelDir(), "--node-rank",
                                                         std::to_string(k), "--num-nodes", "2", "--lease-ttl", "1"},
                                                        {}, Prefix(1 + k)));
    EEP_ASSIGN_OR_RETURN(std::string line, node->ReadLine(60000));
    if (line.rfind("node " + name + " ready", 0) != 0) return Status::Internal("unexpected node line: " + line + "\n" + node->Stderr());
    nodes_.push_back(std::move(node));
    return Status::Ok();
  }

  // A coordinator on host 0 at a fixed port; waits for its `listening` line unless standby.
  Result<std::unique_ptr<ChildProcess>> StartCoordinator(int port, bool standby) {
    std::vector<std::string> args{"serve", "--model", ModelDir(), "--ep", "4", "--coordinator", etcd_->url(), "--host", addr_[0],
                                  "--port", std::to_string(port), "--control-host", addr_[0], "--lease-ttl", "1",
                                  "--peer-timeout-ms", "1000", "--wait-nodes", "60"};
    if (standby) args.push_back("--standby");
    EEP_ASSIGN_OR_RETURN(auto c, ChildProcess::Spawn(args, {}, Prefix(0)));
    if (!standby) {
      EEP_ASSIGN_OR_RETURN(std::string line, c->ReadLine(90000));
      if (line.rfind("listening ", 0) != 0) return Status::Internal("unexpected serve line: " + line + "\n" + c->Stderr());
    }
    return c;
  }

  // SIGKILLs every process of host `h` at once (its namespace's processes, or on loopback the
  // node agent and all its descendants).
  void KillHost(int h, pid_t node_pid) {
    std::vector<pid_t> victims;
    if (lab_) {
      auto out = testing::RunCommand({testing::FindExecutable("ip"), "netns", "pids", lab_->host_ns(h)});
      if (out.ok()) {
        std::istringstream in(out->output);
        for (pid_t p; in >> p;) victims.push_back(p);
      }
    } else {
      victims = Descendants(node_pid);
      victims.push_back(node_pid);
    }
    for (pid_t p : victims) kill(p, SIGKILL);
  }

  // Runs fn where host 0's addresses are reachable.
  void OnHost0(const std::function<void()>& fn) {
    if (lab_) {
      ASSERT_TRUE(lab_->RunIn(0, fn).ok());
    } else {
      fn();
    }
  }

  const std::string& addr(int i) const { return addr_[static_cast<size_t>(i)]; }
  std::string etcd_url() const { return etcd_->url(); }
  TestEtcd& etcd() { return *etcd_; }
  int FreePort() const { return testing::PickFreePort(addr_[0]); }
  std::vector<std::unique_ptr<ChildProcess>>& nodes() { return nodes_; }

 private:
  std::unique_ptr<NetnsLab> lab_;
  std::vector<std::string> addr_;
  std::unique_ptr<TestEtcd> etcd_;
  std::vector<std::unique_ptr<ChildProcess>> nodes_;
};

struct Outcome {
  std::vector<int64_t> tokens;
  int attempts = 0;
  std::string error;
};

nlohmann::json Body(const GoldenPrompt& g) {
  return {{"prompt", g.ids}, {"max_tokens", kMaxTokens}, {"temperature", 0}, {"return_token_ids", true}, {"ignore_eos", true}};
}

// One request, retried (as a client of a highly available service does) across the given
// coordinator ports until it succeeds or the deadline passes.
Outcome Complete(const std::string& host, const std::vector<int>& ports, const nlohmann::json& body, double deadline_s) {
  Outcome o;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(deadline_s);
  while (std::chrono::steady_clock::now() < deadline) {
    for (int port : ports) {
      ++o.attempts;
      httplib::Client c(host, port);
      c.set_connection_timeout(2, 0);
      c.set_read_timeout(60, 0);
      auto r = c.Post("/v1/completions", body.dump(), "application/json");
      if (r && r->status == 200) {
        auto j = nlohmann::json::parse(r->body, nullptr, false);
        if (j.is_object() && j.contains("choices")) {
          o.tokens = j["choices"][0]["token_ids"].get<std::vector<int64_t>>();
          o.error.clear();
          return o;
        }
      }
      o.error = r ? "HTTP " + std::to_string(r->status) + ": " + r->body : "no response from port " + std::to_string(port);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // a retry back-off, not synchronisation
  }
  return o;
}

// kRequests concurrent requests from host 0; `during` runs (from this thread) once the
// coordinator at `watch_port` has done `after_steps` steps, with the requests in flight.
std::vector<Outcome> RunLoad(MultiHost& mh, const std::vector<int>& ports, int watch_port, int64_t after_steps,
                             const std::function<void()>& during) {
  const auto golden = LoadGolden(kModel);
  std::vector<Outcome> out(kRequests);
  std::thread load([&] {
    mh.OnHost0([&] {
      std::vector<std::thread> clients;
      for (int i = 0; i < kRequests; ++i)
        clients.emplace_back([&, i] { out[static_cast<size_t>(i)] = Complete(mh.addr(0), ports, Body(golden[i % golden.size()]), 120); });
      for (auto& t : clients) t.join();
    });
  });
  if (during) {
    mh.OnHost0([&] {
      nlohmann::json last;
      serve::test::WaitForCluster(mh.addr(0), watch_port,
                                  [&](const nlohmann::json& j) { return j.value("steps", int64_t{0}) >= after_steps; },
                                  std::chrono::steady_clock::now() + std::chrono::seconds(60), &last, 5);
    });
    during();
  }
  load.join();
  return out;
}

nlohmann::json ClusterJson(MultiHost& mh, int port) {
  nlohmann::json j;
  mh.OnHost0([&] {
    httplib::Client c(mh.addr(0), port);
    auto r = c.Get("/v1/cluster");
    if (r && r->status == 200) j = nlohmann::json::parse(r->body, nullptr, false);
  });
  return j;
}

void ExpectGoldenPrefix(const std::vector<Outcome>& outs) {
  const auto golden = LoadGolden(kModel);
  for (int i = 0; i < kRequests; ++i) {
    const auto& o = outs[static_cast<size_t>(i)];
    ASSERT_EQ(o.tokens.size(), static_cast<size_t>(kMaxTokens)) << "request " << i << ": " << o.error;
    const auto& g = golden[i % golden.size()].greedy;
    EXPECT_EQ(std::vector<int64_t>(o.tokens.begin(), o.tokens.begin() + static_cast<long>(g.size())), g)
        << "request " << i << " differs from HF greedy";
  }
}

// Two hosts with their nodes (2 ranks and a backup each) and the active coordinator.
void StartTwoHosts(MultiHost& mh, std::unique_ptr<ChildProcess>* coord, int* port) {
  ASSERT_TRUE(mh.StartNode(0).ok());
  ASSERT_TRUE(mh.StartNode(1).ok());
  *port = mh.FreePort();
  auto c = mh.StartCoordinator(*port, false);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  *coord = std::move(*c);
}

TEST(Multinode, LosingAHostLosesNoRequest) {
  MultiHost mh;
  if (std::string skip = mh.Start(); !skip.empty()) GTEST_SKIP() << skip;
  std::unique_ptr<ChildProcess> coord;
  int port = 0;
  ASSERT_NO_FATAL_FAILURE(StartTwoHosts(mh, &coord, &port));
  // Ranks 0,1 on host a, 2,3 on host b; each host's DRAM backup holds the other's experts.
  auto cluster = ClusterJson(mh, port);
  ASSERT_EQ(cluster["ranks"].size(), 4u) << cluster.dump();
  EXPECT_EQ(cluster["ranks"][0]["node"], "hosta");
  EXPECT_EQ(cluster["ranks"][3]["node"], "hostb");
  EXPECT_TRUE(cluster["backup"]["ready"].get<bool>()) << cluster.dump();
  {
    // Every rank and backup is registered in etcd under its host's lease.
    auto etcd = cluster::EtcdClient::Connect(mh.etcd_url());
    ASSERT_TRUE(etcd.ok());
    std::optional<Result<std::vector<cluster::EtcdKv>>> ranks, backups;
    mh.OnHost0([&] {
      ranks = (*etcd)->GetPrefix("/eep/default/ranks/");
      backups = (*etcd)->GetPrefix("/eep/default/backups/");
    });
    ASSERT_TRUE(ranks && ranks->ok() && backups && backups->ok());
    EXPECT_EQ((*ranks)->size(), 4u);
    EXPECT_EQ((*backups)->size(), 2u);
    for (const auto& kv : **ranks) EXPECT_NE(kv.lease, 0) << kv.key;
  }

  const auto reference = RunLoad(mh, {port}, port, 0, nullptr);
  ExpectGoldenPrefix(reference);

  const pid_t node_b = mh.nodes()[1]->pid();
  const int64_t steps = ClusterJson(mh, port).value("steps", int64_t{0});
  auto t_kill = std::chrono::steady_clock::now();
  const auto outs = RunLoad(mh, {port}, port, steps + 6, [&] {
    t_kill = std::chrono::steady_clock::now();
    mh.KillHost(2, node_b);
  });
  std::cerr << "[ multinode ] host killed -> all " << kRequests << " requests done: "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count() << " s\n";
  for (int i = 0; i < kRequests; ++i)
    EXPECT_EQ(outs[static_cast<size_t>(i)].tokens, reference[static_cast<size_t>(i)].tokens)
        << "request " << i << ": " << outs[static_cast<size_t>(i)].error;
  for (const auto& o : outs) EXPECT_EQ(o.attempts, 1) << "no retry needed: the coordinator lives";

  cluster = ClusterJson(mh, port);
  ASSERT_FALSE(cluster["events"].empty()) << cluster.dump();
  const auto& ev = cluster["events"][0];
  EXPECT_EQ(ev["kind"], "failover");
  EXPECT_EQ(ev["dead_ranks"].get<std::set<int>>(), (std::set<int>{2, 3})) << ev.dump();
  EXPECT_EQ(ev["members"].get<std::vector<int>>(), (std::vector<int>{0, 1}));
  // Anti-affinity: host b's experts were in host a's DRAM; nothing came from disk.
  EXPECT_GT(ev["experts"]["backup"].get<int64_t>(), 0) << ev.dump();
  EXPECT_EQ(ev["experts"]["disk"].get<int64_t>(), 0) << ev.dump();
  // The kill landed with requests in flight: the dead host's sequences resumed on the survivors.
  EXPECT_GT(ev["requeued_seqs"].get<int64_t>(), 0) << ev.dump();
  std::cerr << "[ multinode ] failover: " << ev.dump() << "\n";
  EXPECT_EQ(cluster["health"], "ok");

  // A replacement host joins and the cluster grows back to 4 ranks under the same coordinator.
  ASSERT_TRUE(mh.StartNode(1, "hostc").ok());
  int scale_status = 0;
  mh.OnHost0([&] {
    httplib::Client c(mh.addr(0), port);
    auto r = c.Post("/scale", R"({"ep_size": 4})", "application/json");
    scale_status = r ? r->status : 0;
  });
  ASSERT_EQ(scale_status, 202);
  bool grown = false;
  mh.OnHost0([&] {
    nlohmann::json last;
    grown = serve::test::WaitForCluster(
        mh.addr(0), port,
        [](const nlohmann::json& j) {
          int alive = 0, on_c = 0;
          for (const auto& r : j["ranks"]) {
            alive += r["state"] == "alive";
            on_c += r["state"] == "alive" && r["node"] == "hostc";
          }
          return alive == 4 && on_c == 2;
        },
        std::chrono::steady_clock::now() + std::chrono::seconds(60), &last, 50);
  });
  ASSERT_TRUE(grown) << ClusterJson(mh, port).dump();
  const auto regrown = RunLoad(mh, {port}, port, 0, nullptr);
  for (int i = 0; i < kRequests; ++i)
    EXPECT_EQ(regrown[static_cast<size_t>(i)].tokens, reference[static_cast<size_t>(i)].tokens) << "request " << i;
  EXPECT_EQ(ClusterJson(mh, port)["events"].back()["kind"], "scale-up");
}

// Two hosts with their nodes, an active coordinator and a standby that is standing by.
void StartWithStandby(MultiHost& mh, std::unique_ptr<ChildProcess>* active, int* port,
                      std::unique_ptr<ChildProcess>* standby, int* standby_port) {
  ASSERT_NO_FATAL_FAILURE(StartTwoHosts(mh, active, port));
  *standby_port = mh.FreePort();
  while (*standby_port == *port) *standby_port = mh.FreePort();
  auto s = mh.StartCoordinator(*standby_port, true);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  *standby = std::move(*s);
  ASSERT_TRUE((*standby)->WaitForStderr("standing by", 30000)) << (*standby)->Stderr();
}

TEST(Multinode, StandbyCoordinatorTakesOver) {
  MultiHost mh;
  if (std::string skip = mh.Start(); !skip.empty()) GTEST_SKIP() << skip;
  std::unique_ptr<ChildProcess> active, standby;
  int port = 0, standby_port = 0;
  ASSERT_NO_FATAL_FAILURE(StartWithStandby(mh, &active, &port, &standby, &standby_port));
  // A standby answers, but only to say where the active coordinator is.
  mh.OnHost0([&] {
    httplib::Client c(mh.addr(0), standby_port);
    auto r = c.Get("/health");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 503);
    EXPECT_NE(r->body.find("http://" + mh.addr(0) + ":" + std::to_string(port)), std::string::npos) << r->body;
  });
  auto before = ClusterJson(mh, port);
  std::set<int> pids_before;
  for (const auto& r : before["ranks"]) pids_before.insert(r["pid"].get<int>());

  const auto reference = RunLoad(mh, {port}, port, 0, nullptr);
  ExpectGoldenPrefix(reference);

  // Clients know both addresses and retry; the active coordinator dies with requests in flight.
  const int64_t steps = ClusterJson(mh, port).value("steps", int64_t{0});
  auto t_kill = std::chrono::steady_clock::now();
  const auto outs = RunLoad(mh, {port, standby_port}, port, steps + 6, [&] {
    t_kill = std::chrono::steady_clock::now();
    active->Signal(SIGKILL);
  });
  const double kill_to_done = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count();
  for (int i = 0; i < kRequests; ++i)
    EXPECT_EQ(outs[static_cast<size_t>(i)].tokens, reference[static_cast<size_t>(i)].tokens)
        << "request " << i << ": " << outs[static_cast<size_t>(i)].error;
  ASSERT_TRUE(standby->WaitForStderr("took over from the previous coordinator", 30000)) << standby->Stderr();
  int retried = 0;
  for (const auto& o : outs) retried += o.attempts > 1;
  EXPECT_GT(retried, 0) << "the coordinator died with requests in flight, which clients retried";

  // The same rank processes serve on: adopted, not restarted.
  auto after = ClusterJson(mh, standby_port);
  std::set<int> pids_after;
  for (const auto& r : after["ranks"])
    if (r["state"] == "alive") pids_after.insert(r["pid"].get<int>());
  EXPECT_EQ(pids_after, pids_before) << after.dump();
  ASSERT_FALSE(after["events"].empty()) << after.dump();
  EXPECT_EQ(after["events"].back()["kind"], "takeover");
  std::cerr << "[ multinode ] takeover: " << after["events"].back().dump() << ", " << retried << " request(s) retried; coordinator killed -> all "
            << kRequests << " requests done on the standby: " << kill_to_done << " s\n";
  EXPECT_GT(after["epoch"].get<int64_t>(), before["epoch"].get<int64_t>());
  EXPECT_EQ(after["health"], "ok");
}

}  // namespace
}  // namespace eep

namespace eep {
namespace {

// A coordinator that was only stopped (not dead) while a standby took over must, once it runs
// again, find itself deposed: it serves nothing and cannot disturb its successor's ranks
// (its node commands carry an older epoch than the one recorded in etcd).
TEST(Multinode, ReplacedCoordinatorIsFenced) {
  MultiHost mh;
  if (std::string skip = mh.Start(); !skip.empty()) GTEST_SKIP() << skip;
  std::unique_ptr<ChildProcess> old, standby;
  int port = 0, standby_port = 0;
  ASSERT_NO_FATAL_FAILURE(StartWithStandby(mh, &old, &port, &standby, &standby_port));
  const auto before = ClusterJson(mh, port);

  old->Signal(SIGSTOP);  // wedged: its lease lapses, the standby takes over
  ASSERT_TRUE(standby->WaitForStderr("took over from the previous coordinator", 30000)) << standby->Stderr();
  old->Signal(SIGCONT);

  const auto golden = LoadGolden(kModel);
  bool deposed = false;
  mh.OnHost0([&] {
    nlohmann::json last;
    deposed = serve::test::WaitForCluster(
        mh.addr(0), port,
        [](const nlohmann::json& j) { return j.value("health", std::string()).rfind("deposed", 0) == 0; },
        std::chrono::steady_clock::now() + std::chrono::seconds(20), &last, 20);
  });
  EXPECT_TRUE(deposed) << old->Stderr();
  // The old coordinator refuses work; the new one serves with every rank it adopted.
  Outcome refused;
  mh.OnHost0([&] { refused = Complete(mh.addr(0), {port}, Body(golden[0]), 0.01); });
  EXPECT_TRUE(refused.tokens.empty()) << "a deposed coordinator answered";
  Outcome served;
  mh.OnHost0([&] { served = Complete(mh.addr(0), {standby_port}, Body(golden[0]), 60); });
  ASSERT_EQ(served.tokens.size(), static_cast<size_t>(kMaxTokens)) << served.error;
  EXPECT_EQ(std::vector<int64_t>(served.tokens.begin(), served.tokens.begin() + 16), golden[0].greedy);
  auto after = ClusterJson(mh, standby_port);
  std::set<int> pids_before, pids_after;
  for (const auto& r : before["ranks"]) pids_before.insert(r["pid"].get<int>());
  for (const auto& r : after["ranks"])
    if (r["state"] == "alive") pids_after.insert(r["pid"].get<int>());
  EXPECT_EQ(pids_after, pids_before) << after.dump();
  EXPECT_EQ(after["health"], "ok");
  EXPECT_TRUE(old->Stderr().find("deposed") != std::string::npos);
}

}  // namespace
}  // namespace eep

namespace eep {
namespace {

// etcd down is not the cluster down: serving goes on (ranks are judged by their heartbeats),
// and when etcd is back the hosts register again with new leases.
TEST(Multinode, EtcdOutageDoesNotStopServing) {
  MultiHost mh;
  if (std::string skip = mh.Start(); !skip.empty()) GTEST_SKIP() << skip;
  std::unique_ptr<ChildProcess> coord;
  int port = 0;
  ASSERT_NO_FATAL_FAILURE(StartTwoHosts(mh, &coord, &port));
  const auto reference = RunLoad(mh, {port}, port, 0, nullptr);
  ExpectGoldenPrefix(reference);

  mh.etcd().Kill();
  // Past the hosts' 1 s leases: their agents notice, their ranks keep serving.
  ASSERT_TRUE(mh.nodes()[0]->WaitForStderr("lost its etcd lease", 20000)) << mh.nodes()[0]->Stderr();
  const auto during = RunLoad(mh, {port}, port, 0, nullptr);
  for (int i = 0; i < kRequests; ++i)
    EXPECT_EQ(during[static_cast<size_t>(i)].tokens, reference[static_cast<size_t>(i)].tokens) << during[static_cast<size_t>(i)].error;
  auto cluster = ClusterJson(mh, port);
  EXPECT_EQ(cluster["health"], "ok") << cluster.dump();
  EXPECT_TRUE(cluster["events"].empty()) << "no rank was declared dead: " << cluster.dump();

  ASSERT_TRUE(mh.etcd().Restart().ok());
  for (auto& n : mh.nodes())
    EXPECT_TRUE(n->WaitForStderr("registered again", 30000)) << n->Stderr();
  const auto after = RunLoad(mh, {port}, port, 0, nullptr);
  for (int i = 0; i < kRequests; ++i)
    EXPECT_EQ(after[static_cast<size_t>(i)].tokens, reference[static_cast<size_t>(i)].tokens) << after[static_cast<size_t>(i)].error;
  cluster = ClusterJson(mh, port);
  int alive = 0;
  for (const auto& r : cluster["ranks"]) alive += r["state"] == "alive";
  EXPECT_EQ(alive, 4) << cluster.dump();
}

}  // namespace
}  // namespace eep
