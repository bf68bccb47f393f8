// Bad input to the multi-host commands: clear one-line errors naming the flag, nothing
// registered or started on the way.
#include <gtest/gtest.h>

#include "../backup/process_util.h"
#include "cluster/etcd.h"
#include "etcd_server_util.h"

namespace eep {
namespace {

using testing::ChildProcess;
using testing::RunEep;
using testing::TestEtcd;

std::string Model() { return std::string(EEP_TEST_DATA) + "/models/qwen3moe-tiny"; }

class ClusterCli : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string skip;
    auto etcd = TestEtcd::Start({}, &skip);
    ASSERT_TRUE(etcd.ok()) << etcd.status().ToString();
    if (*etcd == nullptr) GTEST_SKIP() << skip;
    etcd_ = std::move(*etcd);
  }
  std::unique_ptr<TestEtcd> etcd_;
};

TEST_F(ClusterCli, BadCoordinatorUrlNamesTheFlag) {
  for (const auto& cmd : std::vector<std::vector<std::string>>{
           {"node", "--coordinator", "http://x:1", "--name", "a", "--model", Model(), "--expert-backup", "off"},
           {"serve", "--model", Model(), "--ep", "2", "--coordinator", "etcd://host-without-port"}}) {
    auto r = RunEep(cmd, 30000);
    EXPECT_NE(r.exit_code, 0) << cmd[0];
    EXPECT_NE(r.err.find("--coordinator"), std::string::npos) << r.err;
  }
}

TEST_F(ClusterCli, DuplicateNodeNameIsRefused) {
  auto first = ChildProcess::Spawn({"node", "--coordinator", etcd_->url(), "--name", "twin", "--model", Model(),
                                    "--expert-backup", "off"});
  ASSERT_TRUE(first.ok());
  auto line = (*first)->ReadLine(30000);
  ASSERT_TRUE(line.ok()) << (*first)->Stderr();
  auto r = RunEep({"node", "--coordinator", etcd_->url(), "--name", "twin", "--model", Model(), "--expert-backup", "off"},
                  30000);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--name twin"), std::string::npos) << r.err;
  // The first one is still the registered one.
  auto etcd = cluster::EtcdClient::Connect(etcd_->url());
  ASSERT_TRUE(etcd.ok());
  auto kv = (*etcd)->Get("/eep/default/nodes/twin");
  ASSERT_TRUE(kv.ok() && *kv);
  EXPECT_NE((**kv).value.find(line->substr(line->rfind(' ') + 1)), std::string::npos) << (**kv).value;
}

TEST_F(ClusterCli, TooFewRankSlotsNamesEp) {
  auto node = ChildProcess::Spawn({"node", "--coordinator", etcd_->url(), "--name", "small", "--ranks", "1", "--model",
                                   Model(), "--expert-backup", "off"});
  ASSERT_TRUE(node.ok());
  ASSERT_TRUE((*node)->ReadLine(30000).ok()) << (*node)->Stderr();
  auto r = RunEep({"serve", "--model", Model(), "--ep", "3", "--coordinator", etcd_->url(), "--wait-nodes", "1"}, 60000);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--ep 3"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("1 rank slot"), std::string::npos) << r.err;
}

TEST_F(ClusterCli, SecondActiveCoordinatorNeedsStandby) {
  auto etcd = cluster::EtcdClient::Connect(etcd_->url());
  ASSERT_TRUE(etcd.ok());
  ASSERT_TRUE((*etcd)->Put("/eep/default/leader", R"({"id":"someone"})").ok());
  auto r = RunEep({"serve", "--model", Model(), "--ep", "2", "--coordinator", etcd_->url()}, 30000);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--standby"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace eep
