// Tensor-core grouped expert GEMMs (see moe_mma.h). "Swap AB" mma.sync m16n8k16: A = 16
// weight rows (output features), B = 8 tokens (n-tile), K = the input dimension; weights are
// streamed from global straight into A fragments (no shared memory), activations come through
// the read-only/L1 path and are converted to BF16 (hi, and lo with split) in registers.
//
// Fragment layout and the k permutation. For m16n8k16, lane l (g = l/4, c = l%4) holds A rows
// {g, g+8} × logical k {2c, 2c+1, 2c+8, 2c+9} and B logical k {2c, 2c+1, 2c+8, 2c+9} × token g.
// A dot product does not care about the order of k, so within each 32-wide k block lane l
// loads the 8 consecutive weights k0+8c .. 8c+7 of row g and of row g+8 (one 16-byte load
// each) and the 8 activations of token g at the same k: elements 0..3 are the logical k
// {2c, 2c+1, 2c+8, 2c+9} of the first mma, elements 4..7 those of the second. The 4 lanes of
// a row read 64 contiguous bytes (whole 32-byte sectors), and A and B use the same map.
//
// Tiles: a block is kWarps warps; a gate/up warp owns 16 inter rows (their gate rows and the
// same up rows: SwiGLU from the C fragments in registers), a down warp 32 hidden rows, so both
// stream 2 KiB of weights per k block and reuse each B fragment for two A tiles. A group's
// tokens go in tiles of up to 32 (4 n-tiles; the n-tile count of each tile is a template
// argument, so a group of 9 tokens runs 2 n-tiles, not 4), re-reading the weights per tile.
// Each warp keeps kStages k blocks of weight loads in flight (a ring of registers: the load of
// block b + kStages is issued as soon as block b's mmas have taken their fragments).
#include "kernels/cuda/moe_mma.h"

#include "kernels/cuda/pdl.h"

namespace eep::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;        // warps per block
constexpr int kKBlock = 32;      // k per step: 8 values per lane × 4 lanes per row
constexpr int kStages = 3;       // k blocks of weight loads in flight per warp (a ring)
constexpr int kMaxNt = 4;        // n-tiles (8 tokens each) per token tile
constexpr int kTokTile = kMaxNt * 8;
constexpr int kGateUpRows = 16;  // inter rows per gate/up warp (plus the same up rows)
constexpr int kDownRows = 32;    // hidden rows per down warp
// Blocks per SM the register budget must allow (<= 168 registers a thread: 12 warps an SM,
// each with 2..3 k blocks × 2 KiB of weight loads in flight; 4 stages spill under this bound).
constexpr int kMinBlocks = 3;

// D += A·B, m16n8k16, BF16 inputs, f32 accumulators.
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// bf16x2 of (lo, hi): lo in bits 0..15 (the lower k), round to nearest even.
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// B fragments of one mma from 4 activations (logical k 2c, 2c+1, 2c+8, 2c+9): hi = bf16(v)
// and, with kSplit, lo = bf16(v - hi).
template <bool kSplit>
__device__ __forceinline__ void BFrag(float v0, float v1, float v2, float v3, uint32_t (&hi)[2], uint32_t (&lo)[2]) {
  hi[0] = PackBf16(v0, v1);
  hi[1] = PackBf16(v2, v3);
  if constexpr (kSplit) {
    lo[0] = PackBf16(v0 - __uint_as_float(hi[0] << 16), v1 - __uint_as_float(hi[0] & 0xffff0000u));
    lo[1] = PackBf16(v2 - __uint_as_float(hi[1] << 16), v3 - __uint_as_float(hi[1] & 0xffff0000u));
  }
}

// acc[m][n] += W_m · X_nᵀ over K for the warp's two 16-row A tiles m and kNt 8-token n-tiles.
// w[m][h]: this lane's weight row (g for h = 0, g + 8 for h = 1) of tile m, already at k = 8c;
// xr[n]: this lane's token row (token g of n-tile n), at k = 8c. K is a multiple of 32.
template <int kNt, bool kSplit>
__device__ __forceinline__ void WarpMma(const bf16_t* const (&w)[2][2], int64_t K, const float* const (&xr)[kNt],
                                        float (&acc)[2][kNt][4]) {
  const int nkb = static_cast<int>(K / kKBlock);
  uint4 buf[kStages][2][2];
#pragma unroll
  for (int s = 0; s < kStages; ++s)
    if (s < nkb)
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) buf[s][m][h] = __ldcs(reinterpret_cast<const uint4*>(w[m][h] + s * kKBlock));
  for (int kb = 0; kb < nkb; kb += kStages) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      const int b = kb + s;
      if (b >= nkb) break;
      float4 xa[kNt], xb[kNt];
#pragma unroll
      for (int n = 0; n < kNt; ++n) {
        const float4* p = reinterpret_cast<const float4*>(xr[n] + static_cast<int64_t>(b) * kKBlock);
        xa[n] = __ldg(p);
        xb[n] = __ldg(p + 1);
      }
#pragma unroll
      for (int n = 0; n < kNt; ++n) {
        uint32_t h0[2], l0[2], h1[2], l1[2];  // first mma (elements 0..3), second (4..7)
        BFrag<kSplit>(xa[n].x, xa[n].y, xa[n].z, xa[n].w, h0, l0);
        BFrag<kSplit>(xb[n].x, xb[n].y, xb[n].z, xb[n].w, h1, l1);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const uint4 r0 = buf[s][m][0], r1 = buf[s][m][1];
          if constexpr (kSplit) {
            Mma(acc[m][n], r0.x, r1.x, r0.y, r1.y, l0[0], l0[1]);
            Mma(acc[m][n], r0.z, r1.z, r0.w, r1.w, l1[0], l1[1]);
          }
          Mma(acc[m][n], r0.x, r1.x, r0.y, r1.y, h0[0], h0[1]);
          Mma(acc[m][n], r0.z, r1.z, r0.w, r1.w, h1[0], h1[1]);
        }
      }
      if (b + kStages < nkb)
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            buf[s][m][h] = __ldcs(reinterpret_cast<const uint4*>(w[m][h] + static_cast<int64_t>(b + kStages) * kKBlock));
    }
  }
}

// This lane's input rows for the n-tiles of a token tile (order[0 .. n) of it: row a / div of
// `rows`, at k = 8c); padding tokens (t >= n) repeat the first, their results are not stored.
template <int kNt>
__device__ __forceinline__ void TokenRows(const int32_t* order, int n, const float* rows, int div, int64_t stride,
                                          const float* (&xr)[kNt]) {
  const int lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int i = 0; i < kNt; ++i) {
    const int t = i * 8 + g;
    xr[i] = rows + static_cast<int64_t>(order[t < n ? t : 0] / div) * stride + 8 * c;
  }
}

// acc += the warp's two A tiles times the token tile's inputs (order[0 .. n), row order[t] / div
// of `rows`, K values each): the mma part shared by the gate/up and down tiles.
template <int kNt, bool kSplit>
__device__ __forceinline__ void TileMma(const bf16_t* const (&w)[2][2], const float* rows, int div, int64_t K,
                                        const int32_t* order, int n, float (&acc)[2][kNt][4]) {
  const float* xr[kNt];
  TokenRows<kNt>(order, n, rows, div, K, xr);
  WarpMma<kNt, kSplit>(w, K, xr, acc);
}

__device__ __forceinline__ float Silu(float g) { return g / (1.0f + expf(-g)); }

// One token tile (n <= 32 tokens, kNt = ceil(n / 8)) of a gate/up warp: inter rows i0 .. +16.
template <int kNt, bool kSplit>
__device__ __forceinline__ void GateUpTile(const bf16_t* const (&w)[2][2], const float* x, int64_t H, int64_t I, int k,
                                           const int32_t* order, int n, int64_t i0, float* act) {
  const int lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
  float acc[2][kNt][4] = {};
  TileMma<kNt, kSplit>(w, x, k, H, order, n, acc);
  // c0, c1: row g, tokens 2c, 2c+1 of the n-tile; c2, c3: row g + 8. m = 0 gate, 1 up.
#pragma unroll
  for (int i = 0; i < kNt; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int t = i * 8 + 2 * c + j;
      if (t < n) {
        float* out = act + static_cast<int64_t>(order[t]) * I + i0 + g;
        out[0] = Silu(acc[0][i][j]) * acc[1][i][j];
        out[8] = Silu(acc[0][i][2 + j]) * acc[1][i][2 + j];
      }
    }
}

// One token tile of a down warp: hidden rows o0 .. +32 (tile m = rows o0 + 16m ..).
template <int kNt, bool kSplit>
__device__ __forceinline__ void DownTile(const bf16_t* const (&w)[2][2], const float* act, int64_t H, int64_t I,
                                         const int32_t* order, int n, int64_t o0, float* y) {
  const int lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
  float acc[2][kNt][4] = {};
  TileMma<kNt, kSplit>(w, act, 1, I, order, n, acc);
#pragma unroll
  for (int i = 0; i < kNt; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int t = i * 8 + 2 * c + j;
      if (t < n) {
        float* out = y + static_cast<int64_t>(order[t]) * H + o0 + g;
        out[0] = acc[0][i][j];
        out[8] = acc[0][i][2 + j];
        out[16] = acc[1][i][j];
        out[24] = acc[1][i][2 + j];
      }
    }
}

// Grid (inter tile of kWarps·16 rows, group). Every load of the group's entry at once
// (g < max_groups <= the plan arrays' size), then the slot pointer.
template <bool kSplit>
__global__ void __launch_bounds__(kWarps* kWarp, kMinBlocks) MoeGateUpMmaKernel(const float* x, int64_t H, int64_t I, int k,
                                                                    MoeSlotTable table, MoePlan plan, float* act) {
  PdlTriggerDependents();
  PdlWaitPrerequisites();
  const int grp = blockIdx.y;
  const int groups = *plan.num_groups, slot = plan.group_slot[grp], cnt = plan.group_cnt[grp],
            off = plan.group_off[grp];
  if (grp >= groups) return;
  const int lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp) * kGateUpRows;
  if (i0 >= I) return;  // a whole warp (I % 16 == 0); no block barriers below
  const bf16_t* base = table.slot_ptr[slot] + 8 * c;
  const bf16_t* const w[2][2] = {{base + (i0 + g) * H, base + (i0 + g + 8) * H},
                                 {base + (I + i0 + g) * H, base + (I + i0 + g + 8) * H}};
  const int32_t* order = plan.order + off;
  for (int p = 0; p < cnt; p += kTokTile) {
    const int n = min(kTokTile, cnt - p);
    switch ((n + 7) / 8) {
      case 1: GateUpTile<1, kSplit>(w, x, H, I, k, order + p, n, i0, act); break;
      case 2: GateUpTile<2, kSplit>(w, x, H, I, k, order + p, n, i0, act); break;
      case 3: GateUpTile<3, kSplit>(w, x, H, I, k, order + p, n, i0, act); break;
      default: GateUpTile<4, kSplit>(w, x, H, I, k, order + p, n, i0, act); break;
    }
  }
}

// Grid (hidden tile of kWarps·32 rows, group).
template <bool kSplit>
__global__ void __launch_bounds__(kWarps* kWarp, kMinBlocks) MoeDownMmaKernel(const float* act, int64_t H, int64_t I,
                                                                  MoeSlotTable table, MoePlan plan, float* y) {
  PdlTriggerDependents();
  PdlWaitPrerequisites();
  const int grp = blockIdx.y;
  const int groups = *plan.num_groups, slot = plan.group_slot[grp], cnt = plan.group_cnt[grp],
            off = plan.group_off[grp];
  if (grp >= groups) return;
  const int lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp) * kDownRows;
  if (o0 >= H) return;  // a whole warp (H % 32 == 0)
  const bf16_t* base = table.slot_ptr[slot] + 2 * I * H + 8 * c;
  const bf16_t* const w[2][2] = {{base + (o0 + g) * I, base + (o0 + g + 8) * I},
                                 {base + (o0 + g + 16) * I, base + (o0 + g + 24) * I}};
  const int32_t* order = plan.order + off;
  for (int p = 0; p < cnt; p += kTokTile) {
    const int n = min(kTokTile, cnt - p);
    switch ((n + 7) / 8) {
      case 1: DownTile<1, kSplit>(w, act, H, I, order + p, n, o0, y); break;
      case 2: DownTile<2, kSplit>(w, act, H, I, order + p, n, o0, y); break;
      case 3: DownTile<3, kSplit>(w, act, H, I, order + p, n, o0, y); break;
      default: DownTile<4, kSplit>(w, act, H, I, order + p, n, o0, y); break;
    }
  }
}

bool GridOk(int64_t max_groups) { return max_groups > 0 && max_groups <= 65535; }

}  // namespace

bool MoeMmaSupported(int64_t hidden, int64_t inter) {
  return hidden > 0 && inter > 0 && hidden % kKBlock == 0 && inter % kKBlock == 0;
}

cudaError_t MoeGateUpMma(const float* x, int64_t H, int64_t I, int64_t k, const MoeSlotTable& table,
                         const MoePlan& plan, int64_t max_groups, bool split, float* act, cudaStream_t st) {
  if (max_groups == 0) return cudaSuccess;
  if (!MoeMmaSupported(H, I) || !GridOk(max_groups) || k <= 0) return cudaErrorInvalidValue;
  const int64_t rows = kWarps * kGateUpRows;
  const dim3 grid(static_cast<unsigned>((I + rows - 1) / rows), static_cast<unsigned>(max_groups));
  return split ? LaunchPdl(MoeGateUpMmaKernel<true>, grid, dim3(kWarps * kWarp), 0, st, x, H, I, static_cast<int>(k),
                           table, plan, act)
               : LaunchPdl(MoeGateUpMmaKernel<false>, grid, dim3(kWarps * kWarp), 0, st, x, H, I,
                           static_cast<int>(k), table, plan, act);
}

cudaError_t MoeDownMma(const float* act, int64_t H, int64_t I, const MoeSlotTable& table, const MoePlan& plan,
                       int64_t max_groups, bool split, float* y, cudaStream_t st) {
  if (max_groups == 0) return cudaSuccess;
  if (!MoeMmaSupported(H, I) || !GridOk(max_groups)) return cudaErrorInvalidValue;
  const int64_t rows = kWarps * kDownRows;
  const dim3 grid(static_cast<unsigned>((H + rows - 1) / rows), static_cast<unsigned>(max_groups));
  return split ? LaunchPdl(MoeDownMmaKernel<true>, grid, dim3(kWarps * kWarp), 0, st, act, H, I, table, plan, y)
               : LaunchPdl(MoeDownMmaKernel<false>, grid, dim3(kWarps * kWarp), 0, st, act, H, I, table, plan, y);
}

}  // namespace eep::cuda
