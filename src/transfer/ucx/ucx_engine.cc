#include "transfer/ucx/ucx_engine.h"

#include <fmt/format.h>
#include <poll.h>
#include <sys/mman.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>

#include "core/logging.h"

namespace eep::transfer {

// ---- Blob ----------------------------------------------------------------------------------

namespace {
void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
}  // namespace

std::string EncodeUcxBlob(const UcxRegionBlob& blob) {
  std::string out;
  PutU32(&out, static_cast<uint32_t>(blob.worker_address.size()));
  out += blob.worker_address;
  PutU32(&out, static_cast<uint32_t>(blob.packed_rkey.size()));
  out += blob.packed_rkey;
  return out;
}

Result<UcxRegionBlob> DecodeUcxBlob(std::string_view bytes) {
  UcxRegionBlob blob;
  size_t pos = 0;
  auto take = [&](std::string* out, const char* what) -> Status {
    if (bytes.size() - pos < 4)
      return Status::InvalidArgument(fmt::format("ucx blob truncated before {} length", what));
    uint32_t n = 0;
    for (int i = 0; i < 4; ++i)
      n |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[pos + i])) << (8 * i);
    pos += 4;
    if (bytes.size() - pos < n)
      return Status::InvalidArgument(fmt::format("ucx blob truncated inside {}", what));
    out->assign(bytes.data() + pos, n);
    pos += n;
    return Status::Ok();
  };
  EEP_RETURN_IF_ERROR(take(&blob.worker_address, "worker address"));
  EEP_RETURN_IF_ERROR(take(&blob.packed_rkey, "rkey"));
  if (pos != bytes.size()) return Status::InvalidArgument("ucx blob has trailing bytes");
  if (blob.worker_address.empty() || blob.packed_rkey.empty())
    return Status::InvalidArgument("ucx blob has an empty worker address or rkey");
  return blob;
}

namespace {

constexpr uint64_t kMaxOpBytes = 64ull << 20;  // one UCP operation at most (bounds a cma syscall)
constexpr int64_t kCloseTimeoutMs = 1000;      // graceful endpoint close
constexpr int64_t kCancelTimeoutMs = 2000;     // outstanding ops after a forced close

struct ContextDeleter {
  void operator()(ucp_context* c) const { ucp_cleanup(c); }
};
struct WorkerDeleter {
  void operator()(ucp_worker* w) const { ucp_worker_destroy(w); }
};

std::string UcsError(ucs_status_t s) {
  return ucs_status_string(s);
}

bool IsDisconnect(ucs_status_t s) {
  switch (s) {
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_CANCELED: return true;
    default: return false;
  }
}

Status FromUcs(ucs_status_t s, const std::string& what) {
  std::string msg = fmt::format("ucx: {}: {}", what, UcsError(s));
  if (IsDisconnect(s)) return Status::RemoteDisconnect(msg);
  if (s == UCS_ERR_TIMED_OUT) return Status::Timeout(msg);
  if (s == UCS_ERR_NO_MEMORY || s == UCS_ERR_NO_RESOURCE) return Status::ResourceExhausted(msg);
  return Status::Internal(msg);
}

// One endpoint per remote worker. All fields but the atomics are GUARDED_BY(engine mu_).
struct UcxEndpoint {
  ucp_ep_h ep = nullptr;
  std::string peer;
  bool wired = false;  // a first transfer completed (wire-up done)
  std::atomic<bool> failed{false};
  std::atomic<int> fail_status{UCS_OK};  // ucs_status_t that failed it
};

// Completion state of one request's outstanding UCP operations; GUARDED_BY(engine mu_). Kept
// separate from the request so that, should UCX ever fail to complete an operation after a
// forced close, the callback target can outlive the request (the engine keeps it).
struct OpState {
  size_t pending = 0;
  ucs_status_t first_error = UCS_OK;
};

void OnOpDone(void* ucp_request, ucs_status_t status, void* user_data) {
  auto* st = static_cast<OpState*>(user_data);
  --st->pending;
  if (status != UCS_OK && st->first_error == UCS_OK) st->first_error = status;
  ucp_request_free(ucp_request);
}

void OnEndpointError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* ep = static_cast<UcxEndpoint*>(arg);
  ep->fail_status = status;
  ep->failed = true;
  EEP_LOG_WARN("ucx: endpoint to {} failed: {}", ep->peer, UcsError(status));
}

class UcxEngine;

class UcxLocalRegion final : public LocalRegion {
 public:
  UcxLocalRegion(UcxEngine* engine, uint8_t* data, uint64_t num_bytes, MemoryKind kind,
                 ucp_mem_h memh, bool owns_memory, ExportOptions options)
      : LocalRegion(data, num_bytes, kind),
        engine_(engine),
        memh_(memh),
        owns_memory_(owns_memory),
        options_(std::move(options)) {}
  ~UcxLocalRegion() override;
  Result<RegionDescriptor> Export() const override;
  ucp_mem_h memh() const { return memh_; }

 private:
  UcxEngine* engine_;
  ucp_mem_h memh_;
  bool owns_memory_;  // true: from AllocateExportable (munmap on release)
  ExportOptions options_;
};

class UcxRemoteRegion final : public RemoteRegion {
 public:
  UcxRemoteRegion(UcxEngine* engine, RegionDescriptor d, std::shared_ptr<UcxEndpoint> ep,
                  ucp_rkey_h rkey)
      : RemoteRegion(std::move(d)), engine_(engine), ep_(std::move(ep)), rkey_(rkey) {}
  ~UcxRemoteRegion() override;

  Status CheckAlive() const override {
    if (!ep_->failed) return Status::Ok();
    return FromUcs(
        static_cast<ucs_status_t>(ep_->fail_status.load()),
        fmt::format("endpoint to {} failed (import the region again)", descriptor().owner));
  }

  UcxEngine* engine_;
  std::shared_ptr<UcxEndpoint> ep_;  // reference drops happen under the engine's mutex
  ucp_rkey_h rkey_;
};

enum class State { kPrepared, kPosted, kDone, kFailed, kCancelled };

class UcxRequest final : public TransferRequest {
 public:
  // `segments`: the items after merging (TransferRequest::num_items counts the caller's).
  UcxRequest(UcxEngine* engine, Op op, size_t num_items, std::vector<TransferItem> segments,
             uint64_t total, UcxRemoteRegion* remote)
      : TransferRequest(op, num_items, total, remote->descriptor().owner),
        engine_(engine),
        items_(std::move(segments)),
        remote_(remote),
        ops_(new OpState()) {}
  ~UcxRequest() override;

  UcxEngine* engine_;
  std::vector<TransferItem> items_;
  UcxRemoteRegion* remote_;
  OpState* ops_;  // owned; handed to the engine if UCX still holds it at destruction
  State state_ = State::kPrepared;
  Status status_;
};

class UcxEngine final : public Engine {
 public:
  static Result<std::unique_ptr<Engine>> Create(const EngineOptions& options) {
    for (const auto& [key, value] : options.params)
      if (key != "tls")
        return Status::InvalidArgument(fmt::format("ucx: unknown param '{}' (tls)", key));
    std::unique_ptr<UcxEngine> e(new UcxEngine());
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return FromUcs(s, "ucp_config_read").WithContext("reading UCX_* environment");
    auto tls = options.params.find("tls");
    if (tls != options.params.end() && std::getenv("UCX_TLS") == nullptr)
      ucp_config_modify(config, "TLS", tls->second.c_str());
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    ucp_context_h ctx = nullptr;
    s = ucp_init(&params, config, &ctx);
    ucp_config_release(config);
    if (s != UCS_OK)
      return Status::Unavailable(fmt::format("ucx: ucp_init failed: {}", UcsError(s)));
    e->context_.reset(ctx);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    ucp_worker_h worker = nullptr;
    s = ucp_worker_create(e->context_.get(), &wp, &worker);
    if (s != UCS_OK)
      return Status::Unavailable(fmt::format("ucx: ucp_worker_create failed: {}", UcsError(s)));
    e->worker_.reset(worker);
    s = ucp_worker_get_efd(worker, &e->efd_);
    if (s != UCS_OK)
      return Status::Unavailable(fmt::format("ucx: ucp_worker_get_efd failed: {}", UcsError(s)));
    ucp_address_t* address = nullptr;
    size_t address_bytes = 0;
    s = ucp_worker_get_address(worker, &address, &address_bytes);
    if (s != UCS_OK)
      return Status::Unavailable(
          fmt::format("ucx: ucp_worker_get_address failed: {}", UcsError(s)));
    e->worker_address_.assign(reinterpret_cast<const char*>(address), address_bytes);
    ucp_worker_release_address(worker, address);
    return std::unique_ptr<Engine>(std::move(e));
  }

  ~UcxEngine() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [address, ep] : endpoints_) {
      if (ep.use_count() > 1)
        EEP_LOG_ERROR("ucx: engine destroyed while a region of {} is still imported", ep->peer);
      CloseEndpoint(*ep);
    }
    endpoints_.clear();
    if (!registered_.empty())
      EEP_LOG_ERROR("ucx: engine destroyed with {} regions still registered", registered_.size());
    worker_.reset();
    for (OpState* st : zombies_) delete st;
    context_.reset();
  }

  const std::string& name() const override { return name_; }
  bool SupportsRemote() const override { return true; }
  bool SupportsDevice() const override { return false; }

  Result<std::unique_ptr<LocalRegion>> AllocateExportable(uint64_t num_bytes,
                                                          const ExportOptions& options) override {
    if (options.kind == MemoryKind::kDevice)
      return Status::Unimplemented("ucx: device memory is not supported in this build");
    if (num_bytes == 0) return Status::InvalidArgument("ucx: cannot export an empty region");
    void* p = mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      return Status::ResourceExhausted(
          fmt::format("ucx: mmap of {} bytes failed ({})", num_bytes, std::strerror(errno)));
    madvise(p, num_bytes, MADV_HUGEPAGE);  // best effort
    if (options.kind == MemoryKind::kPinnedHost && mlock(p, num_bytes) != 0) {
      int err = errno;
      munmap(p, num_bytes);
      return Status::ResourceExhausted(
          fmt::format("ucx: mlock of {} bytes failed ({}); raise the locked-memory limit (ulimit "
                      "-l) or do not pin",
                      num_bytes, std::strerror(err)));
    }
    unsigned prot =
        UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_LOCAL_WRITE | UCP_MEM_MAP_PROT_REMOTE_READ |
        (options.remote_writable ? static_cast<unsigned>(UCP_MEM_MAP_PROT_REMOTE_WRITE) : 0u);
    auto memh = MapMemory(p, num_bytes, prot);
    if (!memh.ok()) {
      munmap(p, num_bytes);
      return memh.status();
    }
    return std::unique_ptr<LocalRegion>(new UcxLocalRegion(
        this, static_cast<uint8_t*>(p), num_bytes, options.kind, *memh, true, options));
  }

  Result<std::unique_ptr<LocalRegion>> RegisterMemory(void* data, uint64_t num_bytes,
                                                      MemoryKind kind) override {
    if (kind == MemoryKind::kDevice)
      return Status::Unimplemented("ucx: device memory is not supported in this build");
    if (data == nullptr || num_bytes == 0)
      return Status::InvalidArgument("ucx: RegisterMemory of an empty range");
    EEP_ASSIGN_OR_RETURN(
        ucp_mem_h memh,
        MapMemory(data, num_bytes, UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_LOCAL_WRITE));
    return std::unique_ptr<LocalRegion>(new UcxLocalRegion(
        this, static_cast<uint8_t*>(data), num_bytes, kind, memh, false, ExportOptions{}));
  }

  Result<std::unique_ptr<RemoteRegion>> Import(const RegionDescriptor& d,
                                               Deadline deadline) override {
    if (d.backend != "ucx")
      return Status::InvalidArgument(
          fmt::format("ucx: cannot import a region of backend '{}'", d.backend));
    if (d.kind == MemoryKind::kDevice)
      return Status::Unimplemented("ucx: device memory is not supported in this build");
    EEP_ASSIGN_OR_RETURN_CTX(UcxRegionBlob blob, DecodeUcxBlob(d.backend_blob),
                             "ucx: descriptor of " + d.owner);
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<UcxEndpoint>& ep = endpoints_[blob.worker_address];
    if (ep && ep->failed) {
      CloseEndpoint(*ep);
      ep.reset();  // regions still holding the old one keep reporting the failure
    }
    if (!ep) {
      auto fresh = std::make_shared<UcxEndpoint>();
      fresh->peer = d.owner;
      ucp_ep_params_t ep_params{};
      ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS |
                             UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep_params.address = reinterpret_cast<const ucp_address_t*>(blob.worker_address.data());
      // Never UCP_ERR_HANDLING_MODE_NONE: without it a dead peer leaves operations hanging that
      // no cancel can reclaim (measured: they stay outstanding after a forced close).
      ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep_params.err_handler.cb = OnEndpointError;
      ep_params.err_handler.arg = fresh.get();
      ucs_status_t s = ucp_ep_create(worker_.get(), &ep_params, &fresh->ep);
      if (s != UCS_OK) {
        endpoints_.erase(blob.worker_address);
        return Status::Unavailable(
            fmt::format("ucx: cannot reach {} (ucp_ep_create: {}); peer-failure handling needs a "
                        "transport such as tcp, "
                        "cma or verbs in UCX_TLS",
                        d.owner, UcsError(s)));
      }
      ep = std::move(fresh);
    }
    ucp_rkey_h rkey = nullptr;
    ucs_status_t s = ucp_ep_rkey_unpack(ep->ep, blob.packed_rkey.data(), &rkey);
    if (s != UCS_OK)
      return Status::Unavailable(
          fmt::format("ucx: cannot unpack the rkey of {} ({})", d.owner, UcsError(s)));
    if (!ep->wired && d.num_bytes > 0) {
      // Complete the wire-up now with a 1-byte read: the first real transfer then pays no
      // connection set-up, and an unreachable or dead peer is reported here. (It also keeps
      // connection set-up out of fetches: with UCX 1.13 a peer that dies while replying to a
      // wire-up can trip an assertion in the other side's UCX, openucx/ucx#8175.)
      Status warm = ReadOneByteLocked(*ep, d.base_address, rkey, deadline);
      if (!warm.ok()) {
        ucp_rkey_destroy(rkey);
        return warm.WithContext(fmt::format("ucx: connecting to {}", d.owner));
      }
      ep->wired = true;
    }
    return std::unique_ptr<RemoteRegion>(new UcxRemoteRegion(this, d, ep, rkey));
  }

  Result<std::unique_ptr<TransferRequest>> Prepare(Op op, RemoteRegion& remote,
                                                   std::vector<TransferItem> items) override {
    auto* ucx = dynamic_cast<UcxRemoteRegion*>(&remote);
    if (ucx == nullptr || ucx->engine_ != this)
      return Status::InvalidArgument(fmt::format(
          "ucx: region of {} was not imported by this engine", remote.descriptor().owner));
    EEP_ASSIGN_OR_RETURN(const uint64_t total, ValidateBatch("ucx", op, remote.descriptor(), items));
    // Merge items adjacent on both sides (a layer's tensors restored into one packed buffer
    // become a few large operations: fewer round trips over emulated GET).
    std::vector<TransferItem> merged;
    for (const TransferItem& it : items) {
      if (it.num_bytes == 0) continue;
      if (!merged.empty()) {
        TransferItem& last = merged.back();
        if (static_cast<uint8_t*>(last.local) + last.num_bytes == it.local &&
            last.remote_offset + last.num_bytes == it.remote_offset) {
          last.num_bytes += it.num_bytes;
          continue;
        }
      }
      merged.push_back(it);
    }
    return std::unique_ptr<TransferRequest>(
        new UcxRequest(this, op, items.size(), std::move(merged), total, ucx));
  }

  Status Post(TransferRequest& request) override {
    auto& r = static_cast<UcxRequest&>(request);
    std::lock_guard<std::mutex> lock(mu_);
    if (r.state_ != State::kPrepared) return Status::InvalidArgument("ucx: request posted twice");
    r.state_ = State::kPosted;
    UcxEndpoint& ep = *r.remote_->ep_;
    if (ep.failed || ep.ep == nullptr) return FailLocked(r, r.remote_->CheckAlive());
    const uint64_t base = r.remote_->descriptor().base_address;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = OnOpDone;
    param.user_data = r.ops_;
    auto track = [&](ucs_status_ptr_t sp, const char* what) -> bool {
      if (sp == nullptr) return true;  // completed in place
      if (UCS_PTR_IS_ERR(sp)) {
        if (r.ops_->first_error == UCS_OK) r.ops_->first_error = UCS_PTR_STATUS(sp);
        EEP_LOG_DEBUG("ucx: {} to {} failed at post: {}", what, r.peer(),
                      UcsError(UCS_PTR_STATUS(sp)));
        return false;
      }
      ++r.ops_->pending;
      return true;
    };
    for (const TransferItem& it : r.items_) {
      ucp_request_param_t p = param;
      if (ucp_mem_h memh = FindMemh(it.local, it.num_bytes)) {
        p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        p.memh = memh;
      }
      for (uint64_t off = 0; off < it.num_bytes; off += kMaxOpBytes) {
        uint64_t n = std::min(kMaxOpBytes, it.num_bytes - off);
        uint8_t* local = static_cast<uint8_t*>(it.local) + off;
        uint64_t raddr = base + it.remote_offset + off;
        ucs_status_ptr_t sp = r.op() == Op::kRead
                                  ? ucp_get_nbx(ep.ep, local, n, raddr, r.remote_->rkey_, &p)
                                  : ucp_put_nbx(ep.ep, local, n, raddr, r.remote_->rkey_, &p);
        if (!track(sp, OpName(r.op())))
          return Status::Ok();  // Poll reports it once the rest settled
      }
    }
    if (r.op() == Op::kWrite) track(ucp_ep_flush_nbx(ep.ep, &param), "flush");
    return Status::Ok();
  }

  Status Poll(TransferRequest& request) override {
    auto& r = static_cast<UcxRequest&>(request);
    std::lock_guard<std::mutex> lock(mu_);
    switch (r.state_) {
      case State::kPrepared:
        return Status::InvalidArgument("ucx: Poll of a request that was not posted");
      case State::kDone: return Status::Ok();
      case State::kFailed: return r.status_;
      case State::kCancelled:
        return Status::Cancelled(fmt::format("ucx: transfer with {} was cancelled", r.peer()));
      case State::kPosted: break;
    }
    for (int i = 0; i < 64 && ucp_worker_progress(worker_.get()) != 0; ++i) {
    }
    if (r.ops_->pending > 0) return Status::InProgress();
    if (r.ops_->first_error != UCS_OK)
      return FailLocked(r, FromUcs(r.ops_->first_error,
                                   fmt::format("{} of {} items ({} bytes) with {}", OpName(r.op()),
                                               r.num_items(), r.total_bytes(), r.peer())));
    r.state_ = State::kDone;
    return Status::Ok();
  }

  void Cancel(TransferRequest& request) override {
    auto& r = static_cast<UcxRequest&>(request);
    std::lock_guard<std::mutex> lock(mu_);
    CancelLocked(r);
  }

  int EventFd() override { return efd_; }

  bool Progress() override {
    std::lock_guard<std::mutex> lock(mu_);
    return ucp_worker_progress(worker_.get()) != 0;
  }

  bool ArmEvents() override {
    std::lock_guard<std::mutex> lock(mu_);
    return ucp_worker_arm(worker_.get()) != UCS_ERR_BUSY;
  }

  // ---- used by the region/request destructors ----

  void ReleaseRequest(UcxRequest& r) {
    std::lock_guard<std::mutex> lock(mu_);
    CancelLocked(r);
    if (r.ops_->pending == 0) {
      delete r.ops_;
    } else {
      EEP_LOG_ERROR(
          "ucx: {} operations with {} still outstanding after cancel; keeping their state",
          r.ops_->pending, r.peer());
      zombies_.push_back(r.ops_);
    }
    r.ops_ = nullptr;
  }

  void ReleaseRemote(UcxRemoteRegion& region) {
    std::lock_guard<std::mutex> lock(mu_);
    if (region.rkey_ != nullptr) ucp_rkey_destroy(region.rkey_);
    region.rkey_ = nullptr;
    std::shared_ptr<UcxEndpoint> ep = std::move(region.ep_);
    if (ep.use_count() == 1) CloseEndpoint(*ep);  // replaced in the cache and now unused
  }

  void ReleaseLocal(UcxLocalRegion& region, bool owns_memory) {
    std::lock_guard<std::mutex> lock(mu_);
    registered_.erase(reinterpret_cast<uintptr_t>(region.data()));
    ucp_mem_unmap(context_.get(), region.memh());
    if (owns_memory) munmap(region.data(), region.num_bytes());
  }

  Result<std::string> PackRkey(ucp_mem_h memh) {
    void* buf = nullptr;
    size_t n = 0;
    std::lock_guard<std::mutex> lock(mu_);
    ucs_status_t s = ucp_rkey_pack(context_.get(), memh, &buf, &n);
    if (s != UCS_OK) return FromUcs(s, "ucp_rkey_pack");
    std::string out(static_cast<const char*>(buf), n);
    ucp_rkey_buffer_release(buf);
    return out;
  }

  const std::string& worker_address() const { return worker_address_; }

 private:
  UcxEngine() = default;

  Result<ucp_mem_h> MapMemory(void* data, uint64_t num_bytes, unsigned prot) {
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                    UCP_MEM_MAP_PARAM_FIELD_PROT;
    mp.address = data;
    mp.length = num_bytes;
    mp.prot = prot;
    ucp_mem_h memh = nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    ucs_status_t s = ucp_mem_map(context_.get(), &mp, &memh);
    if (s != UCS_OK) return FromUcs(s, fmt::format("ucp_mem_map of {} bytes", num_bytes));
    registered_[reinterpret_cast<uintptr_t>(data)] = {reinterpret_cast<uintptr_t>(data) + num_bytes,
                                                      memh};
    return memh;
  }

  // The memh of a registered region covering [p, p+n), or nullptr. Needs mu_.
  ucp_mem_h FindMemh(const void* p, uint64_t n) const {
    auto addr = reinterpret_cast<uintptr_t>(p);
    auto it = registered_.upper_bound(addr);
    if (it == registered_.begin()) return nullptr;
    --it;
    return addr + n <= it->second.end ? it->second.memh : nullptr;
  }

  Status FailLocked(UcxRequest& r, Status s) {
    r.state_ = State::kFailed;
    r.status_ = std::move(s);
    return r.status_;
  }

  // Runs `request` (a ucs_status_ptr_t from a close) to completion or until the timeout.
  void WaitUcpRequest(ucs_status_ptr_t request, int64_t timeout_ms) {
    if (request == nullptr || UCS_PTR_IS_ERR(request)) return;
    Deadline deadline = Deadline::AfterMs(timeout_ms);
    while (ucp_request_check_status(request) == UCS_INPROGRESS && !deadline.Expired())
      ucp_worker_progress(worker_.get());
    ucp_request_free(request);
  }

  // Reads one byte at `address` over `ep` and waits for it until `deadline`. On failure the
  // endpoint is failed (and closed), so nothing is left outstanding. Needs mu_.
  Status ReadOneByteLocked(UcxEndpoint& ep, uint64_t address, ucp_rkey_h rkey, Deadline deadline) {
    auto* st = new OpState();
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = OnOpDone;
    p.user_data = st;
    ucs_status_ptr_t sp = ucp_get_nbx(ep.ep, &scratch_byte_, 1, address, rkey, &p);
    if (UCS_PTR_IS_ERR(sp)) {
      delete st;
      return FromUcs(UCS_PTR_STATUS(sp), "first read");
    }
    if (sp != nullptr) ++st->pending;
    while (st->pending > 0 && !deadline.Expired()) {
      if (ucp_worker_progress(worker_.get()) != 0) continue;
      if (ucp_worker_arm(worker_.get()) == UCS_ERR_BUSY) continue;
      pollfd pfd{efd_, POLLIN, 0};
      ::poll(&pfd, 1,
             static_cast<int>(std::min<int64_t>(50, std::max<int64_t>(1, deadline.RemainingMs()))));
    }
    Status result;
    if (st->pending > 0) {
      result = Status::Timeout("the peer did not answer the first read before the deadline");
    } else if (st->first_error != UCS_OK) {
      result = FromUcs(st->first_error, "first read");
      if (result.code() == StatusCode::kRemoteDisconnect || result.code() == StatusCode::kInternal)
        result = Status::Unavailable(result.message());
    }
    if (!result.ok()) {
      if (!ep.failed) {
        ep.fail_status = UCS_ERR_CANCELED;
        ep.failed = true;
      }
      CloseEndpoint(ep);  // forced: completes the outstanding read
      Deadline drain = Deadline::AfterMs(kCancelTimeoutMs);
      while (st->pending > 0 && !drain.Expired()) ucp_worker_progress(worker_.get());
    }
    if (st->pending == 0)
      delete st;
    else
      zombies_.push_back(st);
    return result;
  }

  // Closes the endpoint (gracefully unless it failed). Needs mu_.
  void CloseEndpoint(UcxEndpoint& ep) {
    if (ep.ep == nullptr) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = ep.failed ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    WaitUcpRequest(ucp_ep_close_nbx(ep.ep, &p), kCloseTimeoutMs);
    ep.ep = nullptr;
  }

  // Needs mu_.
  void CancelLocked(UcxRequest& r) {
    if (r.state_ != State::kPrepared && r.state_ != State::kPosted) return;
    bool was_posted = r.state_ == State::kPosted;
    r.state_ = State::kCancelled;
    if (!was_posted || r.ops_->pending == 0) return;
    // UCP cannot cancel single RMA operations: fail the whole endpoint, which completes all of
    // its outstanding operations (with UCS_ERR_CANCELED) before the close returns.
    UcxEndpoint& ep = *r.remote_->ep_;
    if (!ep.failed) {
      ep.fail_status = UCS_ERR_CANCELED;
      ep.failed = true;
    }
    if (ep.ep != nullptr) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      WaitUcpRequest(ucp_ep_close_nbx(ep.ep, &p), kCancelTimeoutMs);
      ep.ep = nullptr;
    }
    Deadline deadline = Deadline::AfterMs(kCancelTimeoutMs);
    while (r.ops_->pending > 0 && !deadline.Expired()) ucp_worker_progress(worker_.get());
  }

  struct Registered {
    uintptr_t end;
    ucp_mem_h memh;
  };

  const std::string name_ = "ucx";
  std::mutex mu_;
  std::unique_ptr<ucp_context, ContextDeleter> context_;
  std::unique_ptr<ucp_worker, WorkerDeleter> worker_;  // GUARDED_BY(mu_)
  int efd_ = -1;                                       // owned by the worker
  std::string worker_address_;                         // immutable after Create
  std::map<std::string, std::shared_ptr<UcxEndpoint>>
      endpoints_;                               // GUARDED_BY(mu_), by worker address
  std::map<uintptr_t, Registered> registered_;  // GUARDED_BY(mu_), by start address
  std::list<OpState*> zombies_;                 // GUARDED_BY(mu_)
  uint8_t scratch_byte_ = 0;                    // GUARDED_BY(mu_): target of the wire-up read
};

UcxLocalRegion::~UcxLocalRegion() {
  engine_->ReleaseLocal(*this, owns_memory_);
}

Result<RegionDescriptor> UcxLocalRegion::Export() const {
  if (!owns_memory_)
    return Status::InvalidArgument("ucx: only regions from AllocateExportable can be exported");
  RegionDescriptor d = BaseDescriptor("ucx", options_);
  EEP_ASSIGN_OR_RETURN(std::string rkey, engine_->PackRkey(memh_));
  d.backend_blob = EncodeUcxBlob(UcxRegionBlob{engine_->worker_address(), std::move(rkey)});
  return d;
}

UcxRemoteRegion::~UcxRemoteRegion() {
  engine_->ReleaseRemote(*this);
}

UcxRequest::~UcxRequest() {
  engine_->ReleaseRequest(*this);
}

}  // namespace

Result<std::unique_ptr<Engine>> CreateUcxEngine(const EngineOptions& options) {
  return UcxEngine::Create(options);
}

}  // namespace eep::transfer
