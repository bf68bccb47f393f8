#include <fmt/format.h>

#include "ep/ep.h"

namespace eep::ep {

Result<SlotLayout> MakeSlotLayout(int64_t num_logical, int64_t num_redundant, int ep_size) {
  if (ep_size < 1) return Status::InvalidArgument(fmt::format("--ep must be >= 1, got {}", ep_size));
  if (num_redundant < 0)
    return Status::InvalidArgument(fmt::format("--num-redundant-experts must be >= 0, got {}", num_redundant));
  SlotLayout l;
  l.num_logical = num_logical;
  l.ep_size = ep_size;
  const int64_t wanted = num_logical + num_redundant;
  l.slots_per_rank = (wanted + ep_size - 1) / ep_size;
  l.num_physical = l.slots_per_rank * ep_size;
  return l;
}

ExpertMap InitialPlacement(const SlotLayout& layout, int64_t num_moe_layers) {
  std::vector<std::vector<int32_t>> p2l(static_cast<size_t>(num_moe_layers));
  for (auto& row : p2l)
    for (int64_t s = 0; s < layout.num_physical; ++s) row.push_back(static_cast<int32_t>(s % layout.num_logical));
  return *ExpertMap::FromPhy2Log(p2l, layout.num_logical);
}

Result<FaultSpec> ParseFaultSpec(const std::string& text) {
  FaultSpec f;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t comma = text.find(',', pos);
    std::string kv = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    pos = comma == std::string::npos ? text.size() : comma + 1;
    size_t eq = kv.find('=');
    if (eq == std::string::npos) return Status::InvalidArgument("--inject-fault: expected key=value, got '" + kv + "'");
    std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
    try {
      if (k == "rank") f.rank = std::stoi(v);
      else if (k == "after-steps") f.after_steps = std::stoll(v);
      else if (k == "mode") f.mode = v;
      else if (k == "at") f.at = v;
      else return Status::InvalidArgument("--inject-fault: unknown key '" + k + "' (rank, after-steps, mode, at)");
    } catch (const std::exception&) {
      return Status::InvalidArgument("--inject-fault: '" + v + "' is not a number for " + k);
    }
  }
  if (f.rank < 0) return Status::InvalidArgument("--inject-fault: rank=R is required");
  if (f.mode != "kill" && f.mode != "hang" && f.mode != "slow")
    return Status::InvalidArgument("--inject-fault: mode must be kill, hang or slow, got '" + f.mode + "'");
  if (f.at != "step" && f.at != "eplb")
    return Status::InvalidArgument("--inject-fault: at must be step or eplb, got '" + f.at + "'");
  return f;
}

}  // namespace eep::ep
