// CLI contract: two `eep backup-manager` processes (node 0 and 1 of 2) and `eep backup-fetch`;
// the fetched safetensors must equal the model's tensors byte for byte.
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>

#include "core/logging.h"
#include "model/safetensors.h"
#include "process_util.h"

namespace eep::testing {
namespace {

const std::string kModel = std::string(EEP_TEST_DATA) + "/models/qwen3moe-tiny";

class BackupCliTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    InitLogging("warn");
    dir_ = MakeTempDir("eep-backup-cli-");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_P(BackupCliTest, TwoManagersAndFetchMatchCheckpoint) {
  auto m0 = StartManager(kModel, 0, 2, GetParam());
  ASSERT_TRUE(m0.ok()) << m0.status().ToString();
  // Library chatter (UCX logs to stdout by default) must not get in front of `listening`.
  auto m1 = StartManager(kModel, 1, 2, GetParam(), {}, {{"UCX_LOG_LEVEL", "info"}});
  ASSERT_TRUE(m1.ok()) << m1.status().ToString();
  EXPECT_EQ(m0->endpoint.rfind("tcp://127.0.0.1:", 0), 0u) << m0->endpoint;
  EXPECT_NE(m0->endpoint, "tcp://127.0.0.1:0");
  EXPECT_NE(m0->endpoint, m1->endpoint);

  auto ckpt = Checkpoint::Open(kModel);
  ASSERT_TRUE(ckpt.ok());
  const std::string out = dir_ + "/fetched.safetensors";
  // Experts held by both nodes (odd: node 1, even: node 0).
  RunResult r =
      RunEep({"backup-fetch", "--manager", m0->endpoint + "," + m1->endpoint, "--layer", "2",
              "--experts", "3,4,10,15", "--out", out, "--fingerprint", (*ckpt)->Fingerprint()},
             30000);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("fetched 12 tensors"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("from 2 managers"), std::string::npos) << r.out;

  auto fetched = SafetensorsFile::Open(out);
  ASSERT_TRUE(fetched.ok()) << fetched.status().ToString();
  EXPECT_EQ((*fetched)->tensors().size(), 12u);
  for (int expert : {3, 4, 10, 15}) {
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
      std::string name =
          "model.layers.2.mlp.experts." + std::to_string(expert) + "." + proj + ".weight";
      auto it = (*fetched)->tensors().find(name);
      ASSERT_NE(it, (*fetched)->tensors().end()) << name;
      const TensorInfo* want = (*ckpt)->Find(name);
      ASSERT_NE(want, nullptr);
      EXPECT_EQ(it->second.dtype, want->dtype);
      EXPECT_EQ(it->second.shape, want->shape);
      ASSERT_EQ(it->second.nbytes, want->nbytes);
      EXPECT_EQ(std::memcmp(it->second.data, want->data, want->nbytes), 0) << name;
    }
  }
  EXPECT_EQ((*fetched)->metadata().at("fingerprint"), (*ckpt)->Fingerprint());

  // A second client process against the same managers (the first one's endpoints are gone).
  RunResult again = RunEep({"backup-fetch", "--manager", m1->endpoint, "--layer", "0", "--experts",
                            "1", "--filter", "down_proj", "--out", dir_ + "/one.safetensors"},
                           30000);
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.out.find("fetched 1 tensors"), std::string::npos) << again.out;

  // Expert 4 is node 0's: asking node 1 alone is a clear NotFound naming layer and expert.
  RunResult missing = RunEep({"backup-fetch", "--manager", m1->endpoint, "--layer", "0",
                              "--experts", "4", "--out", dir_ + "/x"},
                             30000);
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.err.find("layer 0 expert 4"), std::string::npos) << missing.err;

  // Wrong fingerprint: refused.
  RunResult refused =
      RunEep({"backup-fetch", "--manager", m0->endpoint, "--layer", "0", "--experts", "0", "--out",
              dir_ + "/y", "--fingerprint", "0123456789abcdef"},
             30000);
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find("fingerprint"), std::string::npos) << refused.err;

  // SIGTERM: clean shutdown, exit code 0.
  for (auto* m : {&*m0, &*m1}) {
    m->process->Signal(SIGTERM);
    auto code = m->process->Wait(10000);
    ASSERT_TRUE(code.ok()) << "manager did not stop on SIGTERM";
    EXPECT_EQ(*code, 0) << m->process->Stderr();
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, BackupCliTest, ::testing::Values("shm", "ucx"),
                         [](const auto& info) { return info.param; });

TEST(BackupCliErrors, ManagerRefusesBrokenCheckpoints) {
  std::string dir = MakeTempDir("eep-backup-broken-");
  std::filesystem::copy(kModel + "/config.json", dir + "/config.json");
  std::filesystem::copy(kModel + "/model.safetensors", dir + "/model.safetensors");
  std::filesystem::resize_file(dir + "/model.safetensors",
                               std::filesystem::file_size(dir + "/model.safetensors") / 2);
  RunResult r = RunEep({"backup-manager", "--model", dir, "--node-rank", "0", "--num-nodes", "1",
                        "--listen", "tcp://127.0.0.1:0"},
                       30000);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(r.out.empty()) << "must not print `listening` for a broken checkpoint: " << r.out;
  EXPECT_NE(r.err.find("model.safetensors"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("truncated"), std::string::npos) << r.err;

  RunResult bad_rank = RunEep({"backup-manager", "--model", kModel, "--node-rank", "3",
                               "--num-nodes", "2", "--listen", "tcp://127.0.0.1:0"},
                              30000);
  EXPECT_NE(bad_rank.exit_code, 0);
  EXPECT_NE(bad_rank.err.find("--node-rank"), std::string::npos) << bad_rank.err;
  std::filesystem::remove_all(dir);
}

TEST(BackupCliErrors, FetchWithoutManagerFailsFast) {
  // A port that was free a moment ago: start and stop a manager.
  std::string endpoint;
  {
    auto m = StartManager(kModel, 0, 1, "shm");
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    endpoint = m->endpoint;
  }
  auto start = std::chrono::steady_clock::now();
  RunResult r = RunEep({"backup-fetch", "--manager", endpoint, "--layer", "0", "--experts", "0",
                        "--out", "/dev/null", "--timeout-ms", "500"},
                       30000);
  double elapsed_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("Unavailable"), std::string::npos) << r.err;
  EXPECT_LT(elapsed_s, 10.0);
}

}  // namespace
}  // namespace eep::testing
