// ExpertMap: where each logical expert of each MoE layer lives. The model never indexes
// experts directly; it asks the map for the physical slots of a logical expert, so later
// code (EPLB, fault recovery, scaling) can move experts without touching the model.
//
// Indexing: `moe_layer` is the index among MoE layers (0..num_moe_layers-1), the same row
// index as EPLB's weight/phy2log matrices; `slot` is a physical expert slot
// (0..num_physical-1), slot s living on rank s / (num_physical / ep_size).
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"

namespace eep {

class ExpertMap {
 public:
  ExpertMap() = default;

  // Slot e holds logical expert e, one replica each.
  static ExpertMap Identity(int64_t num_moe_layers, int64_t num_experts);
  // phy2log[l][slot] = logical expert in that slot, or -1 for an empty (dead) slot. Every
  // logical expert 0..num_logical-1 must have at least one slot in every layer.
  static Result<ExpertMap> FromPhy2Log(const std::vector<std::vector<int32_t>>& phy2log,
                                       int64_t num_logical);

  int64_t num_moe_layers() const { return static_cast<int64_t>(phy2log_.size()); }
  int64_t num_logical() const { return num_logical_; }
  int64_t num_physical() const { return num_physical_; }
  // Physical slots of a logical expert, ascending.
  const std::vector<int32_t>& Replicas(int64_t moe_layer, int64_t logical) const {
    return log2phy_[static_cast<size_t>(moe_layer)][static_cast<size_t>(logical)];
  }
  int32_t LogicalAt(int64_t moe_layer, int64_t slot) const {
    return phy2log_[static_cast<size_t>(moe_layer)][static_cast<size_t>(slot)];
  }
  const std::vector<std::vector<int32_t>>& phy2log() const { return phy2log_; }

 private:
  int64_t num_logical_ = 0;
  int64_t num_physical_ = 0;
  std::vector<std::vector<int32_t>> phy2log_;                // [layer][slot]
  std::vector<std::vector<std::vector<int32_t>>> log2phy_;   // [layer][logical] -> slots
};

}  // namespace eep
