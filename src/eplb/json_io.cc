// The JSON contract of `eep eplb`: request parsing with field-naming errors, and the plan
// output. nlohmann exceptions never leave this file.
#include <cmath>
#include <limits>
#include <string>

#include "eplb/eplb.h"

namespace eep::eplb {
namespace {

using nlohmann::json;

// An integer JSON value (an integral float such as 16.0 is accepted too).
Result<int64_t> AsInt(const json& v, const std::string& what) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Status::InvalidArgument(what + ": integer out of range");
    }
    return static_cast<int64_t>(u);
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
      return static_cast<int64_t>(d);
    }
  }
  return Status::InvalidArgument(what + ": expected an integer, got " + v.dump());
}

Result<int32_t> AsInt32(const json& v, const std::string& what) {
  EEP_ASSIGN_OR_RETURN(int64_t x, AsInt(v, what));
  if (x < std::numeric_limits<int32_t>::min() || x > std::numeric_limits<int32_t>::max()) {
    return Status::InvalidArgument(what + ": integer out of range");
  }
  return static_cast<int32_t>(x);
}

Result<int32_t> RequiredInt(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end()) return Status::InvalidArgument(std::string(key) + ": missing");
  return AsInt32(*it, key);
}

Result<std::vector<int32_t>> IntList(const json& v, const std::string& what) {
  if (!v.is_array()) return Status::InvalidArgument(what + ": expected a list of integers");
  std::vector<int32_t> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    EEP_ASSIGN_OR_RETURN(int32_t x, AsInt32(v[i], what + "[" + std::to_string(i) + "]"));
    out.push_back(x);
  }
  return out;
}

Result<LoadMatrix> ParseWeight(const json& v) {
  if (!v.is_array() || v.empty()) {
    return Status::InvalidArgument("weight: expected a non-empty list of rows (layers x experts)");
  }
  std::vector<std::vector<double>> rows(v.size());
  for (size_t l = 0; l < v.size(); ++l) {
    const json& row = v[l];
    if (!row.is_array()) {
      return Status::InvalidArgument("weight[" + std::to_string(l) +
                                     "]: expected a list of numbers");
    }
    rows[l].resize(row.size());
    for (size_t e = 0; e < row.size(); ++e) {
      if (!row[e].is_number()) {
        return Status::InvalidArgument("weight[" + std::to_string(l) + "][" + std::to_string(e) +
                                       "]: expected a number, got " + row[e].dump());
      }
      rows[l][e] = row[e].get<double>();
    }
  }
  return LoadMatrix::FromRows(rows);
}

Result<PlanRequest> ParseImpl(const json& in) {
  if (!in.is_object()) return Status::InvalidArgument("input: expected a JSON object");
  PlanRequest req;
  auto w = in.find("weight");
  if (w == in.end()) return Status::InvalidArgument("weight: missing");
  EEP_ASSIGN_OR_RETURN(req.weight, ParseWeight(*w));
  EEP_ASSIGN_OR_RETURN(req.topo.num_replicas, RequiredInt(in, "num_replicas"));
  EEP_ASSIGN_OR_RETURN(req.topo.num_groups, RequiredInt(in, "num_groups"));
  EEP_ASSIGN_OR_RETURN(req.topo.num_nodes, RequiredInt(in, "num_nodes"));
  EEP_ASSIGN_OR_RETURN(req.topo.num_gpus, RequiredInt(in, "num_gpus"));
  if (auto it = in.find("failed_gpus"); it != in.end() && !it->is_null()) {
    EEP_ASSIGN_OR_RETURN(req.topo.failed_gpus, IntList(*it, "failed_gpus"));
  }
  EEP_RETURN_IF_ERROR(ValidateTopology(req.weight, req.topo));
  if (auto it = in.find("failed_nodes"); it != in.end() && !it->is_null()) {
    EEP_ASSIGN_OR_RETURN(std::vector<int32_t> nodes, IntList(*it, "failed_nodes"));
    const int32_t gpn = req.topo.gpus_per_node();
    for (int32_t n : nodes) {
      if (n < 0 || n >= req.topo.num_nodes) {
        return Status::InvalidArgument("failed_nodes: node " + std::to_string(n) +
                                       " is out of range [0, " +
                                       std::to_string(req.topo.num_nodes) + ")");
      }
      for (int32_t k = 0; k < gpn; ++k) req.topo.failed_gpus.push_back(n * gpn + k);
    }
  }

  const int32_t L = req.weight.num_layers, E = req.weight.num_experts;
  const int32_t R = req.topo.num_replicas;
  if (auto it = in.find("old_phy2log"); it != in.end() && !it->is_null()) {
    if (!it->is_array() || it->size() != static_cast<size_t>(L)) {
      return Status::InvalidArgument("old_phy2log: expected " + std::to_string(L) +
                                     " rows (one per layer of weight)");
    }
    req.has_old = true;
    req.old_phy2log.reserve(static_cast<size_t>(L) * R);
    for (int32_t l = 0; l < L; ++l) {
      const std::string row_name = "old_phy2log[" + std::to_string(l) + "]";
      EEP_ASSIGN_OR_RETURN(std::vector<int32_t> row, IntList((*it)[l], row_name));
      if (row.size() != static_cast<size_t>(R)) {
        return Status::InvalidArgument(row_name + ": has " + std::to_string(row.size()) +
                                       " entries, expected num_replicas = " + std::to_string(R));
      }
      for (int32_t s = 0; s < R; ++s) {
        if (row[s] < -1 || row[s] >= E) {
          return Status::InvalidArgument(row_name + "[" + std::to_string(s) + "]: expert " +
                                         std::to_string(row[s]) + " is out of range [-1, " +
                                         std::to_string(E) + ")");
        }
      }
      req.old_phy2log.insert(req.old_phy2log.end(), row.begin(), row.end());
    }
  }
  if (auto it = in.find("mode"); it != in.end() && !it->is_null()) {
    if (!it->is_string())
      return Status::InvalidArgument("mode: expected \"fresh\" or \"min-move\"");
    const std::string mode = it->get<std::string>();
    if (mode == "fresh") {
      req.mode = PlanMode::kFresh;
    } else if (mode == "min-move" || mode == "min_move") {
      req.mode = PlanMode::kMinMove;
    } else {
      return Status::InvalidArgument("mode: unknown mode \"" + mode +
                                     "\" (expected \"fresh\" or \"min-move\")");
    }
  }
  if (req.mode == PlanMode::kMinMove && !req.has_old) {
    return Status::InvalidArgument("old_phy2log: mode min-move needs the current placement");
  }
  if (auto it = in.find("tolerance"); it != in.end() && !it->is_null()) {
    if (!it->is_number()) return Status::InvalidArgument("tolerance: expected a number");
    const double tol = it->get<double>();
    if (!(tol >= 0 && tol < 1)) return Status::InvalidArgument("tolerance: must be in [0, 1)");
    req.min_move.tolerance = tol;
  }
  return req;
}

json Matrix2D(const std::vector<int32_t>& v, int32_t rows, int32_t cols) {
  json out = json::array();
  for (int32_t r = 0; r < rows; ++r) {
    out.push_back(std::vector<int32_t>(v.begin() + static_cast<ptrdiff_t>(r) * cols,
                                       v.begin() + static_cast<ptrdiff_t>(r + 1) * cols));
  }
  return out;
}

json PlacementJson(const Placement& p) {
  json out = json::object();
  out["phy2log"] = Matrix2D(p.phy2log, p.num_layers, p.num_replicas);
  json log2phy = json::array();
  const int32_t M = p.max_replicas;
  for (int32_t l = 0; l < p.num_layers; ++l) {
    log2phy.push_back(Matrix2D(
        std::vector<int32_t>(p.log2phy.begin() + static_cast<ptrdiff_t>(l) * p.num_experts * M,
                             p.log2phy.begin() + static_cast<ptrdiff_t>(l + 1) * p.num_experts * M),
        p.num_experts, M));
  }
  out["log2phy"] = std::move(log2phy);
  out["logcnt"] = Matrix2D(p.logcnt, p.num_layers, p.num_experts);
  return out;
}

}  // namespace

Result<PlanRequest> ParsePlanRequest(const nlohmann::json& input) {
  try {
    return ParseImpl(input);
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("input: ") + e.what());
  }
}

Result<nlohmann::json> RunPlanRequest(const PlanRequest& req) {
  try {
    json out;
    if (req.mode == PlanMode::kMinMove) {
      EEP_ASSIGN_OR_RETURN(MinMoveResult r,
                           RebalanceMinMove(req.weight, req.topo, req.old_phy2log, req.min_move));
      out = PlacementJson(r.plan);
      out["balancedness"] = r.balancedness;
      out["moved_experts"] = r.moved_experts;
      out["fresh_balancedness"] = r.fresh_balancedness;
      out["fresh_moved_experts"] = r.fresh_moved_experts;
      out["mode"] = "min-move";
      return out;
    }
    EEP_ASSIGN_OR_RETURN(Placement p, RebalanceExperts(req.weight, req.topo));
    EEP_ASSIGN_OR_RETURN(double b, Balancedness(req.weight, req.topo, p));
    out = PlacementJson(p);
    out["balancedness"] = b;
    if (req.has_old) {
      const int64_t moved = CountMovedExperts(req.old_phy2log, p.phy2log);
      out["moved_experts"] = moved;
      out["fresh_balancedness"] = b;
      out["fresh_moved_experts"] = moved;
    }
    out["mode"] = "fresh";
    return out;
  } catch (const std::exception& e) {
    return Status::Internal(std::string("building the plan JSON: ") + e.what());
  }
}

}  // namespace eep::eplb
