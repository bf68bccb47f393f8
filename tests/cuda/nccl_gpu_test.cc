// The nccl communicator on one GPU: world size 1 (NCCL refuses two ranks of a communicator on
// one device), which still runs every code path of an exchange: unique id through the
// bootstrap, non-blocking init, the size round and the data round of grouped ncclSend/ncclRecv
// (to self), device staging both ways, and Abort → ncclCommAbort; the GPU-to-GPU
// ExchangeDevice (self send/recv between device buffers) and ncclCommShrink (excluding nobody).
// Multi-GPU exchanges, timeouts, dead peers and a shrink that excludes a rank need
// nvidia-h200-x2 (not run here). Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>

#include <cuda_runtime.h>

#include "cuda/cuda_model.h"
#include "ep/communicator.h"

namespace eep::ep {
namespace {

class SelfBootstrap : public Bootstrap {
 public:
  Result<std::vector<std::string>> AllGather(const std::string& mine) override { return std::vector<std::string>{mine}; }
};

Result<std::unique_ptr<Communicator>> MakeNccl() {
  CommunicatorOptions o;
  o.rank = 0;
  o.world_size = 1;
  o.session = "nccl-test";
  o.peer_timeout_ms = 5000;
  SelfBootstrap boot;
  return CreateCommunicator("nccl", o, &boot);
}

TEST(NcclCommunicator, IsRegistered) {
  const auto names = CommunicatorNames();
  EXPECT_NE(std::find(names.begin(), names.end(), "nccl"), names.end());
}

TEST(NcclCommunicator, WorldOfOneExchangesThroughTheDevice) {
  if (!cuda::Available()) GTEST_SKIP() << "no CUDA device (" << cuda::DeviceDescription() << "): NCCL test skipped";
  auto comm = MakeNccl();
  ASSERT_TRUE(comm.ok()) << comm.status().ToString();
  EXPECT_STREQ((*comm)->name(), "nccl");
  EXPECT_EQ((*comm)->world_size(), 1);
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4099}, size_t{8} << 20, size_t{3}}) {
    std::vector<uint8_t> payload(bytes);
    for (size_t i = 0; i < bytes; ++i) payload[i] = static_cast<uint8_t>((i * 131 + bytes) & 0xff);
    std::vector<std::vector<uint8_t>> recv;
    Status st = (*comm)->AllToAllV({std::span<const uint8_t>(payload)}, &recv);
    ASSERT_TRUE(st.ok()) << bytes << " bytes: " << st.ToString();
    ASSERT_EQ(recv.size(), 1u);
    EXPECT_EQ(recv[0], payload) << bytes << " bytes";
  }
  // Wrong shape is refused.
  std::vector<std::vector<uint8_t>> recv;
  EXPECT_EQ((*comm)->AllToAllV({{}, {}}, &recv).code(), StatusCode::kInvalidArgument);
}

TEST(NcclCommunicator, AbortCancelsLaterExchanges) {
  if (!cuda::Available()) GTEST_SKIP() << "no CUDA device (" << cuda::DeviceDescription() << "): NCCL test skipped";
  auto comm = MakeNccl();
  ASSERT_TRUE(comm.ok()) << comm.status().ToString();
  std::vector<uint8_t> payload(100, 7);
  std::vector<std::vector<uint8_t>> recv;
  ASSERT_TRUE((*comm)->AllToAllV({std::span<const uint8_t>(payload)}, &recv).ok());
  (*comm)->Abort();
  EXPECT_EQ((*comm)->AllToAllV({std::span<const uint8_t>(payload)}, &recv).code(), StatusCode::kCancelled);
  EXPECT_EQ((*comm)->AllToAllV({std::span<const uint8_t>(payload)}, &recv).code(), StatusCode::kCancelled);
}

// Device bytes of a pattern, copied back for comparison.
std::vector<uint8_t> Pattern(size_t n, int salt) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>((i * 167 + static_cast<size_t>(salt) * 31) & 0xff);
  return v;
}
std::vector<uint8_t> Download(const void* dev, size_t n) {
  std::vector<uint8_t> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), dev, n, cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// Several buffers to self in one group: the k-th send lands in the k-th receive (the matching
// the EPLB exchange relies on), sizes from 1 byte to 9 MiB (an expert slot of Qwen3-30B).
void ExpectDeviceRoundTrip(Communicator& comm) {
  const std::vector<size_t> sizes = {1, 4099, size_t{9} << 20, 256};
  size_t total = 0;
  for (size_t n : sizes) total += n;
  auto out = cuda::DeviceMemory::Allocate(0, total);
  auto in = cuda::DeviceMemory::Allocate(0, total);
  ASSERT_TRUE(out.ok() && in.ok());
  std::vector<Communicator::DeviceSpan> sends, recvs;
  size_t off = 0;
  for (size_t k = 0; k < sizes.size(); ++k) {
    ASSERT_TRUE((*out)->CopyFromHost(off, Pattern(sizes[k], static_cast<int>(k)).data(), sizes[k]).ok());
    sends.push_back({0, static_cast<uint8_t*>((*out)->data()) + off, sizes[k]});
    recvs.push_back({0, static_cast<uint8_t*>((*in)->data()) + off, sizes[k]});
    off += sizes[k];
  }
  ASSERT_EQ(cudaMemset((*in)->data(), 0, total), cudaSuccess);
  Status st = comm.ExchangeDevice(sends, recvs);
  ASSERT_TRUE(st.ok()) << st.ToString();
  off = 0;
  for (size_t k = 0; k < sizes.size(); ++k) {
    EXPECT_EQ(Download(static_cast<uint8_t*>((*in)->data()) + off, sizes[k]), Pattern(sizes[k], static_cast<int>(k)))
        << "buffer " << k << " of " << sizes[k] << " bytes";
    off += sizes[k];
  }
}

TEST(NcclCommunicator, DeviceExchangeMatchesSendsToReceivesInOrder) {
  if (!cuda::Available()) GTEST_SKIP() << "no CUDA device (" << cuda::DeviceDescription() << "): NCCL test skipped";
  auto comm = MakeNccl();
  ASSERT_TRUE(comm.ok()) << comm.status().ToString();
  EXPECT_TRUE((*comm)->SupportsDeviceExchange());
  ExpectDeviceRoundTrip(**comm);
  // Nothing to move is fine; a peer outside the world is refused.
  EXPECT_TRUE((*comm)->ExchangeDevice({}, {}).ok());
  int dummy = 0;
  const Communicator::DeviceSpan bad{1, &dummy, 4};
  EXPECT_EQ((*comm)->ExchangeDevice(std::span(&bad, 1), {}).code(), StatusCode::kInvalidArgument);
  (*comm)->Abort();
  EXPECT_EQ((*comm)->ExchangeDevice({}, {}).code(), StatusCode::kCancelled);
}

// A shrink that excludes a rank needs two GPUs. Here: its arguments are checked, and with
// EEP_NCCL_SHRINK=1 an aborted exchange leaves the communicator alive for it (without, the
// abort tears it down at once, as before).
TEST(NcclCommunicator, ShrinkArgumentsAndDeferredAbort) {
  if (!cuda::Available()) GTEST_SKIP() << "no CUDA device (" << cuda::DeviceDescription() << "): NCCL test skipped";
  std::vector<std::vector<uint8_t>> recv;
  std::vector<uint8_t> payload(10, 3);
  for (bool deferred : {true, false}) {
    if (deferred) setenv("EEP_NCCL_SHRINK", "1", 1);
    auto comm = MakeNccl();
    unsetenv("EEP_NCCL_SHRINK");
    ASSERT_TRUE(comm.ok()) << comm.status().ToString();
    EXPECT_EQ((*comm)->Shrink({}).status().code(), StatusCode::kInvalidArgument);   // nobody
    EXPECT_EQ((*comm)->Shrink({0}).status().code(), StatusCode::kInvalidArgument);  // self
    EXPECT_EQ((*comm)->Shrink({3}).status().code(), StatusCode::kInvalidArgument);  // no such rank
    ASSERT_TRUE((*comm)->AllToAllV({std::span<const uint8_t>(payload)}, &recv).ok());
    (*comm)->Abort();
    EXPECT_EQ((*comm)->AllToAllV({std::span<const uint8_t>(payload)}, &recv).code(), StatusCode::kCancelled);
    // Kept: the shrink gets as far as its arguments; torn down: it is refused outright.
    EXPECT_EQ((*comm)->Shrink({0}).status().code(), deferred ? StatusCode::kInvalidArgument : StatusCode::kCancelled)
        << (deferred ? "deferred" : "immediate") << " abort";
  }
}

TEST(Communicators, HostOnlyOnesHaveNoDevicePathAndCannotShrink) {
  CommunicatorOptions o;
  o.session = "no-device-test";
  SelfBootstrap boot;
  auto shm = CreateCommunicator("shm", o, &boot);
  ASSERT_TRUE(shm.ok()) << shm.status().ToString();
  EXPECT_FALSE((*shm)->SupportsDeviceExchange());
  EXPECT_EQ((*shm)->ExchangeDevice({}, {}).code(), StatusCode::kUnimplemented);
  EXPECT_EQ((*shm)->Shrink({}).status().code(), StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace eep::ep
