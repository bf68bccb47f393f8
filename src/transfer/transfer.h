// Transfer engine: one-sided, batched READ/WRITE between memory regions of different
// processes (same host or not). It is the data path of the expert backup (src/backup) and,
// later, of expert migration between ranks. The API follows NIXL's shape:
//
// clang-format off
//   target (owns the bytes)                  initiator (moves the bytes)
//   -----------------------                  ---------------------------
//   engine = CreateEngine("ucx")             engine = CreateEngine("ucx")
//   region = engine->AllocateExportable(n)
//   desc = region->Export()  -- JSON, out of band (ZeroMQ) -->  remote = engine->Import(desc, deadline)
//   loop { engine->ProgressFor(ms); }        req = engine->Prepare(Op::kRead, *remote, items)
//     (only some backends need the           engine->Post(*req); engine->Poll(*req): kInProgress .. OK
//      target to progress; cheap for all)    or: engine->Transfer(op, *remote, items, deadline)
// clang-format on
//
// * Prepare validates and resolves a batch (bounds, access rights, memory kinds); no byte moves.
//   Post starts it. Poll never blocks: kInProgress until every item completed, OK, or the first
//   error. Wait/Transfer block, but never past their Deadline: on expiry the request is
//   cancelled and kTimeout returned. A dead peer gives kRemoteDisconnect.
// * Backends live in src/transfer/<name>/ and are registered by name (see backends.def: adding a
//   backend is a folder plus one line there). Each says what it can do: SupportsRemote() (peer may
//   be on another host), SupportsDevice() (GPU memory). Built in:
//     shm: same host only. Exportable regions are memfd-backed; the importer maps them and
//          copies (StreamingCopy, copy.h), or reads in place through RemoteRegion::mapped_data().
//     ucx: UCX/UCP RMA (ucp_get_nbx/ucp_put_nbx) over whatever UCX finds: tcp, verbs, ...
//          The descriptor carries the owner's worker address and packed rkey. UCX_TLS and the
//          other UCX_* environment variables are honoured. The path between hosts; within one
//          host prefer shm (see ucx/ucx_engine.h for why UCX 1.13 falls back to tcp there).
// * Device memory: MemoryKind::kDevice exists in every signature, and backends reject it with
//   kUnimplemented while SupportsDevice() is false. A CUDA-capable backend (or a CUDA build of
//   ucx) only has to accept it; callers need no change.
//
// Ownership: an Engine must outlive every LocalRegion, RemoteRegion and TransferRequest made from
// it; a RemoteRegion must outlive the requests prepared on it; local buffers named in a request
// must stay valid until the request completed or was destroyed. Destroying a request that is
// still in flight cancels it and returns only once the backend can no longer touch its buffers.
//
// Threads: Engine methods are thread-safe (each backend serialises internally). One
// TransferRequest is used by one thread at a time. Regions are immutable after creation.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "core/util.h"

namespace eep::transfer {

enum class MemoryKind : uint8_t {
  kHost,        // pageable host memory
  kPinnedHost,  // host memory locked in RAM (mlock now; cudaHostRegister in a CUDA build)
  kDevice,      // accelerator memory; only backends with SupportsDevice() accept it
};
const char* MemoryKindName(MemoryKind kind);
Result<MemoryKind> ParseMemoryKind(const std::string& name);

enum class Op : uint8_t {
  kRead,   // remote -> local
  kWrite,  // local -> remote
};
const char* OpName(Op op);

// A point in time after which a blocking call gives up with kTimeout.
class Deadline {
 public:
  using Clock = std::chrono::steady_clock;
  explicit Deadline(Clock::time_point at) : at_(at) {}
  static Deadline AfterMs(int64_t timeout_ms) {
    return Deadline(Clock::now() + std::chrono::milliseconds(timeout_ms));
  }
  bool Expired() const { return Clock::now() >= at_; }
  // Milliseconds left, rounded up, >= 0.
  int64_t RemainingMs() const;
  Clock::time_point at() const { return at_; }

 private:
  Clock::time_point at_;
};

// Everything a peer needs to reach an exported region; plain data, serialisable as JSON.
struct RegionDescriptor {
  std::string backend;        // registry name of the backend that exported it ("shm", "ucx")
  std::string host_id;        // "hostname/boot-id" of the owner (same-host backends check it)
  std::string owner;          // free-text label for messages ("backup-manager node 1 pid 42")
  uint64_t base_address = 0;  // region start in the owner's address space
  uint64_t num_bytes = 0;
  MemoryKind kind = MemoryKind::kHost;
  bool remote_writable = false;  // whether peers may WRITE into it
  std::string backend_blob;      // opaque, backend-specific bytes (base64 in JSON)

  nlohmann::json ToJson() const;
  // Errors name the missing or malformed field.
  static Result<RegionDescriptor> FromJson(const nlohmann::json& j);
};

// "hostname/boot-id" of this machine, computed once.
const std::string& LocalHostId();

// Memory this process registered with (or allocated from) an engine. Immutable; owned by the
// caller; destroy before the engine.
struct ExportOptions;

class LocalRegion {
 public:
  virtual ~LocalRegion() = default;
  uint8_t* data() const { return data_; }
  uint64_t num_bytes() const { return num_bytes_; }
  MemoryKind kind() const { return kind_; }
  // The descriptor peers import. Only regions from AllocateExportable (or backends that can
  // export any registered memory) have one; others return kInvalidArgument.
  virtual Result<RegionDescriptor> Export() const = 0;

 protected:
  LocalRegion(uint8_t* data, uint64_t num_bytes, MemoryKind kind)
      : data_(data), num_bytes_(num_bytes), kind_(kind) {}
  // For backends' Export: every field but backend_blob (owner defaults to "pid N").
  RegionDescriptor BaseDescriptor(const std::string& backend, const ExportOptions& options) const;

 private:
  uint8_t* data_;
  uint64_t num_bytes_;
  MemoryKind kind_;
};

// A peer's region, imported from its descriptor. Owned by the caller; destroy before the engine.
class RemoteRegion {
 public:
  virtual ~RemoteRegion() = default;
  const RegionDescriptor& descriptor() const { return descriptor_; }
  // Where the region is mapped into this process, when the backend maps it (shm), for
  // zero-copy reads; nullptr otherwise. Valid while this object lives.
  virtual const uint8_t* mapped_data() const { return nullptr; }
  // OK while the owner is believed alive; kRemoteDisconnect once the backend saw it go.
  // Cheap, non-blocking; a failed peer may still look alive until traffic proves otherwise.
  virtual Status CheckAlive() const = 0;

 protected:
  explicit RemoteRegion(RegionDescriptor descriptor) : descriptor_(std::move(descriptor)) {}

 private:
  RegionDescriptor descriptor_;
};

// One contiguous piece of a batch.
struct TransferItem {
  void* local = nullptr;       // host (or device) memory of this process
  uint64_t remote_offset = 0;  // from the start of the remote region
  uint64_t num_bytes = 0;
};

// An opaque, backend-specific batch; see Engine::Prepare. Not copyable.
class TransferRequest {
 public:
  virtual ~TransferRequest() = default;
  TransferRequest(const TransferRequest&) = delete;
  TransferRequest& operator=(const TransferRequest&) = delete;
  Op op() const { return op_; }
  size_t num_items() const { return num_items_; }
  uint64_t total_bytes() const { return total_bytes_; }
  // The remote region's owner label, for messages.
  const std::string& peer() const { return peer_; }

 protected:
  TransferRequest(Op op, size_t num_items, uint64_t total_bytes, std::string peer)
      : op_(op), num_items_(num_items), total_bytes_(total_bytes), peer_(std::move(peer)) {}

 private:
  Op op_;
  size_t num_items_;
  uint64_t total_bytes_;
  std::string peer_;
};

struct ExportOptions {
  MemoryKind kind = MemoryKind::kHost;  // kPinnedHost locks the pages (needs RLIMIT_MEMLOCK)
  bool remote_writable = false;
  std::string owner;  // label copied into the descriptor
};

// Backend-specific settings, "key" -> "value"; each backend lists the keys it accepts and
// rejects unknown ones (kInvalidArgument naming the key).
struct EngineOptions {
  std::map<std::string, std::string> params;
};

// One backend instance in this process. See the file comment for the life cycle.
class Engine {
 public:
  virtual ~Engine() = default;

  virtual const std::string& name() const = 0;
  virtual bool SupportsRemote() const = 0;
  virtual bool SupportsDevice() const = 0;

  // Allocates `num_bytes` of memory that peers can reach once its descriptor is exported.
  // Zero-filled. Errors: kResourceExhausted (allocation/locking), kUnimplemented (device).
  virtual Result<std::unique_ptr<LocalRegion>> AllocateExportable(uint64_t num_bytes,
                                                                  const ExportOptions& options) = 0;
  // Registers caller-owned memory [data, data+num_bytes) as a local transfer buffer; may speed
  // up transfers (UCX: pre-registered memory handle). Optional: unregistered host buffers work.
  virtual Result<std::unique_ptr<LocalRegion>> RegisterMemory(void* data, uint64_t num_bytes,
                                                              MemoryKind kind) = 0;
  // Connects to a peer's region, ready for transfers when it returns (UCX: the endpoint's
  // wire-up is completed here with a 1-byte read, so the first Post pays no connection set-up
  // and an unreachable peer shows here). kInvalidArgument if the descriptor is for another
  // backend; kUnavailable if it cannot be reached from here (shm from another host, owner gone);
  // kTimeout if the peer did not complete the connection before `deadline`.
  virtual Result<std::unique_ptr<RemoteRegion>> Import(const RegionDescriptor& descriptor,
                                                       Deadline deadline) = 0;
  // Import with a 10 s deadline.
  Result<std::unique_ptr<RemoteRegion>> Import(const RegionDescriptor& descriptor) {
    return Import(descriptor, Deadline::AfterMs(10000));
  }

  // Validates a batch against `remote` (which must come from this engine's Import):
  // every item inside the region, local pointers non-null, writes only to writable regions.
  // Errors name the item index and the peer. Moves no data.
  virtual Result<std::unique_ptr<TransferRequest>> Prepare(Op op, RemoteRegion& remote,
                                                           std::vector<TransferItem> items) = 0;
  // Starts a prepared request (once). Errors are final for this request.
  virtual Status Post(TransferRequest& request) = 0;
  // Non-blocking: OK when all items completed, kInProgress, or the first error.
  virtual Status Poll(TransferRequest& request) = 0;
  // Aborts a posted request; when it returns, no byte of the request's local buffers will be
  // touched again. A later Poll returns kCancelled. A no-op for a finished request.
  virtual void Cancel(TransferRequest& request) = 0;

  // Progress hooks for the waiting loops below and for targets that must progress:
  // EventFd() is a pollable fd that becomes readable when Progress() may have work, or -1 if
  // the backend has no such fd (then Poll does the work itself). ArmEvents() must return true
  // before sleeping on the fd; false means "events pending, call Progress() again".
  virtual int EventFd() { return -1; }
  virtual bool Progress() { return false; }
  virtual bool ArmEvents() { return true; }

  // Blocks until `request` (posted) finishes or `deadline` passes (then: Cancel + kTimeout
  // naming the peer and the bytes). Polls back to back for up to 200 us, then sleeps on
  // EventFd() in slices of at most 50 ms (no busy waiting beyond that).
  Status Wait(TransferRequest& request, Deadline deadline);
  // Prepare + Post + Wait.
  Status Transfer(Op op, RemoteRegion& remote, std::vector<TransferItem> items, Deadline deadline);
  // Target side: progresses the engine for up to `timeout_ms`, sleeping on EventFd() when idle
  // (returns early after handling events). Call in a loop from the thread that owns the region.
  void ProgressFor(int64_t timeout_ms);
};

// For backends' Prepare: checks a batch against the region it targets (writes only to
// writable regions, non-null local buffers, every item inside the region) and returns its total
// bytes. Errors start with `backend` and name the item index and the region's owner.
Result<uint64_t> ValidateBatch(const char* backend, Op op, const RegionDescriptor& region,
                               const std::vector<TransferItem>& items);

// ---- Registry ------------------------------------------------------------------------------

using EngineFactory = std::function<Result<std::unique_ptr<Engine>>(const EngineOptions&)>;

struct BackendInfo {
  std::string name;  // registry key, also RegionDescriptor::backend
  std::string help;  // one line for --help texts
  EngineFactory factory;
};

// Adds a backend at run time (tests, plug-ins). kAlreadyExists if the name is taken. The
// built-in backends (backends.def) are registered before the first registry access.
Status RegisterBackend(BackendInfo info);
// Registered names, sorted.
std::vector<std::string> BackendNames();
// One line per backend, "name: help".
std::string DescribeBackends();
// kNotFound listing the registered names if `name` is unknown.
Result<std::unique_ptr<Engine>> CreateEngine(const std::string& name,
                                             const EngineOptions& options = {});

// base64 (RFC 4648, with padding), used for descriptor blobs: core/util.h's.
using ::eep::Base64Decode;
using ::eep::Base64Encode;

}  // namespace eep::transfer
