#include "model/expert_map.h"

#include <fmt/format.h>

namespace eep {

ExpertMap ExpertMap::Identity(int64_t num_moe_layers, int64_t num_experts) {
  std::vector<std::vector<int32_t>> p2l(static_cast<size_t>(num_moe_layers));
  for (auto& row : p2l)
    for (int32_t e = 0; e < num_experts; ++e) row.push_back(e);
  return *FromPhy2Log(p2l, num_experts);
}

Result<ExpertMap> ExpertMap::FromPhy2Log(const std::vector<std::vector<int32_t>>& phy2log,
                                         int64_t num_logical) {
  ExpertMap m;
  m.num_logical_ = num_logical;
  m.num_physical_ = phy2log.empty() ? 0 : static_cast<int64_t>(phy2log[0].size());
  m.phy2log_ = phy2log;
  m.log2phy_.resize(phy2log.size());
  for (size_t l = 0; l < phy2log.size(); ++l) {
    if (static_cast<int64_t>(phy2log[l].size()) != m.num_physical_)
      return Status::InvalidArgument(fmt::format("expert map: layer {} has {} slots, layer 0 has {}", l,
                                                 phy2log[l].size(), m.num_physical_));
    auto& l2p = m.log2phy_[l];
    l2p.assign(static_cast<size_t>(num_logical), {});
    for (size_t s = 0; s < phy2log[l].size(); ++s) {
      int32_t e = phy2log[l][s];
      if (e < 0) continue;
      if (e >= num_logical)
        return Status::InvalidArgument(
            fmt::format("expert map: layer {} slot {} holds expert {} >= {}", l, s, e, num_logical));
      l2p[static_cast<size_t>(e)].push_back(static_cast<int32_t>(s));
    }
    for (int64_t e = 0; e < num_logical; ++e)
      if (l2p[static_cast<size_t>(e)].empty())
        return Status::InvalidArgument(fmt::format("expert map: layer {} has no slot for expert {}", l, e));
  }
  return m;
}

}  // namespace eep
