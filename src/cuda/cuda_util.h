// CUDA/cuBLAS error macros that turn failures into a Status naming the call, and RAII owners
// for device memory, streams and cuBLAS handles. Only for code built with CUDA.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <atomic>
#include <memory>
#include <type_traits>

#include "core/status.h"

#define EEP_CUDA_RETURN_IF_ERROR(expr)                                                              \
  do {                                                                                              \
    cudaError_t eep_cuda_err_ = (expr);                                                             \
    if (eep_cuda_err_ != cudaSuccess)                                                               \
      return ::eep::Status::Internal(fmt::format("{} failed: {} ({}:{})", #expr,                    \
                                                 cudaGetErrorString(eep_cuda_err_), __FILE__, __LINE__)); \
  } while (0)

#define EEP_CUBLAS_RETURN_IF_ERROR(expr)                                                            \
  do {                                                                                              \
    cublasStatus_t eep_cublas_err_ = (expr);                                                        \
    if (eep_cublas_err_ != CUBLAS_STATUS_SUCCESS)                                                   \
      return ::eep::Status::Internal(fmt::format("{} failed: {} ({}:{})", #expr,                    \
                                                 cublasGetStatusString(eep_cublas_err_), __FILE__, __LINE__)); \
  } while (0)

namespace eep::cuda {

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
template <typename T>
using DevicePtr = std::unique_ptr<T, DeviceFree>;

template <typename T>
Result<DevicePtr<T>> DeviceAlloc(size_t count) {
  void* p = nullptr;
  if (count == 0) return DevicePtr<T>();
  cudaError_t e = cudaMalloc(&p, count * sizeof(T));
  if (e != cudaSuccess)
    return Status::ResourceExhausted(
        fmt::format("cudaMalloc of {} bytes failed: {}", count * sizeof(T), cudaGetErrorString(e)));
  return DevicePtr<T>(static_cast<T*>(p));
}

struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
using StreamPtr = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy>;

struct CublasDestroy {
  void operator()(cublasHandle_t h) const { cublasDestroy(h); }
};
using CublasPtr = std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, CublasDestroy>;

// A grow-only device buffer for per-forward scratch.
class DeviceBuffer {
 public:
  Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return Status::Ok();
    cudaDeviceSynchronize();  // work queued on the old buffer must finish before it is freed
    ptr_.reset();
    EEP_ASSIGN_OR_RETURN(ptr_, DeviceAlloc<uint8_t>(bytes));
    bytes_ = bytes;
    generation_.fetch_add(1, std::memory_order_relaxed);
    return Status::Ok();
  }
  // Bumped whenever any DeviceBuffer of the process moves: CUDA graphs captured over these
  // buffers are stale once it changes.
  static uint64_t generation() { return generation_.load(std::memory_order_relaxed); }
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(ptr_.get());
  }

 private:
  DevicePtr<uint8_t> ptr_;
  size_t bytes_ = 0;
  static inline std::atomic<uint64_t> generation_{0};
};

}  // namespace eep::cuda
