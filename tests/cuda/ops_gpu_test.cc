// Every CUDA op against the CPU reference (src/kernels/cpu/ops.h) on random inputs. The bound
// of each is stated next to it as max|gpu - cpu| / max(1, max|cpu|):
//   exact copies (Embed, GatherRows, MlaExpandKv) 0; element-wise f32 math (RmsNorm, SiluMul,
//   Add, Rope, MoeCombine) 1e-5; Attention 1e-5; router ids equal and weights 1e-6;
//   BF16 GEMM with split activations 5e-5, with plain BF16 activations 1e-2.
// Skips (GTEST_SKIP) when there is no GPU or eep was built without CUDA.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
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

std::vector<float> Random(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) {
    EXPECT_EQ(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> Host() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

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

#endif  // EEP_WITH_CUDA

}  // namespace
}  // namespace eep
