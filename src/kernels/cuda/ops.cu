// CUDA kernels; see ops.h for the contract of each. Kept plain (one block per row or per
// (token, head)) because decode is launch- and weight-bandwidth-bound: the GEMMs go to cuBLAS,
// and these kernels only have to avoid extra passes over activations.
#include "kernels/cuda/ops.h"

#include <cuda_bf16.h>

#include <cfloat>
#include <cmath>

namespace eep::cuda {
namespace {

constexpr int kWarp = 32;

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

__global__ void EmbedKernel(const bf16_t* table, const int32_t* ids, int64_t dim, float* x) {
  const int64_t t = blockIdx.x;
  const bf16_t* row = table + static_cast<int64_t>(ids[t]) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) x[t * dim + i] = Bf16ToF32(row[i]);
}

__global__ void RmsNormKernel(const float* x, int64_t x_stride, const float* w, int64_t rows, int64_t dim,
                              float eps, float* y, int64_t y_stride, bf16_t* y16, int splits) {
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

// Index of the largest value not yet used (ties: lower index), as cpu::TopK orders.
__device__ int PickMax(const float* v, bool* used, int64_t n) {
  int best = -1;
  for (int e = 0; e < n; ++e) {
    if (used[e]) continue;
    if (best < 0 || v[e] > v[best]) best = e;
  }
  if (best >= 0) used[best] = true;
  return best;
}

// One block per token; the selection is sequential on thread 0 (E ≤ a few hundred, k ≤ 8)
// and the exp/sigmoid passes are spread over the warp.
__global__ void RouteKernel(const float* logits, int64_t E, int64_t k, bool norm, const float* bias, int64_t G,
                            int64_t topk_group, double scaling, int32_t* ids, float* weights) {
  extern __shared__ float sm[];
  float* p = sm;           // probabilities / sigmoid scores
  float* sel = sm + E;     // selection scores (DeepSeek)
  float* gs = sel + E;     // group scores
  bool* used = reinterpret_cast<bool*>(gs + G);
  const int64_t t = blockIdx.x;
  const float* z = logits + t * E;
  int32_t* it = ids + t * k;
  float* wt = weights + t * k;
  if (bias == nullptr) {
    float m = -INFINITY;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) m = fmaxf(m, z[e]);
    m = WarpMax(m);
    double sum = 0;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      p[e] = expf(z[e] - m);
      sum += p[e];
    }
    sum = WarpSum(sum);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      p[e] *= inv;
      used[e] = false;
    }
    __syncwarp();
    if (threadIdx.x != 0) return;
    double s = 0;
    for (int64_t j = 0; j < k; ++j) {
      it[j] = PickMax(p, used, E);
      s += p[it[j]];
    }
    for (int64_t j = 0; j < k; ++j) wt[j] = norm ? static_cast<float>(p[it[j]] / s) : p[it[j]];
    return;
  }
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    p[e] = 1.0f / (1.0f + expf(-z[e]));
    sel[e] = p[e] + bias[e];
    used[e] = false;
  }
  __syncwarp();
  if (threadIdx.x != 0) return;
  const int64_t per = E / G, take = per < 2 ? per : 2;
  for (int64_t g = 0; g < G; ++g) {
    float s = 0;
    for (int64_t i = 0; i < take; ++i) s += sel[g * per + PickMax(sel + g * per, used + g * per, per)];
    for (int64_t i = 0; i < per; ++i) used[g * per + i] = false;
    gs[g] = s;
  }
  bool* gused = used + E;
  for (int64_t g = 0; g < G; ++g) gused[g] = false;
  for (int64_t i = 0; i < topk_group; ++i) PickMax(gs, gused, G);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < per; ++i) sel[g * per + i] = gused[g] ? sel[g * per + i] : -INFINITY;
  double sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    it[j] = PickMax(sel, used, E);
    sum += p[it[j]];
  }
  for (int64_t j = 0; j < k; ++j) {
    double v = p[it[j]];
    if (norm) v /= (sum + 1e-20);
    wt[j] = static_cast<float>(v * scaling);
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


__global__ void GatherF32Kernel(const float* in, const int32_t* src, int64_t dim, float* out) {
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

}  // namespace

cudaError_t Embed(const bf16_t* table, const int32_t* ids, int64_t n, int64_t dim, float* x, cudaStream_t st) {
  if (n == 0) return cudaSuccess;
  EmbedKernel<<<static_cast<unsigned>(n), kThreads, 0, st>>>(table, ids, dim, x);
  return cudaGetLastError();
}

cudaError_t RmsNorm(const float* x, int64_t x_stride, const float* w, int64_t rows, int64_t dim, float eps,
                    float* y, int64_t y_stride, bf16_t* y16, int splits, cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  const int threads = dim >= 1024 ? 512 : (dim >= 256 ? 256 : 64);
  RmsNormKernel<<<static_cast<unsigned>(rows), threads, 0, st>>>(x, x_stride, w, rows, dim, eps, y, y_stride, y16,
                                                                 splits);
  return cudaGetLastError();
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
  SiluMulKernel<<<GridFor(rows * inter), kThreads, 0, st>>>(gu, rows, inter, splits, out, out16);
  return cudaGetLastError();
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
  const size_t smem = (2 * E + G) * sizeof(float) + E + G;
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
  GatherF32Kernel<<<static_cast<unsigned>(rows), 256, 0, st>>>(in, src, dim, out);
  return cudaGetLastError();
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

}  // namespace eep::cuda
