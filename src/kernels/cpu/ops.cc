#include "kernels/cpu/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <thread>
#include <vector>

namespace eep::cpu {

void Linear(const float* x, int64_t num_tokens, int64_t in_features, const float* weight,
            int64_t out_features, const float* bias, float* y) {
  if (num_tokens == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(out_features),
                static_cast<int>(in_features), 1.0f, weight, static_cast<int>(in_features), x, 1,
                0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(num_tokens),
                static_cast<int>(out_features), static_cast<int>(in_features), 1.0f, x,
                static_cast<int>(in_features), weight, static_cast<int>(in_features), 0.0f, y,
                static_cast<int>(out_features));
  }
  if (bias != nullptr) {
    for (int64_t t = 0; t < num_tokens; ++t)
      for (int64_t o = 0; o < out_features; ++o) y[t * out_features + o] += bias[o];
  }
}

void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double sum_sq = 0;
    for (int64_t i = 0; i < dim; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Softmax(float* v, int64_t n) {
  float max_v = *std::max_element(v, v + n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = std::exp(v[i] - max_v);
    sum += v[i];
  }
  float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

void RopeRotateHalf(float* v, int64_t dim, const float* cos, const float* sin) {
  int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i] + a * sin[i];
  }
}

void RopeInterleaved(float* v, int64_t dim, const float* cos, const float* sin) {
  int64_t half = dim / 2;
  float tmp[512];
  std::vector<float> big;
  float* out = tmp;
  if (dim > 512) {
    big.resize(static_cast<size_t>(dim));
    out = big.data();
  }
  for (int64_t i = 0; i < half; ++i) {
    float a = v[2 * i], b = v[2 * i + 1];
    out[i] = a * cos[i] - b * sin[i];
    out[half + i] = b * cos[i] + a * sin[i];
  }
  std::copy(out, out + dim, v);
}

void AttendOneHead(const float* q, const float* k, int64_t k_stride, const float* v,
                   int64_t v_stride, int64_t num_keys, int64_t qk_dim, int64_t v_dim,
                   float scale, float* scratch, float* out) {
  for (int64_t j = 0; j < num_keys; ++j) {
    const float* kj = k + j * k_stride;
    float dot = 0;
    for (int64_t i = 0; i < qk_dim; ++i) dot += q[i] * kj[i];
    scratch[j] = dot * scale;
  }
  Softmax(scratch, num_keys);
  std::fill(out, out + v_dim, 0.0f);
  for (int64_t j = 0; j < num_keys; ++j) {
    const float p = scratch[j];
    const float* vj = v + j * v_stride;
    for (int64_t i = 0; i < v_dim; ++i) out[i] += p * vj[i];
  }
}

void TopK(const float* values, int64_t n, int64_t k, int32_t* out_indices) {
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [values](int32_t a, int32_t b) {
    if (values[a] != values[b]) return values[a] > values[b];
    return a < b;
  });
  std::copy(idx.begin(), idx.begin() + k, out_indices);
}

int NumThreads() {
  static int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

void ParallelFor(int64_t begin, int64_t end, const std::function<void(int64_t)>& fn) {
  int64_t n = end - begin;
  int threads = static_cast<int>(std::min<int64_t>(NumThreads(), n));
  if (threads <= 1) {
    for (int64_t i = begin; i < end; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  auto work = [&](int t) {
    for (int64_t i = begin + t; i < end; i += threads) fn(i);
  };
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

}  // namespace eep::cpu
