// AttentionDecodeGqa (attention_gqa.h): decode attention with one block per (token, KV head).
//
// Block (token t, kv head g), a warp per q head of the group (group = nh / nkv <= 16; at least
// kMinWarps warps, the extra ones only help with the loads):
//  1. before waiting for the producer of q/k/v (PDL): the RoPE (cos, sin)·factor of pos in
//     shared memory (positions and inv_freq are not written by the previous kernel);
//  2. after the wait: the first tiles of cached K/V rows [first, pos) start loading into shared
//     memory (16-byte cp.async, kTile keys per tile, nbuf = 1 or 2 buffers), then warp w norms
//     and ropes q head g·group + w into shared memory while the last warp norms and ropes the
//     new k (and copies the new v) once for the whole group; the block writes them to row pos;
//  3. every warp starts its online softmax with the new key (max = its score, sum = 1, acc = v)
//     and goes through the tiles: lane r scores key r of the tile (a dot product over dk from
//     shared memory, q broadcast), one warp max and one warp sum per tile, then each lane adds
//     Σ_j p_j·V[j] for its dims 4·lane + 128·c (float4 reads of V rows, p_j by shuffle);
//  4. out = acc / sum.
// Each K/V row is read from global once per group instead of once per q head.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "kernels/cuda/attention_gqa.h"
#include "kernels/cuda/head_ops.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.h"

namespace eep::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxDim = static_cast<int>(kMaxBatchedHeadDim);  // 256
constexpr int kMaxGroup = 16;
constexpr int kMinWarps = 4;
constexpr int kTile = kWarp;                     // keys per tile: one per lane when scoring
constexpr int kPer = kMaxDim / kWarp;            // head values per lane (norm, rope)
constexpr int kVChunks = kMaxDim / (4 * kWarp);  // float4 output chunks per lane
constexpr int kKPad = 4;                         // K row stride dk + 4: conflict-free float4 reads

struct GqaRope {
  const float* q_norm;
  const float* k_norm;
  float eps;
  int offset, rope_dim;
  const float* inv_freq;
  float factor;
  bool interleaved;
};

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ void CpAsync16(float* smem, const float* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One head row [n] from global into registers (lane holds values lane + 32·j).
__device__ __forceinline__ void LoadHead(const float* src, int n, float (&v)[kPer]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = lane + j * kWarp;
    v[j] = i < n ? src[i] : 0.0f;
  }
}


// Grid n·nkv blocks of max(group, kMinWarps) warps; dynamic shared memory (floats):
// K tiles [nbuf][kTile][dk + kKPad], V tiles [nbuf][kTile][dv], q heads [group][dk], new k [dk],
// new v [dv].
__global__ void __launch_bounds__(kMaxGroup* kWarp)
    AttentionDecodeGqaKernel(const float* __restrict__ q, const float* __restrict__ k_new,
                             const float* __restrict__ v_new, const int32_t* __restrict__ positions,
                             int nh, int nkv, int group, int dk, int dv, GqaRope qr,
                             float* const* k_cache, float* const* v_cache, int64_t window,
                             float scale, float* __restrict__ out, int nbuf) {
  PdlTriggerDependents();
  extern __shared__ float4 gqa_smem4[];
  __shared__ float2 rope_cs[kMaxDim / 2];
  const int t = blockIdx.x / nkv, kvh = blockIdx.x % nkv;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  const int64_t pos = positions[t];
  // The RoPE angles (double, as NormRopeHead) before waiting for the q/k/v producer.
  for (int i = threadIdx.x; i < qr.rope_dim / 2; i += blockDim.x) {
    double sn, c;
    sincos(static_cast<double>(pos) * static_cast<double>(qr.inv_freq[i]), &sn, &c);
    rope_cs[i] = make_float2(static_cast<float>(c) * qr.factor, static_cast<float>(sn) * qr.factor);
  }
  __syncthreads();
  PdlWaitPrerequisites();

  float* smem = reinterpret_cast<float*>(gqa_smem4);
  const int ks = dk + kKPad;
  float* kbuf = smem;                      // [nbuf][kTile][ks]
  float* vbuf = kbuf + nbuf * kTile * ks;  // [nbuf][kTile][dv]
  float* qs = vbuf + nbuf * kTile * dv;    // [group][dk]
  float* kcur = qs + group * dk;           // [dk]
  float* vcur = kcur + dk;                 // [dv]
  float* kc = k_cache[t];
  float* vc = v_cache[t];
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  const int ntiles = static_cast<int>((pos - first + kTile - 1) / kTile);
  const bool vec = ((reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc)) & 15) == 0;

  // Tile `tile` (keys first + kTile·tile ..) into buffer `buf`, one commit group.
  auto issue = [&](int tile, int buf) {
    const int64_t j0 = first + static_cast<int64_t>(tile) * kTile;
    const int cnt = static_cast<int>(min(static_cast<int64_t>(kTile), pos - j0));
    // cnt rows of `dim` values of this KV head from cache into dst (rows dst_stride apart).
    auto rows = [&](const float* cache, int dim, float* dst_base, int dst_stride) {
      const int dim4 = dim / 4;
      for (int idx = threadIdx.x; idx < cnt * dim4; idx += blockDim.x) {
        const int r = idx / dim4, c = idx - r * dim4;
        const float* src = cache + ((j0 + r) * nkv + kvh) * dim + 4 * c;
        float* dst = dst_base + r * dst_stride + 4 * c;
        if (vec) {
          CpAsync16(dst, src);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[e] = src[e];
        }
      }
    };
    rows(kc, dk, kbuf + buf * kTile * ks, ks);
    rows(vc, dv, vbuf + buf * kTile * dv, dv);
    CpAsyncCommit();
  };
  for (int b = 0; b < nbuf && b < ntiles; ++b) issue(b, b);

  // q heads (one per warp) and the group's new k / v (the last warp), loads in flight together.
  const int kw = nwarps - 1;
  const int h = kvh * group + warp;
  {
    float qv[kPer] = {}, kv[kPer] = {}, vv[kPer] = {};
    if (warp < group) LoadHead(q + (static_cast<int64_t>(t) * nh + h) * dk, dk, qv);
    if (warp == kw) {
      LoadHead(k_new + (static_cast<int64_t>(t) * nkv + kvh) * dk, dk, kv);
      LoadHead(v_new + (static_cast<int64_t>(t) * nkv + kvh) * dv, dv, vv);
    }
    if (warp < group)
      head::NormRopeRegs(qv, qs + warp * dk, dk, qr.q_norm, qr.eps, qr.offset, qr.rope_dim, rope_cs,
                   qr.interleaved);
    if (warp == kw) {
      head::NormRopeRegs(kv, kcur, dk, qr.k_norm, qr.eps, qr.offset, qr.rope_dim, rope_cs,
                   qr.interleaved);
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (lane + j * kWarp < dv) vcur[lane + j * kWarp] = vv[j];
    }
  }
  __syncthreads();
  {
    // Row pos of the cache (the tiles read rows before it).
    float* kd = kc + (pos * nkv + kvh) * dk;
    float* vd = vc + (pos * nkv + kvh) * dv;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) kd[i] = kcur[i];
    for (int i = threadIdx.x; i < dv; i += blockDim.x) vd[i] = vcur[i];
  }

  // Online softmax, starting from the new key.
  const bool active = warp < group;
  const float* qw = qs + (active ? warp : 0) * dk;
  float m = 0, l = 1;
  float4 acc[kVChunks];
  {
    float d = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j)
      if (lane + j * kWarp < dk) d += qw[lane + j * kWarp] * kcur[lane + j * kWarp];
    m = WarpSum(d) * scale;
#pragma unroll
    for (int c = 0; c < kVChunks; ++c) {
      const int dim = 4 * lane + 4 * kWarp * c;
      acc[c] = dim < dv ? *reinterpret_cast<const float4*>(vcur + dim) : make_float4(0, 0, 0, 0);
    }
  }
  const float4* q4 = reinterpret_cast<const float4*>(qw);
  const int dk4 = dk / 4;
  for (int it = 0; it < ntiles; ++it) {
    if (nbuf == 2 && it + 1 < ntiles)
      CpAsyncWait<1>();
    else
      CpAsyncWait<0>();
    __syncthreads();
    if (active) {
      const int b = it % nbuf;
      const float* kb = kbuf + b * kTile * ks;
      const float* vb = vbuf + b * kTile * dv;
      const int cnt = static_cast<int>(
          min(static_cast<int64_t>(kTile), pos - first - static_cast<int64_t>(it) * kTile));
      float s = -INFINITY;
      if (lane < cnt) {
        const float4* kr = reinterpret_cast<const float4*>(kb + lane * ks);
        float d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma unroll 8
        for (int c = 0; c < dk4; ++c) {
          const float4 a = q4[c], x = kr[c];
          d0 += a.x * x.x;
          d1 += a.y * x.y;
          d2 += a.z * x.z;
          d3 += a.w * x.w;
        }
        s = ((d0 + d1) + (d2 + d3)) * scale;
      }
      const float mn = fmaxf(m, WarpMax(s));
      const float corr = expf(m - mn);
      const float p = lane < cnt ? expf(s - mn) : 0.0f;
      l = l * corr + WarpSum(p);
#pragma unroll
      for (int c = 0; c < kVChunks; ++c) {
        acc[c].x *= corr;
        acc[c].y *= corr;
        acc[c].z *= corr;
        acc[c].w *= corr;
      }
#pragma unroll 4
      for (int j = 0; j < cnt; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int c = 0; c < kVChunks; ++c) {
          const int dim = 4 * lane + 4 * kWarp * c;
          if (dim < dv) {
            const float4 x = *reinterpret_cast<const float4*>(vb + j * dv + dim);
            acc[c].x += pj * x.x;
            acc[c].y += pj * x.y;
            acc[c].z += pj * x.z;
            acc[c].w += pj * x.w;
          }
        }
      }
      m = mn;
    }
    if (it + nbuf < ntiles) {
      __syncthreads();  // every warp is done with buffer it % nbuf
      issue(it + nbuf, it % nbuf);
    }
  }
  if (!active) return;
  const float inv = 1.0f / l;
  float* o = out + (static_cast<int64_t>(t) * nh + h) * dv;
#pragma unroll
  for (int c = 0; c < kVChunks; ++c) {
    const int dim = 4 * lane + 4 * kWarp * c;
    if (dim < dv) {
      o[dim] = acc[c].x * inv;
      o[dim + 1] = acc[c].y * inv;
      o[dim + 2] = acc[c].z * inv;
      o[dim + 3] = acc[c].w * inv;
    }
  }
}

// Tile buffers: 2 (the next tile loads while this one is used) while the grid fits in about one
// wave of 3 blocks per SM, else 1 (twice the blocks per SM hide each other's loads).
// EEP_CUDA_GQA_BUFS=1|2 forces it.
int GqaBuffers(int64_t blocks) {
  static const int forced = [] {
    const char* v = std::getenv("EEP_CUDA_GQA_BUFS");
    return v == nullptr ? 0 : std::atoi(v);
  }();
  if (forced == 1 || forced == 2) return forced;
  const int sms = SmCount();
  return sms > 0 && blocks <= 3 * static_cast<int64_t>(sms) ? 2 : 1;
}

}  // namespace

bool AttentionDecodeGqaSupported(int64_t nh, int64_t nkv, int64_t dk, int64_t dv) {
  return nkv > 0 && nh > 0 && nh % nkv == 0 && nh / nkv <= kMaxGroup && dk > 0 && dv > 0 &&
         dk <= kMaxDim && dv <= kMaxDim && dk % 4 == 0 && dv % 4 == 0;
}

cudaError_t AttentionDecodeGqa(const float* q, const float* k, const float* v, int64_t n,
                               int64_t nh, int64_t nkv, int64_t dk, int64_t dv, const float* q_norm,
                               const float* k_norm, float eps, int64_t off, int64_t rope_dim,
                               const int32_t* positions, const float* inv_freq, float factor,
                               bool interleaved, float* const* k_cache, float* const* v_cache,
                               int64_t window, float scale, float* out, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  if (!AttentionDecodeGqaSupported(nh, nkv, dk, dv) || off < 0 || rope_dim < 0 ||
      off + rope_dim > dk || rope_dim % 2 != 0 || n * nkv > INT32_MAX)
    return cudaErrorInvalidValue;
  const int64_t group = nh / nkv, blocks = n * nkv;
  const int warps = static_cast<int>(std::max<int64_t>(group, kMinWarps));
  const int nbuf = GqaBuffers(blocks);
  const size_t smem =
      static_cast<size_t>(nbuf * kTile * (dk + kKPad + dv) + group * dk + dk + dv) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(AttentionDecodeGqaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const GqaRope qr{q_norm,   k_norm, eps,        static_cast<int>(off), static_cast<int>(rope_dim),
                   inv_freq, factor, interleaved};
  return LaunchPdl(AttentionDecodeGqaKernel, dim3(static_cast<unsigned>(blocks)),
                   dim3(warps * kWarp), smem, st, q, k, v, positions, static_cast<int>(nh),
                   static_cast<int>(nkv), static_cast<int>(group), static_cast<int>(dk),
                   static_cast<int>(dv), qr, k_cache, v_cache, window, scale, out, nbuf);
}

}  // namespace eep::cuda
