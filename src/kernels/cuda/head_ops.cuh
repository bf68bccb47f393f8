// Per-head device helpers shared by the attention kernels of ops.cu and attention_gqa.cu
// (internal to src/kernels/cuda).
#pragma once

#include <cuda_runtime.h>

namespace eep::cuda::head {

constexpr int kWarp = 32;

__device__ __forceinline__ double WarpSumD(double v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One head on one warp, its values in registers (lane holds i = lane + 32·j, j < kPer): RMSNorm
// with nw (may be null; the sum in double, like the CPU reference), then RoPE of rope_dim values
// at off with cs[pair] = (cos, sin)·factor (interleaved pairs or halves, the output in halves as
// HF's rotate_half), written to dst [dk] (shared memory). No block barrier.
template <int kPer>
__device__ __forceinline__ void NormRopeRegs(float (&v)[kPer], float* dst, int dk, const float* nw, float eps,
                                             int off, int rope_dim, const float2* cs, bool interleaved) {
  const int lane = threadIdx.x % kWarp;
  if (nw != nullptr) {
    double sum = 0;  // double, like the CPU reference
#pragma unroll
    for (int j = 0; j < kPer; ++j) sum += static_cast<double>(v[j]) * v[j];
    sum = WarpSumD(sum);
    const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(dk) + eps));
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int i = lane + j * kWarp;
      if (i < dk) v[j] = nw[i] * (v[j] * inv);
    }
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j)
    if (lane + j * kWarp < dk) dst[lane + j * kWarp] = v[j];
  __syncwarp();
  const int half = rope_dim / 2;
  float o[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = lane + j * kWarp, r = i - off;
    o[j] = v[j];
    if (i >= dk || r < 0 || r >= rope_dim) continue;
    const int pair = r < half ? r : r - half;
    const float cf = cs[pair].x, sf = cs[pair].y;
    const float a = interleaved ? dst[off + 2 * pair] : dst[off + pair];
    const float b = interleaved ? dst[off + 2 * pair + 1] : dst[off + pair + half];
    o[j] = r < half ? a * cf - b * sf : b * cf + a * sf;
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kPer; ++j)
    if (lane + j * kWarp < dk) dst[lane + j * kWarp] = o[j];
}

}  // namespace eep::cuda::head
