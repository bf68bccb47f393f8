// DeepSeek's rebalance_experts, reproduced with the reference's float32 arithmetic and its
// ordering of equal values, plus the fault-aware wrapper and balancedness.
#include <algorithm>
#include <cmath>
#include <string>

#include "eplb/eplb.h"
#include "eplb/internal.h"

// The reference's order of equal values comes from libstdc++'s std::sort (see Planner::Pack).
#if !defined(__GLIBCXX__)
#warning "eplb: not libstdc++; plans may differ from the reference when loads tie exactly"
#endif

namespace eep::eplb {
namespace internal {
namespace {

struct Item {
  float w;
  int32_t idx;
};

// Per-call scratch so that the per-layer loops do not allocate.
class Planner {
 public:
  // balanced_packing for one row: n items into num_packs packs of exactly n / num_packs items,
  // heaviest first, each into the lightest pack that still has room (lowest index on ties).
  void Pack(const float* w, int32_t n, int32_t num_packs, int32_t* pack, int32_t* rank) {
    const int32_t per_pack = n / num_packs;
    if (per_pack == 1) {
      for (int32_t i = 0; i < n; ++i) {
        pack[i] = i;
        rank[i] = 0;
      }
      return;
    }
    items_.resize(n);
    for (int32_t i = 0; i < n; ++i) items_[i] = {w[i], i};
    // torch.sort(descending=True) on CPU with stable=False is std::sort over (value, index)
    // pairs with a value-only comparator. Running the same algorithm on the same sequence
    // gives the same order of equal values (such as two replicas of one expert), which
    // decides replica ranks; std::stable_sort would not.
    std::sort(items_.begin(), items_.end(), [](const Item& a, const Item& b) { return a.w > b.w; });
    // Python's min over the packs with room picks the lightest, lowest index first: that is
    // the minimum of (weight, index), kept here in a binary heap of the open packs.
    pack_w_.assign(num_packs, 0.0f);
    pack_n_.assign(num_packs, 0);
    heap_.resize(num_packs);
    for (int32_t p = 0; p < num_packs; ++p) heap_[p] = p;  // ascending: already a valid heap
    const auto lighter_last = [this](int32_t a, int32_t b) {
      return pack_w_[a] > pack_w_[b] || (pack_w_[a] == pack_w_[b] && a > b);
    };
    for (const Item& item : items_) {
      std::pop_heap(heap_.begin(), heap_.end(), lighter_last);
      const int32_t p = heap_.back();
      pack[item.idx] = p;
      rank[item.idx] = pack_n_[p];
      pack_w_[p] += item.w;  // float32 accumulation, as the reference's 0-dim tensors
      if (++pack_n_[p] == per_pack) {
        heap_.pop_back();
      } else {
        std::push_heap(heap_.begin(), heap_.end(), lighter_last);
      }
    }
  }

  // replicate_experts for one row: each redundant slot goes to the expert with the highest
  // weight / count (float32 division; first index on ties, as torch.max).
  void Replicate(const float* w, int32_t num_log, int32_t num_phy, int32_t* phy2log, int32_t* rank,
                 int32_t* cnt) {
    ratio_.resize(num_log);
    heap_.resize(num_log);
    for (int32_t i = 0; i < num_log; ++i) {
      phy2log[i] = i;
      rank[i] = 0;
      cnt[i] = 1;
      ratio_[i] = w[i];
      heap_[i] = i;
    }
    // torch.max returns the first index of the maximum: the top of (ratio desc, index asc).
    const auto smaller = [this](int32_t a, int32_t b) {
      return ratio_[a] < ratio_[b] || (ratio_[a] == ratio_[b] && a > b);
    };
    if (num_phy > num_log) std::make_heap(heap_.begin(), heap_.end(), smaller);
    for (int32_t i = num_log; i < num_phy; ++i) {
      std::pop_heap(heap_.begin(), heap_.end(), smaller);
      const int32_t best = heap_.back();
      phy2log[i] = best;
      rank[i] = cnt[best];
      ++cnt[best];
      ratio_[best] = w[best] / static_cast<float>(cnt[best]);
      std::push_heap(heap_.begin(), heap_.end(), smaller);
    }
  }

  void Run(const LoadMatrix& weight, int32_t num_replicas, int32_t num_groups, int32_t num_nodes,
           int32_t num_gpus, RawPlan* out) {
    const int32_t L = weight.num_layers, E = weight.num_experts;
    const int32_t group_size = E / num_groups;
    const int32_t groups_per_node = num_groups / num_nodes;
    const int32_t experts_per_node = E / num_nodes;
    const int32_t phys_per_node = num_replicas / num_nodes;
    const int32_t per_gpu = num_replicas / num_gpus;
    const int32_t gpus_per_node = num_gpus / num_nodes;

    out->phy2log.assign(static_cast<size_t>(L) * num_replicas, -1);
    out->phyrank.assign(static_cast<size_t>(L) * num_replicas, 0);
    out->logcnt.assign(static_cast<size_t>(L) * E, 0);
    group_w_.resize(num_groups);
    group_pack_.resize(num_groups);
    group_rank_.resize(num_groups);
    log2mlog_.resize(E);
    mlog2log_.resize(E);
    mlogcnt_.resize(E);
    node_w_.resize(experts_per_node);
    phy2mlog_.resize(phys_per_node);
    phyrank_.resize(phys_per_node);
    phy_w_.resize(phys_per_node);
    phy_pack_.resize(phys_per_node);
    phy_rank_in_pack_.resize(phys_per_node);

    for (int32_t l = 0; l < L; ++l) {
      const float* w = weight.values.data() + static_cast<size_t>(l) * E;
      // Step 1: pack expert groups to nodes.
      for (int32_t g = 0; g < num_groups; ++g) {
        float s = 0.0f;
        for (int32_t k = 0; k < group_size; ++k) s += w[g * group_size + k];
        group_w_[g] = s;
      }
      Pack(group_w_.data(), num_groups, num_nodes, group_pack_.data(), group_rank_.data());
      for (int32_t g = 0; g < num_groups; ++g) {
        const int32_t base = (group_pack_[g] * groups_per_node + group_rank_[g]) * group_size;
        for (int32_t k = 0; k < group_size; ++k) {
          log2mlog_[g * group_size + k] = base + k;
          mlog2log_[base + k] = g * group_size + k;
        }
      }
      int32_t* phy2log = out->phy2log.data() + static_cast<size_t>(l) * num_replicas;
      int32_t* phyrank = out->phyrank.data() + static_cast<size_t>(l) * num_replicas;
      for (int32_t n = 0; n < num_nodes; ++n) {
        const int32_t mbase = n * experts_per_node;
        // Step 2: replicate experts within the node.
        for (int32_t j = 0; j < experts_per_node; ++j) node_w_[j] = w[mlog2log_[mbase + j]];
        int32_t* cnt = mlogcnt_.data() + mbase;
        Replicate(node_w_.data(), experts_per_node, phys_per_node, phy2mlog_.data(),
                  phyrank_.data(), cnt);
        // Step 3: pack the node's physical experts to its GPUs.
        for (int32_t j = 0; j < phys_per_node; ++j) {
          const int32_t m = phy2mlog_[j];
          phy_w_[j] = node_w_[m] / static_cast<float>(cnt[m]);
        }
        Pack(phy_w_.data(), phys_per_node, gpus_per_node, phy_pack_.data(),
             phy_rank_in_pack_.data());
        for (int32_t j = 0; j < phys_per_node; ++j) {
          const int32_t slot = n * phys_per_node + phy_pack_[j] * per_gpu + phy_rank_in_pack_[j];
          phy2log[slot] = mlog2log_[mbase + phy2mlog_[j]];
          phyrank[slot] = phyrank_[j];
        }
      }
      int32_t* logcnt = out->logcnt.data() + static_cast<size_t>(l) * E;
      for (int32_t e = 0; e < E; ++e) logcnt[e] = mlogcnt_[log2mlog_[e]];
    }
  }

 private:
  std::vector<Item> items_;
  std::vector<float> pack_w_;
  std::vector<int32_t> pack_n_, heap_;
  std::vector<float> ratio_;
  std::vector<float> group_w_, node_w_, phy_w_;
  std::vector<int32_t> group_pack_, group_rank_, log2mlog_, mlog2log_, mlogcnt_;
  std::vector<int32_t> phy2mlog_, phyrank_, phy_pack_, phy_rank_in_pack_;
};

}  // namespace

void RebalanceHierarchical(const LoadMatrix& weight, int32_t num_replicas, int32_t num_groups,
                           int32_t num_nodes, int32_t num_gpus, RawPlan* out) {
  Planner planner;
  planner.Run(weight, num_replicas, num_groups, num_nodes, num_gpus, out);
}

void FillLog2Phy(const std::vector<int32_t>& phyrank, Placement* p) {
  int32_t maxcnt = 0;
  for (int32_t c : p->logcnt) maxcnt = std::max(maxcnt, c);
  // The reference sizes log2phy by the largest count; keep at least one column so that an
  // all-empty plan still has a well-formed shape.
  p->max_replicas = std::max(maxcnt, 1);
  const int32_t L = p->num_layers, E = p->num_experts, R = p->num_replicas, M = p->max_replicas;
  p->log2phy.assign(static_cast<size_t>(L) * E * M, -1);
  for (int32_t l = 0; l < L; ++l) {
    for (int32_t s = 0; s < R; ++s) {
      const size_t i = static_cast<size_t>(l) * R + s;
      const int32_t e = p->phy2log[i];
      if (e < 0) continue;
      p->log2phy[(static_cast<size_t>(l) * E + e) * M + phyrank[i]] = s;
    }
  }
}

LiveView MakeLiveView(const Topology& topo) {
  LiveView v;
  v.gpu_live.assign(topo.num_gpus, 1);
  for (int32_t g : topo.failed_gpus) {
    if (g >= 0 && g < topo.num_gpus) v.gpu_live[g] = 0;
  }
  const int32_t gpn = topo.gpus_per_node();
  int32_t per_node = -1;
  for (int32_t n = 0; n < topo.num_nodes; ++n) {
    int32_t live = 0;
    for (int32_t k = 0; k < gpn; ++k) {
      if (v.gpu_live[n * gpn + k]) {
        v.live_gpus.push_back(n * gpn + k);
        ++live;
      }
    }
    if (live == 0) continue;
    ++v.live_nodes;
    if (per_node >= 0 && per_node != live) v.uniform = false;
    per_node = live;
  }
  return v;
}

}  // namespace internal

Result<LoadMatrix> LoadMatrix::FromRows(const std::vector<std::vector<double>>& rows) {
  if (rows.empty()) return Status::InvalidArgument("weight: must have at least one layer");
  const size_t E = rows[0].size();
  if (E == 0) return Status::InvalidArgument("weight: rows must not be empty");
  if (rows.size() > INT32_MAX || E > INT32_MAX) {
    return Status::InvalidArgument("weight: matrix too large");
  }
  LoadMatrix m;
  m.num_layers = static_cast<int32_t>(rows.size());
  m.num_experts = static_cast<int32_t>(E);
  m.values.resize(rows.size() * E);
  for (size_t l = 0; l < rows.size(); ++l) {
    if (rows[l].size() != E) {
      return Status::InvalidArgument("weight: ragged matrix: row " + std::to_string(l) + " has " +
                                     std::to_string(rows[l].size()) + " entries, row 0 has " +
                                     std::to_string(E));
    }
    for (size_t e = 0; e < E; ++e) {
      const double v = rows[l][e];
      if (!std::isfinite(v) || v < 0 || v > 3.0e38) {
        return Status::InvalidArgument("weight[" + std::to_string(l) + "][" + std::to_string(e) +
                                       "]: must be a finite non-negative number");
      }
      m.values[l * E + e] = static_cast<float>(v);
    }
  }
  return m;
}

Status ValidateTopology(const LoadMatrix& weight, const Topology& t) {
  const int32_t E = weight.num_experts;
  if (weight.num_layers <= 0 || E <= 0 ||
      weight.values.size() != static_cast<size_t>(weight.num_layers) * E) {
    return Status::InvalidArgument("weight: shape does not match its values");
  }
  if (t.num_gpus <= 0) return Status::InvalidArgument("num_gpus: must be positive");
  if (t.num_nodes <= 0) return Status::InvalidArgument("num_nodes: must be positive");
  if (t.num_groups <= 0) return Status::InvalidArgument("num_groups: must be positive");
  if (t.num_replicas < E) {
    return Status::InvalidArgument("num_replicas: " + std::to_string(t.num_replicas) +
                                   " is less than the number of logical experts " +
                                   std::to_string(E));
  }
  if (t.num_replicas % t.num_gpus != 0) {
    return Status::InvalidArgument("num_gpus: " + std::to_string(t.num_gpus) +
                                   " does not divide num_replicas " +
                                   std::to_string(t.num_replicas));
  }
  if (t.num_gpus % t.num_nodes != 0) {
    return Status::InvalidArgument("num_nodes: " + std::to_string(t.num_nodes) +
                                   " does not divide num_gpus " + std::to_string(t.num_gpus));
  }
  if (E % t.num_groups != 0) {
    return Status::InvalidArgument("num_groups: " + std::to_string(t.num_groups) +
                                   " does not divide the number of logical experts " +
                                   std::to_string(E));
  }
  for (int32_t g : t.failed_gpus) {
    if (g < 0 || g >= t.num_gpus) {
      return Status::InvalidArgument("failed_gpus: GPU " + std::to_string(g) +
                                     " is out of range [0, " + std::to_string(t.num_gpus) + ")");
    }
  }
  return Status::Ok();
}

Result<Placement> RebalanceExperts(const LoadMatrix& weight, const Topology& topo) {
  EEP_RETURN_IF_ERROR(ValidateTopology(weight, topo));
  const int32_t L = weight.num_layers, E = weight.num_experts, R = topo.num_replicas;
  const bool hierarchical = topo.num_groups % topo.num_nodes == 0;
  Placement p;
  p.num_layers = L;
  p.num_experts = E;
  p.num_replicas = R;
  internal::RawPlan raw;
  if (topo.failed_gpus.empty()) {
    if (hierarchical) {
      internal::RebalanceHierarchical(weight, R, topo.num_groups, topo.num_nodes, topo.num_gpus,
                                      &raw);
    } else {
      internal::RebalanceHierarchical(weight, R, 1, 1, topo.num_gpus, &raw);
    }
    p.phy2log = std::move(raw.phy2log);
    p.logcnt = std::move(raw.logcnt);
    internal::FillLog2Phy(raw.phyrank, &p);
    return p;
  }

  // Fault-aware: plan for the live GPUs as if they were the whole cluster, then lay the plan
  // onto the original slot numbering.
  const internal::LiveView live = internal::MakeLiveView(topo);
  const int32_t per_gpu = topo.slots_per_gpu();
  const int32_t live_gpus = static_cast<int32_t>(live.live_gpus.size());
  const int32_t live_slots = live_gpus * per_gpu;
  if (live_slots < E) {
    return Status::ResourceExhausted(
        "failed_gpus: " + std::to_string(live_gpus) + " live GPUs have " +
        std::to_string(live_slots) + " slots for " + std::to_string(E) +
        " logical experts: " + std::to_string(E - live_slots) + " slots missing");
  }
  if (hierarchical && live.uniform && topo.num_groups % live.live_nodes == 0) {
    internal::RebalanceHierarchical(weight, live_slots, topo.num_groups, live.live_nodes, live_gpus,
                                    &raw);
  } else {
    internal::RebalanceHierarchical(weight, live_slots, 1, 1, live_gpus, &raw);
  }
  p.phy2log.assign(static_cast<size_t>(L) * R, -1);
  std::vector<int32_t> phyrank(static_cast<size_t>(L) * R, 0);
  for (int32_t l = 0; l < L; ++l) {
    for (int32_t j = 0; j < live_slots; ++j) {
      const int32_t slot = live.live_gpus[j / per_gpu] * per_gpu + j % per_gpu;
      p.phy2log[static_cast<size_t>(l) * R + slot] =
          raw.phy2log[static_cast<size_t>(l) * live_slots + j];
      phyrank[static_cast<size_t>(l) * R + slot] =
          raw.phyrank[static_cast<size_t>(l) * live_slots + j];
    }
  }
  p.logcnt = std::move(raw.logcnt);
  internal::FillLog2Phy(phyrank, &p);
  return p;
}

Result<std::vector<double>> LayerBalancedness(const LoadMatrix& weight, const Topology& topo,
                                              const Placement& p) {
  EEP_RETURN_IF_ERROR(ValidateTopology(weight, topo));
  const int32_t L = weight.num_layers, E = weight.num_experts, R = topo.num_replicas;
  if (p.num_layers != L || p.num_experts != E || p.num_replicas != R ||
      p.phy2log.size() != static_cast<size_t>(L) * R ||
      p.logcnt.size() != static_cast<size_t>(L) * E) {
    return Status::InvalidArgument("placement: shape does not match weight and num_replicas");
  }
  const internal::LiveView live = internal::MakeLiveView(topo);
  const int32_t per_gpu = topo.slots_per_gpu();
  std::vector<double> out(L, 1.0);
  for (int32_t l = 0; l < L; ++l) {
    double sum = 0, max = 0;
    for (int32_t g : live.live_gpus) {
      double load = 0;
      for (int32_t k = 0; k < per_gpu; ++k) {
        const int32_t e = p.slot(l, g * per_gpu + k);
        if (e < 0) continue;
        if (e >= E) return Status::InvalidArgument("placement: expert id out of range");
        const int32_t c = p.count(l, e);
        if (c <= 0) return Status::InvalidArgument("placement: logcnt is not positive");
        load += static_cast<double>(weight.at(l, e)) / c;
      }
      sum += load;
      max = std::max(max, load);
    }
    if (max > 0 && !live.live_gpus.empty()) {
      out[l] = sum / static_cast<double>(live.live_gpus.size()) / max;
    }
  }
  return out;
}

Result<double> Balancedness(const LoadMatrix& weight, const Topology& topo, const Placement& p) {
  EEP_ASSIGN_OR_RETURN(std::vector<double> per_layer, LayerBalancedness(weight, topo, p));
  double sum = 0;
  for (double b : per_layer) sum += b;
  return sum / static_cast<double>(per_layer.size());
}

int64_t CountMovedExperts(std::span<const int32_t> old_phy2log,
                          std::span<const int32_t> new_phy2log) {
  const size_t n = std::min(old_phy2log.size(), new_phy2log.size());
  int64_t moved = static_cast<int64_t>(std::max(old_phy2log.size(), new_phy2log.size()) - n);
  for (size_t i = 0; i < n; ++i) moved += old_phy2log[i] != new_phy2log[i];
  return moved;
}

Result<Placement> PlacementFromPhy2Log(int32_t num_layers, int32_t num_experts,
                                       int32_t num_replicas, std::vector<int32_t> phy2log,
                                       const std::string& what) {
  if (num_layers <= 0 || num_experts <= 0 || num_replicas <= 0 ||
      phy2log.size() != static_cast<size_t>(num_layers) * num_replicas) {
    return Status::InvalidArgument(what + ": expected " + std::to_string(num_layers) + " x " +
                                   std::to_string(num_replicas) + " entries, got " +
                                   std::to_string(phy2log.size()));
  }
  Placement p;
  p.num_layers = num_layers;
  p.num_experts = num_experts;
  p.num_replicas = num_replicas;
  p.logcnt.assign(static_cast<size_t>(num_layers) * num_experts, 0);
  std::vector<int32_t> rank(phy2log.size(), 0);
  for (size_t i = 0; i < phy2log.size(); ++i) {
    const int32_t e = phy2log[i];
    if (e < -1 || e >= num_experts) {
      return Status::InvalidArgument(what + "[" + std::to_string(i / num_replicas) + "][" +
                                     std::to_string(i % num_replicas) + "]: expert " +
                                     std::to_string(e) + " is out of range [-1, " +
                                     std::to_string(num_experts) + ")");
    }
    if (e < 0) continue;
    rank[i] = p.logcnt[(i / num_replicas) * num_experts + e]++;
  }
  p.phy2log = std::move(phy2log);
  internal::FillLog2Phy(rank, &p);
  return p;
}

}  // namespace eep::eplb
