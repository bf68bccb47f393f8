// Programmatic dependent launch (sm_90), internal to src/kernels/cuda (ops.cu, moe_mma.cu).
// Kernels launched by LaunchPdl may start while the previous kernel of the stream finishes;
// each calls PdlTriggerDependents (lets its successor start early) and PdlWaitPrerequisites
// (waits for its predecessor's results) before reading anything a previous kernel wrote.
// EEP_CUDA_PDL=0: plain launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <utility>

namespace eep::cuda {

#ifdef EEP_PDL_TRACE
// Measurement builds only (-DEEP_PDL_TRACE): thread 0 of a grid's first and last block records
// when the block started (kind 0, at PdlTriggerDependents), when its wait for the predecessor
// returned (kind 1) and when it ended (kind 2, EEP_PDL_TRACE_END), with its SM, grid size and
// block index: the timeline of a decode step as the GPU ran it, PDL overlap included (ncu
// serialises kernels). Per translation unit; see PdlTraceSet (ops.h).
struct PdlTraceBuf {
  unsigned long long* ev = nullptr;  // [cap][2]: time (ns), packed kind | sm | grid | block
  unsigned* count = nullptr;
  unsigned cap = 0;
};
static __device__ PdlTraceBuf g_pdl_trace;
// Kinds 0-2 (start, wait returned, thread 0 done) in the first and last block of a grid only (one
// counter for all: fewer atomics keep the timeline close to an untraced run); kind 3 (a kernel's
// own mark) wherever it is called.
__device__ __forceinline__ void PdlTraceEvent(unsigned long long kind) {
  if (threadIdx.x != 0 || threadIdx.y != 0 || g_pdl_trace.ev == nullptr) return;
  const unsigned lin = blockIdx.x + gridDim.x * blockIdx.y, last = gridDim.x * gridDim.y - 1;
  if (kind < 3 && lin != 0 && lin != last) return;
  unsigned long long t;
  unsigned sm;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  const unsigned i = atomicAdd(g_pdl_trace.count, 1u);
  if (i >= g_pdl_trace.cap) return;
  const unsigned long long grid = gridDim.x * gridDim.y * gridDim.z, block = blockIdx.x + gridDim.x * blockIdx.y;
  g_pdl_trace.ev[2 * i] = t;
  g_pdl_trace.ev[2 * i + 1] = kind << 62 | static_cast<unsigned long long>(sm & 0xff) << 48 | (grid & 0xffffff) << 24 |
                              (block & 0xffffff);
}
struct PdlTraceEndGuard {
  __device__ ~PdlTraceEndGuard() { PdlTraceEvent(2); }
};
#define EEP_PDL_TRACE_END ::eep::cuda::PdlTraceEndGuard pdl_trace_end_guard_
#else
__device__ __forceinline__ void PdlTraceEvent(unsigned long long) {}
#define EEP_PDL_TRACE_END (void)0
#endif

__device__ __forceinline__ void PdlTriggerDependents() {
  PdlTraceEvent(0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void PdlWaitPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  PdlTraceEvent(1);
}

inline bool PdlLaunchEnabled() {
  static const bool on = [] {
    const char* v = std::getenv("EEP_CUDA_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                      Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = PdlLaunchEnabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace eep::cuda
