// The CUDA backend behind the compute interface (an adapter over cuda::CudaModel), and the
// table of backends that OpenComputeModel picks from. Compiled in CUDA and stub builds alike.
#include "cuda/compute_cuda.h"

#include <fmt/format.h>

#include <vector>

namespace eep {
namespace cuda {
namespace {

class CudaCache final : public ComputeCache {
 public:
  CudaCache(const ComputeModel* owner, std::unique_ptr<CudaKvCache> kv) : ComputeCache(owner), kv(std::move(kv)) {}
  int64_t length() const override { return kv->length(); }
  void Truncate(int64_t n) override { kv->Truncate(n); }
  std::unique_ptr<CudaKvCache> kv;
};

class CudaComputeModel final : public ComputeModel {
 public:
  explicit CudaComputeModel(std::unique_ptr<CudaModel> model) : model_(std::move(model)) {}

  const char* name() const override { return "cuda"; }
  const ModelConfig& config() const override { return model_->config(); }
  std::unique_ptr<ComputeCache> NewCache() const override {
    return std::make_unique<CudaCache>(this, model_->NewCache());
  }
  void SetMoeExecutor(MoeExecutor* executor) override { model_->SetMoeExecutor(executor); }
  void SetRouteObserver(RouteObserver observer) override { model_->SetRouteObserver(std::move(observer)); }
  void SetRouteCounter(RouteObserver observer) override { model_->SetRouteObserver(std::move(observer), true); }
  CudaModel* model() { return model_.get(); }

 protected:
  Status ForwardChecked(std::span<ComputeStep> batch) override {
    steps_.clear();
    for (const ComputeStep& s : batch)
      steps_.push_back({static_cast<CudaCache*>(s.cache)->kv.get(), s.ids, s.all_logits, s.logits, s.greedy_token});
    return model_->Forward(steps_);
  }

 private:
  std::unique_ptr<CudaModel> model_;
  std::vector<CudaSeqStep> steps_;  // reused across forwards
};

}  // namespace

Result<std::unique_ptr<ComputeModel>> OpenCudaComputeModel(const std::string& dir, const ComputeOptions& options) {
  CudaLoadOptions lo;
  lo.device = options.device;
  lo.load_experts = options.load_experts;
  EEP_ASSIGN_OR_RETURN_CTX(auto model, CudaModel::Load(dir, lo), "--backend cuda");
  return std::unique_ptr<ComputeModel>(std::make_unique<CudaComputeModel>(std::move(model)));
}

CudaModel* CudaModelOf(ComputeModel& model) {
  auto* m = dynamic_cast<CudaComputeModel*>(&model);
  return m != nullptr ? m->model() : nullptr;
}

CudaKvCache* CudaKvCacheOf(ComputeCache& cache) {
  auto* c = dynamic_cast<CudaCache*>(&cache);
  return c != nullptr ? c->kv.get() : nullptr;
}

}  // namespace cuda

namespace {

// Every backend, by --backend name. A new backend is one line here.
struct Backend {
  const char* name;
  Result<std::unique_ptr<ComputeModel>> (*open)(const std::string& dir, const ComputeOptions& options);
};
constexpr Backend kBackends[] = {
    {"cpu", OpenCpuComputeModel},
    {"cuda", cuda::OpenCudaComputeModel},
};

}  // namespace

Result<std::unique_ptr<ComputeModel>> OpenComputeModel(const std::string& backend, const std::string& dir,
                                                       const ComputeOptions& options) {
  // "auto" becomes a name; unknown names and "cuda" without a GPU fail here, naming --backend.
  EEP_ASSIGN_OR_RETURN(const std::string name, cuda::ResolveBackend(backend));
  for (const Backend& b : kBackends)
    if (name == b.name) return b.open(dir, options);
  return Status::InvalidArgument(fmt::format("--backend {}: no such compute backend", name));
}

}  // namespace eep
