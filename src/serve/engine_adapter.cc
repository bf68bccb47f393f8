// StepEngine over the expert-parallel runtime.
#include "serve/serve.h"

namespace eep::serve {
namespace {

class EpStepEngine : public StepEngine {
 public:
  explicit EpStepEngine(std::unique_ptr<ep::EpEngine> engine) : engine_(std::move(engine)) {}
  ~EpStepEngine() override { engine_->Shutdown(); }

  Result<std::vector<ep::SeqOutput>> Step(const std::vector<ep::SeqInput>& inputs) override {
    return engine_->Step(inputs);
  }
  void Release(int64_t seq_id) override { engine_->Release(seq_id); }
  ep::ClusterInfo Cluster() const override { return engine_->Cluster(); }
  std::vector<int64_t> ExpertLoad() const override { return engine_->ExpertLoad(); }
  int64_t NumMoeLayers() const override {
    return static_cast<int64_t>(engine_->config().MoeLayers().size());
  }
  EplbTotals Eplb() const override {
    EplbTotals t;
    for (const auto& r : engine_->rebalances()) {
      ++t.rebalances;
      t.moved_experts += r.moved_experts;
    }
    return t;
  }
  const ModelConfig& config() const override { return engine_->config(); }
  void Shutdown() override { engine_->Shutdown(); }
  Status Poll() override { return engine_->Poll(); }
  Status Scale(int ep_size) override { return engine_->Scale(ep_size, /*wait=*/false); }

 private:
  std::unique_ptr<ep::EpEngine> engine_;
};

}  // namespace

std::unique_ptr<StepEngine> WrapEpEngine(std::unique_ptr<ep::EpEngine> engine) {
  return std::make_unique<EpStepEngine>(std::move(engine));
}

}  // namespace eep::serve
