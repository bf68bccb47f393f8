// CPU reference kernels (f32). The CPU backend is the reference every other backend is
// tested against, so these favour clarity and exactness over cleverness; GEMMs go to
// OpenBLAS, which uses every core.
#pragma once

#include <cstdint>
#include <functional>

namespace eep::cpu {

// y[T,out] = x[T,in] · W[out,in]ᵀ (+ bias[out] when bias != nullptr). Row-major.
void Linear(const float* x, int64_t num_tokens, int64_t in_features, const float* weight,
            int64_t out_features, const float* bias, float* y);

// y[r] = w ⊙ x[r] / sqrt(mean(x[r]²) + eps) for each of `rows` rows of length `dim`.
// In-place (y == x) is allowed.
void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* y);

// out[i] = silu(gate[i]) * up[i].
void SiluMul(const float* gate, const float* up, int64_t n, float* out);

// In-place softmax over `n` values.
void Softmax(float* v, int64_t n);

// RoPE on one head vector of length `dim` at angles given by cos/sin tables of length dim/2.
// rotate_half layout: pairs (i, i + dim/2). Interleaved layout: pairs (2i, 2i+1), written
// back de-interleaved as transformers does (y[i], y[dim/2+i]).
void RopeRotateHalf(float* v, int64_t dim, const float* cos, const float* sin);
void RopeInterleaved(float* v, int64_t dim, const float* cos, const float* sin);

// Causal attention of one query head over `num_keys` cached keys:
// out[dv] = softmax(q·Kᵀ·scale)·V with K row stride `k_stride` and V row stride `v_stride`.
// `scratch` holds num_keys floats.
void AttendOneHead(const float* q, const float* k, int64_t k_stride, const float* v,
                   int64_t v_stride, int64_t num_keys, int64_t qk_dim, int64_t v_dim,
                   float scale, float* scratch, float* out);

// Indices of the k largest values (ties: lower index first, as torch.topk on CPU), in
// descending order of value.
void TopK(const float* values, int64_t n, int64_t k, int32_t* out_indices);

// Calls fn(i) for i in [begin, end) on up to NumThreads() threads; blocks until done.
void ParallelFor(int64_t begin, int64_t end, const std::function<void(int64_t)>& fn);
int NumThreads();

}  // namespace eep::cpu
