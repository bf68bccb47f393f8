// The nccl communicator on one GPU: world size 1 (NCCL refuses two ranks of a communicator on
// one device), which still runs every code path of an exchange: unique id through the
// bootstrap, non-blocking init, the size round and the data round of grouped ncclSend/ncclRecv
// (to self), device staging both ways, and Abort → ncclCommAbort. Multi-GPU exchanges,
// timeouts and dead peers need nvidia-h200-x2 (not run here). Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>

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

}  // namespace
}  // namespace eep::ep
