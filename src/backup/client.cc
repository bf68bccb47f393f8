#include <fmt/format.h>
#include <fmt/ranges.h>

#include <atomic>
#include <regex>
#include <set>

#include "backup/backup.h"
#include "core/logging.h"
#include "core/util.h"

namespace eep::backup {

struct ExpertBackupClient::Manager {
  enum class State { kNotConnected, kReady, kFailed, kRefused };

  std::string endpoint;
  State state = State::kNotConnected;
  std::string error;  // why it is not ready
  BackupDescriptor descriptor;
  transfer::Engine* engine = nullptr;  // owned by the client's engines_
  std::unique_ptr<transfer::RemoteRegion> region;
  uint64_t generation = 0;  // bumped whenever `region` is (re)imported
  // (layer, expert) -> its tensors in gate, up, down order; points into descriptor.params.
  std::map<std::pair<int64_t, int64_t>, std::vector<const ParamLocation*>> by_expert;
  std::set<int64_t> layers;

  std::string Label() const {
    return state == State::kReady ? fmt::format("{} (node {}/{})", endpoint, descriptor.node_rank,
                                                descriptor.num_nodes)
                                  : endpoint;
  }
};

struct ExpertBackupClient::Selection {
  Manager* manager;
  const ParamLocation* param;
};

namespace {

// Process-wide, so that a (base address, generation) pair never repeats across clients.
uint64_t NextRegionGeneration() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}
int RoleOrder(const std::string& role) {
  return role == "gate" ? 0 : role == "up" ? 1 : 2;
}
}  // namespace

ExpertBackupClient::ExpertBackupClient(BackupClientOptions options) : options_(std::move(options)) {
  for (const std::string& endpoint : options_.endpoints) {
    auto m = std::make_unique<Manager>();
    m->endpoint = endpoint;
    m->error = "not connected yet";
    managers_.push_back(std::move(m));
  }
}

ExpertBackupClient::~ExpertBackupClient() {
  std::lock_guard<std::mutex> lock(mu_);
  managers_.clear();  // imported regions go before their engines
  engines_.clear();
}

Status ExpertBackupClient::Connect() {
  std::lock_guard<std::mutex> lock(mu_);
  if (managers_.empty())
    return Status::InvalidArgument("backup client: no manager endpoints configured");
  transfer::Deadline deadline = transfer::Deadline::AfterMs(options_.timeout_ms);
  std::vector<Manager*> todo;
  std::vector<std::string> endpoints;
  for (auto& m : managers_) {
    // A ready manager whose transport saw its peer go is retried like a failed one.
    if (m->state == Manager::State::kReady && m->region->CheckAlive().ok()) continue;
    todo.push_back(m.get());
    endpoints.push_back(m->endpoint);
  }
  auto replies = ControlRequestAll(endpoints, {{"op", "describe"}}, deadline);
  bool refused = false;
  for (size_t i = 0; i < todo.size(); ++i) {
    Manager& m = *todo[i];
    auto fail = [&](const Status& s, Manager::State state = Manager::State::kFailed) {
      m.state = state;
      m.error = s.ToString();
      m.region.reset();
      m.by_expert.clear();
      m.layers.clear();
    };
    if (!replies[i].ok()) {
      fail(replies[i].status());
      continue;
    }
    const nlohmann::json& reply = replies[i].value();
    if (!reply.contains("descriptor")) {
      fail(
          Status::Internal(fmt::format("backup manager {}: reply lacks 'descriptor'", m.endpoint)));
      continue;
    }
    auto descriptor = BackupDescriptor::FromJson(reply["descriptor"]);
    if (!descriptor.ok()) {
      fail(descriptor.status().WithContext("backup manager " + m.endpoint));
      continue;
    }
    const std::string& expected = options_.expected_fingerprint.empty()
                                      ? reference_fingerprint_
                                      : options_.expected_fingerprint;
    if (!expected.empty() && descriptor->fingerprint != expected) {
      refused = true;
      fail(Status::InvalidArgument(
               fmt::format("backup manager {} serves checkpoint {} with fingerprint {}, expected "
                           "{}: refused (another checkpoint?)",
                           m.endpoint, descriptor->model_dir, descriptor->fingerprint, expected)),
           Manager::State::kRefused);
      continue;
    }
    const std::string backend = descriptor->region.backend;
    auto engine_it = engines_.find(backend);
    if (engine_it == engines_.end()) {
      auto opts = options_.transport_options.find(backend);
      auto engine = transfer::CreateEngine(backend, opts == options_.transport_options.end()
                                                        ? transfer::EngineOptions{}
                                                        : opts->second);
      if (!engine.ok()) {
        fail(engine.status().WithContext("backup manager " + m.endpoint));
        continue;
      }
      engine_it = engines_.emplace(backend, std::move(engine).value()).first;
    }
    m.region.reset();
    auto region = engine_it->second->Import(descriptor->region, deadline);
    if (!region.ok()) {
      fail(region.status().WithContext("backup manager " + m.endpoint));
      continue;
    }
    m.descriptor = std::move(descriptor).value();
    m.engine = engine_it->second.get();
    m.region = std::move(region).value();
    m.generation = NextRegionGeneration();
    m.by_expert.clear();
    m.layers.clear();
    for (const auto& [name, p] : m.descriptor.params) {
      m.by_expert[{p.layer, p.expert}].push_back(&p);
      m.layers.insert(p.layer);
    }
    for (auto& [key, params] : m.by_expert)
      std::sort(params.begin(), params.end(), [](const ParamLocation* a, const ParamLocation* b) {
        return RoleOrder(a->role) < RoleOrder(b->role);
      });
    m.state = Manager::State::kReady;
    m.error.clear();
    if (reference_fingerprint_.empty()) reference_fingerprint_ = m.descriptor.fingerprint;
    EEP_LOG_INFO("backup: connected to {} ({}, {:.2f} GiB, {} tensors, fingerprint {})", m.Label(),
                 backend, m.descriptor.region.num_bytes / double(1ull << 30),
                 m.descriptor.params.size(), m.descriptor.fingerprint);
  }
  std::vector<std::string> failures;
  for (auto& m : managers_)
    if (m->state != Manager::State::kReady) failures.push_back(m->error);
  if (failures.empty()) return Status::Ok();
  std::string message = fmt::format("expert backup: {}/{} managers not ready: {}", failures.size(),
                                    managers_.size(), fmt::join(failures, "; "));
  EEP_LOG_WARN("{} (the runtime continues without them)", message);
  return refused ? Status::InvalidArgument(message) : Status::Unavailable(message);
}

bool ExpertBackupClient::Usable(const Manager& m) {
  return m.state == Manager::State::kReady && m.region->CheckAlive().ok();
}

bool ExpertBackupClient::IsReady() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (managers_.empty()) return false;
  for (const auto& m : managers_)
    if (!Usable(*m)) return false;
  return true;
}

size_t ExpertBackupClient::NumReadyManagers() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& m : managers_) n += Usable(*m);
  return n;
}

std::string ExpertBackupClient::Health() const {
  std::lock_guard<std::mutex> lock(mu_);
  return HealthLocked();
}

std::string ExpertBackupClient::HealthLocked() const {
  size_t ready = 0;
  std::vector<std::string> parts;
  for (const auto& m : managers_) {
    if (m->state == Manager::State::kReady && !m->region->CheckAlive().ok()) {
      parts.push_back(fmt::format("{}: {}", m->Label(), m->region->CheckAlive().ToString()));
    } else if (m->state == Manager::State::kReady) {
      ++ready;
      parts.push_back(fmt::format("{}: {} {:.2f} GiB", m->Label(), m->descriptor.region.backend,
                                  m->descriptor.region.num_bytes / double(1ull << 30)));
    } else {
      parts.push_back(fmt::format("{}: {}", m->endpoint, m->error));
    }
  }
  const char* word = managers_.empty()           ? "unavailable"
                     : ready == managers_.size() ? "ready"
                     : ready > 0                 ? "degraded"
                                                 : "unavailable";
  return fmt::format("{}: {}/{} backup managers ready ({})", word, ready, managers_.size(),
                     fmt::join(parts, "; "));
}

std::vector<BackupDescriptor> ExpertBackupClient::Descriptors() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<BackupDescriptor> out;
  for (const auto& m : managers_)
    if (m->state == Manager::State::kReady) out.push_back(m->descriptor);
  return out;
}

Result<std::vector<ExpertBackupClient::Selection>> ExpertBackupClient::Select(
    int64_t layer_id, const std::vector<int64_t>& expert_ids,
    const std::string& name_filter) const {
  std::optional<std::regex> filter;
  if (!name_filter.empty()) {
    try {
      filter.emplace(name_filter, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return Status::InvalidArgument(
          fmt::format("name filter '{}' is not a valid regex: {}", name_filter, e.what()));
    }
  }
  std::vector<Manager*> ready, not_ready;
  for (const auto& m : managers_)
    (m->state == Manager::State::kReady ? ready : not_ready).push_back(m.get());
  if (ready.empty()) return Status::Unavailable("expert backup unavailable: " + HealthLocked());
  bool layer_known = false;
  for (Manager* m : ready) layer_known |= m->layers.count(layer_id) > 0;

  std::vector<Selection> out;
  std::map<Manager*, uint64_t> load;  // bytes already given to each manager in this call
  for (int64_t e : expert_ids) {
    Manager* best = nullptr;
    for (Manager* m : ready) {
      if (!m->by_expert.count({layer_id, e})) continue;
      if (best == nullptr || load[m] < load[best]) best = m;
    }
    if (best == nullptr) {
      if (!not_ready.empty()) {
        std::vector<std::string> labels;
        for (Manager* m : not_ready)
          labels.push_back(fmt::format("{} ({})", m->endpoint, m->error));
        return Status::Unavailable(
            fmt::format("layer {} expert {}: not held by any ready backup manager; not ready: {}",
                        layer_id, e, fmt::join(labels, "; ")));
      }
      if (!layer_known)
        return Status::NotFound(fmt::format(
            "layer {}: no backup manager holds any expert of it (not a MoE layer?)", layer_id));
      std::vector<std::string> labels;
      for (Manager* m : ready) labels.push_back(m->Label());
      return Status::NotFound(fmt::format("layer {} expert {}: not held by any backup manager ({})",
                                          layer_id, e, fmt::join(labels, ", ")));
    }
    size_t matched = 0;
    for (const ParamLocation* p : best->by_expert.at({layer_id, e})) {
      if (filter && !std::regex_search(p->name, *filter)) continue;
      out.push_back({best, p});
      load[best] += p->num_bytes;
      ++matched;
    }
    if (matched == 0)
      return Status::InvalidArgument(fmt::format(
          "name filter '{}' matches no tensor of layer {} expert {}", name_filter, layer_id, e));
  }
  return out;
}

Result<std::vector<ExpertParamInfo>> ExpertBackupClient::ListExpertParams(
    int64_t layer_id, const std::vector<int64_t>& logical_expert_ids,
    const std::string& name_filter) const {
  std::lock_guard<std::mutex> lock(mu_);
  EEP_ASSIGN_OR_RETURN(std::vector<Selection> selection,
                       Select(layer_id, logical_expert_ids, name_filter));
  std::vector<ExpertParamInfo> out;
  for (const Selection& s : selection) {
    const ParamLocation& p = *s.param;
    out.push_back(
        {p.name, p.layer, p.expert, p.role, p.shape, p.dtype, p.num_bytes, s.manager->endpoint});
  }
  return out;
}

Status ExpertBackupClient::FetchLogicalExperts(int64_t layer_id,
                                               const std::vector<int64_t>& logical_expert_ids,
                                               const std::string& name_filter,
                                               const FetchDestinations& destinations) {
  std::lock_guard<std::mutex> lock(mu_);
  transfer::Deadline deadline = transfer::Deadline::AfterMs(options_.timeout_ms);
  double start_s = NowSeconds();
  EEP_ASSIGN_OR_RETURN(std::vector<Selection> selection,
                       Select(layer_id, logical_expert_ids, name_filter));

  // Group by manager: one batch each.
  std::map<Manager*, std::vector<transfer::TransferItem>> batches;
  uint64_t total_bytes = 0;
  for (const Selection& s : selection) {
    const ParamLocation& p = *s.param;
    auto it = destinations.find(p.name);
    if (it == destinations.end())
      return Status::InvalidArgument(
          fmt::format("no destination for tensor '{}' (layer {} expert {} {})", p.name, p.layer,
                      p.expert, p.role));
    const FetchTarget& dst = it->second;
    if (dst.data == nullptr || dst.num_bytes != p.num_bytes)
      return Status::InvalidArgument(
          fmt::format("destination for tensor '{}' has {} bytes at {}, the tensor has {}", p.name,
                      dst.num_bytes, dst.data, p.num_bytes));
    if (dst.kind == transfer::MemoryKind::kDevice && !s.manager->engine->SupportsDevice())
      return Status::Unimplemented(
          fmt::format("destination for tensor '{}' is device memory, which transfer backend '{}' "
                      "does not support",
                      p.name, s.manager->engine->name()));
    batches[s.manager].push_back({dst.data, p.offset, p.num_bytes});
    total_bytes += p.num_bytes;
  }

  auto mark_failed = [&](Manager* m, const Status& s) {
    m->state = Manager::State::kFailed;
    m->error = s.ToString();
    m->region.reset();
    m->by_expert.clear();
    m->layers.clear();
    EEP_LOG_WARN("backup: manager {} marked failed: {} (Connect() again to retry)", m->endpoint,
                 s.ToString());
  };
  for (auto& [m, items] : batches) {
    if (Status alive = m->region->CheckAlive(); !alive.ok()) {
      Status s = alive.WithContext("backup manager " + m->Label());
      mark_failed(m, s);
      return s;
    }
  }
  // Post every batch, then wait for all of them (even after one failed, so that healthy managers'
  // requests finish instead of being cancelled, which would fail their endpoints too).
  Status result;
  {
    std::vector<std::pair<Manager*, std::unique_ptr<transfer::TransferRequest>>> requests;
    for (auto& [m, items] : batches) {
      size_t n = items.size();
      auto req = m->engine->Prepare(transfer::Op::kRead, *m->region, std::move(items));
      if (!req.ok()) {
        if (result.ok())
          result =
              req.status().WithContext(fmt::format("backup manager {}: {} tensors", m->Label(), n));
        continue;
      }
      if (Status s = m->engine->Post(**req); !s.ok()) {
        s = s.WithContext("backup manager " + m->Label());
        mark_failed(m, s);
        if (result.ok()) result = s;
        continue;
      }
      requests.emplace_back(m, std::move(req).value());
    }
    for (auto& [m, req] : requests) {
      Status s = m->engine->Wait(*req, deadline);
      if (s.ok()) continue;
      s = s.WithContext("backup manager " + m->Label());
      mark_failed(m, s);
      if (result.ok()) result = s;
    }
  }
  if (!result.ok()) return result;
  [[maybe_unused]] double elapsed_s = NowSeconds() - start_s;
  EEP_LOG_DEBUG(
      "backup: fetched {} tensors ({:.1f} MiB) of layer {} from {} managers in {:.2f} ms ({:.2f} "
      "GB/s)",
      selection.size(), total_bytes / double(1 << 20), layer_id, batches.size(), elapsed_s * 1e3,
      total_bytes / 1e9 / std::max(elapsed_s, 1e-9));
  return Status::Ok();
}

Result<std::vector<MappedExpertParam>> ExpertBackupClient::MapExpertParams(
    int64_t layer_id, const std::vector<int64_t>& logical_expert_ids, const std::string& name_filter) const {
  std::lock_guard<std::mutex> lock(mu_);
  EEP_ASSIGN_OR_RETURN(std::vector<Selection> selection, Select(layer_id, logical_expert_ids, name_filter));
  std::vector<MappedExpertParam> out;
  out.reserve(selection.size());
  for (const Selection& s : selection) {
    const Manager& m = *s.manager;
    // As a fetch does: a manager that is gone is not read, even though its mapping may outlive it.
    if (m.region) {
      if (Status alive = m.region->CheckAlive(); !alive.ok()) return alive.WithContext("backup manager " + m.Label());
    }
    const uint8_t* base = m.region ? m.region->mapped_data() : nullptr;
    if (base == nullptr)
      return Status::Unimplemented(fmt::format(
          "backup manager {}: transport '{}' does not map its region into this process", m.Label(),
          m.engine != nullptr ? m.engine->name() : "?"));
    const ParamLocation& p = *s.param;
    out.push_back({p.name, base + p.offset, p.num_bytes, p.dtype, base, m.region->descriptor().num_bytes,
                   m.generation});
  }
  return out;
}

}  // namespace eep::backup
