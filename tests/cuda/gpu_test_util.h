// Shared by the GPU tests: skip (clearly, naming why) where no CUDA device is usable.
#pragma once

#include <gtest/gtest.h>

#include "cuda/cuda_model.h"

// In a TEST body: skips the test with "no CUDA device (...): GPU <what> test skipped".
#define EEP_REQUIRE_GPU(what)                                                                   \
  do {                                                                                          \
    if (!::eep::cuda::Available())                                                              \
      GTEST_SKIP() << "no CUDA device (" << ::eep::cuda::DeviceDescription() << "): GPU " what \
                   << " test skipped";                                                          \
  } while (0)

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#ifdef EEP_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace eep::gpu_test {

// n normal values (mean 0, standard deviation `scale`) from `seed`.
inline std::vector<float> Random(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

#ifdef EEP_WITH_CUDA
// A device copy of a host vector, freed at scope exit.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) {
    EXPECT_EQ(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::vector<T> Host() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  // All bits set: NaN for f32 (outputs a kernel fails to write stay NaN).
  void Poison() { EXPECT_EQ(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
};
#endif

}  // namespace eep::gpu_test
