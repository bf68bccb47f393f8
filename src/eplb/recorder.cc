// LoadRecorder: lock-free per-token counting on the hot path, windowed sums off it.
#include <string>

#include "eplb/eplb.h"

namespace eep::eplb {

Result<std::unique_ptr<LoadRecorder>> LoadRecorder::Create(int32_t num_layers, int32_t num_experts,
                                                           int32_t window_steps) {
  if (num_layers <= 0) return Status::InvalidArgument("num_layers: must be positive");
  if (num_experts <= 0) return Status::InvalidArgument("num_experts: must be positive");
  if (window_steps <= 0) return Status::InvalidArgument("window_steps: must be positive");
  const size_t cells = static_cast<size_t>(num_layers) * num_experts;
  if (cells * static_cast<size_t>(window_steps) > (size_t{1} << 28)) {
    return Status::InvalidArgument("window_steps: window of " + std::to_string(window_steps) +
                                   " steps x " + std::to_string(cells) + " counters is too large");
  }
  return std::unique_ptr<LoadRecorder>(new LoadRecorder(num_layers, num_experts, window_steps));
}

LoadRecorder::LoadRecorder(int32_t num_layers, int32_t num_experts, int32_t window_steps)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      window_(window_steps),
      cells_(static_cast<size_t>(num_layers) * num_experts),
      ring_(cells_ * window_steps, 0),
      totals_(cells_, 0) {
  for (auto& buf : live_) {
    buf = std::make_unique<std::atomic<uint32_t>[]>(cells_);
    for (size_t i = 0; i < cells_; ++i) buf[i].store(0, std::memory_order_relaxed);
  }
}

void LoadRecorder::Record(int32_t layer, std::span<const int32_t> expert_ids) {
  if (layer < 0 || layer >= num_layers_) {
    dropped_.fetch_add(static_cast<int64_t>(expert_ids.size()), std::memory_order_relaxed);
    return;
  }
  std::atomic<uint32_t>* row = live_[live_index_.load(std::memory_order_acquire)].get() +
                               static_cast<size_t>(layer) * num_experts_;
  int64_t bad = 0;
  for (int32_t e : expert_ids) {
    if (static_cast<uint32_t>(e) < static_cast<uint32_t>(num_experts_)) {
      row[e].fetch_add(1, std::memory_order_relaxed);
    } else {
      ++bad;
    }
  }
  if (bad) dropped_.fetch_add(bad, std::memory_order_relaxed);
}

void LoadRecorder::RecordCounts(int32_t layer, std::span<const int64_t> counts) {
  if (layer < 0 || layer >= num_layers_ || counts.size() != static_cast<size_t>(num_experts_)) {
    int64_t n = 0;
    for (int64_t c : counts) n += c > 0 ? c : 0;
    dropped_.fetch_add(n, std::memory_order_relaxed);
    return;
  }
  std::atomic<uint32_t>* row = live_[live_index_.load(std::memory_order_acquire)].get() +
                               static_cast<size_t>(layer) * num_experts_;
  for (int32_t e = 0; e < num_experts_; ++e) {
    if (counts[e] > 0)
      row[e].fetch_add(static_cast<uint32_t>(counts[e]), std::memory_order_relaxed);
  }
}

void LoadRecorder::AdvanceStep() {
  std::lock_guard<std::mutex> lock(mu_);
  const int closing = live_index_.load(std::memory_order_relaxed);
  live_index_.store(1 - closing, std::memory_order_release);
  // Writers that loaded the old index before the flip may still add into `closing`; exchange
  // takes what is there now; whatever lands later stays in this buffer and is drained when it
  // closes again, so it counts toward a later step instead of being lost.
  std::atomic<uint32_t>* buf = live_[closing].get();
  uint32_t* slot = ring_.data() + static_cast<size_t>(steps_ % window_) * cells_;
  for (size_t i = 0; i < cells_; ++i) {
    const uint32_t v = buf[i].exchange(0, std::memory_order_relaxed);
    totals_[i] += static_cast<int64_t>(v) - static_cast<int64_t>(slot[i]);
    slot[i] = v;
  }
  ++steps_;
}

std::vector<int64_t> LoadRecorder::SnapshotCounts() const {
  std::lock_guard<std::mutex> lock(mu_);
  return totals_;
}

LoadMatrix LoadRecorder::Snapshot() const {
  std::vector<int64_t> counts = SnapshotCounts();
  LoadMatrix m;
  m.num_layers = num_layers_;
  m.num_experts = num_experts_;
  m.values.resize(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) m.values[i] = static_cast<float>(counts[i]);
  return m;
}

int64_t LoadRecorder::steps() const {
  std::lock_guard<std::mutex> lock(mu_);
  return steps_;
}

}  // namespace eep::eplb
