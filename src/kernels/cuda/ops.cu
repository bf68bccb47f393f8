// CUDA kernels; see ops.h for the contract of each. The element-wise ones are kept plain (one
// block per row or per (token, head)). For few tokens per step the weight-streaming work is
// here too (GEMV, grouped expert GEMV through slot pointers): a warp per output row, 16-byte
// streaming loads, several in flight per lane; larger steps use cuBLAS from cuda_model.cc.
// Kernels of the decode path are launched with programmatic dependent launch (Launch below).
#include "kernels/cuda/ops.h"
#include "kernels/cuda/head_ops.cuh"
#include "kernels/cuda/pdl.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace eep::cuda {
namespace {

constexpr int kWarp = 32;

// A measurement switch that is on unless the environment sets it to 0 (callers read it once).
bool EnvSwitchOn(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::atoi(v) != 0;
}

// Programmatic dependent launch (kernels/cuda/pdl.h): kernels launched by Launch() below may
// start while the previous kernel of the stream finishes; each lets its successor start early
// (PdlTrigger, once all its blocks run) and waits for its predecessor's results (PdlWait)
// before reading anything a previous kernel wrote. Static weights may be touched before.
__device__ __forceinline__ void PdlTrigger() { PdlTriggerDependents(); }
__device__ __forceinline__ void PdlWait() { PdlWaitPrerequisites(); }

__device__ __forceinline__ float Bf16ToF32(bf16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }

__device__ __forceinline__ bf16_t F32ToBf16(float f) {
  __nv_bfloat16 b = __float2bfloat16_rn(f);
  return *reinterpret_cast<bf16_t*>(&b);
}

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; `shared` holds one value per warp. Every thread gets the result.
template <typename T>
__device__ T BlockSum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = (blockDim.x + kWarp - 1) / kWarp;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

__device__ float BlockMax(float v, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = (blockDim.x + kWarp - 1) / kWarp;
  v = WarpMax(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, shared[w]);
  return m;
}

__global__ void EmbedKernel(const bf16_t* table, const int32_t* ids, int64_t dim, float* x, double* sums,
                            const int32_t* prev_ids, double* zero, int64_t zero_count) {
  EEP_PDL_TRACE_END;
  __shared__ double partial[32];
  PdlWait();
  const int64_t t = blockIdx.x;
  int32_t id = ids[t];
  if (id < 0) id = prev_ids[-1 - id];
  const bf16_t* row = table + static_cast<int64_t>(id) * dim;
  for (int64_t i = t * blockDim.x + threadIdx.x; i < zero_count; i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    zero[i] = 0;
  double sum = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = Bf16ToF32(row[i]);
    x[t * dim + i] = v;
    sum += static_cast<double>(v) * v;
  }
  // The successor (the first q/k/v GEMV) starts only now: with EEP_CUDA_GEMV_PREFETCH its weight
  // prefetch would otherwise queue this kernel's row loads behind tens of MB (H100, batch 1: the
  // embedding took ~7 us).
  PdlTrigger();
  if (sums == nullptr) return;
  sum = BlockSum(sum, partial);
  if (threadIdx.x == 0) sums[t] = sum;
}

__global__ void RmsNormKernel(const float* x, int64_t x_stride, const float* w, int64_t rows, int64_t dim,
                              float eps, float* y, int64_t y_stride, bf16_t* y16, int splits) {
  PdlTrigger();
  PdlWait();
  __shared__ double partial[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * x_stride;
  double sum = 0;  // double, like the CPU reference
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<double>(xr[i]) * xr[i];
  sum = BlockSum(sum, partial);
  const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(dim) + eps));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = w[i] * (xr[i] * inv);
    if (y16) {
      const bf16_t hi = F32ToBf16(v);
      y16[r * dim + i] = hi;
      if (splits == 2) y16[(rows + r) * dim + i] = F32ToBf16(v - Bf16ToF32(hi));
    }
    // After the BF16 writes: y may alias x, and this thread is the only reader of x[i].
    if (y) y[r * y_stride + i] = v;
  }
}

__global__ void SplitKernel(const float* x, int64_t rows, int64_t dim, int splits, bf16_t* out) {
  const int64_t n = rows * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[i];
    const bf16_t hi = F32ToBf16(v);
    out[i] = hi;
    if (splits == 2) out[n + i] = F32ToBf16(v - Bf16ToF32(hi));
  }
}

__global__ void SumSplitsKernel(const float* in, int64_t rows, int64_t cols, int splits, const float* bias,
                                float* y) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = in[i];
    if (splits == 2) v += in[n + i];
    if (bias) v += bias[i % cols];
    y[i] = v;
  }
}

__global__ void AddKernel(float* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

__global__ void SiluMulKernel(const float* gu, int64_t rows, int64_t inter, int splits, float* out,
                              bf16_t* out16) {
  PdlTrigger();
  PdlWait();
  const int64_t n = rows * inter;
  const int64_t split_stride = rows * 2 * inter;  // the lo rows follow the hi rows
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, c = i % inter;
    float g = gu[r * 2 * inter + c], u = gu[r * 2 * inter + inter + c];
    if (splits == 2) {
      g += gu[split_stride + r * 2 * inter + c];
      u += gu[split_stride + r * 2 * inter + inter + c];
    }
    const float v = g / (1.0f + expf(-g)) * u;
    if (out) out[i] = v;
    if (out16) {
      const bf16_t hi = F32ToBf16(v);
      out16[i] = hi;
      if (splits == 2) out16[n + i] = F32ToBf16(v - Bf16ToF32(hi));
    }
  }
}

__global__ void RopeKernel(float* x, int64_t heads, int64_t token_stride, int64_t head_stride, int64_t offset,
                           int64_t rope_dim, const int32_t* positions, const float* inv_freq, float factor,
                           bool interleaved) {
  const int64_t t = blockIdx.x, h = blockIdx.y, half = rope_dim / 2;
  float* v = x + t * token_stride + h * head_stride + offset;
  const double pos = static_cast<double>(positions[t]);
  float y0 = 0, y1 = 0;
  const int64_t i = threadIdx.x;
  if (i < half) {
    const double angle = pos * static_cast<double>(inv_freq[i]);
    const float c = static_cast<float>(cos(angle)) * factor, s = static_cast<float>(sin(angle)) * factor;
    const float a = interleaved ? v[2 * i] : v[i];
    const float b = interleaved ? v[2 * i + 1] : v[i + half];
    y0 = a * c - b * s;
    y1 = b * c + a * s;
  }
  __syncthreads();  // interleaved reads and de-interleaved writes overlap across threads
  if (i < half) {
    v[i] = y0;
    v[i + half] = y1;
  }
}

// One block per (token, head): scores in shared memory, a warp per key for the dot products
// (lanes over dk, coalesced), threads over dv for the weighted sum.
__global__ void AttentionKernel(const float* q, const float* kc, const float* vc, int64_t start, int64_t nh,
                                int64_t nkv, int64_t dk, int64_t dv, int64_t window, float scale, float* out) {
  extern __shared__ float smem[];
  __shared__ float red[32];
  const int64_t t = blockIdx.x / nh, h = blockIdx.x % nh, pos = start + t;
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  const int64_t n = pos + 1 - first, kvh = h / (nh / nkv);
  float* qs = smem;
  float* s = smem + dk;
  const float* qt = q + (t * nh + h) * dk;
  for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) qs[i] = qt[i];
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int64_t j = warp; j < n; j += warps) {
    const float* kj = kc + ((first + j) * nkv + kvh) * dk;
    float dot = 0;
    for (int64_t i = lane; i < dk; i += kWarp) dot += qs[i] * kj[i];
    dot = WarpSum(dot);
    if (lane == 0) s[j] = dot * scale;
  }
  __syncthreads();
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, s[j]);
  m = BlockMax(m, red);
  float sum = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float e = expf(s[j] - m);
    s[j] = e;
    sum += e;
  }
  sum = BlockSum(sum, red);  // its barriers also publish the s[j] writes
  const float inv = 1.0f / sum;
  for (int64_t d = threadIdx.x; d < dv; d += blockDim.x) {
    float acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += s[j] * inv * vc[((first + j) * nkv + kvh) * dv + d];
    out[(t * nh + h) * dv + d] = acc;
  }
}

constexpr int64_t kMaxAttnSmemBytes = 200 * 1024;

// Index of the largest value not yet used (ties: lower index), as cpu::TopK orders; serial.
__device__ int PickMax(const float* v, bool* used, int64_t n) {
  int best = -1;
  for (int e = 0; e < n; ++e) {
    if (used[e]) continue;
    if (best < 0 || v[e] > v[best]) best = e;
  }
  if (best >= 0) used[best] = true;
  return best;
}

// Every lane's (value, index) candidate merged over the warp by a butterfly: the larger value,
// the lower index on ties; index -1 is no candidate. Every lane gets the result.
__device__ __forceinline__ void WarpArgMax(float& bv, int& bi) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
      bv = ov;
      bi = oi;
    }
  }
}

// The same pick spread over a warp (every lane gets the index): each lane keeps the first
// maximum of its share, then a butterfly keeps the larger value, the lower index on ties.
__device__ int WarpPickMax(const float* v, bool* used, int n) {
  const int lane = threadIdx.x % kWarp;
  float bv = -INFINITY;
  int bi = -1;
  for (int e = lane; e < n; e += kWarp) {
    if (used[e]) continue;
    const float x = v[e];
    if (bi < 0 || x > bv) {
      bv = x;
      bi = e;
    }
  }
  WarpArgMax(bv, bi);
  __syncwarp();
  if (lane == 0 && bi >= 0) used[bi] = true;
  __syncwarp();
  return bi;
}

// Shared memory one warp's routing needs: p[E], sel[E], gs[G] floats, used[E + G] bools.
__host__ __device__ constexpr int64_t RouteSmemBytes(int64_t E, int64_t G) {
  return ((2 * E + G) * 4 + E + G + 15) / 16 * 16;
}

// Routes token z [E] on one warp (see Route in ops.h); lane j < k gets choice j in *id, *w.
__device__ void RouteToken(const float* z, int E, int k, bool norm, const float* bias, int G, int topk_group,
                           double scaling, uint8_t* smem, int32_t* id_out, float* w_out) {
  float* p = reinterpret_cast<float*>(smem);  // probabilities / sigmoid scores
  float* sel = p + E;                         // selection scores (DeepSeek)
  float* gs = sel + E;                        // group scores
  bool* used = reinterpret_cast<bool*>(gs + G);
  const int lane = threadIdx.x % kWarp;
  int my_id = -1;
  if (bias == nullptr) {
    float m = -INFINITY;
    for (int e = lane; e < E; e += kWarp) m = fmaxf(m, z[e]);
    m = WarpMax(m);
    double sum = 0;
    for (int e = lane; e < E; e += kWarp) {
      p[e] = expf(z[e] - m);
      sum += p[e];
    }
    sum = WarpSum(sum);
    const float inv = static_cast<float>(1.0 / sum);
    for (int e = lane; e < E; e += kWarp) {
      p[e] *= inv;
      used[e] = false;
    }
    __syncwarp();
    double s = 0;
    for (int j = 0; j < k; ++j) {
      const int id = WarpPickMax(p, used, E);
      if (lane == j) my_id = id;
      s += p[id];
    }
    if (lane < k) {
      *id_out = my_id;
      *w_out = norm ? static_cast<float>(p[my_id] / s) : p[my_id];
    }
    __syncwarp();
    return;
  }
  for (int e = lane; e < E; e += kWarp) {
    p[e] = 1.0f / (1.0f + expf(-z[e]));
    sel[e] = p[e] + bias[e];
    used[e] = false;
  }
  __syncwarp();
  const int per = E / G, take = per < 2 ? per : 2;
  // Group scores: the sum of each group's two best, a lane per group (top-2 by value, the
  // lower index on ties, added in that order as cpu::TopK + the sum).
  for (int g = lane; g < G; g += kWarp) {
    const float* v = sel + g * per;
    int b1 = 0;
    for (int i = 1; i < per; ++i)
      if (v[i] > v[b1]) b1 = i;
    float s = 0;
    s += v[b1];
    if (take == 2) {
      int b2 = b1 == 0 ? 1 : 0;
      for (int i = 0; i < per; ++i)
        if (i != b1 && v[i] > v[b2]) b2 = i;
      s += v[b2];
    }
    gs[g] = s;
  }
  __syncwarp();
  bool* gused = used + E;
  if (lane == 0) {
    for (int g = 0; g < G; ++g) gused[g] = false;
    for (int i = 0; i < topk_group; ++i) PickMax(gs, gused, G);
  }
  __syncwarp();
  for (int e = lane; e < E; e += kWarp) sel[e] = gused[e / per] ? sel[e] : -INFINITY;
  __syncwarp();
  double sum = 0;
  for (int j = 0; j < k; ++j) {
    const int id = WarpPickMax(sel, used, E);
    if (lane == j) my_id = id;
    sum += p[id];
  }
  if (lane < k) {
    double v = p[my_id];
    if (norm) v /= (sum + 1e-20);
    *id_out = my_id;
    *w_out = static_cast<float>(v * scaling);
  }
  __syncwarp();
}

// RouteToken's softmax path (no score bias) with the token's logits in registers: lane holds
// e = lane + 32·j, as RouteToken strides, so sums and picks are the same operations in the same
// order (identical ids and weights) without its shared-memory passes.
constexpr int kRegRouteMax = 8;  // E <= 256
__device__ __forceinline__ void LoadRouteLogits(const float* z, int E, float (&v)[kRegRouteMax]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int j = 0; j < kRegRouteMax; ++j) {
    const int e = lane + j * kWarp;
    // (L2: the logits may come from other blocks of this grid. GemvRouter's are in shared memory.)
    v[j] = e < E ? (__isShared(z) ? z[e] : __ldcg(z + e)) : 0.0f;
  }
}

__device__ __forceinline__ void RouteSoftmaxRegs(const float (&z)[kRegRouteMax], int E, int k, bool norm,
                                                 int32_t* id_out, float* w_out) {
  const int lane = threadIdx.x % kWarp;
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kRegRouteMax; ++j)
    if (lane + j * kWarp < E) m = fmaxf(m, z[j]);
  m = WarpMax(m);
  float p[kRegRouteMax];
  double sum = 0;
#pragma unroll
  for (int j = 0; j < kRegRouteMax; ++j) {
    p[j] = 0;
    if (lane + j * kWarp < E) {
      p[j] = expf(z[j] - m);
      sum += p[j];
    }
  }
  sum = WarpSum(sum);
  const float inv = static_cast<float>(1.0 / sum);
#pragma unroll
  for (int j = 0; j < kRegRouteMax; ++j) p[j] *= inv;
  // Top-k by warp reductions (redux.sync: one instruction each, where a shuffle butterfly is ten):
  // p >= 0, so its bits order like its value; key = bits + 1 (0: taken or absent). Each lane keeps
  // the key of its best remaining element (the first of equal ones), the warp takes the largest key
  // and, among the lanes holding it, the lowest expert: the same picks, in the same order, as a
  // (value, then lower index) argmax.
  unsigned key[kRegRouteMax];
#pragma unroll
  for (int j = 0; j < kRegRouteMax; ++j) key[j] = lane + j * kWarp < E ? __float_as_uint(p[j]) + 1u : 0u;
  int my_id = -1;
  float my_p = 0;
  double s = 0;
  for (int r = 0; r < k; ++r) {
    unsigned best = 0;
    int bj = 0;
#pragma unroll
    for (int j = 0; j < kRegRouteMax; ++j)
      if (key[j] > best) best = key[j], bj = j;
    const unsigned m = __reduce_max_sync(0xffffffffu, best);
    const unsigned e = __reduce_min_sync(0xffffffffu, best == m ? static_cast<unsigned>(lane + bj * kWarp) : ~0u);
    if (static_cast<int>(e % kWarp) == lane) {
#pragma unroll
      for (int j = 0; j < kRegRouteMax; ++j)
        if (j == bj) key[j] = 0;
    }
    const float bv = __uint_as_float(m - 1u);
    if (lane == r) {
      my_id = static_cast<int>(e);
      my_p = bv;
    }
    s += bv;
  }
  if (lane < k) {
    *id_out = my_id;
    *w_out = norm ? static_cast<float>(my_p / s) : my_p;
  }
}

// One warp per token.
__global__ void RouteKernel(const float* logits, int64_t E, int64_t k, bool norm, const float* bias, int64_t G,
                            int64_t topk_group, double scaling, int32_t* ids, float* weights) {
  extern __shared__ uint8_t route_sm[];
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  int32_t id = 0;
  float w = 0;
  RouteToken(logits + t * E, static_cast<int>(E), static_cast<int>(k), norm, bias, static_cast<int>(G),
             static_cast<int>(topk_group), scaling, route_sm, &id, &w);
  if (lane < k) {
    ids[t * k + lane] = id;
    weights[t * k + lane] = w;
  }
}

__global__ void GatherKernel(const bf16_t* in, const int32_t* src, int64_t dim, bf16_t* out) {
  const int64_t r = blockIdx.x;
  const bf16_t* row = in + static_cast<int64_t>(src[r]) * dim;
  if (dim % 8 == 0) {  // 16-byte copies
    const uint4* s4 = reinterpret_cast<const uint4*>(row);
    uint4* d4 = reinterpret_cast<uint4*>(out + r * dim);
    for (int64_t i = threadIdx.x; i < dim / 8; i += blockDim.x) d4[i] = s4[i];
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = row[i];
  }
}

__global__ void CombineKernel(const float* y, const int32_t* rows, const float* w, int64_t k, int64_t dim,
                              int splits, float* out) {
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t* r = rows + (t * k + j) * splits;
      float v = y[static_cast<int64_t>(r[0]) * dim + i];
      if (splits == 2) v += y[static_cast<int64_t>(r[1]) * dim + i];
      acc += w[t * k + j] * v;
    }
    out[t * dim + i] = acc;
  }
}

__global__ void MlaExpandKernel(const float* kv, const float* c, int64_t nh, int64_t nope, int64_t rope,
                                int64_t dv, int64_t ca, int64_t kvr, float* k, float* v) {
  const int64_t t = blockIdx.x / nh, h = blockIdx.x % nh, dk = nope + rope;
  const float* src = kv + (t * nh + h) * (nope + dv);
  float* kd = k + (t * nh + h) * dk;
  for (int64_t i = threadIdx.x; i < nope; i += blockDim.x) kd[i] = src[i];
  for (int64_t i = threadIdx.x; i < rope; i += blockDim.x) kd[nope + i] = c[t * ca + kvr + i];
  for (int64_t i = threadIdx.x; i < dv; i += blockDim.x) v[(t * nh + h) * dv + i] = src[nope + i];
}

constexpr int kThreads = 256;
unsigned GridFor(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 4096 ? (b > 0 ? b : 1) : 4096);
}


// Block per row: RmsNormKernel's arithmetic on a gathered row.
__global__ void GatherRmsNormKernel(const float* in, const int32_t* src, int64_t dim, const float* w, float eps,
                                    float* out) {
  EEP_PDL_TRACE_END;
  __shared__ double partial[32];
  PdlTrigger();
  PdlWait();
  const int64_t r = blockIdx.x;
  const float* xr = in + static_cast<int64_t>(src[r]) * dim;
  double sum = 0;  // double, like the CPU reference
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += static_cast<double>(xr[i]) * xr[i];
  sum = BlockSum(sum, partial);
  const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(dim) + eps));
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = w[i] * (xr[i] * inv);
}

__global__ void GatherF32Kernel(const float* in, const int32_t* src, int64_t dim, float* out) {
  PdlTrigger();
  PdlWait();
  const int64_t r = blockIdx.x;
  const float* row = in + static_cast<int64_t>(src[r]) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = row[i];
}

// One block per row: each thread scans a strided share (strict > keeps its lowest index), then
// a shared-memory tree keeps the larger value, the lower index on ties.
constexpr int kArgmaxThreads = 512;
__global__ void ArgmaxKernel(const float* x, int64_t cols, int32_t* out) {
  __shared__ float sv[kArgmaxThreads];
  __shared__ int32_t si[kArgmaxThreads];
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  constexpr int32_t kNone = 0x7fffffff;
  float best = -INFINITY;
  int32_t idx = kNone;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float v = row[i];
    if (!isnan(v) && (v > best || idx == kNone)) {
      best = v;
      idx = static_cast<int32_t>(i);
    }
  }
  sv[threadIdx.x] = best;
  si[threadIdx.x] = idx;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      const float ov = sv[threadIdx.x + w];
      const int32_t oi = si[threadIdx.x + w];
      const int32_t mi = si[threadIdx.x];
      if (oi != kNone && (mi == kNone || ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < mi))) {
        sv[threadIdx.x] = ov;
        si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = si[0] == kNone ? 0 : si[0];
}

// Launches with the programmatic-dependent-launch attribute (EEP_CUDA_PDL=0: plain launches).
template <typename... Params, typename... Args>
cudaError_t Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, Args&&... args) {
  return LaunchPdl(kernel, grid, block, smem, st, std::forward<Args>(args)...);
}

}  // namespace

cudaError_t Embed(const bf16_t* table, const int32_t* ids, int64_t n, int64_t dim, float* x, cudaStream_t st,
                  double* sums_out, const int32_t* prev_ids, double* zero, int64_t zero_count) {
  if (n == 0) return cudaSuccess;
  return Launch(EmbedKernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), 0, st, table, ids, dim, x, sums_out,
                prev_ids, zero, zero_count);
}

cudaError_t RmsNorm(const float* x, int64_t x_stride, const float* w, int64_t rows, int64_t dim, float eps,
                    float* y, int64_t y_stride, bf16_t* y16, int splits, cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  const int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 64);
  return Launch(RmsNormKernel, dim3(static_cast<unsigned>(rows)), dim3(threads), 0, st, x, x_stride, w, rows, dim, eps, y,
                y_stride, y16, splits);
}

cudaError_t SplitBf16(const float* x, int64_t rows, int64_t dim, int splits, bf16_t* out, cudaStream_t st) {
  if (rows * dim == 0) return cudaSuccess;
  SplitKernel<<<GridFor(rows * dim), kThreads, 0, st>>>(x, rows, dim, splits, out);
  return cudaGetLastError();
}

cudaError_t SumSplits(const float* in, int64_t rows, int64_t cols, int splits, const float* bias, float* y,
                      cudaStream_t st) {
  if (rows * cols == 0) return cudaSuccess;
  SumSplitsKernel<<<GridFor(rows * cols), kThreads, 0, st>>>(in, rows, cols, splits, bias, y);
  return cudaGetLastError();
}

cudaError_t Add(float* x, const float* y, int64_t n, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  AddKernel<<<GridFor(n), kThreads, 0, st>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t SiluMul(const float* gu, int64_t rows, int64_t inter, int splits, float* out, bf16_t* out16,
                    cudaStream_t st) {
  if (rows * inter == 0) return cudaSuccess;
  return Launch(SiluMulKernel, dim3(GridFor(rows * inter)), dim3(kThreads), 0, st, gu, rows, inter, splits, out, out16);
}

cudaError_t Rope(float* x, int64_t n, int64_t heads, int64_t token_stride, int64_t head_stride, int64_t offset,
                 int64_t rope_dim, const int32_t* positions, const float* inv_freq, float factor, bool interleaved,
                 cudaStream_t st) {
  if (n == 0 || heads == 0) return cudaSuccess;
  if (rope_dim / 2 > 1024) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(((rope_dim / 2 + kWarp - 1) / kWarp) * kWarp);
  RopeKernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(heads)), threads, 0, st>>>(
      x, heads, token_stride, head_stride, offset, rope_dim, positions, inv_freq, factor, interleaved);
  return cudaGetLastError();
}

int64_t MaxAttentionKeys() { return kMaxAttnSmemBytes / 4 - 1024; }

cudaError_t Attention(const float* q, const float* kc, const float* vc, int64_t n, int64_t start, int64_t nh,
                      int64_t nkv, int64_t dk, int64_t dv, int64_t window, float scale, float* out,
                      cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  if (start + n > MaxAttentionKeys() || dk > 1024 || nkv == 0 || nh % nkv != 0) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(dk + start + n) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kMaxAttnSmemBytes));
    if (e != cudaSuccess) return e;
  }
  AttentionKernel<<<static_cast<unsigned>(n * nh), 128, smem, st>>>(q, kc, vc, start, nh, nkv, dk, dv, window,
                                                                    scale, out);
  return cudaGetLastError();
}

cudaError_t Route(const float* logits, int64_t n, int64_t E, int64_t k, bool norm, const float* bias, int64_t G,
                  int64_t topk_group, float scaling, int32_t* ids, float* weights, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  if (G < 1 || E % G != 0 || k > E) return cudaErrorInvalidValue;
  if (k > kWarp) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(RouteSmemBytes(E, G));
  RouteKernel<<<static_cast<unsigned>(n), kWarp, smem, st>>>(logits, E, k, norm, bias, G, topk_group,
                                                              static_cast<double>(scaling), ids, weights);
  return cudaGetLastError();
}

cudaError_t GatherRows(const bf16_t* in, const int32_t* src, int64_t rows, int64_t dim, bf16_t* out,
                       cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  GatherKernel<<<static_cast<unsigned>(rows), 128, 0, st>>>(in, src, dim, out);
  return cudaGetLastError();
}

cudaError_t GatherRowsF32(const float* in, const int32_t* src, int64_t rows, int64_t dim, float* out,
                          cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  return Launch(GatherF32Kernel, dim3(static_cast<unsigned>(rows)), dim3(256), 0, st, in, src, dim, out);
}

cudaError_t GatherRmsNormF32(const float* in, const int32_t* src, int64_t rows, int64_t dim, const float* w,
                             float eps, float* out, cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  const int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 64);
  return Launch(GatherRmsNormKernel, dim3(static_cast<unsigned>(rows)), dim3(threads), 0, st, in, src, dim, w, eps, out);
}

cudaError_t ArgmaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > 0x7ffffffe) return cudaErrorInvalidValue;
  ArgmaxKernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, st>>>(x, cols, out);
  return cudaGetLastError();
}

cudaError_t MoeCombine(const float* y, const int32_t* rows, const float* w, int64_t n, int64_t k, int64_t dim,
                       int splits, float* out, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  CombineKernel<<<static_cast<unsigned>(n), kThreads, 0, st>>>(y, rows, w, k, dim, splits, out);
  return cudaGetLastError();
}

cudaError_t MlaExpandKv(const float* kv, const float* c, int64_t n, int64_t nh, int64_t nope, int64_t rope,
                        int64_t dv, int64_t ca, int64_t kvr, float* k, float* v, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  MlaExpandKernel<<<static_cast<unsigned>(n * nh), 128, 0, st>>>(kv, c, nh, nope, rope, dv, ca, kvr, k, v);
  return cudaGetLastError();
}


// ---------------------------------------------------------------------------------------
// Decode-regime kernels (see ops.h).

namespace {

// Eight consecutive weights of a row, loaded as 16 (BF16) or 32 (f32) bytes, streamed past L1.
template <typename WT>
struct Raw8;
template <>
struct Raw8<bf16_t> {
  uint4 v;
  __device__ __forceinline__ void Load(const bf16_t* p) { v = __ldcs(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void LoadShared(const bf16_t* p) { v = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void Zero() { v = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void Unpack(float (&f)[8]) const {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <>
struct Raw8<float> {
  float4 a, b;
  __device__ __forceinline__ void Load(const float* p) {
    a = __ldcs(reinterpret_cast<const float4*>(p));
    b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ __forceinline__ void LoadShared(const float* p) {
    a = *reinterpret_cast<const float4*>(p);
    b = *(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ __forceinline__ void Zero() { a = b = make_float4(0, 0, 0, 0); }
  __device__ __forceinline__ void Unpack(float (&f)[8]) const {
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  }
};

// acc[r][t] += Σ_i w[r][i]·x[t][i] over this lane's share of `in` (8 values per lane per 256),
// for tokens t < n (kTok at most). kU chunks of every row are loaded before the first FMA so
// that each lane keeps kU·kRows 16-byte loads in flight. Not reduced across the warp.
// Chunks (of 256 values) first_chunk, first_chunk + step, ... are this warp's (split-K).
// kScale: x[t][i] is taken times g[i] (an RMSNorm weight; the 1/rms factor is applied by the
// caller to the sums).
// raw[u][r] = the 8 values of row r at c0 + u·stride (zeros past in): one lane's kU chunks of
// every row, all loads in flight together. WarpDotRows' loads, and callers' loads before a PDL
// wait (its kPre).
template <typename WT, int kRows, int kU>
__device__ __forceinline__ void WarpLoadRows(const WT* const (&w)[kRows], int64_t in, int64_t c0, int64_t stride,
                                             Raw8<WT> (&raw)[kU][kRows]) {
#pragma unroll
  for (int u = 0; u < kU; ++u)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (c0 + u * stride < in)
        raw[u][r].Load(w[r] + c0 + u * stride);
      else
        raw[u][r].Zero();
    }
}

// kPre: the first kU chunks of every row (c0 = lane·8 + first_chunk·256) were loaded by the caller
// into pre (WarpLoadRows).
template <typename WT, int kRows, int kTok, int kU = 4, bool kScale = false, bool kPre = false>
__device__ __forceinline__ void WarpDotRows(const WT* const (&w)[kRows], int64_t in, const float* const (&x)[kTok],
                                            int n, float (&acc)[kRows][kTok], int first_chunk = 0, int step = 1,
                                            const float* g = nullptr, const Raw8<WT> (*pre)[kRows] = nullptr) {
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = 256 * static_cast<int64_t>(step);
  const int64_t start = lane * 8 + first_chunk * 256;
  for (int64_t c0 = start; c0 < in; c0 += stride * kU) {
    Raw8<WT> raw[kU][kRows];
    if (kPre && c0 == start) {
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int r = 0; r < kRows; ++r) raw[u][r] = pre[u][r];
    } else {
      WarpLoadRows<WT, kRows, kU>(w, in, c0, stride, raw);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t c = c0 + u * stride;
      if (c >= in) break;
      float wf[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) raw[u][r].Unpack(wf[r]);
      float4 ga = make_float4(1, 1, 1, 1), gb = ga;
      if constexpr (kScale) {
        ga = *reinterpret_cast<const float4*>(g + c);
        gb = *(reinterpret_cast<const float4*>(g + c) + 1);
      }
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        if (t >= n) break;
        // Generic loads: x may live in shared memory (GEMV with a fused RMSNorm).
        const float4 xa = *reinterpret_cast<const float4*>(x[t] + c);
        const float4 xb = *(reinterpret_cast<const float4*>(x[t] + c) + 1);
        float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        if constexpr (kScale) {
          const float gv[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) xv[i] *= gv[i];
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][t] = fmaf(wf[r][i], xv[i], acc[r][t]);
      }
    }
  }
}

constexpr int kGemvWarps = 8;  // rows per block (a warp per row)

// One warp per output row; tokens in passes of kTok (weights re-read from L2 per pass).
// With norm_w: x rows are RMSNorm-ed (as RmsNormKernel) into shared memory first (all
// ntok <= kTok rows, one pass), and block 0 also writes them to norm_out (may be null).
// kSplit > 1 (small matrices): kSplit warps share a row, each over every kSplit-th chunk of
// it, summed in warp order through shared memory (deterministic), so that a few rows still
// keep many warps loading.
// inv[t] for a run-time t (constant indices only: keeps the array in registers).
template <int kTok>
__device__ __forceinline__ float inv_of(const float (&inv)[kTok], int t) {
  float v = 1;
#pragma unroll
  for (int i = 0; i < kTok; ++i)
    if (i == t) v = inv[i];
  return v;
}

// The segment holding output row o of segs (into seg; o becomes the row within it); false past the
// last row. Constant indices only: a run-time index would copy the parameter struct to the stack.
__device__ __forceinline__ bool FindSegment(const GemvSegments& segs, int64_t& o, GemvSegment& seg) {
  bool found = false;
#pragma unroll
  for (int i = 0; i < kMaxGemvSegments; ++i) {
    if (!found && i < segs.count) {
      if (o < segs.seg[i].rows) {
        seg = segs.seg[i];
        found = true;
      } else {
        o -= segs.seg[i].rows;
      }
    }
  }
  return found;
}

// kR > 1 (kSplit 1 only): a warp takes kR consecutive rows, their loads in flight together, so that
// a large matrix fits in one wave of blocks (every block's prologue then prefetches its rows while
// the previous kernel runs, and no partial second wave trails).
// kPreload (GemvKernelOne2 only: a template flag, so that the other kernels do not carry its
// registers) with segs.preload and one pass of tokens: the first kU chunks of each row are loaded
// before the wait.
template <typename WT, int kTok, int kSplit, int kR = 1, int kUSet = 0, bool kPreload = false>
__device__ __forceinline__ void GemvBody(const GemvSegments& segs, int64_t in, const float* x, int64_t x_stride,
                                         int64_t ntok, bool accumulate, const float* norm_w, float eps,
                                         float* norm_out, float* xs, const double* norm_sums = nullptr,
                                         double* sums_out = nullptr) {
  static_assert(kR == 1 || kSplit == 1, "rows per warp with split rows");
  // 16-byte loads in flight per lane and row (kR rows share the budget).
  // (kUSet > 0: that many.)
  constexpr int kUDefault = (kTok == 1 ? 8 : 4) / kR > 0 ? (kTok == 1 ? 8 : 4) / kR : 1;
  constexpr int kU = kUSet > 0 ? kUSet : kUDefault;
  constexpr int kRowsPerBlock = kGemvWarps / kSplit;
  __shared__ double partial[32];
  __shared__ float split_sum[kSplit > 1 ? kGemvWarps : 1][kTok];
  const int warp_id = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warp = warp_id / kSplit, slice = warp_id % kSplit;  // row of the block, K slice
  PdlTrigger();
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    // Weights do not depend on earlier kernels: pull this warp's rows into L2 while the
    // previous kernel finishes (a 128-byte line per lane and step).
    int64_t r = (static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp) * kR + rr;
    GemvSegment seg;
    if (FindSegment(segs, r, seg)) {
      const WT* row = static_cast<const WT*>(seg.w) + r * in;
      const char* bytes = reinterpret_cast<const char*>(row);
      const int64_t pre = in * static_cast<int64_t>(sizeof(WT)) * segs.prefetch_pct / 100;
      for (int64_t b = static_cast<int64_t>(lane + slice * kWarp) * 128; b < pre; b += kSplit * kWarp * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(bytes + b));
    }
  }
  // The weights arrive while the previous kernel (a latency-bound one) still runs. (Rows and
  // segments are found again after the wait: fewer registers live across it.)
  Raw8<WT> pre[kU][kR];
  const bool preload = kPreload && kSplit == 1 && segs.preload && ntok <= kTok;
  if (preload) {
    const WT* rows[kR] = {};
#pragma unroll
    for (int rr = 0; rr < kR; ++rr) {
      GemvSegment sp;
      int64_t r = (static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp) * kR + rr;
      // (FindSegment turns r into the row within its segment; a missing row repeats row 0, and a
      // warp without row 0 loads nothing: its results are not used.)
      rows[rr] = FindSegment(segs, r, sp) ? static_cast<const WT*>(sp.w) + r * in : rows[0];
    }
    if (rows[0] != nullptr) WarpLoadRows<WT, kR, kU>(rows, in, lane * 8, 256, pre);
  }
  PdlWait();
  // Σ x² known: the norm weight is applied inside the dot products and 1/rms to the sums, so the
  // blocks need no shared-memory pass (and no barrier) before loading. Normed rows, if wanted
  // (the router's: the experts' input), are written a slice per block.
  const bool scale_in_dot = norm_w != nullptr && norm_sums != nullptr;
  if (scale_in_dot && norm_out != nullptr) {
    const int64_t chunk = ((in + gridDim.x - 1) / gridDim.x + 3) / 4 * 4;
    const int64_t b0 = min(in, static_cast<int64_t>(blockIdx.x) * chunk), b1 = min(in, b0 + chunk);
    for (int64_t t = 0; t < ntok; ++t) {
      const float inv = static_cast<float>(1.0 / sqrt(norm_sums[t] / static_cast<double>(in) + eps));
      for (int64_t i = b0 + threadIdx.x; i < b1; i += blockDim.x)
        norm_out[t * in + i] = norm_w[i] * (x[t * x_stride + i] * inv);
    }
  }
  if (norm_w != nullptr && !scale_in_dot) {
    // Vectorised and unrolled: a thread's loads of a row are in flight together (a loop with one
    // load per trip waits a full memory latency per trip).
    const int64_t in4 = in / 4;
    for (int64_t t = 0; t < ntok; ++t) {
      const float4* xr = reinterpret_cast<const float4*>(x + t * x_stride);
      double sum = 0;
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < in4; i += blockDim.x) {
        const float4 v = xr[i];
        sum += static_cast<double>(v.x) * v.x + static_cast<double>(v.y) * v.y + static_cast<double>(v.z) * v.z +
               static_cast<double>(v.w) * v.w;
      }
      sum = BlockSum(sum, partial);
      const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(in) + eps));
      const float4* w4 = reinterpret_cast<const float4*>(norm_w);
      float4* xs4 = reinterpret_cast<float4*>(xs + t * in);
      float4* no4 = norm_out != nullptr && blockIdx.x == 0 ? reinterpret_cast<float4*>(norm_out + t * in) : nullptr;
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < in4; i += blockDim.x) {
        const float4 v = xr[i], w = w4[i];
        const float4 o = make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv), w.w * (v.w * inv));
        xs4[i] = o;
        if (no4 != nullptr) no4[i] = o;
      }
    }
    __syncthreads();
    x = xs;
    x_stride = in;
  }
  // The segment of each row. Rows past the end: not found (and every later row too).
  GemvSegment sgs[kR];
  bool fnd[kR];
  int64_t orow[kR];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    orow[rr] = (static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp) * kR + rr;
    fnd[rr] = FindSegment(segs, orow[rr], sgs[rr]);
  }
  const bool found = fnd[0];
  const int64_t o = orow[0];
  const GemvSegment& sg = sgs[0];
  // (Split blocks, and blocks that add up sums_out, stay for the barriers below.)
  if (kSplit == 1 && !found && sums_out == nullptr) return;
  __shared__ double sq_sh[kSplit == 1 ? kGemvWarps : 1][kTok];
  const WT* w[kR];
  float bias_r[kR];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    // A missing row re-reads row 0's weights (its result is dropped).
    w[rr] = fnd[rr] ? static_cast<const WT*>(sgs[rr].w) + orow[rr] * in
                    : (found ? static_cast<const WT*>(sg.w) + o * in : nullptr);
    bias_r[rr] = fnd[rr] && sgs[rr].bias ? sgs[rr].bias[orow[rr]] : 0.0f;
  }
  const float bias = bias_r[0];
  for (int64_t t0 = 0; t0 < ntok; t0 += kTok) {
    const int n = static_cast<int>(ntok - t0 < kTok ? ntok - t0 : kTok);
    const float* xr[kTok];
#pragma unroll
    for (int t = 0; t < kTok; ++t) xr[t] = x + (t0 + (t < n ? t : 0)) * x_stride;
    float acc[kR][kTok];
#pragma unroll
    for (int rr = 0; rr < kR; ++rr)
#pragma unroll
      for (int t = 0; t < kTok; ++t) acc[rr][t] = 0;
    float inv[kTok];
#pragma unroll
    for (int t = 0; t < kTok; ++t) inv[t] = 1;
    if (scale_in_dot) {
#pragma unroll
      for (int t = 0; t < kTok; ++t)
        if (t < n) inv[t] = static_cast<float>(1.0 / sqrt(norm_sums[t0 + t] / static_cast<double>(in) + eps));
      if (preload && found)
        WarpDotRows<WT, kR, kTok, kU, true, true>(w, in, xr, n, acc, slice, kSplit, norm_w, pre);
      else if (found)
        WarpDotRows<WT, kR, kTok, kU, true>(w, in, xr, n, acc, slice, kSplit, norm_w);
    } else if (preload && found) {
      WarpDotRows<WT, kR, kTok, kU, false, true>(w, in, xr, n, acc, slice, kSplit, nullptr, pre);
    } else if (found) {
      WarpDotRows<WT, kR, kTok, kU>(w, in, xr, n, acc, slice, kSplit);
    }
    if constexpr (kSplit > 1) {
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        const float v = WarpSum(acc[0][t]);
        if (lane == 0) split_sum[warp_id][t] = v;
      }
      __syncthreads();
      if (found && slice == 0 && lane < n) {
        float v = 0;
        for (int sl = 0; sl < kSplit; ++sl) v += split_sum[warp * kSplit + sl][lane];
        v = v * inv_of(inv, lane) + bias;
        float* y = sg.y + (t0 + lane) * sg.rows + o;
        *y = accumulate ? *y + v : v;
        if (sums_out != nullptr) atomicAdd(sums_out + t0 + lane, static_cast<double>(*y) * *y);
      }
      __syncthreads();
    } else {
#pragma unroll
      for (int t = 0; t < kTok; ++t) {
        if (t >= n) break;
        double sq = 0;
#pragma unroll
        for (int rr = 0; rr < kR; ++rr) {
          const float v = WarpSum(acc[rr][t]) * inv[t] + bias_r[rr];
          if (lane == 0 && fnd[rr]) {
            float* y = sgs[rr].y + (t0 + t) * sgs[rr].rows + orow[rr];
            *y = accumulate ? *y + v : v;
            sq += static_cast<double>(*y) * *y;
          }
        }
        if (lane == 0 && sums_out != nullptr) sq_sh[warp_id][t] = sq;
      }
      if (sums_out != nullptr) {
        // One atomic per block and token (not per row: same-address atomics serialise).
        __syncthreads();
        if (threadIdx.x < n) {
          double sum = 0;
          for (int wi = 0; wi < kGemvWarps; ++wi) sum += sq_sh[wi][threadIdx.x];
          atomicAdd(sums_out + t0 + threadIdx.x, sum);
        }
        __syncthreads();
      }
    }
  }
}

// Measurement builds (EEP_PDL_TRACE) keep the q/k/v GEMV (GemvKernel<bf16, 1, 1, 2>: 80 registers)
// at three blocks per SM: the trace's code took it to 94 registers, two blocks per SM, so that the
// 320 blocks of Qwen3-30B-A3B's q/k/v ran in two waves there and not in normal builds (the "cold
// start" of session 6's timelines). Normal builds keep the bare bound: an explicit minimum of 1
// is not the same (ptxas then gave this kernel 104 registers).
#ifdef EEP_PDL_TRACE
#define EEP_GEMV_BOUNDS __launch_bounds__(kGemvWarps * kWarp, 3)
#else
#define EEP_GEMV_BOUNDS __launch_bounds__(kGemvWarps * kWarp)
#endif
template <typename WT, int kTok, int kSplit, int kR = 1>
__global__ void EEP_GEMV_BOUNDS GemvKernel(GemvSegments segs, int64_t in, const float* x, int64_t x_stride,
                                           int64_t ntok, bool accumulate, const float* norm_w, float eps,
                                           float* norm_out, const double* norm_sums, double* sums_out) {
  EEP_PDL_TRACE_END;
  extern __shared__ float4 gemv_sm4[];
  GemvBody<WT, kTok, kSplit, kR>(segs, in, x, x_stride, ntok, accumulate, norm_w, eps, norm_out,
                             reinterpret_cast<float*>(gemv_sm4), norm_sums, sums_out);
}
// GemvKernel<WT, 1, 1, 2> (one token, two rows per warp: the q/k/v GEMV) with the weights loaded
// before the wait, held at three blocks per SM with two 16-byte loads per row in flight instead of
// four: with four, ptxas took 128 registers (two blocks per SM: Qwen3-30B-A3B's 320 q/k/v blocks in
// two waves), or spilled at three.
template <typename WT>
__global__ void __launch_bounds__(kGemvWarps * kWarp, 3)
    GemvKernelOne2(GemvSegments segs, int64_t in, const float* x, int64_t x_stride, int64_t ntok, bool accumulate,
                   const float* norm_w, float eps, float* norm_out, const double* norm_sums, double* sums_out) {
  EEP_PDL_TRACE_END;
  extern __shared__ float4 gemv_sm4[];
  GemvBody<WT, 1, 1, 2, 2, true>(segs, in, x, x_stride, ntok, accumulate, norm_w, eps, norm_out,
                                 reinterpret_cast<float*>(gemv_sm4), norm_sums, sums_out);
}

// --- One-token GEMV from shared memory ---------------------------------------------------
// At batch 1 a GEMV is a stream of weights, and the weights do not depend on the previous kernel.
// Each block of this kernel (one per SM) takes a contiguous range of rows, starts one bulk copy
// (TMA, cp.async.bulk) of them into shared memory before its PDL wait, and computes from there
// once the input is ready. Decode stages the attention's output projection: its weights stream
// while the attention (a latency chain that leaves HBM idle) runs, and unlike an L2 prefetch they
// cannot be evicted before use. (Staging the q/k/v GEMV as well lost on an H100: its loads only
// moved into the MoE down projection's, which already stream at full bandwidth; bench/RESULTS.md.)
constexpr int kStageThreads = 256, kStageWarps = kStageThreads / kWarp;
constexpr int kStageMaxRows = 64;    // rows per block (the cross-warp sums live in shared memory)
constexpr int kStageMaxChunks = 4;   // chunks of 8 input values per thread: in <= 8192
constexpr int64_t kStageMaxBytes = 200 * 1024;  // a block's weights (leaves room for small co-resident blocks)

__device__ __forceinline__ uint32_t SharedAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The staged GEMV's work for one block (GemvStagedKernel, GemvRouterKernel): rows to shared
// memory, before_wait() (more loads that do not depend on the previous kernel), the PDL wait, the
// dot products. Returns the new value of row r0 + tid to threads tid < the block's rows.
// y_early (accumulate): the residual y is read before the wait. Only where the kernel before
// this one passed its own wait before releasing it (AttentionDecode at one token,
// AttnLateTrigger), so that y's writer (two kernels back) has completed.
constexpr int kStageFoldRows = 16;  // StagedGemvBody's kFold path: blocks of exactly this many rows
template <typename WT, typename BeforeWait, bool kFold = false>
__device__ __forceinline__ float StagedGemvBody(const GemvSegments& segs, int64_t in, int rows_per_block,
                                                const float* x, bool accumulate, const float* norm_w, float eps,
                                                float* norm_out, const double* norm_sums, double* sums_out,
                                                uint8_t* stage_sm, BeforeWait before_wait, bool y_early = false) {
  __shared__ __align__(8) uint64_t bar;
  __shared__ float red[kStageWarps][kStageMaxRows];
  __shared__ double sq_sh[kStageWarps];
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  int64_t total = 0;
#pragma unroll
  for (int i = 0; i < kMaxGemvSegments; ++i)
    if (i < segs.count) total += segs.seg[i].rows;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(rows_per_block), total - r0));
  const int64_t row_bytes = in * static_cast<int64_t>(sizeof(WT));
  PdlTrigger();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (tid == 0) {
    const uint32_t b = SharedAddr(&bar);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b),
                 "r"(static_cast<uint32_t>(nrows * row_bytes))
                 : "memory");
    // The block's rows, one copy per segment they fall in (segments are separate matrices).
    uint32_t dst = SharedAddr(stage_sm);
    int64_t r = r0, left = nrows, base = 0;
#pragma unroll
    for (int i = 0; i < kMaxGemvSegments; ++i) {
      if (i < segs.count) {
        const int64_t hi = base + segs.seg[i].rows;
        if (left > 0 && r < hi) {
          const int64_t n = min(left, hi - r);
          const char* src = static_cast<const char*>(segs.seg[i].w) + (r - base) * row_bytes;
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
              "l"(src), "r"(static_cast<uint32_t>(n * row_bytes)), "r"(b)
              : "memory");
          dst += static_cast<uint32_t>(n * row_bytes);
          r += n;
          left -= n;
        }
        base = hi;
      }
    }
  }
#endif
  float y_pre = 0;
  if (y_early && accumulate && tid < nrows) {
    GemvSegment seg;
    int64_t o = r0 + tid;
    FindSegment(segs, o, seg);
    y_pre = seg.y[o];
  }
  before_wait();
  PdlWait();
#if !(defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  {  // (Older GPUs: a plain copy; the launcher takes this kernel on sm_90 only.)
    int64_t base = 0, done = 0;
    for (int i = 0; i < segs.count && done < nrows; ++i) {
      const int64_t hi = base + segs.seg[i].rows;
      for (int64_t r = r0 + done; r < hi && done < nrows; ++r, ++done) {
        const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(segs.seg[i].w) + (r - base) * row_bytes);
        uint4* d = reinterpret_cast<uint4*>(stage_sm + done * row_bytes);
        for (int64_t j = tid; j < row_bytes / 16; j += kStageThreads) d[j] = src[j];
      }
      base = hi;
    }
  }
#endif
  // The input: this thread's chunks of x in registers (times the norm weight; 1/rms goes on the sums).
  float inv = 1;
  if (norm_sums != nullptr) inv = static_cast<float>(1.0 / sqrt(norm_sums[0] / static_cast<double>(in) + eps));
  if (norm_out != nullptr && norm_w != nullptr) {
    // The normed row, a slice per block (as GemvBody).
    const int64_t chunk = ((in + gridDim.x - 1) / gridDim.x + 3) / 4 * 4;
    const int64_t b0 = min(in, static_cast<int64_t>(blockIdx.x) * chunk), b1 = min(in, b0 + chunk);
    for (int64_t i = b0 + tid; i < b1; i += kStageThreads) norm_out[i] = norm_w[i] * (x[i] * inv);
  }
  const int chunks = static_cast<int>(in / 8);
  float xv[kStageMaxChunks][8];
#pragma unroll
  for (int j = 0; j < kStageMaxChunks; ++j) {
    const int c = tid + j * kStageThreads;
    if (c < chunks) {
      const float4 a = *reinterpret_cast<const float4*>(x + c * 8), bb = *reinterpret_cast<const float4*>(x + c * 8 + 4);
      float v[8] = {a.x, a.y, a.z, a.w, bb.x, bb.y, bb.z, bb.w};
      if (norm_w != nullptr) {
        const float4 ga = *reinterpret_cast<const float4*>(norm_w + c * 8),
                     gb = *reinterpret_cast<const float4*>(norm_w + c * 8 + 4);
        const float g[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] *= g[i];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[j][i] = v[i];
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[j][i] = 0;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __syncthreads();  // the barrier's initialisation, before anyone waits on it
  {
    const uint32_t b = SharedAddr(&bar);
    uint32_t ready = 0;
    while (!ready)
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}"
          : "=r"(ready)
          : "r"(b)
          : "memory");
  }
#else
  __syncthreads();
#endif
  if (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1) PdlTraceEvent(3);  // (measurement builds) rows on chip
  // Each thread's partial dot products, four rows at a time, then summed across the warp and
  // (below, in warp order: deterministic) across the warps.
  const WT* wsm = reinterpret_cast<const WT*>(stage_sm);
  if (kFold && nrows == kStageFoldRows) {
    // All rows in one pass over the chunks, then the warp's sums by halving: each exchange hands
    // half of the values to the partner lane (offsets 16, 8, 4, 2), then one full exchange (1). The
    // additions are WarpSum's, pair for pair, so the sums are the same bits as the loop below;
    // 16 shuffles for the 16 rows instead of 80.
    float acc[kStageFoldRows];
#pragma unroll
    for (int u = 0; u < kStageFoldRows; ++u) acc[u] = 0;
#pragma unroll
    for (int j = 0; j < kStageMaxChunks; ++j) {
      const int c = tid + j * kStageThreads;
      if (c >= chunks) break;
#pragma unroll
      for (int u = 0; u < kStageFoldRows; ++u) {
        Raw8<WT> raw;
        raw.LoadShared(wsm + u * in + c * 8);
        float wf[8];
        raw.Unpack(wf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[u] = fmaf(wf[i], xv[j][i], acc[u]);
      }
    }
    // Halving: with bit b of the lane set, a lane keeps the upper half of its values.
    float v8[8], v4[4], v2[2];
    const bool h16 = lane & 16, h8 = lane & 8, h4 = lane & 4, h2 = lane & 2;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v8[i] = (h16 ? acc[i + 8] : acc[i]) + __shfl_xor_sync(0xffffffffu, h16 ? acc[i] : acc[i + 8], 16);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      v4[i] = (h8 ? v8[i + 4] : v8[i]) + __shfl_xor_sync(0xffffffffu, h8 ? v8[i] : v8[i + 4], 8);
#pragma unroll
    for (int i = 0; i < 2; ++i)
      v2[i] = (h4 ? v4[i + 2] : v4[i]) + __shfl_xor_sync(0xffffffffu, h4 ? v4[i] : v4[i + 2], 4);
    float v1 = (h2 ? v2[1] : v2[0]) + __shfl_xor_sync(0xffffffffu, h2 ? v2[0] : v2[1], 2);
    v1 += __shfl_xor_sync(0xffffffffu, v1, 1);
    // Lane bits 4..1 picked the halves 8, 4, 2, 1: this lane holds row lane / 2.
    if ((lane & 1) == 0) red[warp][lane >> 1] = v1;
  }
  for (int r = 0; r < nrows && !(kFold && nrows == kStageFoldRows); r += 4) {
    float acc[4] = {0, 0, 0, 0};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (r + u >= nrows) break;
#pragma unroll
      for (int j = 0; j < kStageMaxChunks; ++j) {
        const int c = tid + j * kStageThreads;
        if (c >= chunks) break;
        Raw8<WT> raw;
        raw.LoadShared(wsm + (r + u) * in + c * 8);
        float wf[8];
        raw.Unpack(wf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[u] = fmaf(wf[i], xv[j][i], acc[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float v = WarpSum(acc[u]);
      if (lane == 0 && r + u < nrows) red[warp][r + u] = v;
    }
  }
  __syncthreads();
  double sq = 0;
  float out = 0;
  if (tid < nrows) {
    float v = 0;
#pragma unroll
    for (int w = 0; w < kStageWarps; ++w) v += red[w][tid];
    int64_t o = r0 + tid;
    GemvSegment seg;
    FindSegment(segs, o, seg);  // (tid < nrows: always found)
    float* y = seg.y + o;
    v = v * inv + (seg.bias != nullptr ? seg.bias[o] : 0.0f);
    out = accumulate ? (y_early ? y_pre : *y) + v : v;
    *y = out;
    sq = static_cast<double>(out) * out;
  }
  if (sums_out != nullptr) {
    // One atomic per block (rows <= 64: warps 0 and 1 hold them).
    sq = WarpSum(sq);
    if (lane == 0) sq_sh[warp] = sq;
    __syncthreads();
    if (tid == 0) {
      double s = 0;
      for (int w = 0; w < kStageWarps; ++w) s += sq_sh[w];
      atomicAdd(sums_out, s);
    }
  }
  return out;
}

template <typename WT>
__global__ void __launch_bounds__(kStageThreads, 1) GemvStagedKernel(GemvSegments segs, int64_t in, int rows_per_block,
                                                                     const float* x, bool accumulate,
                                                                     const float* norm_w, float eps, float* norm_out,
                                                                     const double* norm_sums, double* sums_out) {
  EEP_PDL_TRACE_END;
  extern __shared__ __align__(128) uint8_t stage_sm[];
  StagedGemvBody<WT>(segs, in, rows_per_block, x, accumulate, norm_w, eps, norm_out, norm_sums, sums_out, stage_sm,
                     [] {});
}

// Rows per warp of an unsplit GEMV: 2 where one row per warp would need more than one wave of
// blocks (3 resident per SM) but two rows fit in one; else 1. EEP_CUDA_GEMV_ROWS=1|2 forces it
// (measurements).
std::atomic<int> g_gemv_rows{-1};  // -1: not read from the environment yet

int GemvRowsPerWarp(int64_t rows) {
  int forced = g_gemv_rows.load(std::memory_order_relaxed);
  if (forced < 0) {
    const char* v = std::getenv("EEP_CUDA_GEMV_ROWS");
    forced = v != nullptr ? std::atoi(v) : 0;
    int expected = -1;
    g_gemv_rows.compare_exchange_strong(expected, forced);
    forced = g_gemv_rows.load();
  }
  const int sms = SmCount();
  if (forced == 1 || forced == 2) return forced;
  const int64_t wave = 3 * static_cast<int64_t>(sms), blocks = (rows + kGemvWarps - 1) / kGemvWarps;
  return sms > 0 && blocks > wave && (blocks + 1) / 2 <= wave ? 2 : 1;
}

// EEP_CUDA_GEMV_PREFETCH: percent of each weight row a GEMV block pulls into L2 before its PDL wait.
// Default 0: on an H100 at batch 1 the prefetch made the GEMVs shorter but their predecessors
// longer by more (the attention's and the MoE down projection's loads queue behind it): 1224.1
// tokens/s without it against 1157.8 with the whole rows (three interleaved rounds). (The
// router's GEMV in RouterPlan keeps GemvSegments' default: its own 1 MB.)
int GemvPrefetchPct() {
  static const int pct = [] {
    const char* v = std::getenv("EEP_CUDA_GEMV_PREFETCH");
    return v == nullptr ? 0 : std::max(0, std::min(100, std::atoi(v)));
  }();
  return pct;
}

// Which one-token GEMVs run from shared memory (GemvStagedKernel; SetGemvStage): sm_90 and later
// only (bulk copies).
std::atomic<int> g_gemv_stage{-1};  // -1: not read from the environment yet

int GemvStageMode() {
  int mode = g_gemv_stage.load(std::memory_order_relaxed);
  if (mode < 0) {
    const char* v = std::getenv("EEP_CUDA_GEMV_STAGE");
    const int env = v == nullptr ? 1 : std::max(0, std::min(2, std::atoi(v)));
    int expected = -1;
    g_gemv_stage.compare_exchange_strong(expected, env);
    mode = g_gemv_stage.load();
  }
  static const bool sm90 = [] {
    int dev = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9;
  }();
  return sm90 ? mode : 0;
}
bool GemvStageOn(const GemvSegments& segs) {
  const int mode = GemvStageMode();
  return mode == 2 || (mode == 1 && segs.stage);
}

// The one-token, two-rows-per-warp kernel: with the weights loaded before the wait (BF16 only: the
// f32 one would spill) or not.
template <typename WT>
auto GemvOne2(bool preload) {
  if constexpr (std::is_same_v<WT, bf16_t>)
    return preload ? GemvKernelOne2<WT> : GemvKernel<WT, 1, 1, 2>;
  else
    return GemvKernel<WT, 1, 1, 2>;
}

template <typename WT>
cudaError_t LaunchGemv(const GemvSegments& segs_in, int64_t in, const float* x, int64_t x_stride, int64_t ntok,
                       bool accumulate, const float* norm_w, float eps, float* norm_out, cudaStream_t st,
                       const double* norm_sums, double* sums_out) {
  GemvSegments segs = segs_in;
  segs.prefetch_pct = GemvPrefetchPct();
  // EEP_CUDA_GEMV_PRELOAD=0: no weights in registers before the wait (GemvBody).
  static const bool preload_env = EnvSwitchOn("EEP_CUDA_GEMV_PRELOAD");
  segs.preload = preload_env && std::is_same_v<WT, bf16_t>;
  if (ntok == 0) return cudaSuccess;
  if (in % 8 != 0 || x_stride % 4 != 0 || segs.count < 1 || segs.count > kMaxGemvSegments)
    return cudaErrorInvalidValue;
  const bool smem_norm = norm_w != nullptr && norm_sums == nullptr;  // GemvBody's xs
  const size_t smem = smem_norm ? static_cast<size_t>(ntok * in) * 4 : 0;
  if (norm_w != nullptr && (ntok > 8 || smem > 48 * 1024)) return cudaErrorInvalidValue;
  if (norm_sums != nullptr && norm_w == nullptr) return cudaErrorInvalidValue;
  int64_t rows = 0;
  for (int i = 0; i < segs.count; ++i) rows += segs.seg[i].rows;
  if (rows == 0) return cudaSuccess;
  if (ntok == 1 && GemvStageOn(segs) && (norm_w == nullptr || norm_sums != nullptr) &&
      in / 8 <= kStageMaxChunks * kStageThreads) {
    const int sms = SmCount();
    const int64_t per_block = sms > 0 ? (rows + sms - 1) / sms : 0;
    const int64_t bytes = per_block * in * static_cast<int64_t>(sizeof(WT));
    if (per_block > 0 && per_block <= kStageMaxRows && bytes <= kStageMaxBytes) {
      // (Per launch, as the other large-shared-memory launches: the attribute is the current device's.)
      if (bytes > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(GemvStagedKernel<WT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(bytes));
        if (e != cudaSuccess) return e;
      }
      const dim3 grid(static_cast<unsigned>((rows + per_block - 1) / per_block)), block(kStageThreads);
      return Launch(GemvStagedKernel<WT>, grid, block, static_cast<size_t>(bytes), st, segs, in,
                    static_cast<int>(per_block), x, accumulate, norm_w, eps, norm_out, norm_sums, sums_out);
    }
  }
  // Few rows (a router): 8 warps per row, so that the matrix still has enough loads in flight.
  const bool split = rows < 1024 && in >= 8 * 256;
  const unsigned blocks = static_cast<unsigned>(split ? rows : (rows + kGemvWarps - 1) / kGemvWarps);
  const dim3 grid(blocks), block(kGemvWarps * kWarp);
  cudaError_t e;
  if (split) {
    if (ntok == 1)
      e = Launch(GemvKernel<WT, 1, kGemvWarps>, grid, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w,
                 eps, norm_out, norm_sums, sums_out);
    else if (ntok <= 4)
      e = Launch(GemvKernel<WT, 4, kGemvWarps>, grid, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w,
                 eps, norm_out, norm_sums, sums_out);
    else
      e = Launch(GemvKernel<WT, 8, kGemvWarps>, grid, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w,
                 eps, norm_out, norm_sums, sums_out);
  } else if (GemvRowsPerWarp(rows) == 2) {
    const dim3 grid2(static_cast<unsigned>((rows + 2 * kGemvWarps - 1) / (2 * kGemvWarps)));
    if (ntok == 1)
      e = Launch(GemvOne2<WT>(segs.preload), grid2, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w, eps,
                 norm_out, norm_sums, sums_out);
    else if (ntok <= 4)
      e = Launch(GemvKernel<WT, 4, 1, 2>, grid2, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w, eps,
                 norm_out, norm_sums, sums_out);
    else
      e = Launch(GemvKernel<WT, 8, 1, 2>, grid2, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w, eps,
                 norm_out, norm_sums, sums_out);
  } else {
    if (ntok == 1)
      e = Launch(GemvKernel<WT, 1, 1>, grid, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w, eps,
                 norm_out, norm_sums, sums_out);
    else if (ntok <= 4)
      e = Launch(GemvKernel<WT, 4, 1>, grid, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w, eps,
                 norm_out, norm_sums, sums_out);
    else
      e = Launch(GemvKernel<WT, 8, 1>, grid, block, smem, st, segs, in, x, x_stride, ntok, accumulate, norm_w, eps,
                 norm_out, norm_sums, sums_out);
  }
  return e;
}

// --- MoE: route + plan, grouped gate/up + SwiGLU, grouped down, combine ---

constexpr int kPlanThreads = 256;

// Block-wide exclusive scan of (a, b) pairs; returns the totals in *ta, *tb. `sh` holds 2 ints
// per warp.
__device__ void BlockExclusiveScan2(int& a, int& b, int* sh, int* ta, int* tb) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  int ia = a, ib = b;  // inclusive within the warp
  for (int o = 1; o < kWarp; o <<= 1) {
    const int na = __shfl_up_sync(0xffffffffu, ia, o), nb = __shfl_up_sync(0xffffffffu, ib, o);
    if (lane >= o) ia += na, ib += nb;
  }
  if (lane == kWarp - 1) sh[2 * warp] = ia, sh[2 * warp + 1] = ib;
  __syncthreads();
  int wa = 0, wb = 0, sa = 0, sb = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) wa += sh[2 * w], wb += sh[2 * w + 1];
    sa += sh[2 * w], sb += sh[2 * w + 1];
  }
  a = wa + ia - a;
  b = wb + ib - b;
  *ta = sa;
  *tb = sb;
  __syncthreads();
}

// Groups A assignments by physical slot into `plan` (see MoePlan): the non-empty slots get group
// numbers in slot order (a block scan), each assignment its place in its group (the order within
// a group does not matter: every assignment's result is computed on its own). The whole block
// calls it with slot_of [A] in shared memory and count [P] zeroed (and a barrier since); offset
// [P], rank [A] and scan [2·warps] are shared scratch.
__device__ __forceinline__ void GroupBySlot(int A, int P, const int* slot_of, int* count, int* offset, int* rank,
                                            int* scan, const MoePlan& plan) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (A <= kWarp) {
    // Few assignments (decode at small batch): one warp groups them with no block barriers.
    // Lanes are assignments; a group's leader is its lowest lane; groups and their rows come
    // in slot order (counted over the lanes with smaller slots), rows within a group in
    // assignment order.
    if (warp != 0) return;
    const bool valid = lane < A;
    const int slot = valid ? slot_of[lane] : INT_MAX;
    const unsigned same = __match_any_sync(0xffffffffu, slot);
    const int rank_in = __popc(same & ((1u << lane) - 1));
    const bool leader = valid && rank_in == 0;
    const unsigned leaders = __ballot_sync(0xffffffffu, leader);
    int g = 0, off = 0;
    for (int j = 0; j < A; ++j) {  // (lanes from A on hold no assignment)
      const int sj = __shfl_sync(0xffffffffu, slot, j);
      g += ((leaders >> j) & 1u) && sj < slot;
      off += j < A && sj < slot;
    }
    if (leader) {
      plan.group_slot[g] = slot;
      plan.group_off[g] = off;
      plan.group_cnt[g] = __popc(same);
    }
    if (valid) plan.order[off + rank_in] = lane;
    if (lane == 0) *plan.num_groups = __popc(leaders);
    return;
  }
  for (int a = threadIdx.x; a < A; a += kPlanThreads) rank[a] = atomicAdd(&count[slot_of[a]], 1);
  __syncthreads();
  // Each thread scans a contiguous run of slots.
  const int per = (P + kPlanThreads - 1) / kPlanThreads, s0 = min(P, static_cast<int>(threadIdx.x) * per),
            s1 = min(P, s0 + per);
  int groups = 0, rows = 0;
  for (int s = s0; s < s1; ++s) groups += count[s] > 0, rows += count[s];
  int total_groups = 0, total_rows = 0;
  BlockExclusiveScan2(groups, rows, scan, &total_groups, &total_rows);
  for (int s = s0; s < s1; ++s) {
    offset[s] = rows;
    if (count[s] > 0) {
      plan.group_slot[groups] = s;
      plan.group_off[groups] = rows;
      plan.group_cnt[groups] = count[s];
      ++groups;
      rows += count[s];
    }
  }
  if (threadIdx.x == 0) *plan.num_groups = total_groups;
  __syncthreads();
  for (int a = threadIdx.x; a < A; a += kPlanThreads) plan.order[offset[slot_of[a]] + rank[a]] = a;
}

// The plan's replica table in shared memory: [E] counts, then [E][max_replicas] slots.
__device__ __forceinline__ void LoadReplicaTable(const MoeSlotTable& table, int E, int* reps) {
  const int R = static_cast<int>(table.max_replicas);
  for (int i = threadIdx.x; i < E * (1 + R); i += kPlanThreads)
    reps[i] = i < E ? table.rep_count[i] : table.rep_slot[i - E];
}

__host__ __device__ int64_t PlanSmemBytes(int64_t N, int64_t E, int64_t k, int64_t G, int64_t P, int64_t R = 1) {
  return (kPlanThreads / kWarp) * RouteSmemBytes(E, G) + (2 * P + 2 * N * k + 2 * (kPlanThreads / kWarp)) * 4 +
         E * (1 + R) * 4;
}

// RoutePlanBody's shared memory (PlanSmemBytes in all): each warp's RouteToken scratch, then
// these arrays (A = N·k assignments, P slots).
struct PlanSmem {
  int* count;    // [P]
  int* offset;   // [P]
  int* slot_of;  // [A]
  int* rank;     // [A]
  int* scan;     // [2·warps]
  int* reps;     // the replica table (LoadReplicaTable)
  __device__ PlanSmem(uint8_t* plan_sm, int E, int G, int P, int A) {
    count = reinterpret_cast<int*>(plan_sm + (kPlanThreads / kWarp) * RouteSmemBytes(E, G));
    offset = count + P;
    slot_of = offset + P;
    rank = slot_of + A;
    scan = rank + A;
    reps = scan + 2 * (kPlanThreads / kWarp);
  }
};

// One block: warps route the tokens (RouteToken), then the assignments are counted per slot,
// the non-empty slots get group numbers in slot order (a block scan), and each assignment its
// place in its group (the order within a group does not matter: every assignment's result is
// computed on its own).
// `pdl`: the kernel's first work (the replica table) goes before PdlWait; otherwise the
// caller has waited already. reps_ready: the caller has loaded the replica table (PlanSmem::reps).
// idle(): work of the caller's for the warps that route no token (they would wait at the next
// barrier), run while the others route.
struct NoIdleWork {
  __device__ void operator()() const {}
};
template <typename Idle = NoIdleWork>
__device__ __forceinline__ void RoutePlanBody(const float* logits, int N, int E, int k, bool norm, const float* bias,
                                              int G, int topk_group, double scaling, const MoeSlotTable& table,
                                              int32_t* ids, float* weights, const MoePlan& plan, uint8_t* plan_sm,
                                              bool pdl, bool reps_ready = false, Idle idle = {}) {
  const int warps = kPlanThreads / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t route_bytes = RouteSmemBytes(E, G);
  const int P = static_cast<int>(table.num_slots), A = N * k;
  const PlanSmem sm(plan_sm, E, G, P, A);
  int *count = sm.count, *offset = sm.offset, *slot_of = sm.slot_of, *rank = sm.rank, *scan = sm.scan, *reps = sm.reps;
  const int R = static_cast<int>(table.max_replicas);
  // Softmax routing with E <= 256: logits in registers (RouteSoftmaxRegs). Without PDL the
  // logits are ready: each warp's first token's loads go out with the replica table's.
  const bool reg_route = bias == nullptr && E <= kWarp * kRegRouteMax;
  float z[kRegRouteMax];
  if (reg_route && !pdl && warp < N) LoadRouteLogits(logits + static_cast<int64_t>(warp) * E, E, z);
  if (pdl) PdlTrigger();
  for (int i = threadIdx.x; i < P; i += kPlanThreads) count[i] = 0;
  // The replica table (static during a step), loaded while the previous kernel finishes.
  if (!reps_ready) LoadReplicaTable(table, E, reps);
  if (pdl) PdlWait();
  __syncthreads();
  PdlTraceEvent(3);
  if (warp >= N) idle();
  // Token t's k experts and weights (lanes < k), on the calling warp.
  auto route = [&](int t, int32_t* id, float* w) {
    if (reg_route) {
      if (pdl || t != warp) LoadRouteLogits(logits + static_cast<int64_t>(t) * E, E, z);
      RouteSoftmaxRegs(z, E, k, norm, id, w);
    } else {
      RouteToken(logits + static_cast<int64_t>(t) * E, E, k, norm, bias, G, topk_group, scaling,
                 plan_sm + warp * route_bytes, id, w);
    }
  };
  if (N == 1) {
    // One token: its k experts (distinct, so their slots are) are the k groups of one assignment
    // each, in ascending slot order as GroupBySlot makes them; warp 0 ranks them by shuffles, with
    // no block barrier and no counting sort over every slot.
    if (warp != 0) return;
    int32_t id = 0;
    float w = 0;
    route(0, &id, &w);
    const int slot = lane < k ? reps[E + id * R] : INT_MAX;
    int rank = 0;
    for (int j = 0; j < k; ++j) {
      const int sj = __shfl_sync(0xffffffffu, slot, j);
      rank += sj < slot || (sj == slot && j < lane);
    }
    if (lane < k) {
      ids[lane] = id;
      weights[lane] = w;
      plan.group_slot[rank] = slot;
      plan.group_off[rank] = rank;
      plan.group_cnt[rank] = 1;
      plan.order[rank] = lane;
    }
    if (lane == 0) *plan.num_groups = k;
    PdlTraceEvent(3);
    return;
  }
  for (int t = warp; t < N; t += warps) {
    int32_t id = 0;
    float w = 0;
    route(t, &id, &w);
    if (lane < k) {
      ids[t * k + lane] = id;
      weights[t * k + lane] = w;
      slot_of[t * k + lane] = reps[E + id * R + t % reps[id]];
    }
  }
  __syncthreads();
  PdlTraceEvent(3);
  GroupBySlot(A, P, slot_of, count, offset, rank, scan, plan);
  PdlTraceEvent(3);
}

__global__ void __launch_bounds__(kPlanThreads) MoeRoutePlanKernel(
    const float* logits, int N, int E, int k, bool norm, const float* bias, int G, int topk_group, double scaling,
    MoeSlotTable table, int32_t* ids, float* weights, MoePlan plan) {
  extern __shared__ uint8_t plan_sm[];
  RoutePlanBody(logits, N, E, k, norm, bias, G, topk_group, scaling, table, ids, weights, plan, plan_sm, true);
}

// True in exactly one block of the grid: the last to get here (its earlier global writes, and
// every other block's, visible to it). Resets *counter for the next launch.
__device__ __forceinline__ bool LastBlock(unsigned* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (last) {
    __threadfence();
    if (threadIdx.x == 0) *counter = 0;
  }
  return last;
}

// The router GEMV (f32 weights, optional fused RMSNorm) and, in its last block, the routing
// and grouping of MoeRoutePlanKernel: one launch.
template <int kTok, int kSplit>
__global__ void __launch_bounds__(kPlanThreads) RouterPlanKernel(
    GemvSegments segs, int64_t in, const float* x, int64_t ntok, const float* norm_w, float eps, float* norm_out,
    unsigned* counter, int E, int k, bool norm, const float* bias, int G, int topk_group, double scaling,
    MoeSlotTable table, int32_t* ids, float* weights, MoePlan plan, const double* norm_sums) {
  EEP_PDL_TRACE_END;
  extern __shared__ float4 router_sm4[];
  uint8_t* plan_sm = reinterpret_cast<uint8_t*>(router_sm4);
  // Every block loads the replica table before its PDL wait (which block routes is known only at
  // the end), so that the routing block does not wait for it after the GEMV. Not where GemvBody
  // norms x in shared memory (the same bytes).
  const bool reps_early = norm_w == nullptr || norm_sums != nullptr;
  if (reps_early)
    LoadReplicaTable(table, E, PlanSmem(plan_sm, E, G, static_cast<int>(table.num_slots), static_cast<int>(ntok) * k).reps);
  GemvBody<float, kTok, kSplit>(segs, in, x, in, ntok, false, norm_w, eps, norm_out,
                                reinterpret_cast<float*>(router_sm4), norm_sums);
  if (!LastBlock(counter)) return;
  PdlTraceEvent(3);
  RoutePlanBody(segs.seg[0].y, static_cast<int>(ntok), E, k, norm, bias, G, topk_group, scaling, table, ids, weights,
                plan, plan_sm, false, reps_early);
}

// GemvRouter: the staged one-token GEMV whose blocks also take their rows' share of the router's
// dot products, the last block routing (see ops.h). Same routing as RouterPlan but the router's
// sums come in another order (block shares, then blocks in order). Shared memory is only the staged
// rows (plus GemvStagedKernel's static arrays): what the router needs before the wait (its weights
// for the block's rows, the replica table) waits in registers, and the routing's scratch reuses
// the staged rows once they are consumed. (A block asking for more shared memory makes its SM take
// a larger shared-memory split, which slows the expert kernels after it: bench/RESULTS.md.)
constexpr int kRouterPieces = 2;  // 4-float pieces of router weights per thread: E·rows <= 2048
constexpr int kRouterReps = 4;    // replica-table words per thread: E·(1 + max_replicas) <= 1024
template <bool kFold>
__global__ void __launch_bounds__(kStageThreads, 1) GemvRouterKernel(GemvSegments segs, int64_t in, int rows_per_block,
                                                                     const float* x, GemvRouterArgs r) {
  EEP_PDL_TRACE_END;
  extern __shared__ __align__(128) uint8_t stage_sm[];
  const int tid = threadIdx.x, E = static_cast<int>(r.num_experts), k = static_cast<int>(r.top_k);
  const int64_t H = segs.seg[0].rows, r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(rows_per_block), H - r0));
  const int q4 = rows_per_block / 4;  // pieces per expert (1, 2, 4 or 8: within a warp)
  const int R = static_cast<int>(r.table.max_replicas), rep_words = E * (1 + R);
  float4 rwv[kRouterPieces];
  int repv[kRouterReps];
  float nwv = 0;
  auto before_wait = [&] {
#pragma unroll
    for (int j = 0; j < kRouterPieces; ++j) {
      const int p = tid + j * kStageThreads, e = p / q4, c = p % q4;
      rwv[j] = p < E * q4 && c * 4 < nrows ? *reinterpret_cast<const float4*>(r.router + e * H + r0 + c * 4)
                                           : make_float4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < kRouterReps; ++j) {
      const int i = tid + j * kStageThreads;
      repv[j] = i < E ? r.table.rep_count[i] : i < rep_words ? r.table.rep_slot[i - E] : 0;
    }
    if (tid < nrows) nwv = r.norm_w[r0 + tid];
  };
  const float out = StagedGemvBody<bf16_t, decltype(before_wait), kFold>(
      segs, in, rows_per_block, x, true, nullptr, 0, nullptr, nullptr, r.norm_sums, stage_sm, before_wait,
      r.residual_early);
  // This block's share of each router dot product: Σ over its rows of router[e][row]·norm_w·x,
  // a piece of four rows per thread, summed over the q4 lanes of an expert (fixed order).
  __shared__ __align__(16) float gx[kStageMaxRows];
  if (tid < rows_per_block) gx[tid] = tid < nrows ? out * nwv : 0.0f;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kRouterPieces; ++j) {
    const int p = tid + j * kStageThreads, e = p / q4, c = p % q4;
    const float4 g = *reinterpret_cast<const float4*>(gx + c * 4);  // (c < q4)
    float v = rwv[j].x * g.x + rwv[j].y * g.y + rwv[j].z * g.z + rwv[j].w * g.w;
    for (int o = 1; o < q4; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (p < E * q4 && c == 0) r.partial[static_cast<int64_t>(blockIdx.x) * E + e] = v;
  }
  if (!LastBlock(r.counter)) return;
  PdlTraceEvent(3);
  // The routing's scratch in the staged rows' place: PlanSmem, then the groups' sums and logits.
  const int P = static_cast<int>(r.table.num_slots);
  uint8_t* plan_sm = stage_sm;
  const PlanSmem psm(plan_sm, E, 1, P, k);
#pragma unroll
  for (int j = 0; j < kRouterReps; ++j)
    if (tid + j * kStageThreads < rep_words) psm.reps[tid + j * kStageThreads] = repv[j];
  float* part_sum = reinterpret_cast<float*>(plan_sm + (PlanSmemBytes(1, E, k, 1, P, R) + 15) / 16 * 16);  // [4·threads]
  float* lg = part_sum + 4 * kStageThreads;                                                                  // [E]
  // Every load of a round is issued before the first is used: this block's chain is the step's.
  const double sums = __ldcg(r.norm_sums);
  // Thread (c, g) adds four experts' shares (float4 column c) of blocks g, g + groups, ... in that
  // order, 16 loads in flight; then each expert's group sums in group order.
  const int E4 = E / 4, groups = kStageThreads / E4, nb = static_cast<int>(gridDim.x);
  {
    const int c = tid % E4, g = tid / E4;
    constexpr int kRound = 16;
    float4 acc = make_float4(0, 0, 0, 0);
    if (g < groups) {
      const float4* p4 = reinterpret_cast<const float4*>(r.partial) + c;
      for (int b0 = g; b0 < nb; b0 += kRound * groups) {
        float4 v[kRound];
#pragma unroll
        for (int u = 0; u < kRound; ++u) {
          const int b = b0 + u * groups;
          v[u] = b < nb ? __ldcg(p4 + static_cast<int64_t>(b) * E4) : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kRound; ++u) acc.x += v[u].x, acc.y += v[u].y, acc.z += v[u].z, acc.w += v[u].w;
      }
      reinterpret_cast<float4*>(part_sum)[g * E4 + c] = acc;
    }
  }
  const float inv = static_cast<float>(1.0 / sqrt(sums / static_cast<double>(H) + r.eps));
  __syncthreads();
  for (int e = tid; e < E; e += kStageThreads) {
    float z = 0;
    for (int g = 0; g < groups; ++g) z += part_sum[g * E + e];
    z *= inv;
    lg[e] = z;
    r.logits[e] = z;
  }
  __syncthreads();
  PdlTraceEvent(3);  // (measurement builds) logits made
  // The normed x for the expert kernels, by the warps that do not route meanwhile.
  const float* xr = segs.seg[0].y;
  auto norm_rows = [&] {
    const int t = tid - kWarp, threads = kStageThreads - kWarp;
    for (int64_t i = static_cast<int64_t>(t) * 8; i < H; i += threads * 8) {  // (H % 8 == 0)
      const float4 a = __ldcg(reinterpret_cast<const float4*>(xr + i)),
                   b = __ldcg(reinterpret_cast<const float4*>(xr + i + 4));
      const float4 ga = *reinterpret_cast<const float4*>(r.norm_w + i),
                   gb = *reinterpret_cast<const float4*>(r.norm_w + i + 4);
      *reinterpret_cast<float4*>(r.norm_out + i) =
          make_float4(ga.x * (a.x * inv), ga.y * (a.y * inv), ga.z * (a.z * inv), ga.w * (a.w * inv));
      *reinterpret_cast<float4*>(r.norm_out + i + 4) =
          make_float4(gb.x * (b.x * inv), gb.y * (b.y * inv), gb.z * (b.z * inv), gb.w * (b.w * inv));
    }
  };
  RoutePlanBody(lg, 1, E, k, r.norm_topk, nullptr, 1, 1, 1.0, r.table, r.ids, r.weights, r.plan, plan_sm, false,
                true, norm_rows);
}

// Routing of many tokens (MoeRoutePlanWide): a warp per token over many blocks; ids, weights and
// each assignment's physical slot (replica t mod count, as RoutePlanBody) go to global memory.
__global__ void __launch_bounds__(kPlanThreads) RouteWideKernel(const float* logits, int N, int E, int k, bool norm,
                                                                const float* bias, int G, int topk_group,
                                                                double scaling, MoeSlotTable table, int32_t* ids,
                                                                float* weights, int32_t* slot_of) {
  extern __shared__ uint8_t wide_sm[];  // RouteToken's scratch per warp
  PdlTrigger();
  PdlWait();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int t = static_cast<int>(blockIdx.x) * (kPlanThreads / kWarp) + warp;
  if (t >= N) return;  // (whole warps)
  int32_t id = 0;
  float w = 0;
  if (bias == nullptr && E <= kWarp * kRegRouteMax) {
    float z[kRegRouteMax];
    LoadRouteLogits(logits + static_cast<int64_t>(t) * E, E, z);
    RouteSoftmaxRegs(z, E, k, norm, &id, &w);
  } else {
    RouteToken(logits + static_cast<int64_t>(t) * E, E, k, norm, bias, G, topk_group, scaling,
               wide_sm + warp * RouteSmemBytes(E, G), &id, &w);
  }
  if (lane < k) {
    const int a = t * k + lane;
    ids[a] = id;
    weights[a] = w;
    slot_of[a] = table.rep_slot[static_cast<int64_t>(id) * table.max_replicas + t % table.rep_count[id]];
  }
}

// Groups RouteWideKernel's assignments by slot (one block, GroupBySlot).
__global__ void __launch_bounds__(kPlanThreads) GroupPlanKernel(const int32_t* slot_of_g, int A, int P, MoePlan plan) {
  extern __shared__ int group_sm[];  // count [P] | offset [P] | slot_of [A] | rank [A] | scan [2·warps]
  int* count = group_sm;
  int* offset = count + P;
  int* slot_of = offset + P;
  int* rank = slot_of + A;
  int* scan = rank + A;
  PdlTrigger();
  for (int i = threadIdx.x; i < P; i += kPlanThreads) count[i] = 0;
  PdlWait();
  for (int a = threadIdx.x; a < A; a += kPlanThreads) slot_of[a] = slot_of_g[a];
  __syncthreads();
  PdlTraceEvent(3);
  GroupBySlot(A, P, slot_of, count, offset, rank, scan, plan);
  PdlTraceEvent(3);
}

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

constexpr int kMoeWarps = 8;

// The next up-to-kTok assignments of a slot's group (from position p of `order`): their ids and
// input rows (row a / div of `rows`, `stride` floats apart; padding repeats the first). Returns
// how many are real.
template <int kTok>
__device__ __forceinline__ int GatherAssignments(const int32_t* order, int p, int cnt, const float* rows, int div,
                                                 int64_t stride, const float* (&xr)[kTok], int (&a_of)[kTok]) {
  const int n = min(kTok, cnt - p);
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
    a_of[t] = order[p + (t < n ? t : 0)];
    xr[t] = rows + static_cast<int64_t>(a_of[t] / div) * stride;
  }
  return n;
}

// Block (row tile, group): a warp per output row i; gate row i and up row i share the x loads.
template <int kTok>
__device__ __forceinline__ void GateUpRows(const bf16_t* base, const float* x, int64_t H, int64_t I, int k,
                                           const int32_t* order, int cnt, int64_t i, float* act) {
  const int lane = threadIdx.x % kWarp;
  const bf16_t* const w[2] = {base + i * H, base + (I + i) * H};
  for (int p = 0; p < cnt; p += kTok) {
    const float* xr[kTok];
    int a_of[kTok];
    const int n = GatherAssignments<kTok>(order, p, cnt, x, k, H, xr, a_of);
    float acc[2][kTok];
#pragma unroll
    for (int t = 0; t < kTok; ++t) acc[0][t] = acc[1][t] = 0;
    WarpDotRows<bf16_t, 2, kTok, kTok == 1 ? 8 : 4>(w, H, xr, n, acc);
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (t >= n) break;
      const float g = WarpSum(acc[0][t]), u = WarpSum(acc[1][t]);
      if (lane == 0) act[static_cast<int64_t>(a_of[t]) * I + i] = Silu(g) * u;
    }
  }
}

__global__ void __launch_bounds__(kMoeWarps * kWarp) MoeGateUpKernel(const float* x, int64_t H, int64_t I, int k,
                                                                     MoeSlotTable table, MoePlan plan, float* act) {
  EEP_PDL_TRACE_END;
  PdlTrigger();
  PdlWait();
  const int g = blockIdx.y;
  // Every load of the group's entry at once (g < the arrays' size), then the slot pointer.
  const int groups = *plan.num_groups, slot = plan.group_slot[g], cnt = plan.group_cnt[g], off = plan.group_off[g];
  if (g >= groups) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kMoeWarps + threadIdx.x / kWarp;
  if (i >= I) return;
  const bf16_t* base = table.slot_ptr[slot];
  const int32_t* order = plan.order + off;
  if (cnt == 1)
    GateUpRows<1>(base, x, H, I, k, order, cnt, i, act);
  else
    GateUpRows<8>(base, x, H, I, k, order, cnt, i, act);
}

// MoeGateUpKernel where every group holds one assignment (a step of one token): a warp per two
// output rows (gate and up rows of both: four weight rows in flight), half the blocks at three
// per SM, so that the launch fits one wave of the GPU (three waves of 768 blocks at two per SM
// before, each paying the plan and slot-pointer loads and a DRAM round trip).
constexpr int kGateUpOneRows = 2;
// release_late: the successor (MoeDownOneKernel) is released only after the wait, so that it may
// read the plan before its own.
constexpr int kGateUpPtrs = 256;  // slot pointers MoeGateUpOneKernel stages (more: read after its wait)
__global__ void __launch_bounds__(kMoeWarps * kWarp, 3) MoeGateUpOneKernel(const float* x, int64_t H, int64_t I,
                                                                           int k, MoeSlotTable table, MoePlan plan,
                                                                           float* act, bool release_late,
                                                                           bool stage_ptrs) {
  EEP_PDL_TRACE_END;
  if (!release_late) PdlTrigger();
  // The slot pointers (static during a step) into shared memory before the wait: after it, the
  // weights' address is one dependent load away (the plan), not two.
  __shared__ const bf16_t* ptr_sm[kGateUpPtrs];
  const bool ptr_pre = stage_ptrs && table.num_slots <= kGateUpPtrs;
  if (ptr_pre)
    for (int i = threadIdx.x; i < table.num_slots; i += blockDim.x) ptr_sm[i] = table.slot_ptr[i];
  PdlWait();
  if (release_late) PdlTrigger();
  const int g = blockIdx.y, lane = threadIdx.x % kWarp;
  // One token: group g is assignment order[g] alone (group_off[g] == g), read with the slot.
  const int groups = *plan.num_groups, slot = plan.group_slot[g], a = plan.order[g];
  __syncthreads();
  if (g >= groups) return;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kMoeWarps + threadIdx.x / kWarp) * kGateUpOneRows;
  if (i0 >= I) return;
  const bf16_t* base = ptr_pre ? ptr_sm[slot] : table.slot_ptr[slot];
  const float* xr[1] = {x + static_cast<int64_t>(a / k) * H};
  const int64_t i1 = min(i0 + 1, I - 1);
  const bf16_t* const w[2 * kGateUpOneRows] = {base + i0 * H, base + (I + i0) * H, base + i1 * H, base + (I + i1) * H};
  float acc[2 * kGateUpOneRows][1];
#pragma unroll
  for (int r = 0; r < 2 * kGateUpOneRows; ++r) acc[r][0] = 0;
  WarpDotRows<bf16_t, 2 * kGateUpOneRows, 1, 2>(w, H, xr, 1, acc);
#pragma unroll
  for (int r = 0; r < kGateUpOneRows; ++r) {
    const float gv = WarpSum(acc[2 * r][0]), uv = WarpSum(acc[2 * r + 1][0]);
    if (lane == 0 && i0 + r < I) act[static_cast<int64_t>(a) * I + i0 + r] = Silu(gv) * uv;
  }
}

// kDownRows consecutive output rows per warp (their loads in flight together, sharing the
// act loads).
constexpr int kDownRows = 4;

template <int kTok>
__device__ __forceinline__ void DownRows(const bf16_t* base, const float* act, int64_t H, int64_t I,
                                         const int32_t* order, int cnt, int64_t o0, float* y) {
  const int lane = threadIdx.x % kWarp;
  const bf16_t* w[kDownRows];
#pragma unroll
  for (int r = 0; r < kDownRows; ++r) w[r] = base + 2 * I * H + min(o0 + r, H - 1) * I;
  for (int p = 0; p < cnt; p += kTok) {
    const float* xr[kTok];
    int a_of[kTok];
    const int n = GatherAssignments<kTok>(order, p, cnt, act, 1, I, xr, a_of);
    float acc[kDownRows][kTok];
#pragma unroll
    for (int r = 0; r < kDownRows; ++r)
#pragma unroll
      for (int t = 0; t < kTok; ++t) acc[r][t] = 0;
    WarpDotRows<bf16_t, kDownRows, kTok, 2>(w, I, xr, n, acc);
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      if (t >= n) break;
#pragma unroll
      for (int r = 0; r < kDownRows; ++r) {
        const float v = WarpSum(acc[r][t]);
        if (lane == 0 && o0 + r < H) y[static_cast<int64_t>(a_of[t]) * H + o0 + r] = v;
      }
    }
  }
}

__global__ void __launch_bounds__(kMoeWarps * kWarp) MoeDownKernel(const float* act, int64_t H, int64_t I,
                                                                   MoeSlotTable table, MoePlan plan, float* y) {
  EEP_PDL_TRACE_END;
  PdlTrigger();
  PdlWait();
  const int g = blockIdx.y;
  const int groups = *plan.num_groups, slot = plan.group_slot[g], cnt = plan.group_cnt[g], off = plan.group_off[g];
  if (g >= groups) return;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kMoeWarps + threadIdx.x / kWarp) * kDownRows;
  if (o0 >= H) return;
  const bf16_t* base = table.slot_ptr[slot];
  const int32_t* order = plan.order + off;
  if (cnt == 1)
    DownRows<1>(base, act, H, I, order, cnt, o0, y);
  else
    DownRows<4>(base, act, H, I, order, cnt, o0, y);
}

// MoeDownKernel where every group holds one assignment (a step of one token) and rows have at
// most kDownOneChunks·256 values: each warp loads all of its kDownRows weight rows into registers
// before the PDL wait, so that the down projection's loads fill the gate/up kernel's tail instead
// of starting after its completion. The plan is final before the wait: MoeGateUpOneKernel
// (release_late) releases this kernel only after its own wait, i.e. after the router's completion.
// Same dot products (chunk and element order) as MoeDownKernel.
constexpr int kDownOneChunks = 3;
using DownOneRows = Raw8<bf16_t>[kDownOneChunks][kDownRows];
// This lane's chunks of the kDownRows down-projection rows from o0 of slot `slot` (rows past H
// repeat the last one), loaded into raw (before a PDL wait).
__device__ __forceinline__ void DownOneLoad(const MoeSlotTable& table, int slot, int64_t H, int64_t I, int64_t o0,
                                            DownOneRows& raw) {
  const bf16_t* base = table.slot_ptr[slot] + 2 * I * H;
  const bf16_t* w[kDownRows];
#pragma unroll
  for (int r = 0; r < kDownRows; ++r) w[r] = base + min(o0 + r, H - 1) * I;
  WarpLoadRows<bf16_t, kDownRows, kDownOneChunks>(w, I, threadIdx.x % kWarp * 8, 256, raw);
}
// out[r] = row r · xr (every lane gets the sums): WarpDotRows' arithmetic (chunks, then elements,
// in order) over the one round in raw; its general loop (kPre) would take the one-token down
// kernels past three blocks per SM into spills.
__device__ __forceinline__ void DownOneDot(const DownOneRows& raw, const float* xr, int64_t I,
                                           float (&out)[kDownRows]) {
  const int lane = threadIdx.x % kWarp;
  float acc[kDownRows];
#pragma unroll
  for (int r = 0; r < kDownRows; ++r) acc[r] = 0;
#pragma unroll
  for (int m = 0; m < kDownOneChunks; ++m) {
    const int64_t c = lane * 8 + 256 * m;
    if (c >= I) break;
    const float4 xa = *reinterpret_cast<const float4*>(xr + c);
    const float4 xb = *(reinterpret_cast<const float4*>(xr + c) + 1);
    const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
    for (int r = 0; r < kDownRows; ++r) {
      float wf[8];
      raw[m][r].Unpack(wf);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[r] = fmaf(wf[i], xv[i], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kDownRows; ++r) out[r] = WarpSum(acc[r]);
}
__global__ void __launch_bounds__(kMoeWarps * kWarp, 3) MoeDownOneKernel(const float* act, int64_t H, int64_t I,
                                                                         MoeSlotTable table, MoePlan plan, float* y) {
  EEP_PDL_TRACE_END;
  PdlTrigger();
  const int g = blockIdx.y, lane = threadIdx.x % kWarp;
  // Through L2: written by the router kernel before this one was released.
  if (g >= __ldcg(plan.num_groups)) return;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kMoeWarps + threadIdx.x / kWarp) * kDownRows;
  if (o0 >= H) return;
  const int slot = __ldcg(plan.group_slot + g), a = __ldcg(plan.order + __ldcg(plan.group_off + g));
  DownOneRows raw;
  DownOneLoad(table, slot, H, I, o0, raw);
  PdlWait();
  float v[kDownRows];
  DownOneDot(raw, act + static_cast<int64_t>(a) * I, I, v);
#pragma unroll
  for (int r = 0; r < kDownRows; ++r)
    if (lane == 0 && o0 + r < H) y[static_cast<int64_t>(a) * H + o0 + r] = v[r];
}

// MoeDownOneKernel and the combine of a one-token step (MoeCombineAddKernel without shared rows or
// a norm) in one launch, one kernel boundary fewer a layer: a block per kDownRows output rows, warp
// g computing them for group g (one assignment each at one token), then the block adds the k
// results to x in assignment order, the combine's sum. Same dot products as MoeDownOneKernel, same
// sum as the combine: x comes out bit-equal to the two launches'. The residual and the routing
// weights are final before the wait (written by the router, see MoeDownOneKernel).
__global__ void __launch_bounds__(kMoeWarps * kWarp, 3) MoeDownCombineOneKernel(const float* act, int64_t H,
                                                                                int64_t I, int k, MoeSlotTable table,
                                                                                MoePlan plan, const float* weights,
                                                                                float* x, double* sums_out) {
  EEP_PDL_TRACE_END;
  PdlTrigger();
  __shared__ float part[kMoeWarps][kDownRows];  // [assignment][row]
  __shared__ float wsh[kMoeWarps];
  const int g = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kDownRows;
  if (threadIdx.x < kMoeWarps * kDownRows) part[threadIdx.x / kDownRows][threadIdx.x % kDownRows] = 0;
  if (threadIdx.x < k) wsh[threadIdx.x] = __ldcg(weights + threadIdx.x);
  const bool active = g < __ldcg(plan.num_groups);
  int a = 0;
  DownOneRows raw;
  if (active) {
    a = __ldcg(plan.order + __ldcg(plan.group_off + g));
    DownOneLoad(table, __ldcg(plan.group_slot + g), H, I, o0, raw);
  }
  const float xres = g == 0 && lane < kDownRows && o0 + lane < H ? __ldcg(x + o0 + lane) : 0.0f;
  __syncthreads();  // part zeroed before any warp writes its row sums
  PdlWait();
  if (active) {
    float v[kDownRows];
    DownOneDot(raw, act + static_cast<int64_t>(a) * I, I, v);
#pragma unroll
    for (int r = 0; r < kDownRows; ++r)
      if (lane == 0 && a < kMoeWarps) part[a][r] = v[r];
  }
  __syncthreads();
  if (g != 0) return;
  double sq = 0;
  if (lane < kDownRows && o0 + lane < H) {
    float acc = 0;
    for (int j = 0; j < k; ++j) acc += wsh[j] * part[j][lane];
    const float v = xres + acc;
    x[o0 + lane] = v;
    sq = static_cast<double>(v) * v;
  }
  sq = WarpSum(sq);
  if (lane == 0 && sums_out != nullptr) atomicAdd(sums_out, sq);
}

// Block (column tile, token), a thread per column: the k terms' loads are independent.
// With norm_w: the last block also RMSNorms the n updated rows of x into norm_out (the next
// layer's input norm), as RmsNormKernel does.
__global__ void MoeCombineAddKernel(const float* y, const float* w, int64_t k, int64_t dim, const float* shared,
                                    float* x, int64_t n, const float* norm_w, float eps, float* norm_out,
                                    unsigned* counter, double* sums_out) {
  EEP_PDL_TRACE_END;
  __shared__ double partial[32];
  PdlTrigger();
  PdlWait();
  const int64_t t = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double sq = 0;
  if (i < dim) {
    float acc = 0;
    for (int64_t j = 0; j < k; ++j) acc += w[t * k + j] * y[(t * k + j) * dim + i];
    if (shared) acc += shared[t * dim + i];
    const float v = x[t * dim + i] + acc;
    x[t * dim + i] = v;
    sq = static_cast<double>(v) * v;
  }
  if (sums_out != nullptr) {
    sq = BlockSum(sq, partial);
    if (threadIdx.x == 0) atomicAdd(sums_out + t, sq);
    __syncthreads();  // partial is reused below
  }
  if (norm_w == nullptr || !LastBlock(counter)) return;
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * dim;
    double sum = 0;  // double, like the CPU reference
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float v = __ldcg(xr + c);
      sum += static_cast<double>(v) * v;
    }
    sum = BlockSum(sum, partial);
    const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(dim) + eps));
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) norm_out[r * dim + c] = norm_w[c] * (__ldcg(xr + c) * inv);
  }
}

// --- attention ---

// Block (token, head): q or k head gets RMSNorm and RoPE; k and v heads go to the cache.
// q/k norms and RoPE of the attention (see QkNormRopeKv in ops.h).
struct QkRope {
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  float eps = 0;
  int64_t offset = 0, rope_dim = 0;
  const float* inv_freq = nullptr;
  float factor = 1;
  bool interleaved = false;
};

// RMSNorm (nw may be null) and RoPE of one head vector src [dk] at position pos, written to
// dst (global or shared; may be src); the whole block takes part, tmp [dk] is shared scratch.
// Ends with a barrier.
__device__ void NormRopeHead(const float* src, float* dst, int64_t dk, const float* nw, float eps, int64_t off,
                             int64_t rope_dim, int64_t pos, const float* inv_freq, float factor, bool interleaved,
                             float* tmp, double* partial) {
  for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) tmp[i] = src[i];
  __syncthreads();
  if (nw != nullptr) {
    double sum = 0;  // double, like the CPU reference
    for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) sum += static_cast<double>(tmp[i]) * tmp[i];
    sum = BlockSum(sum, partial);
    const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(dk) + eps));
    for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) tmp[i] = nw[i] * (tmp[i] * inv);
    __syncthreads();
  }
  const int64_t half = rope_dim / 2;
  for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) {
    const int64_t r = i - off;
    if (r < 0 || r >= rope_dim) {
      dst[i] = tmp[i];
      continue;
    }
    const int64_t pair = r < half ? r : r - half;
    const double angle = static_cast<double>(pos) * static_cast<double>(inv_freq[pair]);
    const float c = static_cast<float>(cos(angle)) * factor, sn = static_cast<float>(sin(angle)) * factor;
    const float a = interleaved ? tmp[off + 2 * pair] : tmp[off + pair];
    const float b = interleaved ? tmp[off + 2 * pair + 1] : tmp[off + pair + half];
    dst[i] = r < half ? a * c - b * sn : b * c + a * sn;
  }
  __syncthreads();
}

// Block (token, head): q or k head gets RMSNorm and RoPE; k and v heads go to the cache.
__global__ void QkNormRopeKvKernel(float* q, const float* k, const float* v, int64_t nh, int64_t nkv, int64_t dk,
                                   int64_t dv, QkRope qr, const int32_t* positions, float* const* k_cache,
                                   float* const* v_cache) {
  PdlTrigger();
  PdlWait();
  extern __shared__ float qk_buf[];  // [dk]
  __shared__ double partial[32];
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int64_t pos = positions[t];
  const bool is_q = h < nh;
  const int64_t kh = h - nh;
  const float* src = is_q ? q + (t * nh + h) * dk : k + (t * nkv + kh) * dk;
  float* dst = is_q ? q + (t * nh + h) * dk : k_cache[t] + (pos * nkv + kh) * dk;
  if (!is_q) {
    const float* vs = v + (t * nkv + kh) * dv;
    float* vd = v_cache[t] + (pos * nkv + kh) * dv;
    for (int64_t i = threadIdx.x; i < dv; i += blockDim.x) vd[i] = vs[i];
  }
  NormRopeHead(src, dst, dk, is_q ? qr.q_norm : qr.k_norm, qr.eps, qr.offset, qr.rope_dim, pos, qr.inv_freq,
               qr.factor, qr.interleaved, qk_buf, partial);
}

constexpr int kAttnWarps = 8, kAttnKeys = 4;

// Block (token, head): each warp takes kAttnKeys keys at a time, round robin (their K and V
// rows loaded together, before the first use), with an online softmax (running max, sum and
// weighted values in registers: lane holds dims lane + 32·i); the warps merge at the end.
// decode: every token is its sequence's only new one; q, k and v are raw
// projections, the block norms and ropes its q head and its kv head's new k itself, attends
// to the cached keys before pos plus that new key, and the group's first head writes k and v
// to the cache (QkNormRopeKv + AttentionBatched in one launch).
// NormRopeHead on one warp (dk <= kMaxBatchedHeadDim): src [dk] (global) → dst [dk] (shared),
// RMSNorm with nw (may be null) then RoPE at position pos, as NormRopeHead; no block barrier.
// cs[pair] = (cos, sin)·factor of the position, made beforehand by the block.
__device__ void NormRopeHeadWarp(const float* src, float* dst, int64_t dk, const float* nw, float eps, int64_t off,
                                 int64_t rope_dim, const float2* cs, bool interleaved) {
  constexpr int kPer = kMaxBatchedHeadDim / kWarp;
  const int lane = threadIdx.x % kWarp;
  float v[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t i = lane + j * kWarp;
    v[j] = i < dk ? src[i] : 0.0f;
  }
  head::NormRopeRegs(v, dst, static_cast<int>(dk), nw, eps, static_cast<int>(off), static_cast<int>(rope_dim), cs,
                     interleaved);
}

// kPer: head values per lane (dk, dv <= 32·kPer). kPre > 0 (decode): each warp's first kPre rounds
// of cached keys (rows before pos, written by earlier steps) are loaded into registers before the
// PDL wait, so that the loop does not wait for them behind the staged output projection's bulk
// copies, which this kernel releases (late_trigger) once q, k and v are on chip.
template <int kPer, int kPre>
__global__ void __launch_bounds__(kAttnWarps * kWarp) AttentionBatchedKernel(
    const float* q, float* const* k_cache, float* const* v_cache, const int32_t* positions, int64_t nh,
    int64_t nkv, int64_t dk, int64_t dv, int64_t window, float scale, float* out, QkRope qr, bool decode,
    const float* k_new, const float* v_new, bool late_trigger) {
  EEP_PDL_TRACE_END;
  if (!late_trigger) PdlTrigger();
  __shared__ float qs[kMaxBatchedHeadDim], kcur[kMaxBatchedHeadDim], vcur[kMaxBatchedHeadDim];
  __shared__ float2 rope_cs[kMaxBatchedHeadDim / 2];
  __shared__ float wm[kAttnWarps], wl[kAttnWarps];
  const int64_t t = blockIdx.x / nh, h = blockIdx.x % nh;
  const int64_t pos = positions[t];
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  const int64_t kvh = h / (nh / nkv);
  const float* kc = k_cache[t];
  const float* vc = v_cache[t];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t last = decode ? pos - 1 : pos;  // decode: key pos comes from kcur/vcur
  const int64_t pos_end = last;
  // Keys j0 .. j0 + kAttnKeys - 1 of this warp into kr / vr (keys past pos_end repeat j0: their
  // scores are masked).
  auto load_keys = [&](int64_t j0, float (&kr)[kAttnKeys][kPer], float (&vr)[kAttnKeys][kPer]) {
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) {
      const int64_t j = j0 + u <= pos_end ? j0 + u : j0;
      const float* kj = kc + (j * nkv + kvh) * dk;
      const float* vj = vc + (j * nkv + kvh) * dv;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        kr[u][i] = lane + i * kWarp < dk ? kj[lane + i * kWarp] : 0.0f;
        vr[u][i] = lane + i * kWarp < dv ? vj[lane + i * kWarp] : 0.0f;
      }
    }
  };
  float kp[kPre > 0 ? kPre : 1][kAttnKeys][kPer], vp[kPre > 0 ? kPre : 1][kAttnKeys][kPer];
  if constexpr (kPre > 0) {
#pragma unroll
    for (int r = 0; r < kPre; ++r) {
      const int64_t j0 = first + warp * kAttnKeys + r * kAttnWarps * kAttnKeys;
      if (j0 <= pos_end) load_keys(j0, kp[r], vp[r]);
    }
  }
  if (decode) {
    // The RoPE angles (double, as NormRopeHead) before waiting for the q/k/v producer: positions
    // went up before the step's first kernel, inv_freq is static.
    for (int64_t i = threadIdx.x; i < qr.rope_dim / 2; i += blockDim.x) {
      double sn, c;
      sincos(static_cast<double>(pos) * static_cast<double>(qr.inv_freq[i]), &sn, &c);
      rope_cs[i] = make_float2(static_cast<float>(c) * qr.factor, static_cast<float>(sn) * qr.factor);
    }
  }
  PdlWait();
  if (decode) __syncthreads();
  __shared__ float wacc[kAttnWarps][kMaxBatchedHeadDim];
  if (decode) {
    // q, the new k and the new v in three warps at once, one barrier (block-wide norms cost a
    // chain of barriers each).
    if (warp == 0)
      NormRopeHeadWarp(q + (t * nh + h) * dk, qs, dk, qr.q_norm, qr.eps, qr.offset, qr.rope_dim, rope_cs,
                       qr.interleaved);
    else if (warp == 1)
      NormRopeHeadWarp(k_new + (t * nkv + kvh) * dk, kcur, dk, qr.k_norm, qr.eps, qr.offset, qr.rope_dim, rope_cs,
                       qr.interleaved);
    else if (warp == 2)
      for (int64_t i = lane; i < dv; i += kWarp) vcur[i] = v_new[(t * nkv + kvh) * dv + i];
    __syncthreads();
    if (blockIdx.x == 0) PdlTraceEvent(3);
    // late_trigger: the next kernel (the staged output projection, whose bulk copies would slow
    // these dependent loads) is released only once q, k and v are on chip.
    if (late_trigger) PdlTrigger();
    if (h % (nh / nkv) == 0) {
      // Only row pos is written; every block of the group reads rows before it.
      float* kd = k_cache[t] + (pos * nkv + kvh) * dk;
      float* vd = v_cache[t] + (pos * nkv + kvh) * dv;
      for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) kd[i] = kcur[i];
      for (int64_t i = threadIdx.x; i < dv; i += blockDim.x) vd[i] = vcur[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < dk; i += blockDim.x) qs[i] = q[(t * nh + h) * dk + i];
    __syncthreads();
  }
  float m = -INFINITY, l = 0, acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0;
  if (decode && warp == 0) {
    float dot = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + i * kWarp < dk) dot += qs[lane + i * kWarp] * kcur[lane + i * kWarp];
    m = WarpSum(dot) * scale;
    l = 1;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + i * kWarp < dv) acc[i] = vcur[lane + i * kWarp];
  }
  // One round: the online softmax over keys j0 .. j0 + kAttnKeys - 1.
  auto round = [&](int64_t j0, const float (&kr)[kAttnKeys][kPer], const float (&vr)[kAttnKeys][kPer]) {
    float sc[kAttnKeys];
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) {
      float dot = 0;
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (lane + i * kWarp < dk) dot += qs[lane + i * kWarp] * kr[u][i];
      sc[u] = dot;
    }
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) sc[u] = j0 + u <= pos_end ? WarpSum(sc[u]) * scale : -INFINITY;
    float mn = m;
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) mn = fmaxf(mn, sc[u]);
    const float corr = expf(m - mn);
    float p[kAttnKeys];
    l *= corr;
#pragma unroll
    for (int u = 0; u < kAttnKeys; ++u) {
      p[u] = expf(sc[u] - mn);
      l += p[u];
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      float a = acc[i] * corr;
#pragma unroll
      for (int u = 0; u < kAttnKeys; ++u) a += p[u] * vr[u][i];
      acc[i] = a;
    }
    m = mn;
  };
  int64_t j0 = first + warp * kAttnKeys;
#pragma unroll
  for (int r = 0; r < kPre; ++r, j0 += kAttnWarps * kAttnKeys)
    if (j0 <= pos_end) round(j0, kp[r], vp[r]);
  for (; j0 <= pos_end; j0 += kAttnWarps * kAttnKeys) {
    float kr[kAttnKeys][kPer], vr[kAttnKeys][kPer];
    load_keys(j0, kr, vr);
    round(j0, kr, vr);
  }
  if (blockIdx.x == 0 && warp == 0) PdlTraceEvent(3);
  if (lane == 0) wm[warp] = m, wl[warp] = l;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + i * kWarp < dv) wacc[warp][lane + i * kWarp] = acc[i];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, wm[w]);
  float L = 0;
  for (int w = 0; w < kAttnWarps; ++w) L += wl[w] == 0 ? 0 : wl[w] * expf(wm[w] - M);
  const float inv = 1.0f / L;
  for (int64_t d = threadIdx.x; d < dv; d += blockDim.x) {
    float o = 0;
    for (int w = 0; w < kAttnWarps; ++w)
      if (wl[w] != 0) o += wacc[w][d] * expf(wm[w] - M);
    out[(t * nh + h) * dv + d] = o * inv;
  }
}

__global__ void CountRoutesKernel(const int32_t* ids, int64_t n, int32_t* counts) {
  EEP_PDL_TRACE_END;
  PdlTrigger();
  PdlWait();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(counts + ids[i], 1);
}

// --- wide argmax ---

// Larger key: larger value, then lower index (NaN never gets a key).
__device__ __forceinline__ unsigned long long ArgmaxKey(float v, int64_t i) {
  uint32_t u = __float_as_uint(v);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(u) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
}

constexpr int kArgmaxWideThreads = 256, kArgmaxWidePerThread = 16;

// keys: [rows] then a block counter; the last block to finish decodes every row's key into out.
__global__ void __launch_bounds__(kArgmaxWideThreads) ArgmaxWideKernel(const float* x, int64_t rows, int64_t cols,
                                                                       unsigned long long* keys, int32_t* out) {
  EEP_PDL_TRACE_END;
  PdlTrigger();
  PdlWait();
  __shared__ unsigned long long warp_best[kArgmaxWideThreads / kWarp];
  const int64_t row = blockIdx.y;
  const float* xr = x + row * cols;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kArgmaxWideThreads * kArgmaxWidePerThread + threadIdx.x;
  unsigned long long best = 0;
#pragma unroll
  for (int i = 0; i < kArgmaxWidePerThread; ++i) {
    const int64_t c = base + static_cast<int64_t>(i) * kArgmaxWideThreads;
    if (c < cols) {
      const float v = xr[c];
      if (!isnan(v)) {
        const unsigned long long key = ArgmaxKey(v, c);
        best = key > best ? key : best;
      }
    }
  }
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
    best = other > best ? other : best;
  }
  if (threadIdx.x % kWarp == 0) warp_best[threadIdx.x / kWarp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxWideThreads / kWarp; ++w) best = warp_best[w] > best ? warp_best[w] : best;
    if (best != 0) atomicMax(keys + row, best);
  }
  // (The counter's word is zero between launches: LastBlock resets its low half.)
  if (!LastBlock(reinterpret_cast<unsigned*>(keys + rows))) return;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const unsigned long long k = atomicAdd(keys + r, 0ull);  // from L2: other blocks' atomics
    out[r] = k == 0 ? 0 : static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(k & 0xffffffffu));
  }
}

}  // namespace

cudaError_t ArgmaxRowsWide(const float* x, int64_t rows, int64_t cols, unsigned long long* scratch, int32_t* out,
                           cudaStream_t st, bool scratch_zeroed) {
  if (rows == 0) return cudaSuccess;
  if (cols <= 0 || cols > 0x7ffffffe || rows > 65535) return cudaErrorInvalidValue;
  if (!scratch_zeroed) {
    const cudaError_t e = cudaMemsetAsync(scratch, 0, static_cast<size_t>(rows + 1) * sizeof(unsigned long long), st);
    if (e != cudaSuccess) return e;
  }
  const int64_t per_block = kArgmaxWideThreads * kArgmaxWidePerThread;
  return Launch(ArgmaxWideKernel,
                dim3(static_cast<unsigned>((cols + per_block - 1) / per_block), static_cast<unsigned>(rows)),
                dim3(kArgmaxWideThreads), 0, st, x, rows, cols, scratch, out);
}


cudaError_t CountRoutes(const int32_t* ids, int64_t n, int32_t* counts, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  return Launch(CountRoutesKernel, dim3(1), dim3(256), 0, st, ids, n, counts);
}

bool GemvSupported(int64_t in) { return in > 0 && in % 8 == 0; }

int SmCount() {
  static const int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      return 0;
    return n;
  }();
  return sms;
}

bool AttnLateTrigger(int64_t n) {
  // One token: the output projection after the attention is staged (GemvStagedKernel, GemvRouter);
  // released once q, k and v are on chip its bulk copies no longer slow their loads (H100, batch 1:
  // +1.1% tokens/s at 8 layers, +2.0% at 48).
  static const bool late_env = EnvSwitchOn("EEP_CUDA_ATTN_LATE_TRIGGER");
  return late_env && n == 1 && GemvStageMode() >= 1;
}

void SetGemvRowsPerWarp(int rows) { g_gemv_rows.store(rows == 1 || rows == 2 ? rows : 0); }
void SetGemvStage(int mode) { g_gemv_stage.store(mode < 0 ? -1 : std::min(mode, 2)); }

cudaError_t Gemv(const GemvSegments& segs, int64_t in, const float* x, int64_t x_stride, int64_t ntok,
                 bool accumulate, cudaStream_t st, const float* norm_w, float eps, float* norm_out,
                 const double* norm_sums, double* sums_out) {
  return LaunchGemv<bf16_t>(segs, in, x, x_stride, ntok, accumulate, norm_w, eps, norm_out, st, norm_sums, sums_out);
}

cudaError_t GemvF32(const GemvSegments& segs, int64_t in, const float* x, int64_t x_stride, int64_t ntok,
                    bool accumulate, cudaStream_t st, const float* norm_w, float eps, float* norm_out,
                    const double* norm_sums, double* sums_out) {
  return LaunchGemv<float>(segs, in, x, x_stride, ntok, accumulate, norm_w, eps, norm_out, st, norm_sums, sums_out);
}

bool GemvNormFusable(int64_t ntok, int64_t in) { return ntok <= 8 && ntok * in * 4 <= 48 * 1024; }

int64_t MoeMaxGroups(int64_t assignments, int64_t num_slots) { return std::max<int64_t>(1, std::min(assignments, num_slots)); }

int64_t MoePlanInts(int64_t max_groups, int64_t assignments) { return 4 + 3 * max_groups + assignments; }

MoePlan MoePlanIn(int32_t* base, int64_t max_groups) {
  MoePlan plan;
  plan.num_groups = base;
  plan.group_slot = base + 4;
  plan.group_off = plan.group_slot + max_groups;
  plan.group_cnt = plan.group_off + max_groups;
  plan.order = plan.group_cnt + max_groups;
  return plan;
}

bool MoeRoutePlanSupported(int64_t N, int64_t E, int64_t k, int64_t P) {
  return N > 0 && k <= kWarp && k <= E && P > 0 && N * k <= 8192 && P <= 8192 && PlanSmemBytes(N, E, k, 1, P) <= 200 * 1024 &&
         PlanSmemBytes(N, E, k, E, P) <= 200 * 1024;
}

cudaError_t MoeRoutePlan(const float* logits, int64_t N, int64_t E, int64_t k, bool norm, const float* bias, int64_t G,
                         int64_t topk_group, float scaling, const MoeSlotTable& table, int32_t* ids, float* weights,
                         const MoePlan& plan, cudaStream_t st) {
  if (N == 0) return cudaSuccess;
  if (G < 1 || E % G != 0 || !MoeRoutePlanSupported(N, E, k, table.num_slots)) return cudaErrorInvalidValue;
  const int64_t smem = PlanSmemBytes(N, E, k, G, table.num_slots, table.max_replicas);
  if (smem > 200 * 1024) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(MoeRoutePlanKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return Launch(MoeRoutePlanKernel, dim3(1), dim3(kPlanThreads), static_cast<size_t>(smem), st, logits,
                static_cast<int>(N), static_cast<int>(E), static_cast<int>(k), norm, bias, static_cast<int>(G),
                static_cast<int>(topk_group), static_cast<double>(scaling), table, ids, weights, plan);
}

cudaError_t MoeRoutePlanWide(const float* logits, int64_t N, int64_t E, int64_t k, bool norm, const float* bias,
                             int64_t G, int64_t topk_group, float scaling, const MoeSlotTable& table, int32_t* ids,
                             float* weights, const MoePlan& plan, int32_t* slot_scratch, cudaStream_t st) {
  if (N == 0) return cudaSuccess;
  if (G < 1 || E % G != 0 || !MoeRoutePlanSupported(N, E, k, table.num_slots)) return cudaErrorInvalidValue;
  constexpr int warps = kPlanThreads / kWarp;
  const size_t route_smem = static_cast<size_t>(warps * RouteSmemBytes(E, G));
  if (route_smem > 48 * 1024) return cudaErrorInvalidValue;
  cudaError_t e = Launch(RouteWideKernel, dim3(static_cast<unsigned>((N + warps - 1) / warps)), dim3(kPlanThreads),
                         route_smem, st, logits, static_cast<int>(N), static_cast<int>(E), static_cast<int>(k), norm, bias,
                         static_cast<int>(G), static_cast<int>(topk_group), static_cast<double>(scaling), table, ids,
                         weights, slot_scratch);
  if (e != cudaSuccess) return e;
  const int64_t A = N * k, P = table.num_slots;
  const int64_t smem = (2 * P + 2 * A + 2 * warps) * 4;
  if (smem > 200 * 1024) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(GroupPlanKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return Launch(GroupPlanKernel, dim3(1), dim3(kPlanThreads), static_cast<size_t>(smem), st, slot_scratch,
                static_cast<int>(A), static_cast<int>(P), plan);
}

bool RouterPlanSupported(int64_t N, int64_t E, int64_t k, int64_t P, int64_t hidden, bool fused_norm) {
  if (!MoeRoutePlanSupported(N, E, k, P) || hidden % 8 != 0) return false;
  return !fused_norm || GemvNormFusable(N, hidden);
}

cudaError_t RouterPlan(const float* router, int64_t hidden, const float* x, int64_t N, const float* norm_w, float eps,
                       float* norm_out, float* logits, unsigned* counter, int64_t E, int64_t k, bool norm,
                       const float* bias, int64_t G, int64_t topk_group, float scaling, const MoeSlotTable& table,
                       int32_t* ids, float* weights, const MoePlan& plan, cudaStream_t st,
                       const double* norm_sums) {
  if (N == 0) return cudaSuccess;
  if (norm_sums != nullptr && norm_w == nullptr) return cudaErrorInvalidValue;
  if (G < 1 || E % G != 0 || !RouterPlanSupported(N, E, k, table.num_slots, hidden, norm_w != nullptr))
    return cudaErrorInvalidValue;
  GemvSegments segs;
  segs.seg[0] = {router, logits, nullptr, E};
  segs.count = 1;
  const int64_t plan_smem = PlanSmemBytes(N, E, k, G, table.num_slots, table.max_replicas);
  const int64_t smem = std::max<int64_t>(plan_smem, norm_w != nullptr && norm_sums == nullptr ? N * hidden * 4 : 0);
  const bool split = E < 1024 && hidden >= 8 * 256;
  const dim3 grid(static_cast<unsigned>(split ? E : (E + kGemvWarps - 1) / kGemvWarps)), block(kPlanThreads);
  auto go = [&](auto kernel) -> cudaError_t {
    if (smem > 48 * 1024) {
      if (smem > 200 * 1024) return cudaErrorInvalidValue;
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    return Launch(kernel, grid, block, static_cast<size_t>(smem), st, segs, hidden, x, N, norm_w, eps, norm_out,
                  counter, static_cast<int>(E), static_cast<int>(k), norm, bias, static_cast<int>(G),
                  static_cast<int>(topk_group), static_cast<double>(scaling), table, ids, weights, plan, norm_sums);
  };
  if (split) {
    if (N == 1) return go(RouterPlanKernel<1, kGemvWarps>);
    if (N <= 4) return go(RouterPlanKernel<4, kGemvWarps>);
    return go(RouterPlanKernel<8, kGemvWarps>);
  }
  if (N == 1) return go(RouterPlanKernel<1, 1>);
  if (N <= 4) return go(RouterPlanKernel<4, 1>);
  return go(RouterPlanKernel<8, 1>);
}

namespace {
// GemvRouter's blocks (one per SM, rows split evenly), or 0 blocks where it does not apply.
// (Its dynamic shared memory is the staged rows alone: stage_bytes.)
struct GemvRouterShape {
  int64_t blocks = 0, per_block = 0, stage_bytes = 0;
};
GemvRouterShape GemvRouterShapeOf(int64_t rows, int64_t in, int64_t E, int64_t k, int64_t P, int64_t R) {
  GemvRouterShape sh;
  GemvSegments probe;
  probe.stage = true;
  const int sms = SmCount();
  if (sms <= 0 || !GemvStageOn(probe) || in % 8 != 0 || in / 8 > kStageMaxChunks * kStageThreads ||
      E > kWarp * kRegRouteMax || E % 4 != 0 || kStageThreads % (E / 4) != 0 || E * (1 + R) > kRouterReps * kStageThreads ||
      !MoeRoutePlanSupported(1, E, k, P))
    return sh;
  const int64_t per_block = (rows + sms - 1) / sms, q4 = per_block / 4;
  const int64_t stage_bytes = per_block * in * 2;
  // The routing's scratch (PlanSmem, the groups' sums, the logits) fits in the staged rows' place.
  const int64_t scratch = (PlanSmemBytes(1, E, k, 1, P, R) + 15) / 16 * 16 + (4 * kStageThreads + E) * 4;
  if (rows % 8 != 0 || per_block % 4 != 0 || (q4 & (q4 - 1)) != 0 || q4 > kWarp || E * q4 > kRouterPieces * kStageThreads ||
      per_block > kStageMaxRows || stage_bytes > kStageMaxBytes || scratch > stage_bytes)
    return sh;
  sh.blocks = (rows + per_block - 1) / per_block;
  sh.per_block = per_block;
  sh.stage_bytes = stage_bytes;
  return sh;
}
}  // namespace

int64_t GemvRouterBlocks(int64_t rows, int64_t in, int64_t E, int64_t k, int64_t P, int64_t R) {
  return GemvRouterShapeOf(rows, in, E, k, P, R).blocks;
}

cudaError_t GemvRouter(const bf16_t* w, const float* bias, int64_t rows, int64_t in, const float* input, float* x,
                       const GemvRouterArgs& r, cudaStream_t st) {
  const GemvRouterShape sh =
      GemvRouterShapeOf(rows, in, r.num_experts, r.top_k, r.table.num_slots, r.table.max_replicas);
  if (sh.blocks == 0 || r.router == nullptr || r.norm_w == nullptr || r.norm_sums == nullptr ||
      r.norm_out == nullptr || r.partial == nullptr || r.counter == nullptr)
    return cudaErrorInvalidValue;
  GemvSegments segs;
  segs.seg[0] = {w, x, bias, rows};
  segs.count = 1;
  segs.stage = true;
  // EEP_CUDA_STAGE_FOLD=0: the staged rows' sums four rows at a time (StagedGemvBody's loop).
  static const bool fold_env = EnvSwitchOn("EEP_CUDA_STAGE_FOLD");
  auto* kernel = fold_env ? GemvRouterKernel<true> : GemvRouterKernel<false>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(sh.stage_bytes));
  if (e != cudaSuccess) return e;
  return Launch(kernel, dim3(static_cast<unsigned>(sh.blocks)), dim3(kStageThreads),
                static_cast<size_t>(sh.stage_bytes), st, segs, in, static_cast<int>(sh.per_block), input, r);
}

namespace {
// Whether one-token steps take MoeDownOneKernel (weights in registers before its wait; the
// one-token gate/up kernel then releases it late): rows of at most kDownOneChunks·256 values,
// unless EEP_CUDA_DOWN_ONE=0.
bool DownOneOn(int64_t I) {
  static const bool env = EnvSwitchOn("EEP_CUDA_DOWN_ONE");
  return env && I % 8 == 0 && I <= kDownOneChunks * 256;
}
}  // namespace

cudaError_t MoeGateUp(const float* x, int64_t H, int64_t I, int64_t k, const MoeSlotTable& table, const MoePlan& plan,
                      int64_t max_groups, float* act, cudaStream_t st, bool one_token) {
  if (max_groups == 0) return cudaSuccess;
  if (H % 8 != 0) return cudaErrorInvalidValue;
  if (one_token) {
    const int64_t rows = kMoeWarps * kGateUpOneRows;
    // EEP_CUDA_GATE_UP_PTRS=0: the kernel reads the slot pointers after its wait, not staged before.
    static const bool stage_ptrs = EnvSwitchOn("EEP_CUDA_GATE_UP_PTRS");
    return Launch(MoeGateUpOneKernel,
                  dim3(static_cast<unsigned>((I + rows - 1) / rows), static_cast<unsigned>(max_groups)),
                  dim3(kMoeWarps * kWarp), 0, st, x, H, I, static_cast<int>(k), table, plan, act, DownOneOn(I),
                  stage_ptrs);
  }
  const dim3 grid(static_cast<unsigned>((I + kMoeWarps - 1) / kMoeWarps), static_cast<unsigned>(max_groups));
  return Launch(MoeGateUpKernel, grid, dim3(kMoeWarps * kWarp), 0, st, x, H, I, static_cast<int>(k), table, plan, act);
}

cudaError_t MoeDown(const float* act, int64_t H, int64_t I, const MoeSlotTable& table, const MoePlan& plan,
                    int64_t max_groups, float* y, cudaStream_t st, bool one_token) {
  if (max_groups == 0) return cudaSuccess;
  if (I % 8 != 0) return cudaErrorInvalidValue;
  const int64_t rows_per_block = kMoeWarps * kDownRows;
  const dim3 grid(static_cast<unsigned>((H + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(max_groups));
  // (MoeGateUp(one_token) released this launch after its wait where DownOneOn.)
  if (one_token && DownOneOn(I))
    return Launch(MoeDownOneKernel, grid, dim3(kMoeWarps * kWarp), 0, st, act, H, I, table, plan, y);
  return Launch(MoeDownKernel, grid, dim3(kMoeWarps * kWarp), 0, st, act, H, I, table, plan, y);
}

bool MoeDownCombineSupported(int64_t H, int64_t I, int64_t k, int64_t max_groups) {
  static const bool env = EnvSwitchOn("EEP_CUDA_DOWN_COMBINE");
  return env && DownOneOn(I) && H > 0 && k >= 1 && k <= kMoeWarps && max_groups <= kMoeWarps;
}

cudaError_t MoeDownCombine(const float* act, int64_t H, int64_t I, int64_t k, const MoeSlotTable& table,
                           const MoePlan& plan, int64_t max_groups, const float* weights, float* x, double* sums_out,
                           cudaStream_t st) {
  if (!MoeDownCombineSupported(H, I, k, max_groups)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((H + kDownRows - 1) / kDownRows));
  return Launch(MoeDownCombineOneKernel, grid, dim3(kMoeWarps * kWarp), 0, st, act, H, I, static_cast<int>(k), table,
                plan, weights, x, sums_out);
}

#ifdef EEP_PDL_TRACE
cudaError_t PdlTraceSet(unsigned long long* events, unsigned* count, unsigned cap) {
  const PdlTraceBuf b{events, count, cap};
  return cudaMemcpyToSymbol(g_pdl_trace, &b, sizeof b);
}
#endif

cudaError_t MoeCombineAdd(const float* y, const float* w, int64_t n, int64_t k, int64_t dim, const float* shared,
                          float* x, cudaStream_t st, const float* norm_w, float eps, float* norm_out,
                          unsigned* counter, double* sums_out) {
  if (n == 0) return cudaSuccess;
  if (norm_w != nullptr && (counter == nullptr || norm_out == nullptr)) return cudaErrorInvalidValue;
  return Launch(MoeCombineAddKernel,
                dim3(static_cast<unsigned>((dim + kThreads - 1) / kThreads), static_cast<unsigned>(n)),
                dim3(kThreads), 0, st, y, w, k, dim, shared, x, n, norm_w, eps, norm_out, counter, sums_out);
}

cudaError_t QkNormRopeKv(float* q, const float* k, const float* v, int64_t n, int64_t nh, int64_t nkv, int64_t dk,
                         int64_t dv, const float* q_norm, const float* k_norm, float eps, int64_t off, int64_t rope_dim,
                         const int32_t* positions, const float* inv_freq, float factor, bool interleaved,
                         float* const* k_cache, float* const* v_cache, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  if (dk > 8192 || off + rope_dim > dk || rope_dim % 2 != 0) return cudaErrorInvalidValue;
  const QkRope qr{q_norm, k_norm, eps, off, rope_dim, inv_freq, factor, interleaved};
  return Launch(QkNormRopeKvKernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>(nh + nkv)), dim3(128),
                static_cast<size_t>(dk) * 4, st, q, k, v, nh, nkv, dk, dv, qr, positions, k_cache, v_cache);
}

namespace {
// AttentionBatchedKernel for these head dims: four values per lane up to 128, else eight; with
// preload, each warp's first rounds of cached keys loaded before the wait (two rounds, 64 keys, at
// four values per lane; one round, 32 keys, at eight).
auto AttentionKernelFor(int64_t dk, int64_t dv, bool preload) {
  if (dk <= 4 * kWarp && dv <= 4 * kWarp) return preload ? AttentionBatchedKernel<4, 2> : AttentionBatchedKernel<4, 0>;
  return preload ? AttentionBatchedKernel<8, 1> : AttentionBatchedKernel<8, 0>;
}
}  // namespace

cudaError_t AttentionBatched(const float* q, const float* const* k_cache, const float* const* v_cache,
                             const int32_t* positions, int64_t n, int64_t nh, int64_t nkv, int64_t dk, int64_t dv,
                             int64_t window, float scale, float* out, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  if (dk > kMaxBatchedHeadDim || dv > kMaxBatchedHeadDim || nkv == 0 || nh % nkv != 0) return cudaErrorInvalidValue;
  // Read-only in this mode: the kernel's writable pointer type serves AttentionDecode.
  return Launch(AttentionKernelFor(dk, dv, false), dim3(static_cast<unsigned>(n * nh)), dim3(kAttnWarps * kWarp), 0, st, q,
                const_cast<float* const*>(k_cache), const_cast<float* const*>(v_cache), positions, nh, nkv, dk, dv,
                window, scale, out, QkRope{}, false,
                static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), false);
}

cudaError_t AttentionDecode(const float* q, const float* k, const float* v, int64_t n, int64_t nh, int64_t nkv,
                            int64_t dk, int64_t dv, const float* q_norm, const float* k_norm, float eps, int64_t off,
                            int64_t rope_dim, const int32_t* positions, const float* inv_freq, float factor,
                            bool interleaved, float* const* k_cache, float* const* v_cache, int64_t window, float scale,
                            float* out, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  if (dk > kMaxBatchedHeadDim || dv > kMaxBatchedHeadDim || nkv == 0 || nh % nkv != 0 || off + rope_dim > dk ||
      rope_dim % 2 != 0)
    return cudaErrorInvalidValue;
  const bool late = AttnLateTrigger(n);
  // With the late release (one token), each warp's first rounds of cached keys are loaded before
  // the wait (EEP_CUDA_ATTN_KV_PRELOAD=0: not).
  static const bool pre_env = EnvSwitchOn("EEP_CUDA_ATTN_KV_PRELOAD");
  return Launch(AttentionKernelFor(dk, dv, pre_env && late), dim3(static_cast<unsigned>(n * nh)), dim3(kAttnWarps * kWarp), 0, st, q, k_cache, v_cache,
                positions, nh, nkv, dk, dv, window, scale, out,
                QkRope{q_norm, k_norm, eps, off, rope_dim, inv_freq, factor, interleaved}, true, k, v, late);
}

}  // namespace eep::cuda
