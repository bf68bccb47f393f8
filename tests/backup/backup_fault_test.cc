// Fault tests: managers killed before and during fetches, or stalled. The client must return
// kRemoteDisconnect or kTimeout within its deadline, never hang, and report the failure.
#include <gtest/gtest.h>
#include <signal.h>
#include <ucp/api/ucp.h>

#include <filesystem>
#include <future>
#include <numeric>
#include <thread>

#include "backup/backup.h"
#include "core/logging.h"
#include "model/config.h"
#include "model/make_model.h"
#include "model/safetensors.h"
#include "process_util.h"

namespace eep::backup {
namespace {

using eep::testing::ManagerProcess;
using eep::testing::StartManager;

const std::string kTiny = std::string(EEP_TEST_DATA) + "/models/qwen3moe-tiny";

// A checkpoint big enough that one fetch takes a while over UCX/tcp (~100 MiB of experts),
// generated once per test binary.
std::string g_big_model_dir;  // set once generated

const std::string& BigModel() {
  static std::string dir = [] {
    std::string d = eep::testing::MakeTempDir("eep-backup-fault-model-");
    MakeModelOptions o;
    o.num_layers = 2;
    o.hidden_size = 1024;
    o.num_experts = 16;
    o.moe_intermediate_size = 1024;
    o.intermediate_size = 256;
    o.seed = 5;
    Status s = MakeModel(o, d);
    EXPECT_TRUE(s.ok()) << s.ToString();
    g_big_model_dir = d;
    return d;
  }();
  return dir;
}

struct Destinations {
  std::vector<std::vector<uint8_t>> storage;
  FetchDestinations map;
};
Destinations AllocateFor(const std::vector<ExpertParamInfo>& infos) {
  Destinations d;
  d.storage.reserve(infos.size());
  for (const auto& p : infos) {
    d.storage.emplace_back(p.num_bytes);
    d.map[p.name] = {d.storage.back().data(), p.num_bytes, transfer::MemoryKind::kHost};
  }
  return d;
}

bool IsDisconnectOrTimeout(const Status& s) {
  return s.code() == StatusCode::kRemoteDisconnect || s.code() == StatusCode::kTimeout;
}

struct Case {
  std::string transport;
  std::string ucx_tls;  // client-side UCX_TLS for ucx ("" = UCX's choice)
};

class BackupFaultTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { InitLogging("error"); }

  BackupClientOptions Options(const std::vector<std::string>& endpoints, int64_t timeout_ms) const {
    BackupClientOptions o;
    o.endpoints = endpoints;
    o.timeout_ms = timeout_ms;
    if (!GetParam().ucx_tls.empty()) o.transport_options["ucx"].params["tls"] = GetParam().ucx_tls;
    return o;
  }
};

TEST_P(BackupFaultTest, ManagerKilledBeforeFetch) {
  auto m0 = StartManager(kTiny, 0, 2, GetParam().transport);
  ASSERT_TRUE(m0.ok()) << m0.status().ToString();
  auto m1 = StartManager(kTiny, 1, 2, GetParam().transport);
  ASSERT_TRUE(m1.ok()) << m1.status().ToString();
  const int64_t timeout_ms = 3000;
  ExpertBackupClient client(Options({m0->endpoint, m1->endpoint}, timeout_ms));
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
  auto infos = client.ListExpertParams(1, {0, 1, 2, 3}, "");
  ASSERT_TRUE(infos.ok());
  auto dst = AllocateFor(*infos);
  ASSERT_TRUE(client.FetchLogicalExperts(1, {0, 1, 2, 3}, "", dst.map).ok());

  m1->process->Signal(SIGKILL);
  ASSERT_TRUE(m1->process->Wait(5000).ok());

  auto start = std::chrono::steady_clock::now();
  Status s = client.FetchLogicalExperts(1, {0, 1, 2, 3}, "", dst.map);
  double elapsed_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "fetch after the kill: %s (%.0f ms)\n", s.ToString().c_str(),
               elapsed_s * 1e3);
  EXPECT_TRUE(IsDisconnectOrTimeout(s)) << s.ToString();
  EXPECT_NE(s.message().find(m1->endpoint), std::string::npos) << s.ToString();
  EXPECT_LT(elapsed_s, timeout_ms / 1000.0 + 2.0);
  EXPECT_FALSE(client.IsReady());
  EXPECT_NE(client.Health().find("degraded"), std::string::npos) << client.Health();

  // Node 0's experts are still served; node 1's are now Unavailable (its manager is down).
  auto even = client.ListExpertParams(1, {0, 2}, "");
  ASSERT_TRUE(even.ok()) << even.status().ToString();
  auto dst_even = AllocateFor(*even);
  EXPECT_TRUE(client.FetchLogicalExperts(1, {0, 2}, "", dst_even.map).ok());
  EXPECT_EQ(client.FetchLogicalExperts(1, {1}, "", dst.map).code(), StatusCode::kUnavailable);

  // Reconnecting does not hang on the dead one either.
  start = std::chrono::steady_clock::now();
  EXPECT_EQ(client.Connect().code(), StatusCode::kUnavailable);
  elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(elapsed_s, timeout_ms / 1000.0 + 2.0);

  // A restarted node 1 (new process, new port) can be used by a new client.
  auto m1b = StartManager(kTiny, 1, 2, GetParam().transport);
  ASSERT_TRUE(m1b.ok());
  ExpertBackupClient client2(Options({m0->endpoint, m1b->endpoint}, timeout_ms));
  ASSERT_TRUE(client2.Connect().ok()) << client2.Health();
  EXPECT_TRUE(client2.FetchLogicalExperts(1, {0, 1, 2, 3}, "", dst.map).ok());
}

TEST_P(BackupFaultTest, ManagerKilledMidFetch) {
  auto m = StartManager(BigModel(), 0, 1, GetParam().transport);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const int64_t timeout_ms = 5000;
  ExpertBackupClient client(Options({m->endpoint}, timeout_ms));
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
  std::vector<int64_t> all(16);
  std::iota(all.begin(), all.end(), 0);
  auto infos = client.ListExpertParams(0, all, "");
  ASSERT_TRUE(infos.ok());
  auto dst = AllocateFor(*infos);  // ~96 MiB per layer

  // Fetch in a loop on another thread; kill the manager while it runs.
  std::atomic<bool> stop{false};
  std::atomic<int> ok_fetches{0};
  auto fetcher = std::async(std::launch::async, [&]() -> std::pair<Status, double> {
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      Status s = client.FetchLogicalExperts(0, all, "", dst.map);
      double elapsed_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!s.ok() || stop) return {s, elapsed_s};
      ++ok_fetches;
    }
  });
  // Kill once at least one fetch completed, a moment into the next one.
  for (int i = 0; i < 1000 && ok_fetches.load() == 0 &&
                  fetcher.wait_for(std::chrono::milliseconds(0)) != std::future_status::ready;
       ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  m->process->Signal(SIGKILL);
  auto done = fetcher.wait_for(std::chrono::milliseconds(timeout_ms + 5000));
  stop = true;
  ASSERT_EQ(done, std::future_status::ready) << "fetch hung after the manager was killed";
  auto [s, elapsed_s] = fetcher.get();
  std::fprintf(stderr, "fetch while the manager was killed: %s (%.0f ms)\n", s.ToString().c_str(),
               elapsed_s * 1e3);
  EXPECT_GT(ok_fetches.load(), 0);
  EXPECT_TRUE(IsDisconnectOrTimeout(s)) << s.ToString();
  EXPECT_LT(elapsed_s, timeout_ms / 1000.0 + 2.0);
  EXPECT_FALSE(client.IsReady());
}

// The other way round: a client process killed in the middle of a fetch must not take the
// manager down or leave it unable to serve the next client.
TEST_P(BackupFaultTest, ClientKilledMidFetchManagerSurvives) {
  auto m = StartManager(BigModel(), 0, 1, GetParam().transport);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::map<std::string, std::string> env;
  if (!GetParam().ucx_tls.empty()) env["UCX_TLS"] = GetParam().ucx_tls;
  for (int round = 0; round < 3; ++round) {
    auto fetch = eep::testing::ChildProcess::Spawn(
        {"backup-fetch", "--manager", m->endpoint, "--layer", std::to_string(round % 2),
         "--experts", "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "--out", "/dev/null"},
        env);
    ASSERT_TRUE(fetch.ok());
    // Kill it while it fetches: once connected (its log says so), a moment into the transfer.
    ASSERT_TRUE((*fetch)->WaitForStderr("backup: connected to", 20000)) << (*fetch)->Stderr();
    std::this_thread::sleep_for(std::chrono::milliseconds(5 + 20 * round));
    (*fetch)->Signal(SIGKILL);
    ASSERT_TRUE((*fetch)->Wait(10000).ok());
  }
  ASSERT_FALSE(m->process->Wait(0).ok())
      << "manager died with its client: " << m->process->Stderr();
  ExpertBackupClient client(Options({m->endpoint}, 10000));
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
  auto infos = client.ListExpertParams(1, {3, 4}, "");
  ASSERT_TRUE(infos.ok());
  auto dst = AllocateFor(*infos);
  Status s = client.FetchLogicalExperts(1, {3, 4}, "", dst.map);
  EXPECT_TRUE(s.ok()) << s.ToString();
  auto ckpt = Checkpoint::Open(BigModel());
  ASSERT_TRUE(ckpt.ok());
  for (size_t i = 0; i < infos->size(); ++i)
    EXPECT_EQ(std::memcmp(dst.storage[i].data(), (*ckpt)->Find((*infos)[i].name)->data,
                          dst.storage[i].size()),
              0);
}

// Clients killed at random points of their start-up, connection included. Known to fail for
// ucx with UCX 1.13: a peer that dies while the manager's UCX still has a wire-up reply queued
// trips an assertion there and aborts the manager (openucx/ucx#8175, fixed in later UCX).
TEST_P(BackupFaultTest, ClientsKilledDuringConnect) {
  if (GetParam().transport == "ucx") {
    unsigned major = 0, minor = 0, release = 0;
    ucp_get_version(&major, &minor, &release);
    if (major == 1 && minor < 14)
      GTEST_SKIP() << "UCX " << major << "." << minor << " aborts the target when a peer dies "
                   << "mid wire-up (openucx/ucx#8175); needs UCX >= 1.14";
  }
  auto m = StartManager(kTiny, 0, 1, GetParam().transport);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::map<std::string, std::string> env;
  if (!GetParam().ucx_tls.empty()) env["UCX_TLS"] = GetParam().ucx_tls;
  for (int round = 0; round < 12; ++round) {
    auto fetch =
        eep::testing::ChildProcess::Spawn({"backup-fetch", "--manager", m->endpoint, "--layer", "0",
                                           "--experts", "0,1,2,3", "--out", "/dev/null"},
                                          env);
    ASSERT_TRUE(fetch.ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(7 * round));
    (*fetch)->Signal(SIGKILL);
    ASSERT_TRUE((*fetch)->Wait(10000).ok());
    ASSERT_FALSE(m->process->Wait(0).ok())
        << "manager died after a client was killed " << 7 * round << " ms into its start-up:\n"
        << m->process->Stderr();
  }
  ExpertBackupClient client(Options({m->endpoint}, 10000));
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
}

INSTANTIATE_TEST_SUITE_P(Transports, BackupFaultTest,
                         ::testing::Values(Case{"shm", ""}, Case{"ucx", ""}, Case{"ucx", "tcp"}),
                         [](const auto& info) {
                           return info.param.transport +
                                  (info.param.ucx_tls.empty() ? "" : "_" + info.param.ucx_tls);
                         });

// A manager that stops answering (SIGSTOP) while UCX over tcp needs it to progress: the fetch
// must end with kTimeout at the deadline.
TEST(BackupStall, StoppedManagerTimesOut) {
  InitLogging("error");
  auto m = StartManager(BigModel(), 0, 1, "ucx");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  BackupClientOptions o;
  o.endpoints = {m->endpoint};
  o.timeout_ms = 1500;
  o.transport_options["ucx"].params["tls"] = "tcp";
  ExpertBackupClient client(o);
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
  std::vector<int64_t> all(16);
  std::iota(all.begin(), all.end(), 0);
  auto infos = client.ListExpertParams(1, all, "");
  ASSERT_TRUE(infos.ok());
  auto dst = AllocateFor(*infos);
  m->process->Signal(SIGSTOP);
  auto start = std::chrono::steady_clock::now();
  Status s = client.FetchLogicalExperts(1, all, "", dst.map);
  double elapsed_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  m->process->Signal(SIGCONT);
  EXPECT_EQ(s.code(), StatusCode::kTimeout) << s.ToString();
  EXPECT_LT(elapsed_s, 1.5 + 3.0);
  EXPECT_FALSE(client.IsReady());
}

// Removes the generated checkpoint after the last test.
class RemoveBigModel : public ::testing::Environment {
 public:
  void TearDown() override {
    if (!g_big_model_dir.empty()) std::filesystem::remove_all(g_big_model_dir);
  }
};
[[maybe_unused]] ::testing::Environment* const kRemoveBigModel =
    ::testing::AddGlobalTestEnvironment(new RemoveBigModel);

}  // namespace
}  // namespace eep::backup
