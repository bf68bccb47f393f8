// The tensor-core grouped expert GEMMs (MoeGateUpMma, MoeDownMma in kernels/cuda/moe_mma.h)
// against a double-precision CPU reference on the same BF16 weights and f32 inputs, on a plan
// made on the GPU by MoeRoutePlan from random logits, with replicated experts (one expert in
// several slots, one slot sharing another's bytes), groups larger than one 32-token tile, and
// max_groups above the plan's group count (the extra blocks must exit: their plan entries are
// pre-filled with plausible, wrong groups). Outputs are poisoned with NaN before each launch,
// so a row left unwritten fails. act is checked against x; y against the act the GPU wrote
// (each kernel on its own inputs). Bounds, as max|gpu - ref| / max(1, max|ref|):
//   split (hi + lo BF16 activations, ~2^-16 relative each): 1e-5. A host emulation of the
//   kernel's rounding gives ~2.5e-6 at K = 64..2048 with 1/sqrt(K)-scaled weights;
//   plain BF16 activations (rounding 2^-9 relative, random signs): 1e-2 (emulated ~2e-3).
// The launches are also captured once in a CUDA graph and replayed: bit-identical results, so
// nothing in them needs the host. A timing print (no assertion) compares MoeGateUpMma +
// MoeDownMma with MoeGateUp + MoeDown on the Qwen3-30B-A3B expert shape (hidden 2048, inter
// 768, 128 experts, top-8).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "gpu_test_util.h"

#ifdef EEP_WITH_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/moe_mma.h"
#include "kernels/cuda/ops.h"
#endif

namespace eep {
namespace {

#ifndef EEP_WITH_CUDA
TEST(CudaMoeMma, Skipped) { GTEST_SKIP() << "eep was built without CUDA (EEP_ENABLE_CUDA=OFF): MoE MMA tests skipped"; }
#else

using gpu_test::Dev;

std::vector<float> Normal(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// BF16 weights, uniform in ±sqrt(3)·scale (variance scale²); splitmix64, fast enough for the
// 4.7M weights of an expert of the large shape.
std::vector<uint16_t> RandomBf16(size_t n, uint64_t seed, float scale) {
  std::vector<uint16_t> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& x : v) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const double u = static_cast<double>(z >> 11) * 0x1.0p-53 * 2.0 - 1.0;  // [-1, 1)
    x = F32ToBF16(static_cast<float>(u * 1.7320508075688772 * scale));
  }
  return v;
}

// max|got - ref| / max(1, max|ref|); non-finite values in got count as infinitely wrong.
double RelErr(const std::vector<float>& got, const std::vector<double>& ref, int64_t* bad = nullptr) {
  EXPECT_EQ(got.size(), ref.size());
  double max_ref = 1, max_diff = 0;
  int64_t nonfinite = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(ref[i]));
    if (!std::isfinite(got[i])) {
      ++nonfinite;
      continue;
    }
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
  }
  if (bad != nullptr) *bad = nonfinite;
  return nonfinite > 0 ? INFINITY : max_diff / max_ref;
}

// One MoE layer's experts in physical slots: every expert once, then replicas of experts 0, 3,
// 5 and 3 again (where they exist); the last replica of expert 3 shares the first one's bytes.
// `distinct` = false: every expert gets expert 0's weights (timing: 128 experts of the large
// shape without generating 1.2 GB on the host).
struct Experts {
  int64_t H, I, E, P = 0, max_reps = 1;
  bool distinct;
  std::vector<std::vector<float>> w;  // gate | up | down as f32 of the BF16: [E], or [1] if !distinct
  std::vector<std::unique_ptr<Dev<uint16_t>>> mem;
  std::unique_ptr<Dev<int32_t>> rep_count, rep_slot;
  std::unique_ptr<Dev<uint64_t>> slot_ptr;
  cuda::MoeSlotTable table;

  Experts(int64_t hidden, int64_t inter, int64_t experts, bool replicas, bool distinct_, uint64_t seed)
      : H(hidden), I(inter), E(experts), distinct(distinct_) {
    std::vector<std::vector<int32_t>> reps(E);
    for (int64_t e = 0; e < E; ++e) reps[e].push_back(static_cast<int32_t>(P++));
    if (replicas)
      for (int64_t e : {int64_t{0}, int64_t{3}, int64_t{5}, int64_t{3}})
        if (e < E) reps[e].push_back(static_cast<int32_t>(P++));
    for (auto& r : reps) max_reps = std::max<int64_t>(max_reps, static_cast<int64_t>(r.size()));
    const int64_t elems = 3 * I * H;
    w.resize(distinct ? E : 1);
    std::vector<const uint16_t*> ptrs(P, nullptr);
    std::vector<uint16_t> b;
    for (int64_t e = 0; e < E; ++e) {
      if (distinct || e == 0) {
        // gate/up rows scaled 1/sqrt(H), down rows 1/sqrt(I): outputs of order 1.
        b = RandomBf16(2 * I * H, seed + 2 * e, 1.0f / std::sqrt(static_cast<float>(H)));
        auto d = RandomBf16(H * I, seed + 2 * e + 1, 1.0f / std::sqrt(static_cast<float>(I)));
        b.insert(b.end(), d.begin(), d.end());
        w[e].resize(elems);
        for (int64_t i = 0; i < elems; ++i) w[e][i] = BF16ToF32(b[i]);
      }
      for (size_t r = 0; r < reps[e].size(); ++r) {
        if (e == 3 && r == reps[e].size() - 1 && r > 1) {
          ptrs[reps[e][r]] = ptrs[reps[e][0]];
          continue;
        }
        mem.push_back(std::make_unique<Dev<uint16_t>>(b));
        ptrs[reps[e][r]] = mem.back()->p;
      }
    }
    std::vector<int32_t> count(E), slots(E * max_reps, 0);
    for (int64_t e = 0; e < E; ++e) {
      count[e] = static_cast<int32_t>(reps[e].size());
      for (size_t r = 0; r < reps[e].size(); ++r) slots[e * max_reps + r] = reps[e][r];
    }
    std::vector<uint64_t> bits(P);
    for (int64_t s = 0; s < P; ++s) bits[s] = reinterpret_cast<uint64_t>(ptrs[s]);
    rep_count = std::make_unique<Dev<int32_t>>(count);
    rep_slot = std::make_unique<Dev<int32_t>>(slots);
    slot_ptr = std::make_unique<Dev<uint64_t>>(bits);
    table.rep_count = rep_count->p;
    table.rep_slot = rep_slot->p;
    table.max_replicas = max_reps;
    table.slot_ptr = reinterpret_cast<const uint16_t* const*>(slot_ptr->p);
    table.num_slots = P;
  }
  const std::vector<float>& Weights(int64_t e) const { return w[distinct ? e : 0]; }
};

// A step's routing and plan (MoeRoutePlan on random logits) with arrays for max_groups groups.
// Entries past the real groups hold plausible wrong groups (a valid slot, offset 0, every
// assignment), so a block that does not exit on g >= *num_groups overwrites results.
struct Plan {
  int64_t A, max_groups;
  std::unique_ptr<Dev<int32_t>> mem, ids;
  std::unique_ptr<Dev<float>> weights;
  cuda::MoePlan plan;
  std::vector<int32_t> host_ids;
  int32_t groups = 0, max_cnt = 0;

  Plan(const Experts& ex, int64_t N, int64_t k, int64_t max_groups_, uint64_t seed) : A(N * k), max_groups(max_groups_) {
    std::vector<int32_t> init(cuda::MoePlanInts(max_groups, A), 0);
    for (int64_t g = 0; g < max_groups; ++g) {
      init[4 + g] = static_cast<int32_t>(g % ex.P);
      init[4 + 2 * max_groups + g] = static_cast<int32_t>(A);
    }
    for (int64_t a = 0; a < A; ++a) init[4 + 3 * max_groups + a] = static_cast<int32_t>(a);
    mem = std::make_unique<Dev<int32_t>>(init);
    ids = std::make_unique<Dev<int32_t>>(A);
    weights = std::make_unique<Dev<float>>(A);
    plan = cuda::MoePlanIn(mem->p, max_groups);
    Dev<float> logits(Normal(N * ex.E, seed));
    EXPECT_TRUE(cuda::MoeRoutePlanSupported(N, ex.E, k, ex.P));
    EXPECT_EQ(cuda::MoeRoutePlan(logits.p, N, ex.E, k, true, nullptr, 1, 1, 1.0f, ex.table, ids->p, weights->p, plan,
                                 nullptr),
              cudaSuccess);
    host_ids = ids->Host();
    const auto h = mem->Host();
    groups = h[0];
    for (int32_t g = 0; g < groups; ++g) max_cnt = std::max(max_cnt, h[4 + 2 * max_groups + g]);
  }
};

// Σ a[i]·b[i] in double (four partial sums: n is a multiple of 32 here).
double Dot(const float* a, const float* b, int64_t n) {
  double s[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += static_cast<double>(a[i + j]) * b[i + j];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

struct MmaCase {
  int64_t H, I, N, k, E;
};
class CudaMoeMma : public ::testing::TestWithParam<MmaCase> {};

TEST_P(CudaMoeMma, MatchesCpu) {
  EEP_REQUIRE_GPU("MoE MMA");
  const MmaCase mc = GetParam();
  const int64_t H = mc.H, I = mc.I, N = mc.N, k = mc.k, A = N * k;
  ASSERT_TRUE(cuda::MoeMmaSupported(H, I));
  Experts ex(H, I, mc.E, /*replicas=*/true, /*distinct=*/true, 1000 + H + I);
  // Three groups more than MoeMaxGroups allows: their blocks must exit.
  const int64_t max_groups = cuda::MoeMaxGroups(A, ex.P) + 3;
  Plan pl(ex, N, k, max_groups, 7 * N + k);
  ASSERT_GT(pl.groups, 0);
  ASSERT_LT(pl.groups, max_groups);
  for (int64_t a = 0; a < A; ++a) {
    ASSERT_GE(pl.host_ids[a], 0);
    ASSERT_LT(pl.host_ids[a], mc.E);
  }
  const auto x = Normal(N * H, 11 * N + H);
  Dev<float> dx(x), dact(A * I), dy(A * H);

  // act reference from x (double), per assignment a = t·k + j with expert ids[a].
  std::vector<double> ref_act(A * I);
  for (int64_t a = 0; a < A; ++a) {
    const std::vector<float>& w = ex.Weights(pl.host_ids[a]);
    const float* xt = x.data() + (a / k) * H;
    for (int64_t i = 0; i < I; ++i) {
      const double g = Dot(w.data() + i * H, xt, H), u = Dot(w.data() + (I + i) * H, xt, H);
      ref_act[a * I + i] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  // y reference from the act the GPU wrote.
  auto ref_y = [&](const std::vector<float>& act) {
    std::vector<double> r(A * H);
    for (int64_t a = 0; a < A; ++a) {
      const float* d = ex.Weights(pl.host_ids[a]).data() + 2 * I * H;
      for (int64_t o = 0; o < H; ++o) r[a * H + o] = Dot(d + o * I, act.data() + a * I, I);
    }
    return r;
  };

  for (bool split : {true, false}) {
    const double bound = split ? 1e-5 : 1e-2;
    dact.Poison();
    dy.Poison();
    ASSERT_EQ(cuda::MoeGateUpMma(dx.p, H, I, k, ex.table, pl.plan, max_groups, split, dact.p, nullptr), cudaSuccess);
    ASSERT_EQ(cuda::MoeDownMma(dact.p, H, I, ex.table, pl.plan, max_groups, split, dy.p, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto act = dact.Host(), y = dy.Host();
    int64_t bad_act = 0, bad_y = 0;
    const double e_act = RelErr(act, ref_act, &bad_act), e_y = RelErr(y, ref_y(act), &bad_y);
    std::printf("H=%ld I=%ld N=%ld k=%ld E=%ld slots=%ld: %d groups (max_groups %ld, largest %d) %s: act err %.3g, "
                "y err %.3g (bound %g)\n",
                static_cast<long>(H), static_cast<long>(I), static_cast<long>(N), static_cast<long>(k),
                static_cast<long>(mc.E), static_cast<long>(ex.P), pl.groups, static_cast<long>(max_groups), pl.max_cnt,
                split ? "split" : "bf16", e_act, e_y, bound);
    EXPECT_EQ(bad_act, 0) << "non-finite (unwritten) act values";
    EXPECT_EQ(bad_y, 0) << "non-finite (unwritten) y values";
    EXPECT_LT(e_act, bound) << (split ? "split" : "bf16");
    EXPECT_LT(e_y, bound) << (split ? "split" : "bf16");

    // The same two launches captured in a CUDA graph (fails if either syncs with the host),
    // replayed twice on poisoned outputs: the same bits.
    cudaStream_t st;
    ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const cudaError_t e1 = cuda::MoeGateUpMma(dx.p, H, I, k, ex.table, pl.plan, max_groups, split, dact.p, st);
    const cudaError_t e2 = cuda::MoeDownMma(dact.p, H, I, ex.table, pl.plan, max_groups, split, dy.p, st);
    ASSERT_EQ(cudaStreamEndCapture(st, &graph), cudaSuccess);
    ASSERT_EQ(e1, cudaSuccess);
    ASSERT_EQ(e2, cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (int rep = 0; rep < 2; ++rep) {
      dact.Poison();
      dy.Poison();
      ASSERT_EQ(cudaGraphLaunch(exec, st), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
      EXPECT_TRUE(dact.Host() == act) << "graph replay " << rep << ": act differs";
      EXPECT_TRUE(dy.Host() == y) << "graph replay " << rep << ": y differs";
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(st);
  }
}

// Small shapes (hidden 64, inter 32..128; 8 experts + 4 replica slots, so 300 tokens × top-8
// make groups of ~200: several token tiles) and the H100 model shape (hidden 2048, inter 768).
INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaMoeMma,
    ::testing::Values(MmaCase{64, 32, 1, 1, 8}, MmaCase{64, 64, 1, 8, 8}, MmaCase{64, 128, 9, 1, 8},
                      MmaCase{64, 32, 9, 2, 8}, MmaCase{64, 64, 9, 8, 8}, MmaCase{64, 128, 33, 8, 8},
                      MmaCase{64, 64, 33, 2, 16}, MmaCase{64, 32, 100, 2, 8}, MmaCase{64, 128, 100, 8, 8},
                      MmaCase{64, 64, 300, 1, 8}, MmaCase{64, 32, 300, 8, 8}, MmaCase{64, 128, 300, 2, 16},
                      MmaCase{2048, 768, 9, 8, 16}, MmaCase{2048, 768, 33, 8, 16}, MmaCase{2048, 768, 100, 2, 8}));

TEST(CudaMoeMmaShapes, Supported) {
  EXPECT_TRUE(cuda::MoeMmaSupported(2048, 768));
  EXPECT_TRUE(cuda::MoeMmaSupported(64, 32));
  EXPECT_FALSE(cuda::MoeMmaSupported(72, 64));
  EXPECT_FALSE(cuda::MoeMmaSupported(64, 48));
  EXPECT_FALSE(cuda::MoeMmaSupported(0, 64));
}

// Timing print (not an assertion): hidden 2048, inter 768, 128 experts, top-8, at several
// batch sizes; GB/s counts the bytes of the slots the step touches (3·I·H BF16 per group).
// Also checks the MMA results against the CUDA-core kernels on this shape (both f32-level).
TEST(CudaMoeMmaTiming, H100Shape) {
  EEP_REQUIRE_GPU("MoE MMA timing");
  const int64_t H = 2048, I = 768, E = 128, k = 8;
  Experts ex(H, I, E, /*replicas=*/false, /*distinct=*/false, 77);
  for (int64_t N : {16, 64, 256, 512}) {
    const int64_t A = N * k, max_groups = cuda::MoeMaxGroups(A, ex.P);
    Plan pl(ex, N, k, max_groups, 300 + N);
    Dev<float> dx(Normal(N * H, 5)), act0(A * I), y0(A * H), act1(A * I), y1(A * H);
    cudaStream_t st;
    ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    cudaEvent_t t0, t1;
    ASSERT_EQ(cudaEventCreate(&t0), cudaSuccess);
    ASSERT_EQ(cudaEventCreate(&t1), cudaSuccess);
    auto time_ms = [&](auto&& launch) {
      for (int i = 0; i < 3; ++i) EXPECT_EQ(launch(), cudaSuccess);
      constexpr int kIters = 20;
      EXPECT_EQ(cudaEventRecord(t0, st), cudaSuccess);
      for (int i = 0; i < kIters; ++i) EXPECT_EQ(launch(), cudaSuccess);
      EXPECT_EQ(cudaEventRecord(t1, st), cudaSuccess);
      EXPECT_EQ(cudaEventSynchronize(t1), cudaSuccess);
      float ms = 0;
      EXPECT_EQ(cudaEventElapsedTime(&ms, t0, t1), cudaSuccess);
      return static_cast<double>(ms) / kIters;
    };
    const double ms_ref = time_ms([&] {
      cudaError_t e = cuda::MoeGateUp(dx.p, H, I, k, ex.table, pl.plan, max_groups, act0.p, st);
      return e != cudaSuccess ? e : cuda::MoeDown(act0.p, H, I, ex.table, pl.plan, max_groups, y0.p, st);
    });
    double ms_mma[2];
    for (int split = 0; split < 2; ++split)
      ms_mma[split] = time_ms([&] {
        cudaError_t e = cuda::MoeGateUpMma(dx.p, H, I, k, ex.table, pl.plan, max_groups, split, act1.p, st);
        return e != cudaSuccess ? e : cuda::MoeDownMma(act1.p, H, I, ex.table, pl.plan, max_groups, split, y1.p, st);
      });
    const double gb = static_cast<double>(pl.groups) * 3 * I * H * 2 / 1e9;
    std::printf("N=%4ld (%ld assignments, %d groups, largest %d, %.3f GB of slots): MoeGateUp+MoeDown %.3f ms "
                "(%.0f GB/s); MMA split %.3f ms (%.0f GB/s, %.2fx); MMA bf16 %.3f ms (%.0f GB/s, %.2fx)\n",
                static_cast<long>(N), static_cast<long>(A), pl.groups, pl.max_cnt, gb, ms_ref, gb / ms_ref * 1e3,
                ms_mma[1], gb / ms_mma[1] * 1e3, ms_ref / ms_mma[1], ms_mma[0], gb / ms_mma[0] * 1e3,
                ms_ref / ms_mma[0]);
    // The last timed launches were the bf16 ones: redo split, then compare with the CUDA-core
    // kernels (f32 activations, f32 accumulation), as max|diff| / max(1, max|ref|).
    ASSERT_EQ(cuda::MoeGateUpMma(dx.p, H, I, k, ex.table, pl.plan, max_groups, true, act1.p, st), cudaSuccess);
    ASSERT_EQ(cuda::MoeDownMma(act1.p, H, I, ex.table, pl.plan, max_groups, true, y1.p, st), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
    auto to_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
    EXPECT_LT(RelErr(act1.Host(), to_double(act0.Host())), 2e-5) << "N " << N;
    EXPECT_LT(RelErr(y1.Host(), to_double(y0.Host())), 2e-5) << "N " << N;
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    cudaStreamDestroy(st);
  }
}

#endif  // EEP_WITH_CUDA

}  // namespace
}  // namespace eep
