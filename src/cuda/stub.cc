// The CUDA backend when eep is built without CUDA (EEP_ENABLE_CUDA=OFF): everything reports
// that the backend is unavailable, so callers and tests need no #ifdefs.
#include "cuda/cuda_model.h"

namespace eep::cuda {

namespace {
Status NoCuda() { return Status::Unavailable("eep was built without CUDA (EEP_ENABLE_CUDA=OFF); use --backend cpu"); }
}  // namespace

bool Available() { return false; }
std::string DeviceDescription() { return "none (built without CUDA)"; }

struct CudaKvCache::Impl {};
CudaKvCache::CudaKvCache() = default;
CudaKvCache::~CudaKvCache() = default;
int64_t CudaKvCache::length() const { return 0; }
void CudaKvCache::Clear() {}

struct CudaModel::Impl {
  ModelConfig config;
  ExpertMap map;
};
CudaModel::CudaModel() = default;
CudaModel::~CudaModel() = default;
Result<std::unique_ptr<CudaModel>> CudaModel::Load(const std::string&, const CudaLoadOptions&) { return NoCuda(); }
const ModelConfig& CudaModel::config() const { return impl_->config; }
Status CudaModel::Forward(std::span<CudaSeqStep>, CudaForwardTrace*) { return NoCuda(); }
const ExpertMap& CudaModel::expert_map() const { return impl_->map; }
Status CudaModel::SetSlot(int64_t, int64_t, DType, const void*, const void*, const void*) { return NoCuda(); }
Status CudaModel::SetExpertMap(ExpertMap) { return NoCuda(); }
int64_t CudaModel::weight_bytes() const { return 0; }

Result<std::vector<int64_t>> Generate(CudaModel&, const std::vector<int64_t>&, const GenerateOptions&) {
  return NoCuda();
}

}  // namespace eep::cuda
