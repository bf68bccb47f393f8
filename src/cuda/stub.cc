// The CUDA backend when eep is built without CUDA (EEP_ENABLE_CUDA=OFF): everything reports
// that the backend is unavailable, so callers and tests need no #ifdefs.
#include "cuda/cuda_model.h"

#include <fmt/format.h>

#include "core/logging.h"

namespace eep::cuda {

namespace {
Status NoCuda() { return Status::Unavailable("eep was built without CUDA (EEP_ENABLE_CUDA=OFF); use --backend cpu"); }
}  // namespace

bool Available() { return false; }
int DeviceCount() { return 0; }
std::string DeviceDescription() { return "none (built without CUDA)"; }

Result<std::string> ResolveBackend(const std::string& requested) {
  if (requested == "cpu") return std::string("cpu");
  if (requested == "cuda") return Status::Unavailable("--backend cuda: eep was built without CUDA (EEP_ENABLE_CUDA=OFF)");
  if (requested != "auto")
    return Status::InvalidArgument(fmt::format("--backend must be auto, cpu or cuda, not '{}'", requested));
  static const bool logged = [] {
    EEP_LOG_DEBUG("backend auto: cpu (eep was built without CUDA)");
    return true;
  }();
  (void)logged;
  return std::string("cpu");
}

struct CudaKvCache::Impl {};
CudaKvCache::CudaKvCache() = default;
CudaKvCache::~CudaKvCache() = default;
int64_t CudaKvCache::length() const { return 0; }
void CudaKvCache::Clear() {}
void CudaKvCache::Truncate(int64_t) {}

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
int CudaModel::device() const { return 0; }
Status CudaModel::ConfigureExpertSlots(ExpertMap, int64_t, int64_t) { return NoCuda(); }
void CudaModel::SetMoeExecutor(MoeExecutor*) {}
void CudaModel::SetRouteObserver(RouteObserver, bool) {}
Status CudaModel::Submit(std::span<CudaSeqStep>) { return NoCuda(); }
Status CudaModel::Collect() { return Status::Ok(); }
size_t CudaModel::queued_steps() const { return 0; }
Status CudaModel::RunExpertRows(int64_t, const int32_t*, const float*, int64_t, float*) { return NoCuda(); }
int64_t CudaModel::slot_bytes() const { return 0; }
int64_t CudaModel::MoeLayerId(int64_t) const { return -1; }
Status CudaModel::RestoreExperts(backup::ExpertBackupClient&, std::span<const SlotRestore>, RestoreStats*) {
  return NoCuda();
}
Result<uint64_t> CudaModel::PrepareRestore(backup::ExpertBackupClient&) { return NoCuda(); }
void CudaModel::set_restore_staging_bytes(uint64_t) {}
void CudaModel::set_restore_direct(bool) {}
Status CudaModel::ReadSlot(int64_t, int64_t, std::vector<uint16_t>*) const { return NoCuda(); }
Status CudaModel::ClearSlot(int64_t, int64_t) { return NoCuda(); }
Result<void*> CudaModel::SlotAddress(int64_t, int64_t) const { return NoCuda(); }
Status CopyBatch(std::span<const CopyItem>) { return NoCuda(); }
Status PrepareCopyBatch(int) { return NoCuda(); }
Status CudaModel::SetSlotFromDevice(int64_t, int64_t, const void*) { return NoCuda(); }
Result<std::unique_ptr<DeviceMemory>> DeviceMemory::Allocate(int, uint64_t) { return NoCuda(); }
DeviceMemory::~DeviceMemory() = default;
Status DeviceMemory::CopyFromHost(uint64_t, const void*, uint64_t) { return NoCuda(); }

Result<std::unique_ptr<HostRegistration>> HostRegistration::Register(void*, uint64_t, bool) { return NoCuda(); }
HostRegistration::~HostRegistration() = default;
Result<double> MeasurePinnedH2DGBps(uint64_t, int) { return NoCuda(); }
Result<double> MeasureDeviceCopyGBps(uint64_t, int) { return NoCuda(); }

Result<std::vector<int64_t>> Generate(CudaModel&, const std::vector<int64_t>&, const GenerateOptions&) {
  return NoCuda();
}

}  // namespace eep::cuda
