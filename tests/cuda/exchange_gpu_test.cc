// EPLB weight exchange between CUDA ranks: experts go from a rank's device slots to the new
// holder's device slots (GPU to GPU over nccl; as BF16 through the host over shm, which is what
// ranks sharing one GPU run here); CUDA ranks keep no host copies. Checked on the
// golden qwen3moe-tiny with 2 CUDA ranks on one GPU:
//   - rebalances that move every expert to the other rank (sync and async) and one that moves
//     experts within each rank (slot to slot on the device) leave the greedy tokens equal to a
//     run without rebalancing;
//   - the bytes moved between ranks are BF16 slots (3·I·H·2 per expert from config.json), not
//     the f32 host copies the CPU backend sends (twice that).
// Skips without a GPU.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "cuda/cuda_model.h"
#include "ep/ep.h"
#include "gpu_test_util.h"
#include "test_util.h"

namespace eep {
namespace {

#define REQUIRE_GPU() EEP_REQUIRE_GPU("exchange")

constexpr int kSteps = 24;

// Slot s takes the expert of slot s - shift (mod the slot count), per MoE layer.
std::vector<std::vector<int32_t>> Rotate(const ExpertMap& map, int64_t shift) {
  std::vector<std::vector<int32_t>> rows = map.phy2log();
  for (auto& row : rows) {
    std::vector<int32_t> r(row.size());
    for (size_t s = 0; s < row.size(); ++s) r[(s + static_cast<size_t>(shift)) % row.size()] = row[s];
    row = r;
  }
  return rows;
}

ep::EpOptions Options() {
  ep::EpOptions o;
  o.ep_size = 2;
  o.backend = "cuda";
  o.communicator = "shm";
  o.eplb_async = true;
  o.worker_binary = EEP_BIN;
  o.log_level = "error";
  return o;
}

// Greedy decode of the golden prompt 0 for kSteps steps; `before(step, engine)` runs first.
std::vector<int64_t> Decode(ep::EpEngine& e, const std::vector<int64_t>& prompt,
                            const std::function<void(int, ep::EpEngine&)>& before) {
  std::vector<int64_t> out;
  ep::SeqInput in;
  in.seq_id = 1;
  in.new_ids = prompt;
  for (int step = 0; step < kSteps; ++step) {
    if (before) before(step, e);
    auto r = e.Step({in});
    EXPECT_TRUE(r.ok()) << "step " << step << ": " << r.status().ToString();
    if (!r.ok()) break;
    out.push_back(r->at(0).token);
    in.new_ids.assign(1, r->at(0).token);
  }
  return out;
}

TEST(CudaExchange, DeviceSlotsMoveAndTokensStay) {
  REQUIRE_GPU();
  const std::string model = "qwen3moe-tiny";
  auto prompts = test::LoadGoldenPrompts(model);
  ASSERT_FALSE(prompts.empty());
  const auto& prompt = prompts[0].ids;
  nlohmann::json cfg = nlohmann::json::parse(std::ifstream(test::ModelDir(model) + "/config.json"));
  const int64_t slot_bytes =
      3 * cfg["moe_intermediate_size"].get<int64_t>() * cfg["hidden_size"].get<int64_t>() * 2;  // BF16

  std::vector<int64_t> ref;
  {
    auto e = ep::EpEngine::Start(test::ModelDir(model), Options());
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    ref = Decode(**e, prompt, {});
    (*e)->Shutdown();
  }
  ASSERT_EQ(ref.size(), static_cast<size_t>(kSteps));

  auto e = ep::EpEngine::Start(test::ModelDir(model), Options());
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  const int64_t per_rank = (*e)->layout().slots_per_rank;
  std::vector<ep::RebalanceStats> cross;  // the sync ones that move every expert across
  // In order, each at the first step from `at` on once the previous one has switched:
  // every expert to the other rank (sync), the same in the background, within each rank but
  // for one slot (mostly local moves), every expert across again (sync).
  struct Action {
    int at;
    int64_t shift;
    bool async;
  };
  const std::vector<Action> actions = {{2, per_rank, false}, {4, per_rank, true}, {6, 1, false}, {9, per_rank, false}};
  size_t next = 0, switched = 0;
  const auto got = Decode(**e, prompt, [&](int step, ep::EpEngine& eng) {
    if (next >= actions.size() || step < actions[next].at || eng.rebalances().size() < switched) return;
    const Action& a = actions[next++];
    auto st = eng.ApplyPlacement(Rotate(eng.expert_map(), a.shift), a.async);
    ASSERT_TRUE(st.ok()) << "rebalance " << next << ": " << st.status().ToString();
    ++switched;  // a sync one is recorded now, an async one at the step that switches it
    if (!a.async && a.shift == per_rank) cross.push_back(*st);
  });
  EXPECT_EQ(next, actions.size()) << "not every rebalance ran within " << kSteps << " steps";
  EXPECT_EQ(got, ref) << "tokens after moving experts between CUDA ranks";
  ASSERT_EQ(cross.size(), 2u);
  for (const auto& st : cross) {
    EXPECT_GT(st.moved_experts, 0);
    EXPECT_EQ(st.bytes, st.moved_experts * slot_bytes)
        << st.moved_experts << " experts moved as " << st.bytes << " bytes (BF16 slots are " << slot_bytes << ")";
  }
  bool async_seen = false;
  for (const auto& r : (*e)->rebalances()) async_seen = async_seen || r.async;
  EXPECT_TRUE(async_seen) << "the async rebalance never switched";
  (*e)->Shutdown();
}

// cuda::CopyBatch (the host leg of exchanges without a GPU-to-GPU path, and slot-to-slot
// moves): pageable host → device → device → pageable host over sizes that take 0, 1 and
// several 16 MiB bounce chunks (odd tails), in one batch each way; bytes must come back intact.
TEST(CudaExchange, CopyBatchRoundTripsThroughTheBounceBuffers) {
  REQUIRE_GPU();
  const std::vector<uint64_t> sizes = {1, 4097, (16ull << 20) - 3, (16ull << 20) + 5, (40ull << 20) + 11};
  uint64_t total = 0;
  for (uint64_t n : sizes) total += n;
  std::vector<uint8_t> host(total), back(total, 0);
  for (uint64_t i = 0; i < total; ++i) host[i] = static_cast<uint8_t>((i * 2654435761ull) >> 13);
  auto a = cuda::DeviceMemory::Allocate(0, total);
  auto b = cuda::DeviceMemory::Allocate(0, total);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<cuda::CopyItem> up, across, down;
  uint64_t off = 0;
  for (uint64_t n : sizes) {
    up.push_back({static_cast<uint8_t*>((*a)->data()) + off, host.data() + off, n});
    across.push_back({static_cast<uint8_t*>((*b)->data()) + off, static_cast<uint8_t*>((*a)->data()) + off, n});
    down.push_back({back.data() + off, static_cast<uint8_t*>((*b)->data()) + off, n});
    off += n;
  }
  ASSERT_TRUE(cuda::CopyBatch(up).ok());
  ASSERT_TRUE(cuda::CopyBatch(across).ok());
  ASSERT_TRUE(cuda::CopyBatch(down).ok());
  EXPECT_TRUE(back == host) << "bytes changed on the way through the device";
  EXPECT_TRUE(cuda::CopyBatch({}).ok());
}

}  // namespace
}  // namespace eep
