#include "transfer/shm/shm_engine.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

#include "core/logging.h"
#include "transfer/copy.h"

namespace eep::transfer {
namespace {

constexpr uint64_t kDefaultSliceBytes = 64ull << 20;

// Owns a file descriptor.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  int get() const { return fd_; }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Owns an mmap'd range.
struct MappingDeleter {
  size_t num_bytes;
  void operator()(uint8_t* p) const {
    if (p != nullptr) munmap(p, num_bytes);
  }
};
using Mapping = std::unique_ptr<uint8_t, MappingDeleter>;

std::string Errno() {
  return std::strerror(errno);
}

std::string RandomToken() {
  std::random_device rd;
  uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid());
  return fmt::format("{:016x}", v);
}

std::string FdLinkTarget(const std::string& path) {
  char buf[512];
  ssize_t n = readlink(path.c_str(), buf, sizeof buf - 1);
  return n < 0 ? std::string() : std::string(buf, static_cast<size_t>(n));
}

Result<uint64_t> ParseU64Param(const EngineOptions& options, const std::string& key,
                               uint64_t fallback) {
  auto it = options.params.find(key);
  if (it == options.params.end()) return fallback;
  try {
    size_t used = 0;
    uint64_t v = std::stoull(it->second, &used);
    if (used == it->second.size()) return v;
  } catch (...) {
  }
  return Status::InvalidArgument(
      fmt::format("shm param '{}' = '{}' is not an unsigned integer", key, it->second));
}

class ShmLocalRegion final : public LocalRegion {
 public:
  // Exportable: owns the memfd and the mapping.
  ShmLocalRegion(UniqueFd fd, Mapping mapping, uint64_t num_bytes, MemoryKind kind,
                 std::string token, ExportOptions options)
      : LocalRegion(mapping.get(), num_bytes, kind),
        fd_(std::move(fd)),
        mapping_(std::move(mapping)),
        token_(std::move(token)),
        options_(std::move(options)) {}
  // Registered caller memory: owns nothing.
  ShmLocalRegion(void* data, uint64_t num_bytes, MemoryKind kind)
      : LocalRegion(static_cast<uint8_t*>(data), num_bytes, kind),
        mapping_(nullptr, MappingDeleter{0}) {}

  Result<RegionDescriptor> Export() const override {
    if (fd_.get() < 0)
      return Status::InvalidArgument("shm: only regions from AllocateExportable can be exported");
    RegionDescriptor d = BaseDescriptor("shm", options_);
    d.backend_blob = nlohmann::json{{"pid", getpid()}, {"fd", fd_.get()}, {"token", token_}}.dump();
    return d;
  }

 private:
  UniqueFd fd_;
  Mapping mapping_;
  std::string token_;
  ExportOptions options_;
};

class ShmRemoteRegion final : public RemoteRegion {
 public:
  ShmRemoteRegion(RegionDescriptor d, Mapping mapping, pid_t pid, UniqueFd pidfd)
      : RemoteRegion(std::move(d)),
        mapping_(std::move(mapping)),
        pid_(pid),
        pidfd_(std::move(pidfd)) {}

  const uint8_t* mapped_data() const override { return mapping_.get(); }
  uint8_t* writable_data() const { return mapping_.get(); }

  Status CheckAlive() const override {
    bool gone;
    if (pidfd_.get() >= 0) {
      pollfd p{pidfd_.get(), POLLIN, 0};
      gone = ::poll(&p, 1, 0) > 0;  // a pidfd turns readable when the process exits
    } else {
      gone = ::kill(pid_, 0) != 0 && errno == ESRCH;
    }
    if (gone)
      return Status::RemoteDisconnect(
          fmt::format("shm: owner of the region ({}) exited", descriptor().owner));
    return Status::Ok();
  }

 private:
  Mapping mapping_;
  pid_t pid_;
  UniqueFd pidfd_;  // -1 where pidfd_open is unavailable (then kill(pid, 0))
};

enum class State { kPrepared, kPosted, kDone, kFailed, kCancelled };

class ShmRequest final : public TransferRequest {
 public:
  ShmRequest(Op op, std::vector<TransferItem> items, uint64_t total_bytes, ShmRemoteRegion* remote)
      : TransferRequest(op, items.size(), total_bytes, remote->descriptor().owner),
        items_(std::move(items)),
        remote_(remote) {}

  std::vector<TransferItem> items_;
  ShmRemoteRegion* remote_;
  State state_ = State::kPrepared;
  Status status_;
  size_t next_item_ = 0;      // first item not fully copied
  uint64_t item_offset_ = 0;  // bytes of items_[next_item_] already copied
};

class ShmEngine final : public Engine {
 public:
  ShmEngine(uint64_t slice_bytes, bool populate) : slice_bytes_(slice_bytes), populate_(populate) {}

  const std::string& name() const override { return name_; }
  bool SupportsRemote() const override { return false; }
  bool SupportsDevice() const override { return false; }

  Result<std::unique_ptr<LocalRegion>> AllocateExportable(uint64_t num_bytes,
                                                          const ExportOptions& options) override {
    if (options.kind == MemoryKind::kDevice)
      return Status::Unimplemented("shm: device memory is not supported");
    if (num_bytes == 0) return Status::InvalidArgument("shm: cannot export an empty region");
    std::string token = RandomToken();
    UniqueFd fd(memfd_create(("eep-" + token).c_str(), MFD_CLOEXEC));
    if (fd.get() < 0)
      return Status::ResourceExhausted(fmt::format("shm: memfd_create failed ({})", Errno()));
    if (ftruncate(fd.get(), static_cast<off_t>(num_bytes)) != 0)
      return Status::ResourceExhausted(
          fmt::format("shm: ftruncate to {} bytes failed ({})", num_bytes, Errno()));
    void* p = mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED)
      return Status::ResourceExhausted(
          fmt::format("shm: mmap of {} bytes failed ({})", num_bytes, Errno()));
    Mapping mapping(static_cast<uint8_t*>(p), MappingDeleter{num_bytes});
    madvise(p, num_bytes, MADV_HUGEPAGE);  // best effort: only if shmem THP is enabled
    if (options.kind == MemoryKind::kPinnedHost && mlock(p, num_bytes) != 0)
      return Status::ResourceExhausted(
          fmt::format("shm: mlock of {} bytes failed ({}); raise the locked-memory limit (ulimit "
                      "-l) or do not pin",
                      num_bytes, Errno()));
    return std::unique_ptr<LocalRegion>(new ShmLocalRegion(
        std::move(fd), std::move(mapping), num_bytes, options.kind, std::move(token), options));
  }

  Result<std::unique_ptr<LocalRegion>> RegisterMemory(void* data, uint64_t num_bytes,
                                                      MemoryKind kind) override {
    if (kind == MemoryKind::kDevice)
      return Status::Unimplemented("shm: device memory is not supported");
    if (data == nullptr && num_bytes > 0)
      return Status::InvalidArgument("shm: RegisterMemory of a null pointer");
    return std::unique_ptr<LocalRegion>(new ShmLocalRegion(data, num_bytes, kind));
  }

  Result<std::unique_ptr<RemoteRegion>> Import(const RegionDescriptor& d, Deadline) override {
    if (d.backend != "shm")
      return Status::InvalidArgument(
          fmt::format("shm: cannot import a region of backend '{}'", d.backend));
    if (d.kind == MemoryKind::kDevice)
      return Status::Unimplemented("shm: device memory is not supported");
    if (d.host_id != LocalHostId())
      return Status::Unavailable(fmt::format(
          "shm: region of {} lives on host '{}', this is '{}'; shm is same-host only (use ucx)",
          d.owner, d.host_id, LocalHostId()));
    nlohmann::json blob;
    pid_t pid;
    int owner_fd;
    std::string token;
    try {
      blob = nlohmann::json::parse(d.backend_blob);
      pid = blob.at("pid").get<pid_t>();
      owner_fd = blob.at("fd").get<int>();
      token = blob.at("token").get<std::string>();
    } catch (const std::exception& e) {
      return Status::InvalidArgument(
          fmt::format("shm: malformed descriptor blob from {}: {}", d.owner, e.what()));
    }
    const std::string expected = "/memfd:eep-" + token;
    const std::string path = fmt::format("/proc/{}/fd/{}", pid, owner_fd);
    UniqueFd fd(::open(path.c_str(), (d.remote_writable ? O_RDWR : O_RDONLY) | O_CLOEXEC));
    if (fd.get() < 0)
      return Status::Unavailable(
          fmt::format("shm: cannot open {} of {} ({}): owner gone?", path, d.owner, Errno()));
    // Check on our own fd, so a reused pid or fd number cannot fool us.
    if (FdLinkTarget(fmt::format("/proc/self/fd/{}", fd.get())).rfind(expected, 0) != 0)
      return Status::Unavailable(
          fmt::format("shm: {} is no longer the region of {} (owner restarted?)", path, d.owner));
    struct stat st {};
    if (fstat(fd.get(), &st) != 0 || static_cast<uint64_t>(st.st_size) < d.num_bytes)
      return Status::InvalidArgument(
          fmt::format("shm: region of {} is smaller than its descriptor says ({} bytes)", d.owner,
                      d.num_bytes));
    int prot = PROT_READ | (d.remote_writable ? PROT_WRITE : 0);
    void* p =
        mmap(nullptr, d.num_bytes, prot, MAP_SHARED | (populate_ ? MAP_POPULATE : 0), fd.get(), 0);
    if (p == MAP_FAILED)
      return Status::ResourceExhausted(
          fmt::format("shm: mmap of the region of {} failed ({})", d.owner, Errno()));
    Mapping mapping(static_cast<uint8_t*>(p), MappingDeleter{d.num_bytes});
    madvise(p, d.num_bytes, MADV_HUGEPAGE);
    UniqueFd pidfd(static_cast<int>(syscall(SYS_pidfd_open, pid, 0)));
    auto remote = std::make_unique<ShmRemoteRegion>(d, std::move(mapping), pid, std::move(pidfd));
    EEP_RETURN_IF_ERROR(remote->CheckAlive());
    return std::unique_ptr<RemoteRegion>(std::move(remote));
  }

  Result<std::unique_ptr<TransferRequest>> Prepare(Op op, RemoteRegion& remote,
                                                   std::vector<TransferItem> items) override {
    auto* shm = dynamic_cast<ShmRemoteRegion*>(&remote);
    if (shm == nullptr)
      return Status::InvalidArgument(
          fmt::format("shm: region of {} was imported by another backend ('{}')",
                      remote.descriptor().owner, remote.descriptor().backend));
    EEP_ASSIGN_OR_RETURN(const uint64_t total, ValidateBatch("shm", op, remote.descriptor(), items));
    return std::unique_ptr<TransferRequest>(new ShmRequest(op, std::move(items), total, shm));
  }

  Status Post(TransferRequest& request) override {
    auto& r = static_cast<ShmRequest&>(request);
    if (r.state_ != State::kPrepared) return Status::InvalidArgument("shm: request posted twice");
    r.state_ = State::kPosted;
    return Status::Ok();
  }

  Status Poll(TransferRequest& request) override {
    auto& r = static_cast<ShmRequest&>(request);
    switch (r.state_) {
      case State::kPrepared:
        return Status::InvalidArgument("shm: Poll of a request that was not posted");
      case State::kDone: return Status::Ok();
      case State::kFailed: return r.status_;
      case State::kCancelled:
        return Status::Cancelled(fmt::format("shm: transfer with {} was cancelled", r.peer()));
      case State::kPosted: break;
    }
    if (Status alive = r.remote_->CheckAlive(); !alive.ok()) return Fail(r, alive);
    uint64_t budget = slice_bytes_;
    uint8_t* base = r.remote_->writable_data();
    while (r.next_item_ < r.items_.size() && budget > 0) {
      const TransferItem& it = r.items_[r.next_item_];
      uint64_t n = std::min(budget, it.num_bytes - r.item_offset_);
      uint8_t* local = static_cast<uint8_t*>(it.local) + r.item_offset_;
      uint8_t* remote = base + it.remote_offset + r.item_offset_;
      if (n > 0) {
        if (r.op() == Op::kRead)
          StreamingCopy(local, remote, n);
        else
          StreamingCopy(remote, local, n);
      }
      budget -= n;
      r.item_offset_ += n;
      if (r.item_offset_ == it.num_bytes) {
        ++r.next_item_;
        r.item_offset_ = 0;
      }
    }
    if (r.next_item_ < r.items_.size()) return Status::InProgress();
    if (Status alive = r.remote_->CheckAlive(); !alive.ok()) return Fail(r, alive);
    r.state_ = State::kDone;
    return Status::Ok();
  }

  void Cancel(TransferRequest& request) override {
    auto& r = static_cast<ShmRequest&>(request);
    if (r.state_ == State::kPrepared || r.state_ == State::kPosted) r.state_ = State::kCancelled;
  }

 private:
  static Status Fail(ShmRequest& r, Status s) {
    r.state_ = State::kFailed;
    r.status_ = std::move(s);
    return r.status_;
  }

  const std::string name_ = "shm";
  const uint64_t slice_bytes_;
  const bool populate_;
};

}  // namespace

Result<std::unique_ptr<Engine>> CreateShmEngine(const EngineOptions& options) {
  for (const auto& [key, value] : options.params)
    if (key != "slice_bytes" && key != "populate")
      return Status::InvalidArgument(
          fmt::format("shm: unknown param '{}' (slice_bytes, populate)", key));
  EEP_ASSIGN_OR_RETURN(uint64_t slice_bytes,
                       ParseU64Param(options, "slice_bytes", kDefaultSliceBytes));
  EEP_ASSIGN_OR_RETURN(uint64_t populate, ParseU64Param(options, "populate", 1));
  if (slice_bytes == 0) return Status::InvalidArgument("shm: slice_bytes must be > 0");
  return std::unique_ptr<Engine>(new ShmEngine(slice_bytes, populate != 0));
}

}  // namespace eep::transfer
