// Every CUDA op against the CPU reference (src/kernels/cpu/ops.h) on random inputs. The bound
// of each is stated next to it as max|gpu - cpu| / max(1, max|cpu|):
//   exact copies (Embed, GatherRows, MlaExpandKv) 0; element-wise f32 math (RmsNorm, SiluMul,
//   Add, Rope, MoeCombine) 1e-5; Attention 1e-5; router ids equal and weights 1e-6;
//   BF16 GEMM with split activations 5e-5, with plain BF16 activations 1e-2.
// Decode-regime kernels (f32 activations × BF16 or f32 weights, f32 accumulation, against a
// double reference on the same BF16 weights): Gemv 1e-5; fused MoE (MoeRoutePlan → MoeGateUp
// → MoeDown → MoeCombineAdd) ids equal, weights 1e-6, output 1e-5; QkNormRopeKv and
// AttentionBatched 1e-5. Each at 1, 7 and 64 tokens.
// Skips (GTEST_SKIP) when there is no GPU or eep was built without CUDA.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "cuda/cuda_model.h"
#include "gpu_test_util.h"
#include "kernels/cpu/ops.h"

#ifdef EEP_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/cuda/ops.h"
#endif

namespace eep {
namespace {

#ifndef EEP_WITH_CUDA
TEST(CudaOps, AllOps) { GTEST_SKIP() << "eep was built without CUDA (EEP_ENABLE_CUDA=OFF): CUDA op tests skipped"; }
#else

#define REQUIRE_GPU() EEP_REQUIRE_GPU("op")

using gpu_test::Dev;
using gpu_test::Random;


double RelErr(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double max_ref = 1, max_diff = 0;
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
  }
  return max_diff / max_ref;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = F32ToBF16(v[i]);
  return o;
}
std::vector<float> FromBf16(const std::vector<uint16_t>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = BF16ToF32(v[i]);
  return o;
}

TEST(CudaOps, Embed) {
  REQUIRE_GPU();
  const int64_t V = 50, H = 72;
  auto table = ToBf16(Random(V * H, 1));
  std::vector<int32_t> ids = {3, 0, 49, 3, 17};
  Dev<uint16_t> dt(table);
  Dev<int32_t> di(ids);
  Dev<float> dx(ids.size() * H);
  ASSERT_EQ(cuda::Embed(dt.p, di.p, 5, H, dx.p, nullptr), cudaSuccess);
  auto x = dx.Host();
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t i = 0; i < H; ++i) ASSERT_EQ(x[t * H + i], BF16ToF32(table[ids[t] * H + i]));
}

// Ids the previous step left on the device (-1-r: prev[r]) and the accumulators it clears.
TEST(CudaOps, EmbedDeviceIdsAndClears) {
  REQUIRE_GPU();
  const int64_t V = 50, H = 72;
  auto table = ToBf16(Random(V * H, 1));
  std::vector<int32_t> ids = {-2, 7, -1}, prev = {11, 42}, want = {42, 7, 11};
  Dev<uint16_t> dt(table);
  Dev<int32_t> di(ids), dp(prev);
  Dev<float> dx(ids.size() * H);
  Dev<double> zero(std::vector<double>(1000, 3.5));
  ASSERT_EQ(cuda::Embed(dt.p, di.p, 3, H, dx.p, nullptr, nullptr, dp.p, zero.p + 1, 998), cudaSuccess);
  auto x = dx.Host();
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t i = 0; i < H; ++i) ASSERT_EQ(x[t * H + i], BF16ToF32(table[want[t] * H + i])) << "token " << t;
  auto z = zero.Host();
  EXPECT_EQ(z[0], 3.5);
  EXPECT_EQ(z[999], 3.5);
  for (size_t i = 1; i < 999; ++i) ASSERT_EQ(z[i], 0.0) << i;
}

TEST(CudaOps, RmsNormF32AndSplit) {
  REQUIRE_GPU();
  const int64_t rows = 7, dim = 320, stride = 400;
  auto x = Random(rows * stride, 2, 3.0f);
  auto w = Random(dim, 3);
  std::vector<float> ref(rows * dim);
  for (int64_t r = 0; r < rows; ++r) cpu::RmsNorm(x.data() + r * stride, w.data(), 1, dim, 1e-6f, ref.data() + r * dim);
  Dev<float> dx(x), dw(w), dy(rows * dim);
  Dev<uint16_t> d16(2 * rows * dim);
  ASSERT_EQ(cuda::RmsNorm(dx.p, stride, dw.p, rows, dim, 1e-6f, dy.p, dim, d16.p, 2, nullptr), cudaSuccess);
  EXPECT_LT(RelErr(dy.Host(), ref), 1e-5);
  auto s = FromBf16(d16.Host());
  std::vector<float> sum(rows * dim);
  for (size_t i = 0; i < sum.size(); ++i) sum[i] = s[i] + s[rows * dim + i];
  EXPECT_LT(RelErr(sum, ref), 2e-5);  // hi + lo carries ~16 bits of the f32 value
}

TEST(CudaOps, GatherRmsNormMatchesRmsNorm) {
  REQUIRE_GPU();
  for (int64_t dim : {int64_t{72}, int64_t{320}, int64_t{2048}}) {
    const int64_t rows = 9;
    auto x = Random(rows * dim, 4, 3.0f);
    auto w = Random(dim, 5);
    const std::vector<int32_t> sel = {8, 0, 3, 3};
    std::vector<float> ref(sel.size() * dim);
    for (size_t r = 0; r < sel.size(); ++r) cpu::RmsNorm(x.data() + sel[r] * dim, w.data(), 1, dim, 1e-6f, ref.data() + r * dim);
    Dev<float> dx(x), dw(w), dy(std::vector<float>(sel.size() * dim, NAN));
    Dev<int32_t> ds(sel);
    ASSERT_EQ(cuda::GatherRmsNormF32(dx.p, ds.p, static_cast<int64_t>(sel.size()), dim, dw.p, 1e-6f, dy.p, nullptr),
              cudaSuccess);
    auto got = dy.Host();
    for (float v : got) ASSERT_TRUE(std::isfinite(v)) << "dim " << dim;  // every element written
    EXPECT_LT(RelErr(got, ref), 1e-6) << "dim " << dim;
  }
}

TEST(CudaOps, SiluMulAndAdd) {
  REQUIRE_GPU();
  const int64_t rows = 5, inter = 96;
  auto gu = Random(2 * rows * 2 * inter, 4, 2.0f);  // split layout: hi rows then lo rows
  std::vector<float> g(rows * inter), u(rows * inter), ref(rows * inter);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < inter; ++c) {
      g[r * inter + c] = gu[r * 2 * inter + c] + gu[(rows + r) * 2 * inter + c];
      u[r * inter + c] = gu[r * 2 * inter + inter + c] + gu[(rows + r) * 2 * inter + inter + c];
    }
  cpu::SiluMul(g.data(), u.data(), rows * inter, ref.data());
  Dev<float> dgu(gu), dout(rows * inter);
  ASSERT_EQ(cuda::SiluMul(dgu.p, rows, inter, 2, dout.p, nullptr, nullptr), cudaSuccess);
  EXPECT_LT(RelErr(dout.Host(), ref), 1e-5);

  auto a = Random(1000, 5), b = Random(1000, 6);
  Dev<float> da(a), db(b);
  ASSERT_EQ(cuda::Add(da.p, db.p, 1000, nullptr), cudaSuccess);
  for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
  EXPECT_LT(RelErr(da.Host(), a), 1e-6);
}

class CudaRope : public ::testing::TestWithParam<bool> {};

TEST_P(CudaRope, MatchesCpu) {
  REQUIRE_GPU();
  const bool interleaved = GetParam();
  const int64_t T = 4, heads = 3, dk = 24, off = 8, rope_dim = 16;
  auto x = Random(T * heads * dk, 7);
  std::vector<float> inv(rope_dim / 2);
  for (int64_t i = 0; i < rope_dim / 2; ++i) inv[i] = 1.0f / std::pow(10000.0f, 2.0f * i / rope_dim);
  std::vector<int32_t> pos = {0, 5, 6, 1000};
  const float factor = 1.25f;
  auto ref = x;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> c(rope_dim / 2), s(rope_dim / 2);
    for (int64_t i = 0; i < rope_dim / 2; ++i) {
      double a = static_cast<double>(pos[t]) * static_cast<double>(inv[i]);
      c[i] = static_cast<float>(std::cos(a)) * factor;
      s[i] = static_cast<float>(std::sin(a)) * factor;
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = ref.data() + (t * heads + h) * dk + off;
      if (interleaved) cpu::RopeInterleaved(v, rope_dim, c.data(), s.data());
      else cpu::RopeRotateHalf(v, rope_dim, c.data(), s.data());
    }
  }
  Dev<float> dx(x), dinv(inv);
  Dev<int32_t> dpos(pos);
  ASSERT_EQ(cuda::Rope(dx.p, T, heads, heads * dk, dk, off, rope_dim, dpos.p, dinv.p, factor, interleaved, nullptr),
            cudaSuccess);
  EXPECT_LT(RelErr(dx.Host(), ref), 1e-5);
}
INSTANTIATE_TEST_SUITE_P(Layouts, CudaRope, ::testing::Values(false, true));

class CudaAttention : public ::testing::TestWithParam<int64_t> {};  // sliding window (0: none)

TEST_P(CudaAttention, MatchesCpu) {
  REQUIRE_GPU();
  const int64_t window = GetParam();
  const int64_t T = 5, start = 7, nh = 4, nkv = 2, dk = 64, dv = 48, L = start + T;
  const float scale = 0.125f;
  auto q = Random(T * nh * dk, 8), kc = Random(L * nkv * dk, 9), vc = Random(L * nkv * dv, 10);
  std::vector<float> ref(T * nh * dv), scratch(L);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t pos = start + i, kvh = h / (nh / nkv);
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      cpu::AttendOneHead(q.data() + (i * nh + h) * dk, kc.data() + (first * nkv + kvh) * dk, nkv * dk,
                         vc.data() + (first * nkv + kvh) * dv, nkv * dv, pos + 1 - first, dk, dv, scale,
                         scratch.data(), ref.data() + (i * nh + h) * dv);
    }
  Dev<float> dq(q), dk_(kc), dv_(vc), dout(T * nh * dv);
  ASSERT_EQ(cuda::Attention(dq.p, dk_.p, dv_.p, T, start, nh, nkv, dk, dv, window, scale, dout.p, nullptr),
            cudaSuccess);
  EXPECT_LT(RelErr(dout.Host(), ref), 1e-5);
}
INSTANTIATE_TEST_SUITE_P(Windows, CudaAttention, ::testing::Values(0, 3));

TEST(CudaOps, AttentionLongContext) {
  REQUIRE_GPU();
  // Past 48 KB of scores: the kernel raises its shared-memory limit.
  const int64_t T = 2, start = 20000, nh = 2, nkv = 1, dk = 32, dv = 32, L = start + T;
  auto q = Random(T * nh * dk, 11), kc = Random(L * nkv * dk, 12), vc = Random(L * nkv * dv, 13);
  std::vector<float> ref(T * nh * dv), scratch(L);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t h = 0; h < nh; ++h)
      cpu::AttendOneHead(q.data() + (i * nh + h) * dk, kc.data(), nkv * dk, vc.data(), nkv * dv, start + i + 1, dk,
                         dv, 0.2f, scratch.data(), ref.data() + (i * nh + h) * dv);
  Dev<float> dq(q), dk_(kc), dv_(vc), dout(T * nh * dv);
  ASSERT_EQ(cuda::Attention(dq.p, dk_.p, dv_.p, T, start, nh, nkv, dk, dv, 0, 0.2f, dout.p, nullptr), cudaSuccess);
  EXPECT_LT(RelErr(dout.Host(), ref), 1e-5);
}

// The CPU routing of Model::Route, written out on the CPU kernels.
void RouteRef(const std::vector<float>& logits, int64_t N, int64_t E, int64_t k, bool norm, const float* bias,
              int64_t G, int64_t topk_group, double scaling, std::vector<int32_t>* ids, std::vector<float>* w) {
  ids->resize(N * k);
  w->resize(N * k);
  for (int64_t t = 0; t < N; ++t) {
    std::vector<float> z(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    int32_t* it = ids->data() + t * k;
    float* wt = w->data() + t * k;
    if (!bias) {
      cpu::Softmax(z.data(), E);
      cpu::TopK(z.data(), E, k, it);
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += z[it[j]];
      for (int64_t j = 0; j < k; ++j) wt[j] = norm ? static_cast<float>(z[it[j]] / sum) : z[it[j]];
      continue;
    }
    std::vector<float> sel(E);
    for (int64_t e = 0; e < E; ++e) {
      z[e] = 1.0f / (1.0f + std::exp(-z[e]));
      sel[e] = z[e] + bias[e];
    }
    const int64_t per = E / G;
    std::vector<float> gs(G);
    for (int64_t g = 0; g < G; ++g) {
      int32_t top2[2];
      const int64_t take = std::min<int64_t>(2, per);
      cpu::TopK(sel.data() + g * per, per, take, top2);
      float s = 0;
      for (int64_t i = 0; i < take; ++i) s += sel[g * per + top2[i]];
      gs[g] = s;
    }
    std::vector<int32_t> groups(topk_group);
    cpu::TopK(gs.data(), G, topk_group, groups.data());
    std::vector<float> masked(E, -INFINITY);
    for (int32_t g : groups)
      for (int64_t i = 0; i < per; ++i) masked[g * per + i] = sel[g * per + i];
    cpu::TopK(masked.data(), E, k, it);
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += z[it[j]];
    for (int64_t j = 0; j < k; ++j) {
      double v = z[it[j]];
      if (norm) v /= (sum + 1e-20);
      wt[j] = static_cast<float>(v * scaling);
    }
  }
}

struct RouteCase {
  int64_t E, k;
  bool norm, deepseek;
  int64_t G, topk_group;
};
class CudaRoute : public ::testing::TestWithParam<RouteCase> {};

TEST_P(CudaRoute, MatchesCpu) {
  REQUIRE_GPU();
  const RouteCase rc = GetParam();
  const int64_t N = 37;
  auto logits = Random(N * rc.E, 14, 2.0f);
  auto bias = Random(rc.E, 15, 0.1f);
  std::vector<int32_t> ref_ids;
  std::vector<float> ref_w;
  RouteRef(logits, N, rc.E, rc.k, rc.norm, rc.deepseek ? bias.data() : nullptr, rc.G, rc.topk_group, 2.5, &ref_ids,
           &ref_w);
  Dev<float> dl(logits), db(bias), dw(N * rc.k);
  Dev<int32_t> di(N * rc.k);
  ASSERT_EQ(cuda::Route(dl.p, N, rc.E, rc.k, rc.norm, rc.deepseek ? db.p : nullptr, rc.G, rc.topk_group,
                        rc.deepseek ? 2.5f : 1.0f, di.p, dw.p, nullptr),
            cudaSuccess);
  EXPECT_EQ(di.Host(), ref_ids);
  auto w = dw.Host();
  EXPECT_LT(RelErr(w, ref_w), 1e-6);
}
INSTANTIATE_TEST_SUITE_P(Modes, CudaRoute,
                         ::testing::Values(RouteCase{64, 8, false, false, 1, 1}, RouteCase{8, 2, true, false, 1, 1},
                                           RouteCase{256, 8, true, true, 8, 4}, RouteCase{16, 4, true, true, 4, 2},
                                           RouteCase{16, 3, false, true, 1, 1}));

TEST(CudaOps, GatherCombineAndMlaExpand) {
  REQUIRE_GPU();
  const int64_t N = 6, H = 40, k = 3;
  auto in = ToBf16(Random(2 * N * H, 16));
  std::vector<int32_t> src = {5, 0, 11, 3, 3, 7};
  Dev<uint16_t> din(in), dout(src.size() * H);
  Dev<int32_t> dsrc(src);
  ASSERT_EQ(cuda::GatherRows(din.p, dsrc.p, static_cast<int64_t>(src.size()), H, dout.p, nullptr), cudaSuccess);
  auto out = dout.Host();
  for (size_t r = 0; r < src.size(); ++r)
    for (int64_t i = 0; i < H; ++i) ASSERT_EQ(out[r * H + i], in[src[r] * H + i]);

  // Combine: y rows of 2·N·k assignments (hi, lo), permuted.
  const int64_t A = N * k;
  auto y = Random(2 * A * H, 17);
  auto w = Random(A, 18);
  std::vector<int32_t> rows(A * 2);
  for (int64_t a = 0; a < A; ++a) {
    rows[a * 2] = static_cast<int32_t>((a * 7) % A);
    rows[a * 2 + 1] = static_cast<int32_t>(A + (a * 7) % A);
  }
  std::vector<float> ref(N * H, 0.0f);
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < H; ++i) {
        const int64_t a = t * k + j;
        ref[t * H + i] += w[a] * (y[rows[a * 2] * H + i] + y[rows[a * 2 + 1] * H + i]);
      }
  Dev<float> dy(y), dw(w), dc(N * H);
  Dev<int32_t> drows(rows);
  ASSERT_EQ(cuda::MoeCombine(dy.p, drows.p, dw.p, N, k, H, 2, dc.p, nullptr), cudaSuccess);
  EXPECT_LT(RelErr(dc.Host(), ref), 1e-5);

  const int64_t nh = 3, nope = 8, rope = 4, dv = 6, kvr = 10, ca = kvr + rope;
  auto kv = Random(N * nh * (nope + dv), 19), c = Random(N * ca, 20);
  Dev<float> dkv(kv), dcc(c), dk(N * nh * (nope + rope)), dv_(N * nh * dv);
  ASSERT_EQ(cuda::MlaExpandKv(dkv.p, dcc.p, N, nh, nope, rope, dv, ca, kvr, dk.p, dv_.p, nullptr), cudaSuccess);
  auto hk = dk.Host(), hv = dv_.Host();
  for (int64_t t = 0; t < N; ++t)
    for (int64_t h = 0; h < nh; ++h) {
      const float* s = kv.data() + (t * nh + h) * (nope + dv);
      for (int64_t i = 0; i < nope; ++i) ASSERT_EQ(hk[(t * nh + h) * (nope + rope) + i], s[i]);
      for (int64_t i = 0; i < rope; ++i) ASSERT_EQ(hk[(t * nh + h) * (nope + rope) + nope + i], c[t * ca + kvr + i]);
      for (int64_t i = 0; i < dv; ++i) ASSERT_EQ(hv[(t * nh + h) * dv + i], s[nope + i]);
    }
}

// The GEMM path of every linear layer: split (or plain) BF16 activations × BF16 weights in
// cuBLAS, f32 accumulation, then SumSplits (+ bias).
class CudaGemm : public ::testing::TestWithParam<int> {};

TEST_P(CudaGemm, MatchesCpuLinear) {
  REQUIRE_GPU();
  const int splits = GetParam();
  const int64_t T = 9, in = 512, out = 384;
  auto x = Random(T * in, 21);
  auto w16 = ToBf16(Random(out * in, 22, 0.05f));
  auto wf = FromBf16(w16);
  auto bias = Random(out, 23);
  std::vector<float> ref(T * out);
  cpu::Linear(x.data(), T, in, wf.data(), out, bias.data(), ref.data());
  Dev<float> dx(x), db(bias), dy2(splits * T * out), dy(T * out);
  Dev<uint16_t> dw(w16), dx16(splits * T * in);
  ASSERT_EQ(cuda::SplitBf16(dx.p, T, in, splits, dx16.p, nullptr), cudaSuccess);
  cublasHandle_t h;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  const float one = 1, zero = 0;
  ASSERT_EQ(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, splits * T, in, &one, dw.p, CUDA_R_16BF, in, dx16.p,
                         CUDA_R_16BF, in, &zero, dy2.p, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cuda::SumSplits(dy2.p, T, out, splits, db.p, dy.p, nullptr), cudaSuccess);
  const double err = RelErr(dy.Host(), ref);
  cublasDestroy(h);
  std::printf("GEMM [%ld x %ld] x [%ld x %ld]ᵀ, %d split(s): rel err %.3g\n", static_cast<long>(T),
              static_cast<long>(in), static_cast<long>(out), static_cast<long>(in), splits, err);
  EXPECT_LT(err, splits == 2 ? 5e-5 : 1e-2);
}
INSTANTIATE_TEST_SUITE_P(Splits, CudaGemm, ::testing::Values(1, 2));

// ---------------------------------------------------------------------------------------
// Decode-regime kernels

double Dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Three segments (q/k/v-like, one with a bias), accumulate on and off, BF16 and f32 weights.
class CudaGemv : public ::testing::TestWithParam<int64_t> {};  // tokens

TEST_P(CudaGemv, MatchesCpu) {
  REQUIRE_GPU();
  const int64_t T = GetParam();
  // 520 columns: a warp per row, or two (rows_per_warp 2: a warp's rows straddle segments 0|1, and
  // the last warp has one row); 2048 columns and < 1024 rows: 8 warps share each row.
  // One token: also from shared memory (stage 1: a block's rows straddle segments 0|1 and 1|2).
  for (int stage : {0, 1})
  for (int rows_per_warp : {1, 2})
  for (int64_t in : {int64_t{520}, int64_t{2048}}) {
  if (stage == 1 && (T != 1 || rows_per_warp != 1)) continue;
  cuda::SetGemvStage(stage == 1 ? 2 : 0);  // 2: every one-token GEMV
  cuda::SetGemvRowsPerWarp(rows_per_warp);
  const int64_t stride = in + 8;
  const int64_t rows[3] = {95, 40, 17};
  auto x = Random(T * stride, 30);
  for (int f32 = 0; f32 < 2; ++f32)
    for (int acc = 0; acc < 2; ++acc) {
      std::vector<std::vector<float>> wf(3), ys(3), ref(3);
      std::vector<std::unique_ptr<Dev<uint16_t>>> w16;
      std::vector<std::unique_ptr<Dev<float>>> w32, dy;
      auto bias = Random(rows[1], 31);
      Dev<float> dbias(bias), dx(x);
      cuda::GemvSegments sg;
      sg.count = 3;
      for (int s = 0; s < 3; ++s) {
        auto w = Random(rows[s] * in, 32 + s, 0.05f);
        if (!f32) {
          auto b = ToBf16(w);
          wf[s] = FromBf16(b);
          w16.push_back(std::make_unique<Dev<uint16_t>>(b));
        } else {
          wf[s] = w;
          w32.push_back(std::make_unique<Dev<float>>(w));
        }
        ys[s] = Random(T * rows[s], 40 + s);  // accumulated into when acc
        dy.push_back(std::make_unique<Dev<float>>(ys[s]));
        ref[s].resize(T * rows[s]);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t r = 0; r < rows[s]; ++r) {
            double v = Dot(wf[s].data() + r * in, x.data() + t * stride, in) + (s == 1 ? bias[r] : 0.0);
            ref[s][t * rows[s] + r] = static_cast<float>(acc ? ys[s][t * rows[s] + r] + v : v);
          }
        sg.seg[s].w = f32 ? static_cast<const void*>(w32.back()->p) : static_cast<const void*>(w16.back()->p);
        sg.seg[s].y = dy.back()->p;
        sg.seg[s].bias = s == 1 ? dbias.p : nullptr;
        sg.seg[s].rows = rows[s];
      }
      ASSERT_EQ(f32 ? cuda::GemvF32(sg, in, dx.p, stride, T, acc, nullptr) : cuda::Gemv(sg, in, dx.p, stride, T, acc, nullptr),
                cudaSuccess);
      for (int s = 0; s < 3; ++s)
        EXPECT_LT(RelErr(dy[s]->Host(), ref[s]), 1e-5) << "in " << in << " f32 " << f32 << " acc " << acc
                                                       << " segment " << s << " rows per warp " << rows_per_warp
                                                       << " stage " << stage;
    }
  }
  cuda::SetGemvRowsPerWarp(0);
  cuda::SetGemvStage(-1);
}

// The one-token GEMV from shared memory at Qwen3-30B-A3B's shapes: q/k/v (5120 rows of 2048 in
// three segments, 39 rows a block on 132 SMs, RMSNorm on the dot products with Σ x² given, normed
// row written; staged only in mode 2) and the output projection (2048 rows of 4096, added to the
// residual, Σ y² out; staged as decode asks); against the CPU in double, and against the register
// GEMV (stage 0).
TEST(CudaOps, GemvStagedDecodeShapes) {
  REQUIRE_GPU();
  {
    const int64_t in = 2048, rows[3] = {4096, 512, 512};
    auto x = Random(in, 100, 3.0f), nw = Random(in, 101);
    std::vector<float> normed(in);
    cpu::RmsNorm(x.data(), nw.data(), 1, in, 1e-6f, normed.data());
    double sum = 0;
    for (float v : x) sum += static_cast<double>(v) * v;
    Dev<float> dx(x), dnw(nw);
    Dev<double> dsums(std::vector<double>{sum});
    std::vector<std::unique_ptr<Dev<uint16_t>>> dw;
    std::vector<std::vector<float>> wf(3), ref(3);
    for (int s = 0; s < 3; ++s) {
      auto b = ToBf16(Random(rows[s] * in, 102 + s, 0.05f));
      wf[s] = FromBf16(b);
      dw.push_back(std::make_unique<Dev<uint16_t>>(b));
      ref[s].resize(rows[s]);
      for (int64_t r = 0; r < rows[s]; ++r) ref[s][r] = static_cast<float>(Dot(wf[s].data() + r * in, normed.data(), in));
    }
    std::vector<float> by_stage[2][3];
    for (int stage : {0, 1}) {
      cuda::SetGemvStage(stage == 1 ? 2 : 0);  // 2: every one-token GEMV
      std::vector<std::unique_ptr<Dev<float>>> dy;
      Dev<float> dn(std::vector<float>(in, NAN));
      cuda::GemvSegments sg;
      sg.count = 3;
      for (int s = 0; s < 3; ++s) {
        dy.push_back(std::make_unique<Dev<float>>(std::vector<float>(rows[s], NAN)));
        sg.seg[s] = {dw[s]->p, dy.back()->p, nullptr, rows[s]};
      }
      ASSERT_EQ(cuda::Gemv(sg, in, dx.p, in, 1, false, nullptr, dnw.p, 1e-6f, dn.p, dsums.p), cudaSuccess);
      for (int s = 0; s < 3; ++s) {
        by_stage[stage][s] = dy[s]->Host();
        EXPECT_LT(RelErr(by_stage[stage][s], ref[s]), 1e-5) << "q/k/v segment " << s << " stage " << stage;
      }
      EXPECT_LT(RelErr(dn.Host(), normed), 1e-6) << "normed row, stage " << stage;
    }
    for (int s = 0; s < 3; ++s) EXPECT_LT(RelErr(by_stage[1][s], by_stage[0][s]), 1e-5) << "segment " << s;
  }
  {
    const int64_t in = 4096, rows = 2048;
    auto x = Random(in, 110), res = Random(rows, 111, 2.0f);
    auto b = ToBf16(Random(rows * in, 112, 0.05f));
    auto wf = FromBf16(b);
    std::vector<float> ref(rows);
    double ref_sq = 0;
    for (int64_t r = 0; r < rows; ++r) {
      ref[r] = static_cast<float>(res[r] + Dot(wf.data() + r * in, x.data(), in));
      ref_sq += static_cast<double>(ref[r]) * ref[r];
    }
    Dev<uint16_t> dw(b);
    Dev<float> dx(x);
    for (int stage : {0, 1}) {
      cuda::SetGemvStage(stage);  // 1: the GEMVs that ask (as decode's output projection)
      Dev<float> dy(res);
      Dev<double> dsq(std::vector<double>{0.0});
      cuda::GemvSegments sg;
      sg.seg[0] = {dw.p, dy.p, nullptr, rows};
      sg.count = 1;
      sg.stage = true;
      ASSERT_EQ(cuda::Gemv(sg, in, dx.p, in, 1, true, nullptr, nullptr, 0, nullptr, nullptr, dsq.p), cudaSuccess);
      EXPECT_LT(RelErr(dy.Host(), ref), 1e-5) << "o-proj, stage " << stage;
      EXPECT_NEAR(dsq.Host()[0], ref_sq, 1e-5 * ref_sq) << "Σ y², stage " << stage;
    }
  }
  cuda::SetGemvStage(-1);
}
INSTANTIATE_TEST_SUITE_P(Tokens, CudaGemv, ::testing::Values(1, 7, 64));

// The device table of P slots whose expert e has count[e] replicas in slots[e·max_reps ..].
cuda::MoeSlotTable SlotTable(const Dev<int32_t>& count, const Dev<int32_t>& slots, int64_t max_reps,
                             const Dev<uint64_t>& ptrs, int64_t P) {
  cuda::MoeSlotTable table;
  table.rep_count = count.p;
  table.rep_slot = slots.p;
  table.max_replicas = max_reps;
  table.slot_ptr = reinterpret_cast<const uint16_t* const*>(ptrs.p);
  table.num_slots = P;
  return table;
}

// GemvRouter (the one-token o-proj GEMV that also routes) against a double-precision host
// reference of x + W·in, the post-attention RMSNorm, the router and the routing, and against the
// two launches it replaces (staged Gemv, then RouterPlan with the norm sums): the same x, ids and
// plan, logits and weights to rounding. Experts with replicas; twice (the counter resets; the
// second run reads the residual before its wait).
struct GemvRouterCase {
  int64_t rows, in, E, k;
  bool norm_topk;
};
class CudaGemvRouter : public ::testing::TestWithParam<GemvRouterCase> {};

TEST_P(CudaGemvRouter, MatchesReferenceAndTwoLaunches) {
  REQUIRE_GPU();
  const auto [H, in, E, k, norm_topk] = GetParam();
  cuda::SetGemvStage(1);
  // Replicas: every third expert has two slots, the rest one.
  std::vector<std::vector<int32_t>> reps(E);
  int64_t P = 0;
  for (int64_t e = 0; e < E; ++e) {
    reps[e].push_back(static_cast<int32_t>(P++));
    if (e % 3 == 0) reps[e].push_back(static_cast<int32_t>(P++));
  }
  const int64_t R = 2;
  ASSERT_GT(cuda::GemvRouterBlocks(H, in, E, k, P, R), 0);
  std::vector<int32_t> rep_count(E), rep_slot(E * R, 0);
  for (int64_t e = 0; e < E; ++e) {
    rep_count[e] = static_cast<int32_t>(reps[e].size());
    for (size_t r = 0; r < reps[e].size(); ++r) rep_slot[e * R + r] = reps[e][r];
  }
  Dev<int32_t> dcount(rep_count), drep(rep_slot);
  std::vector<uint64_t> ptr_bits(P, 0);
  Dev<uint64_t> dptr(ptr_bits);
  const cuda::MoeSlotTable table = SlotTable(dcount, drep, R, dptr, P);
  const int64_t maxg = cuda::MoeMaxGroups(k, P);

  auto attn = Random(in, 130), res = Random(H, 131, 2.0f), nw = Random(H, 132), router = Random(E * H, 133, 0.1f);
  auto wb = ToBf16(Random(H * in, 134, 0.05f));
  auto wf = FromBf16(wb);
  // Host reference in double.
  std::vector<double> xd(H);
  double sq = 0;
  for (int64_t r = 0; r < H; ++r) {
    xd[r] = res[r] + Dot(wf.data() + r * in, attn.data(), in);
    sq += xd[r] * xd[r];
  }
  const double inv = 1.0 / std::sqrt(sq / static_cast<double>(H) + 1e-6);
  std::vector<float> ref_x(H), ref_hf(H), ref_logits(E);
  for (int64_t r = 0; r < H; ++r) ref_x[r] = static_cast<float>(xd[r]), ref_hf[r] = static_cast<float>(nw[r] * xd[r] * inv);
  for (int64_t e = 0; e < E; ++e) {
    double z = 0;
    for (int64_t r = 0; r < H; ++r) z += static_cast<double>(router[e * H + r]) * nw[r] * xd[r] * inv;
    ref_logits[e] = static_cast<float>(z);
  }
  std::vector<int32_t> ref_ids;
  std::vector<float> ref_w;
  RouteRef(ref_logits, 1, E, k, norm_topk, nullptr, 1, 1, 1.0, &ref_ids, &ref_w);
  // The k-th and (k+1)-th probabilities must be apart for the ids to be comparable at all.
  std::vector<float> sorted = ref_logits;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  ASSERT_GT(sorted[k - 1] - sorted[k], 1e-4f) << "reference near-tie: pick another seed";

  Dev<uint16_t> dw(wb);
  Dev<float> dattn(attn), dnw(nw), drouter(router);
  struct Out {
    std::vector<float> x, hf, logits, w;
    std::vector<int32_t> ids, plan;
  };
  // residual_early: the second run reads the residual before its wait (as after AttentionDecode).
  auto run_fused = [&](Out* o, bool residual_early = false) {
    Dev<float> dx(res), dhf(std::vector<float>(H, NAN)), dlog(std::vector<float>(E, NAN)), dwts(std::vector<float>(k, NAN)),
        dpart(static_cast<int64_t>(cuda::GemvRouterBlocks(H, in, E, k, P, R)) * E);
    Dev<double> dsums(std::vector<double>{0.0});
    Dev<int32_t> dids(std::vector<int32_t>(k, -1)), dplan(std::vector<int32_t>(cuda::MoePlanInts(maxg, k), -7));
    Dev<unsigned> counter(std::vector<unsigned>{0u});
    cuda::GemvRouterArgs r;
    r.router = drouter.p;
    r.norm_w = dnw.p;
    r.eps = 1e-6f;
    r.norm_sums = dsums.p;
    r.norm_out = dhf.p;
    r.logits = dlog.p;
    r.partial = dpart.p;
    r.counter = counter.p;
    r.num_experts = E;
    r.top_k = k;
    r.norm_topk = norm_topk;
    r.table = table;
    r.ids = dids.p;
    r.weights = dwts.p;
    r.plan = cuda::MoePlanIn(dplan.p, maxg);
    r.residual_early = residual_early;
    ASSERT_EQ(cuda::GemvRouter(dw.p, nullptr, H, in, dattn.p, dx.p, r, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(counter.Host()[0], 0u);
    *o = {dx.Host(), dhf.Host(), dlog.Host(), dwts.Host(), dids.Host(), dplan.Host()};
  };
  Out f1, f2;
  run_fused(&f1);
  run_fused(&f2, true);
  EXPECT_EQ(f1.x, f2.x);
  EXPECT_EQ(f1.logits, f2.logits) << "the block shares are summed in a fixed order";
  EXPECT_EQ(f1.ids, f2.ids);
  EXPECT_LT(RelErr(f1.x, ref_x), 1e-5);
  EXPECT_LT(RelErr(f1.hf, ref_hf), 1e-5);
  EXPECT_LT(RelErr(f1.logits, ref_logits), 1e-5);
  EXPECT_EQ(f1.ids, ref_ids);
  EXPECT_LT(RelErr(f1.w, ref_w), 1e-5);
  // Each assignment in the group of the slot its replica rule picks (token 0: replica 0).
  const int32_t groups = f1.plan[0];
  int64_t covered = 0;
  for (int32_t g = 0; g < groups; ++g) {
    const int32_t slot = f1.plan[4 + g], cnt = f1.plan[4 + 2 * maxg + g];
    for (int32_t i = 0; i < cnt; ++i) {
      const int32_t a = f1.plan[4 + 3 * maxg + f1.plan[4 + maxg + g] + i];
      ASSERT_GE(a, 0);
      ASSERT_LT(a, k);
      EXPECT_EQ(slot, reps[ref_ids[a]][0]);
    }
    covered += cnt;
  }
  EXPECT_EQ(covered, k);

  // The two launches it replaces.
  Dev<float> dx(res), dhf(H), dlog(E), dwts(k);
  Dev<double> dsums(std::vector<double>{0.0});
  Dev<int32_t> dids(k), dplan(cuda::MoePlanInts(maxg, k));
  Dev<unsigned> counter(std::vector<unsigned>{0u});
  cuda::GemvSegments sg;
  sg.seg[0] = {dw.p, dx.p, nullptr, H};
  sg.count = 1;
  sg.stage = true;
  ASSERT_EQ(cuda::Gemv(sg, in, dattn.p, in, 1, true, nullptr, nullptr, 0, nullptr, nullptr, dsums.p), cudaSuccess);
  ASSERT_EQ(cuda::RouterPlan(drouter.p, H, dx.p, 1, dnw.p, 1e-6f, dhf.p, dlog.p, counter.p, E, k, norm_topk, nullptr,
                             1, 1, 1.0f, table, dids.p, dwts.p, cuda::MoePlanIn(dplan.p, maxg), nullptr, dsums.p),
            cudaSuccess);
  EXPECT_EQ(dx.Host(), f1.x) << "the same GEMV";
  EXPECT_EQ(dhf.Host(), f1.hf);
  EXPECT_LT(RelErr(dlog.Host(), f1.logits), 1e-5);
  EXPECT_EQ(dids.Host(), f1.ids);
  EXPECT_LT(RelErr(dwts.Host(), f1.w), 1e-5);
  const auto p2 = dplan.Host();
  ASSERT_EQ(p2[0], groups);
  for (int32_t a = 0; a < 3; ++a)
    for (int32_t g = 0; g < groups; ++g) EXPECT_EQ(p2[4 + a * maxg + g], f1.plan[4 + a * maxg + g]) << a << ", group " << g;
  cuda::SetGemvStage(-1);
}
// Qwen3-30B-A3B's o-proj and router; a Mixtral-like router (8 experts, top-2); a small one.
INSTANTIATE_TEST_SUITE_P(Shapes, CudaGemvRouter,
                         ::testing::Values(GemvRouterCase{2048, 4096, 128, 8, true},
                                           GemvRouterCase{2048, 4096, 8, 2, true},
                                           GemvRouterCase{1024, 1024, 64, 6, false}));

struct MoeCase {
  int64_t N, E, k;
  bool deepseek;
};
class CudaFusedMoe : public ::testing::TestWithParam<MoeCase> {};

// Route, group by slot, grouped gate/up + SwiGLU, grouped down, combine into a residual: the
// whole device MoE against the CPU, with replicas (experts in several slots, used by the
// t mod replicas spread), slots that share one expert's bytes, and shared-expert rows.
TEST_P(CudaFusedMoe, MatchesCpu) {
  REQUIRE_GPU();
  const MoeCase mc = GetParam();
  const int64_t N = mc.N, E = mc.E, k = mc.k, H = 136, I = 72, A = N * k;
  const int64_t G = mc.deepseek ? 4 : 1, topk_group = mc.deepseek ? 2 : 1;
  // Physical slots: every expert once, then replicas of experts 0, 3 and 5 (expert 3 twice).
  std::vector<std::vector<int32_t>> reps(E);
  int64_t P = 0;
  for (int64_t e = 0; e < E; ++e) reps[e].push_back(static_cast<int32_t>(P++));
  for (int64_t e : {int64_t{0}, int64_t{3}, int64_t{5}, int64_t{3}})
    if (e < E) reps[e].push_back(static_cast<int32_t>(P++));
  int64_t max_reps = 1;
  for (auto& r : reps) max_reps = std::max<int64_t>(max_reps, static_cast<int64_t>(r.size()));
  // Expert weights (gate | up | down) per logical expert; every slot of it points at its own
  // copy, except the last replica of expert 3, which shares the first one's bytes.
  const int64_t elems = 3 * I * H;
  std::vector<std::vector<float>> wexp(E);
  std::vector<std::unique_ptr<Dev<uint16_t>>> slot_mem;
  std::vector<const uint16_t*> slot_ptr(P, nullptr);
  for (int64_t e = 0; e < E; ++e) {
    auto b = ToBf16(Random(elems, 100 + e, 0.1f));
    wexp[e] = FromBf16(b);
    for (size_t r = 0; r < reps[e].size(); ++r) {
      if (e == 3 && r == reps[e].size() - 1 && r > 1) {
        slot_ptr[reps[e][r]] = slot_ptr[reps[e][0]];
        continue;
      }
      slot_mem.push_back(std::make_unique<Dev<uint16_t>>(b));
      slot_ptr[reps[e][r]] = slot_mem.back()->p;
    }
  }
  std::vector<int32_t> rep_count(E), rep_slot(E * max_reps, 0);
  for (int64_t e = 0; e < E; ++e) {
    rep_count[e] = static_cast<int32_t>(reps[e].size());
    for (size_t r = 0; r < reps[e].size(); ++r) rep_slot[e * max_reps + r] = reps[e][r];
  }
  auto x = Random(N * H, 50);
  auto residual = Random(N * H, 51);
  auto shared = Random(N * H, 52);
  auto logits = Random(N * E, 53, 2.0f);
  auto bias = Random(E, 54, 0.1f);
  std::vector<int32_t> ref_ids;
  std::vector<float> ref_w;
  RouteRef(logits, N, E, k, true, mc.deepseek ? bias.data() : nullptr, G, topk_group, mc.deepseek ? 2.5 : 1.0,
           &ref_ids, &ref_w);
  std::vector<float> ref = residual;
  std::vector<double> routed_ref(N * H, 0.0);  // Σ_j w·down_j·act_j per token, in double
  for (int64_t t = 0; t < N; ++t) {
    std::vector<double> acc(H, 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const std::vector<float>& w = wexp[ref_ids[t * k + j]];
      std::vector<float> act(I);
      for (int64_t i = 0; i < I; ++i) {
        const double g = Dot(w.data() + i * H, x.data() + t * H, H), u = Dot(w.data() + (I + i) * H, x.data() + t * H, H);
        act[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * u);
      }
      for (int64_t o = 0; o < H; ++o) acc[o] += ref_w[t * k + j] * Dot(w.data() + 2 * I * H + o * I, act.data(), I);
    }
    for (int64_t o = 0; o < H; ++o) ref[t * H + o] += static_cast<float>(acc[o] + shared[t * H + o]);
    for (int64_t o = 0; o < H; ++o) routed_ref[t * H + o] = acc[o];
  }
  Dev<float> dl(logits), db(bias), dx(x), dres(residual), dshared(shared), dw(A), dact(A * I), dy(A * H);
  Dev<int32_t> dids(A), dcount(rep_count), drep(rep_slot);
  std::vector<uint64_t> ptr_bits(P);
  for (int64_t s = 0; s < P; ++s) ptr_bits[s] = reinterpret_cast<uint64_t>(slot_ptr[s]);
  Dev<uint64_t> dptr(ptr_bits);
  const int64_t maxg = cuda::MoeMaxGroups(A, P);
  Dev<int32_t> dplan(cuda::MoePlanInts(maxg, A));
  const cuda::MoeSlotTable table = SlotTable(dcount, drep, max_reps, dptr, P);
  const cuda::MoePlan plan = cuda::MoePlanIn(dplan.p, maxg);
  ASSERT_TRUE(cuda::MoeRoutePlanSupported(N, E, k, P));
  ASSERT_EQ(cuda::MoeRoutePlan(dl.p, N, E, k, true, mc.deepseek ? db.p : nullptr, G, topk_group,
                               mc.deepseek ? 2.5f : 1.0f, table, dids.p, dw.p, plan, nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::MoeGateUp(dx.p, H, I, k, table, plan, maxg, dact.p, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::MoeDown(dact.p, H, I, table, plan, maxg, dy.p, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::MoeCombineAdd(dy.p, dw.p, N, k, H, dshared.p, dres.p, nullptr), cudaSuccess);
  EXPECT_EQ(dids.Host(), ref_ids);
  EXPECT_LT(RelErr(dw.Host(), ref_w), 1e-6);
  if (N == 1) {
    // One token: the one-assignment gate/up kernel gives the same activations.
    Dev<float> dact1(A * I);
    dact1.Poison();
    ASSERT_EQ(cuda::MoeGateUp(dx.p, H, I, k, table, plan, maxg, dact1.p, nullptr, true), cudaSuccess);
    EXPECT_LT(RelErr(dact1.Host(), dact.Host()), 1e-6) << "MoeGateUp one_token";
    // And the one-token down kernel (weights loaded before its wait) the same rows.
    Dev<float> dy1(A * H);
    dy1.Poison();
    ASSERT_EQ(cuda::MoeDown(dact.p, H, I, table, plan, maxg, dy1.p, nullptr, true), cudaSuccess);
    EXPECT_LT(RelErr(dy1.Host(), dy.Host()), 1e-6) << "MoeDown one_token";
    // Down and combine in one launch (no shared rows): x bit-equal to MoeDown + MoeCombineAdd,
    // Σ x² equal to rounding, both against the double reference.
    ASSERT_TRUE(cuda::MoeDownCombineSupported(H, I, k, maxg));
    Dev<float> dres_two(residual), dres_one(residual);
    Dev<double> dsq_two(std::vector<double>{0.0}), dsq_one(std::vector<double>{0.0});
    ASSERT_EQ(cuda::MoeCombineAdd(dy1.p, dw.p, N, k, H, nullptr, dres_two.p, nullptr, nullptr, 0, nullptr, nullptr,
                                  dsq_two.p),
              cudaSuccess);
    ASSERT_EQ(cuda::MoeDownCombine(dact.p, H, I, k, table, plan, maxg, dw.p, dres_one.p, dsq_one.p, nullptr),
              cudaSuccess);
    const std::vector<float> x_one = dres_one.Host();
    EXPECT_EQ(x_one, dres_two.Host()) << "MoeDownCombine";
    std::vector<float> ref_one(H);
    double sq_ref = 0;
    for (int64_t o = 0; o < H; ++o) {
      ref_one[o] = static_cast<float>(residual[o] + routed_ref[o]);
      sq_ref += static_cast<double>(x_one[o]) * x_one[o];
    }
    EXPECT_LT(RelErr(x_one, ref_one), 1e-5) << "MoeDownCombine against the double reference";
    EXPECT_NEAR(dsq_one.Host()[0], sq_ref, 1e-9 * sq_ref);
    EXPECT_NEAR(dsq_two.Host()[0], sq_ref, 1e-9 * sq_ref);
    EXPECT_FALSE(cuda::MoeDownCombineSupported(H, I, 9, maxg));
  }
  // The plan: every assignment once, in the group of the slot its replica rule picks.
  auto check_plan = [&](const std::vector<int32_t>& hp, const char* what) {
    const int32_t groups = hp[0];
    std::vector<int> seen(A, 0);
    int64_t covered = 0;
    for (int32_t g = 0; g < groups; ++g) {
      const int32_t slot = hp[4 + g], off = hp[4 + maxg + g], cnt = hp[4 + 2 * maxg + g];
      ASSERT_EQ(off, covered) << what;
      if (g > 0) {
        EXPECT_LT(hp[4 + g - 1], slot) << what;
      }
      for (int32_t i = 0; i < cnt; ++i) {
        const int32_t a = hp[4 + 3 * maxg + off + i];
        ASSERT_GE(a, 0) << what;
        ASSERT_LT(a, A) << what;
        ++seen[a];
        const int32_t e = ref_ids[a];
        EXPECT_EQ(slot, reps[e][(a / k) % reps[e].size()]) << what << ", assignment " << a;
      }
      covered += cnt;
    }
    EXPECT_EQ(covered, A) << what;
    for (int64_t a = 0; a < A; ++a) EXPECT_EQ(seen[a], 1) << what << ", assignment " << a;
  };
  check_plan(dplan.Host(), "MoeRoutePlan");
  {
    // The many-block routing (a warp per token) and one-block grouping: the same ids, weights
    // and a valid plan; outputs poisoned first.
    Dev<int32_t> dplan_w(std::vector<int32_t>(cuda::MoePlanInts(maxg, A), -7)), dids_w(std::vector<int32_t>(A, -1)),
        dslot(std::vector<int32_t>(A, -1));
    Dev<float> dw_w(std::vector<float>(A, NAN));
    const cuda::MoePlan pw = cuda::MoePlanIn(dplan_w.p, maxg);
    ASSERT_EQ(cuda::MoeRoutePlanWide(dl.p, N, E, k, true, mc.deepseek ? db.p : nullptr, G, topk_group,
                                     mc.deepseek ? 2.5f : 1.0f, table, dids_w.p, dw_w.p, pw, dslot.p, nullptr),
              cudaSuccess);
    EXPECT_EQ(dids_w.Host(), ref_ids) << "MoeRoutePlanWide";
    EXPECT_EQ(dw_w.Host(), dw.Host()) << "MoeRoutePlanWide weights equal MoeRoutePlan's";
    check_plan(dplan_w.Host(), "MoeRoutePlanWide");
  }
  // The one-launch router (GEMV + route + plan in its last block) against GemvF32 +
  // MoeRoutePlan, the combine's fused next-layer norm against the CPU RmsNorm.
  {
    auto router = Random(E * H, 56, 0.1f), nw = Random(H, 57);
    Dev<float> drouter(router), dnw(nw), dlog1(N * E), dlog2(N * E), dw2(A), dhf1(N * H), dhf2(N * H);
    Dev<int32_t> dids2(A), dplan2(cuda::MoePlanInts(maxg, A));
    Dev<unsigned> counter(std::vector<unsigned>{0u});
    const cuda::MoePlan plan2 = cuda::MoePlanIn(dplan2.p, maxg);
    cuda::GemvSegments sg;
    sg.seg[0] = {drouter.p, dlog1.p, nullptr, E};
    sg.count = 1;
    const bool fuse_norm = cuda::GemvNormFusable(N, H);
    ASSERT_EQ(cuda::GemvF32(sg, H, dx.p, H, N, false, nullptr, fuse_norm ? dnw.p : nullptr, 1e-6f, dhf1.p), cudaSuccess);
    ASSERT_EQ(cuda::MoeRoutePlan(dlog1.p, N, E, k, true, mc.deepseek ? db.p : nullptr, G, topk_group,
                                 mc.deepseek ? 2.5f : 1.0f, table, dids.p, dw.p, plan, nullptr),
              cudaSuccess);
    ASSERT_TRUE(cuda::RouterPlanSupported(N, E, k, P, H, fuse_norm));
    for (int rep = 0; rep < 2; ++rep)  // twice: the counter must be back to 0
      ASSERT_EQ(cuda::RouterPlan(drouter.p, H, dx.p, N, fuse_norm ? dnw.p : nullptr, 1e-6f, dhf2.p, dlog2.p, counter.p,
                                 E, k, true, mc.deepseek ? db.p : nullptr, G, topk_group, mc.deepseek ? 2.5f : 1.0f,
                                 table, dids2.p, dw2.p, plan2, nullptr),
                cudaSuccess);
    EXPECT_EQ(dlog1.Host(), dlog2.Host());
    EXPECT_EQ(dids.Host(), dids2.Host());
    if (fuse_norm) {
      // With Σ x² given per row (norm_sums): the same routing, logits and normed rows to rounding.
      std::vector<double> sums(N, 0.0);
      for (int64_t t = 0; t < N; ++t)
        for (int64_t i = 0; i < H; ++i) sums[t] += static_cast<double>(x[t * H + i]) * x[t * H + i];
      Dev<double> dsums(sums);
      Dev<float> dlog3(std::vector<float>(N * E, NAN)), dw3(A), dhf3(std::vector<float>(N * H, NAN));
      Dev<int32_t> dids3(A), dplan3(cuda::MoePlanInts(maxg, A));
      const cuda::MoePlan plan3 = cuda::MoePlanIn(dplan3.p, maxg);
      ASSERT_EQ(cuda::RouterPlan(drouter.p, H, dx.p, N, dnw.p, 1e-6f, dhf3.p, dlog3.p, counter.p, E, k, true,
                                 mc.deepseek ? db.p : nullptr, G, topk_group, mc.deepseek ? 2.5f : 1.0f, table,
                                 dids3.p, dw3.p, plan3, nullptr, dsums.p),
                cudaSuccess);
      EXPECT_LT(RelErr(dlog3.Host(), dlog1.Host()), 1e-6);
      EXPECT_LT(RelErr(dhf3.Host(), dhf1.Host()), 1e-6);
      EXPECT_EQ(dids3.Host(), dids.Host());
      EXPECT_LT(RelErr(dw3.Host(), dw.Host()), 1e-6);
      EXPECT_EQ(counter.Host()[0], 0u);
      auto p1 = dplan.Host(), p3 = dplan3.Host();
      ASSERT_EQ(p1[0], p3[0]);
      for (int32_t g = 0; g < p1[0]; ++g) EXPECT_EQ(p1[4 + g], p3[4 + g]) << ", group " << g;
    }
    EXPECT_EQ(dw.Host(), dw2.Host());
    if (fuse_norm) {
      EXPECT_EQ(dhf1.Host(), dhf2.Host());
    }
    auto p1 = dplan.Host(), p2 = dplan2.Host();
    ASSERT_EQ(p1[0], p2[0]);
    for (int32_t a = 0; a < 3; ++a)  // slot, offset and count of every group
      for (int32_t g = 0; g < p1[0]; ++g) EXPECT_EQ(p1[4 + a * maxg + g], p2[4 + a * maxg + g]) << a << ", group " << g;
    EXPECT_EQ(counter.Host()[0], 0u);

    auto base = Random(N * H, 58);
    Dev<float> dbase(base), dnorm(N * H);
    ASSERT_EQ(cuda::MoeCombineAdd(dy.p, dw.p, N, k, H, nullptr, dbase.p, nullptr, dnw.p, 1e-6f, dnorm.p, counter.p),
              cudaSuccess);
    auto after = dbase.Host();
    std::vector<float> ref_norm(N * H);
    for (int64_t t = 0; t < N; ++t) cpu::RmsNorm(after.data() + t * H, nw.data(), 1, H, 1e-6f, ref_norm.data() + t * H);
    EXPECT_LT(RelErr(dnorm.Host(), ref_norm), 1e-6);
    EXPECT_EQ(counter.Host()[0], 0u);
  }
  const double err = RelErr(dres.Host(), ref);
  std::printf("fused MoE N=%ld E=%ld k=%ld %s: %d groups, rel err %.3g\n", static_cast<long>(N), static_cast<long>(E),
              static_cast<long>(k), mc.deepseek ? "deepseek" : "softmax", dplan.Host()[0], err);
  EXPECT_LT(err, 1e-5);
}
INSTANTIATE_TEST_SUITE_P(Shapes, CudaFusedMoe,
                         ::testing::Values(MoeCase{1, 16, 1, false}, MoeCase{1, 64, 8, false}, MoeCase{7, 8, 2, false},
                                           MoeCase{7, 16, 4, true}, MoeCase{64, 64, 8, false},
                                           MoeCase{64, 16, 3, true}, MoeCase{64, 8, 8, false}));

// A batch of sequences of different lengths: q/k norm + RoPE + cache writes, then attention
// of every token against its own sequence's cache in one launch.
class CudaBatchedAttention : public ::testing::TestWithParam<int64_t> {};  // tokens

TEST_P(CudaBatchedAttention, MatchesCpu) {
  REQUIRE_GPU();
  const int64_t N = GetParam(), nh = 4, nkv = 2, dk = 64, dv = 64, rope_dim = 64, cap = 80;
  const float scale = 0.125f, eps = 1e-6f, factor = 1.0f;
  for (int64_t window : {int64_t{0}, int64_t{5}}) {
    auto q = Random(N * nh * dk, 60), k = Random(N * nkv * dk, 61), v = Random(N * nkv * dv, 62);
    auto qn = Random(dk, 63), kn = Random(dk, 64);
    std::vector<float> inv(rope_dim / 2);
    for (int64_t i = 0; i < rope_dim / 2; ++i) inv[i] = 1.0f / std::pow(10000.0f, 2.0f * i / rope_dim);
    // Token t belongs to sequence t % 3 (so batches share caches) at its own position.
    const int64_t S = std::min<int64_t>(N, 3);
    std::vector<std::vector<float>> kc(S, Random(cap * nkv * dk, 65)), vc(S, Random(cap * nkv * dv, 66));
    std::vector<int32_t> pos(N);
    std::vector<int64_t> next(S);
    for (int64_t s = 0; s < S; ++s) next[s] = 3 + 17 * s;
    for (int64_t t = 0; t < N; ++t) pos[t] = static_cast<int32_t>(next[t % S]++);
    // CPU: norm + rope of q and k, cache writes, then attention per token.
    auto rope = [&](float* vec, int64_t p) {
      std::vector<float> c(rope_dim / 2), sn(rope_dim / 2);
      for (int64_t i = 0; i < rope_dim / 2; ++i) {
        double a = static_cast<double>(p) * static_cast<double>(inv[i]);
        c[i] = static_cast<float>(std::cos(a)) * factor;
        sn[i] = static_cast<float>(std::sin(a)) * factor;
      }
      cpu::RopeRotateHalf(vec, rope_dim, c.data(), sn.data());
    };
    auto rq = q;
    auto rkc = kc;
    auto rvc = vc;
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t h = 0; h < nh; ++h) {
        float* vec = rq.data() + (t * nh + h) * dk;
        cpu::RmsNorm(vec, qn.data(), 1, dk, eps, vec);
        rope(vec, pos[t]);
      }
      for (int64_t h = 0; h < nkv; ++h) {
        std::vector<float> kv(k.begin() + (t * nkv + h) * dk, k.begin() + (t * nkv + h + 1) * dk);
        cpu::RmsNorm(kv.data(), kn.data(), 1, dk, eps, kv.data());
        rope(kv.data(), pos[t]);
        std::copy(kv.begin(), kv.end(), rkc[t % S].begin() + (pos[t] * nkv + h) * dk);
        std::copy(v.begin() + (t * nkv + h) * dv, v.begin() + (t * nkv + h + 1) * dv,
                  rvc[t % S].begin() + (pos[t] * nkv + h) * dv);
      }
    }
    std::vector<float> ref(N * nh * dv), scratch(cap);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t h = 0; h < nh; ++h) {
        const int64_t p = pos[t], kvh = h / (nh / nkv);
        const int64_t first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        cpu::AttendOneHead(rq.data() + (t * nh + h) * dk, rkc[t % S].data() + (first * nkv + kvh) * dk, nkv * dk,
                           rvc[t % S].data() + (first * nkv + kvh) * dv, nkv * dv, p + 1 - first, dk, dv, scale,
                           scratch.data(), ref.data() + (t * nh + h) * dv);
      }
    Dev<float> dq(q), dk_(k), dv_(v), dqn(qn), dkn(kn), dinv(inv), dout(N * nh * dv);
    Dev<int32_t> dpos(pos);
    std::vector<std::unique_ptr<Dev<float>>> dkc, dvc;
    for (int64_t s = 0; s < S; ++s) {
      dkc.push_back(std::make_unique<Dev<float>>(kc[s]));
      dvc.push_back(std::make_unique<Dev<float>>(vc[s]));
    }
    std::vector<uint64_t> kp(N), vp(N);
    for (int64_t t = 0; t < N; ++t) {
      kp[t] = reinterpret_cast<uint64_t>(dkc[t % S]->p);
      vp[t] = reinterpret_cast<uint64_t>(dvc[t % S]->p);
    }
    Dev<uint64_t> dkp(kp), dvp(vp);
    auto kpp = reinterpret_cast<float* const*>(dkp.p);
    auto vpp = reinterpret_cast<float* const*>(dvp.p);
    // Tokens of one sequence write their cache rows before any attends: two launches.
    ASSERT_EQ(cuda::QkNormRopeKv(dq.p, dk_.p, dv_.p, N, nh, nkv, dk, dv, dqn.p, dkn.p, eps, 0, rope_dim, dpos.p, dinv.p,
                                 factor, false, kpp, vpp, nullptr),
              cudaSuccess);
    ASSERT_EQ(cuda::AttentionBatched(dq.p, kpp, vpp, dpos.p, N, nh, nkv, dk, dv, window, scale, dout.p, nullptr),
              cudaSuccess);
    EXPECT_LT(RelErr(dq.Host(), rq), 1e-5) << "q, window " << window;
    for (int64_t s = 0; s < S; ++s) EXPECT_LT(RelErr(dkc[s]->Host(), rkc[s]), 1e-5) << "k cache " << s;
    EXPECT_LT(RelErr(dout.Host(), ref), 1e-5) << "window " << window;
    // Decode (one token per sequence): the one-launch AttentionDecode against the above.
    if (N <= S) {
      Dev<float> dq2(q), dout2(N * nh * dv);
      std::vector<std::unique_ptr<Dev<float>>> dkc2, dvc2;
      std::vector<uint64_t> kp2(N), vp2(N);
      for (int64_t t = 0; t < N; ++t) {
        dkc2.push_back(std::make_unique<Dev<float>>(kc[t]));
        dvc2.push_back(std::make_unique<Dev<float>>(vc[t]));
        kp2[t] = reinterpret_cast<uint64_t>(dkc2.back()->p);
        vp2[t] = reinterpret_cast<uint64_t>(dvc2.back()->p);
      }
      Dev<uint64_t> dkp2(kp2), dvp2(vp2);
      ASSERT_EQ(cuda::AttentionDecode(dq2.p, dk_.p, dv_.p, N, nh, nkv, dk, dv, dqn.p, dkn.p, eps, 0, rope_dim, dpos.p,
                                      dinv.p, factor, false, reinterpret_cast<float* const*>(dkp2.p),
                                      reinterpret_cast<float* const*>(dvp2.p), window, scale, dout2.p, nullptr),
                cudaSuccess);
      EXPECT_LT(RelErr(dout2.Host(), ref), 1e-5) << "decode, window " << window;
      for (int64_t t = 0; t < N; ++t) {
        EXPECT_LT(RelErr(dkc2[t]->Host(), rkc[t]), 1e-5) << "decode k cache " << t;
        EXPECT_LT(RelErr(dvc2[t]->Host(), rvc[t]), 1e-6) << "decode v cache " << t;
      }
    }
  }
}
INSTANTIATE_TEST_SUITE_P(Tokens, CudaBatchedAttention, ::testing::Values(1, 3, 7, 64));

// The wide argmax against the one-block ArgmaxRows (lowest index on ties, NaN never wins).
TEST(CudaOps, ArgmaxRowsWideMatchesArgmaxRows) {
  REQUIRE_GPU();
  const int64_t rows = 5, cols = 151936;
  auto x = Random(rows * cols, 70);
  x[1 * cols + 7] = 50.0f;  // a tie at 7 and 90000: 7 wins
  x[1 * cols + 90000] = 50.0f;
  x[2 * cols + cols - 1] = 60.0f;  // the last column
  x[3 * cols + 3] = NAN;
  for (int64_t c = 0; c < cols; ++c) x[4 * cols + c] = -1.0f;  // all equal: 0 wins
  Dev<float> dx(x);
  Dev<int32_t> a(rows), b(rows);
  Dev<unsigned long long> scratch(rows + 1);  // keys, then the block counter
  ASSERT_EQ(cuda::ArgmaxRows(dx.p, rows, cols, a.p, nullptr), cudaSuccess);
  // Twice: the second run must not see the first one's keys or counter (zeroed again).
  for (int run = 0; run < 2; ++run)
    ASSERT_EQ(cuda::ArgmaxRowsWide(dx.p, rows, cols, scratch.p, b.p, nullptr), cudaSuccess);
  auto ha = a.Host(), hb = b.Host();
  EXPECT_EQ(ha, hb);
  EXPECT_EQ(hb[1], 7);
  EXPECT_EQ(hb[2], cols - 1);
  EXPECT_EQ(hb[4], 0);
  for (int64_t r = 0; r < rows; ++r) {  // the host's max_element, NaN skipped
    int64_t best = -1;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = x[static_cast<size_t>(r * cols + c)];
      if (!std::isnan(v) && (best < 0 || v > x[static_cast<size_t>(r * cols + best)])) best = c;
    }
    EXPECT_EQ(hb[static_cast<size_t>(r)], best) << "row " << r;
  }
  // Scratch the caller zeroed (as a captured decode step's embedding does): same result, no memset.
  Dev<int32_t> c2(rows);
  ASSERT_EQ(cudaMemset(scratch.p, 0, (rows + 1) * sizeof(unsigned long long)), cudaSuccess);
  ASSERT_EQ(cuda::ArgmaxRowsWide(dx.p, rows, cols, scratch.p, c2.p, nullptr, true), cudaSuccess);
  EXPECT_EQ(c2.Host(), hb);
}

// The GEMV with the RMSNorm of its input fused in (every block normalises and block 0 writes the
// normed rows; with Σ x² given, the norm rides on the dot products and each block writes a slice of
// the normed rows): against RmsNorm + dot on the CPU.
TEST(CudaOps, GemvWithFusedNorm) {
  REQUIRE_GPU();
  const int64_t in = 520, rows = 300;
  for (int64_t T : {int64_t{1}, int64_t{7}}) {
    ASSERT_TRUE(cuda::GemvNormFusable(T, in));
    auto x = Random(T * in, 80, 3.0f), nw = Random(in, 81);
    auto b = ToBf16(Random(rows * in, 82, 0.05f));
    auto wf = FromBf16(b);
    std::vector<float> normed(T * in), ref(T * rows);
    for (int64_t t = 0; t < T; ++t) cpu::RmsNorm(x.data() + t * in, nw.data(), 1, in, 1e-6f, normed.data() + t * in);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r) ref[t * rows + r] = static_cast<float>(Dot(wf.data() + r * in, normed.data() + t * in, in));
    Dev<float> dx(x), dnw(nw), dy(T * rows), dn(T * in);
    Dev<uint16_t> dw(b);
    cuda::GemvSegments sg;
    sg.seg[0] = {dw.p, dy.p, nullptr, rows};
    sg.count = 1;
    ASSERT_EQ(cuda::Gemv(sg, in, dx.p, in, T, false, nullptr, dnw.p, 1e-6f, dn.p), cudaSuccess);
    EXPECT_LT(RelErr(dy.Host(), ref), 1e-5) << T << " tokens";
    EXPECT_LT(RelErr(dn.Host(), normed), 1e-6) << T << " tokens";
    // The same with Σ x² given per row (norm_sums: no reduction in the blocks), split rows too
    // (a 40-row segment takes the 8-warps-per-row path), outputs poisoned first.
    std::vector<double> sums(T, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < in; ++i) sums[t] += static_cast<double>(x[t * in + i]) * x[t * in + i];
    Dev<double> dsums(sums);
    // Without norm_out the norm weight rides on the dot products (no shared-memory pass).
    for (int64_t seg_rows : {rows, int64_t{40}})
      for (bool want_norm : {true, false}) {
      Dev<float> dy2(std::vector<float>(T * seg_rows, NAN)), dn2(std::vector<float>(T * in, NAN));
      sg.seg[0] = {dw.p, dy2.p, nullptr, seg_rows};
      ASSERT_EQ(cuda::Gemv(sg, in, dx.p, in, T, false, nullptr, dnw.p, 1e-6f, want_norm ? dn2.p : nullptr, dsums.p),
                cudaSuccess);
      std::vector<float> ref2(T * seg_rows);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t r = 0; r < seg_rows; ++r) ref2[t * seg_rows + r] = ref[t * rows + r];
      auto y2 = dy2.Host();
      for (float v : y2) ASSERT_TRUE(std::isfinite(v));
      EXPECT_LT(RelErr(y2, ref2), 1e-5) << T << " tokens, norm_sums, " << seg_rows << " rows, normed rows "
                                         << want_norm;
      if (want_norm) {
        EXPECT_LT(RelErr(dn2.Host(), normed), 1e-6) << T << " tokens, norm_sums";
      }
      }
  }
}

// sums_out of the accumulating GEMV (both row paths), Embed and the MoE combine: Σ of the
// squares of the rows each wrote, against the host in double.
TEST(CudaOps, NormSumsOfResidualWriters) {
  REQUIRE_GPU();
  auto host_sums = [](const std::vector<float>& v, int64_t T, int64_t dim) {
    std::vector<double> s(T, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < dim; ++i) s[t] += static_cast<double>(v[t * dim + i]) * v[t * dim + i];
    return s;
  };
  auto expect_close = [](const std::vector<double>& got, const std::vector<double>& ref, const char* what) {
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-9 * ref[i]) << what << " row " << i;
  };
  // 2004 rows: a warp per row, the last block part empty; 30 rows of 2048: 8 warps per row.
  // (2004 rows also with two rows per warp.)
  for (int rows_per_warp : {1, 2})
  for (int64_t T : {int64_t{1}, int64_t{5}}) {
    cuda::SetGemvRowsPerWarp(rows_per_warp);
    for (auto [rows, in] : {std::pair<int64_t, int64_t>{2004, 264}, std::pair<int64_t, int64_t>{30, 2048}}) {
      auto x = Random(T * in, 90, 1.0f), res = Random(T * rows, 91, 2.0f);
      auto b = ToBf16(Random(rows * in, 92, 0.05f));
      Dev<float> dx(x), dy(res);
      Dev<uint16_t> dw(b);
      Dev<double> dsum(std::vector<double>(T, 0.0));
      cuda::GemvSegments sg;
      sg.seg[0] = {dw.p, dy.p, nullptr, rows};
      sg.count = 1;
      ASSERT_EQ(cuda::Gemv(sg, in, dx.p, in, T, true, nullptr, nullptr, 0, nullptr, nullptr, dsum.p), cudaSuccess);
      expect_close(dsum.Host(), host_sums(dy.Host(), T, rows), "gemv");
    }
  }
  cuda::SetGemvRowsPerWarp(0);
  {
    const int64_t V = 40, H = 72;
    auto table = ToBf16(Random(V * H, 93));
    std::vector<int32_t> ids = {3, 39, 3};
    Dev<uint16_t> dt(table);
    Dev<int32_t> di(ids);
    Dev<float> dx(ids.size() * H);
    Dev<double> dsum(std::vector<double>(ids.size(), -1.0));
    ASSERT_EQ(cuda::Embed(dt.p, di.p, 3, H, dx.p, nullptr, dsum.p), cudaSuccess);
    expect_close(dsum.Host(), host_sums(dx.Host(), 3, H), "embed");
  }
  {
    const int64_t N = 3, k = 4, H = 600;
    auto y = Random(N * k * H, 94), w = Random(N * k, 95), xr = Random(N * H, 96), sh = Random(N * H, 97);
    Dev<float> dy(y), dw(w), dx(xr), dsh(sh);
    Dev<double> dsum(std::vector<double>(N, 0.0));
    ASSERT_EQ(cuda::MoeCombineAdd(dy.p, dw.p, N, k, H, dsh.p, dx.p, nullptr, nullptr, 0, nullptr, nullptr, dsum.p),
              cudaSuccess);
    auto after = dx.Host();
    std::vector<float> ref = xr;
    for (int64_t t = 0; t < N; ++t)
      for (int64_t i = 0; i < H; ++i) {
        float acc = 0;
        for (int64_t j = 0; j < k; ++j) acc += w[t * k + j] * y[(t * k + j) * H + i];
        ref[t * H + i] += acc + sh[t * H + i];
      }
    EXPECT_LT(RelErr(after, ref), 1e-6);
    expect_close(dsum.Host(), host_sums(after, N, H), "combine");
  }
}

#endif  // EEP_WITH_CUDA

}  // namespace
}  // namespace eep
