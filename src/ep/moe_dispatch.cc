// Dispatch / compute / combine of one MoE layer across ranks.
//
// Dispatch message to rank d: `// [uint32 count][count × int32 slot][count × H floats]`;
// rank d answers with `// [count × H floats]` in the same order. Results are combined per
// token in top-k order, so placement does not change the summation order.
#include <algorithm>
#include <cstring>
#include <fmt/format.h>

#include "ep/ep.h"

namespace eep::ep {

EpMoeExecutor::EpMoeExecutor(const ModelConfig& config, LocalExperts* experts, Communicator* comm,
                             const SlotLayout& layout, ExpertRowRunner runner)
    : config_(config), experts_(experts), comm_(comm), layout_(layout), runner_(std::move(runner)) {}

Status EpMoeExecutor::Run(int64_t moe_layer, const float* x, int64_t num_tokens, int64_t top_k,
                          const int32_t* ids, const float* weights, float* out) {
  const int world = comm_->world_size(), me = comm_->rank();
  const int64_t H = config_.hidden_size;
  const size_t row_bytes = static_cast<size_t>(H) * sizeof(float);
  const ExpertMap& map = experts_->map();

  // 1. Choose a replica for every (token, choice): a local one first, else a fixed spread.
  std::vector<std::vector<int32_t>> slots_to(static_cast<size_t>(world));
  std::vector<std::vector<int64_t>> items_to(static_cast<size_t>(world));  // t*k+j per dest
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t item = t * top_k + j;
      const auto& reps = map.Replicas(moe_layer, ids[item]);
      int32_t chosen = -1;
      int64_t num_local = 0;
      for (int32_t s : reps) num_local += layout_.RankOfSlot(s) == me;
      if (num_local > 0) {
        int64_t pick = t % num_local;
        for (int32_t s : reps)
          if (layout_.RankOfSlot(s) == me && pick-- == 0) chosen = s;
      } else {
        chosen = reps[static_cast<size_t>((t + me) % static_cast<int64_t>(reps.size()))];
      }
      const int dest = layout_.RankOfSlot(chosen);
      slots_to[static_cast<size_t>(dest)].push_back(chosen);
      items_to[static_cast<size_t>(dest)].push_back(item);
    }
  }
  // 2. Dispatch.
  std::vector<std::vector<uint8_t>> send(static_cast<size_t>(world)), recv;
  for (int d = 0; d < world; ++d) {
    const auto& slots = slots_to[static_cast<size_t>(d)];
    const auto& items = items_to[static_cast<size_t>(d)];
    const uint32_t count = static_cast<uint32_t>(slots.size());
    auto& buf = send[static_cast<size_t>(d)];
    buf.resize(4 + count * 4 + count * row_bytes);
    std::memcpy(buf.data(), &count, 4);
    std::memcpy(buf.data() + 4, slots.data(), count * 4);
    for (uint32_t i = 0; i < count; ++i)
      std::memcpy(buf.data() + 4 + count * 4 + i * row_bytes, x + (items[i] / top_k) * H, row_bytes);
  }
  auto spans = [](const std::vector<std::vector<uint8_t>>& bufs) {
    std::vector<std::span<const uint8_t>> s;
    for (const auto& b : bufs) s.emplace_back(b.data(), b.size());
    return s;
  };
  EEP_RETURN_IF_ERROR_CTX(comm_->AllToAllV(spans(send), &recv), "dispatch");

  // 3. Compute what we received, one slot at a time (rows grouped per slot).
  std::vector<std::vector<uint8_t>> answer(static_cast<size_t>(world));
  struct Received {
    uint32_t count = 0;
    const uint8_t* slots = nullptr;  // count × int32 (unaligned)
    const float* rows = nullptr;     // count × H
  };
  auto Parse = [&](int src) -> Result<Received> {
    const auto& buf = recv[static_cast<size_t>(src)];
    if (buf.size() < 4) return Status::Corruption(fmt::format("dispatch from rank {}: short message", src));
    Received r;
    std::memcpy(&r.count, buf.data(), 4);
    if (buf.size() != 4 + r.count * 4 + r.count * row_bytes)
      return Status::Corruption(fmt::format("dispatch from rank {}: {} bytes for {} rows", src, buf.size(), r.count));
    r.slots = buf.data() + 4;
    r.rows = reinterpret_cast<const float*>(buf.data() + 4 + r.count * 4);
    return r;
  };
  if (runner_) {
    // Every received row in one batch (one device round trip), answers split back per source.
    row_slots_.clear();
    rows_.clear();
    std::vector<size_t> first_row(static_cast<size_t>(world) + 1, 0);
    for (int src = 0; src < world; ++src) {
      EEP_ASSIGN_OR_RETURN(Received got, Parse(src));
      const uint32_t count = got.count;
      const size_t at = row_slots_.size();
      row_slots_.resize(at + count);
      std::memcpy(row_slots_.data() + at, got.slots, count * 4);
      rows_.insert(rows_.end(), got.rows, got.rows + static_cast<size_t>(count) * static_cast<size_t>(H));
      first_row[static_cast<size_t>(src) + 1] = row_slots_.size();
    }
    for (int32_t s : row_slots_)
      if (!experts_->Holds(s)) return Status::Internal(fmt::format("dispatch names slot {}, not held here", s));
    results_.resize(rows_.size());
    EEP_RETURN_IF_ERROR_CTX(runner_(moe_layer, row_slots_.data(), rows_.data(),
                                    static_cast<int64_t>(row_slots_.size()), results_.data()),
                            fmt::format("{} dispatched rows", row_slots_.size()));
    for (int src = 0; src < world; ++src) {
      const size_t b = first_row[static_cast<size_t>(src)], e = first_row[static_cast<size_t>(src) + 1];
      auto& ans = answer[static_cast<size_t>(src)];
      ans.resize((e - b) * row_bytes);
      if (e > b) std::memcpy(ans.data(), results_.data() + b * static_cast<size_t>(H), (e - b) * row_bytes);
    }
  }
  for (int src = 0; src < world && !runner_; ++src) {
    EEP_ASSIGN_OR_RETURN(Received got, Parse(src));
    const uint32_t count = got.count;
    std::vector<int32_t> slots(count);
    std::memcpy(slots.data(), got.slots, count * 4);
    const float* in = got.rows;
    auto& ans = answer[static_cast<size_t>(src)];
    ans.resize(count * row_bytes);
    float* y = reinterpret_cast<float*>(ans.data());
    // Rows for the same slot are contiguous runs only by chance; gather them.
    std::vector<uint32_t> order(count);
    for (uint32_t i = 0; i < count; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return slots[a] < slots[b]; });
    for (uint32_t i = 0; i < count;) {
      uint32_t e = i;
      while (e < count && slots[order[e]] == slots[order[i]]) ++e;
      const int64_t n = e - i;
      rows_.resize(static_cast<size_t>(n * H));
      results_.resize(static_cast<size_t>(n * H));
      for (int64_t r = 0; r < n; ++r) std::memcpy(rows_.data() + r * H, in + order[i + r] * H, row_bytes);
      EEP_RETURN_IF_ERROR_CTX(experts_->RunSlot(moe_layer, slots[order[i]], rows_.data(), n, results_.data()),
                              fmt::format("rows from rank {}", src));
      for (int64_t r = 0; r < n; ++r) std::memcpy(y + order[i + r] * H, results_.data() + r * H, row_bytes);
      i = e;
    }
  }
  // 4. Combine: results come back in the order we sent them.
  EEP_RETURN_IF_ERROR_CTX(comm_->AllToAllV(spans(answer), &recv), "combine");
  std::vector<const float*> result_of(static_cast<size_t>(num_tokens * top_k), nullptr);
  for (int d = 0; d < world; ++d) {
    const auto& items = items_to[static_cast<size_t>(d)];
    const auto& buf = recv[static_cast<size_t>(d)];
    if (buf.size() != items.size() * row_bytes)
      return Status::Corruption(fmt::format("combine from rank {}: {} bytes for {} rows", d, buf.size(), items.size()));
    for (size_t i = 0; i < items.size(); ++i)
      result_of[static_cast<size_t>(items[i])] = reinterpret_cast<const float*>(buf.data()) + i * H;
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* o = out + t * H;
    std::fill(o, o + H, 0.0f);
    for (int64_t j = 0; j < top_k; ++j) {
      const float w = weights[t * top_k + j];
      const float* r = result_of[static_cast<size_t>(t * top_k + j)];
      for (int64_t i = 0; i < H; ++i) o[i] += w * r[i];
    }
  }
  return Status::Ok();
}

}  // namespace eep::ep
