// CUDA kernels of the MoE runtime (the device half of src/cuda). Every function launches on
// `stream`, takes device pointers, and returns the launch's cudaError_t; the caller turns it
// into a Status (CUDA_RETURN_IF_ERROR in src/cuda/cuda_util.h). Math mirrors the CPU reference
// (src/kernels/cpu/ops.h) op for op; tests/cuda/ops_gpu_test.cc checks each against it.
//
// Activations are f32. GEMM inputs are BF16 because the weights are stored BF16 and cuBLAS
// wants both operands in one type; to keep f32-level accuracy an activation row may be
// *split* into hi = bf16(x) and lo = bf16(x - hi) rows ("splits" = 1 or 2). A GEMM over the
// 2·T rows reads each weight once, and summing the two halves of its output recovers x·Wᵀ to
// about 2^-16 relative, against 2^-8 for plain BF16.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eep::cuda {

using bf16_t = uint16_t;  // raw BF16 bits, as stored in checkpoints

// x[t,:] = f32(table[ids[t],:]).
cudaError_t Embed(const bf16_t* table, const int32_t* ids, int64_t num_tokens, int64_t dim, float* x,
                  cudaStream_t stream);

// Row-wise RMSNorm: y = w ⊙ x / sqrt(mean(x²) + eps) over `dim` values of each of `rows` rows
// (row r of x at x + r·x_stride). Writes f32 rows to y (stride y_stride; may be null) and/or
// the split BF16 form to y16 ([splits·rows, dim], hi rows first; may be null). y may alias x.
cudaError_t RmsNorm(const float* x, int64_t x_stride, const float* weight, int64_t rows, int64_t dim, float eps,
                    float* y, int64_t y_stride, bf16_t* y16, int splits, cudaStream_t stream);

// Split f32 rows [rows, dim] into BF16 [splits·rows, dim] (hi rows, then lo rows when splits = 2).
cudaError_t SplitBf16(const float* x, int64_t rows, int64_t dim, int splits, bf16_t* out, cudaStream_t stream);

// y[r,c] = Σ_s in[s·rows + r, c] (+ bias[c]); undoes the split after a GEMM.
cudaError_t SumSplits(const float* in, int64_t rows, int64_t cols, int splits, const float* bias, float* y,
                      cudaStream_t stream);

// x[i] += y[i].
cudaError_t Add(float* x, const float* y, int64_t n, cudaStream_t stream);

// gate_up: [splits·rows, 2·inter] GEMM output (gate columns, then up columns, per split row).
// out = silu(gate)·up per row, written as f32 (may be null) and/or split BF16 (may be null).
cudaError_t SiluMul(const float* gate_up, int64_t rows, int64_t inter, int splits, float* out, bf16_t* out16,
                    cudaStream_t stream);

// RoPE in place on `heads` vectors per token: vector h of token t starts at
// x + t·token_stride + h·head_stride + offset and has `rope_dim` values. The angle of pair i
// is positions[t]·inv_freq[i], in double like the CPU reference; cos/sin are scaled by
// `attention_factor`. interleaved: pairs (2i, 2i+1) written de-interleaved (DeepSeek).
cudaError_t Rope(float* x, int64_t num_tokens, int64_t heads, int64_t token_stride, int64_t head_stride,
                 int64_t offset, int64_t rope_dim, const int32_t* positions, const float* inv_freq,
                 float attention_factor, bool interleaved, cudaStream_t stream);

// Causal attention of one sequence's T new tokens (positions start..start+T-1) against its
// cache, which already holds their K/V: k_cache [pos][nkv][dk], v_cache [pos][nkv][dv].
// q [T][nh][dk], out [T][nh][dv]. window > 0: key j is visible from i only if i-j < window.
cudaError_t Attention(const float* q, const float* k_cache, const float* v_cache, int64_t num_tokens,
                      int64_t start, int64_t nh, int64_t nkv, int64_t dk, int64_t dv, int64_t window,
                      float scale, float* out, cudaStream_t stream);
// The longest context Attention takes (its scores live in shared memory).
int64_t MaxAttentionKeys();

// Router on logits [N, E] (f32): writes top_k expert ids and weights per token.
// Softmax mode (Qwen3, Mixtral): softmax over E, top-k, optional renormalisation.
// DeepSeek mode (bias != null): sigmoid, bias for selection, grouped top-k
// (n_group groups, best topk_group by the sum of their two best), w = s / (Σs + 1e-20) if
// norm, then × scaling. Ties pick the lower index, as the CPU TopK.
cudaError_t Route(const float* logits, int64_t num_tokens, int64_t num_experts, int64_t top_k, bool norm_topk,
                  const float* bias, int64_t n_group, int64_t topk_group, float scaling, int32_t* ids,
                  float* weights, cudaStream_t stream);

// out[r,:] = in[src[r],:] for r < rows (BF16 rows of `dim`): gathers tokens per expert.
cudaError_t GatherRows(const bf16_t* in, const int32_t* src, int64_t rows, int64_t dim, bf16_t* out,
                       cudaStream_t stream);

// out[r,:] = in[src[r],:] for r < rows (f32 rows of `dim`): picks the rows the LM head needs.
cudaError_t GatherRowsF32(const float* in, const int32_t* src, int64_t rows, int64_t dim, float* out,
                          cudaStream_t stream);

// out[r] = argmax of row r of x [rows, cols] (f32), the lowest index on ties, as
// std::max_element; NaN never wins over a number.
cudaError_t ArgmaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out, cudaStream_t stream);

// Weighted combine in top-k order: out[t,:] = Σ_j w[t,j]·Σ_s y[rows[(t·k + j)·splits + s],:],
// terms added in j order like the CPU LocalExperts.
cudaError_t MoeCombine(const float* y, const int32_t* rows, const float* weights, int64_t num_tokens,
                       int64_t top_k, int64_t dim, int splits, float* out, cudaStream_t stream);

// MLA: from kv [T][nh][nope+dv] and the compressed rows c [T][ca] (k_rope at c + t·ca + kvr),
// writes per-head k [T][nh][nope+rope] and v [T][nh][dv] (expanded as the CPU backend does).
cudaError_t MlaExpandKv(const float* kv, const float* c, int64_t num_tokens, int64_t nh, int64_t nope,
                        int64_t rope, int64_t dv, int64_t ca, int64_t kvr, float* k, float* v, cudaStream_t stream);

}  // namespace eep::cuda
