// Assignment rule, descriptor (de)serialisation and the ZeroMQ request helper.
#include <algorithm>
#include <fmt/format.h>

#include <zmq.hpp>

#include "backup/backup.h"
#include "core/logging.h"

namespace eep::backup {

Status ValidateAssignment(int node_rank, int num_nodes, int replicas) {
  if (num_nodes < 1)
    return Status::InvalidArgument(fmt::format("--num-nodes must be >= 1, got {}", num_nodes));
  if (node_rank < 0 || node_rank >= num_nodes)
    return Status::InvalidArgument(
        fmt::format("--node-rank must be in [0, {}), got {}", num_nodes, node_rank));
  if (replicas < 1 || replicas > num_nodes)
    return Status::InvalidArgument(
        fmt::format("--replicas must be in [1, {}], got {}", num_nodes, replicas));
  return Status::Ok();
}

std::vector<int> NodesHoldingExpert(int64_t expert, int num_nodes, int replicas) {
  std::vector<int> nodes;
  for (int j = 0; j < replicas; ++j) nodes.push_back(static_cast<int>((expert + j) % num_nodes));
  return nodes;
}

bool NodeHoldsExpert(int64_t expert, int node_rank, int num_nodes, int replicas) {
  // (e + j) mod N == K for some j < R  <=>  (K - e) mod N < R
  int64_t d = ((node_rank - expert) % num_nodes + num_nodes) % num_nodes;
  return d < replicas;
}

Result<BackupPlacement> ParseBackupPlacement(const std::string& text) {
  if (text == "stripe") return BackupPlacement::kStripe;
  if (text == "anti-affinity") return BackupPlacement::kAntiAffinity;
  return Status::InvalidArgument(
      fmt::format("--backup-placement must be stripe or anti-affinity, got '{}'", text));
}

const char* BackupPlacementName(BackupPlacement p) {
  return p == BackupPlacement::kAntiAffinity ? "anti-affinity" : "stripe";
}

Status ValidatePlacement(BackupPlacement p, int num_nodes, int replicas) {
  if (p == BackupPlacement::kAntiAffinity && num_nodes > 1 && replicas > num_nodes - 1)
    return Status::InvalidArgument(fmt::format(
        "--replicas {} with --backup-placement anti-affinity over {} nodes: at most {} (a copy on "
        "every node but the expert's home node)",
        replicas, num_nodes, num_nodes - 1));
  return Status::Ok();
}

std::vector<int> BackupNodesOf(BackupPlacement p, int64_t expert, int64_t num_experts, int num_nodes, int replicas,
                               int64_t slots_per_node) {
  if (p == BackupPlacement::kStripe || num_nodes == 1 || num_experts <= 0)
    return NodesHoldingExpert(expert, num_nodes, replicas);
  const int64_t k = slots_per_node > 0 ? slots_per_node : (num_experts + num_nodes - 1) / num_nodes;
  const int home = static_cast<int>(std::min<int64_t>(num_nodes - 1, expert / k));
  std::vector<int> nodes;
  for (int j = 0; j < replicas; ++j) nodes.push_back((home + 1 + j) % num_nodes);
  return nodes;
}

nlohmann::json BackupDescriptor::ToJson() const {
  nlohmann::json params_json = nlohmann::json::object();
  for (const auto& [name, p] : params)
    params_json[name] = {{"layer", p.layer},           {"expert", p.expert},    {"role", p.role},
                         {"offset", p.offset},         {"nbytes", p.num_bytes}, {"shape", p.shape},
                         {"dtype", DTypeName(p.dtype)}};
  return {{"protocol", protocol},
          {"node_rank", node_rank},
          {"num_nodes", num_nodes},
          {"replicas", replicas},
          {"placement", BackupPlacementName(placement)},
          {"fingerprint", fingerprint},
          {"model_dir", model_dir},
          {"region_base", region.base_address},
          {"region_bytes", region.num_bytes},
          {"transport", {{"backend", region.backend}, {"region", region.ToJson()}}},
          {"params", std::move(params_json)}};
}

Result<BackupDescriptor> BackupDescriptor::FromJson(const nlohmann::json& j) {
  BackupDescriptor d;
  try {
    d.protocol = j.at("protocol").get<int>();
    if (d.protocol != kBackupProtocolVersion)
      return Status::InvalidArgument(
          fmt::format("backup descriptor protocol {} is not the supported {}", d.protocol,
                      kBackupProtocolVersion));
    d.node_rank = j.at("node_rank").get<int>();
    d.num_nodes = j.at("num_nodes").get<int>();
    d.replicas = j.at("replicas").get<int>();
    {
      auto placement = ParseBackupPlacement(j.value("placement", std::string("stripe")));
      if (!placement.ok()) return placement.status().WithContext("backup descriptor 'placement'");
      d.placement = *placement;
    }
    d.fingerprint = j.at("fingerprint").get<std::string>();
    d.model_dir = j.at("model_dir").get<std::string>();
    EEP_ASSIGN_OR_RETURN_CTX(d.region,
                             transfer::RegionDescriptor::FromJson(j.at("transport").at("region")),
                             "backup descriptor 'transport.region'");
    for (const auto& [name, pj] : j.at("params").items()) {
      ParamLocation p;
      p.name = name;
      p.layer = pj.at("layer").get<int64_t>();
      p.expert = pj.at("expert").get<int64_t>();
      p.role = pj.at("role").get<std::string>();
      p.offset = pj.at("offset").get<uint64_t>();
      p.num_bytes = pj.at("nbytes").get<uint64_t>();
      p.shape = pj.at("shape").get<std::vector<int64_t>>();
      EEP_ASSIGN_OR_RETURN_CTX(p.dtype, ParseDType(pj.at("dtype").get<std::string>()),
                               fmt::format("backup descriptor param '{}'", name));
      if (p.offset > d.region.num_bytes || p.num_bytes > d.region.num_bytes - p.offset)
        return Status::InvalidArgument(
            fmt::format("backup descriptor param '{}' [{}, +{}) lies outside the {}-byte region",
                        name, p.offset, p.num_bytes, d.region.num_bytes));
      d.params.emplace(name, std::move(p));
    }
  } catch (const nlohmann::json::exception& e) {
    return Status::InvalidArgument(fmt::format("malformed backup descriptor: {}", e.what()));
  }
  if (Status s = ValidateAssignment(d.node_rank, d.num_nodes, d.replicas); !s.ok())
    return s.WithContext("backup descriptor");
  return d;
}

// ---- Control plane --------------------------------------------------------------------------

namespace {
// One process-wide ZeroMQ context for client requests; never destroyed (zmq_ctx_term at exit
// would block on any socket a crashing caller left open).
zmq::context_t& ClientContext() {
  static zmq::context_t* ctx = new zmq::context_t(1);
  return *ctx;
}
}  // namespace

namespace {

Result<nlohmann::json> ParseReply(const std::string& endpoint, const std::string& text) {
  nlohmann::json reply;
  try {
    reply = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return Status::Internal(
        fmt::format("backup manager {}: reply is not JSON: {}", endpoint, e.what()));
  }
  if (!reply.is_object() || !reply.contains("ok") || !reply["ok"].is_boolean())
    return Status::Internal(fmt::format("backup manager {}: malformed reply", endpoint));
  if (!reply["ok"].get<bool>()) {
    std::string error = reply.value("error", std::string("unknown error"));
    return Status::InvalidArgument(
        fmt::format("backup manager {} refused the request: {}", endpoint, error));
  }
  return reply;
}

}  // namespace

std::vector<Result<nlohmann::json>> ControlRequestAll(const std::vector<std::string>& endpoints,
                                                      const nlohmann::json& request,
                                                      transfer::Deadline deadline) {
  std::vector<Result<nlohmann::json>> results(endpoints.size(), Status::Internal("no reply yet"));
  const std::string text = request.dump();
  std::vector<std::unique_ptr<zmq::socket_t>> sockets(endpoints.size());
  std::vector<size_t> waiting;  // indices still expecting a reply
  for (size_t i = 0; i < endpoints.size(); ++i) {
    try {
      auto socket = std::make_unique<zmq::socket_t>(ClientContext(), zmq::socket_type::req);
      socket->set(zmq::sockopt::linger, 0);
      try {
        socket->connect(endpoints[i]);
      } catch (const zmq::error_t& e) {
        results[i] = Status::InvalidArgument(
            fmt::format("backup manager endpoint '{}': {}", endpoints[i], e.what()));
        continue;
      }
      if (!socket->send(zmq::buffer(text), zmq::send_flags::dontwait)) {
        results[i] = Status::Unavailable(
            fmt::format("backup manager {}: cannot queue the request", endpoints[i]));
        continue;
      }
      sockets[i] = std::move(socket);
      waiting.push_back(i);
    } catch (const zmq::error_t& e) {
      results[i] =
          Status::Unavailable(fmt::format("backup manager {}: zmq: {}", endpoints[i], e.what()));
    }
  }
  while (!waiting.empty()) {
    std::vector<zmq::pollitem_t> items;
    for (size_t i : waiting) items.push_back({sockets[i]->handle(), 0, ZMQ_POLLIN, 0});
    try {
      zmq::poll(items.data(), items.size(),
                std::chrono::milliseconds(std::min<int64_t>(deadline.RemainingMs(), 100)));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) {
        for (size_t i : waiting)
          results[i] = Status::Unavailable(
              fmt::format("backup manager {}: zmq poll: {}", endpoints[i], e.what()));
        return results;
      }
    }
    std::vector<size_t> still;
    for (size_t k = 0; k < waiting.size(); ++k) {
      size_t i = waiting[k];
      if (!(items[k].revents & ZMQ_POLLIN)) {
        still.push_back(i);
        continue;
      }
      try {
        zmq::message_t msg;
        if (sockets[i]->recv(msg, zmq::recv_flags::dontwait))
          results[i] = ParseReply(endpoints[i], msg.to_string());
        else
          still.push_back(i);
      } catch (const zmq::error_t& e) {
        results[i] =
            Status::Unavailable(fmt::format("backup manager {}: zmq: {}", endpoints[i], e.what()));
      }
    }
    waiting = std::move(still);
    if (!waiting.empty() && deadline.Expired()) {
      for (size_t i : waiting)
        results[i] = Status::Unavailable(fmt::format(
            "backup manager {}: no reply before the deadline (not running or unreachable?)",
            endpoints[i]));
      break;
    }
  }
  return results;
}

Result<nlohmann::json> ControlRequest(const std::string& endpoint, const nlohmann::json& request,
                                      transfer::Deadline deadline) {
  return std::move(ControlRequestAll({endpoint}, request, deadline)[0]);
}

}  // namespace eep::backup
