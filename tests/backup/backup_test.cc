// Expert backup, in process: managers serve from threads, a client fetches, and every byte is
// compared with the checkpoint read independently (Checkpoint::Open of the test model).
#include "backup/backup.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <numeric>
#include <thread>

#include "core/logging.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "process_util.h"

namespace eep::backup {
namespace {

const std::string kModels = std::string(EEP_TEST_DATA) + "/models/";

// A manager serving from a thread until destroyed.
class ServedManager {
 public:
  static Result<std::unique_ptr<ServedManager>> Start(BackupManagerOptions options) {
    EEP_ASSIGN_OR_RETURN(auto manager, ExpertBackupManager::Create(options));
    return std::unique_ptr<ServedManager>(new ServedManager(std::move(manager)));
  }
  ~ServedManager() {
    stop_ = true;
    thread_.join();
  }
  const std::string& endpoint() const { return manager_->endpoint(); }
  const BackupDescriptor& descriptor() const { return manager_->descriptor(); }

 private:
  explicit ServedManager(std::unique_ptr<ExpertBackupManager> m)
      : manager_(std::move(m)), thread_([this] { EXPECT_TRUE(manager_->Serve(stop_).ok()); }) {}
  std::unique_ptr<ExpertBackupManager> manager_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

BackupManagerOptions ManagerOptions(const std::string& model, int node_rank, int num_nodes,
                                    const std::string& transport, int replicas = 1) {
  BackupManagerOptions o;
  o.model_dir = kModels + model;
  o.node_rank = node_rank;
  o.num_nodes = num_nodes;
  o.replicas = replicas;
  o.transport = transport;
  o.listen_endpoint = "tcp://127.0.0.1:0";
  return o;
}

// Host buffers for every tensor of `infos`, plus the destinations map pointing at them.
struct Buffers {
  std::map<std::string, std::vector<uint8_t>> bytes;
  FetchDestinations destinations;
};
Buffers Allocate(const std::vector<ExpertParamInfo>& infos) {
  Buffers b;
  for (const auto& p : infos) {
    auto& v = b.bytes[p.name];
    v.assign(p.num_bytes, 0xcd);
    b.destinations[p.name] = {v.data(), v.size(), transfer::MemoryKind::kHost};
  }
  return b;
}

// Compares fetched bytes with the checkpoint's.
void ExpectMatchesCheckpoint(const Checkpoint& ckpt, const Buffers& b) {
  for (const auto& [name, bytes] : b.bytes) {
    const TensorInfo* t = ckpt.Find(name);
    ASSERT_NE(t, nullptr) << name;
    ASSERT_EQ(t->nbytes, bytes.size()) << name;
    EXPECT_EQ(std::memcmp(t->data, bytes.data(), bytes.size()), 0)
        << name << " differs from the checkpoint";
  }
}

TEST(BackupAssignment, EachExpertOnExactlyRNodes) {
  for (int n = 1; n <= 5; ++n) {
    for (int r = 1; r <= n; ++r) {
      for (int64_t e = 0; e < 23; ++e) {
        auto nodes = NodesHoldingExpert(e, n, r);
        ASSERT_EQ(nodes.size(), static_cast<size_t>(r));
        EXPECT_EQ(nodes[0], e % n);
        int holders = 0;
        for (int k = 0; k < n; ++k) {
          bool holds = NodeHoldsExpert(e, k, n, r);
          holders += holds;
          EXPECT_EQ(holds, std::find(nodes.begin(), nodes.end(), k) != nodes.end())
              << e << " " << k << " " << n << " " << r;
        }
        EXPECT_EQ(holders, r);
      }
    }
  }
  EXPECT_FALSE(ValidateAssignment(2, 2, 1).ok());
  EXPECT_FALSE(ValidateAssignment(0, 2, 3).ok());
  EXPECT_FALSE(ValidateAssignment(0, 0, 1).ok());
  EXPECT_NE(ValidateAssignment(0, 2, 0).message().find("--replicas"), std::string::npos);
}

TEST(BackupDescriptorJson, RoundTripAndBounds) {
  InitLogging("warn");
  auto m = ServedManager::Start(ManagerOptions("qwen3moe-tiny", 1, 2, "shm"));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const BackupDescriptor& d = (*m)->descriptor();
  auto back = BackupDescriptor::FromJson(nlohmann::json::parse(d.ToJson().dump()));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->node_rank, 1);
  EXPECT_EQ(back->num_nodes, 2);
  EXPECT_EQ(back->fingerprint, d.fingerprint);
  EXPECT_EQ(back->params.size(), d.params.size());
  // Node 1 of 2 holds the odd experts of all 4 MoE layers: 4 * 8 experts * 3 tensors.
  EXPECT_EQ(d.params.size(), 4u * 8 * 3);
  for (const auto& [name, p] : d.params) {
    EXPECT_EQ(p.expert % 2, 1) << name;
    EXPECT_EQ(p.offset % kBackupTensorAlignment, 0u);
  }
  auto j = d.ToJson();
  j["params"].begin().value()["offset"] = d.region.num_bytes;  // past the end
  auto bad = BackupDescriptor::FromJson(j);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("outside"), std::string::npos) << bad.status().ToString();
}

class BackupFetchTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    InitLogging("warn");
    auto ckpt = Checkpoint::Open(kModels + "qwen3moe-tiny");
    ASSERT_TRUE(ckpt.ok());
    ckpt_ = std::move(ckpt).value();
    for (int k = 0; k < 2; ++k) {
      auto m = ServedManager::Start(ManagerOptions("qwen3moe-tiny", k, 2, GetParam()));
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      managers_.push_back(std::move(m).value());
    }
  }

  BackupClientOptions ClientOptions() const {
    BackupClientOptions o;
    for (const auto& m : managers_) o.endpoints.push_back(m->endpoint());
    o.expected_fingerprint = ckpt_->Fingerprint();
    o.timeout_ms = 10000;
    return o;
  }

  std::unique_ptr<Checkpoint> ckpt_;
  std::vector<std::unique_ptr<ServedManager>> managers_;
};

TEST_P(BackupFetchTest, SingleExpertMatchesCheckpoint) {
  ExpertBackupClient client(ClientOptions());
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
  EXPECT_TRUE(client.IsReady());
  EXPECT_EQ(client.Health().rfind("ready: 2/2", 0), 0u) << client.Health();
  for (int64_t expert : {3, 4}) {
    auto infos = client.ListExpertParams(1, {expert}, "");
    ASSERT_TRUE(infos.ok()) << infos.status().ToString();
    ASSERT_EQ(infos->size(), 3u);
    EXPECT_EQ((*infos)[0].role, "gate");
    EXPECT_EQ((*infos)[2].role, "down");
    EXPECT_EQ((*infos)[0].name,
              "model.layers.1.mlp.experts." + std::to_string(expert) + ".gate_proj.weight");
    EXPECT_EQ((*infos)[0].manager, managers_[expert % 2]->endpoint());
    Buffers b = Allocate(*infos);
    Status s = client.FetchLogicalExperts(1, {expert}, "", b.destinations);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectMatchesCheckpoint(*ckpt_, b);
  }
}

TEST_P(BackupFetchTest, BatchedAcrossManagersEveryLayer) {
  ExpertBackupClient client(ClientOptions());
  ASSERT_TRUE(client.Connect().ok()) << client.Health();
  auto config = LoadModelConfig(kModels + "qwen3moe-tiny");
  ASSERT_TRUE(config.ok());
  std::vector<int64_t> all(config->num_experts);
  std::iota(all.begin(), all.end(), 0);
  for (int64_t layer : config->MoeLayers()) {
    auto infos = client.ListExpertParams(layer, all, "");
    ASSERT_TRUE(infos.ok()) << infos.status().ToString();
    ASSERT_EQ(infos->size(), all.size() * 3);
    Buffers b = Allocate(*infos);
    Status s = client.FetchLogicalExperts(layer, all, "", b.destinations);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectMatchesCheckpoint(*ckpt_, b);
  }
}

TEST_P(BackupFetchTest, NameFilterSelectsTensors) {
  ExpertBackupClient client(ClientOptions());
  ASSERT_TRUE(client.Connect().ok());
  auto infos = client.ListExpertParams(2, {5, 6}, "gate_proj|up_proj");
  ASSERT_TRUE(infos.ok());
  ASSERT_EQ(infos->size(), 4u);
  for (const auto& p : *infos) EXPECT_NE(p.role, "down");
  Buffers b = Allocate(*infos);
  ASSERT_TRUE(client.FetchLogicalExperts(2, {5, 6}, "gate_proj|up_proj", b.destinations).ok());
  ExpectMatchesCheckpoint(*ckpt_, b);
  EXPECT_EQ(client.FetchLogicalExperts(2, {5}, "nomatch", b.destinations).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(client.FetchLogicalExperts(2, {5}, "(", b.destinations).code(),
            StatusCode::kInvalidArgument);
}

TEST_P(BackupFetchTest, ClearErrors) {
  ExpertBackupClient client(ClientOptions());
  ASSERT_TRUE(client.Connect().ok());
  auto infos = client.ListExpertParams(1, {2}, "");
  ASSERT_TRUE(infos.ok());
  Buffers b = Allocate(*infos);

  Status s = client.FetchLogicalExperts(1, {99}, "", b.destinations);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("layer 1 expert 99"), std::string::npos) << s.ToString();
  s = client.FetchLogicalExperts(42, {2}, "", b.destinations);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("layer 42"), std::string::npos) << s.ToString();

  FetchDestinations missing = b.destinations;
  missing.erase(infos->back().name);
  s = client.FetchLogicalExperts(1, {2}, "", missing);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(infos->back().name), std::string::npos) << s.ToString();

  FetchDestinations small = b.destinations;
  small[infos->front().name].num_bytes -= 2;
  s = client.FetchLogicalExperts(1, {2}, "", small);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);

  FetchDestinations device = b.destinations;
  device[infos->front().name].kind = transfer::MemoryKind::kDevice;
  EXPECT_EQ(client.FetchLogicalExperts(1, {2}, "", device).code(), StatusCode::kUnimplemented);
  // After all that, the client is still healthy and fetches fine.
  EXPECT_TRUE(client.IsReady());
  EXPECT_TRUE(client.FetchLogicalExperts(1, {2}, "", b.destinations).ok());
}

TEST_P(BackupFetchTest, ExpertNotHeldByConnectedManagers) {
  // Only node 0 is configured: odd experts are held by nobody this client knows.
  BackupClientOptions o = ClientOptions();
  o.endpoints.resize(1);
  ExpertBackupClient client(o);
  ASSERT_TRUE(client.Connect().ok());
  std::vector<uint8_t> buf(1 << 20);
  Status s = client.FetchLogicalExperts(0, {3}, "", {});
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("layer 0 expert 3"), std::string::npos) << s.ToString();
}

INSTANTIATE_TEST_SUITE_P(Transports, BackupFetchTest, ::testing::Values("shm", "ucx"),
                         [](const auto& info) { return info.param; });

TEST(BackupModels, EveryArchitectureRoundTrips) {
  InitLogging("warn");
  for (const char* model : {"qwen3moe-tiny", "mixtral-tiny", "deepseekv3-tiny"}) {
    SCOPED_TRACE(model);
    auto ckpt = Checkpoint::Open(kModels + model);
    ASSERT_TRUE(ckpt.ok());
    auto config = LoadModelConfig(kModels + model);
    ASSERT_TRUE(config.ok());
    auto m = ServedManager::Start(ManagerOptions(model, 0, 1, "shm"));
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    BackupClientOptions o;
    o.endpoints = {(*m)->endpoint()};
    o.expected_fingerprint = (*ckpt)->Fingerprint();
    ExpertBackupClient client(o);
    ASSERT_TRUE(client.Connect().ok()) << client.Health();
    std::vector<int64_t> all(config->num_experts);
    std::iota(all.begin(), all.end(), 0);
    for (int64_t layer : config->MoeLayers()) {
      auto infos = client.ListExpertParams(layer, all, "");
      ASSERT_TRUE(infos.ok()) << infos.status().ToString();
      Buffers b = Allocate(*infos);
      ASSERT_TRUE(client.FetchLogicalExperts(layer, all, "", b.destinations).ok());
      ExpectMatchesCheckpoint(**ckpt, b);
    }
    // Dense layers (DeepSeek's first_k_dense_replace) have no backed-up experts.
    for (int64_t layer = 0; layer < config->num_layers; ++layer) {
      if (!config->IsMoeLayer(layer)) {
        EXPECT_EQ(client.FetchLogicalExperts(layer, {0}, "", {}).code(), StatusCode::kNotFound);
      }
    }
  }
}

TEST(BackupReplicas, AnyReplicaServes) {
  InitLogging("warn");
  auto ckpt = Checkpoint::Open(kModels + "qwen3moe-tiny");
  ASSERT_TRUE(ckpt.ok());
  // R = 2 of N = 3: node 0 holds experts e with e mod 3 in {0, 2}.
  auto m = ServedManager::Start(ManagerOptions("qwen3moe-tiny", 0, 3, "shm", 2));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  BackupClientOptions o;
  o.endpoints = {(*m)->endpoint()};
  ExpertBackupClient client(o);
  ASSERT_TRUE(client.Connect().ok());
  auto infos = client.ListExpertParams(3, {0, 2, 3, 5}, "");
  ASSERT_TRUE(infos.ok()) << infos.status().ToString();
  Buffers b = Allocate(*infos);
  ASSERT_TRUE(client.FetchLogicalExperts(3, {0, 2, 3, 5}, "", b.destinations).ok());
  ExpectMatchesCheckpoint(**ckpt, b);
  EXPECT_EQ(client.FetchLogicalExperts(3, {1}, "", b.destinations).code(), StatusCode::kNotFound);
}

TEST(BackupFingerprint, MismatchIsRefused) {
  InitLogging("error");
  auto other = Checkpoint::Open(kModels + "mixtral-tiny");
  ASSERT_TRUE(other.ok());
  auto m = ServedManager::Start(ManagerOptions("qwen3moe-tiny", 0, 1, "shm"));
  ASSERT_TRUE(m.ok());
  BackupClientOptions o;
  o.endpoints = {(*m)->endpoint()};
  o.expected_fingerprint = (*other)->Fingerprint();
  ExpertBackupClient client(o);
  Status s = client.Connect();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("fingerprint"), std::string::npos) << s.ToString();
  EXPECT_FALSE(client.IsReady());
  EXPECT_EQ(client.NumReadyManagers(), 0u);
  EXPECT_EQ(client.FetchLogicalExperts(0, {0}, "", {}).code(), StatusCode::kUnavailable);

  // No expected fingerprint: managers must still agree with each other.
  auto m2 = ServedManager::Start(ManagerOptions("mixtral-tiny", 0, 1, "shm"));
  ASSERT_TRUE(m2.ok());
  BackupClientOptions o2;
  o2.endpoints = {(*m)->endpoint(), (*m2)->endpoint()};
  ExpertBackupClient client2(o2);
  EXPECT_EQ(client2.Connect().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(client2.NumReadyManagers(), 1u);
  EXPECT_NE(client2.Health().find("degraded"), std::string::npos) << client2.Health();
}

// A free port: bind to port 0, read it back, close.
std::string UnusedEndpoint() {
  auto m = ServedManager::Start(ManagerOptions("qwen3moe-tiny", 0, 1, "shm"));
  EXPECT_TRUE(m.ok());
  return (*m)->endpoint();  // closed when `m` goes away
}

TEST(BackupUnavailable, NoManagerListening) {
  InitLogging("error");
  std::string endpoint = UnusedEndpoint();
  BackupClientOptions o;
  o.endpoints = {endpoint};
  o.timeout_ms = 300;
  ExpertBackupClient client(o);
  auto start = std::chrono::steady_clock::now();
  Status s = client.Connect();
  double elapsed_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find(endpoint), std::string::npos);
  EXPECT_LT(elapsed_s, 3.0);
  EXPECT_FALSE(client.IsReady());
  EXPECT_EQ(client.Health().rfind("unavailable", 0), 0u) << client.Health();
  EXPECT_EQ(client.FetchLogicalExperts(0, {0}, "", {}).code(), StatusCode::kUnavailable);

  BackupClientOptions none;
  ExpertBackupClient empty(none);
  EXPECT_EQ(empty.Connect().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(empty.IsReady());
}

class BrokenCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    InitLogging("off");
    dir_ = eep::testing::MakeTempDir("eep-broken-");
    std::filesystem::copy(kModels + "qwen3moe-tiny/config.json", dir_ + "/config.json");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(BrokenCheckpointTest, TruncatedFileIsRefused) {
  std::filesystem::copy(kModels + "qwen3moe-tiny/model.safetensors", dir_ + "/model.safetensors");
  std::filesystem::resize_file(dir_ + "/model.safetensors",
                               std::filesystem::file_size(dir_ + "/model.safetensors") - 1000);
  BackupManagerOptions o = ManagerOptions("", 0, 1, "shm");
  o.model_dir = dir_;
  auto m = ExpertBackupManager::Create(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kCorruption) << m.status().ToString();
  EXPECT_NE(m.status().message().find("model.safetensors"), std::string::npos)
      << m.status().ToString();
}

TEST_F(BrokenCheckpointTest, MissingExpertTensorIsRefused) {
  auto src = SafetensorsFile::Open(kModels + "qwen3moe-tiny/model.safetensors");
  ASSERT_TRUE(src.ok());
  const std::string victim = "model.layers.2.mlp.experts.5.down_proj.weight";
  std::vector<TensorToWrite> keep;
  for (const auto& [name, t] : (*src)->tensors())
    if (name != victim) keep.push_back({name, t.dtype, t.shape, t.data});
  ASSERT_TRUE(WriteSafetensors(dir_ + "/model.safetensors", keep).ok());
  // Node 1 of 2 holds odd experts: expert 5 is its, so it refuses; node 0 does not need it.
  BackupManagerOptions o = ManagerOptions("", 1, 2, "shm");
  o.model_dir = dir_;
  auto m = ExpertBackupManager::Create(o);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound) << m.status().ToString();
  EXPECT_NE(m.status().message().find(victim), std::string::npos) << m.status().ToString();
  o.node_rank = 0;
  EXPECT_TRUE(ExpertBackupManager::Create(o).ok());
}

TEST(BackupManagerOptionsTest, BadFlagsAreNamed) {
  InitLogging("off");
  auto o = ManagerOptions("qwen3moe-tiny", 2, 2, "shm");
  auto m = ExpertBackupManager::Create(o);
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("--node-rank"), std::string::npos);
  o = ManagerOptions("qwen3moe-tiny", 0, 1, "carrier-pigeon");
  m = ExpertBackupManager::Create(o);
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("carrier-pigeon"), std::string::npos);
  o = ManagerOptions("qwen3moe-tiny", 0, 1, "shm");
  o.listen_endpoint = "bogus://x";
  m = ExpertBackupManager::Create(o);
  EXPECT_EQ(m.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(m.status().message().find("--listen"), std::string::npos);
  // Node 20 of 32 holds nothing of a 16-expert model.
  o = ManagerOptions("qwen3moe-tiny", 20, 32, "shm");
  m = ExpertBackupManager::Create(o);
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("holds no experts"), std::string::npos);
}

}  // namespace
}  // namespace eep::backup
