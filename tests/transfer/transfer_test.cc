// Transfer engine: registry, descriptors, and both built-in backends (same process: one engine
// exports, another imports). Cross-process failures are covered by tests/backup.
#include "transfer/transfer.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <thread>

#include "core/logging.h"
#include "transfer/copy.h"

namespace eep::transfer {
namespace {

std::vector<uint8_t> Pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

// Progresses a target engine until destroyed (what a backup manager does in its loop).
class TargetThread {
 public:
  explicit TargetThread(Engine* engine)
      : thread_([this, engine] {
          while (!stop_) engine->ProgressFor(20);
        }) {}
  ~TargetThread() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

TEST(TransferRegistry, BuiltinsAndErrors) {
  InitLogging("warn");
  auto names = BackendNames();
  EXPECT_NE(std::find(names.begin(), names.end(), "shm"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "ucx"), names.end());
  auto missing = CreateEngine("nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("shm"), std::string::npos)
      << missing.status().ToString();

  Status dup =
      RegisterBackend({"shm", "again", [](const EngineOptions&) -> Result<std::unique_ptr<Engine>> {
                         return Status::Internal("unused");
                       }});
  EXPECT_EQ(dup.code(), StatusCode::kAlreadyExists);

  // A backend added at run time is created by name like the built-ins.
  bool called = false;
  ASSERT_TRUE(RegisterBackend({"test-fake", "fake",
                               [&](const EngineOptions&) -> Result<std::unique_ptr<Engine>> {
                                 called = true;
                                 return Status::Unavailable("fake backend has no hardware");
                               }})
                  .ok());
  auto fake = CreateEngine("test-fake");
  EXPECT_TRUE(called);
  EXPECT_EQ(fake.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(fake.status().message().find("test-fake"), std::string::npos);

  auto bad_param = CreateEngine("shm", EngineOptions{{{"bogus", "1"}}});
  EXPECT_EQ(bad_param.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_param.status().message().find("bogus"), std::string::npos);
}

TEST(TransferDescriptor, JsonRoundTripAndErrors) {
  RegionDescriptor d;
  d.backend = "ucx";
  d.host_id = LocalHostId();
  d.owner = "node 3";
  d.base_address = 0x7fff00001000ull;
  d.num_bytes = 123456789;
  d.kind = MemoryKind::kPinnedHost;
  d.remote_writable = true;
  d.backend_blob = std::string("\0\x01\xff binary", 10);
  auto back = RegionDescriptor::FromJson(nlohmann::json::parse(d.ToJson().dump()));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->backend, d.backend);
  EXPECT_EQ(back->host_id, d.host_id);
  EXPECT_EQ(back->owner, d.owner);
  EXPECT_EQ(back->base_address, d.base_address);
  EXPECT_EQ(back->num_bytes, d.num_bytes);
  EXPECT_EQ(back->kind, d.kind);
  EXPECT_TRUE(back->remote_writable);
  EXPECT_EQ(back->backend_blob, d.backend_blob);

  auto j = d.ToJson();
  j.erase("num_bytes");
  auto bad = RegionDescriptor::FromJson(j);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("num_bytes"), std::string::npos);
  j = d.ToJson();
  j["blob"] = "not*base64";
  EXPECT_FALSE(RegionDescriptor::FromJson(j).ok());
}

TEST(TransferDescriptor, Base64) {
  for (size_t n = 0; n < 40; ++n) {
    auto bytes = Pattern(n, static_cast<uint32_t>(n));
    std::string s(bytes.begin(), bytes.end());
    auto back = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(back.ok()) << n;
    EXPECT_EQ(*back, s) << n;
  }
  EXPECT_EQ(Base64Encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(Base64Encode("fo"), "Zm8=");
  EXPECT_FALSE(Base64Decode("abc").ok());
  EXPECT_FALSE(Base64Decode("a=bc").ok());
}

TEST(TransferCopy, StreamingCopyMatchesMemcpy) {
  auto src = Pattern((4 << 20) + 333, 3);
  std::vector<uint8_t> dst(src.size() + 64);
  for (size_t n : {size_t{0}, size_t{1}, size_t{63}, kStreamingCopyMinBytes - 1,
                   kStreamingCopyMinBytes, kStreamingCopyMinBytes + 77, size_t{4 << 20}}) {
    for (size_t dst_off : {0, 1, 15, 33}) {
      for (size_t src_off : {0, 7}) {
        std::fill(dst.begin(), dst.end(), 0xee);
        StreamingCopy(dst.data() + dst_off, src.data() + src_off, n);
        ASSERT_EQ(std::memcmp(dst.data() + dst_off, src.data() + src_off, n), 0)
            << n << " " << dst_off << " " << src_off;
        ASSERT_EQ(dst[dst_off + n], 0xee) << "wrote past the end: " << n << " " << dst_off;
        if (dst_off > 0) {
          ASSERT_EQ(dst[dst_off - 1], 0xee);
        }
      }
    }
  }
}

class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    InitLogging("warn");
    EngineOptions options;
    if (GetParam() == "shm") options.params["slice_bytes"] = "4096";  // exercise slicing
    auto target = CreateEngine(GetParam(), options);
    ASSERT_TRUE(target.ok()) << target.status().ToString();
    target_ = std::move(target).value();
    auto initiator = CreateEngine(GetParam(), options);
    ASSERT_TRUE(initiator.ok()) << initiator.status().ToString();
    initiator_ = std::move(initiator).value();
  }

  // Allocates an exportable region filled with a pattern; imports it.
  void Export(uint64_t num_bytes, bool writable) {
    ExportOptions opts;
    opts.remote_writable = writable;
    opts.owner = "test target";
    auto region = target_->AllocateExportable(num_bytes, opts);
    ASSERT_TRUE(region.ok()) << region.status().ToString();
    region_ = std::move(region).value();
    auto pattern = Pattern(num_bytes, 7);
    std::memcpy(region_->data(), pattern.data(), num_bytes);
    auto desc = region_->Export();
    ASSERT_TRUE(desc.ok()) << desc.status().ToString();
    EXPECT_EQ(desc->backend, GetParam());
    // Through JSON, as peers get it.
    auto parsed = RegionDescriptor::FromJson(nlohmann::json::parse(desc->ToJson().dump()));
    ASSERT_TRUE(parsed.ok());
    // The target progresses from here on (UCX completes the wire-up inside Import).
    if (!progress_) progress_ = std::make_unique<TargetThread>(target_.get());
    auto remote = initiator_->Import(*parsed);
    ASSERT_TRUE(remote.ok()) << remote.status().ToString();
    remote_ = std::move(remote).value();
  }

  void TearDown() override {
    // Closing the initiator's endpoint gracefully takes the target's progress.
    if (!progress_ && target_) progress_ = std::make_unique<TargetThread>(target_.get());
    remote_.reset();
    initiator_.reset();
    progress_.reset();
    region_.reset();
    target_.reset();
  }

  std::unique_ptr<Engine> target_, initiator_;
  std::unique_ptr<LocalRegion> region_;
  std::unique_ptr<RemoteRegion> remote_;
  std::unique_ptr<TargetThread> progress_;
};

TEST_P(BackendTest, Capabilities) {
  EXPECT_EQ(target_->name(), GetParam());
  EXPECT_EQ(target_->SupportsRemote(), GetParam() == "ucx");
  EXPECT_FALSE(target_->SupportsDevice());
  auto dev = target_->AllocateExportable(4096, ExportOptions{MemoryKind::kDevice, false, ""});
  EXPECT_EQ(dev.status().code(), StatusCode::kUnimplemented);
  std::vector<uint8_t> buf(64);
  auto reg_dev = target_->RegisterMemory(buf.data(), buf.size(), MemoryKind::kDevice);
  EXPECT_EQ(reg_dev.status().code(), StatusCode::kUnimplemented);
  auto reg = target_->RegisterMemory(buf.data(), buf.size(), MemoryKind::kHost);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  EXPECT_EQ((*reg)->Export().status().code(), StatusCode::kInvalidArgument);  // not exportable
}

TEST_P(BackendTest, PinnedRegionOrClearRefusal) {
  // Locking needs RLIMIT_MEMLOCK (or root): either it works, or the error says how to fix it.
  ExportOptions opts;
  opts.kind = MemoryKind::kPinnedHost;
  auto region = target_->AllocateExportable(1 << 20, opts);
  if (region.ok()) {
    EXPECT_EQ((*region)->kind(), MemoryKind::kPinnedHost);
    auto desc = (*region)->Export();
    ASSERT_TRUE(desc.ok());
    EXPECT_EQ(desc->kind, MemoryKind::kPinnedHost);
  } else {
    EXPECT_EQ(region.status().code(), StatusCode::kResourceExhausted);
    EXPECT_NE(region.status().message().find("ulimit -l"), std::string::npos)
        << region.status().ToString();
  }
}

TEST_P(BackendTest, BatchedReadMatchesSource) {
  const uint64_t n = 3 << 20;
  ASSERT_NO_FATAL_FAILURE(Export(n, false));
  const uint8_t* src = region_->data();
  // Unaligned, zero-length, overlapping and full-region items in one batch.
  std::vector<std::pair<uint64_t, uint64_t>> spans = {{0, 1},        {1, 4095}, {12345, 0},
                                                      {777, 100000}, {0, n},    {n - 3, 3}};
  std::vector<std::vector<uint8_t>> dst;
  std::vector<TransferItem> items;
  for (auto [off, len] : spans) {
    dst.emplace_back(len + 1, 0xab);
    items.push_back({dst.back().data(), off, len});
  }
  // A registered destination as well (UCX passes its memh).
  std::vector<uint8_t> registered(65536, 0);
  auto reg = initiator_->RegisterMemory(registered.data(), registered.size(), MemoryKind::kHost);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  items.push_back({registered.data(), 1000, registered.size()});

  Status s = initiator_->Transfer(Op::kRead, *remote_, items, Deadline::AfterMs(20000));
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (size_t i = 0; i < spans.size(); ++i) {
    auto [off, len] = spans[i];
    EXPECT_EQ(std::memcmp(dst[i].data(), src + off, len), 0) << "item " << i;
    EXPECT_EQ(dst[i][len], 0xab) << "item " << i << " wrote past its end";
  }
  EXPECT_EQ(std::memcmp(registered.data(), src + 1000, registered.size()), 0);
  EXPECT_TRUE(remote_->CheckAlive().ok());
}

TEST_P(BackendTest, AdjacentItemsMergeCorrectly) {
  const uint64_t n = 2 << 20;
  ASSERT_NO_FATAL_FAILURE(Export(n, false));
  // 1000 items adjacent on both sides, then a run that is adjacent locally but not remotely,
  // then one adjacent remotely but not locally.
  std::vector<uint8_t> dst(n, 0);
  std::vector<TransferItem> items;
  for (uint64_t i = 0; i < 1000; ++i) items.push_back({dst.data() + i * 1000, i * 1000, 1000});
  items.push_back({dst.data() + 1000000, 1500000, 5000});
  items.push_back({dst.data() + 1200000, 1505000, 7000});
  auto req = initiator_->Prepare(Op::kRead, *remote_, items);
  ASSERT_TRUE(req.ok());
  EXPECT_EQ((*req)->num_items(), items.size());
  ASSERT_TRUE(initiator_->Post(**req).ok());
  ASSERT_TRUE(initiator_->Wait(**req, Deadline::AfterMs(20000)).ok());
  for (const auto& it : items)
    EXPECT_EQ(std::memcmp(it.local, region_->data() + it.remote_offset, it.num_bytes), 0)
        << it.remote_offset;
}

TEST_P(BackendTest, PrepareRejectsBadBatches) {
  ASSERT_NO_FATAL_FAILURE(Export(1 << 16, false));
  std::vector<uint8_t> buf(1 << 17);
  auto past = initiator_->Prepare(Op::kRead, *remote_, {{buf.data(), (1 << 16) - 10, 11}});
  EXPECT_EQ(past.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(past.status().message().find("item 0"), std::string::npos) << past.status().ToString();
  auto huge =
      initiator_->Prepare(Op::kRead, *remote_, {{buf.data(), 0, 1}, {buf.data(), ~0ull - 5, 10}});
  EXPECT_EQ(huge.status().code(), StatusCode::kOutOfRange);
  auto null = initiator_->Prepare(Op::kRead, *remote_, {{nullptr, 0, 10}});
  EXPECT_EQ(null.status().code(), StatusCode::kInvalidArgument);
  auto write = initiator_->Prepare(Op::kWrite, *remote_, {{buf.data(), 0, 10}});
  EXPECT_EQ(write.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(write.status().message().find("writable"), std::string::npos);

  auto req = initiator_->Prepare(Op::kRead, *remote_, {{buf.data(), 0, 10}});
  ASSERT_TRUE(req.ok());
  EXPECT_EQ(initiator_->Poll(**req).code(), StatusCode::kInvalidArgument);  // not posted
  ASSERT_TRUE(initiator_->Post(**req).ok());
  EXPECT_FALSE(initiator_->Post(**req).ok());  // twice
  EXPECT_TRUE(initiator_->Wait(**req, Deadline::AfterMs(20000)).ok());
  EXPECT_EQ(std::memcmp(buf.data(), region_->data(), 10), 0);

  // A descriptor of the other backend is refused.
  RegionDescriptor other = remote_->descriptor();
  other.backend = GetParam() == "shm" ? "ucx" : "shm";
  EXPECT_EQ(initiator_->Import(other).status().code(), StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, WriteThenReadBack) {
  const uint64_t n = 1 << 20;
  ASSERT_NO_FATAL_FAILURE(Export(n, true));
  auto data = Pattern(200000, 99);
  Status s = initiator_->Transfer(
      Op::kWrite, *remote_, {{data.data(), 5, 100000}, {data.data() + 100000, 600000, 100000}},
      Deadline::AfterMs(20000));
  ASSERT_TRUE(s.ok()) << s.ToString();
  // OK means remotely complete: the target sees the bytes now.
  EXPECT_EQ(std::memcmp(region_->data() + 5, data.data(), 100000), 0);
  EXPECT_EQ(std::memcmp(region_->data() + 600000, data.data() + 100000, 100000), 0);
  std::vector<uint8_t> back(100000);
  ASSERT_TRUE(initiator_
                  ->Transfer(Op::kRead, *remote_, {{back.data(), 600000, back.size()}},
                             Deadline::AfterMs(20000))
                  .ok());
  EXPECT_EQ(std::memcmp(back.data(), data.data() + 100000, back.size()), 0);
}

TEST_P(BackendTest, ManyRequestsInFlight) {
  const uint64_t n = 1 << 20;
  ASSERT_NO_FATAL_FAILURE(Export(n, false));
  std::vector<std::vector<uint8_t>> dst(16, std::vector<uint8_t>(n / 16));
  std::vector<std::unique_ptr<TransferRequest>> reqs;
  for (size_t i = 0; i < dst.size(); ++i) {
    auto req = initiator_->Prepare(Op::kRead, *remote_, {{dst[i].data(), i * (n / 16), n / 16}});
    ASSERT_TRUE(req.ok());
    ASSERT_TRUE(initiator_->Post(**req).ok());
    reqs.push_back(std::move(req).value());
  }
  for (auto& r : reqs) ASSERT_TRUE(initiator_->Wait(*r, Deadline::AfterMs(20000)).ok());
  for (size_t i = 0; i < dst.size(); ++i)
    EXPECT_EQ(std::memcmp(dst[i].data(), region_->data() + i * (n / 16), n / 16), 0) << i;
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendTest, ::testing::Values("shm", "ucx"),
                         [](const auto& info) { return info.param; });

// Over tcp, UCX emulates GET with messages the target must progress. A target that stops
// progressing must make Import and transfers give up at their deadline, never hang.
TEST(UcxDeadline, UnprogressedTargetTimesOut) {
  InitLogging("error");
  if (std::getenv("UCX_TLS") != nullptr)
    GTEST_SKIP() << "UCX_TLS set by the environment; test needs tcp";
  EngineOptions tcp{{{"tls", "tcp"}}};
  auto target = CreateEngine("ucx", tcp);
  ASSERT_TRUE(target.ok()) << target.status().ToString();
  auto initiator = CreateEngine("ucx", tcp);
  ASSERT_TRUE(initiator.ok());
  auto region = (*target)->AllocateExportable(1 << 20, ExportOptions{});
  ASSERT_TRUE(region.ok());
  auto desc = (*region)->Export();
  ASSERT_TRUE(desc.ok());

  // 1. Nobody progresses the target: the connection cannot complete.
  auto start = std::chrono::steady_clock::now();
  auto stalled = (*initiator)->Import(*desc, Deadline::AfterMs(500));
  double elapsed_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(stalled.status().code(), StatusCode::kTimeout) << stalled.status().ToString();
  EXPECT_LT(elapsed_s, 5.0);

  // 2. Connected while progressed, then the target stops: the transfer times out.
  std::unique_ptr<RemoteRegion> remote;
  {
    TargetThread progress(target->get());
    auto imported = (*initiator)->Import(*desc, Deadline::AfterMs(10000));
    ASSERT_TRUE(imported.ok()) << imported.status().ToString();
    remote = std::move(imported).value();
  }
  std::vector<uint8_t> buf(1 << 20);
  start = std::chrono::steady_clock::now();
  Status s =
      (*initiator)
          ->Transfer(Op::kRead, *remote, {{buf.data(), 0, buf.size()}}, Deadline::AfterMs(500));
  elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(s.code(), StatusCode::kTimeout) << s.ToString();
  EXPECT_LT(elapsed_s, 5.0);
  // The endpoint was failed by the cancel; the region says so until imported again.
  EXPECT_FALSE(remote->CheckAlive().ok());
  remote.reset();
  region->reset();
}

}  // namespace
}  // namespace eep::transfer
