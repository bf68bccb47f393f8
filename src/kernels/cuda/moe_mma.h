// Tensor-core grouped expert GEMMs for the MoE path at more than a few tokens per expert
// (decode at large batch, prefill). Same contract and plan as MoeGateUp / MoeDown in ops.h:
// one launch for all groups of a MoePlan, the number of groups and their token counts read on
// the device only (no host sync: the launches can be captured in a CUDA graph), grid sized by
// max_groups; blocks of groups >= *plan.num_groups exit. Launched with programmatic dependent
// launch like the kernels of ops.cu.
//
// Math: BF16 weights × activations converted to BF16 in registers, f32 accumulation
// (mma.sync m16n8k16). split: each activation v is taken as hi = bf16(v) plus
// lo = bf16(v - hi), both multiplied (about 2^-16 relative per activation, f32-level results,
// the "split-bf16" mode); otherwise plain bf16(v) (about 2^-8).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ops.h"

namespace eep::cuda {

// Whether the MMA kernels take this shape: hidden and inter positive multiples of 32 (the
// k block of a lane's 16-byte loads; the 32 output rows of a down warp). Weights (slot bases)
// and activation rows must be 16-byte aligned, as cudaMalloc gives.
bool MoeMmaSupported(int64_t hidden, int64_t inter);

// act[a, i] = silu(gate_s[i]·x_t)·(up_s[i]·x_t) for every assignment a (t = a / top_k, slot s
// of its group). x [N, hidden] f32, act [N·k, inter] f32.
cudaError_t MoeGateUpMma(const float* x, int64_t hidden, int64_t inter, int64_t top_k, const MoeSlotTable& table,
                         const MoePlan& plan, int64_t max_groups, bool split, float* act, cudaStream_t stream);

// y[a, :] = down_s · act[a, :] for every assignment: y [N·k, hidden] f32.
cudaError_t MoeDownMma(const float* act, int64_t hidden, int64_t inter, const MoeSlotTable& table,
                       const MoePlan& plan, int64_t max_groups, bool split, float* y, cudaStream_t stream);

}  // namespace eep::cuda
