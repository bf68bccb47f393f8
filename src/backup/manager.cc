#include <algorithm>
#include <fmt/format.h>
#include <unistd.h>

#include <zmq.hpp>

#include "backup/backup.h"
#include "core/logging.h"
#include "core/util.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace eep::backup {
namespace {

constexpr int64_t kPollIntervalMs = 100;
constexpr const char* kRoles[3] = {"gate", "up", "down"};

uint64_t AlignUp(uint64_t v, uint64_t a) {
  return (v + a - 1) / a * a;
}

// ZeroMQ wants "*" for "any port"; we also accept the conventional ":0".
std::string BindableEndpoint(const std::string& endpoint) {
  if (endpoint.rfind("tcp://", 0) == 0 && endpoint.size() > 2 &&
      endpoint.compare(endpoint.size() - 2, 2, ":0") == 0)
    return endpoint.substr(0, endpoint.size() - 1) + "*";
  return endpoint;
}

std::string ErrorReply(const std::string& error) {
  return nlohmann::json{{"ok", false}, {"error", error}}.dump();
}

}  // namespace

struct ExpertBackupManager::Impl {
  zmq::context_t context{1};
  zmq::socket_t socket{context, zmq::socket_type::rep};
  std::unique_ptr<transfer::Engine> engine;  // outlives region (declared first, destroyed last)
  std::unique_ptr<transfer::LocalRegion> region;
  std::string describe_reply;  // cached "describe" answer
  std::string ping_reply;

  ~Impl() {
    region.reset();
    engine.reset();
  }

  std::string Handle(const std::string& text) {
    nlohmann::json request;
    try {
      request = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      return ErrorReply(fmt::format("request is not JSON: {}", e.what()));
    }
    std::string op = request.is_object() ? request.value("op", std::string()) : std::string();
    if (op == "describe") return describe_reply;
    if (op == "ping") return ping_reply;
    return ErrorReply(fmt::format("unknown op '{}' (describe, ping)", op));
  }
};

ExpertBackupManager::ExpertBackupManager() : impl_(std::make_unique<Impl>()) {}
ExpertBackupManager::~ExpertBackupManager() = default;

Result<std::unique_ptr<ExpertBackupManager>> ExpertBackupManager::Create(
    const BackupManagerOptions& options) {
  EEP_RETURN_IF_ERROR(ValidateAssignment(options.node_rank, options.num_nodes, options.replicas));
  EEP_RETURN_IF_ERROR(ValidatePlacement(options.placement, options.num_nodes, options.replicas));
  std::unique_ptr<ExpertBackupManager> m(new ExpertBackupManager());
  Impl& impl = *m->impl_;

  // Bind first: a taken port fails before minutes of loading.
  try {
    impl.socket.set(zmq::sockopt::linger, 0);
    impl.socket.bind(BindableEndpoint(options.listen_endpoint));
    m->endpoint_ = impl.socket.get(zmq::sockopt::last_endpoint);
  } catch (const zmq::error_t& e) {
    return Status::Unavailable(
        fmt::format("--listen {}: cannot bind: {}", options.listen_endpoint, e.what()));
  }

  EEP_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(options.model_dir));
  EEP_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(options.model_dir));

  // Plan the layout: [layer][expert][gate|up|down], this node's experts only.
  struct Source {
    const TensorInfo* tensor;
    ParamLocation location;
  };
  std::vector<Source> sources;
  uint64_t total_bytes = 0;
  const auto shapes = config.ExpertTensorShapes();
  for (int64_t layer : config.MoeLayers()) {
    for (int64_t e = 0; e < config.num_experts; ++e) {
      const auto holders = BackupNodesOf(options.placement, e, config.num_experts, options.num_nodes, options.replicas,
                                         options.slots_per_node);
      if (std::find(holders.begin(), holders.end(), options.node_rank) == holders.end()) continue;
      const auto names = config.ExpertTensorNames(layer, e);
      for (int k = 0; k < 3; ++k) {
        EEP_ASSIGN_OR_RETURN(const TensorInfo* t, ckpt->GetChecked(names[k], shapes[k]));
        ParamLocation p;
        p.name = names[k];
        p.layer = layer;
        p.expert = e;
        p.role = kRoles[k];
        p.offset = AlignUp(total_bytes, kBackupTensorAlignment);
        p.num_bytes = t->nbytes;
        p.shape = t->shape;
        p.dtype = t->dtype;
        total_bytes = p.offset + p.num_bytes;
        sources.push_back({t, std::move(p)});
      }
    }
  }
  if (sources.empty())
    return Status::InvalidArgument(fmt::format(
        "{}: node {} of {} holds no experts ({} MoE layers, {} experts)", options.model_dir,
        options.node_rank, options.num_nodes, config.MoeLayers().size(), config.num_experts));

  EEP_ASSIGN_OR_RETURN_CTX(impl.engine,
                           transfer::CreateEngine(options.transport, options.transport_options),
                           "--transport");
  transfer::ExportOptions export_options;
  export_options.kind =
      options.pin_memory ? transfer::MemoryKind::kPinnedHost : transfer::MemoryKind::kHost;
  export_options.owner = fmt::format("backup-manager node {} at {} (pid {})", options.node_rank,
                                     m->endpoint_, getpid());
  EEP_ASSIGN_OR_RETURN_CTX(impl.region,
                           impl.engine->AllocateExportable(total_bytes, export_options),
                           fmt::format("allocating the {}-byte backup region", total_bytes));

  EEP_LOG_INFO("backup: node {}/{} holds {} tensors ({:.2f} GiB) of {}; loading into {} memory",
               options.node_rank, options.num_nodes, sources.size(),
               total_bytes / double(1ull << 30), options.model_dir, options.transport);
  double start_s = NowSeconds();
  {
    Progress progress("backup: loading expert tensors", sources.size());
    uint8_t* base = impl.region->data();
    for (size_t i = 0; i < sources.size(); ++i) {
      if (options.cancel != nullptr && options.cancel->load())
        return Status::Cancelled("loading interrupted by a stop request");
      std::memcpy(base + sources[i].location.offset, sources[i].tensor->data,
                  sources[i].location.num_bytes);
      progress.Update(i + 1);
    }
    progress.Finish();
  }
  double elapsed_s = NowSeconds() - start_s;
  EEP_LOG_INFO("backup: loaded {:.2f} GiB in {:.2f} s ({:.2f} GB/s)",
               total_bytes / double(1ull << 30), elapsed_s,
               total_bytes / 1e9 / std::max(elapsed_s, 1e-9));

  BackupDescriptor& d = m->descriptor_;
  d.node_rank = options.node_rank;
  d.num_nodes = options.num_nodes;
  d.replicas = options.replicas;
  d.placement = options.placement;
  d.fingerprint = ckpt->Fingerprint();
  d.model_dir = options.model_dir;
  EEP_ASSIGN_OR_RETURN_CTX(d.region, impl.region->Export(), "exporting the backup region");
  for (auto& s : sources) d.params.emplace(s.location.name, std::move(s.location));
  ckpt.reset();  // the copy is all we serve; release the checkpoint's mappings

  impl.describe_reply = nlohmann::json{{"ok", true}, {"descriptor", d.ToJson()}}.dump();
  impl.ping_reply =
      nlohmann::json{{"ok", true}, {"node_rank", d.node_rank}, {"fingerprint", d.fingerprint}}
          .dump();
  return m;
}

Status ExpertBackupManager::Serve(const std::atomic<bool>& stop) {
  Impl& impl = *impl_;
  const int engine_fd = impl.engine->EventFd();
  zmq::pollitem_t items[2] = {{impl.socket.handle(), 0, ZMQ_POLLIN, 0},
                              {nullptr, engine_fd, ZMQ_POLLIN, 0}};
  const size_t num_items = engine_fd >= 0 ? 2 : 1;
  EEP_LOG_INFO("backup: serving {} tensors at {} over {}", descriptor_.params.size(), endpoint_,
               impl.engine->name());
  while (!stop.load()) {
    // Drive the engine (UCX over tcp needs the target to progress), then sleep on both the
    // control socket and the engine's event fd.
    for (int i = 0; i < 1024 && impl.engine->Progress(); ++i) {
    }
    long timeout_ms = (engine_fd < 0 || impl.engine->ArmEvents()) ? kPollIntervalMs : 0;
    try {
      zmq::poll(items, num_items, std::chrono::milliseconds(timeout_ms));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;  // a signal: re-check the stop flag
      return Status::Internal(fmt::format("backup manager {}: zmq poll: {}", endpoint_, e.what()));
    }
    if (!(items[0].revents & ZMQ_POLLIN)) continue;
    try {
      zmq::message_t request;
      if (!impl.socket.recv(request, zmq::recv_flags::dontwait)) continue;
      std::string reply = impl.Handle(request.to_string());
      if (!impl.socket.send(zmq::buffer(reply), zmq::send_flags::dontwait))
        EEP_LOG_WARN("backup: could not queue a reply (client gone?)");
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      EEP_LOG_WARN("backup: control request failed: {}", e.what());
    }
  }
  EEP_LOG_INFO("backup: manager at {} stopping", endpoint_);
  return Status::Ok();
}

}  // namespace eep::backup
