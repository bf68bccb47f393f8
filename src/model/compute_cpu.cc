// The CPU reference backend behind the compute interface: an adapter over eep::Model.
#include <vector>

#include "model/compute.h"
#include "model/sampling.h"

namespace eep {
namespace {

class CpuCache final : public ComputeCache {
 public:
  explicit CpuCache(const ComputeModel* owner) : ComputeCache(owner) {}
  int64_t length() const override { return kv.length(); }
  void Truncate(int64_t n) override { kv.Truncate(n); }
  KvCache kv;
};

class CpuComputeModel final : public ComputeModel {
 public:
  explicit CpuComputeModel(std::unique_ptr<Model> model) : model_(std::move(model)) {}

  const char* name() const override { return "cpu"; }
  const ModelConfig& config() const override { return model_->config(); }
  std::unique_ptr<ComputeCache> NewCache() const override { return std::make_unique<CpuCache>(this); }
  void SetMoeExecutor(MoeExecutor* executor) override {
    model_->SetMoeExecutor(executor != nullptr ? executor : model_->local_experts());
  }
  void SetRouteObserver(RouteObserver observer) override { model_->SetRouteObserver(std::move(observer)); }

 protected:
  Status ForwardChecked(std::span<ComputeStep> batch) override {
    steps_.clear();
    scratch_.resize(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      const ComputeStep& s = batch[i];
      // A greedy token needs the logits on the host: the caller's, else a scratch row.
      std::vector<float>* logits = s.logits;
      if (logits == nullptr && s.greedy_token != nullptr) logits = &scratch_[i];
      steps_.push_back({&static_cast<CpuCache*>(s.cache)->kv, s.ids, s.all_logits, logits});
    }
    EEP_RETURN_IF_ERROR(model_->Forward(steps_));
    const int64_t V = model_->config().vocab_size;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].greedy_token == nullptr) continue;
      const std::vector<float>& l = *steps_[i].logits;
      if (l.size() < static_cast<size_t>(V)) continue;  // no new tokens: no logits
      *batch[i].greedy_token = ArgMax(l.data() + l.size() - static_cast<size_t>(V), V);
    }
    return Status::Ok();
  }

 private:
  std::unique_ptr<Model> model_;
  std::vector<SeqStep> steps_;               // reused across forwards
  std::vector<std::vector<float>> scratch_;  // logits of steps that want only the greedy token
};

}  // namespace

Result<std::unique_ptr<ComputeModel>> OpenCpuComputeModel(const std::string& dir, const ComputeOptions& options) {
  EEP_ASSIGN_OR_RETURN(auto model,
                       Model::Load(dir, {.load_experts = options.load_experts, .show_progress = options.show_progress}));
  return std::unique_ptr<ComputeModel>(std::make_unique<CpuComputeModel>(std::move(model)));
}

}  // namespace eep
