// Decode attention that shares K/V across the query heads of a KV group (GQA): the same
// contract and results as AttentionDecode (ops.h), one block per (token, KV head) instead of one
// per (token, q head), so each cached K/V row is read from global memory once per group.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eep::cuda {

// Whether AttentionDecodeGqa takes these shapes: nkv > 0, nh % nkv == 0, group nh / nkv in
// 1..16, 0 < dk, dv <= 256 (kMaxBatchedHeadDim), dk and dv multiples of 4.
bool AttentionDecodeGqaSupported(int64_t nh, int64_t nkv, int64_t dk, int64_t dv);

// AttentionDecode (ops.h) with the same arguments and results: per token t (the only new
// token of its sequence, at pos = positions[t]) q heads [t][nh][dk] and the new k head of their
// group [t][nkv][dk] get RMSNorm (q_norm / k_norm, may be null) and RoPE (rope_dim values at
// rope_offset, angles pos·inv_freq in double, × attention_factor, interleaved or rotate-half);
// every q head attends to k_cache[t]/v_cache[t] rows [first, pos) plus the new key at pos
// (first = max(0, pos - window + 1) when window > 0, else 0) with softmax scale `scale`;
// out [N][nh][dv]; the new k and v are written to row pos of k_cache[t] and v_cache[t]
// ([row][nkv][dk], [row][nkv][dv]). q, k and v are not modified. Cache rows are read with
// 16-byte async copies where k_cache[t] and v_cache[t] are 16-byte aligned (plain loads
// otherwise). cudaErrorInvalidValue for shapes AttentionDecodeGqaSupported refuses or an
// invalid rope (rope_offset + rope_dim > dk, odd rope_dim).
cudaError_t AttentionDecodeGqa(const float* q, const float* k, const float* v, int64_t num_tokens,
                               int64_t nh, int64_t nkv, int64_t dk, int64_t dv, const float* q_norm,
                               const float* k_norm, float eps, int64_t rope_offset,
                               int64_t rope_dim, const int32_t* positions, const float* inv_freq,
                               float attention_factor, bool interleaved, float* const* k_cache,
                               float* const* v_cache, int64_t window, float scale, float* out,
                               cudaStream_t stream);

}  // namespace eep::cuda
