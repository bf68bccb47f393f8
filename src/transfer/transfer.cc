#include "transfer/transfer.h"

#include <fmt/format.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <mutex>

#include "core/logging.h"

namespace eep::transfer {

// Built-in backend factories, declared from backends.def.
#define EEP_TRANSFER_BACKEND(name, help, factory) \
  Result<std::unique_ptr<Engine>> factory(const EngineOptions& options);
#include "transfer/backends.def"
#undef EEP_TRANSFER_BACKEND

const char* MemoryKindName(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost: return "host";
    case MemoryKind::kPinnedHost: return "pinned_host";
    case MemoryKind::kDevice: return "device";
  }
  return "?";
}

Result<MemoryKind> ParseMemoryKind(const std::string& name) {
  for (MemoryKind k : {MemoryKind::kHost, MemoryKind::kPinnedHost, MemoryKind::kDevice})
    if (name == MemoryKindName(k)) return k;
  return Status::InvalidArgument(
      fmt::format("unknown memory kind '{}' (host, pinned_host, device)", name));
}

const char* OpName(Op op) {
  return op == Op::kRead ? "READ" : "WRITE";
}

int64_t Deadline::RemainingMs() const {
  auto left = at_ - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  return std::chrono::ceil<std::chrono::milliseconds>(left).count();
}

// ---- Descriptor -----------------------------------------------------------------------------

nlohmann::json RegionDescriptor::ToJson() const {
  return {{"backend", backend},
          {"host_id", host_id},
          {"owner", owner},
          {"base_address", base_address},
          {"num_bytes", num_bytes},
          {"kind", MemoryKindName(kind)},
          {"remote_writable", remote_writable},
          {"blob", Base64Encode(backend_blob)}};
}

Result<RegionDescriptor> RegionDescriptor::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Status::InvalidArgument("region descriptor is not a JSON object");
  RegionDescriptor d;
  auto field = [&](const char* key) -> Result<const nlohmann::json*> {
    if (!j.contains(key))
      return Status::InvalidArgument(fmt::format("region descriptor lacks '{}'", key));
    return &j.at(key);
  };
  auto str = [&](const char* key, std::string* out) -> Status {
    EEP_ASSIGN_OR_RETURN(const nlohmann::json* v, field(key));
    if (!v->is_string())
      return Status::InvalidArgument(fmt::format("region descriptor '{}' is not a string", key));
    *out = v->get<std::string>();
    return Status::Ok();
  };
  auto u64 = [&](const char* key, uint64_t* out) -> Status {
    EEP_ASSIGN_OR_RETURN(const nlohmann::json* v, field(key));
    if (!v->is_number_unsigned())
      return Status::InvalidArgument(
          fmt::format("region descriptor '{}' is not an unsigned integer", key));
    *out = v->get<uint64_t>();
    return Status::Ok();
  };
  EEP_RETURN_IF_ERROR(str("backend", &d.backend));
  EEP_RETURN_IF_ERROR(str("host_id", &d.host_id));
  EEP_RETURN_IF_ERROR(str("owner", &d.owner));
  EEP_RETURN_IF_ERROR(u64("base_address", &d.base_address));
  EEP_RETURN_IF_ERROR(u64("num_bytes", &d.num_bytes));
  std::string kind, blob;
  EEP_RETURN_IF_ERROR(str("kind", &kind));
  EEP_ASSIGN_OR_RETURN(d.kind, ParseMemoryKind(kind));
  EEP_ASSIGN_OR_RETURN(const nlohmann::json* writable, field("remote_writable"));
  if (!writable->is_boolean())
    return Status::InvalidArgument("region descriptor 'remote_writable' is not a boolean");
  d.remote_writable = writable->get<bool>();
  EEP_RETURN_IF_ERROR(str("blob", &blob));
  EEP_ASSIGN_OR_RETURN_CTX(d.backend_blob, Base64Decode(blob), "region descriptor 'blob'");
  return d;
}

const std::string& LocalHostId() {
  static const std::string id = [] {
    char host[256] = {};
    gethostname(host, sizeof host - 1);
    std::string boot_id;
    std::ifstream in("/proc/sys/kernel/random/boot_id");
    std::getline(in, boot_id);
    return std::string(host) + "/" + boot_id;
  }();
  return id;
}

// ---- Engine helpers -------------------------------------------------------------------------

namespace {
constexpr int64_t kMaxSleepMs = 50;

// Sleeps on `fd` for up to `timeout_ms`.
void SleepOnFd(int fd, int64_t timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  ::poll(&p, 1, static_cast<int>(timeout_ms));
}
}  // namespace

Status Engine::Wait(TransferRequest& request, Deadline deadline) {
  // Poll back to back for a short while before sleeping: while data streams in there is nearly
  // always work, and a sleep/wake cycle per burst costs throughput. Then block on the fd.
  constexpr auto kSpin = std::chrono::microseconds(200);
  for (;;) {
    Status s = Poll(request);
    if (s.code() != StatusCode::kInProgress) return s;
    const auto spin_until = Deadline::Clock::now() + kSpin;
    while (s.code() == StatusCode::kInProgress && Deadline::Clock::now() < spin_until)
      s = Poll(request);
    if (s.code() != StatusCode::kInProgress) return s;
    if (deadline.Expired()) {
      Cancel(request);
      return Status::Timeout(fmt::format(
          "{} backend: {} of {} items ({} bytes) with {} not done by the deadline", name(),
          OpName(request.op()), request.num_items(), request.total_bytes(), request.peer()));
    }
    int fd = EventFd();
    if (fd < 0) continue;  // this backend's Poll does the work itself
    if (!ArmEvents()) continue;
    SleepOnFd(fd, std::min(kMaxSleepMs, std::max<int64_t>(1, deadline.RemainingMs())));
  }
}

Status Engine::Transfer(Op op, RemoteRegion& remote, std::vector<TransferItem> items,
                        Deadline deadline) {
  EEP_ASSIGN_OR_RETURN(std::unique_ptr<TransferRequest> request,
                       Prepare(op, remote, std::move(items)));
  EEP_RETURN_IF_ERROR(Post(*request));
  return Wait(*request, deadline);
}

void Engine::ProgressFor(int64_t timeout_ms) {
  constexpr int kMaxSpins = 1024;  // bounds one burst so the caller's stop flag stays responsive
  Deadline deadline = Deadline::AfterMs(timeout_ms);
  int fd = EventFd();
  if (fd < 0) {
    SleepOnFd(-1, timeout_ms);  // nothing to drive; just wait the slice out
    return;
  }
  for (;;) {
    for (int i = 0; i < kMaxSpins && Progress(); ++i) {
    }
    if (deadline.Expired()) return;
    if (!ArmEvents()) continue;
    SleepOnFd(fd, deadline.RemainingMs());
    for (int i = 0; i < kMaxSpins && Progress(); ++i) {
    }
    return;
  }
}

// ---- Registry -------------------------------------------------------------------------------

namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, BackendInfo> backends;  // GUARDED_BY(mu)
};

Registry& GetRegistry() {
  static Registry* registry = [] {
    auto* r = new Registry();
#define EEP_TRANSFER_BACKEND(name, help, factory) \
  r->backends[#name] = BackendInfo{#name, help, factory};
#include "transfer/backends.def"
#undef EEP_TRANSFER_BACKEND
    return r;
  }();
  return *registry;
}

}  // namespace

Status RegisterBackend(BackendInfo info) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (info.name.empty() || !info.factory)
    return Status::InvalidArgument("transfer backend needs a name and a factory");
  if (r.backends.count(info.name))
    return Status::AlreadyExists(
        fmt::format("transfer backend '{}' is already registered", info.name));
  std::string name = info.name;
  r.backends.emplace(std::move(name), std::move(info));
  return Status::Ok();
}

std::vector<std::string> BackendNames() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const auto& [name, info] : r.backends) names.push_back(name);
  return names;
}

std::string DescribeBackends() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::string out;
  for (const auto& [name, info] : r.backends) out += fmt::format("{}: {}\n", name, info.help);
  return out;
}

Result<std::unique_ptr<Engine>> CreateEngine(const std::string& name,
                                             const EngineOptions& options) {
  EngineFactory factory;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.backends.find(name);
    if (it == r.backends.end()) {
      std::string names;
      for (const auto& [n, info] : r.backends) names += (names.empty() ? "" : ", ") + n;
      return Status::NotFound(
          fmt::format("unknown transfer backend '{}' (registered: {})", name, names));
    }
    factory = it->second.factory;
  }
  auto engine = factory(options);
  if (!engine.ok()) return engine.status().WithContext(fmt::format("transfer backend '{}'", name));
  return engine;
}


Result<uint64_t> ValidateBatch(const char* backend, Op op, const RegionDescriptor& region,
                               const std::vector<TransferItem>& items) {
  if (op == Op::kWrite && !region.remote_writable)
    return Status::InvalidArgument(fmt::format("{}: region of {} is not remote-writable", backend, region.owner));
  uint64_t total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const TransferItem& it = items[i];
    if (it.num_bytes == 0) continue;
    if (it.local == nullptr)
      return Status::InvalidArgument(fmt::format("{}: item {} has a null local buffer", backend, i));
    if (it.remote_offset > region.num_bytes || it.num_bytes > region.num_bytes - it.remote_offset)
      return Status::OutOfRange(fmt::format("{}: item {} [{}, +{}) runs past the {}-byte region of {}", backend, i,
                                            it.remote_offset, it.num_bytes, region.num_bytes, region.owner));
    total += it.num_bytes;
  }
  return total;
}

RegionDescriptor LocalRegion::BaseDescriptor(const std::string& backend, const ExportOptions& options) const {
  RegionDescriptor d;
  d.backend = backend;
  d.host_id = LocalHostId();
  d.owner = options.owner.empty() ? fmt::format("pid {}", getpid()) : options.owner;
  d.base_address = reinterpret_cast<uint64_t>(data());
  d.num_bytes = num_bytes();
  d.kind = kind();
  d.remote_writable = options.remote_writable;
  return d;
}

}  // namespace eep::transfer
