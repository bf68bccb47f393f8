// AttentionDecodeGqa (kernels/cuda/attention_gqa.h) against a double-precision CPU reference
// (q/k RMSNorm, RoPE, causal softmax attention over the cache plus the new key) and against
// cuda::AttentionDecode on the same inputs: outputs within 1e-5 of the reference (max|diff| /
// max(1, max|ref|)) and of AttentionDecode, the cache rows written at pos equal (k 1e-5, v
// exact). Every token has its own cache (a copy of one of up to 4 sequences' rows), positions
// 0, 1, 33, 300 and 2100 (the long one runs 66 tiles). Also prints AttentionDecodeGqa against
// AttentionDecode timings at batch 1, 16, 64, 256 (32/4 heads, dk 128, 34 cached keys).
// Skips (GTEST_SKIP) when there is no GPU or eep was built without CUDA.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "gpu_test_util.h"

#ifdef EEP_WITH_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/attention_gqa.h"
#include "kernels/cuda/ops.h"
#endif

namespace eep {
namespace {

#ifndef EEP_WITH_CUDA
TEST(CudaAttentionGqa, All) {
  GTEST_SKIP() << "eep was built without CUDA (EEP_ENABLE_CUDA=OFF): CUDA attention tests skipped";
}
#else

using gpu_test::Random;

// Uniform in [-1, 1), cheap enough for long caches.
std::vector<float> FastRandom(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = static_cast<float>(static_cast<double>(s >> 11) * (2.0 / 9007199254740992.0) - 1.0);
  }
  return v;
}

using gpu_test::Dev;

double RelErr(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double max_ref = 1, max_diff = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
    const double d = std::fabs(static_cast<double>(got[i]) - ref[i]);
    max_diff = std::isnan(d) ? INFINITY : std::max(max_diff, d);
  }
  return max_diff / max_ref;
}

struct GqaCase {
  int64_t n, nh, nkv, dk, dv, rope_dim, rope_off;
  bool interleaved;
  int64_t window;
  bool norms;
  bool misalign;  // cache pointers off 16-byte alignment (the kernel's plain-load path)
  int rot;        // token t sits at kPositions[(t + rot) % 5]
  float factor;
};

constexpr int64_t kPositions[5] = {2100, 33, 0, 300, 1};

// RMSNorm (w may be empty) and RoPE of one head, in double, as the kernels define them
// (interleaved pairs (2i, 2i+1) come out rotate-half: y[i], y[i + half]).
std::vector<double> NormRope(const float* x, int64_t dk, const std::vector<float>& w, double eps,
                             int64_t off, int64_t rope_dim, const std::vector<float>& inv_freq,
                             double factor, bool interleaved, int64_t pos) {
  std::vector<double> v(x, x + dk);
  if (!w.empty()) {
    double sum = 0;
    for (double e : v) sum += e * e;
    const double inv = 1.0 / std::sqrt(sum / static_cast<double>(dk) + eps);
    for (int64_t i = 0; i < dk; ++i) v[i] = w[i] * (v[i] * inv);
  }
  std::vector<double> y = v;
  const int64_t half = rope_dim / 2;
  for (int64_t p = 0; p < half; ++p) {
    const double ang = static_cast<double>(pos) * static_cast<double>(inv_freq[p]);
    const double c = std::cos(ang) * factor, s = std::sin(ang) * factor;
    const double a = interleaved ? v[off + 2 * p] : v[off + p];
    const double b = interleaved ? v[off + 2 * p + 1] : v[off + p + half];
    y[off + p] = a * c - b * s;
    y[off + half + p] = b * c + a * s;
  }
  return y;
}

class CudaAttentionGqa : public ::testing::TestWithParam<GqaCase> {};

TEST_P(CudaAttentionGqa, MatchesReferenceAndAttentionDecode) {
  EEP_REQUIRE_GPU("attention");
  const GqaCase c = GetParam();
  const int64_t N = c.n, nh = c.nh, nkv = c.nkv, dk = c.dk, dv = c.dv, group = nh / nkv;
  ASSERT_TRUE(cuda::AttentionDecodeGqaSupported(nh, nkv, dk, dv));
  const float eps = 1e-6f, scale = 1.0f / std::sqrt(static_cast<float>(dk));
  const uint64_t seed = static_cast<uint64_t>(N * 1000 + nh * 10 + dk);
  auto q = Random(N * nh * dk, seed + 1), k = Random(N * nkv * dk, seed + 2),
       v = Random(N * nkv * dv, seed + 3);
  std::vector<float> qn, kn;
  if (c.norms) qn = Random(dk, seed + 4), kn = Random(dk, seed + 5);
  std::vector<float> inv(std::max<int64_t>(c.rope_dim / 2, 1));
  for (int64_t i = 0; i < c.rope_dim / 2; ++i)
    inv[i] = 1.0f / std::pow(10000.0f, 2.0f * i / c.rope_dim);

  // Sequences (initial cache rows) and each token's own cache: rows [0, pos) of its sequence,
  // row pos poisoned (the kernel writes it).
  const int64_t S = std::min<int64_t>(N, 4);
  std::vector<int32_t> pos(N);
  std::vector<int64_t> rows(S, 1);
  for (int64_t t = 0; t < N; ++t) {
    pos[t] = static_cast<int32_t>(kPositions[(t + c.rot) % 5]);
    rows[t % S] = std::max<int64_t>(rows[t % S], pos[t]);
  }
  std::vector<std::vector<float> > seq_k(S), seq_v(S);
  for (int64_t s = 0; s < S; ++s) {
    seq_k[s] = FastRandom(rows[s] * nkv * dk, seed + 10 + s);
    seq_v[s] = FastRandom(rows[s] * nkv * dv, seed + 20 + s);
  }
  const size_t pad = c.misalign ? 1 : 0;
  std::vector<size_t> koff(N), voff(N);
  size_t ktot = 0, vtot = 0;
  for (int64_t t = 0; t < N; ++t) {
    koff[t] = ktot + pad;
    voff[t] = vtot + pad;
    ktot += static_cast<size_t>((pos[t] + 1) * nkv * dk) + 4;
    vtot += static_cast<size_t>((pos[t] + 1) * nkv * dv) + 4;
  }
  Dev<float> kc_g(ktot), vc_g(vtot), kc_b(ktot), vc_b(vtot);
  for (Dev<float>* d : {&kc_g, &vc_g, &kc_b, &vc_b}) d->Poison();
  {
    Dev<float>* kd[2] = {&kc_g, &kc_b};
    Dev<float>* vd[2] = {&vc_g, &vc_b};
    for (int64_t t = 0; t < N; ++t)
      for (int i = 0; i < 2; ++i) {
        ASSERT_EQ(cudaMemcpy(kd[i]->p + koff[t], seq_k[t % S].data(),
                             pos[t] * nkv * dk * sizeof(float), cudaMemcpyHostToDevice),
                  cudaSuccess);
        ASSERT_EQ(cudaMemcpy(vd[i]->p + voff[t], seq_v[t % S].data(),
                             pos[t] * nkv * dv * sizeof(float), cudaMemcpyHostToDevice),
                  cudaSuccess);
      }
  }
  std::vector<uint64_t> kp_g(N), vp_g(N), kp_b(N), vp_b(N);
  for (int64_t t = 0; t < N; ++t) {
    kp_g[t] = reinterpret_cast<uint64_t>(kc_g.p + koff[t]);
    vp_g[t] = reinterpret_cast<uint64_t>(vc_g.p + voff[t]);
    kp_b[t] = reinterpret_cast<uint64_t>(kc_b.p + koff[t]);
    vp_b[t] = reinterpret_cast<uint64_t>(vc_b.p + voff[t]);
  }
  Dev<uint64_t> dkp_g(kp_g), dvp_g(vp_g), dkp_b(kp_b), dvp_b(vp_b);
  Dev<float> dq(q), dk_(k), dv_(v), dinv(inv), out_g(N * nh * dv), out_b(N * nh * dv);
  std::unique_ptr<Dev<float> > dqn, dkn;
  if (c.norms) dqn = std::make_unique<Dev<float> >(qn), dkn = std::make_unique<Dev<float> >(kn);
  Dev<int32_t> dpos(pos);
  out_g.Poison();
  out_b.Poison();
  const float* qnp = c.norms ? dqn->p : nullptr;
  const float* knp = c.norms ? dkn->p : nullptr;
  ASSERT_EQ(cuda::AttentionDecodeGqa(
                dq.p, dk_.p, dv_.p, N, nh, nkv, dk, dv, qnp, knp, eps, c.rope_off, c.rope_dim,
                dpos.p, dinv.p, c.factor, c.interleaved, reinterpret_cast<float* const*>(dkp_g.p),
                reinterpret_cast<float* const*>(dvp_g.p), c.window, scale, out_g.p, nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::AttentionDecode(
                dq.p, dk_.p, dv_.p, N, nh, nkv, dk, dv, qnp, knp, eps, c.rope_off, c.rope_dim,
                dpos.p, dinv.p, c.factor, c.interleaved, reinterpret_cast<float* const*>(dkp_b.p),
                reinterpret_cast<float* const*>(dvp_b.p), c.window, scale, out_b.p, nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  // Reference: q and the new k normed and roped in double, softmax attention in double.
  std::vector<float> ref(N * nh * dv), ref_k(N * nkv * dk);
  std::vector<double> sc, acc(dv);
  for (int64_t t = 0; t < N; ++t) {
    const int64_t p = pos[t], first = c.window > 0 ? std::max<int64_t>(0, p - c.window + 1) : 0;
    const std::vector<float>& ck = seq_k[t % S];
    const std::vector<float>& cv = seq_v[t % S];
    for (int64_t g = 0; g < nkv; ++g) {
      const auto knew = NormRope(k.data() + (t * nkv + g) * dk, dk, kn, eps, c.rope_off, c.rope_dim,
                                 inv, c.factor, c.interleaved, p);
      for (int64_t i = 0; i < dk; ++i) ref_k[(t * nkv + g) * dk + i] = static_cast<float>(knew[i]);
      const float* vnew = v.data() + (t * nkv + g) * dv;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const auto qh = NormRope(q.data() + (t * nh + h) * dk, dk, qn, eps, c.rope_off, c.rope_dim,
                                 inv, c.factor, c.interleaved, p);
        sc.assign(p - first + 1, 0.0);
        for (int64_t j = first; j <= p; ++j) {
          double d = 0;
          if (j < p) {
            const float* kr = ck.data() + (j * nkv + g) * dk;
            for (int64_t i = 0; i < dk; ++i) d += qh[i] * kr[i];
          } else {
            for (int64_t i = 0; i < dk; ++i) d += qh[i] * knew[i];
          }
          sc[j - first] = d * scale;
        }
        const double mx = *std::max_element(sc.begin(), sc.end());
        double sum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = first; j <= p; ++j) {
          const double w = std::exp(sc[j - first] - mx);
          sum += w;
          const float* vr = j < p ? cv.data() + (j * nkv + g) * dv : vnew;
          for (int64_t i = 0; i < dv; ++i) acc[i] += w * vr[i];
        }
        for (int64_t i = 0; i < dv; ++i)
          ref[(t * nh + h) * dv + i] = static_cast<float>(acc[i] / sum);
      }
    }
  }
  const auto got_g = out_g.Host(), got_b = out_b.Host();
  EXPECT_LT(RelErr(got_g, ref), 1e-5) << "gqa vs reference";
  EXPECT_LT(RelErr(got_b, ref), 1e-5) << "AttentionDecode vs reference";
  EXPECT_LT(RelErr(got_g, got_b), 1e-5) << "gqa vs AttentionDecode";

  // Row pos of every token's cache: k as the reference (and AttentionDecode), v exactly the input.
  std::vector<float> kg(N * nkv * dk), kb(N * nkv * dk), vg(N * nkv * dv), vb(N * nkv * dv);
  for (int64_t t = 0; t < N; ++t) {
    const size_t kr = koff[t] + static_cast<size_t>(pos[t] * nkv * dk),
                 vr = voff[t] + static_cast<size_t>(pos[t] * nkv * dv);
    ASSERT_EQ(
        cudaMemcpy(kg.data() + t * nkv * dk, kc_g.p + kr, nkv * dk * 4, cudaMemcpyDeviceToHost),
        cudaSuccess);
    ASSERT_EQ(
        cudaMemcpy(kb.data() + t * nkv * dk, kc_b.p + kr, nkv * dk * 4, cudaMemcpyDeviceToHost),
        cudaSuccess);
    ASSERT_EQ(
        cudaMemcpy(vg.data() + t * nkv * dv, vc_g.p + vr, nkv * dv * 4, cudaMemcpyDeviceToHost),
        cudaSuccess);
    ASSERT_EQ(
        cudaMemcpy(vb.data() + t * nkv * dv, vc_b.p + vr, nkv * dv * 4, cudaMemcpyDeviceToHost),
        cudaSuccess);
  }
  EXPECT_LT(RelErr(kg, ref_k), 1e-5) << "k cache row vs reference";
  EXPECT_LT(RelErr(kg, kb), 1e-5) << "k cache row vs AttentionDecode";
  EXPECT_EQ(vg, v) << "v cache row";
  EXPECT_EQ(vg, vb) << "v cache row vs AttentionDecode";
  // The rows before pos are left as they were (one token's, spot check).
  const int64_t t0 = N - 1;
  if (pos[t0] > 0) {
    std::vector<float> before(pos[t0] * nkv * dk);
    ASSERT_EQ(
        cudaMemcpy(before.data(), kc_g.p + koff[t0], before.size() * 4, cudaMemcpyDeviceToHost),
        cudaSuccess);
    EXPECT_TRUE(std::equal(before.begin(), before.end(), seq_k[t0 % S].begin()))
        << "cached k rows changed";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionGqa,
    ::testing::Values(
        // n, nh, nkv, dk, dv, rope_dim, rope_off, interleaved, window, norms, misalign, rot, factor
        GqaCase{1, 32, 4, 128, 128, 128, 0, false, 0, true, false, 0, 1.0f},   // pos 2100
        GqaCase{1, 32, 4, 128, 128, 128, 0, false, 5, true, false, 3, 1.0f},   // pos 300, window
        GqaCase{3, 16, 16, 128, 128, 64, 32, true, 5, false, false, 0, 1.0f},  // group 1
        GqaCase{3, 32, 4, 128, 64, 96, 16, false, 0, true, true, 2, 1.1f},     // misaligned cache
        GqaCase{64, 8, 1, 64, 64, 64, 0, true, 0, true, false, 1, 1.0f},  // group 8, one kv head
        GqaCase{64, 12, 4, 128, 128, 32, 16, false, 5, true, true, 0, 1.0f},     // group 3
        GqaCase{64, 16, 16, 64, 64, 48, 8, false, 0, true, false, 4, 1.0f},      // group 1, dk 64
        GqaCase{16, 16, 1, 192, 128, 64, 128, true, 0, false, false, 0, 1.05f},  // group 16, dk 192
        GqaCase{256, 32, 4, 128, 128, 128, 0, false, 0, true, false, 0, 1.0f},
        GqaCase{256, 12, 4, 64, 64, 48, 8, true, 5, false, false, 2, 1.0f}));

TEST(CudaAttentionGqaShapes, Supported) {
  EXPECT_TRUE(cuda::AttentionDecodeGqaSupported(32, 4, 128, 128));
  EXPECT_TRUE(cuda::AttentionDecodeGqaSupported(16, 16, 64, 64));
  EXPECT_TRUE(cuda::AttentionDecodeGqaSupported(16, 1, 256, 256));
  EXPECT_FALSE(cuda::AttentionDecodeGqaSupported(34, 2, 128, 128));  // group 17
  EXPECT_FALSE(cuda::AttentionDecodeGqaSupported(32, 3, 128, 128));
  EXPECT_FALSE(cuda::AttentionDecodeGqaSupported(32, 0, 128, 128));
  EXPECT_FALSE(cuda::AttentionDecodeGqaSupported(32, 4, 260, 128));
  EXPECT_FALSE(cuda::AttentionDecodeGqaSupported(32, 4, 128, 130));
  // Refused before any launch: odd rope_dim, rope past dk.
  EXPECT_EQ(cuda::AttentionDecodeGqa(nullptr, nullptr, nullptr, 1, 32, 4, 128, 128, nullptr,
                                     nullptr, 1e-6f, 0, 63, nullptr, nullptr, 1.0f, false, nullptr,
                                     nullptr, 0, 1.0f, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::AttentionDecodeGqa(nullptr, nullptr, nullptr, 1, 32, 4, 128, 128, nullptr,
                                     nullptr, 1e-6f, 8, 128, nullptr, nullptr, 1.0f, false, nullptr,
                                     nullptr, 0, 1.0f, nullptr, nullptr),
            cudaErrorInvalidValue);
}

// Timing print (no assertion): decode at 34 cached keys, 32 q heads over 4 kv heads, dk 128;
// per launch, the median of 20 samples of 10 back-to-back launches (cudaEvent).
TEST(CudaAttentionGqaTiming, AgainstAttentionDecode) {
  EEP_REQUIRE_GPU("attention timing");
  const int64_t nh = 32, nkv = 4, dk = 128, dv = 128, rope_dim = 128, cached = 34;
  constexpr int kReps = 10;
  const float eps = 1e-6f, scale = 1.0f / std::sqrt(128.0f);
  std::vector<float> inv(rope_dim / 2);
  for (int64_t i = 0; i < rope_dim / 2; ++i)
    inv[i] = 1.0f / std::pow(10000.0f, 2.0f * i / rope_dim);
  Dev<float> dinv(inv), dqn(Random(dk, 7)), dkn(Random(dk, 8));
  for (int64_t N : {int64_t{1}, int64_t{16}, int64_t{64}, int64_t{256}}) {
    const size_t krow = static_cast<size_t>((cached + 1) * nkv * dk),
                 vrow = static_cast<size_t>((cached + 1) * nkv * dv);
    Dev<float> dq(Random(N * nh * dk, 1)), dk_(Random(N * nkv * dk, 2)),
        dv_(Random(N * nkv * dv, 3));
    Dev<float> kc(FastRandom(N * krow, 4)), vc(FastRandom(N * vrow, 5)), out(N * nh * dv);
    std::vector<uint64_t> kp(N), vp(N);
    for (int64_t t = 0; t < N; ++t) {
      kp[t] = reinterpret_cast<uint64_t>(kc.p + t * krow);
      vp[t] = reinterpret_cast<uint64_t>(vc.p + t * vrow);
    }
    Dev<uint64_t> dkp(kp), dvp(vp);
    Dev<int32_t> dpos(std::vector<int32_t>(N, static_cast<int32_t>(cached)));
    auto kpp = reinterpret_cast<float* const*>(dkp.p);
    auto vpp = reinterpret_cast<float* const*>(dvp.p);
    auto run = [&](bool gqa) {
      return gqa ? cuda::AttentionDecodeGqa(dq.p, dk_.p, dv_.p, N, nh, nkv, dk, dv, dqn.p, dkn.p,
                                            eps, 0, rope_dim, dpos.p, dinv.p, 1.0f, false, kpp, vpp,
                                            0, scale, out.p, nullptr)
                 : cuda::AttentionDecode(dq.p, dk_.p, dv_.p, N, nh, nkv, dk, dv, dqn.p, dkn.p, eps,
                                         0, rope_dim, dpos.p, dinv.p, 1.0f, false, kpp, vpp, 0,
                                         scale, out.p, nullptr);
    };
    cudaEvent_t e0, e1;
    ASSERT_EQ(cudaEventCreate(&e0), cudaSuccess);
    ASSERT_EQ(cudaEventCreate(&e1), cudaSuccess);
    double med[2];
    for (int g = 0; g < 2; ++g) {
      for (int i = 0; i < 3; ++i) ASSERT_EQ(run(g == 1), cudaSuccess);
      std::vector<float> ms;
      for (int i = 0; i < 20; ++i) {
        // kReps launches back to back per sample (as in a decode step, launch gaps hidden).
        ASSERT_EQ(cudaEventRecord(e0, nullptr), cudaSuccess);
        for (int r = 0; r < kReps; ++r) ASSERT_EQ(run(g == 1), cudaSuccess);
        ASSERT_EQ(cudaEventRecord(e1, nullptr), cudaSuccess);
        ASSERT_EQ(cudaEventSynchronize(e1), cudaSuccess);
        float m = 0;
        ASSERT_EQ(cudaEventElapsedTime(&m, e0, e1), cudaSuccess);
        ms.push_back(m / kReps);
      }
      std::sort(ms.begin(), ms.end());
      med[g] = 0.5 * (ms[9] + ms[10]) * 1000.0;
    }
    std::printf(
        "attention decode batch %3ld (32/4 heads, dk 128, %ld cached keys): AttentionDecode %8.2f "
        "us, "
        "AttentionDecodeGqa %8.2f us (x%.2f)\n",
        static_cast<long>(N), static_cast<long>(cached), med[0], med[1], med[0] / med[1]);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
}

#endif  // EEP_WITH_CUDA

}  // namespace
}  // namespace eep
