// A StepEngine without a model, for scheduler tests: the next token is a hash of the sequence's
// whole history, so outputs do not depend on batching, and every step's batch is recorded.
#pragma once

#include <fmt/format.h>

#include <map>
#include <mutex>
#include <set>

#include "serve/serve.h"

namespace eep::serve::test {

class FakeStepEngine : public StepEngine {
 public:
  struct StepRecord {
    std::vector<int64_t> seq_ids;
    std::vector<int64_t> num_tokens;
    std::vector<bool> prefill;
    int64_t total_tokens = 0;
  };

  explicit FakeStepEngine(int64_t max_position = 1024) {
    config_.vocab_size = 512;
    config_.max_position_embeddings = max_position;
    config_.num_experts = 4;
  }

  // The token a sequence with this history produces (what the engine does, for expectations).
  static int64_t NextToken(const std::vector<int64_t>& history) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t t : history) h = (h ^ static_cast<uint64_t>(t)) * 1099511628211ull;
    return static_cast<int64_t>(h % 500);
  }
  static std::vector<int64_t> Expected(std::vector<int64_t> history, int64_t n) {
    std::vector<int64_t> out;
    for (int64_t i = 0; i < n; ++i) {
      out.push_back(NextToken(history));
      history.push_back(out.back());
    }
    return out;
  }

  Result<std::vector<ep::SeqOutput>> Step(const std::vector<ep::SeqInput>& inputs) override {
    std::unique_lock lk(mu_);
    gate_cv_.wait(lk, [&] { return open_steps_ != 0; });
    if (open_steps_ > 0) --open_steps_;
    for (int64_t id : pending_release_) {
      seqs_.erase(id);
      released_.insert(id);
    }
    pending_release_.clear();
    if (fail_at_step_ >= 0 && static_cast<int64_t>(steps_.size()) == fail_at_step_)
      return Status::RemoteDisconnect("rank 1 exited on signal 9");
    StepRecord rec;
    std::vector<ep::SeqOutput> out;
    for (const auto& in : inputs) {
      auto it = seqs_.find(in.seq_id);
      const bool prefill = it == seqs_.end();
      if (prefill) {
        if (released_.count(in.seq_id))
          return Status::Internal(fmt::format("sequence {} used after release", in.seq_id));
        it = seqs_.emplace(in.seq_id, std::vector<int64_t>{}).first;
      } else if (in.new_ids.size() != 1) {
        return Status::Internal(
            fmt::format("decode of sequence {} with {} tokens", in.seq_id, in.new_ids.size()));
      }
      it->second.insert(it->second.end(), in.new_ids.begin(), in.new_ids.end());
      if (static_cast<int64_t>(it->second.size()) > config_.max_position_embeddings)
        return Status::OutOfRange("sequence exceeds max_position_embeddings");
      rec.seq_ids.push_back(in.seq_id);
      rec.num_tokens.push_back(static_cast<int64_t>(in.new_ids.size()));
      rec.prefill.push_back(prefill);
      rec.total_tokens += static_cast<int64_t>(in.new_ids.size());
      out.push_back({in.seq_id, NextToken(it->second), {}});
    }
    steps_.push_back(rec);
    cv_.notify_all();
    return out;
  }
  void Release(int64_t seq_id) override {
    std::lock_guard lk(mu_);
    pending_release_.push_back(seq_id);
    ++releases_;
  }
  ep::ClusterInfo Cluster() const override {
    std::lock_guard lk(mu_);
    ep::ClusterInfo c;
    c.steps = static_cast<int64_t>(steps_.size());
    c.ranks.push_back({0, 1234, "alive", static_cast<int64_t>(seqs_.size()), ""});
    return c;
  }
  std::vector<int64_t> ExpertLoad() const override { return std::vector<int64_t>(4, 0); }
  int64_t NumMoeLayers() const override { return 1; }
  EplbTotals Eplb() const override { return {}; }
  const ModelConfig& config() const override { return config_; }
  void Shutdown() override {}

  // Steps run only while the gate is open: -1 = always, n = n more steps.
  void SetGate(int64_t open_steps) {
    {
      std::lock_guard lk(mu_);
      open_steps_ = open_steps;
    }
    gate_cv_.notify_all();
  }
  void FailAtStep(int64_t step) {
    std::lock_guard lk(mu_);
    fail_at_step_ = step;
  }
  // Waits (bounded) until `n` steps have run.
  bool WaitSteps(size_t n, std::chrono::seconds timeout = std::chrono::seconds(20)) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] { return steps_.size() >= n; });
  }
  std::vector<StepRecord> steps() const {
    std::lock_guard lk(mu_);
    return steps_;
  }
  int64_t releases() const {
    std::lock_guard lk(mu_);
    return releases_;
  }

 private:
  ModelConfig config_;
  mutable std::mutex mu_;
  std::condition_variable cv_, gate_cv_;
  int64_t open_steps_ = -1;
  int64_t fail_at_step_ = -1;
  std::map<int64_t, std::vector<int64_t>> seqs_;
  std::set<int64_t> released_;
  std::vector<int64_t> pending_release_;
  std::vector<StepRecord> steps_;
  int64_t releases_ = 0;
};

}  // namespace eep::serve::test
