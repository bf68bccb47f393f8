// The etcd client against a real etcd (a child process, tests/cluster/etcd_server_util.h).
#include "cluster/etcd.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>

#include "core/logging.h"
#include "etcd_server_util.h"

namespace eep::cluster {
namespace {

using testing::TestEtcd;
using Clock = std::chrono::steady_clock;

int64_t MsSince(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

// Starts a fresh etcd, or skips the test when there is no etcd binary.
#define START_ETCD_OR_SKIP(var)                                \
  std::string var##_skip;                                      \
  auto var##_started = TestEtcd::Start({}, &var##_skip);       \
  ASSERT_TRUE(var##_started.ok()) << var##_started.status().ToString(); \
  if (*var##_started == nullptr) GTEST_SKIP() << var##_skip;   \
  std::unique_ptr<TestEtcd> var = std::move(*var##_started)

// One etcd shared by the tests that do not kill it; each test uses its own key prefix.
class EtcdTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    InitLogging("info");
    auto started = TestEtcd::Start({}, &skip_reason_);
    if (!started.ok()) {
      start_error_ = started.status().ToString();
      return;
    }
    etcd_ = std::move(*started).release();
  }
  static void TearDownTestSuite() {
    delete etcd_;
    etcd_ = nullptr;
  }
  void SetUp() override {
    ASSERT_TRUE(start_error_.empty()) << start_error_;
    if (etcd_ == nullptr) GTEST_SKIP() << skip_reason_;
    auto client = EtcdClient::Connect(etcd_->url());
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    client_ = std::move(*client);
    prefix_ = std::string("/t/") + ::testing::UnitTest::GetInstance()->current_test_info()->name() + "/";
  }

  static TestEtcd* etcd_;
  static std::string skip_reason_, start_error_;
  std::unique_ptr<EtcdClient> client_;
  std::string prefix_;
};
TestEtcd* EtcdTest::etcd_ = nullptr;
std::string EtcdTest::skip_reason_;
std::string EtcdTest::start_error_;

TEST_F(EtcdTest, PutGetDelete) {
  auto rev = client_->Put(prefix_ + "a", "one");
  ASSERT_TRUE(rev.ok()) << rev.status().ToString();
  EXPECT_GT(*rev, 0);
  auto got = client_->Get(prefix_ + "a");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->key, prefix_ + "a");
  EXPECT_EQ((*got)->value, "one");
  EXPECT_EQ((*got)->mod_revision, *rev);
  EXPECT_EQ((*got)->create_revision, *rev);
  EXPECT_EQ((*got)->version, 1);
  EXPECT_EQ((*got)->lease, 0);

  // Bytes that are not text survive base64 both ways; an empty value is a value.
  const std::string binary("\0\x01\xff\xfe{\"x\"}\n", 10);
  ASSERT_TRUE(client_->Put(prefix_ + "bin", binary).ok());
  ASSERT_TRUE(client_->Put(prefix_ + "empty", "").ok());
  auto bin = client_->Get(prefix_ + "bin");
  ASSERT_TRUE(bin.ok() && bin->has_value());
  EXPECT_EQ((*bin)->value, binary);
  auto empty = client_->Get(prefix_ + "empty");
  ASSERT_TRUE(empty.ok() && empty->has_value());
  EXPECT_EQ((*empty)->value, "");

  auto rev2 = client_->Put(prefix_ + "a", "two");
  ASSERT_TRUE(rev2.ok());
  EXPECT_GT(*rev2, *rev);
  got = client_->Get(prefix_ + "a");
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->value, "two");
  EXPECT_EQ((*got)->version, 2);
  EXPECT_EQ((*got)->create_revision, *rev);

  auto missing = client_->Get(prefix_ + "missing");
  ASSERT_TRUE(missing.ok()) << missing.status().ToString();
  EXPECT_FALSE(missing->has_value());

  ASSERT_TRUE(client_->Delete(prefix_ + "a").ok());
  got = client_->Get(prefix_ + "a");
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->has_value());
  // Deleting what is not there is not an error.
  EXPECT_TRUE(client_->Delete(prefix_ + "a").ok());
}

TEST_F(EtcdTest, GetPrefixAndDeletePrefix) {
  // "/p/" must not match its sibling "/p0" or "/p" itself.
  const std::string p = prefix_ + "p/";
  for (const char* k : {"b", "a", "c/d"}) ASSERT_TRUE(client_->Put(p + k, k).ok());
  ASSERT_TRUE(client_->Put(prefix_ + "p0", "sibling").ok());
  auto last = client_->Put(prefix_ + "p", "parent");
  ASSERT_TRUE(last.ok());

  int64_t revision = 0;
  auto kvs = client_->GetPrefix(p, &revision);
  ASSERT_TRUE(kvs.ok()) << kvs.status().ToString();
  ASSERT_EQ(kvs->size(), 3u);
  EXPECT_EQ((*kvs)[0].key, p + "a");
  EXPECT_EQ((*kvs)[1].key, p + "b");
  EXPECT_EQ((*kvs)[2].key, p + "c/d");
  EXPECT_EQ((*kvs)[2].value, "c/d");
  EXPECT_GE(revision, *last);

  auto none = client_->GetPrefix(prefix_ + "nothing/");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());

  ASSERT_TRUE(client_->DeletePrefix(p).ok());
  kvs = client_->GetPrefix(p);
  ASSERT_TRUE(kvs.ok());
  EXPECT_TRUE(kvs->empty());
  auto everything = client_->GetPrefix(prefix_);
  ASSERT_TRUE(everything.ok());
  ASSERT_EQ(everything->size(), 2u);  // the sibling and the parent stay
  EXPECT_EQ((*everything)[0].key, prefix_ + "p");
  EXPECT_EQ((*everything)[1].key, prefix_ + "p0");
}

TEST_F(EtcdTest, PutIfCreateOnly) {
  const std::string key = prefix_ + "leader";
  std::optional<EtcdKv> current;
  auto first = client_->PutIf(key, "node-a", 0, 0, &current);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_TRUE(*first);

  auto second = client_->PutIf(key, "node-b", 0, 0, &current);
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_FALSE(*second);
  ASSERT_TRUE(current.has_value());
  EXPECT_EQ(current->value, "node-a");
  EXPECT_GT(current->mod_revision, 0);

  auto got = client_->Get(key);
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->value, "node-a");
}

// What fences a stale coordinator: a write conditioned on the revision it last saw fails once
// someone else has written, and reports what is there now.
TEST_F(EtcdTest, PutIfStaleRevisionFails) {
  const std::string key = prefix_ + "epoch";
  auto r1 = client_->Put(key, "epoch-1");
  ASSERT_TRUE(r1.ok());

  auto other = EtcdClient::Connect(etcd_->url());
  ASSERT_TRUE(other.ok());
  auto newer = (*other)->PutIf(key, "epoch-2", *r1);
  ASSERT_TRUE(newer.ok()) << newer.status().ToString();
  EXPECT_TRUE(*newer);

  std::optional<EtcdKv> current;
  auto stale = client_->PutIf(key, "epoch-2-stale", *r1, 0, &current);
  ASSERT_TRUE(stale.ok()) << stale.status().ToString();
  EXPECT_FALSE(*stale);
  ASSERT_TRUE(current.has_value());
  EXPECT_EQ(current->value, "epoch-2");
  EXPECT_GT(current->mod_revision, *r1);

  int64_t new_revision = 0;
  auto retry = client_->PutIf(key, "epoch-3", current->mod_revision, 0, &current, &new_revision);
  ASSERT_TRUE(retry.ok());
  EXPECT_TRUE(*retry);
  auto after_retry = client_->Get(key);
  ASSERT_TRUE(after_retry.ok() && after_retry->has_value());
  EXPECT_EQ((*after_retry)->mod_revision, new_revision);

  // A conditional put on an absent key with a non-zero revision fails and reports "absent".
  auto absent = client_->PutIf(prefix_ + "absent", "x", 5, 0, &current);
  ASSERT_TRUE(absent.ok());
  EXPECT_FALSE(*absent);
  EXPECT_FALSE(current.has_value());

  auto now = client_->Get(key);
  ASSERT_TRUE(now.ok() && now->has_value());
  auto del_stale = client_->DeleteIf(key, *r1);
  ASSERT_TRUE(del_stale.ok());
  EXPECT_FALSE(*del_stale);
  auto del = client_->DeleteIf(key, (*now)->mod_revision);
  ASSERT_TRUE(del.ok());
  EXPECT_TRUE(*del);
  auto gone = client_->Get(key);
  ASSERT_TRUE(gone.ok());
  EXPECT_FALSE(gone->has_value());
}

TEST_F(EtcdTest, LeaseRevokeRemovesKey) {
  auto lease = client_->LeaseGrant(10);
  ASSERT_TRUE(lease.ok()) << lease.status().ToString();
  ASSERT_TRUE(client_->Put(prefix_ + "member", "alive", *lease).ok());
  auto got = client_->Get(prefix_ + "member");
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->lease, *lease);
  EXPECT_TRUE(client_->LeaseKeepAlive(*lease).ok());

  ASSERT_TRUE(client_->LeaseRevoke(*lease).ok());
  got = client_->Get(prefix_ + "member");
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->has_value());

  Status again = client_->LeaseKeepAlive(*lease);
  EXPECT_EQ(again.code(), StatusCode::kNotFound) << again.ToString();
  Status revoke_again = client_->LeaseRevoke(*lease);
  EXPECT_EQ(revoke_again.code(), StatusCode::kNotFound) << revoke_again.ToString();
  // A put on a dead lease is refused.
  auto put = client_->Put(prefix_ + "member", "zombie", *lease);
  EXPECT_EQ(put.status().code(), StatusCode::kNotFound) << put.status().ToString();
  EXPECT_NE(put.status().message().find("lease not found"), std::string::npos) << put.status().ToString();

  EXPECT_EQ(client_->LeaseGrant(0).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(EtcdTest, KeeperDestructorRevokes) {
  auto keeper = LeaseKeeper::Start(etcd_->url(), 5);
  ASSERT_TRUE(keeper.ok()) << keeper.status().ToString();
  ASSERT_TRUE(client_->Put(prefix_ + "member", "alive", (*keeper)->id()).ok());
  keeper->reset();
  auto got = client_->Get(prefix_ + "member");
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->has_value());
}

TEST_F(EtcdTest, KeeperKeepsKeyAlivePastTtl) {
  const int64_t ttl_s = 2;
  auto keeper = LeaseKeeper::Start(etcd_->url(), ttl_s);
  ASSERT_TRUE(keeper.ok()) << keeper.status().ToString();
  const std::string key = prefix_ + "member";
  auto rev = client_->Put(key, "alive", (*keeper)->id());
  ASSERT_TRUE(rev.ok()) << rev.status().ToString();
  // Waiting for a change that must not come: the key would be deleted when the lease expired.
  auto start = Clock::now();
  const int64_t wait_ms = 2 * ttl_s * 1000 + 500;
  auto change = client_->WaitForChange(key, *rev, wait_ms);
  EXPECT_EQ(change.status().code(), StatusCode::kTimeout) << "key changed at revision " << (change.ok() ? *change : 0);
  EXPECT_GE(MsSince(start), wait_ms - 50);
  auto got = client_->Get(key);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->has_value());
  EXPECT_FALSE((*keeper)->lost());
}

TEST_F(EtcdTest, AbandonedLeaseExpires) {
  const int64_t ttl_s = 1;
  auto keeper = LeaseKeeper::Start(etcd_->url(), ttl_s);
  ASSERT_TRUE(keeper.ok()) << keeper.status().ToString();
  const std::string key = prefix_ + "member";
  auto rev = client_->Put(key, "alive", (*keeper)->id());
  ASSERT_TRUE(rev.ok());
  (*keeper)->Abandon();  // a host that died: no more refreshes, no revoke
  auto start = Clock::now();
  auto change = client_->WaitForChange(key, *rev, (ttl_s + 4) * 1000);
  ASSERT_TRUE(change.ok()) << change.status().ToString();
  int64_t waited_ms = MsSince(start);
  EXPECT_GT(*change, *rev);
  EXPECT_LE(waited_ms, (ttl_s + 2) * 1000);
  auto got = client_->Get(key);
  ASSERT_TRUE(got.ok());
  EXPECT_FALSE(got->has_value());
  EXPECT_FALSE((*keeper)->lost());
  EEP_LOG_INFO("abandoned lease (TTL {} s): key deleted after {} ms", ttl_s, waited_ms);
}

TEST_F(EtcdTest, WaitForChangeSeesAnotherClient) {
  int64_t revision = 0;
  ASSERT_TRUE(client_->GetPrefix(prefix_, &revision).ok());
  auto other = EtcdClient::Connect(etcd_->url());
  ASSERT_TRUE(other.ok());
  // The watch starts from revision + 1, so a put that lands before the watch is set up still
  // counts: no ordering (and no sleep) is needed between the two threads.
  auto waiter = std::async(std::launch::async, [&] { return client_->WaitForChange(prefix_, revision, 5000); });
  auto put = (*other)->Put(prefix_ + "x/y", "v");
  ASSERT_TRUE(put.ok());
  auto changed = waiter.get();
  ASSERT_TRUE(changed.ok()) << changed.status().ToString();
  EXPECT_EQ(*changed, *put);

  // A delete is a change too.
  auto deleter = std::async(std::launch::async, [&] { return (*other)->Delete(prefix_ + "x/y"); });
  auto changed2 = client_->WaitForChange(prefix_, *put, 5000);
  ASSERT_TRUE(deleter.get().ok());
  ASSERT_TRUE(changed2.ok()) << changed2.status().ToString();
  EXPECT_GT(*changed2, *put);

  // A client's other calls go on while one of its threads waits.
  auto long_wait = std::async(std::launch::async, [&] { return client_->WaitForChange(prefix_ + "quiet/", *changed2, 1500); });
  auto t0 = Clock::now();
  ASSERT_TRUE(client_->Put(prefix_ + "unrelated", "v").ok());
  EXPECT_LT(MsSince(t0), 1000);
  EXPECT_EQ(long_wait.get().status().code(), StatusCode::kTimeout);
}

TEST_F(EtcdTest, WaitForChangeTimesOut) {
  int64_t revision = 0;
  ASSERT_TRUE(client_->GetPrefix(prefix_, &revision).ok());
  // A change just outside the prefix does not wake the waiter.
  ASSERT_TRUE(client_->Put(prefix_.substr(0, prefix_.size() - 1) + "-sibling", "v").ok());
  auto start = Clock::now();
  auto r = client_->WaitForChange(prefix_, revision, 400);
  int64_t waited_ms = MsSince(start);
  EXPECT_EQ(r.status().code(), StatusCode::kTimeout) << (r.ok() ? "changed" : r.status().ToString());
  EXPECT_GE(waited_ms, 350);
  EXPECT_LE(waited_ms, 2000);
  EXPECT_NE(r.status().message().find(prefix_), std::string::npos) << r.status().ToString();
}

TEST_F(EtcdTest, FailoverToSecondEndpoint) {
  const int dead_port = testing::PickFreePort();  // nothing listens there
  const std::string dead = "127.0.0.1:" + std::to_string(dead_port);
  auto client = EtcdClient::Connect("etcd://" + dead + "," + etcd_->endpoint(), 1000);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_EQ((*client)->endpoints().size(), 2u);
  auto start = Clock::now();
  auto rev = (*client)->Put(prefix_ + "k", "v");
  ASSERT_TRUE(rev.ok()) << rev.status().ToString();
  auto got = (*client)->Get(prefix_ + "k");
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status().ToString();
  EXPECT_EQ((*got)->value, "v");
  auto none = (*client)->WaitForChange(prefix_, *rev, 200);
  EXPECT_EQ(none.status().code(), StatusCode::kTimeout) << none.status().ToString();
  EXPECT_LT(MsSince(start), 3000);

  // A fresh client whose first endpoint is dead also watches through the second.
  auto fresh = EtcdClient::Connect("etcd://" + dead + "," + etcd_->endpoint(), 1000);
  ASSERT_TRUE(fresh.ok());
  auto seen = (*fresh)->WaitForChange(prefix_, *rev - 1, 2000);
  ASSERT_TRUE(seen.ok()) << seen.status().ToString();
  EXPECT_EQ(*seen, *rev);
}

TEST(EtcdUrlTest, ParsesEndpoints) {
  auto one = ParseEtcdUrl("etcd://10.0.0.1:2379");
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  EXPECT_EQ(*one, std::vector<std::string>({"10.0.0.1:2379"}));
  auto many = ParseEtcdUrl("etcd://10.0.0.1:2379,host-b:2380/");
  ASSERT_TRUE(many.ok()) << many.status().ToString();
  EXPECT_EQ(*many, std::vector<std::string>({"10.0.0.1:2379", "host-b:2380"}));
  auto bare = ParseEtcdUrl("localhost:2379");
  ASSERT_TRUE(bare.ok());
  EXPECT_EQ(*bare, std::vector<std::string>({"localhost:2379"}));
  auto http = ParseEtcdUrl("http://[::1]:2379");
  ASSERT_TRUE(http.ok()) << http.status().ToString();
  EXPECT_EQ(*http, std::vector<std::string>({"[::1]:2379"}));
}

TEST(EtcdUrlTest, BadUrlsNameTheFlag) {
  for (const char* url : {"", "etcd://", "etcd://host", "etcd://host:", "etcd://host:abc", "etcd://host:99999",
                          "etcd://:2379", "etcd://a:1,,b:2", "https://a:2379", "etcd://[::1:2379"}) {
    auto r = ParseEtcdUrl(url, "--etcd");
    ASSERT_FALSE(r.ok()) << url;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << url;
    EXPECT_NE(r.status().message().find("--etcd"), std::string::npos) << r.status().ToString();
    EXPECT_NE(r.status().message().find(url), std::string::npos) << r.status().ToString();
  }
  auto c = EtcdClient::Connect("etcd://nohost");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("--coordinator"), std::string::npos) << c.status().ToString();
  EXPECT_NE(c.status().message().find("nohost"), std::string::npos) << c.status().ToString();
  auto k = LeaseKeeper::Start("bad url", 1);
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), StatusCode::kInvalidArgument);
}

TEST(EtcdClientTest, UnreachableEndpointIsNamed) {
  const int dead_port = testing::PickFreePort();
  const std::string dead = "127.0.0.1:" + std::to_string(dead_port);
  auto client = EtcdClient::Connect("etcd://" + dead, 500);
  ASSERT_TRUE(client.ok()) << client.status().ToString();  // Connect contacts nobody
  auto start = Clock::now();
  auto got = (*client)->Get("/eep/some/key");
  ASSERT_FALSE(got.ok());
  EXPECT_LT(MsSince(start), 2000);
  EXPECT_EQ(got.status().code(), StatusCode::kUnavailable) << got.status().ToString();
  EXPECT_NE(got.status().message().find(dead), std::string::npos) << got.status().ToString();
  EXPECT_NE(got.status().message().find("/eep/some/key"), std::string::npos) << got.status().ToString();

  auto watch = (*client)->WaitForChange("/eep/", 0, 1000);
  ASSERT_FALSE(watch.ok());
  EXPECT_NE(watch.status().message().find(dead), std::string::npos) << watch.status().ToString();

  auto keeper = LeaseKeeper::Start("etcd://" + dead, 1);
  ASSERT_FALSE(keeper.ok());
  EXPECT_NE(keeper.status().message().find(dead), std::string::npos) << keeper.status().ToString();

  // An address that drops packets (or has no route): bounded by the connect timeout.
  auto blackhole = EtcdClient::Connect("etcd://10.255.255.1:2379", 300);
  ASSERT_TRUE(blackhole.ok());
  start = Clock::now();
  auto put = (*blackhole)->Put("/eep/k", "v");
  ASSERT_FALSE(put.ok());
  EXPECT_LT(MsSince(start), 3000);
  EXPECT_NE(put.status().message().find("10.255.255.1:2379"), std::string::npos) << put.status().ToString();
}

TEST(EtcdKeeperTest, OnLostFiresWhenEtcdIsKilled) {
  InitLogging("info");
  START_ETCD_OR_SKIP(etcd);
  std::mutex mu;
  std::condition_variable cv;
  int lost_calls = 0;
  auto keeper = LeaseKeeper::Start(etcd->url(), 1, [&] {
    std::lock_guard<std::mutex> lock(mu);
    ++lost_calls;
    cv.notify_all();
  });
  ASSERT_TRUE(keeper.ok()) << keeper.status().ToString();
  EXPECT_FALSE((*keeper)->lost());
  auto killed_at = Clock::now();
  etcd->Kill();
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(5), [&] { return lost_calls > 0; })) << "on_lost never ran";
  }
  int64_t detect_ms = MsSince(killed_at);
  EXPECT_TRUE((*keeper)->lost());
  EXPECT_LE(detect_ms, 3000);  // TTL + one refresh period + slack for a loaded machine
  EEP_LOG_INFO("lease loss detected {} ms after etcd was killed (TTL 1 s)", detect_ms);
  auto destroy_start = Clock::now();
  keeper->reset();  // lost: no revoke attempt against the dead etcd
  EXPECT_LT(MsSince(destroy_start), 500);
  EXPECT_EQ(lost_calls, 1);
}

TEST(EtcdKeeperTest, ClientRecoversAfterEtcdRestart) {
  InitLogging("info");
  START_ETCD_OR_SKIP(etcd);
  auto client = EtcdClient::Connect(etcd->url(), 1000);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE((*client)->Put("/t/restart", "kept").ok());
  etcd->Kill();
  auto down = (*client)->Get("/t/restart");
  ASSERT_FALSE(down.ok());
  EXPECT_NE(down.status().message().find(etcd->endpoint()), std::string::npos) << down.status().ToString();
  Status restarted = etcd->Restart();
  ASSERT_TRUE(restarted.ok()) << restarted.ToString();
  // Same client, new connection; the data survived on disk.
  auto got = (*client)->Get("/t/restart");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->value, "kept");
}

}  // namespace
}  // namespace eep::cluster
