// The CUDA backend behind the compute interface (model/compute.h), and the factory that opens
// any backend by its --backend name. It lives here, beside the CUDA backend, because this
// library sees every backend (eep_cuda links eep_model); in a build without CUDA the CUDA
// entry is the stub, whose load fails with kUnavailable.
#pragma once

#include <memory>
#include <string>

#include "core/status.h"
#include "cuda/cuda_model.h"
#include "model/compute.h"

namespace eep {

// Opens DIR on the backend named `backend`: "auto" (cuda when a CUDA device is visible, else
// cpu; see cuda::ResolveBackend), "cpu" or "cuda". kInvalidArgument naming --backend for any
// other name; kUnavailable for "cuda" without CUDA or a GPU; load errors of the CUDA backend
// carry "--backend cuda". The returned model is owned by the caller.
Result<std::unique_ptr<ComputeModel>> OpenComputeModel(const std::string& backend, const std::string& dir,
                                                       const ComputeOptions& options = {});

namespace cuda {

// Loads DIR onto CUDA device options.device (CudaLoadOptions' defaults otherwise).
Result<std::unique_ptr<ComputeModel>> OpenCudaComputeModel(const std::string& dir, const ComputeOptions& options = {});

// The CudaModel under a model opened on the CUDA backend, for what only it has (expert
// slots, RunExpertRows, restores, traces); null for any other backend. Owned by `model`.
// This typed accessor (ggml's ggml_backend_is_cuda) keeps the interface free of methods
// that the CPU would have to stub out.
CudaModel* CudaModelOf(ComputeModel& model);
// The device KV cache under a cache of such a model; null for any other backend's cache.
CudaKvCache* CudaKvCacheOf(ComputeCache& cache);

}  // namespace cuda
}  // namespace eep
